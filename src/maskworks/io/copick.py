"""copick projects through the copick API: runs, segmentations in, refined segmentations out.

copick stores a segmentation as an OME-Zarr store per (voxel size, user, session,
name, type) in its run; the voxel size is in ångström.  Every lookup here is
deterministic (sorted), and outputs go to a user of their own so that they are
never read back as inputs by mistake: refined organelles and membranes are written as
*instance* segmentations (each voxel the id of its organelle) named ``<input name>-refined``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import Unreachable
from .volumes import InputError, Volume, describe_error

log = logging.getLogger("maskworks")

REFINED_SUFFIX = "-refined"
PORTAL_TIMEOUT = 5.0  # seconds to wait for the CryoET Data Portal before saying it cannot be reached
VOXEL_SIZE_TOLERANCE = 1e-3  # copick rounds voxel sizes to three decimals


@contextlib.contextmanager
def keep_logging():
    """Undo what copick does to logging: each of its modules, when imported, calls
    ``logging.basicConfig(force=True)`` with a rich handler on stdout at INFO, which would
    replace the handlers of the CLI or of a Snakemake job's log file."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        if root.handlers != handlers or root.level != level:
            root.handlers[:] = handlers
            root.setLevel(level)


def _keeps_logging(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with keep_logging():
            return func(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class SegmentationInfo:
    """Which segmentation to read: ``name``, optionally ``user_id`` and ``session_id``."""

    name: str
    user_id: str | None = None
    session_id: str | None = None

    def __str__(self) -> str:
        return ",".join(p for p in (self.name, self.user_id, self.session_id) if p is not None)


def parse_segmentation_info(text, what: str = "segmentation info") -> SegmentationInfo:
    """Parse ``name``, ``name,userID`` or ``name,userID,sessionID`` (as SABER's ``--org-info``)."""
    if isinstance(text, SegmentationInfo):
        return text
    parts = [p.strip() for p in str(text).split(",")]
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise InputError(f"{what}={text!r}: expected 'name', 'name,userID' or 'name,userID,sessionID'")
    return SegmentationInfo(*parts)


@_keeps_logging
def open_project(config) -> object:
    """The copick root of a project configuration file (``copick.from_file``)."""
    path = Path(config)
    if not path.is_file():
        raise InputError(f"{path}: no such copick configuration file")
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("config_type", "filesystem") == "filesystem":
            _check_local_roots(path, data)
            # copick.from_file would first import its data-portal client (about a second)
            from copick.impl.filesystem import CopickConfigFSSpec, CopickRootFSSpec

            return CopickRootFSSpec(CopickConfigFSSpec(**{"config_type": "filesystem", **data}))
        if isinstance(data, dict) and data.get("config_type") == "cryoet_data_portal":
            _check_portal(path, data)
        import copick

        return copick.from_file(str(path))
    except (InputError, Unreachable):
        raise
    except Exception as exc:  # JSON and pydantic errors do not name the file
        if _network_error(exc):
            raise Unreachable(f"{path}: the CryoET Data Portal this copick project reads its runs from cannot be "
                              f"reached ({type(exc).__name__}: {exc}); check the network (or proxy) of this machine "
                              "and run again") from exc
        raise InputError(f"{path}: not a readable copick configuration ({type(exc).__name__}: {exc})") from exc


def _portal_url() -> str:
    try:
        from cryoet_data_portal._client import DEFAULT_URL
    except ImportError:  # copick brings the client; without it copick fails with its own message
        return ""
    return str(DEFAULT_URL)


def _check_portal(config, data) -> None:
    """A data-portal project lists its runs over the network, and copick retries for about 40 s before
    failing with a transport error: connect to the portal first, for ``PORTAL_TIMEOUT`` seconds, and say
    plainly that it cannot be reached."""
    import socket
    from urllib.parse import urlsplit

    url = _portal_url()
    parts = urlsplit(url)
    if not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=PORTAL_TIMEOUT).close()
    except OSError as exc:
        raise Unreachable(
            f"{config}: this copick project reads its runs from the CryoET Data Portal (datasets "
            f"{', '.join(map(str, data.get('dataset_ids') or [])) or 'none given'}) at {url}, which cannot be reached "
            f"from this machine within {PORTAL_TIMEOUT:g} s ({type(exc).__name__}: {exc}); check the network (or "
            "proxy) and run again, or use a filesystem copick project") from exc


def _network_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failed connection rather than a bad configuration."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or "Transport" in type(exc).__name__:
            return not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))
        exc = exc.__cause__ or exc.__context__
    return False


