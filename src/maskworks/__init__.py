"""maskworks: segmentation-mask stages for cryo-ET, multiplexed tissue and volume EM.

The library holds pure array functions (``maskworks.em``, ``maskworks.cryoet``,
``maskworks.codex``) and one I/O module (``maskworks.io``); the Snakemake workflow
and the ``maskworks`` command line call the same functions.
"""

from __future__ import annotations

import os
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

# `git describe --long --abbrev=40` of a tagged commit (tag-distance-gnode), or the bare node (--always)
_DESCRIBED = re.compile(r"^(?:(?P<tag>.+)-(?P<distance>\d+)-g)?(?P<node>[0-9a-f]{40})(?P<dirty>-dirty)?$")


def checkout_version(root: str | os.PathLike) -> str | None:
    """The version of the maskworks checkout at ``root`` now, as setuptools-scm would build it, or
    None when ``root`` is not a git checkout of maskworks (or git cannot say).

    Notes
    -----
    setuptools-scm's default schemes (guess-next-dev, node-and-date): a clean tagged commit is its
    tag; otherwise ``<next>.dev<distance>+g<node[:9]>``, with ``.d<YYYYMMDD>`` (today, UTC, or
    SOURCE_DATE_EPOCH) when tracked files have uncommitted changes.  Untagged history counts from
    ``[tool.setuptools_scm] fallback_version`` in pyproject.toml.  tests/unit/test_version.py checks
    that the two agree.
    """
    root = Path(root)
    if not ((root / ".git").exists() and (root / "pyproject.toml").is_file()):
        return None

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True, stdin=subprocess.DEVNULL).stdout.strip()

    try:
        described = _DESCRIBED.match(git("describe", "--dirty", "--tags", "--long", "--always", "--abbrev=40",
                                         "--match", "*[0-9]*"))
        if described is None:
            return None
        node, dirty = described["node"], bool(described["dirty"])
        if described["tag"] is not None:
            tag, distance = described["tag"], int(described["distance"])
        else:
            fallback = re.search(r'^fallback_version\s*=\s*"([^"]+)"', (root / "pyproject.toml").read_text(), re.M)
            tag, distance = (fallback[1] if fallback else "0.0"), int(git("rev-list", "--count", "HEAD"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    tag = re.sub(r"^(?:[\w-]+-)?[vV]?", "", tag.split("+")[0])  # v0.2.0, maskworks-0.2.0 -> 0.2.0
    if distance == 0 and not dirty:
        return tag
    prefix, dev, tail = tag.rpartition(".dev")
    if dev and tail == "0":
        following = prefix
    else:
        bumped = re.match(r"(.*?)(\d+)$", tag)
        if bumped is None:
            return None
        following = f"{bumped[1]}{int(bumped[2]) + 1}"
    local = f"g{node[:9]}"
    if dirty:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        now = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
        local += f".d{now:%Y%m%d}"
    return f"{following}.dev{distance}+{local}"


def _version() -> str:
    """This maskworks' version.  From a checkout (an editable install, or ``src`` on the path) it is
    the checkout's own, now: the metadata an editable install wrote is that of the commit it was
    installed at.  Otherwise the installed metadata; never an error."""
    live = checkout_version(Path(__file__).resolve().parents[2])
    if live:
        return live
    try:
        from importlib.metadata import version

        return version("maskworks")
    except Exception:  # not installed, or unreadable metadata: still importable
        return "unknown"


__version__ = _version()
