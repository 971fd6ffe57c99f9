"""Zarr and OME-Zarr: the arrays through zarr-python (2.18 or >= 3.1, Zarr v2 and v3, sharded
arrays included), the OME-NGFF metadata read and written here.

Reading (:func:`open_image`) takes a store (or an array inside one), an OME-Zarr 0.4 or 0.5
image or label image, or a bioformats2raw layout, picks the pyramid ``level`` asked for, and
returns it as a lazy (z, y, x)-ordered view whatever the order of its ``t, c, z, y, x`` axes,
with that level's voxel size, translation and unit.  Writing (:func:`create_array` and
:func:`finish_image`) makes OME-Zarr 0.5 (Zarr v3) by default where zarr 3 is installed, 0.4
(Zarr v2) on request or under zarr 2; a mask or label image gets ``image-label`` metadata and a
colour table, every output a pyramid down to about :data:`PYRAMID_MIN` voxels per side
(nearest for labels, the mean for intensities), built block by block from the level above.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

PYRAMID_MIN = 256  # the pyramid goes down until every side is at most this many voxels
VERSIONS = ("0.4", "0.5")
SPACE_AXES = ("z", "y", "x")
# The colour table of training labels and masks: 0 background, 1 foreground, 2 ignore.
LABEL_COLOURS = {0: [0, 0, 0, 0], 1: [255, 96, 32, 255], 2: [48, 128, 255, 160]}
LABEL_NAMES = {0: "background", 1: "foreground", 2: "ignore"}


def zarr_major() -> int:
    import zarr

    return int(zarr.__version__.split(".")[0])


def default_version() -> str:
    """OME-Zarr 0.5 (Zarr v3) where zarr 3 is installed, else 0.4 (Zarr v2)."""
    return "0.5" if zarr_major() >= 3 else "0.4"


def check_version(version) -> str:
    version = default_version() if version in (None, "") else str(version)
    if version not in VERSIONS:
        raise InputError(f"ome_zarr_version={version!r}: expected one of {', '.join(VERSIONS)}")
    if version == "0.5" and zarr_major() < 3:
        raise InputError("ome_zarr_version='0.5' needs zarr >= 3.1 (Zarr v3); this environment has zarr 2, which "
                         "writes OME-Zarr 0.4")
    return version


# ----------------------------------------------------------------------------- lazy views


def _expand(key, ndim: int) -> tuple:
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1:]
    key = key + (slice(None),) * (ndim - len(key))
    if len(key) != ndim or not all(isinstance(k, (slice, int, np.integer)) for k in key):
        raise TypeError(f"only slices and integers index this array, got {key!r}")
    return key


class View:
    """A lazy view of a stored array with its axes reordered (``order[i]``: the stored axis shown as
    axis ``i``) and some stored axes held at one index (``fixed``: stored axis -> index), e.g. an
    ``x, y, z`` array shown as ``z, y, x``, or the single ``t`` and ``c`` of ``t, c, z, y, x``
    dropped.  Reads only the region indexed."""

    def __init__(self, array, order, fixed=None):
        self.array, self.order, self.fixed = array, tuple(order), dict(fixed or {})
        self.shape = tuple(int(array.shape[i]) for i in self.order)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(array.dtype)
        chunks = getattr(array, "chunks", None)
        self.chunks = tuple(int(chunks[i]) for i in self.order) if chunks is not None else None

    def __getitem__(self, key):
        key = _expand(key, self.ndim)
        stored: list = [slice(None)] * len(self.array.shape)
        for axis, index in self.fixed.items():
            stored[axis] = index
        for out, k in zip(self.order, key):
            stored[out] = k
        data = np.asarray(self.array[tuple(stored)])
        kept_stored = [a for a in range(len(stored)) if not isinstance(stored[a], (int, np.integer))]
        kept_out = [self.order[i] for i, k in enumerate(key) if not isinstance(k, (int, np.integer))]
        return data.transpose([kept_stored.index(a) for a in kept_out])

    def __array__(self, dtype=None, copy=None):
        data = self[...]
        return data.astype(dtype) if dtype is not None else data

    def __len__(self):
        return self.shape[0]


# ----------------------------------------------------------------------------- reading


@dataclass
class Image:
    """One level of a Zarr image: a (space-last) lazy array and its geometry in the stored axis
    order (``axes``), before any reordering."""

    array: Any
    axes: list[str]
    scale: list[float]
    translation: list[float]
    unit: str | None
    level: int = 0
    levels: int = 1
    version: str | None = None
    attrs: dict = field(default_factory=dict)

    def canonical(self):
        """(data, voxel_size, origin, axes text) with the axes in ``..., z, y, x`` order: other
        axes (t, c, ...) first in their stored order, then the space axes z, y, x."""
        names = [a.lower() for a in self.axes]
        space = [names.index(a) for a in SPACE_AXES if a in names]
        other = [i for i, a in enumerate(names) if i not in space]
        order = other + space
        data = self.array if order == list(range(len(names))) else View(self.array, order)
        return (data, [self.scale[i] for i in order], [self.translation[i] for i in order],
                "".join(names[i] for i in order))


def _attrs(node) -> dict:
    try:
        return dict(node.attrs)
    except Exception:  # noqa: BLE001 - metadata a library cannot parse is reported by the caller
        return {}


def _ome(attrs: dict) -> tuple[dict, str | None]:
    """The OME-NGFF part of a node's attributes and its version (0.5 nests it under "ome")."""
    if isinstance(attrs.get("ome"), dict):
        ome = attrs["ome"]
        return ome, str(ome.get("version", "0.5"))
    ms = attrs.get("multiscales")
    version = ms[0].get("version") if isinstance(ms, list) and ms and isinstance(ms[0], dict) else None
    return attrs, version


