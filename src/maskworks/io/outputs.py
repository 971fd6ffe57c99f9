"""The outputs of a stage: which paths it may write, and the commit that puts them in place.

Ownership
    Before a stage reads anything, :func:`check_outputs` resolves every output path and refuses
    (:class:`InputError`, nothing touched) an output that is an input, lies inside an input folder
    or store, is given twice, lies under a file, is a symbolic link or a special file, is an
    existing folder where a file is written (or a file where a store is written), or is an
    existing store that maskworks did not write (it carries the ``.maskworks`` marker, or for
    stores of earlier versions the ``maskworks`` provenance in its Zarr attributes).

Staging
    Inside :func:`transaction`, :func:`atomic_path` hands out ``.mw-<run>.new.<name>`` beside
    each target.  Nothing at a target changes while the stage runs; a failure removes the run's
    staging and nothing else.  ``<run>`` is ``<host>-<pid>-<random>``: a run only ever removes
    staging that carries its own id, or that of a run proven dead (below).

Commit (journaled; the state after a kill at any instant is the old set or the new set)
    1. every staged file and store is flushed to disk; stores get the ``.maskworks`` marker;
    2. a journal ``.mw-<run>.journal`` listing the targets is written into every folder of the
       commit but the first (state ``prepared``), then into the first (state ``committed``):
       that last rename is the commit point;
    3. each staged file is renamed onto its target (one atomic ``rename``); each staged store
       is exchanged with the existing one (``renameat2(RENAME_EXCHANGE)``, one atomic step; two
       renames where the file system cannot exchange) and the old store is removed;
    4. the journals are removed, the first folder's last.
    The next run on any of these outputs (whatever its own outcome) first recovers an
    interrupted commit: with the ``committed`` journal it completes the renames, without it it
    removes the staging, so the targets hold the complete new set or the untouched old one.

Locks
    A run holds a POSIX record lock on one byte per output name (in ``.maskworks.lock`` of the
    output's folder) from the check to the end of its commit; a second run on the same outputs
    stops at once with :class:`OutputBusy`.  A lock dies with its process, so a lock that can be
    taken proves that the staging and journals of that name belong to a dead run.

Fault points
    :func:`fault_point` marks named steps where the reliability tests stop the process
    (``MASKWORKS_FAULT=kill:<step>[:<n>]``) or hold it until a file appears
    (``MASKWORKS_FAULT=wait:<step>:<file>``); without the variable they do nothing.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import errno
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, Interrupted, OutputBusy

log = logging.getLogger("maskworks")

MARKER = ".maskworks"  # inside every store maskworks commits: "maskworks wrote this store"
_MARKER_TEXT = b'{"written_by": "maskworks"}\n'
LOCK_FILE = ".maskworks.lock"
STORE_SUFFIXES = (".zarr", ".n5")
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_RUN = r"(?P<run>[A-Za-z0-9_]+-\d+-[0-9a-f]{8})"
_STAGING_RE = re.compile(rf"^\.mw-{_RUN}\.(?P<kind>new|old)\.(?P<name>.+)$")
_JOURNAL_RE = re.compile(rf"^\.mw-{_RUN}\.journal(?P<tmp>\.tmp)?$")
_ACTIVE: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar("maskworks_transaction", default=None)


def new_run_id() -> str:
    return f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def staging_path(target: Path, run: str, kind: str = "new") -> Path:
    """``.mw-<run>.<kind>.<name>`` beside ``target`` (the real suffix stays at the end, so that
    libraries choosing a format by extension still see it)."""
    return target.with_name(f".mw-{run}.{kind}.{target.name}")


def _tag(run: str) -> str:
    """The file inside a staged store that says "this is run <run>'s new store" during a commit."""
    return f".mw-{run}.staged"


def target_kind(path) -> str:
    """``store`` for a Zarr/N5 folder (by its suffix, or a label image ``<image>.zarr/labels/<name>``),
    ``file`` for everything else."""
    p = Path(path)
    if str(p).lower().rstrip("/").endswith(STORE_SUFFIXES):
        return "store"
    in_labels = p.parent.name == "labels" and p.parent.parent.name.lower().endswith(".zarr")
    return "store" if in_labels and not p.name.startswith(".") and p.name != "zarr.json" else "file"


# ----------------------------------------------------------------------------- fault points

_FAULT_COUNTS: collections.Counter = collections.Counter()


def fault_point(step: str) -> None:
    """Stop here when the tests ask for it (see the module docstring); otherwise nothing.

    ``MASKWORKS_FAULT`` holds comma-separated ``kill:<step>[:<n>]`` (SIGKILL at the n-th time
    this step is reached, default the first) and ``wait:<step>:<n>:<file>`` (at the n-th time,
    create ``<file>.reached`` and wait until ``<file>`` exists); ``no-exchange`` makes the
    commit behave as on a file system without ``RENAME_EXCHANGE`` (NFS).
    """
    spec = os.environ.get("MASKWORKS_FAULT")
    if not spec:
        return
    _FAULT_COUNTS[step] += 1
    for item in spec.split(","):
        action, _, rest = item.strip().partition(":")
        where, _, arg = rest.partition(":")
        if where != step:
            continue
        if action == "kill" and _FAULT_COUNTS[step] == int(arg or 1):
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "wait":
            n, _, path = arg.partition(":")
            if _FAULT_COUNTS[step] == int(n) and path:
                Path(path + ".reached").touch()
                deadline = time.monotonic() + 600
                while not Path(path).exists() and time.monotonic() < deadline:
                    time.sleep(0.02)


def _fault(name: str) -> bool:
    return name in os.environ.get("MASKWORKS_FAULT", "").split(",")


# ----------------------------------------------------------------------------- ownership


@dataclass(frozen=True)
class Target:
    path: Path  # absolute; its folder resolved (symbolic links of folders followed), the name not
    kind: str  # "file" | "store"
    owned: bool = False  # the caller knows an existing store there is its own (e.g. copick outputs)


def _resolve(path) -> Path:
    p = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(p)
    return Path(_real_folder(parent)) / name


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    """``realpath`` of an output folder; cached for the thousands of outputs one folder can hold (the
    cache is emptied when a transaction starts)."""
    return os.path.realpath(folder)


def _within(path: Path, folder: Path) -> bool:
    return path != folder and folder in path.parents


def _is_maskworks_store(path: Path) -> bool:
    """A folder maskworks wrote: its marker, or (earlier versions) a ``maskworks`` entry in the
    root attributes of the Zarr store; an empty folder destroys nothing either."""
    if (path / MARKER).is_file():
        return True
    for meta, key in ((".zattrs", None), ("zarr.json", "attributes")):
        try:
            doc = json.loads((path / meta).read_text())
        except (OSError, ValueError):
            continue
        attrs = doc.get(key, {}) if key else doc
        if isinstance(attrs, dict) and ("maskworks" in attrs or "maskworks" in attrs.get("ome", {})):
            return True
    try:
        return not any(os.scandir(path))
    except OSError:
        return False


def _check_existing(t: Target) -> None:
    p = t.path
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        return  # reported by the folder check
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise InputError(f"{p}: is a symbolic link (to {os.readlink(p)}); maskworks replaces only the files and "
                         "stores it wrote - remove the link or choose another output path")
    if t.kind == "file":
        if stat.S_ISDIR(mode):
            raise InputError(f"{p}: is a folder, but this output is a file; maskworks never replaces a folder with "
                             "a file - move the folder away or choose another output path")
        if not stat.S_ISREG(mode):
            raise InputError(f"{p}: is a {_file_type(mode)}, not a regular file; maskworks replaces only regular "
                             "files and the stores it wrote - choose another output path")
        return
    if not stat.S_ISDIR(mode):
        raise InputError(f"{p}: is a {_file_type(mode)}, but this output is a store (a folder); maskworks never "
                         "replaces it - move it away or choose another output path")
    if not t.owned and not _is_maskworks_store(p):
        raise InputError(f"{p}: is a folder that maskworks did not write (no {MARKER} marker and no maskworks "
                         "provenance in its metadata); it is left alone - choose another output path, or move it "
                         "away yourself if it is an old result to replace")


def _file_type(mode) -> str:
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe (FIFO)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _check_folder(p: Path) -> None:
    """The folders above an output must be folders (or not exist yet)."""
    for anc in [p.parent, *p.parent.parents]:
        try:
            st = os.stat(anc)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            continue
        except PermissionError:
            return  # reported when writing, as a permission problem
        if not stat.S_ISDIR(st.st_mode):
            raise InputError(f"{p}: cannot be written: {anc} is a file, not a folder - choose another output folder")
        return


def check_outputs(targets, inputs=(), owned=(), stores=(), labels_of=None) -> list[Target]:
    """Resolve and check the outputs of a stage before anything is read or written.

    Parameters
    ----------
    targets : iterable of path or None
        Output files and stores (``.zarr``/``.n5`` are stores).
    inputs : iterable of path or None
        The stage's inputs: files, folders and stores.  No output may be one of them, lie
        inside an input folder or store, or be a store holding an input.
    owned : iterable of path
        Outputs whose existing store the caller knows it wrote (see :class:`Target`).
    stores : iterable of path
        Outputs that are folders whatever their suffix.
    labels_of : path, optional
        An input OME-Zarr image whose ``labels/`` group the outputs may write into (a label image
        and the group's metadata; nothing else of the image).

    Returns
    -------
    list of Target

    Raises
    ------
    InputError
        Naming the output path and what is wrong with it; nothing has been touched.
    """
    owned = {_resolve(p) for p in owned if p is not None}
    folders = {_resolve(p) for p in stores if p is not None}
    out: list[Target] = []
    seen: dict[Path, str] = {}
    for raw in targets:
        if raw is None:
            continue
        p = _resolve(raw)
        if p in seen:
            raise InputError(f"{raw}: given for two outputs of this run; every output needs a path of its own")
        seen[p] = str(raw)
        out.append(Target(p, "store" if p in folders else target_kind(p), p in owned))
    ins = []
    for raw in inputs:
        if raw in (None, ""):
            continue
        real = Path(os.path.realpath(os.fspath(raw)))
        ins.append((raw, real, real.is_dir()))
    stores = [t.path for t in out if t.kind == "store"]
    labels = Path(os.path.realpath(labels_of)) / "labels" if labels_of is not None else None
    for t in out:
        p = t.path
        for s in stores:
            if _within(p, s):
                raise InputError(f"{p}: lies inside {s}, another output of this run; give each output its own path")
        _check_folder(p)
        _check_existing(t)
        for raw, real, is_dir in ins:
            if p == real or (os.path.lexists(p) and os.path.exists(real) and _same_file(p, real)):
                raise InputError(f"{p}: is also an input of this run ({raw}); outputs never replace their inputs - "
                                 "choose another output path")
            if is_dir and _within(p, real) and not (labels is not None and p.parent == labels):
                raise InputError(f"{p}: lies inside the input folder {raw}; write the outputs to a folder of their own")
            if t.kind == "store" and _within(real, p):
                raise InputError(f"{p}: the input {raw} lies inside this output store, which a run replaces whole; "
                                 "choose another output path")
    return out


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*$")


def safe_name(name: str, what: str) -> str:
    """``name`` when it is safe as one file name made from an id of a table or a config (a patch id,
    a run name, a token): ordinary characters only, so it can neither leave its folder (``/``,
    ``..``) nor hide (a leading dot, where staging lives); else :class:`InputError` saying ``what``."""
    if not _SAFE_NAME.match(name):
        raise InputError(f"{what}: {name!r} cannot be used in a file name (letters, digits and . _ - + = @ , only, "
                         "not starting with a dot, no slashes); fix the value")
    return name


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ----------------------------------------------------------------------------- locks


def _lock_offset(name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big") >> 2


class _Locks:
    """One POSIX record lock per output name, in ``.maskworks.lock`` of its folder.

    POSIX locks belong to the process, and closing any descriptor of the lock file drops all of
    them, so the open lock files and the locked bytes are shared by every transaction of the
    process (counted per folder and byte); each transaction releases what it took."""

    _fds: dict[Path, int] = {}
    _held: dict[Path, collections.Counter] = {}
    _warned = False

    def __init__(self):
        self.taken: set[tuple[Path, str]] = set()

    @classmethod
    def _fd(cls, folder: Path) -> int:
        if folder not in cls._fds:
            try:
                cls._fds[folder] = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:  # the user knows the folder, not the lock file in it
                raise OSError(exc.errno, exc.strerror, str(folder)) from None
        return cls._fds[folder]

    @classmethod
    def _current(cls, folder: Path) -> bool:
        return cls._current_fd(cls._fds[folder], folder)

    def try_lock(self, folder: Path, name: str) -> bool:
        """Take the lock of ``folder/name``; False when another process holds it."""
        import fcntl

        key = (folder, name)
        if key in self.taken:
            return True
        offset = _lock_offset(name)
        held = self._held.setdefault(folder, collections.Counter())
        if held[offset] == 0:
            for _ in range(20):
                fd = self._fd(folder)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset, os.SEEK_SET)
                    got = True
                except OSError as exc:
                    if exc.errno in (errno.EACCES, errno.EAGAIN):
                        got = False
                    elif exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        if not _Locks._warned:
                            log.warning("%s: this file system does not support locks (%s); two runs writing the "
                                        "same outputs at once are not detected here", folder, exc.strerror)
                            _Locks._warned = True
                        got = True
                    else:
                        raise
                if self._current(folder) or +held:
                    break
                # the lock file was removed by a run that had finished after we opened it: open it again
                os.close(self._fds.pop(folder))
            if not got:
                return False
        held[offset] += 1
        self.taken.add(key)
        return True

    def unlock(self, folder: Path, name: str, keep=()) -> None:
        """Release the lock of one name taken only to recover a dead run's leftovers."""
        key = (folder, name)
        if key in self.taken and key not in keep:
            self.taken.discard(key)
            self._drop(folder, _lock_offset(name))

    def _drop(self, folder: Path, offset: int) -> None:
        import fcntl

        held = self._held[folder]
        held[offset] -= 1
        if held[offset] > 0:
            return
        del held[offset]
        if folder in self._fds:
            with contextlib.suppress(OSError):
                fcntl.lockf(self._fds[folder], fcntl.LOCK_UN, 1, offset, os.SEEK_SET)

    def release(self) -> None:
        """Release every lock this transaction took; a lock file no process uses any more is removed."""
        import fcntl

        folders = {f for f, _ in self.taken}
        for folder, name in self.taken:
            self._drop(folder, _lock_offset(name))
        self.taken.clear()
        for folder in folders:
            if folder not in self._fds or +self._held.get(folder, collections.Counter()):
                continue
            fd = self._fds.pop(folder)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0, os.SEEK_SET)
                if self._current_fd(fd, folder):
                    os.unlink(folder / LOCK_FILE)
            except OSError:
                pass
            finally:
                os.close(fd)

    @staticmethod
    def _current_fd(fd: int, folder: Path) -> bool:
        try:
            a, b = os.fstat(fd), os.stat(folder / LOCK_FILE)
        except FileNotFoundError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder(target: Path) -> str:
    """Who holds ``target`` (from the staging names beside it), for the busy message."""
    try:
        names = os.listdir(target.parent)
    except OSError:
        return ""
    for n in names:
        m = _STAGING_RE.match(n)
        if m and m["name"] == target.name:
            host, pid, _ = m["run"].rsplit("-", 2)
            return f" (host {host}, process {pid})"
    return ""


