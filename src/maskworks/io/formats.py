"""The container formats EM labs export, read lazily through their own libraries: HDF5 (h5py),
N5 and neuroglancer precomputed (tensorstore), a folder of 2-D TIFF slices and a (tiled,
compressed, pyramidal) TIFF (tifffile).  Each opener returns ``(array, axes, voxel_size, origin,
unit, attrs)`` with the array indexable by slices and read only where indexed, in the stored axis
order named by ``axes`` (:class:`maskworks.io.ngff.Image` puts it in (z, y, x) order).

Choices: tensorstore reads N5 (zarr-python 3 dropped its N5 store) and neuroglancer precomputed
(cloud-volume would bring its own stack of cloud clients); it is maintained by Google with
neuroglancer itself.  A slice folder is read one TIFF per z-plane, naturally sorted
(``s2.tif`` before ``s10.tif``), with tifffile.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .errors import InputError

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
TIFF_SUFFIXES = (".tif", ".tiff")


def local_path(path) -> Path:
    """A path as a file name: neuroglancer's ``precomputed://`` and ``file://`` prefixes removed
    (``precomputed://file:///data/vol`` is ``/data/vol``)."""
    text = str(path)
    for prefix in ("precomputed://", "file://"):
        text = text.removeprefix(prefix)
    return Path(text)


def split_hdf5(path) -> tuple[Path, str | None]:
    """``file.h5:/group/dataset`` -> (``file.h5``, ``/group/dataset``); other paths pass through."""
    text = str(path)
    for suffix in HDF5_SUFFIXES:
        i = text.lower().find(suffix + ":")
        if i >= 0:
            return Path(text[: i + len(suffix)]), text[i + len(suffix) + 1:] or None
    return Path(text), None


def is_hdf5(path) -> bool:
    return split_hdf5(path)[0].name.lower().endswith(HDF5_SUFFIXES)


def is_n5(path) -> bool:
    return any(part.lower().endswith(".n5") for part in Path(path).parts) or \
        (Path(path).is_dir() and _n5_version(Path(path)) is not None)


def _n5_version(path: Path):
    try:
        return json.loads((path / "attributes.json").read_text()).get("n5")
    except (OSError, ValueError, AttributeError):
        return None


def is_precomputed(path) -> bool:
    p = local_path(path)
    try:
        info = json.loads((p / "info").read_text()) if p.is_dir() else {}
        # "@type" since neuroglancer's 2019 spec; older writers (cloud-volume) give scales and data_type only
        return info.get("@type") == "neuroglancer_multiscale_volume" or ("scales" in info and "data_type" in info)
    except (OSError, ValueError, AttributeError):
        return False


def slice_files(path) -> list[Path] | None:
    """The TIFF slices of a folder, naturally sorted, or None when ``path`` is not such a folder."""
    p = Path(path)
    if not p.is_dir() or any((p / m).exists() for m in (".zgroup", ".zarray", "zarr.json", "attributes.json", "info")):
        return None
    files = [f for f in p.iterdir() if f.suffix.lower() in TIFF_SUFFIXES and not f.name.startswith(".")]
    return sorted(files, key=_natural) or None


def _natural(path: Path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


# ----------------------------------------------------------------------------- HDF5


_VOXEL_ATTRS = (("element_size_um", "micrometer"), ("resolution", "nanometer"), ("voxel_size", None),
                ("pixel_size", None), ("spacing", None))


def open_hdf5(path, dataset=None):
    """An HDF5 dataset (h5py, read lazily; the file stays open while the data is used).

    The dataset is ``dataset`` (``file.h5:/path`` or the table's ``dataset`` column), or the only
    array of 2 or more dimensions in the file.  Voxel size: ``element_size_um`` (µm; ilastik,
    Fiji), ``resolution`` (nm; CREMI), or ``voxel_size``/``pixel_size``/``spacing`` with a
    ``unit`` attribute, on the dataset or its group; ``offset`` (CREMI, in the same unit) is the
    origin.  The axis order is ``axistags`` (ilastik) when present, else the trailing axes are
    z, y, x.
    """
    import h5py

    file, inner = split_hdf5(path)
    dataset = dataset or inner
    f = h5py.File(file, "r")
    if dataset is None:
        found = []
        f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim >= 2 else None)
        if len(found) != 1:
            f.close()
            raise InputError(f"{file}: holds {len(found)} arrays of 2 or more dimensions ({', '.join(found[:8])}); "
                             f"name one: {file}:/path/to/dataset (or the table's dataset column)")
        dataset = found[0]
    if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        f.close()
        raise InputError(f"{file}: no dataset {dataset!r}; it holds {', '.join(names[:10]) or 'none'}")
    ds = f[dataset]
    nd = ds.ndim
    attrs = {**{k: _plain(v) for k, v in ds.parent.attrs.items()}, **{k: _plain(v) for k, v in ds.attrs.items()}}
    axes = _hdf5_axes(attrs, nd)
    spatial = [i for i, a in enumerate(axes) if a in "zyx"]
    vs, unit = [1.0] * nd, attrs.get("unit")
    for key, key_unit in _VOXEL_ATTRS:
        if key in attrs:
            values = np.atleast_1d(np.asarray(attrs[key], dtype=float)).tolist()
            if len(values) == 1:
                values = values * len(spatial)
            if len(values) != len(spatial):
                raise InputError(f"{file}:{dataset}: attribute {key}={values} has {len(values)} values for "
                                 f"{len(spatial)} spatial axes")
            for i, v in zip(spatial, values):
                vs[i] = v
            unit = key_unit if key == "element_size_um" or not unit else unit  # resolution: nm unless a unit says
            break
    origin = [0.0] * nd
    if "offset" in attrs:
        values = np.atleast_1d(np.asarray(attrs["offset"], dtype=float)).tolist()
        if len(values) == len(spatial):
            for i, v in zip(spatial, values):
                origin[i] = v
    return ds, axes, vs, origin, unit, {"dataset": dataset}


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in value.tolist()]
    return value