def open_node(path: Path):
    """``zarr.open`` of a path, with the messages a person needs (a Zarr v3 store under zarr 2)."""
    import zarr

    path = Path(path)
    if zarr_major() < 3 and (path / "zarr.json").is_file():
        raise InputError(f"{path}: is a Zarr v3 store (OME-Zarr 0.5); this environment has zarr {zarr.__version__}, "
                         "which reads Zarr v2 only - run this stage in an environment with zarr >= 3.1 (the core "
                         "environment), or write the store as OME-Zarr 0.4")
    return zarr.open(str(path), mode="r")


def _is_array(node) -> bool:
    return hasattr(node, "shape") and hasattr(node, "dtype") and not hasattr(node, "group_keys")


def open_image(path, level: int = 0) -> Image:
    """The ``level`` of the image at ``path`` (see the module docstring).

    ``path`` may be a store holding one array, an OME-Zarr image or label image (0.4 or 0.5),
    a bioformats2raw store (its first series; ``store.zarr/N`` for series N), or an array
    inside an OME-Zarr image (``image.zarr/1``: that level, with its geometry).
    """
    path = Path(path)
    node = open_node(path)
    if _is_array(node):
        parent = _parent_multiscale(path)
        if parent is not None:
            group, ms, version, index = parent
            if level:
                raise InputError(f"{path}: level={level!r}, but the path names one level ({index}) of its image; "
                                 f"point at the image {path.parent} to choose a level")
            return _level(path.parent, group, ms, version, index)
        if level:
            raise InputError(f"{path}: level={level!r}, but a Zarr array holds one level")
        attrs = _attrs(node)
        nd = len(node.shape)
        return Image(node, _default_axes(nd), [float(v) for v in attrs.get("voxel_size", [1.0] * nd)],
                     [float(v) for v in attrs.get("origin", [0.0] * nd)], attrs.get("unit"), attrs=attrs)
    ome, version = _ome(_attrs(node))
    if "bioformats2raw.layout" in ome or "bioformats2raw.layout" in _attrs(node):
        series = sorted((k for k in node.group_keys() if k.isdigit()), key=int)
        if not series:
            raise InputError(f"{path}: a bioformats2raw store without a series group ('0', '1', ...)")
        return open_image(path / series[0], level)
    ms = ome.get("multiscales")
    if ms:
        return _level(path, node, ms, version, level)
    if "0" in node and _is_array(node["0"]):
        arr = node["0"]
        nd = len(arr.shape)
        return Image(arr, _default_axes(nd), [1.0] * nd, [0.0] * nd, None, attrs=_attrs(node))
    members = sorted(node.keys())[:10]
    raise InputError(f"{path}: a Zarr group without OME-NGFF 'multiscales' metadata or an array '0' (it holds "
                     f"{', '.join(members) or 'nothing'}); point at the image or the array to read")


def _default_axes(nd: int) -> list[str]:
    return (["t", "c", "z", "y", "x"] if nd == 5 else ["c", "z", "y", "x"] if nd == 4 else list("zyx"[-nd:]))