# ----------------------------------------------------------------------------- file system steps


def _remove(path: Path) -> None:
    """Remove staging, best effort: it must not hide the error that brought us here (what is
    left, the next run on these outputs removes)."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS, errno.EBADF):
            raise
    finally:
        os.close(fd)


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC


def _flush(paths) -> None:
    """Make the staged files durable: one ``syncfs`` per file system when there are many, else an
    ``fsync`` per file."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                files += [Path(root) / n for n in names]
                files += [Path(root) / d for d in dirs]
        else:
            files.append(Path(p))
    libc = _libc()
    if len(files) > 64 and libc and hasattr(libc, "syncfs"):
        devices = {}
        for p in paths:
            with contextlib.suppress(OSError):
                devices.setdefault(os.stat(p).st_dev, p)
        for p in devices.values():
            fd = os.open(p, os.O_RDONLY)
            try:
                libc.syncfs(fd)
            finally:
                os.close(fd)
        return
    for f in files:
        _fsync(f, directory=os.path.isdir(f))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    file system or the platform cannot."""
    libc = _libc()
    if not libc or not hasattr(libc, "renameat2") or _fault("no-exchange"):
        return False
    import ctypes

    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _write_durably(path: Path, data: bytes, tmp: Path) -> None:
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync(path.parent, directory=True)


def _install(target: Path, kind: str, run: str) -> None:
    """Put run ``run``'s staged version of ``target`` in place; safe to repeat after a kill at any
    point (each step is decided by what is on disk)."""
    new, old = staging_path(target, run, "new"), staging_path(target, run, "old")
    if kind == "file":
        if os.path.lexists(new):
            os.replace(new, target)
        return
    tag = _tag(run)
    if os.path.lexists(new / tag):  # the new store, not in place yet
        if os.path.lexists(target):
            if not _exchange(new, target):
                _remove(old)
                os.replace(target, old)
                fault_point("commit.aside")
                os.replace(new, target)
        else:
            os.replace(new, target)
    if os.path.lexists(new):  # the earlier store, swapped out of the way
        _remove(old)
        os.replace(new, old)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.unlink(target / tag)
    _remove(old)


# ----------------------------------------------------------------------------- journals


def _journal_path(folder: Path, run: str) -> Path:
    return folder / f".mw-{run}.journal"


def _journal_text(folder: Path, run: str, home: Path, entries, kinds, state: str) -> bytes:
    """A journal: the run, its state, the first folder's journal and every target, as paths relative
    to the journal's own folder (a project moved or mounted elsewhere keeps working)."""
    doc = {"version": 1, "run": run, "state": state, "home": os.path.relpath(home, folder),
           "targets": [[os.path.relpath(p, folder), kinds[p]] for p in entries]}
    return json.dumps(doc).encode()