def _hdf5_axes(attrs: dict, nd: int) -> list[str]:
    tags = attrs.get("axistags")
    if isinstance(tags, str):
        try:
            keys = [a["key"].lower() for a in json.loads(tags)["axes"]]
            if len(keys) == nd:
                return keys
        except (ValueError, KeyError, TypeError):
            pass
    return list("tczyx"[-nd:]) if nd <= 5 else [f"d{i}" for i in range(nd)]


# ----------------------------------------------------------------------------- tensorstore


class TensorStoreArray:
    """A tensorstore array as zarr-python's are used here: shape, dtype, chunks, and ``[...]``
    returning NumPy (only the indexed region is read)."""

    def __init__(self, store):
        self.store = store
        self.shape = tuple(int(s) for s in store.shape)
        self.dtype = np.dtype(store.dtype.numpy_dtype)
        try:
            self.chunks = tuple(int(c) for c in store.chunk_layout.read_chunk.shape)
        except (TypeError, ValueError):
            self.chunks = None

    def __getitem__(self, key):
        return np.asarray(self.store[key].read().result())

    def __array__(self, dtype=None, copy=None):
        data = self[...]
        return data.astype(dtype) if dtype is not None else data


def open_n5(path, level: int = 0):
    """An N5 dataset (tensorstore).  A multiscale group (``s0``, ``s1``, ...) gives the dataset of
    ``level``; the voxel size comes from ``pixelResolution`` ({dimensions, unit}) or ``resolution``
    (nm), scaled by ``downsamplingFactors``; the stored order x, y, z is reversed."""
    import tensorstore as ts

    path = Path(path)
    group_attrs = _json(path / "attributes.json")
    if "dimensions" not in group_attrs:
        scales = sorted((p.name for p in path.iterdir() if re.fullmatch(r"s\d+", p.name)), key=lambda n: int(n[1:]))
        if not scales:
            raise InputError(f"{path}: an N5 group without a dataset or scale levels s0, s1, ...; point at the dataset")
        if not 0 <= level < len(scales):
            raise InputError(f"{path}: level={level!r}, but the N5 group has levels 0..{len(scales) - 1}")
        dataset = path / scales[level]
    else:
        if level:
            raise InputError(f"{path}: level={level!r}, but an N5 dataset has one level")
        dataset, group_attrs = path, {}
    attrs = {**group_attrs, **_json(dataset / "attributes.json")}
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(dataset)}}, read=True).result()
    nd = len(store.shape)
    res = attrs.get("pixelResolution")
    unit = "nanometer"
    if isinstance(res, dict):
        vs_xyz, unit = list(res.get("dimensions", [1.0] * nd)), res.get("unit", unit)
    else:
        vs_xyz = list(attrs.get("resolution", [1.0] * nd))
    factors = attrs.get("downsamplingFactors", [1] * nd)
    base_xyz = [float(v) for v in vs_xyz]
    vs_xyz = [v * float(f) for v, f in zip(base_xyz, factors)]
    # a coarser level's first voxel centre lies midway between the first f of level 0
    offset = [float(o) + (float(f) - 1) / 2 * v for o, f, v in zip(attrs.get("offset", [0.0] * nd), factors, base_xyz)]
    axes = list("xyz"[:nd]) if nd <= 3 else [f"d{i}" for i in range(nd)]
    return TensorStoreArray(store), axes, vs_xyz, offset, unit, {"n5": str(dataset)}


