"""Read and write volumes and images without losing their voxel size.

One pair of functions for every format the stages meet: MRC (.mrc/.rec/.map),
TIFF (.tif/.tiff, OME-TIFF and ImageJ hyperstacks included), Zarr / OME-Zarr
(.zarr), NRRD (.nrrd/.nhdr), NIfTI (.nii/.nii.gz) and NumPy (.npy).

Arrays are (z, y, x) (2-D images (y, x)); ``voxel_size`` and ``origin`` follow
the same axis order and ``unit`` names the length unit in NGFF/UDUNITS words
("angstrom", "nanometer", "micrometer", "millimeter") or is ``None`` when the
file does not say.  Formats that store the other axis order (NRRD, NIfTI, MRC
headers) are converted here and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError  # noqa: F401 - raised by every reader, imported from here by many
from .outputs import atomic_path

FORMATS = {
    "mrc": (".mrc", ".rec", ".map", ".mrcs"),
    "tiff": (".tif", ".tiff"),
    "zarr": (".zarr",),
    "nrrd": (".nrrd", ".nhdr"),
    "nifti": (".nii", ".nii.gz"),
    "npy": (".npy",),
}

# Length units, in nanometres, by the NGFF (UDUNITS-2) name; aliases found in file headers.
_UNIT_NM = {"angstrom": 0.1, "nanometer": 1.0, "micrometer": 1e3, "millimeter": 1e6, "meter": 1e9}
_UNIT_ALIASES = {
    "a": "angstrom", "å": "angstrom", "angstroms": "angstrom", "ang": "angstrom",
    "nm": "nanometer", "nanometre": "nanometer", "nanometers": "nanometer",
    "um": "micrometer", "µm": "micrometer", "μm": "micrometer", "micron": "micrometer",
    "microns": "micrometer", "micrometre": "micrometer", "\\u00b5m": "micrometer",
    "mm": "millimeter", "millimetre": "millimeter", "m": "meter", "metre": "meter",
}
_UNIT_SHORT = {"angstrom": "A", "nanometer": "nm", "micrometer": "um", "millimeter": "mm", "meter": "m"}


def normalize_unit(unit: str | None) -> str | None:
    """Canonical NGFF name of a length unit, or ``None`` for unknown/absent units."""
    if unit is None:
        return None
    u = str(unit).strip().lower()
    if u in _UNIT_NM:
        return u
    return _UNIT_ALIASES.get(u)


def unit_symbol(unit: str | None) -> str:
    """The short symbol of a length unit (``nm`` for nanometer), or "" for unknown/absent units."""
    return _UNIT_SHORT.get(normalize_unit(unit) or "", "")


def convert_length(values, unit_from: str | None, unit_to: str | None) -> tuple[float, ...]:
    """Convert lengths between units; unknown units pass values through unchanged."""
    a, b = normalize_unit(unit_from), normalize_unit(unit_to)
    vals = tuple(float(v) for v in values)
    if a is None or b is None or a == b:
        return vals
    f = _UNIT_NM[a] / _UNIT_NM[b]
    return tuple(v * f for v in vals)


@dataclass
class Volume:
    """An array with its geometry.

    ``data`` is a NumPy array, a memory map, or (for Zarr read lazily) a
    ``zarr.Array`` that is sliced block by block.
    """

    data: Any
    voxel_size: tuple[float, ...]
    unit: str | None = None
    origin: tuple[float, ...] | None = None
    path: Path | None = None
    attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        nd = len(self.data.shape)
        self.voxel_size = _tuple(self.voxel_size, nd, "voxel_size")
        self.origin = _tuple(self.origin if self.origin is not None else (0.0,) * nd, nd, "origin")
        self.unit = normalize_unit(self.unit)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return len(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    def numpy(self) -> np.ndarray:
        """The data as an in-memory NumPy array."""
        return np.asarray(self.data[...])


def _tuple(values, nd: int, what: str) -> tuple[float, ...]:
    if np.isscalar(values):
        values = (values,) * nd
    values = tuple(float(v) for v in values)
    if len(values) != nd:
        raise InputError(f"{what} has {len(values)} values {values} but the array has {nd} axes")
    return values


# Formats read but not written: HDF5, N5, neuroglancer precomputed, a folder of TIFF slices.
INPUT_FORMATS = ("hdf5", "n5", "precomputed", "slices")


def format_of(path: str | Path) -> str:
    """The format of ``path`` from its extension (``.ome.zarr`` and ``.nii.gz`` included), or for a
    folder from what it holds (Zarr, N5 or precomputed metadata, TIFF slices)."""
    from . import formats

    if formats.is_hdf5(path):
        return "hdf5"
    p = formats.local_path(path)
    if formats.is_precomputed(p):
        return "precomputed"
    if formats.is_n5(p):
        return "n5"
    name = p.name.lower()
    for fmt, exts in FORMATS.items():
        if any(name.endswith(e) for e in exts):
            return fmt
    if p.parent.name == "labels" and p.parent.parent.name.lower().endswith(".zarr") and p.name != "zarr.json":
        return "zarr"  # a label image of an OME-Zarr image: labels/<name>
    if p.is_dir() and ((p / ".zgroup").exists() or (p / ".zarray").exists() or (p / "zarr.json").exists()):
        return "zarr"
    if formats.slice_files(p):
        return "slices"
    known = ", ".join(e for exts in FORMATS.values() for e in exts)
    raise InputError(f"{path}: unknown file extension; expected one of {known}, .h5/.hdf5 (file.h5:/dataset), "
                     ".n5, a neuroglancer precomputed folder or a folder of 2-D TIFF slices")


def strip_extension(name: str) -> str:
    """File name without its (possibly double) volume extension: ``p3.nii.gz`` -> ``p3``."""
    low = name.lower()
    for exts in FORMATS.values():
        for e in sorted(exts, key=len, reverse=True):
            if low.endswith(e):
                stem = name[: -len(e)]
                return stem[:-4] if stem.lower().endswith(".ome") else stem
    return Path(name).stem


# ----------------------------------------------------------------------------- reading

# The most voxels a file may claim before it is read: 2**40 (1.1e12; a 10^11-voxel EM volume is
# well within).  A header claiming more is refused unless the caller raises the budget.
MAX_VOXELS = 2**40


def read_volume(
    path: str | Path,
    *,
    ndim: int | None = None,
    lazy: bool = False,
    check_finite: bool = True,
    voxel_size=None,
    max_voxels: int | None = None,
    level: int = 0,
) -> Volume:
    """Read a volume or image with its voxel size, unit and origin.

    Parameters
    ----------
    path : str or Path
        File or folder to read; the format comes from the extension or what the folder holds:
        MRC, TIFF (read by tiles when ``lazy``), a folder of 2-D TIFF slices, Zarr v2/v3 and
        OME-Zarr 0.4/0.5 (any axis order, a bioformats2raw layout, ``image.zarr/1`` for a level),
        HDF5 (``file.h5:/dataset``), N5, neuroglancer precomputed, NRRD, NIfTI, NumPy.
    ndim : int, optional
        Required number of axes (3 for volumes, 2 for images).  Leading
        singleton axes are squeezed to reach it; otherwise a mismatch is an error.
    lazy : bool
        Return the data unread, to be sliced block by block (Zarr, HDF5, N5, precomputed, TIFF
        and slice folders; MRC and NumPy memory-mapped).  NRRD and NIfTI are read into memory.
    check_finite : bool
        Fail on NaN or Inf in floating-point data (scanned block-wise for Zarr).
    voxel_size : float or sequence of float, optional
        Use this (z, y, x) voxel size instead of the header's (the ``--voxel-size``
        override); it is the full resolution's, so at a ``level`` it is multiplied by that
        level's downsampling factors.  Without it, a header voxel size that is not a positive finite
        number is an error naming the file (an MRC header's 0, "not set", reads as 1).
    max_voxels : int, optional
        The most voxels the file may claim (default ``MAX_VOXELS``).
    level : int
        The pyramid level to read (OME-Zarr, N5 scales, precomputed scales, pyramidal TIFF), with
        that level's voxel size and origin; 0 is the full resolution.

    Returns
    -------
    Volume

    Notes
    -----
    The size a header claims is checked before anything is allocated: against the bytes the
    file holds where the format stores them uncompressed (MRC, NumPy, raw NRRD), against
    ``max_voxels``, and, for a read into memory, against the memory this machine has free.
    A chunk absent from a Zarr store reads as the array's fill value, as Zarr defines it
    (maskworks writes its own masks without their all-zero chunks); a chunk that is present
    but cannot be decoded is an error naming the store and the region.
    """
    path, fmt, budget = _locate(path, max_voxels)
    try:
        if fmt in _OPENERS or (fmt == "tiff" and lazy and _tiff_by_tiles()):
            vol = _open_lazily(path, fmt, level)
            _check_claim(path, vol.shape, vol.dtype, True, budget)
            if not lazy:
                _check_claim(path, vol.shape, vol.dtype, False, budget)
                vol.data = np.asarray(vol.data[...])
        else:
            if level and fmt != "tiff":
                raise InputError(f"{path}: level={level!r}, but a {fmt.upper()} file holds one level")
            shape, dtype = _PEEKS[fmt](path)
            _check_claim(path, shape, dtype, lazy and fmt in _LAZY, budget)
            vol = _read_tiff(path, False, level) if fmt == "tiff" else _READERS[fmt](path, lazy)
        if voxel_size is not None and level:
            # a voxel size the user gives is the full resolution's: a level gets it times its factors
            base = _open_lazily(path, fmt, 0) if fmt in _OPENERS or fmt == "tiff" else vol
            factors = [a / b for a, b in zip(vol.voxel_size, base.voxel_size)]
            voxel_size = [v * f for v, f in zip(_tuple(voxel_size, len(factors), "voxel_size"), factors)]
    except InputError:
        raise
    except Exception as exc:  # the libraries' own messages rarely name the file
        raise InputError(f"{path}: cannot be read as {fmt.upper()} ({describe_error(exc)})") from exc
    vol.path = path
    if ndim is not None and vol.ndim != ndim:
        vol = _squeeze_to(vol, ndim)
    if voxel_size is not None:
        vol.voxel_size = _tuple(voxel_size[-vol.ndim:] if level else voxel_size, vol.ndim, "voxel_size")
    if not all(math.isfinite(v) and v > 0 for v in vol.voxel_size):
        raise InputError(f"{path}: the header's voxel size {vol.voxel_size} is not positive and finite; "
                         "fix the header, or give the voxel size (--voxel-size / voxel_size)")
    if check_finite and vol.dtype.kind in "fc":
        _check_finite(vol)
    return vol


def _locate(path, max_voxels):
    """The local path of a volume spec (it must exist), its format and the voxel budget to check."""
    from .formats import local_path, split_hdf5

    path = local_path(path)
    if not split_hdf5(path)[0].exists():
        raise InputError(f"{path}: no such file or directory")
    return path, format_of(path), MAX_VOXELS if max_voxels is None else max_voxels


@dataclass
class Header:
    """What a volume's header says, read without its voxels (:func:`inspect_volume`)."""

    path: Path
    format: str
    shape: tuple[int, ...]
    dtype: np.dtype
    voxel_size: tuple[float, ...] | None  # None: the format's geometry is not read from the header alone
    unit: str | None = None


def inspect_volume(path: str | Path, *, ndim: int | None = None, level: int = 0, voxel_size=None,
                   max_voxels: int | None = None) -> Header:
    """Read a volume's header only: the checks :func:`read_volume` makes before it reads a voxel.

    The file or folder must exist and be readable as its format, hold ``level``, have ``ndim`` axes
    (leading singletons squeezed), claim no more than ``max_voxels`` voxels (default ``MAX_VOXELS``)
    nor, where the format stores voxels uncompressed, more bytes than it holds, and have a positive,
    finite voxel size (or be given one).  No pixel data are read: for checking a table of inputs before
    any job runs (``maskworks.checks``).  NRRD and NIfTI headers give the shape and type here, their
    geometry being read with the voxels.

    Raises
    ------
    InputError
        Naming the file and what is wrong, as :func:`read_volume` would.
    """
    path, fmt, budget = _locate(path, max_voxels)
    try:
        if fmt in _OPENERS or fmt in ("mrc", "npy") or (fmt == "tiff" and _tiff_by_tiles()):
            if fmt in _OPENERS or fmt == "tiff":
                vol = _open_lazily(path, fmt, level)
            else:
                if level:
                    raise InputError(f"{path}: level={level!r}, but a {fmt.upper()} file holds one level")
                shape, dtype = _PEEKS[fmt](path)
                _check_claim(path, shape, dtype, True, budget)
                vol = _READERS[fmt](path, True)
            shape, dtype, vs, unit = vol.shape, vol.dtype, vol.voxel_size, vol.unit
        else:
            if level and fmt != "tiff":
                raise InputError(f"{path}: level={level!r}, but a {fmt.upper()} file holds one level")
            shape, dtype = _PEEKS[fmt](path)
            vs, unit = None, None
        _check_claim(path, shape, dtype, True, budget)
    except InputError:
        raise
    except Exception as exc:  # the libraries' own messages rarely name the file
        raise InputError(f"{path}: cannot be read as {fmt.upper()} ({describe_error(exc)})") from exc
    shape = tuple(int(s) for s in shape)
    if ndim is not None and len(shape) != ndim:
        extra = len(shape) - ndim
        if extra < 0 or any(s != 1 for s in shape[:extra]):
            raise InputError(f"{path}: shape {shape} has {len(shape)} axes; expected {ndim}")
        shape = shape[extra:]
        vs = vs[extra:] if vs is not None else None
    if voxel_size is not None:
        vs = None  # the given one is checked where it is parsed; the header's does not matter then
    elif vs is not None and not all(math.isfinite(v) and v > 0 for v in vs):
        raise InputError(f"{path}: the header's voxel size {tuple(vs)} is not positive and finite; "
                         "fix the header, or give the voxel size (--voxel-size / voxel_size)")
    return Header(path, fmt, shape, np.dtype(dtype), tuple(vs) if vs is not None else None, normalize_unit(unit))


def _open_lazily(path: Path, fmt: str, level: int) -> Volume:
    """A Volume over the lazily read array of ``path`` (see :mod:`maskworks.io.formats` and
    :mod:`maskworks.io.ngff`), its axes put in (..., z, y, x) order."""
    from . import formats, ngff

    if fmt == "zarr":
        image = ngff.open_image(path, level)
    elif fmt == "tiff":
        return _read_tiff(path, True, level)
    else:
        if fmt in ("hdf5", "slices") and level:
            raise InputError(f"{path}: level={level!r}, but {'an HDF5 dataset' if fmt == 'hdf5' else 'a slice folder'} "
                             "holds one level")
        opener = {"hdf5": lambda: formats.open_hdf5(path), "slices": lambda: formats.open_slices(path),
                  "n5": lambda: formats.open_n5(path, level), "precomputed": lambda: formats.open_precomputed(path, level)}
        array, axes, vs, origin, unit, attrs = opener[fmt]()
        image = ngff.Image(array, axes, vs, origin, unit, level, attrs=attrs)
    data, vs, origin, axes = image.canonical()
    attrs = {"axes": axes, "level": image.level, "levels": image.levels}
    if image.version:
        attrs["ome_zarr_version"] = image.version
    if "maskworks" in image.attrs:
        attrs["provenance"] = image.attrs["maskworks"]
    return Volume(CheckedArray(data, path), vs, image.unit, origin, attrs=attrs)


_LAZY = ("zarr", "mrc", "npy")  # formats read lazily when asked
_OPENERS = ("zarr", "hdf5", "n5", "precomputed", "slices")  # opened lazily, read into memory when not lazy


def _check_claim(path: Path, shape, dtype, lazy: bool, max_voxels: int) -> None:
    voxels = math.prod(int(s) for s in shape)
    if voxels > max_voxels:
        raise InputError(f"{path}: the header claims shape {tuple(shape)} ({voxels:.3g} voxels), more than the "
                         f"budget of {max_voxels:.3g} voxels; if the file is right, raise the budget "
                         "(--max-voxels / max_voxels)")
    need = voxels * np.dtype(dtype).itemsize
    free = available_memory()
    if not lazy and free is not None and need > free:
        raise InputError(f"{path}: reading its {tuple(shape)} {np.dtype(dtype)} data whole needs {need / 2**30:.3g} "
                         f"GiB but this machine has {free / 2**30:.3g} GiB free; run on a machine with more memory, "
                         "or give it as a Zarr store to be read block by block")


def available_memory() -> int | None:
    """Bytes of memory free for this process (MemAvailable, capped by a cgroup limit), or None."""
    free = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = int(Path(limit_file).read_text().split()[0])
            used = int(Path(usage_file).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if limit < 2**60:
            free = min(free, limit - used) if free is not None else limit - used
        break
    return free


# -- what a file claims, from its header alone (nothing is allocated for the data)

_MRC_MODE_BYTES = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2}
_MRC_MODE_DTYPES = {0: np.int8, 1: np.int16, 2: np.float32, 3: np.complex64, 4: np.complex64, 6: np.uint16,
                    12: np.float16}


def _peek_mrc(path: Path):
    """nx, ny, nz, mode and the extended header's size (nsymbt) from the 1024-byte MRC header, checked
    against the file's size (mrcfile itself would allocate nsymbt bytes before noticing)."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if len(head) < 1024:
        raise InputError(f"{path}: {size} bytes, shorter than the 1024-byte MRC header")
    order = ">" if head[212] == 0x11 else "<"
    nx, ny, nz, mode = struct.unpack_from(order + "4i", head, 0)
    (nsymbt,) = struct.unpack_from(order + "i", head, 92)
    if min(nx, ny, nz) < 0 or nsymbt < 0 or mode not in _MRC_MODE_BYTES:
        raise InputError(f"{path}: MRC header with nx,ny,nz={nx},{ny},{nz}, mode {mode}, extended header {nsymbt} "
                         "bytes is not a valid MRC file")
    need = 1024 + nsymbt + nx * ny * nz * _MRC_MODE_BYTES[mode]
    if need > size:
        raise InputError(f"{path}: the header claims {nx} x {ny} x {nz} voxels of mode {mode} after {nsymbt} bytes "
                         f"of extended header ({need} bytes in all) but the file holds {size} bytes; it is "
                         "truncated or its header is damaged")
    shape = (nz, ny, nx) if nz > 1 else (ny, nx)
    return shape, _MRC_MODE_DTYPES[mode]


def npy_header(fh):
    """(shape, dtype) from the header of a ``.npy`` stream, leaving it at the data."""
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fh)
    return tuple(shape), np.dtype(dtype)


def _peek_npy(path: Path):
    size = path.stat().st_size
    with open(path, "rb") as fh:
        shape, dtype = npy_header(fh)
        offset = fh.tell()
    if dtype.hasobject:
        return shape, np.uint8  # refused, with its reason, by the reader (pickles are never loaded)
    need = offset + math.prod(shape) * dtype.itemsize
    if need > size:
        raise InputError(f"{path}: the header claims a {shape} {dtype} array ({need} bytes with the header) but the "
                         f"file holds {size} bytes; it is truncated or its header is damaged")
    return shape, dtype


def _peek_tiff(path: Path):
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        return tuple(series.shape), np.dtype(series.dtype)


def _peek_nrrd(path: Path):
    import nrrd

    header = nrrd.read_header(str(path))
    _check_nrrd_data_file(path, header)
    shape = tuple(int(s) for s in header["sizes"])[::-1]
    dtype = np.dtype(nrrd.reader._determine_datatype(header))
    if str(header.get("encoding", "raw")).lower() == "raw" and ("data file" in header or "datafile" in header):
        data = _nrrd_data_file(path, header)
        need = math.prod(shape) * dtype.itemsize + int(header.get("byte skip", 0) or 0)
        if need > data.stat().st_size:
            raise InputError(f"{path}: the header claims a {shape} {dtype} array but its data file {data} holds "
                             f"{data.stat().st_size} bytes")
    return shape, dtype


def _nrrd_data_file(path: Path, header) -> Path:
    name = str(header.get("data file", header.get("datafile")))
    return (path.parent / name) if not Path(name).is_absolute() else Path(name)


def _check_nrrd_data_file(path: Path, header) -> None:
    """A detached NRRD header (.nhdr) may only point at one regular file inside its own folder: never
    at an absolute path, a path out of the folder, a pipe or a device, nor a list of files."""
    import stat as stat_

    name = header.get("data file", header.get("datafile"))
    if name is None:
        return
    text = str(name).strip()
    if text.upper().startswith("LIST") or len(text.split()) > 1:
        raise InputError(f"{path}: 'data file: {text}' names several data files; only a single data file beside "
                         "the header is read (write the volume as one .nrrd)")
    if Path(text).is_absolute():
        raise InputError(f"{path}: 'data file: {text}' is an absolute path; a detached header is read only with a "
                         "data file in its own folder (a relative name)")
    folder = os.path.realpath(path.parent)
    data = os.path.realpath(path.parent / text)
    if not data.startswith(folder + os.sep):
        raise InputError(f"{path}: 'data file: {text}' leads out of the header's folder ({data}); a detached header "
                         "is read only with a data file in its own folder")
    try:
        st = os.stat(data)
    except FileNotFoundError:
        raise InputError(f"{path}: its data file {data} does not exist") from None
    if not stat_.S_ISREG(st.st_mode):
        raise InputError(f"{path}: its data file {data} is not a regular file (a pipe, device or folder); only a "
                         "regular file is read")


def _peek_nifti(path: Path):
    import nibabel as nib

    img = nib.load(str(path))
    return tuple(img.shape)[::-1], np.dtype(img.get_data_dtype())


_PEEKS = {"mrc": _peek_mrc, "tiff": _peek_tiff, "nrrd": _peek_nrrd, "nifti": _peek_nifti,
          "npy": _peek_npy}


def _squeeze_to(vol: Volume, ndim: int) -> Volume:
    from .ngff import View

    shape = vol.shape
    extra = vol.ndim - ndim
    if extra > 0 and all(s == 1 for s in shape[:extra]):
        if isinstance(vol.data, np.ndarray):
            data = vol.data[(0,) * extra]  # a view, for NumPy and memory maps alike
        else:  # lazy: a view that drops the axes without reading anything
            data = View(vol.data, range(extra, vol.ndim), {i: 0 for i in range(extra)})
        return Volume(data, vol.voxel_size[extra:], vol.unit, vol.origin[extra:], vol.path, vol.attrs)
    kind = {2: "a 2-D image", 3: "a 3-D volume"}.get(ndim, f"{ndim}-D data")
    axes = f", axes {vol.attrs['axes']}" if vol.attrs.get("axes") else ""
    raise InputError(f"{vol.path}: has shape {shape} ({vol.ndim}-D{axes}) but {kind} is needed")


def _check_finite(vol: Volume) -> None:
    data = vol.data
    if isinstance(data, np.ndarray) and not isinstance(data, np.memmap):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        first = np.argwhere(~np.isfinite(data))[0] if bad else None
    else:
        # Lazy data (Zarr, memory-mapped MRC/NPY): scan block by block, never the whole at once.
        chunks = getattr(data, "chunks", None) or (max(1, 2**24 // max(1, int(np.prod(data.shape[1:])))),) + tuple(data.shape[1:])
        bad, first = 0, None
        for sl in iter_chunk_slices(data.shape, chunks):
            block = np.asarray(data[sl])
            fin = np.isfinite(block)
            if not fin.all():
                if first is None:
                    first = np.argwhere(~fin)[0] + np.array([s.start for s in sl])
                bad += int(block.size - np.count_nonzero(fin))
    if bad:
        raise InputError(
            f"{vol.path}: contains {bad} NaN/Inf value(s) (first at index {tuple(int(i) for i in first)}); "
            "masks need finite intensities - fix or fill them before running this stage"
        )


def iter_chunk_slices(shape, chunks):
    """Slices that tile ``shape`` in ``chunks``-sized blocks, C order."""
    ranges = [range(0, s, c) for s, c in zip(shape, chunks)]
    for starts in np.ndindex(*[len(r) for r in ranges]):
        yield tuple(
            slice(r[i], min(r[i] + c, s)) for r, i, c, s in zip(ranges, starts, chunks, shape)
        )


def _read_mrc(path: Path, lazy: bool) -> Volume:
    import mrcfile

    # A memory map must outlive this call, so the lazy handle is deliberately not closed here.
    mrc = mrcfile.mmap(str(path), mode="r") if lazy else mrcfile.open(str(path), mode="r")
    try:
        data = mrc.data if lazy else np.array(mrc.data)
        vs = mrc.voxel_size
        vs_xyz = (float(vs.x), float(vs.y), float(vs.z))
        org = mrc.header.origin
        origin_xyz = (float(org.x), float(org.y), float(org.z))
        if data is not None and _mrc_unsigned_bytes(mrc.header):
            data = data.view(np.uint8)
    finally:
        if not lazy:
            mrc.close()
    if data is None:
        raise InputError(f"{path}: MRC file holds no data")
    nd = data.ndim
    unit = "angstrom"
    if all(v == 0 for v in vs_xyz[:nd]):  # MRC2014: a zero cell size means "not set"
        vs_xyz, unit = (1.0, 1.0, 1.0), None
    return Volume(data, vs_xyz[:nd][::-1], unit, origin_xyz[:nd][::-1])


# IMOD's marker in header words 39-40 (bytes 152-159, i.e. 40-47 of ``extra2``): with the stamp
# present and flag bit 0 clear, mode 0 holds unsigned bytes (mrcfile alone reads mode 0 as int8
# and would widen uint8 to 16 bits on writing).
_IMOD_STAMP = 1146047817


def _mrc_unsigned_bytes(header) -> bool:
    if int(header.mode) != 0:
        return False
    stamp, flags = np.frombuffer(header.extra2.tobytes()[40:48], dtype=header.mode.dtype)
    return int(stamp) == _IMOD_STAMP and not int(flags) & 1


def _read_tiff(path: Path, lazy: bool, level: int = 0) -> Volume:
    """A TIFF with its voxel size (maskworks' own metadata, OME-XML, or resolution tags and ImageJ
    spacing).  ``lazy`` (with zarr >= 3): read by tiles/strips through tifffile's Zarr interface,
    the file kept open while the data is used; ``level`` of a pyramidal (OME-)TIFF."""
    import tifffile

    from . import ngff

    lazy = lazy and _tiff_by_tiles()
    tif = tifffile.TiffFile(str(path))
    with contextlib.ExitStack() as stack:
        if not lazy:
            stack.enter_context(tif)
        series = tif.series[0]
        if not 0 <= level < len(series.levels):
            tif.close()
            raise InputError(f"{path}: level={level!r}, but the TIFF has levels 0..{len(series.levels) - 1}")
        if lazy:
            import zarr

            data = zarr.open(series.aszarr(level=level), mode="r")
        else:
            data = series.levels[level].asarray()
        axes = series.axes
        nd = data.ndim
        vs, unit, origin = [1.0] * nd, None, None
        meta = tif.shaped_metadata[0] if tif.shaped_metadata else None
        if meta and "voxel_size" in meta:
            vs = list(meta["voxel_size"])
            unit = meta.get("unit")
            origin = meta.get("origin")
        elif tif.ome_metadata:
            vs, unit = _ome_tiff_sizes(tif.ome_metadata, axes, vs)
        else:
            from .formats import _tiff_plane_geometry

            (vy, vx), unit = _tiff_plane_geometry(tif)
            ij = tif.imagej_metadata or {}
            axmap = {a: i for i, a in enumerate(axes)}
            for axis, v in (("Y", vy), ("X", vx), ("Z", float(ij.get("spacing", 1.0)))):
                if axis in axmap:
                    vs[axmap[axis]] = v
        origin = list(origin or [0.0] * nd)
        if level:  # a coarser level: the same extent in fewer voxels, its first centre shifted
            factors = [max(1, round(f / n)) for f, n in zip(series.levels[0].shape, data.shape)]
            origin = [o + (f - 1) / 2 * v for o, f, v in zip(origin, factors, vs)]
            vs = [v * f for v, f in zip(vs, factors)]
    attrs = {"axes": axes.lower(), "level": level, "levels": len(series.levels)}
    if meta and "maskworks" in meta:
        attrs["provenance"] = meta["maskworks"]
    image = ngff.Image(data, list(axes.lower()), list(vs), origin, unit, level)
    data, vs, origin, attrs["axes"] = image.canonical()  # (..., z, y, x), lazily or in memory alike
    data = CheckedArray(data, path) if lazy else np.asarray(data)
    return Volume(data, vs, unit, origin, attrs=attrs)


def _tiff_by_tiles() -> bool:
    """tifffile's Zarr interface needs zarr >= 3 (tifffile >= 2025.5.21); with zarr 2 (the cryo-ET
    environment) a TIFF is read whole, after the memory check."""
    from . import ngff

    return ngff.zarr_major() >= 3


def _ome_tiff_sizes(xml: str, axes: str, vs: list) -> tuple[list, str | None]:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml)
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    unit = None
    if pixels is not None:
        for ax in "XYZ":
            if ax in axes and pixels.get(f"PhysicalSize{ax}"):
                vs[axes.index(ax)] = float(pixels.get(f"PhysicalSize{ax}"))
                unit = pixels.get(f"PhysicalSize{ax}Unit", "µm")
    return vs, unit


class CheckedArray:
    """A lazily read Zarr array whose every read failure (a truncated or corrupt chunk, a chunk
    file that cannot be opened) is an :class:`InputError` naming the store and the region,
    instead of a decompression traceback deep inside a stage.  Everything else is the array's."""

    def __init__(self, array, path):
        self._array, self._path = array, Path(path)

    def __getitem__(self, key):
        try:
            return self._array[key]
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{self._path}: the data of region {_region_text(key)} cannot be read "
                             f"({describe_error(exc)}); the store is damaged or incomplete") from exc

    def __array__(self, dtype=None, copy=None):
        data = self[...]
        return np.asarray(data, dtype=dtype) if dtype is not None else np.asarray(data)

    def __len__(self):
        return len(self._array)

    def __getattr__(self, name):
        return getattr(self._array, name)