def _journal_entries(folder: Path, doc: dict) -> list[tuple[Path, str]]:
    out = []
    for rel, kind in doc["targets"]:
        p = Path(os.path.normpath(folder / rel))
        out.append((Path(os.path.realpath(p.parent)) / p.name, kind))
    return out


def _read_journal(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: the journal of an interrupted commit cannot be read ({exc}); the outputs it "
                         "lists may be incomplete - check them, then remove this file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("targets"), list):
        raise InputError(f"{path}: not a maskworks commit journal; remove it if you did not put it there")
    return doc


# ----------------------------------------------------------------------------- the transaction


class Transaction:
    """The outputs of one stage run (see the module docstring); made by :func:`transaction`."""

    def __init__(self):
        _real_folder.cache_clear()
        self.run = new_run_id()
        self.targets: dict[Path, Target] = {}
        self.staged: dict[Path, Path] = {}
        self.locks = _Locks()
        self.created: list[Path] = []  # folders this run made, removed again if it fails (when empty)

    # -- begin
    def add(self, targets, inputs=(), owned=(), labels_of=None, stores=()) -> None:
        """Check, lock and recover ``targets`` (more outputs can join a running transaction)."""
        checked = [t for t in check_outputs(targets, inputs, owned, stores=stores, labels_of=labels_of)
                   if t.path not in self.targets]
        for t in sorted(checked, key=lambda t: str(t.path)):
            self._make_folder(t.path.parent)
            if not self.locks.try_lock(t.path.parent, t.path.name):
                raise OutputBusy(f"{t.path}: another maskworks run{_holder(t.path)} is writing this output right "
                                 "now; wait for it to finish (or give other output paths), then run again")
            self.targets[t.path] = t
        for folder in sorted({t.path.parent for t in checked}):
            self._recover_folder(folder)

    def _make_folder(self, folder: Path) -> None:
        missing = []
        p = folder
        while not os.path.lexists(p) and p != p.parent:
            missing.append(p)
            p = p.parent
        folder.mkdir(parents=True, exist_ok=True)
        self.created += missing

    def _recover_folder(self, folder: Path) -> None:
        """Finish or undo what dead runs left in ``folder``: journals are completed or rolled back,
        staging without a journal is removed.  A run is dead when the locks of its names can be
        taken; a live run's staging and journals are never touched."""
        runs: dict[str, dict] = {}
        for name in os.listdir(folder):
            if m := _STAGING_RE.match(name):
                runs.setdefault(m["run"], {"names": set(), "journal": False})["names"].add(m["name"])
            elif m := _JOURNAL_RE.match(name):
                info = runs.setdefault(m["run"], {"names": set(), "journal": False})
                info["journal"] = info["journal"] or not m["tmp"]
        mine = {(t.parent, t.name) for t in self.targets}
        for run, info in sorted(runs.items()):
            if run == self.run:
                continue
            doc = _read_journal(_journal_path(folder, run)) if info["journal"] else None
            if doc is not None:
                entries = _journal_entries(folder, doc)
                if any((p.parent, p.name) in mine for p, _ in entries) or \
                        all(self.locks.try_lock(p.parent, p.name) for p, _ in entries):
                    self._recover(run, folder, doc, entries)
                for p, _ in entries:
                    self.locks.unlock(p.parent, p.name, keep=mine)
                continue
            dead = [n for n in sorted(info["names"]) if self.locks.try_lock(folder, n)]
            for n in dead:
                _remove(staging_path(folder / n, run, "new"))
                if os.path.lexists(staging_path(folder / n, run, "old")):
                    log.warning("%s: left in place: the earlier version of %s set aside by an interrupted run "
                                "without a journal", staging_path(folder / n, run, "old"), folder / n)
                self.locks.unlock(folder, n, keep=mine)
            if dead:
                _remove(folder / f".mw-{run}.journal.tmp")
                log.info("%s: removed the staging of an interrupted run (%s) for %s", folder, run, ", ".join(dead))

    def _recover(self, run: str, folder: Path, doc: dict, entries) -> None:
        for p, _ in entries:
            if not self.locks.try_lock(p.parent, p.name):
                raise OutputBusy(f"{p}: another maskworks run{_holder(p)} is writing this output or finishing an "
                                 f"interrupted commit (run {run}); wait for it, then run again")
        home = Path(os.path.realpath(folder / doc["home"]))
        home_doc = _read_journal(home)
        committed = home_doc is not None and home_doc.get("state") == "committed"
        for p, kind in entries:
            if committed:
                _install(p, kind, run)
                fault_point("recover.install")
            else:
                _remove(staging_path(p, run, "new"))
        folders = sorted({p.parent for p, _ in entries} | {folder})
        for f in folders:
            _fsync(f, directory=True)
        for f in folders:
            _remove(f / f".mw-{run}.journal.tmp")
            if _journal_path(f, run) != home:
                _remove(_journal_path(f, run))
        _remove(home)
        _fsync(home.parent, directory=True)
        log.warning("recovered an interrupted commit of run %s: %s %d output(s) (%s%s)", run,
                    "completed" if committed else "rolled back", len(entries), entries[0][0] if entries else "",
                    " ..." if len(entries) > 1 else "")

    # -- writing
    def owns(self, target) -> bool:
        return _resolve(target) in self.targets

    def stage_path(self, target) -> Path:
        p = _resolve(target)
        tmp = staging_path(p, self.run)
        _remove(tmp)  # written twice by one stage: the last write wins
        self.staged.pop(p, None)
        return tmp

    def staged_as(self, target) -> Path | None:
        return self.staged.get(_resolve(target))

    # -- end
    def rollback(self) -> None:
        for tmp in self.staged.values():
            _remove(tmp)
        self.staged.clear()
        self.locks.release()
        for folder in sorted(self.created, key=lambda f: -len(f.parts)):  # a folder with anything in it stays
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        self.created.clear()

    def commit(self) -> None:
        entries = sorted(self.staged)
        if not entries:
            self.locks.release()
            return
        kinds = {p: self.targets[p].kind for p in entries}
        folders = sorted({p.parent for p in entries})
        home = _journal_path(folders[0], self.run)
        blocked = _block_signals()
        try:
            try:
                for p in entries:
                    if kinds[p] == "store":
                        tmp = self.staged[p]
                        (tmp / MARKER).write_bytes(_MARKER_TEXT)
                        (tmp / _tag(self.run)).write_bytes(b"")
                _flush(list(self.staged.values()))
                for f in folders:
                    _fsync(f, directory=True)
                for f in folders[1:]:
                    _write_durably(_journal_path(f, self.run), _journal_text(f, self.run, home, entries, kinds,
                                                                             "prepared"),
                                   f / f".mw-{self.run}.journal.tmp")
                fault_point("commit.prepared")
                _write_durably(home, _journal_text(folders[0], self.run, home, entries, kinds, "committed"),
                               folders[0] / f".mw-{self.run}.journal.tmp")
            except BaseException:
                for f in folders:
                    _remove(_journal_path(f, self.run))
                    _remove(f / f".mw-{self.run}.journal.tmp")
                self.rollback()
                raise
            fault_point("commit.record")
            try:
                for p in entries:
                    _install(p, kinds[p], self.run)
                    fault_point("commit.install")
                for f in folders:
                    _fsync(f, directory=True)
                for f in folders[1:]:
                    _remove(_journal_path(f, self.run))
                os.unlink(home)
                _fsync(folders[0], directory=True)
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror}; the commit of this run's outputs is recorded in "
                              f"{home} and the next maskworks run on them completes it", exc.filename) from exc
            fault_point("commit.done")
        finally:
            self.staged.clear()
            self.locks.release()
            try:
                _restore_signals(blocked)  # a SIGINT/SIGTERM that came during the commit acts now
            except Interrupted as exc:
                exc.committed = True
                raise


