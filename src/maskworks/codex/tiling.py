"""Multichannel image -> two-channel model input, patch grid, per-patch QC and whole-slide stitching."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskworks.io import InputError

SPLIT_MODES = ("full_image", "halves", "quarters", "patches")

# A source image up to this many bytes (all its channels) is read into memory whole.
# Above it, it is read lazily: memory-mapped when its data are uncompressed and contiguous
# (a patch touches only its own pixels), else one compressed page per channel, decoded
# only for the channels used (nuclear and whole-cell), never the others.
IN_MEMORY_BYTES = 2**30

# Header names (case-insensitive, spaces = underscores) recognised in a channel table,
# in order of preference.
CHANNEL_NAME_COLUMNS = (
    "channel_name", "marker_name", "antibody_name", "marker", "antibody", "target", "name", "channel",
)


# ----------------------------------------------------------------------------- channels


def read_channel_names(path) -> list[str]:
    """Channel names, in channel order, from a text or table file.

    Accepted forms
    --------------
    - one name per line (``channels.txt``); blank lines and lines starting with ``#``
      are skipped;
    - a table with a header row, tab-separated (any extension) or comma-separated
      (``.csv``), one row per channel in channel order, like an antibodies TSV
      (``version  channel_id  antibody_name ...``): the names come from the first
      column called one of ``channel_name``, ``marker_name``, ``antibody_name``,
      ``marker``, ``antibody``, ``target``, ``name``, ``channel``
      (case-insensitive);
    - one name per line under a single header word from that list.

    Raises
    ------
    InputError
        Missing or empty file, a table without a recognised name column, or a
        row too short to hold it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: channel names file not found")
    lines = [ln.rstrip("\r\n") for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError(f"{path}: no channel names (expected one per line, or a table with a header)")
    sep = "\t" if "\t" in lines[0] else "," if path.suffix.lower() == ".csv" and "," in lines[0] else None
    if sep is None:
        first = _column_key(lines[0])
        return [ln.strip() for ln in (lines[1:] if first in CHANNEL_NAME_COLUMNS else lines)]
    header = [_column_key(h) for h in lines[0].split(sep)]
    col = next((header.index(c) for c in CHANNEL_NAME_COLUMNS if c in header), None)
    if col is None:
        raise InputError(
            f"{path}: table header {lines[0].split(sep)} has no channel-name column; "
            f"name one of {', '.join(CHANNEL_NAME_COLUMNS)} (or give one name per line)"
        )
    names = []
    for n, ln in enumerate(lines[1:], start=2):
        fields = ln.split(sep)
        if len(fields) <= col:
            raise InputError(f"{path}: line {n} {ln!r} has no column {lines[0].split(sep)[col]!r}")
        names.append(fields[col].strip())
    if not names:
        raise InputError(f"{path}: the table has a header but no rows")
    return names


def _column_key(text: str) -> str:
    return text.strip().strip('"').lower().replace(" ", "_")


def select_channels(names, nuclear_channel, wholecell_channels, *, what="the channel names") -> tuple[int, list[int]]:
    """Indices of the nuclear channel and of the whole-cell channel(s) by name.

    Names match exactly, else case-insensitively.  ``wholecell_channels`` is a
    name, a comma-separated string of names or a list.

    Raises
    ------
    InputError
        A name that is missing (the message lists the available names) or that
        occurs more than once.
    """
    names = [str(n) for n in names]
    if isinstance(wholecell_channels, str):
        wholecell_channels = [w for w in wholecell_channels.split(",")]
    wanted = [str(w).strip() for w in (wholecell_channels or []) if str(w).strip()]
    if not wanted:
        raise InputError("wholecell_channels is empty: give at least one whole-cell (membrane) channel name")

    def index(name):
        hits = [i for i, n in enumerate(names) if n == name]
        if not hits:
            hits = [i for i, n in enumerate(names) if n.lower() == name.lower()]
        if not hits:
            raise InputError(f"channel {name!r} not found in {what}; available: {', '.join(names)}")
        if len(hits) > 1:
            raise InputError(f"channel {name!r} occurs {len(hits)} times in {what} (channels {hits}); "
                             "names must be unique to select by name")
        return hits[0]

    return index(str(nuclear_channel).strip()), [index(w) for w in wanted]


@dataclass
class MultichannelImage:
    """A (channels, y, x) view of a multichannel TIFF, read whole or lazily.

    ``data`` is the series as stored (NumPy array when read into memory, a Zarr
    array over the TIFF otherwise); ``channel_axis``, ``y_axis`` and ``x_axis``
    index its axes (``channel_axis`` None: a single-channel image).
    """

    data: object
    axes: str
    channel_axis: int | None
    y_axis: int
    x_axis: int
    path: Path | None = None
    channel_names: list | None = None  # from OME-XML, when the file has them
    mpp: float | None = None  # microns per pixel (x), when the file says
    _handle: object = None

    @property
    def n_channels(self) -> int:
        return 1 if self.channel_axis is None else int(self.data.shape[self.channel_axis])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.shape[self.y_axis]), int(self.data.shape[self.x_axis])

    @property
    def lazy(self) -> bool:
        return isinstance(self.data, (np.memmap, _ChannelPages))

    def region(self, channel: int, ys: slice, xs: slice) -> np.ndarray:
        """One channel's (y, x) region as a NumPy array (reads only what it needs when lazy)."""
        if isinstance(self.data, _ChannelPages):
            return self.data.plane(int(channel))[ys, xs]
        idx = [slice(None)] * len(self.data.shape)
        idx[self.y_axis], idx[self.x_axis] = ys, xs
        if self.channel_axis is not None:
            idx[self.channel_axis] = int(channel)
        out = np.asarray(self.data[tuple(idx)])
        return out.T if self.x_axis < self.y_axis else out

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ChannelPages:
    """A (channels, y, x) TIFF stored one compressed page per channel: a channel's plane is
    decoded when first asked for and kept, so that the unused channels are never read."""

    def __init__(self, pages, shape, dtype):
        self.pages, self.shape, self.dtype = pages, tuple(shape), np.dtype(dtype)
        self._planes: dict[int, np.ndarray] = {}

    def plane(self, channel: int) -> np.ndarray:
        if channel not in self._planes:
            self._planes[channel] = self.pages[channel].asarray()
        return self._planes[channel]