def _check_local_roots(config, data) -> None:
    """The local roots of a filesystem project must exist: a missing static root, or a missing
    overlay root with no static root to read from, would make copick see a project without runs,
    and every stage would do nothing, successfully.  (An overlay root beside an existing static
    root may be new: copick creates it on the first write.)"""
    def local(key):
        root = data.get(key)
        if not root or ("://" in str(root) and not str(root).startswith("local://")):
            return None  # not given, or a remote file system copick checks itself
        return Path(str(root).removeprefix("local://"))

    static, overlay = local("static_root"), local("overlay_root")
    for key, root, needed in (("static_root", static, True), ("overlay_root", overlay, static is None)):
        if root is not None and needed and not root.is_dir():
            raise InputError(f"{config}: {key} {str(root)!r} does not exist on this machine; "
                             "fix the path in the copick configuration")


@_keeps_logging
def select_runs(root, names=None) -> list:
    """The project's runs, or those of ``names`` (all must exist), sorted by name.

    Named runs are opened by name (copick's random access), so a job given a few runs of a project of
    hundreds does not list them all; only a missing name lists the project, to say what it has.
    """
    if not names:
        return sorted(root.runs, key=lambda r: r.name)
    found = {n: root.get_run(str(n)) for n in sorted(set(map(str, names)))}
    missing = [n for n, r in found.items() if r is None]
    if missing:
        available = sorted(r.name for r in root.runs)
        shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
        raise InputError(f"run(s) {', '.join(missing)} not in the copick project; "
                         f"available runs: {shown or 'none'}")
    return list(found.values())


class MissingSegmentation(InputError):
    """A run lacks the segmentation a stage reads (a run to skip in a project, not a broken input)."""


def segmentation_type(seg) -> str:
    """``binary``, ``multilabel``, ``instance`` or ``panoptic`` (older copick: the first two only)."""
    if getattr(seg, "is_panoptic", False):
        return "panoptic"
    if getattr(seg, "is_instance", False):
        return "instance"
    return "multilabel" if seg.is_multilabel else "binary"


def describe_segmentation(seg) -> str:
    return (f"{seg.name} (user {seg.user_id}, session {seg.session_id}, "
            f"voxel size {float(seg.voxel_size):g} A, {segmentation_type(seg)})")


def _order(seg):
    return (seg.user_id, seg.session_id, segmentation_type(seg), float(seg.voxel_size))


@_keeps_logging
def find_segmentation(run, info: SegmentationInfo, voxel_size: float):
    """The segmentation of ``run`` that ``info`` names at ``voxel_size``.

    Without a user, users ending in ``-refined`` are never chosen (they hold this
    stage's outputs).  When several match, the first by (user, session, type) is
    taken, so the choice does not depend on the order the storage lists them in.
    Panoptic segmentations are not read.

    Raises
    ------
    InputError
        Listing the segmentations the run has, when none matches.
    """
    segs = list(run.segmentations)
    hits = [s for s in segs if s.name == info.name
            and abs(float(s.voxel_size) - float(voxel_size)) <= VOXEL_SIZE_TOLERANCE
            and segmentation_type(s) != "panoptic"
            and (s.user_id == info.user_id if info.user_id is not None else not s.user_id.endswith(REFINED_SUFFIX))
            and (info.session_id is None or s.session_id == info.session_id)]
    if not hits:
        listing = "; ".join(describe_segmentation(s) for s in sorted(segs, key=lambda s: (s.name, *_order(s))))
        raise MissingSegmentation(
            f"run {run.name}: no segmentation matches '{info}' at voxel size {float(voxel_size):g} A"
            + ("" if info.user_id else f" (users ending in '{REFINED_SUFFIX}' are only read when named)")
            + f"; the run has: {listing or 'no segmentations'}"
        )
    hits.sort(key=_order)
    if len(hits) > 1:
        log.info("run %s: '%s' matches %d segmentations; using %s", run.name, info, len(hits),
                 describe_segmentation(hits[0]))
    return hits[0]