def _block_signals():
    """SIGINT/SIGTERM wait until the commit is over (they are acted on right after it)."""
    try:
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, ValueError, OSError):
        return None


def _restore_signals(previous) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def transaction(*targets, inputs=(), owned=(), labels_of=None, stores=()):
    """Make the outputs ``targets`` of a stage one all-or-nothing unit.

    Checks them (:func:`check_outputs`, against ``inputs``), locks them, recovers what an
    interrupted run left, then yields; every :func:`atomic_path` write to a target inside the
    block is staged, and all are committed together when the block ends without an exception.
    On an exception the staging is removed and the targets are exactly as they were.  A
    transaction opened inside another joins it (its targets are checked and locked too).
    A stage that reads one of its outputs back inside the block reads :func:`staged` of it.
    ``labels_of``, ``stores`` (outputs that are folders whatever their name): see :func:`check_outputs`.
    """
    active = _ACTIVE.get()
    if active is not None:
        active.add(targets, inputs, owned, labels_of, stores)
        yield active
        return
    txn = Transaction()
    token = _ACTIVE.set(txn)
    try:
        try:
            txn.add(targets, inputs, owned, labels_of, stores)
            yield txn
            fault_point("stage.done")
        except BaseException as exc:
            txn.rollback()
            paths = list(txn.targets)
            if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None and paths:
                exc.filename = str(paths[0].parent)  # "no space left" names no file: the outputs' folder
            raise
        txn.commit()
    finally:
        _ACTIVE.reset(token)