def _parent_multiscale(path: Path):
    """(group, multiscales, version, level) when ``path`` is a level array of an OME-Zarr image."""
    parent = path.parent
    if not any((parent / m).is_file() for m in (".zattrs", "zarr.json", ".zgroup")):
        return None
    try:
        group = open_node(parent)
    except Exception:  # noqa: BLE001 - not a group: the array is read on its own
        return None
    ome, version = _ome(_attrs(group))
    ms = ome.get("multiscales")
    if not ms:
        return None
    paths = [d.get("path") for d in ms[0].get("datasets", [])]
    return (group, ms, version, paths.index(path.name)) if path.name in paths else None


def _level(path: Path, group, ms, version, level) -> Image:
    datasets = ms[0].get("datasets", [])
    if not datasets:
        raise InputError(f"{path}: its OME-NGFF multiscales list no dataset")
    if not isinstance(level, (int, np.integer)) or not 0 <= level < len(datasets):
        raise InputError(f"{path}: level={level!r}, but the image has levels 0..{len(datasets) - 1} "
                         f"({', '.join(d.get('path', '?') for d in datasets)})")
    ds = datasets[int(level)]
    try:
        arr = group[ds["path"]]
    except KeyError:
        raise InputError(f"{path}: level {level} names the array {ds['path']!r}, which the store does not hold") from None
    nd = len(arr.shape)
    axes_meta = ms[0].get("axes") or _default_axes(nd)
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes_meta]
    if len(names) != nd:
        raise InputError(f"{path}: {len(names)} axes {names} in the metadata but level {level} has {nd} dimensions")
    scale, trans = [1.0] * nd, [0.0] * nd
    # NGFF: the dataset's transformations apply first, then the multiscale-wide ones.
    for tr in ds.get("coordinateTransformations", []) + ms[0].get("coordinateTransformations", []):
        if tr.get("type") == "scale":
            scale, trans = _compose(scale, trans, tr["scale"], None, path)
        elif tr.get("type") == "translation":
            scale, trans = _compose(scale, trans, None, tr["translation"], path)
    space = [a for a in axes_meta if isinstance(a, dict) and a.get("type") == "space"]
    unit = space[0].get("unit") if space else None
    return Image(arr, names, scale, trans, unit, int(level), len(datasets), version, attrs=_attrs(group))


def _compose(scale, trans, s, t, path):
    n = len(scale)
    if s is not None:
        if len(s) != n:
            raise InputError(f"{path}: a scale of {len(s)} values for {n} axes")
        return [a * float(b) for a, b in zip(scale, s)], [a * float(b) for a, b in zip(trans, s)]
    if len(t) != n:
        raise InputError(f"{path}: a translation of {len(t)} values for {n} axes")
    return scale, [a + float(b) for a, b in zip(trans, t)]


# ----------------------------------------------------------------------------- writing


def deterministic_blosc() -> None:
    """Blosc's own threads write a chunk's blocks in whatever order they finish, so the same array
    would give different bytes on every write; with them off it gives the same bytes every time."""
    from numcodecs import blosc as _blosc

    _blosc.use_threads = False


def blosc(dtype, version: str):
    """The deterministic Blosc/zstd compressor of every store maskworks writes, as the Zarr format
    of ``version`` wants it (a numcodecs codec for Zarr v2, zarr's own codec for v3)."""
    deterministic_blosc()
    bitshuffle = np.dtype(dtype).itemsize == 1
    if version == "0.5":
        from zarr.codecs import BloscCodec

        return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle" if bitshuffle else "shuffle")
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE if bitshuffle else Blosc.SHUFFLE)


def create_group(path: Path, version: str):
    import zarr

    if zarr_major() >= 3:
        return zarr.open_group(str(path), mode="w", zarr_format=3 if version == "0.5" else 2)
    return zarr.open_group(str(path), mode="w")


def space_names(nd: int) -> list[str]:
    return list("zyx"[-nd:]) if nd <= 3 else [f"dim_{i}" for i in range(nd)]


def create_array(group, name: str, shape, chunks, dtype, version: str):
    """An empty array in ``group`` whose all-fill chunks are never stored (a Zarr v3 array names its
    dimensions, as OME-Zarr 0.5 requires)."""
    dtype = np.dtype(dtype)
    if zarr_major() >= 3:
        codec = blosc(dtype, version)
        kw = {"compressors": [codec], "dimension_names": space_names(len(shape))} if version == "0.5" \
            else {"compressors": codec}
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                                  config={"write_empty_chunks": False}, **kw)
    return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                                compressor=blosc(dtype, version), write_empty_chunks=False)