def segmentation_voxels(seg) -> int | str:
    """The voxel count of a segmentation's level 0, from its header (no chunk is read); "" if unreadable."""
    try:
        import zarr

        return int(np.prod(zarr.open(seg.zarr(), mode="r")["0"].shape))
    except Exception as exc:  # the refinement reports an unreadable store itself
        log.info("%s: no shape (%s)", describe_segmentation(seg), exc)
        return ""


def local_store(seg) -> str | None:
    """The path of a segmentation's Zarr store when it lies on this machine's file system
    (a copick ``filesystem`` overlay or static root), else None (S3, the data portal, ...)."""
    protocol = getattr(getattr(seg, "fs", None), "protocol", None)
    protocols = {protocol} if isinstance(protocol, str) else set(protocol or ())
    path = getattr(seg, "path", None)
    if path and protocols & {"file", "local"} and Path(path).is_dir():
        return str(path)
    return None


@_keeps_logging
def read_segmentation(seg, *, fill_missing: bool = False) -> Volume:
    """A copick segmentation (pyramid level 0) as a (z, y, x) :class:`Volume` in ångström.

    A chunk missing from the store (deleted, or never written by an interrupted writer) is an
    error: Zarr would read it as zeros, and every organelle in it would silently disappear.
    ``fill_missing=True`` reads missing chunks as zeros (a store written without its empty
    chunks).  A chunk that cannot be decoded is always an error.
    """
    where = local_store(seg) or describe_segmentation(seg)
    try:
        import zarr

        level = zarr.open(seg.zarr(), mode="r")["0"]
        missing = int(level.nchunks) - int(level.nchunks_initialized)
        if missing and not fill_missing:
            raise InputError(
                f"copick segmentation {describe_segmentation(seg)} ({where}): {missing} of {level.nchunks} "
                "chunks are missing from the store, so part of it would read as zeros; restore the store, "
                "or pass fill_missing (--fill-missing) if it was written without its empty chunks")
        data = np.asarray(level[...])
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"copick segmentation {describe_segmentation(seg)} ({where}) cannot be read: "
                         f"{describe_error(exc)}") from exc
    if data.ndim != 3:
        raise InputError(f"copick segmentation {describe_segmentation(seg)} has shape {data.shape}; "
                         "a 3-D (z, y, x) volume is needed")
    vs = float(seg.voxel_size)
    _check_stored_voxel_size(seg, vs)
    attrs = {"copick": {"run": seg.run.name, "name": seg.name, "user_id": seg.user_id,
                        "session_id": seg.session_id, "type": segmentation_type(seg)}}
    return Volume(data, (vs, vs, vs), unit="angstrom", attrs=attrs)


def _check_stored_voxel_size(seg, vs: float) -> None:
    """Warn when the OME-Zarr scale disagrees with the voxel size in the store's name."""
    try:
        import zarr
        from copick.util.ome import get_voxel_size_from_zarr

        stored = float(get_voxel_size_from_zarr(zarr.open(seg.zarr(), mode="r")))
    except Exception:  # older copick or a store without multiscales metadata: the name is all there is
        return
    if abs(stored - vs) > VOXEL_SIZE_TOLERANCE * max(1.0, vs):
        log.warning("copick segmentation %s: OME-Zarr scale %g A differs from its voxel size %g A; using %g",
                    describe_segmentation(seg), stored, vs, vs)


@_keeps_logging
def read_tomogram(run, voxel_size: float, shape=None):
    """The first tomogram (by type) at ``voxel_size`` as a lazy zarr array, or None (for QC pictures)."""
    try:
        import zarr

        spacing = run.get_voxel_spacing(voxel_size)
        tomos = sorted(spacing.tomograms, key=lambda t: t.tomo_type) if spacing is not None else []
        for tomo in tomos:
            arr = zarr.open(tomo.zarr(), mode="r")["0"]
            if shape is None or tuple(arr.shape) == tuple(shape):
                return arr
    except Exception as exc:  # a picture without a tomogram beats no picture
        log.info("run %s: no tomogram for the QC picture (%s)", run.name, exc)
    return None