def open_multichannel(path, *, channel_axis=None, lazy=None) -> MultichannelImage:
    """Open a multichannel TIFF/OME-TIFF as (channels, y, x).

    Parameters
    ----------
    path : str or Path
        TIFF or OME-TIFF (pyramids: the full-resolution level is used).
    channel_axis : int or str, optional
        The channel axis, as an index into the file's series axes or as its
        tifffile axis letter (``"C"``, ``"Q"``, ``"I"``, ``"S"``, ...).  Default:
        the only axis other than Y and X of length > 1 (length-1 axes are
        squeezed); none means a single-channel image.
    lazy : bool, optional
        Read lazily instead of into memory: memory-mapped when the data are
        uncompressed and contiguous, else (one compressed page per channel) a
        channel's plane is decoded when first used.  Other layouts are read
        whole.  Default: lazily when the series holds more than
        ``IN_MEMORY_BYTES`` bytes.

    Returns
    -------
    MultichannelImage
        Close it (or use it as a context manager) when lazy.
    """
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    try:
        tif = tifffile.TiffFile(str(path))
    except Exception as exc:
        raise InputError(f"{path}: cannot be read as TIFF ({type(exc).__name__}: {exc})") from exc
    try:
        series = tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        if "Y" not in axes or "X" not in axes:
            raise InputError(f"{path}: series axes {axes!r} (shape {shape}) have no Y and X")
        cax = _channel_axis(path, axes, shape, channel_axis)
        nbytes = int(np.prod(shape)) * np.dtype(series.dtype).itemsize
        lazy = nbytes > IN_MEMORY_BYTES if lazy is None else bool(lazy)
        names, mpp = _ome_channels(tif.ome_metadata, axes, shape, cax)
        if mpp is None:
            mpp = _tiff_mpp(tif)
        data, handle = (_lazy_data(path, series, axes, shape, cax) if lazy else None), None
        if data is None:
            data = series.asarray(level=0) if len(series.levels) > 1 else series.asarray()
        if isinstance(data, _ChannelPages):
            handle = tif
        else:
            tif.close()
    except BaseException:
        tif.close()
        raise
    if any(s < 1 for s in data.shape):
        raise InputError(f"{path}: empty image of shape {tuple(data.shape)}")
    return MultichannelImage(data, axes, cax, axes.index("Y"), axes.index("X"), path, names, mpp, handle)