def _region_text(key) -> str:
    parts = key if isinstance(key, tuple) else (key,)
    out = []
    for k in parts:
        if isinstance(k, slice):
            out.append(f"{'' if k.start is None else k.start}:{'' if k.stop is None else k.stop}")
        elif k is Ellipsis:
            out.append("...")
        else:
            out.append(str(k))
    return "[" + ", ".join(out) + "]"


# One geometry convention for every format, ITK's (which MITK, Slicer and the napari plugins
# read through): physical coordinates in LPS, the origin is the LPS position of voxel 0, voxel
# sizes are positive.  NIfTI stores RAS, so x and y change sign between the two.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
_NRRD_SPACES = {"left-posterior-superior": np.eye(3), "LPS": np.eye(3),
                "right-anterior-superior": _RAS_TO_LPS, "RAS": _RAS_TO_LPS,
                "left-anterior-superior": np.diag([1.0, -1.0, 1.0]), "LAS": np.diag([1.0, -1.0, 1.0])}


def _geometry_from_matrix(path, columns, origin):
    """(voxel sizes, origin, direction) in (z, y, x) order from LPS axis vectors (fastest axis
    first, one column per array axis) and the LPS origin."""
    columns = np.asarray(columns, dtype=float)
    sizes = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise InputError(f"{path}: voxel axes {columns.T.tolist()} are not a valid geometry (zero or non-finite)")
    direction = columns / sizes
    return tuple(sizes[::-1].tolist()), tuple(np.asarray(origin, dtype=float)[::-1].tolist()), direction