SABER_USER = "saber-refined"  # SABER's output user when the info names none


def refined_user_id(info: SegmentationInfo, user_id: str | None = None) -> str:
    """The user the refined version of ``info`` is written under: ``user_id`` when given, else what
    SABER's ``refine-membranes`` writes for the same call (``<user>-refined`` when the info names a
    user, ``saber-refined`` when it names only the segmentation)."""
    if user_id:
        return str(user_id)
    return f"{info.user_id}{REFINED_SUFFIX}" if info.user_id else SABER_USER


def refined_name(info: SegmentationInfo, name: str | None = None) -> str:
    """The name the refined version of ``info`` is written under: ``name`` when given, else
    ``<input name>-refined``, so that readers that look segmentations up by name alone (copick-utils,
    copick-torch) never take the output for the input."""
    return str(name) if name else f"{info.name}{REFINED_SUFFIX}"


def output_type(seg=None) -> str:
    """Type the refined segmentations are written as: ``instance`` (one object class, each voxel the id
    of the organelle it belongs to; copick >= 1.31).  A multilabel segmentation would tell copick's
    tools that the ids are pickable-object labels (``copick process split`` turned id 1 into the
    object with label 1)."""
    return "instance"


def check_instance_object(root, name: str, config) -> None:
    """copick names an instance segmentation after one pickable object of the project (its own writer
    refuses any other name): fail before any computing when ``name`` is not one, saying how to add it."""
    objects = sorted(o.name for o in root.config.pickable_objects)
    if name not in objects:
        raise InputError(
            f"{config}: the refined segmentation '{name}' is an instance segmentation, which copick names after "
            f"a pickable object, and the project has none called '{name}' (it has: {', '.join(objects) or 'none'}). "
            f"Add it with: copick add object -c {config} --name {name} --object-type segmentation; or choose an "
            "existing object with org_output_name / mem_output_name (--org-output-name / --mem-output-name)")


@_keeps_logging
def check_writable(run, name: str, *, user_id: str, session_id: str, voxel_size: float) -> None:
    """Fail before any computing when an output cannot be written: it exists in the project's
    read-only static storage (copick would refuse it after the work is done), or the
    overlay folder of a file-system project is not writable."""
    for seg in run.get_segmentations(name=name, user_id=user_id, session_id=str(session_id), is_instance=None,
                                     is_panoptic=None):
        if abs(float(seg.voxel_size) - float(voxel_size)) <= VOXEL_SIZE_TOLERANCE and getattr(seg, "read_only", False):
            raise InputError(f"run {run.name}: the output {describe_segmentation(seg)} already exists in the "
                             "project's read-only static storage; choose another --save-session-id")
    overlay = getattr(getattr(getattr(run, "root", None), "config", None), "overlay_root", None)
    if isinstance(overlay, str) and (overlay.startswith("local://") or "://" not in overlay):
        folder = Path(overlay.removeprefix("local://"))
        probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), folder)
        if not os.access(probe, os.W_OK):
            raise InputError(f"run {run.name}: the copick overlay {folder} is not writable; refined "
                             "segmentations are written there")


@_keeps_logging
def check_label_dtype(dtype, what: str = "labels") -> None:
    """Fail (before any computing) if copick's writer cannot store ``dtype`` without losing values.

    copick's ``CopickSegmentation.from_numpy`` takes a ``dtype`` (older releases
    default to uint8 and would wrap labels above 255); this module always passes
    it.  A copick without that argument can only be given uint8.
    """
    from copick.models import CopickSegmentation

    dtype = np.dtype(dtype)
    if dtype.kind != "u":
        raise InputError(f"{what}: dtype {dtype} cannot be written as a copick segmentation (unsigned integers only)")
    if "dtype" not in inspect.signature(CopickSegmentation.from_numpy).parameters and dtype != np.uint8:
        import copick

        raise InputError(f"{what} need {dtype} but copick {copick.__version__} writes segmentations as uint8 "
                         "only; upgrade copick (pip install -U copick)")