def _lazy_data(path, series, axes, shape, cax):
    """A memory map or per-channel page reader of the series, or None (then it is read whole)."""
    import logging

    import tifffile

    try:
        mm = tifffile.memmap(str(path), mode="r", series=0, level=0)
        return mm.reshape(shape) if tuple(mm.shape) != tuple(shape) else mm
    except (ValueError, OSError):
        pass
    pages = series.levels[0].pages if len(series.levels) > 1 else series.pages
    if (cax == 0 and len(shape) == 3 and axes[1:] == "YX" and len(pages) == shape[0]
            and all(p is not None and tuple(p.shape) == tuple(shape[1:]) for p in pages)):
        return _ChannelPages(pages, shape, series.dtype)
    logging.getLogger("maskworks").warning(
        "%s: compressed, and not one page per channel (axes %s): read whole", path, axes)
    return None


def _channel_axis(path, axes: str, shape, channel_axis):
    if channel_axis not in (None, ""):
        if isinstance(channel_axis, str) and not channel_axis.lstrip("-").isdigit():
            if channel_axis.upper() not in axes:
                raise InputError(f"{path}: channel_axis={channel_axis!r} is not one of the series axes {axes!r}")
            cax = axes.index(channel_axis.upper())
        else:
            cax = int(channel_axis)
            if not -len(axes) <= cax < len(axes):
                raise InputError(f"{path}: channel_axis={channel_axis} is out of range for axes {axes!r}")
            cax %= len(axes)
        if axes[cax] in "YX":
            raise InputError(f"{path}: channel_axis={channel_axis!r} names the {axes[cax]} axis")
        rest = [a for i, a in enumerate(axes) if i != cax and a not in "YX" and shape[i] > 1]
        if rest:
            raise InputError(f"{path}: axes {axes!r} shape {shape}: besides the channel axis, "
                             f"{rest} have more than one plane; give a 2-D multichannel image")
        return cax
    others = [i for i, a in enumerate(axes) if a not in "YX" and shape[i] > 1]
    if len(others) > 1:
        raise InputError(f"{path}: axes {axes!r} shape {shape} have several non-spatial axes; "
                         "set channel_axis (an index or a letter such as 'C')")
    return others[0] if others else None


def _ome_channels(xml, axes, shape, cax):
    """Channel names and PhysicalSizeX (in µm) from OME-XML, when present and consistent."""
    if not xml:
        return None, None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None, None
    names = [ch.get("Name") for ch in pixels if ch.tag.endswith("Channel")]
    n = 1 if cax is None else shape[cax]
    names = names if len(names) == n and all(names) else None
    mpp = None
    size, unit = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "µm")
    if size:
        factor = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
        mpp = float(size) * factor if factor else None
    return names, mpp


def _tiff_mpp(tif):
    """Microns per pixel from the TIFF resolution tags, when the unit is centimetre or inch."""
    page = tif.pages[0]
    res, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if res is None or unit is None or res.value[0] <= 0:
        return None
    per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre in µm
    return per_unit * res.value[1] / res.value[0] if per_unit else None


def model_input(image: MultichannelImage, nuclear: int, wholecell, ys=slice(None), xs=slice(None)) -> np.ndarray:
    """The (y, x, 2) model input of a region: channel 0 the nuclear channel, channel 1
    the pixel-wise maximum of the whole-cell channels (the image's dtype)."""
    nuc = image.region(nuclear, ys, xs)
    out = np.empty(nuc.shape + (2,), dtype=nuc.dtype)
    out[..., 0] = nuc
    out[..., 1] = image.region(wholecell[0], ys, xs)
    for c in wholecell[1:]:
        np.maximum(out[..., 1], image.region(c, ys, xs), out=out[..., 1])
    return out