def _read_nrrd(path: Path, lazy: bool) -> Volume:
    import nrrd

    data, header = nrrd.read(str(path), index_order="C")
    nd = data.ndim
    dirs = header.get("space directions")
    attrs = {"content": header.get("content")}
    vs, origin = (1.0,) * nd, None
    rows = [] if dirs is None else [np.asarray(r, dtype=float) for r in dirs]
    if nd == 3 and len(rows) == 3 and all(r.shape == (3,) and np.all(np.isfinite(r)) for r in rows):
        to_lps = _NRRD_SPACES.get(header.get("space"), np.eye(3))
        origin_f = header.get("space origin")
        origin_lps = to_lps @ np.asarray(origin_f if origin_f is not None else np.zeros(3), dtype=float)
        vs, origin, direction = _geometry_from_matrix(path, to_lps @ np.stack(rows, axis=1), origin_lps)
        attrs["direction"] = direction.tolist()
    else:
        spatial = [float(np.linalg.norm(r)) for r in rows if r.ndim == 1 and np.all(np.isfinite(r))]
        if len(spatial) == nd:
            vs = tuple(spatial[::-1])
        elif "spacings" in header:
            vs = tuple(float(v) for v in header["spacings"])[::-1]
        origin_f = header.get("space origin")
        origin = tuple(float(o) for o in origin_f)[::-1] if origin_f is not None and len(origin_f) == nd else None
    units = header.get("space units")
    unit = units[0] if units else None
    return Volume(data, tuple(vs), unit, origin, attrs=attrs)