def stored_name(value, what: str) -> str:
    """``value`` as copick stores it, or an :class:`InputError` when copick would change it (copick
    replaces ``_``, spaces, slashes and some other characters by ``-`` on saving: an output saved
    under another session or user than asked for would be missed by the next run's lookups)."""
    from copick.util.escape import sanitize_name

    text = str(value)
    try:
        stored = sanitize_name(text, suppress_warnings=True)
    except ValueError:
        stored = ""
    if stored != text:
        hint = f"; give {stored!r}" if stored else ""
        raise InputError(f"{what}={text!r}: copick would store it as {stored!r} (no '_', spaces, slashes or "
                         f"<>:\"|?* in copick ids){hint}")
    return text


def output_store(run, name: str, *, user_id: str, session_id: str, voxel_size: float,
                 kind: str = "instance") -> Path | None:
    """The local path where copick keeps the segmentation :func:`write_segmentation` writes (named and
    placed by copick itself), or None when the project's overlay is not on this machine."""
    try:
        from copick.impl.filesystem import CopickRunFSSpec, CopickSegmentationFSSpec
        from copick.models import CopickSegmentationMeta
    except ImportError:
        return None
    if not isinstance(run, CopickRunFSSpec):
        return None
    meta = CopickSegmentationMeta(user_id=user_id, session_id=str(session_id), name=name, voxel_size=float(voxel_size),
                                  is_multilabel=kind == "multilabel", is_instance=kind == "instance")
    seg = CopickSegmentationFSSpec(run=run, meta=meta, read_only=False)
    protocol = getattr(seg.fs, "protocol", None)
    protocols = {protocol} if isinstance(protocol, str) else set(protocol or ())
    return Path(seg.path) if protocols & {"file", "local"} else None


@_keeps_logging
def write_store(path, data: np.ndarray, voxel_size: float) -> None:
    """Write a segmentation store at ``path`` in copick's own layout, by copick's own writer (what
    ``CopickSegmentation.from_numpy`` writes), with Blosc's threads off so that the same
    data gives the same bytes."""
    import zarr
    from copick.util.ome import volume_pyramid, write_ome_zarr_3d
    from fsspec.implementations.local import LocalFileSystem

    from .ngff import deterministic_blosc

    data = np.asarray(data)
    check_label_dtype(data.dtype, f"copick segmentation {Path(path).name}")
    deterministic_blosc()
    store = zarr.storage.FSStore(str(path), fs=LocalFileSystem(auto_mkdir=True), mode="w", key_separator="/",
                                 dimension_separator="/", create=True)
    write_ome_zarr_3d(store, volume_pyramid(data, float(voxel_size), 1, dtype=data.dtype))


@_keeps_logging
def check_stored(run, name: str, data_shape, dtype, *, user_id: str, session_id: str, voxel_size: float,
                 kind: str = "instance"):
    """The segmentation just written, as copick lists and reads it; a RuntimeError if copick does not
    see it or reads another shape or dtype."""
    import zarr

    seg = find_output(run, name, user_id=user_id, session_id=session_id, voxel_size=voxel_size, kind=kind)
    if seg is None:
        raise RuntimeError(f"run {run.name}: copick does not list the segmentation {name} of {user_id}/{session_id} "
                           "just written")
    stored = zarr.open(seg.zarr(), mode="r")["0"]
    if tuple(stored.shape) != tuple(data_shape) or np.dtype(stored.dtype) != np.dtype(dtype):
        raise RuntimeError(f"copick stored {describe_segmentation(seg)} as {stored.dtype} {stored.shape}, "
                           f"not {np.dtype(dtype)} {tuple(data_shape)}")
    return seg