# ----------------------------------------------------------------------------- patch grid


@dataclass(frozen=True)
class PatchGrid:
    """Overlapping patches of one size on a regular grid, row-major ids.

    Patch ``(row, col)`` covers ``[row * step_y, row * step_y + patch_height)`` ×
    ``[col * step_x, ...)``; the image is padded bottom/right with zeros to
    ``padded_shape``.
    """

    image_shape: tuple[int, int]
    patch_shape: tuple[int, int]
    step: tuple[int, int]
    grid_shape: tuple[int, int]
    split_mode: str = "patches"
    overlap: float = 0.0

    @property
    def n_patches(self) -> int:
        return self.grid_shape[0] * self.grid_shape[1]

    @property
    def padded_shape(self) -> tuple[int, int]:
        return tuple(p + (n - 1) * s for p, n, s in zip(self.patch_shape, self.grid_shape, self.step))

    def position(self, patch_id: int) -> tuple[int, int, int, int]:
        """(row, col, y_start, x_start) of a patch."""
        if not 0 <= patch_id < self.n_patches:
            raise InputError(f"patch_id {patch_id} is outside the grid of {self.n_patches} patches")
        row, col = divmod(int(patch_id), self.grid_shape[1])
        return row, col, row * self.step[0], col * self.step[1]

    def valid_shape(self, patch_id: int) -> tuple[int, int]:
        """Height and width of the part of a patch that lies inside the image."""
        _, _, y0, x0 = self.position(patch_id)
        return (min(self.patch_shape[0], self.image_shape[0] - y0), min(self.patch_shape[1], self.image_shape[1] - x0))

    def core(self, patch_id: int) -> tuple[int, int, int, int]:
        """The patch's core ``(y_lo, y_hi, x_lo, x_hi)`` in image coordinates (half-open).

        Along each axis, with overlap ``o = patch size - step``, neighbouring patches
        split their shared band at its middle: patch ``i`` (start ``s_i``) owns
        ``[s_i + o // 2, s_(i+1) + o // 2)``; the first patch's core starts at 0 and
        the last one's ends at the image edge.  The cores partition the image, and
        a core lies at least ``o // 2`` pixels inside its patch on every side with
        a neighbour.
        """
        row, col, y0, x0 = self.position(patch_id)
        y = _core_1d(row, self.grid_shape[0], y0, self.step[0], self.patch_shape[0], self.image_shape[0])
        x = _core_1d(col, self.grid_shape[1], x0, self.step[1], self.patch_shape[1], self.image_shape[1])
        return y + x

    def inner_edges(self, patch_id: int) -> tuple[bool, bool, bool, bool]:
        """Which patch sides (top, bottom, left, right) face a neighbour (rather than the image edge)."""
        row, col, _, _ = self.position(patch_id)
        ny, nx = self.grid_shape
        return row > 0, row < ny - 1, col > 0, col < nx - 1

    def to_attrs(self) -> dict:
        return {"image_shape": list(self.image_shape), "patch_shape": list(self.patch_shape),
                "step": list(self.step), "grid_shape": list(self.grid_shape),
                "split_mode": self.split_mode, "overlap": self.overlap}

    @classmethod
    def from_attrs(cls, attrs) -> PatchGrid:
        try:
            return cls(tuple(attrs["image_shape"]), tuple(attrs["patch_shape"]), tuple(attrs["step"]),
                       tuple(attrs["grid_shape"]), attrs.get("split_mode", "patches"),
                       float(attrs.get("overlap", 0.0)))
        except (KeyError, TypeError) as exc:
            raise InputError(f"patch grid attributes {dict(attrs)} are incomplete ({exc})") from None


def _core_1d(i, n, start, step, size, length):
    half = (size - step) // 2
    lo = 0 if i == 0 else start + half
    hi = length if i == n - 1 else start + step + half
    return lo, hi