def _read_nifti(path: Path, lazy: bool) -> Volume:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    nd = data.ndim
    data = np.ascontiguousarray(data.transpose(tuple(range(nd))[::-1]))
    attrs = {}
    if nd == 3:
        affine = img.affine  # sform, else qform, else nibabel's default (as ITK chooses)
        vs, origin, direction = _geometry_from_matrix(path, _RAS_TO_LPS @ affine[:3, :3], _RAS_TO_LPS @ affine[:3, 3])
        attrs["direction"] = direction.tolist()
    else:
        vs = tuple(float(z) for z in img.header.get_zooms()[:nd])[::-1]
        origin = tuple(float(v) for v in img.affine[:nd, 3])[::-1]
    space_unit = img.header.get_xyzt_units()[0]
    unit = {"mm": "millimeter", "micron": "micrometer", "meter": "meter"}.get(space_unit)
    descrip = img.header["descrip"].tobytes().rstrip(b"\x00").decode("ascii", "replace")
    if descrip.startswith("unit="):
        unit = descrip.split("=", 1)[1].split()[0]
    return Volume(data, vs, unit, origin, attrs=attrs)


def _read_npy(path: Path, lazy: bool) -> Volume:
    data = np.load(str(path), mmap_mode="r" if lazy else None, allow_pickle=False)
    return Volume(data, (1.0,) * data.ndim, None, None)