def scratch_array(shape, chunks, dtype):
    """A compressed array in memory (working storage of out-of-core steps)."""
    import zarr

    if zarr_major() >= 3:
        store = zarr.storage.MemoryStore()
        return zarr.create_array(store, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                                 compressors=[blosc(np.uint8, "0.5")], config={"write_empty_chunks": False})
    return zarr.zeros(shape, chunks=chunks, dtype=dtype, compressor=blosc(np.uint8, "0.4"), store=zarr.MemoryStore())


def pyramid_factors(shape, voxel_size) -> list[tuple[int, ...]]:
    """Downsampling factors from each level to the next: 2 along the axes whose voxels are at most
    twice the finest (an anisotropic z is not thinned until x and y have caught up), until every
    side is at most ``PYRAMID_MIN``."""
    shape, vs = list(shape), list(voxel_size)
    out = []
    while max(shape) > PYRAMID_MIN:
        finest = min(vs)
        f = tuple(2 if s > 1 and v <= 2 * finest else 1 for s, v in zip(shape, vs))
        if all(k == 1 for k in f):
            break
        out.append(f)
        shape = [-(-s // k) for s, k in zip(shape, f)]
        vs = [v * k for v, k in zip(vs, f)]
    return out


def _downsample(block: np.ndarray, factors, labels: bool) -> np.ndarray:
    if labels:  # nearest: the first voxel of each group, so a level's voxel centres lie on level 0's
        return block[tuple(slice(None, None, f) for f in factors)]
    pad = [(0, (-s) % f) for s, f in zip(block.shape, factors)]
    data = np.pad(block.astype(np.float32), pad, mode="edge") if any(p for _, p in pad) else block.astype(np.float32)
    shape = []
    for s, f in zip(data.shape, factors):
        shape += [s // f, f]
    mean = data.reshape(shape).mean(axis=tuple(range(1, 2 * len(factors), 2)))
    return (np.rint(mean) if block.dtype.kind in "iub" else mean).astype(block.dtype)  # rounded, not truncated


def build_pyramid(group, base, voxel_size, version: str, labels: bool, chunks, factors=None) -> list[tuple]:
    """Levels 1, 2, ... of ``group`` from its array ``base``, each made block by block from the
    level above (at most a block of chunks in memory); ``factors``: each level's downsampling from
    the one above (default :func:`pyramid_factors`).  Returns ``[(path, factors from level 0)]``."""
    from .volumes import iter_chunk_slices

    levels = []
    prev, total = base, (1,) * len(base.shape)
    for i, f in enumerate(pyramid_factors(base.shape, voxel_size) if factors is None else factors, start=1):
        shape = tuple(-(-s // k) for s, k in zip(prev.shape, f))
        cur = create_array(group, str(i), shape, tuple(min(c, s) for c, s in zip(chunks, shape)), prev.dtype, version)
        step = tuple(max(1, c) for c in cur.chunks)
        for sl in iter_chunk_slices(shape, step):
            src = tuple(slice(s.start * k, min(s.stop * k, n)) for s, k, n in zip(sl, f, prev.shape))
            block = _downsample(np.asarray(prev[src]), f, labels)
            cur[sl] = block[tuple(slice(0, s.stop - s.start) for s in sl)]
        total = tuple(a * b for a, b in zip(total, f))
        levels.append((str(i), total))
        prev = cur
    return levels


def finish_image(group, base, *, voxel_size, origin, unit, version: str, labels: bool, chunks,
                 provenance: dict | None = None, colours: dict | None = None, source: str | None = None,
                 factors=None) -> None:
    """Write the pyramid of ``group``'s level-0 array ``base`` and the OME-NGFF metadata: the
    multiscales (axes with their unit, each level's scale and translation) and, for labels,
    ``image-label`` with ``colours`` (value -> RGBA; None: :data:`LABEL_COLOURS` of masks and
    training labels; ``{}``: none, for instance labels) and the ``source`` image (``"../../"``
    for a label image inside the ``labels/`` of its image)."""
    nd = len(base.shape)
    names = space_names(nd)
    axes = [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in names]
    levels = [("0", (1,) * nd)] + build_pyramid(group, base, voxel_size, version, labels, chunks, factors)
    datasets = []
    for path, f in levels:
        scale = [float(v) * k for v, k in zip(voxel_size, f)]
        trans = [float(o) + (0.0 if labels else (k - 1) * float(v) / 2) for o, v, k in zip(origin, voxel_size, f)]
        transforms = [{"type": "scale", "scale": scale}]
        if any(t != 0 for t in trans):
            transforms.append({"type": "translation", "translation": trans})
        datasets.append({"path": path, "coordinateTransformations": transforms})
    # no "name": viewers show the store's own name, and the bytes do not depend on where it is written
    multiscale = {"axes": axes, "datasets": datasets}
    ome: dict = {"multiscales": [multiscale]}
    if labels:
        label: dict = {}
        if colours is None:  # a mask or training labels: 0 background, 1 foreground, 2 ignore
            label["colors"] = [{"label-value": k, "rgba": v} for k, v in sorted(LABEL_COLOURS.items())]
            label["properties"] = [{"label-value": k, "name": LABEL_NAMES[k]} for k in sorted(LABEL_NAMES)]
        elif colours:
            label["colors"] = [{"label-value": int(k), "rgba": list(v)} for k, v in sorted(colours.items())]
        if source:
            label["source"] = {"image": source}
        ome["image-label"] = label
    if version == "0.5":
        attrs = {"ome": {"version": "0.5", **ome}}
    else:
        multiscale["version"] = "0.4"
        attrs = dict(ome)
        if labels:
            attrs["image-label"] = {"version": "0.4", **ome["image-label"]}
    if provenance:
        attrs["maskworks"] = provenance
    group.attrs.update(json.loads(json.dumps(attrs)))


@dataclass
class LabelGroup:
    """The ``labels`` group of an OME-Zarr image that an output is written into (``image.zarr/labels/
    <name>``): the image's version, the group's metadata files (transaction targets) and the update
    that lists ``name`` in it."""

    image: Path
    name: str
    version: str

    @property
    def folder(self) -> Path:
        return self.image / "labels"

    @property
    def files(self) -> list[Path]:
        return [self.folder / "zarr.json"] if self.version == "0.5" else [self.folder / ".zgroup", self.folder / ".zattrs"]

    def pyramid(self) -> list[tuple[int, ...]]:
        """The image's downsampling from each level to the next (a label image has the same levels)."""
        ms = _ome(_attrs(open_node(self.image)))[0]["multiscales"][0]
        scales = []
        for ds in ms["datasets"]:
            s = next((t["scale"] for t in ds.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
            scales.append(s)
        if any(s is None for s in scales):
            return []
        names = [(a["name"] if isinstance(a, dict) else a).lower() for a in ms.get("axes", [])] or \
            _default_axes(len(scales[0]))
        zyx = [names.index(a) for a in SPACE_AXES if a in names]  # the label image is written z, y, x
        return [tuple(max(1, round(s1[i] / s0[i])) for i in zyx) for s0, s1 in zip(scales, scales[1:])]

    def register(self) -> None:
        """Write the labels group's metadata with ``name`` listed (kept in order, written atomically
        with the rest of the stage's outputs)."""
        from .outputs import atomic_path

        old = {}
        for meta in self.files:
            try:
                old[meta.name] = json.loads(meta.read_text())
            except (OSError, ValueError):
                old[meta.name] = {}
        if self.version == "0.5":
            doc = old["zarr.json"] or {"zarr_format": 3, "node_type": "group"}
            attrs = doc.setdefault("attributes", {})
            ome = attrs.setdefault("ome", {"version": "0.5"})
            texts = {"zarr.json": doc}
        else:
            attrs = old[".zattrs"]
            ome = attrs
            texts = {".zgroup": old[".zgroup"] or {"zarr_format": 2}, ".zattrs": attrs}
        listed = list(ome.get("labels", []))
        if self.name not in listed:
            listed.append(self.name)
        ome["labels"] = listed
        for meta in self.files:
            with atomic_path(meta) as tmp:
                tmp.write_text(json.dumps(texts[meta.name], indent=2) + "\n")


def label_group(output) -> LabelGroup | None:
    """The :class:`LabelGroup` when ``output`` is ``<image>.zarr/labels/<name>`` of an OME-Zarr image."""
    p = Path(output)
    image = p.parent.parent
    if p.parent.name != "labels" or not image.is_dir():
        return None
    try:
        node = open_node(image)
    except Exception:  # noqa: BLE001 - not a Zarr image: an ordinary folder called labels
        return None
    ome, _ = _ome(_attrs(node))
    if not ome.get("multiscales"):
        return None
    version = "0.5" if (image / "zarr.json").is_file() else "0.4"
    return LabelGroup(image, p.name, check_version(version))