def _axis_plan(length: int, size: int | None, n: int | None, overlap: float) -> tuple[int, int, int]:
    """(patch size, step, count) along one axis.

    With ``size`` given: step = size - int(size * overlap), count = the fewest
    patches that cover ``length``.  With ``n`` given: the smallest size whose ``n``
    patches cover ``length``.
    """
    if size is not None:
        step = size - int(size * overlap)
        count = 1 + max(0, math.ceil((length - size) / step))
        return size, step, count
    size = max(1, math.ceil(length / n))
    while size + (n - 1) * (size - int(size * overlap)) < length:
        size += 1
    return size, size - int(size * overlap), n


def patch_grid(image_shape, *, split_mode="patches", patch_height=1440, patch_width=1920, overlap=0.1) -> PatchGrid:
    """The patch grid of an image.

    Parameters
    ----------
    image_shape : (int, int)
        (height, width) of the image.
    split_mode : {"patches", "full_image", "halves", "quarters"}
        ``patches``: ``patch_height`` × ``patch_width`` patches, step = size -
        int(size × overlap) per axis, as many as cover the image.  ``full_image``:
        one patch, the image itself (no padding).  ``halves``: two patches along
        the longer axis (the width when equal); ``quarters``: 2 × 2.  Halves and
        quarters overlap by the same fraction (so that stitching can take cells
        on the seam whole from one side): their size is the smallest that covers
        the image with that overlap.
    patch_height, patch_width : int
        Patch size in ``patches`` mode.
    overlap : float
        Fraction of the patch size shared with the next patch, in [0, 1).

    Returns
    -------
    PatchGrid
        The image is padded bottom/right by ``padded_shape - image_shape``: the
        least that makes the grid cover it (0 for ``full_image``).
    """
    h, w = (int(s) for s in image_shape)
    if h < 1 or w < 1:
        raise InputError(f"image_shape={tuple(image_shape)}: the image is empty")
    if split_mode not in SPLIT_MODES:
        raise InputError(f"split_mode={split_mode!r}: expected one of {', '.join(SPLIT_MODES)}")
    if not 0.0 <= float(overlap) < 1.0:
        raise InputError(f"overlap={overlap!r}: expected a fraction of the patch size in [0, 1)")
    overlap = float(overlap)
    if split_mode == "full_image":
        return PatchGrid((h, w), (h, w), (h, w), (1, 1), split_mode, 0.0)
    if split_mode == "patches":
        for name, v in (("patch_height", patch_height), ("patch_width", patch_width)):
            if int(v) != v or v < 1:
                raise InputError(f"{name}={v!r}: expected a whole number of pixels >= 1")
        ay = _axis_plan(h, int(patch_height), None, overlap)
        ax = _axis_plan(w, int(patch_width), None, overlap)
    else:
        ny, nx = (2, 2) if split_mode == "quarters" else (1, 2) if w >= h else (2, 1)
        ay = _axis_plan(h, None, ny, overlap)
        ax = _axis_plan(w, None, nx, overlap)
    return PatchGrid((h, w), (ay[0], ax[0]), (ay[1], ax[1]), (ay[2], ax[2]), split_mode, overlap)


def read_patch(image: MultichannelImage, grid: PatchGrid, patch_id: int, nuclear: int, wholecell) -> np.ndarray:
    """Model input of one patch, (patch_height, patch_width, 2), zero-padded beyond the image."""
    _, _, y0, x0 = grid.position(patch_id)
    vh, vw = grid.valid_shape(patch_id)
    region = model_input(image, nuclear, wholecell, slice(y0, y0 + vh), slice(x0, x0 + vw))
    if (vh, vw) == tuple(grid.patch_shape):
        return region
    out = np.zeros(tuple(grid.patch_shape) + (2,), dtype=region.dtype)
    out[:vh, :vw] = region
    return out


# ----------------------------------------------------------------------------- QC