def staged(target) -> Path:
    """Where ``target`` can be read back inside a :func:`transaction`: its staged new version when
    the running stage has written it, else the target itself."""
    txn = _ACTIVE.get()
    found = txn.staged_as(target) if txn is not None else None
    return found if found is not None else Path(target)


@contextlib.contextmanager
def atomic_path(target, *, kind: str | None = None):
    """Yield the path to write ``target`` to; it is put in place with the stage's other outputs
    (inside a :func:`transaction` that owns it) or, alone, as soon as the block ends.

    Works for files and stores (``kind`` defaults to :func:`target_kind`).  On any exception the
    written path is removed and ``target`` is left as it was.
    """
    txn = _ACTIVE.get()
    if txn is None or not txn.owns(target):
        with _standalone(target, kind) as tmp:
            yield tmp
        return
    tmp = txn.stage_path(target)
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise RuntimeError(f"writer produced nothing for {target}")
        txn.staged[_resolve(target)] = tmp
    except BaseException as exc:
        _remove(tmp)
        _name_the_target(exc, tmp, target)
        raise


@contextlib.contextmanager
def _standalone(target, kind):
    """One output alone: the same checks, lock, staging and commit as a transaction of one."""
    token = _ACTIVE.set(None)
    try:
        p = _resolve(target)
        with transaction(p) as txn:
            if kind is not None:
                txn.targets[p] = Target(p, kind, txn.targets[p].owned)
            with atomic_path(p) as tmp:
                yield tmp
    finally:
        _ACTIVE.reset(token)