def open_precomputed(path, level: int = 0):
    """A neuroglancer precomputed volume (tensorstore): scale ``level`` of its ``info``, voxel size
    ``resolution`` (nm), origin the centre of voxel ``voxel_offset``, axes x, y, z, channel."""
    import tensorstore as ts

    path = local_path(path)
    info = _json(path / "info")
    scales = info.get("scales", [])
    if not 0 <= level < len(scales):
        raise InputError(f"{path}: level={level!r}, but the volume has scales 0..{len(scales) - 1}")
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(path)},
                     "scale_index": int(level)}, read=True).result()
    store = store[ts.d[:].translate_to[0]]
    scale = scales[level]
    vs = [float(v) for v in scale["resolution"]] + [1.0]
    # voxel i spans [i, i + 1) x resolution: its centre, maskworks' origin, is at i + 0.5
    origin = [(float(o) + 0.5) * v for o, v in zip(scale.get("voxel_offset", [0, 0, 0]), vs)] + [0.0]
    return TensorStoreArray(store), ["x", "y", "z", "c"], vs, origin, "nanometer", {"scale": scale.get("key")}


def _json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


# ----------------------------------------------------------------------------- TIFF


class TiffSlices:
    """A folder of 2-D TIFF slices as one (z, y, x) array: a plane is read only when indexed."""

    def __init__(self, files):
        import tifffile

        self.files = list(files)
        with tifffile.TiffFile(self.files[0]) as tif:
            page = tif.series[0]
            self.plane, self.dtype = tuple(page.shape), np.dtype(page.dtype)
            self.meta = _tiff_plane_geometry(tif)
        if len(self.plane) != 2:
            raise InputError(f"{self.files[0]}: a slice of shape {self.plane}; a slice folder holds 2-D images")
        self.shape = (len(self.files), *self.plane)
        self.chunks = (1, *self.plane)

    def _plane(self, z):
        import tifffile

        data = tifffile.imread(self.files[z])
        if data.shape != self.plane or data.dtype != self.dtype:
            raise InputError(f"{self.files[z]}: a slice of {data.shape} {data.dtype}, but {self.files[0]} is "
                             f"{self.plane} {self.dtype}; every slice of the folder must match")
        return data

    def __getitem__(self, key):
        from .ngff import _expand

        kz, ky, kx = _expand(key, 3)
        if not isinstance(kz, slice) and not -self.shape[0] <= int(kz) < self.shape[0]:
            raise IndexError(f"slice {int(kz)} of a folder of {self.shape[0]} slices")
        zs = range(*kz.indices(self.shape[0])) if isinstance(kz, slice) else [int(kz) % self.shape[0]]
        planes = [self._plane(z)[ky, kx] for z in zs]
        out = np.stack(planes) if planes else np.zeros((0, *np.empty(self.plane)[ky, kx].shape), self.dtype)
        return out[0] if not isinstance(kz, slice) else out

    def __array__(self, dtype=None, copy=None):
        data = self[...]
        return data.astype(dtype) if dtype is not None else data

    def __len__(self):
        return self.shape[0]


def _tiff_plane_geometry(tif) -> tuple[list[float], str | None]:
    """(y, x) pixel size and unit of a TIFF plane (resolution tags, ImageJ unit)."""
    page = tif.pages[0]
    vs = [1.0, 1.0]
    for i, tag in ((1, "XResolution"), (0, "YResolution")):
        t = page.tags.get(tag)
        if t is not None and t.value[0] > 0:
            vs[i] = t.value[1] / t.value[0]
    unit = (tif.imagej_metadata or {}).get("unit")
    return vs, unit


def open_slices(path):
    """A folder of 2-D TIFF slices (see :class:`TiffSlices`); z spacing 1 unless the first slice's
    ImageJ metadata says ``spacing`` (give the voxel size otherwise)."""
    import tifffile

    files = slice_files(path)
    if not files:
        raise InputError(f"{path}: a folder without TIFF slices")
    stack = TiffSlices(files)
    (vy, vx), unit = stack.meta
    with tifffile.TiffFile(files[0]) as tif:
        vz = float((tif.imagej_metadata or {}).get("spacing", 1.0))
    return stack, ["z", "y", "x"], [vz, vy, vx], [0.0, 0.0, 0.0], unit, {"slices": len(files)}