@_keeps_logging
def write_segmentation(run, name: str, data: np.ndarray, *, user_id: str, session_id: str,
                       voxel_size: float, kind: str = "instance"):
    """Write (or overwrite) exactly one segmentation of ``run`` through copick and check what was
    stored: the way for projects whose overlay is not on this machine (no staging there).

    ``kind`` is ``multilabel`` or ``instance`` (see :func:`output_type`).  Other
    segmentations, including other types with the same name, are not touched.
    """
    data = np.asarray(data)
    check_label_dtype(data.dtype, f"copick segmentation {name}")
    if kind not in ("multilabel", "instance"):
        raise ValueError(f"kind={kind!r}: expected 'multilabel' or 'instance'")
    extra = {"is_instance": True} if kind == "instance" else {}
    seg = run.new_segmentation(voxel_size=float(voxel_size), name=name, session_id=str(session_id),
                               is_multilabel=kind == "multilabel", user_id=user_id, exist_ok=True, **extra)
    if getattr(seg, "read_only", False):
        raise InputError(f"run {run.name}: {describe_segmentation(seg)} exists in the project's read-only "
                         "static storage and cannot be overwritten; use another --save-session-id")
    from .ngff import deterministic_blosc

    deterministic_blosc()
    seg.from_numpy(data, dtype=data.dtype)
    return check_stored(run, name, data.shape, data.dtype, user_id=user_id, session_id=session_id,
                        voxel_size=voxel_size, kind=kind)


def _outputs(run, name, user_id, session_id, voxel_size, kind) -> list:
    """The stored segmentations with exactly the keys :func:`write_segmentation` writes."""
    run.refresh_segmentations()
    return [seg for seg in run.segmentations
            if (seg.name, seg.user_id, seg.session_id, segmentation_type(seg)) == (name, user_id, str(session_id), kind)
            and abs(float(seg.voxel_size) - float(voxel_size)) <= VOXEL_SIZE_TOLERANCE]


def find_output(run, name: str, *, user_id: str, session_id: str, voxel_size: float, kind: str = "instance"):
    """The segmentation :func:`write_segmentation` would overwrite (the overlay's), or None."""
    hits = _outputs(run, name, user_id, session_id, voxel_size, kind)
    return next((seg for seg in hits if not getattr(seg, "read_only", False)), hits[0] if hits else None)


def is_empty(seg) -> bool:
    """Whether a stored segmentation holds no label (0 everywhere, or no data written)."""
    import zarr

    level = zarr.open(seg.zarr(), mode="r")["0"]
    return not level.nchunks_initialized or not any(np.any(level[sl]) for sl in _slabs_of(level))


def _slabs_of(level):
    step = max(1, int(level.chunks[0]))
    return [slice(z, min(z + step, level.shape[0])) for z in range(0, level.shape[0], step)]


@_keeps_logging
def read_picks(run, info: SegmentationInfo) -> tuple[np.ndarray, np.ndarray]:
    """The picks of object ``info.name`` (of ``info``'s user and session when given; the first set by
    user and session otherwise) as ``(positions in angstrom (n, 3) x, y, z, scores (n,))``."""
    sets = [p for p in run.get_picks(object_name=info.name)
            if (info.user_id is None or p.user_id == info.user_id)
            and (info.session_id is None or p.session_id == info.session_id)]
    if not sets:
        have = sorted({f"{p.pickable_object_name} (user {p.user_id}, session {p.session_id})" for p in run.picks})
        raise MissingSegmentation(f"run {run.name}: no picks match '{info}'; the run has: "
                                  f"{'; '.join(have) or 'no picks'}")
    picks = sorted(sets, key=lambda p: (p.user_id, p.session_id))[0]
    positions, _ = picks.numpy()
    scores = np.array([1.0 if getattr(p, "score", None) is None else float(p.score) for p in picks.points or []])
    return np.asarray(positions, float).reshape(-1, 3), scores


@_keeps_logging
def write_picks(run, object_name: str, positions_xyz_angstrom, scores, *, user_id: str, session_id: str):
    """Write (or overwrite) one set of picks of ``run`` through copick; returns it."""
    objects = sorted(o.name for o in run.root.config.pickable_objects)
    if object_name not in objects:
        raise InputError(f"picks of '{object_name}': copick names picks after a pickable object, and the project "
                         f"has none of that name (it has: {', '.join(objects) or 'none'})")
    picks = run.new_picks(object_name=object_name, session_id=str(session_id), user_id=user_id, exist_ok=True)
    if getattr(picks, "read_only", False):
        raise InputError(f"run {run.name}: picks of {object_name} by {user_id}/{session_id} are in the project's "
                         "read-only static storage; choose another user or session")
    picks.from_numpy(np.asarray(positions_xyz_angstrom, float).reshape(-1, 3),
                     scores=np.asarray(scores, float))
    return picks
