"""Atomic writes: build the output beside its target, then rename it into place.

A failed or interrupted write leaves nothing at the target path (only a hidden
``.<host>-<pid>-<id>.partial.<name>`` sibling, removed on the failure path when Python
gets the chance, and by the next :func:`transaction` on that target when it does not).
Directories (Zarr stores) are swapped in with two renames; the window in which neither
the old nor the new store is present is a single rename.

:func:`transaction` makes the outputs of a stage one unit: every :func:`atomic_path`
write to one of its targets is staged and only renamed into place when the whole stage
has succeeded, so a run leaves either all of the old outputs or all of the new ones.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

_HOST = socket.gethostname().replace("-", "_").replace(".", "_") or "host"
STALE_SECONDS = 24 * 3600  # staging left by another host is removed after this long
_ACTIVE = contextvars.ContextVar("maskworks_transaction", default=None)


def _remove(path: Path) -> None:
    """Remove staging, best effort: on a read-only or vanished folder it must not hide the error
    that brought us here (what it cannot remove, the next run's :func:`remove_stale` does)."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def partial_path(target: Path) -> Path:
    """Hidden sibling of ``target`` to write into before the final rename.

    The real suffix is kept at the end so that libraries choosing a format by
    extension (nibabel, tifffile) still see it.
    """
    target = Path(target)
    return target.with_name(f".{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.partial.{target.name}")


def _old_path(target: Path) -> Path:
    return target.with_name(f".{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.old.{target.name}")


def remove_stale(target) -> list[Path]:
    """Remove the staging siblings (``.partial``/``.old``) of ``target`` that no live writer owns:
    this host's whose process is gone, other hosts' older than ``STALE_SECONDS``."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        for path in target.parent.glob(f".*.{kind}.{target.name}"):
            owner = path.name[1:].split(".", 1)[0].split("-")
            if len(owner) == 3 and owner[0] == _HOST and owner[1].isdigit():
                alive = _alive(int(owner[1]))
            else:  # another host's, or an older naming: by age
                try:
                    alive = time.time() - path.lstat().st_mtime < STALE_SECONDS
                except FileNotFoundError:
                    continue
            if not alive:
                _remove(path)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename a finished ``tmp`` onto ``target`` (a directory: two renames, the old one removed after)."""
    if tmp.is_dir():
        old = None
        if target.exists() or target.is_symlink():
            old = _old_path(target)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            _remove(old)
    else:
        if target.is_dir() and not target.is_symlink():
            _remove(target)
        os.replace(tmp, target)


class _Transaction:
    def __init__(self, targets):
        self.targets = {Path(os.path.abspath(t)) for t in targets}
        self.staged: dict[Path, Path] = {}

    def owns(self, target: Path) -> bool:
        return Path(os.path.abspath(target)) in self.targets


def staged(target) -> Path:
    """Where ``target`` can be read back inside a :func:`transaction`: its staged new version when
    the running stage has written it, else the target itself."""
    txn = _ACTIVE.get()
    if txn is not None:
        return txn.staged.get(Path(os.path.abspath(target)), Path(target))
    return Path(target)


@contextlib.contextmanager
def transaction(*targets):
    """Make the outputs ``targets`` of a stage one unit.

    Inside the block, :func:`atomic_path` writes to a target are staged beside it and
    renamed into place together when the block ends without an exception; on an exception
    every staged write is removed and the targets are left exactly as they were.  Stale
    staging of these targets left by a killed run is removed first.  Nested transactions
    join the outermost one.  A stage that reads one of its outputs back inside the block
    reads :func:`staged` of it.
    """
    if _ACTIVE.get() is not None:
        yield _ACTIVE.get()
        return
    paths = [Path(t) for t in targets if t is not None]
    for t in paths:
        remove_stale(t)
    txn = _Transaction(paths)
    token = _ACTIVE.set(txn)
    try:
        yield txn
    except BaseException as exc:
        for tmp in txn.staged.values():
            _remove(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None and paths:
            exc.filename = str(paths[0].parent)  # "no space left" names no file: the outputs' folder
        raise
    finally:
        _ACTIVE.reset(token)
    for target, tmp in txn.staged.items():
        _swap_in(tmp, target)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path next to ``target``; on success move it onto ``target``.

    Works for files and directories.  On any exception the temporary path is
    removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(target)
    txn = _ACTIVE.get()
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"writer produced nothing for {target}")
        if txn is not None and txn.owns(target):
            key = Path(os.path.abspath(target))
            if key in txn.staged:  # written twice in one stage: the last write wins
                _remove(txn.staged[key])
            txn.staged[key] = tmp
        else:
            _swap_in(tmp, target)
    except BaseException as exc:
        _remove(tmp)
        cause = exc
        while cause is not None:  # the user knows the target, not its hidden staging name
            if isinstance(cause, OSError) and cause.errno is not None and \
                    (cause.filename is None or str(cause.filename).startswith(str(tmp))):
                cause.filename = str(target)
            cause = cause.__cause__ or cause.__context__
        raise