def _name_the_target(exc: BaseException, tmp: Path, target) -> None:
    """The user knows the target, not its hidden staging name."""
    cause, seen = exc, set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno is not None and \
                (cause.filename is None or str(cause.filename).startswith(str(tmp))):
            cause.filename = str(target)
        cause = cause.__cause__ or cause.__context__


# ----------------------------------------------------------------------------- write failures

# OS errors that mean "the output cannot be written here" (a person can fix them), not a bug.
_WRITE_HINTS = {
    errno.ENOSPC: "free space or choose an output folder on another disk",
    errno.EDQUOT: "free space within your quota or choose another output folder",
    errno.EFBIG: "the file system cannot hold a file this large; choose another output folder",
    errno.EROFS: "choose a writable output folder",
    errno.EACCES: "you may not write there; choose an output folder you can write to",
    errno.EPERM: "you may not write there; choose an output folder you can write to",
    errno.ENOTDIR: "a part of the output path is a file, not a folder; choose another output folder",
    errno.EISDIR: "the output path is a folder; choose another output path",
    errno.EEXIST: "something is in the way of the output (a file where a folder is needed); choose another path",
    errno.ENOTEMPTY: "another process changed the output folder at the same time; run again",
    errno.ENAMETOOLONG: "the output path is too long; choose a shorter one",
    errno.EMLINK: "the output folder holds too many entries; choose another output folder",
}
WRITE_ERRNOS = set(_WRITE_HINTS)


def write_failure(exc) -> str | None:
    """The message for an output that could not be written (full or read-only disk, no permission,
    a file in the way), or None when ``exc`` is something else.  Libraries that turn the OSError
    into their own error (zarr: a KeyError) keep it as the cause, so the chain is searched."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _WRITE_HINTS:
            where = f" {exc.filename}" if exc.filename else ""
            return (f"cannot write{where}: {exc.strerror or exc}; earlier outputs are left as they were - "
                    f"{_WRITE_HINTS[exc.errno]}, then rerun")
        exc = exc.__cause__ or exc.__context__
    return None