def patch_qc(patch, *, non_zero_perc_threshold=0.05, mean_intensity_threshold=1.0) -> dict:
    """Intensity statistics of a patch and whether it is worth segmenting.

    Parameters
    ----------
    patch : array-like, shape (h, w, 2)
        Model input: channel 0 nuclear, channel 1 whole-cell (padding included).
    non_zero_perc_threshold : float
        A patch whose nuclear channel has a smaller *fraction* (not percent) of
        non-zero pixels is empty.
    mean_intensity_threshold : float
        A patch whose nuclear channel has a smaller mean (in the image's units)
        is noisy.

    Returns
    -------
    dict
        ``nuclear_mean``, ``nuclear_std``, ``nuclear_non_zero_fraction`` and the
        same three for ``wholecell``; ``is_empty``, ``is_noisy`` and
        ``is_informative`` (neither empty nor noisy).

    Notes
    -----
    The same tests as Aegle's informative-patch QC ("Phase B"), on the nuclear
    channel.
    """
    patch = np.asarray(patch)
    if patch.ndim != 3 or patch.shape[-1] != 2:
        raise InputError(f"patch_qc: expected a (h, w, 2) patch, got shape {patch.shape}")
    out = {}
    for c, name in enumerate(("nuclear", "wholecell")):
        ch = patch[..., c]
        out[f"{name}_mean"] = float(ch.mean(dtype=np.float64)) if ch.size else 0.0
        out[f"{name}_std"] = float(ch.std(dtype=np.float64)) if ch.size else 0.0
        out[f"{name}_non_zero_fraction"] = float(np.count_nonzero(ch) / ch.size) if ch.size else 0.0
    empty = out["nuclear_non_zero_fraction"] < non_zero_perc_threshold
    noisy = out["nuclear_mean"] < mean_intensity_threshold
    out.update(is_empty=bool(empty), is_noisy=bool(noisy), is_informative=bool(not empty and not noisy))
    return out


# ----------------------------------------------------------------------------- stitching


def stitch_patches(grid: PatchGrid, patch_ids, load, *, out=None, duplicate_overlap=0.5, progress=None):
    """Assemble per-patch cell/nucleus labels into whole-slide labels with unique ids.

    Parameters
    ----------
    grid : PatchGrid
        The grid the patches were cut on.
    patch_ids : iterable of int
        The patches that have results (e.g. the informative ones).
    load : callable
        ``load(patch_id) -> (cell, nucleus)``: the patch's instance labels, each
        (patch_height, patch_width); nucleus ``k`` belongs to cell ``k`` (as
        :func:`maskworks.codex.repair.repair_masks` writes them).  Called up to
        three times per patch.
    out : dict, optional
        ``cell``, ``nucleus``, ``cytoplasm``: zero-filled uint32 array-likes of
        ``grid.image_shape`` to write into (e.g. Zarr arrays, for slides that do
        not fit in memory); each patch's region is read and written once per pass.
        Default: NumPy arrays.
    duplicate_overlap : float
        An object that would land on already-placed objects for more than this
        fraction of its pixels is the same object seen from another patch and is
        not placed again; below it, it is placed on the free pixels only.
    progress : callable, optional
        Wraps the patch iterator (e.g. ``tqdm``).

    Returns
    -------
    cell, nucleus, cytoplasm : array-like of uint32, ``grid.image_shape``
        Cell ``k`` pairs with nucleus ``k`` and cytoplasm ``k`` (= cell ``k`` minus
        nucleus ``k``); ids 1..n, consecutive.
    table : dict of ndarray
        Per cell: ``id``, ``centroid_y``, ``centroid_x`` (pixels, image
        coordinates), ``cell_area``, ``nucleus_area``, ``cytoplasm_area``,
        ``patch_id`` (where it was taken from).
    stats : dict
        ``cells``, ``from_core``, ``rescued`` (whole in a patch whose core does
        not hold their centroid, because the patch that does holds them cut),
        ``cut_kept`` (cut everywhere: larger than the overlap), ``duplicates``
        (placements skipped as already present), ``patches``.

    Notes
    -----
    Pass 1 takes from every patch the objects that touch none of its inner edges
    (sides facing a neighbour; see :meth:`PatchGrid.inner_edges`) and whose
    centroid lies in its core (:meth:`PatchGrid.core`); as cores partition the
    image, an object of less than ``overlap // 2`` pixels from centroid to rim is
    whole in exactly the patch that takes it.  Pass 2 places whole objects that
    pass 1 left out because the patch whose core holds their centroid sees them
    cut (a cut object's centroid is biased into the patch).  Pass 3 places, from
    the patch whose core holds their centroid, objects cut in every patch.  A
    cell's nucleus and cytoplasm always come from the patch its cell comes from.
    """
    h, w = grid.image_shape
    if out is None:
        out = {k: np.zeros((h, w), np.uint32) for k in ("cell", "nucleus", "cytoplasm")}
    patch_ids = sorted(int(p) for p in patch_ids)
    acc = _Accumulator()
    wrap = progress or (lambda it, **kw: it)
    deferred = []
    for pid in wrap(patch_ids, desc="stitch (core objects)"):
        _place(grid, pid, load, out, acc, "core", duplicate_overlap)
    for pid in wrap(patch_ids, desc="stitch (rescue)"):
        if _place(grid, pid, load, out, acc, "rescue", duplicate_overlap):
            deferred.append(pid)
    for pid in deferred:
        _place(grid, pid, load, out, acc, "cut", duplicate_overlap)
    table = acc.table()
    stats = {"cells": int(table["id"].size), "patches": len(patch_ids), **acc.counts}
    return out["cell"], out["nucleus"], out["cytoplasm"], table, stats


