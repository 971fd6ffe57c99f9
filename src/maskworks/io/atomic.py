"""Atomic writes: build the output beside its target, then rename it into place.

A failed or interrupted write leaves nothing at the target path (only a hidden
``.<name>.partial-*`` sibling, removed on the failure path when Python gets the
chance).  Directories (Zarr stores) are swapped in with two renames; the window
in which neither the old nor the new store is present is a single rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def partial_path(target: Path) -> Path:
    """Hidden sibling of ``target`` to write into before the final rename.

    The real suffix is kept at the end so that libraries choosing a format by
    extension (nibabel, tifffile) still see it.
    """
    target = Path(target)
    return target.with_name(f".{uuid.uuid4().hex[:8]}.partial.{target.name}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path next to ``target``; on success move it onto ``target``.

    Works for files and directories.  On any exception the temporary path is
    removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(target)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"writer produced nothing for {target}")
        if tmp.is_dir():
            old = None
            if target.exists():
                old = target.with_name(f".{uuid.uuid4().hex[:8]}.old.{target.name}")
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                _remove(old)
        else:
            if target.is_dir():
                _remove(target)
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
