"""Every row of the input tables checked before any job is submitted: headers only, every problem of
every row reported at once.

The workflow calls :func:`check_table` for each arm's table when it plans a run (``input_check`` in the
config), so that one bad row among a thousand is reported before submission and the others run.  The
checks are the ones the stages make before they read a voxel -- the file exists and is readable as its
format, the header's shape, type, level and voxel size are plausible, the files of a row agree (a
tomogram and its segmentation, a volume and its truth), the channel names a row asks for exist -- so a
row that passes fails later only on its voxels (a NaN, a damaged chunk).  Results are kept in a cache
file keyed by each row and the size and modification time of its files: a second plan re-reads only the
rows whose files changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .io.errors import InputError

# Bump when a check changes, so that cached verdicts of the old checks are not reused.
CHECKS_VERSION = 1
ARMS = ("em", "cryoet", "codex")
# Files whose stat stands for a folder's header (Zarr v2/v3, N5, neuroglancer precomputed)
_FOLDER_HEADERS = (".zarray", ".zgroup", ".zattrs", "zarr.json", "attributes.json", "info")


def _problem(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"


def _voxel_size(text: str, what: str) -> list[float] | None:
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"{what}={text!r} is not a number or a 'z,y,x' triple") from None
    if len(values) not in (1, 3) or not all(v > 0 and v < float("inf") for v in values):
        raise InputError(f"{what}={text!r}: expected one positive finite number or three (z,y,x)")
    return values * 3 if len(values) == 1 else values


def check_em_row(row: dict, *, level: int = 0, max_voxels: int | None = None) -> list[str]:
    """Problems of one row of the EM volume table (``config/em_volumes.tsv``); empty when it can run."""
    from .io.volumes import inspect_volume

    problems = []
    try:
        vs = _voxel_size(row.get("voxel_size") or "", "voxel_size")
    except InputError as exc:
        problems.append(str(exc))
        vs = None
    level = int(row["level"]) if row.get("level") else level
    spec = f"{row['path']}:{row['dataset']}" if row.get("dataset") else row["path"]
    volume = None
    try:
        volume = inspect_volume(spec, ndim=3, level=level, voxel_size=vs, max_voxels=max_voxels)
        if volume.dtype.kind not in "buif":
            problems.append(f"{spec}: voxels of type {volume.dtype}; expected integers or floats")
    except Exception as exc:  # noqa: BLE001 - every problem is reported, none stops the others
        problems.append(_problem(exc))
    if row.get("truth"):
        try:
            truth = inspect_volume(row["truth"], ndim=3, level=level, voxel_size=vs, max_voxels=max_voxels)
            if truth.dtype.kind not in "bui":
                problems.append(f"{row['truth']}: a truth mask of type {truth.dtype}; expected integers (0/1)")
            if volume is not None and truth.shape != volume.shape:
                problems.append(f"{row['truth']}: truth shape {truth.shape} differs from the volume's "
                                f"{volume.shape} (level {level})")
        except Exception as exc:  # noqa: BLE001
            problems.append(_problem(exc))
    return problems


def check_tomogram_row(row: dict, *, max_voxels: int | None = None) -> list[str]:
    """Problems of one row of the cryo-ET tomogram table: the tomogram and its segmentation (same shape),
    the centres (readable, inside the tomogram), the corrections folder."""
    import numpy as np

    from .io.coordinates import read_centres
    from .io.volumes import inspect_volume

    problems, shape = [], None
    try:
        shape = inspect_volume(row["tomogram"], ndim=3, max_voxels=max_voxels).shape
    except Exception as exc:  # noqa: BLE001
        problems.append(_problem(exc))
    try:
        seg = inspect_volume(row["segmentation"], ndim=3, max_voxels=max_voxels)
        if seg.dtype.kind not in "buif":
            problems.append(f"{row['segmentation']}: voxels of type {seg.dtype}; expected a 0/1 segmentation")
        if shape is not None and seg.shape != shape:
            problems.append(f"{row['segmentation']}: shape {seg.shape} differs from the tomogram's {shape} "
                            f"({row['tomogram']})")
    except Exception as exc:  # noqa: BLE001
        problems.append(_problem(exc))
    try:
        centres = read_centres(row["centres"])
        if shape is not None:
            zyx = np.floor(centres + 0.5)[:, ::-1]
            outside = int(((zyx < 0) | (zyx >= np.array(shape))).any(axis=1).sum())
            if outside:
                nz, ny, nx = shape
                problems.append(f"{row['centres']}: {outside} of {len(centres)} centre(s) lie outside the tomogram "
                                f"(x 0..{nx - 1}, y 0..{ny - 1}, z 0..{nz - 1}); centres are x, y, z voxel indices")
    except Exception as exc:  # noqa: BLE001
        problems.append(_problem(exc))
    if row.get("corrections") and not Path(row["corrections"]).is_dir():
        problems.append(f"{row['corrections']}: the corrections folder does not exist")
    return problems


def check_codex_row(row: dict, *, channel_axis=None) -> list[str]:
    """Problems of one row of the CODEX image table: the image (its header), the channel names and the
    nuclear and whole-cell channels among them, the pixel size."""
    from .codex.stages import _channel_names, resolve_mpp
    from .io.slides import open_multichannel, select_channels

    try:
        with open_multichannel(row["image"], channel_axis=channel_axis, lazy=True) as img:
            names, what = _channel_names(img, row["image"], row.get("channels") or None)
            select_channels(names, row["nuclear_channel"], row["wholecell_channels"], what=what)
            resolve_mpp(float(row["image_mpp"]) if row.get("image_mpp") else None, img.mpp, row["image"])
    except Exception as exc:  # noqa: BLE001
        return [_problem(exc)]
    return []


def row_files(arm: str, row: dict) -> list[str]:
    """The files and folders a row names (what its verdict depends on)."""
    keys = {"em": ("path", "truth"), "cryoet": ("tomogram", "segmentation", "centres", "corrections"),
            "codex": ("image", "channels")}[arm]
    out = []
    for k in keys:
        value = str(row.get(k) or "").removeprefix("precomputed://")
        m = re.match(r"^(.*?\.(?:h5|hdf5|hdf|he5)):.*$", value, re.I)
        if value:
            out.append(m.group(1) if m else value)
    return out


def _stat(path: str) -> list:
    """Size and modification time of a file; for a folder, its own and those of the header files, TIFFs (a
    slide stored one file per channel) and direct sub-folders (a Zarr pyramid's levels) in it, never a walk
    of its chunks."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return [path, type(exc).__name__]
    state = [path, st.st_size, st.st_mtime_ns]
    if os.path.isdir(path):
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            return [*state, type(exc).__name__]
        for e in entries:
            if e.name in _FOLDER_HEADERS or e.is_dir() or e.name.lower().endswith((".tif", ".tiff")):
                try:
                    s = e.stat()
                except OSError:
                    continue
                state.append([e.name, s.st_size, s.st_mtime_ns])
    return state


def row_key(arm: str, row: dict, settings: dict) -> str:
    """What a row's verdict depends on: the checks' version, the row, the settings, its files' state."""
    state = [CHECKS_VERSION, arm, sorted(row.items()), sorted(settings.items()),
             [_stat(p) for p in row_files(arm, row)]]
    return hashlib.sha256(json.dumps(state, default=str).encode()).hexdigest()


def check_row(arm: str, row: dict, settings: dict) -> list[str]:
    """Problems of one table row of ``arm`` (em | cryoet | codex) with the arm's ``settings``."""
    if arm == "em":
        return check_em_row(row, **settings)
    if arm == "cryoet":
        return check_tomogram_row(row, **settings)
    if arm == "codex":
        return check_codex_row(row, **settings)
    raise ValueError(f"arm={arm!r}: expected one of {ARMS}")


def check_table(arm: str, rows: dict[str, dict], settings: dict | None = None,
                cache: str | Path | None = None) -> dict[str, list[str]]:
    """``{name: problems}`` for the rows of one table that cannot run (rows that can are left out).

    ``cache``: a JSON file of earlier verdicts (created, updated, never trusted beyond its keys); a row
    whose key (:func:`row_key`) is there is not checked again.
    """
    settings = settings or {}
    known = {}
    if cache is not None:
        try:
            known = json.loads(Path(cache).read_text())
        except (OSError, ValueError):
            known = {}
    verdicts, bad = {}, {}
    for name, row in rows.items():
        key = row_key(arm, row, settings)
        problems = known.get(key)
        if not isinstance(problems, list):
            problems = check_row(arm, row, settings)
        verdicts[key] = problems
        if problems:
            bad[name] = problems
    if cache is not None:
        _merge_cache(Path(cache), known, verdicts)
    return bad


def _merge_cache(path: Path, known: dict, verdicts: dict) -> None:
    if all(known.get(k) == v for k, v in verdicts.items()):
        return
    merged = {**known, **verdicts}
    if len(merged) > 200_000:  # old keys of files long changed
        merged = verdicts
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(merged))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a cache that cannot be written costs a re-check, nothing else