class _Accumulator:
    """Per placed cell: pixel counts and coordinate sums, filled patch by patch."""

    def __init__(self):
        self.parts: list[np.ndarray] = []
        self.next_id = 1
        self.counts = {"from_core": 0, "rescued": 0, "cut_kept": 0, "duplicates": 0}

    def add(self, rows: np.ndarray):
        self.parts.append(rows)

    def table(self) -> dict:
        cols = ("id", "centroid_y", "centroid_x", "cell_area", "nucleus_area", "cytoplasm_area", "patch_id")
        if not self.parts:
            return {c: np.zeros(0, np.float64 if c.startswith("centroid") else np.int64) for c in cols}
        a = np.concatenate(self.parts)
        area = a[:, 1]
        return {"id": a[:, 0].astype(np.int64), "centroid_y": a[:, 3] / area, "centroid_x": a[:, 4] / area,
                "cell_area": area.astype(np.int64), "nucleus_area": a[:, 2].astype(np.int64),
                "cytoplasm_area": (area - a[:, 2]).astype(np.int64), "patch_id": a[:, 5].astype(np.int64)}


def _paired_labels(cell, nucleus):
    """Cell ids made consecutive 1..n, nucleus ids mapped the same way (unpaired nucleus pixels: 0)."""
    cell = np.asarray(cell)
    nucleus = np.asarray(nucleus)
    if cell.dtype.kind not in "iu" or nucleus.dtype.kind not in "iu":
        raise InputError(f"stitch: labels must be integers, got {cell.dtype} and {nucleus.dtype}")
    if cell.size and (cell.min() < 0 or nucleus.min() < 0):
        raise InputError("stitch: labels must not be negative")
    ids = np.unique(cell)
    ids = ids[ids != 0]
    if ids.size == 0:
        return np.zeros(cell.shape, np.int64), np.zeros(cell.shape, np.int64), 0
    if ids[-1] == ids.size:  # already consecutive
        c = cell.astype(np.int64)
        n = np.where(nucleus <= ids.size, nucleus, 0).astype(np.int64)
        return c, n, int(ids.size)
    c = np.searchsorted(ids, cell) + 1
    c[cell == 0] = 0
    pos = np.minimum(np.searchsorted(ids, nucleus), ids.size - 1)
    n = np.where((nucleus != 0) & (ids[pos] == nucleus), pos + 1, 0)
    return c.astype(np.int64), n.astype(np.int64), int(ids.size)