_READERS = {
    "mrc": _read_mrc,
    "tiff": _read_tiff,
    "nrrd": _read_nrrd,
    "nifti": _read_nifti,
    "npy": _read_npy,
}

# ----------------------------------------------------------------------------- writing

_MRC_DTYPES = (np.int8, np.int16, np.uint16, np.float32, np.uint8)


def _mrc_dtype(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype in [np.dtype(d) for d in _MRC_DTYPES]:
        return array
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for d in (np.uint8, np.int16, np.uint16):
        info = np.iinfo(d)
        if info.min <= lo and hi <= info.max:
            return array.astype(d)
    raise InputError(
        f"{path}: labels up to {hi} do not fit an MRC integer mode (int8/int16/uint16); "
        "write to .zarr, .tif or .nrrd instead"
    )


# The OME-Zarr version stores are written as (None: 0.5 where zarr 3 is installed, else 0.4); the
# command line's --ome-zarr-version and a job's configuration set it once for the process.
OME_ZARR_VERSION: str | None = None


def set_ome_zarr_version(version) -> str:
    """Write OME-Zarr ``version`` ("0.4" or "0.5") from now on in this process; returns the one used."""
    from .ngff import check_version

    global OME_ZARR_VERSION
    OME_ZARR_VERSION = check_version(version)
    return OME_ZARR_VERSION


def write_volume(
    path: str | Path,
    array,
    voxel_size=1.0,
    *,
    unit: str | None = None,
    origin=None,
    chunks=None,
    provenance: dict | None = None,
    labels: bool = False,
    colours: dict | None = None,
    ome_zarr_version: str | None = None,
    source: str | None = None,
    pyramid=None,
) -> Path:
    """Write ``array`` atomically to ``path`` with its voxel size, unit and origin.

    Parameters
    ----------
    path : str or Path
        Target; the format comes from the extension (``.zarr`` writes OME-Zarr with a pyramid).
    array : array-like
        (z, y, x) volume or (y, x) image.
    voxel_size : float or sequence of float
        Per axis, in ``unit``.
    unit : str, optional
        Length unit ("nanometer", "angstrom", ...).  MRC stores angstroms: other
        known units are converted on the way in.
    origin : sequence of float, optional
        Physical position of voxel (0, 0, 0), per axis.
    chunks : sequence of int, optional
        Zarr chunk shape (default: 64 per axis, capped by the shape).
    provenance : dict, optional
        Small JSON-able record (stage, parameters, inputs) kept where the format allows.
    labels : bool
        A mask or label image: OME-Zarr ``image-label`` metadata and a nearest-neighbour pyramid
        (an intensity image gets the mean).
    colours : dict, optional
        With ``labels``: the colour table (value -> RGBA); None: masks' and training labels'
        0/1/2 table; ``{}``: none (instance labels).

    Returns
    -------
    Path
        The written path.
    """
    with create_volume(
        path, array.shape, array.dtype, voxel_size, unit=unit, origin=origin, chunks=chunks,
        provenance=provenance, labels=labels, colours=colours, ome_zarr_version=ome_zarr_version, source=source,
        pyramid=pyramid, _array=array,
    ):
        pass
    return Path(path)


@contextlib.contextmanager
def create_volume(
    path: str | Path,
    shape,
    dtype,
    voxel_size=1.0,
    *,
    unit: str | None = None,
    origin=None,
    chunks=None,
    provenance: dict | None = None,
    labels: bool = False,
    colours: dict | None = None,
    ome_zarr_version: str | None = None,
    source: str | None = None,
    pyramid=None,
    _array=None,
):
    """Open an output volume for block-wise writing; it appears at ``path`` only on success.

    Yields an array-like to assign blocks into (``out[z0:z1] = block``): a Zarr
    array for ``.zarr`` targets (so peak memory stays at one block; the pyramid and
    the OME-NGFF metadata are written on exit, block by block), an in-memory NumPy
    array for the other formats, written on exit.  ``labels``, ``colours``: see
    :func:`write_volume`; ``ome_zarr_version`` overrides the process-wide one (a label image
    takes its image's), ``source`` is the label image's path to its image (``"../../"``) and
    ``pyramid`` its downsampling factors from level to level (those of its image).
    """
    from . import ngff

    path = Path(path)
    fmt = format_of(path)
    if fmt in INPUT_FORMATS:
        raise InputError(f"{path}: {fmt} is read, not written; write .zarr (OME-Zarr), .tif, .mrc, .nrrd or .nii.gz")
    if path.name.lower().endswith(".nhdr"):
        raise InputError(f"{path}: writing detached NRRD headers (.nhdr) is not supported; write .nrrd instead")
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    geom = Volume(np.empty((0,) * len(shape), dtype=dtype), voxel_size, unit, origin)
    if unit is not None and normalize_unit(unit) is None:
        raise InputError(f"{path}: unknown length unit {unit!r}; use one of {sorted(_UNIT_NM)}")
    with atomic_path(path) as tmp:
        if fmt == "zarr":
            version = ngff.check_version(ome_zarr_version or OME_ZARR_VERSION)
            nd = len(shape)
            chunks = tuple(chunks) if chunks is not None else (64,) * nd if nd == 3 else (512,) * nd
            chunks = tuple(max(1, min(int(c), s if s > 0 else 1)) for c, s in zip(chunks, shape))
            root = ngff.create_group(tmp, version)
            arr = ngff.create_array(root, "0", shape, chunks, dtype, version)
            if _array is not None:
                _copy_blockwise(_array, arr)
            yield arr
            ngff.finish_image(root, arr, voxel_size=geom.voxel_size, origin=geom.origin, unit=geom.unit,
                              version=version, labels=labels, chunks=chunks,
                              provenance=provenance, colours=colours, source=source, factors=pyramid)
        else:
            buf = np.asarray(_array) if _array is not None else np.zeros(shape, dtype=dtype)
            yield buf
            _WRITERS[fmt](tmp, buf, geom, provenance, path)


def _copy_blockwise(src, dst) -> None:
    for sl in iter_chunk_slices(dst.shape, dst.chunks):
        dst[sl] = np.asarray(src[sl])


def describe_error(exc: BaseException) -> str:
    """A library's error in a few words for a message that names the file.  A refusal to unpickle
    is said as such, without the library's hint to load the file unsafely (``allow_pickle=True``,
    ``weights_only=False``): pickled objects can run code and maskworks never loads them."""
    text = str(exc)
    if any(k in text for k in ("allow_pickle", "weights_only", "Unpickl", "pickle")) or \
            "Unpickl" in type(exc).__name__:
        return "it holds pickled Python objects, which maskworks never loads (unpickling can run code); " \
               "save plain arrays/tensors"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def _write_mrc(tmp: Path, data: np.ndarray, geom: Volume, provenance, target: Path) -> None:
    import mrcfile

    data = _mrc_dtype(np.asarray(data), target)
    vs = convert_length(geom.voxel_size, geom.unit, "angstrom")
    org = convert_length(geom.origin, geom.unit, "angstrom")
    with mrcfile.new(str(tmp), overwrite=True) as mrc:
        if data.dtype == np.uint8:
            mrc.set_data(np.ascontiguousarray(data).view(np.int8))
            extra = bytearray(mrc.header.extra2.tobytes())
            extra[40:48] = np.array([_IMOD_STAMP, 0], dtype=mrc.header.mode.dtype).tobytes()
            mrc.header.extra2 = bytes(extra)
            # mrcfile computed the statistics on the signed view; viewers use them for contrast.
            mrc.header.dmin, mrc.header.dmax = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
            mrc.header.dmean = float(data.mean(dtype=np.float64)) if data.size else 0.0
            mrc.header.rms = float(data.std(dtype=np.float64)) if data.size else 0.0
        else:
            mrc.set_data(np.ascontiguousarray(data))
        if data.ndim == 3:
            mrc.voxel_size = (vs[2], vs[1], vs[0])
            mrc.header.origin = (org[2], org[1], org[0])
        else:
            mrc.voxel_size = (vs[-1], vs[-2], 1.0)
            mrc.header.origin = (org[-1], org[-2], 0.0)
        if provenance:
            mrc.add_label(f"maskworks {provenance.get('stage', '')}"[:80])


def _write_tiff(tmp: Path, data: np.ndarray, geom: Volume, provenance, target: Path) -> None:
    import tifffile

    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    meta = {
        "axes": "ZYX"[-data.ndim:] if data.ndim <= 3 else None,
        "voxel_size": list(geom.voxel_size),
        "unit": geom.unit,
        "origin": list(geom.origin),
    }
    if provenance:
        meta["maskworks"] = provenance
    meta = {k: v for k, v in meta.items() if v is not None}
    tifffile.imwrite(
        str(tmp), data, metadata=meta, photometric="minisblack",
        resolution=(1.0 / geom.voxel_size[-1], 1.0 / geom.voxel_size[-2]) if data.ndim >= 2 else None,
        compression="zlib", compressionargs={"level": 1},
        bigtiff=data.nbytes > 2**31 - 2**25,
    )


def _write_nrrd(tmp: Path, data: np.ndarray, geom: Volume, provenance, target: Path) -> None:
    import nrrd

    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    nd = data.ndim
    header = {
        "space directions": np.diag(geom.voxel_size[::-1]).astype(float),
        "space origin": np.asarray(geom.origin[::-1], dtype=float),
        "kinds": ["domain"] * nd,
        "encoding": "gzip",
    }
    if nd == 3:
        header["space"] = "left-posterior-superior"
    else:
        header["space dimension"] = nd
    if geom.unit:
        header["space units"] = [geom.unit] * nd
    if provenance:
        header["content"] = f"maskworks {provenance.get('stage', '')}".strip()
    nrrd.write(str(tmp), np.ascontiguousarray(data), header, index_order="C")


def _write_nifti(tmp: Path, data: np.ndarray, geom: Volume, provenance, target: Path) -> None:
    import nibabel as nib

    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    nd = data.ndim
    affine = np.eye(4)
    lps = np.diag([float(v) for v in geom.voxel_size[::-1]] + [1.0] * (3 - nd))[:3, :3]
    origin = np.zeros(3)
    origin[:nd] = geom.origin[::-1]
    # the same LPS geometry as the NRRD writer, stored the NIfTI way (RAS)
    affine[:3, :3] = _RAS_TO_LPS @ lps
    affine[:3, 3] = _RAS_TO_LPS @ origin
    img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(tuple(range(nd))[::-1])), affine)
    img.set_sform(affine, code=1)  # scanner-anat: what ITK-based viewers read
    img.set_qform(affine, code=1)
    nifti_unit = {"millimeter": "mm", "micrometer": "micron", "meter": "meter"}.get(geom.unit or "", "unknown")
    img.header.set_xyzt_units(nifti_unit)
    if nifti_unit == "unknown" and geom.unit:
        img.header["descrip"] = f"unit={geom.unit}"
    nib.save(img, str(tmp))


def _write_npy(tmp: Path, data: np.ndarray, geom: Volume, provenance, target: Path) -> None:
    with open(tmp, "wb") as fh:
        np.save(fh, np.asarray(data), allow_pickle=False)


_WRITERS = {
    "mrc": _write_mrc,
    "tiff": _write_tiff,
    "nrrd": _write_nrrd,
    "nifti": _write_nifti,
    "npy": _write_npy,
}


def write_csv(path: str | Path, rows, columns, delimiter: str = ",") -> Path:
    """Write dict rows as CSV (or TSV: ``delimiter``) atomically (manifests, reports, per-object stats)."""
    import csv

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore", delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(path: str | Path, obj: dict) -> Path:
    """Write a small JSON document atomically (stats, metrics); NaN and infinities become null."""
    path = Path(path)
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def _finite(o):
    """NaN and infinities as null (JSON has no NaN: readers refuse it)."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