def _place(grid, pid, load, out, acc, mode, duplicate_overlap) -> bool:
    """Place one patch's objects of one pass; in the "rescue" pass, return whether the
    patch still has cut objects in its core that nothing covers (for the "cut" pass)."""
    row, col, y0, x0 = grid.position(pid)
    vh, vw = grid.valid_shape(pid)
    cell, nucleus = load(pid)
    if tuple(np.shape(cell)) != tuple(grid.patch_shape) or tuple(np.shape(nucleus)) != tuple(grid.patch_shape):
        raise InputError(f"patch {pid}: label shapes {np.shape(cell)} and {np.shape(nucleus)} differ from "
                         f"the grid's patch shape {tuple(grid.patch_shape)}")
    cell, nucleus, n = _paired_labels(np.asarray(cell)[:vh, :vw], np.asarray(nucleus)[:vh, :vw])
    if n == 0:
        return False
    flat = cell.ravel()
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    yy, xx = np.indices((vh, vw))
    cy = np.bincount(flat, weights=yy.ravel(), minlength=n + 1) / np.maximum(area, 1) + y0
    cx = np.bincount(flat, weights=xx.ravel(), minlength=n + 1) / np.maximum(area, 1) + x0
    y_lo, y_hi, x_lo, x_hi = grid.core(pid)
    in_core = (cy >= y_lo) & (cy < y_hi) & (cx >= x_lo) & (cx < x_hi)
    cut = np.zeros(n + 1, bool)
    top, bottom, left, right = grid.inner_edges(pid)
    for inner, edge in ((top, cell[0]), (bottom, cell[-1]), (left, cell[:, 0]), (right, cell[:, -1])):
        if inner:
            cut[edge] = True
    present = area > 0
    present[0] = False
    select = {"core": ~cut & in_core, "rescue": ~cut & ~in_core, "cut": cut & in_core}[mode] & present

    region = (slice(y0, y0 + vh), slice(x0, x0 + vw))
    buf = {k: np.array(out[k][region]) for k in ("cell", "nucleus", "cytoplasm")}
    taken = buf["cell"] != 0
    overlap = np.bincount(flat[taken.ravel()], minlength=n + 1)
    duplicate = select & (overlap > duplicate_overlap * area)
    keep = select & ~duplicate
    if mode != "rescue":
        acc.counts["duplicates"] += int(np.count_nonzero(duplicate))
    more_cut = False
    if mode == "rescue":
        # Cut objects in the core that nothing covers yet wait for pass 3.
        more_cut = bool(np.any(cut & in_core & present & (overlap <= duplicate_overlap * area)))
    put = keep[cell] & ~taken
    placed = np.bincount(cell[put], minlength=n + 1)
    keep &= placed > 0
    if not keep.any():
        return more_cut
    new = np.zeros(n + 1, np.int64)
    k = int(np.count_nonzero(keep))
    new[keep] = np.arange(acc.next_id, acc.next_id + k)
    acc.next_id += k
    acc.counts[{"core": "from_core", "rescue": "rescued", "cut": "cut_kept"}[mode]] += k

    lab = new[cell]
    put &= lab > 0
    nuc_put = put & (nucleus == cell)
    cyto_put = put & ~nuc_put
    buf["cell"][put] = lab[put]
    buf["nucleus"][nuc_put] = lab[nuc_put]
    buf["cytoplasm"][cyto_put] = lab[cyto_put]
    for key in ("cell", "nucleus", "cytoplasm"):
        out[key][region] = buf[key]

    ids = cell[put]
    m = n + 1
    rows = np.zeros((k, 6), np.float64)
    sel = np.flatnonzero(keep)
    rows[:, 0] = new[sel]
    rows[:, 1] = np.bincount(ids, minlength=m)[sel]
    rows[:, 2] = np.bincount(cell[nuc_put], minlength=m)[sel]
    rows[:, 3] = np.bincount(ids, weights=yy[put] + y0, minlength=m)[sel]
    rows[:, 4] = np.bincount(ids, weights=xx[put] + x0, minlength=m)[sel]
    rows[:, 5] = pid
    acc.add(rows)
    return more_cut
