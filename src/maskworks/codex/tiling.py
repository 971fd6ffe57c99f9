"""Multichannel slide -> two-channel model input, patch grid and per-patch QC (stitching: :mod:`.stitch`;
the slide reader: :mod:`maskworks.io.slides`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from maskworks.io import InputError
from maskworks.io.slides import (
    MultichannelImage,
    open_multichannel,
    read_channel_names,
    select_channels,
)

__all__ = ["MultichannelImage", "open_multichannel", "read_channel_names", "select_channels"]  # re-exported

SPLIT_MODES = ("full_image", "halves", "quarters", "patches")


WHOLECELL_AGGREGATIONS = ("max", "mean", "sum")
WHOLECELL_NORMALISATIONS = ("none", "minmax", "zscore", "percentile")
NORMALISATION_PERCENTILES = (1.0, 99.8)  # percentile: the low and high percentile of each channel
STATISTICS_ROWS = 1024  # the statistics pass reads a slide this many rows at a time
FLOAT_SAMPLES = 1 << 22  # percentiles of a float (or > 16-bit) channel: from about this many pixels


def model_input_dtype(dtype, aggregation="max", normalisation="none") -> np.dtype:
    """The dtype of :func:`model_input`'s result: the image's for ``max`` and ``mean`` without
    normalisation, float32 for ``sum`` (no overflow) or any normalisation."""
    if normalisation != "none" or aggregation == "sum":
        return np.dtype(np.float32)
    return np.dtype(dtype)


def model_input(image: MultichannelImage, nuclear: int, wholecell, ys=slice(None), xs=slice(None), *,
                aggregation="max", normalisation="none", statistics=None) -> np.ndarray:
    """The (y, x, 2) model input of a region: channel 0 the nuclear channel, channel 1
    the whole-cell channels combined pixel by pixel.

    ``aggregation``: ``max`` (Aegle's maximum projection, default), ``mean``
    (steinbock's; rounded to the image's integer dtype) or ``sum``.
    ``normalisation``: ``none`` (default) or ``minmax``, ``zscore``, ``percentile``:
    each whole-cell channel becomes ``(value - offset) / scale`` before they are
    combined (``percentile``: then clipped to [0, 1]), with the offset and scale of that channel over the whole slide
    (``statistics``, from :func:`wholecell_statistics`; computed here when None,
    which reads the whole channels).  The result is the image's dtype for
    ``max`` and ``mean`` without normalisation, float32 otherwise
    (:func:`model_input_dtype`); the nuclear channel keeps its values.
    """
    if aggregation not in WHOLECELL_AGGREGATIONS:
        raise InputError(f"wholecell_aggregation={aggregation!r}: expected one of {', '.join(WHOLECELL_AGGREGATIONS)}")
    if normalisation not in WHOLECELL_NORMALISATIONS:
        raise InputError(f"wholecell_normalisation={normalisation!r}: expected one of "
                         f"{', '.join(WHOLECELL_NORMALISATIONS)}")
    nuc = image.region(nuclear, ys, xs)
    dtype = model_input_dtype(nuc.dtype, aggregation, normalisation)
    out = np.empty(nuc.shape + (2,), dtype=dtype)
    out[..., 0] = nuc
    if normalisation != "none":
        if statistics is None:
            statistics = wholecell_statistics(image, wholecell, normalisation)
        if len(statistics) != len(wholecell):
            raise InputError(f"{len(statistics)} sets of whole-cell statistics for {len(wholecell)} whole-cell channels")

        def channel(k):
            ch = image.region(wholecell[k], ys, xs).astype(np.float32)
            st = statistics[k]
            ch -= np.float32(st["offset"])
            ch /= np.float32(st["scale"])
            if normalisation == "percentile":
                np.clip(ch, 0.0, 1.0, out=ch)
            return ch
    else:
        def channel(k):
            return image.region(wholecell[k], ys, xs)
    if aggregation == "max" or len(wholecell) == 1 and aggregation != "sum":
        out[..., 1] = channel(0)
        for k in range(1, len(wholecell)):
            np.maximum(out[..., 1], channel(k), out=out[..., 1])
        return out
    acc = np.zeros(nuc.shape, np.float64 if np.dtype(nuc.dtype).itemsize > 2 else np.float32)
    for k in range(len(wholecell)):
        acc += channel(k)
    if aggregation == "mean":
        acc /= len(wholecell)
    out[..., 1] = np.rint(acc) if out.dtype.kind in "iu" else acc
    return out


def wholecell_statistics(image: MultichannelImage, channels, normalisation, *, rows=STATISTICS_ROWS,
                         percentiles=NORMALISATION_PERCENTILES, float_samples=FLOAT_SAMPLES) -> list[dict]:
    """Per-channel statistics of whole-cell channels over the whole slide, read ``rows`` rows at a time.

    Parameters
    ----------
    image : MultichannelImage
    channels : sequence of int
        The channels (indices).
    normalisation : {"minmax", "zscore", "percentile"}
        ``minmax``: minimum and maximum; ``zscore``: mean and (population)
        standard deviation; ``percentile``: the ``percentiles`` (low, high) of
        the channel's values.
    percentiles : (float, float)
        For ``percentile``: exact (``numpy.percentile``'s linear interpolation)
        from a histogram of all pixels for integer channels up to 16 bits, else
        from a regular subsample of about ``float_samples`` pixels.

    Returns
    -------
    list of dict, one per channel
        The statistics (``min``/``max``, ``mean``/``std``, ``low``/``high``) and
        ``offset``, ``scale``: the channel is normalised as ``(value - offset) /
        scale`` (``scale`` 1 where the range or standard deviation is 0: the
        channel is only shifted).

    Notes
    -----
    Per channel over the whole slide, as steinbock's ``--minmax`` and ``--zscore``
    do per image before the channels are aggregated; statistics per patch would
    make neighbouring patches disagree at their seams.
    """
    if normalisation not in WHOLECELL_NORMALISATIONS[1:]:
        raise InputError(f"wholecell_normalisation={normalisation!r}: expected one of "
                         f"{', '.join(WHOLECELL_NORMALISATIONS[1:])}")
    lo_q, hi_q = (float(q) for q in percentiles)
    if not 0 <= lo_q < hi_q <= 100:
        raise InputError(f"percentiles={tuple(percentiles)}: expected 0 <= low < high <= 100")
    h, w = image.shape
    rows = max(1, int(rows))
    dtype = np.dtype(image.data.dtype)
    histogram = normalisation == "percentile" and dtype.kind in "iu" and dtype.itemsize <= 2
    rows = max(1, min(rows, (1 << 22) // max(1, w)))  # int64 temporaries of at most 32 MiB
    step = max(1, math.ceil(h * w / float_samples))
    out = []
    for c in channels:
        n, mean, m2 = 0, 0.0, 0.0
        lo, hi = math.inf, -math.inf
        counts, samples, seen = None, [], 0
        for r0 in range(0, h, rows):
            block = image.region(c, slice(r0, min(r0 + rows, h)), slice(None))
            if dtype.kind == "f" and not np.isfinite(block).all():
                raise InputError(f"NaN/Inf values in channel {c} (rows {r0}..{r0 + block.shape[0]}); fill them "
                                 "before tiling")
            if normalisation == "minmax":
                lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
            elif normalisation == "zscore":  # Chan et al.'s pairwise update of mean and M2
                k = block.size
                bmean = float(block.mean(dtype=np.float64))
                bm2 = float(np.square(block - bmean, dtype=np.float64).sum())
                delta = bmean - mean
                mean += delta * k / (n + k)
                m2 += bm2 + delta * delta * n * k / (n + k)
                n += k
            elif histogram:
                shift = -int(np.iinfo(dtype).min) if dtype.kind == "i" else 0
                b = np.bincount((block.ravel().astype(np.int64) + shift), minlength=1 << (8 * dtype.itemsize))
                counts = b if counts is None else counts + b
            else:
                flat = block.ravel()
                start = (-seen) % step  # every step-th pixel of the slide in reading order
                samples.append(np.asarray(flat[start::step], np.float64))
                seen += flat.size
        if normalisation == "minmax":
            st = {"min": lo, "max": hi, "offset": lo, "scale": hi - lo}
        elif normalisation == "zscore":
            std = math.sqrt(m2 / n) if n else 0.0
            st = {"mean": mean, "std": std, "offset": mean, "scale": std}
        else:
            if histogram:
                shift = -int(np.iinfo(dtype).min) if dtype.kind == "i" else 0
                low, high = (_histogram_percentile(counts, q) - shift for q in (lo_q, hi_q))
            else:
                low, high = (float(v) for v in np.percentile(np.concatenate(samples), [lo_q, hi_q]))
            st = {"low": low, "high": high, "percentiles": [lo_q, hi_q], "exact": bool(histogram),
                  "offset": low, "scale": high - low}
        if not st["scale"] > 0:
            st["scale"] = 1.0
        out.append({k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
                        else v) for k, v in st.items()})
    return out


def _histogram_percentile(counts, q) -> float:
    """``numpy.percentile(values, q)`` (linear interpolation) of the values whose histogram is ``counts``
    (``counts[v]``: how many pixels have value v)."""
    cum = np.cumsum(counts)
    total = int(cum[-1])
    rank = q / 100.0 * (total - 1)
    below = math.floor(rank)
    # the value of the k-th smallest pixel (0-based): the first v whose cumulative count exceeds k
    v0 = int(np.searchsorted(cum, below, side="right"))
    v1 = int(np.searchsorted(cum, min(below + 1, total - 1), side="right"))
    return float(v0 + (rank - below) * (v1 - v0))


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


SPLIT_DIRECTIONS = ("vertical", "horizontal")


def patch_grid(image_shape, *, split_mode="patches", patch_height=1440, patch_width=1920, overlap=None,
               split_direction="vertical") -> PatchGrid:
    """The patch grid of an image.

    Parameters
    ----------
    image_shape : (int, int)
        (height, width) of the image.
    split_mode : {"patches", "full_image", "halves", "quarters"}
        ``patches``: ``patch_height`` × ``patch_width`` patches, step = size -
        int(size × overlap) per axis, as many as cover the image.  ``full_image``:
        one patch, the image itself (no padding).  ``halves`` and ``quarters``
        follow Aegle: halves split at ``w // 2`` (``split_direction`` vertical:
        left and right) or ``h // 2`` (horizontal: top and bottom), quarters at
        both, without overlap.  The patches of a grid have one size, so the
        first half has the size of the second (``w - w // 2``) and, for an odd
        width, one column of context beyond the split; the cores
        (:meth:`PatchGrid.core`) are exactly Aegle's halves.  With an overlap
        given, the halves/quarters are the smallest patches that cover the
        image with that overlap.
    patch_height, patch_width : int
        Patch size in ``patches`` mode.
    overlap : float or None
        Fraction of the patch size shared with the next patch, in [0, 0.75]
        (a step of at least a quarter patch).  None: 0.1 for ``patches``, 0
        for ``halves``/``quarters``.
    split_direction : {"vertical", "horizontal"}
        Which way ``halves`` cuts the image.

    Returns
    -------
    PatchGrid
        The image is padded bottom/right by ``padded_shape - image_shape``: the
        least that makes the grid cover it (0 for ``full_image``, halves and
        quarters without overlap).
    """
    h, w = (int(s) for s in image_shape)
    if h < 1 or w < 1:
        raise InputError(f"image_shape={tuple(image_shape)}: the image is empty")
    if split_mode not in SPLIT_MODES:
        raise InputError(f"split_mode={split_mode!r}: expected one of {', '.join(SPLIT_MODES)}")
    if split_direction not in SPLIT_DIRECTIONS:
        raise InputError(f"split_direction={split_direction!r}: expected one of {', '.join(SPLIT_DIRECTIONS)}")
    if overlap is None:
        overlap = 0.1 if split_mode == "patches" else 0.0
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= float(overlap) <= 0.75:
        raise InputError(f"overlap={overlap!r}: expected a fraction of the patch size in [0, 0.75] "
                         "(a step of at least a quarter of the patch)")
    overlap = float(overlap)
    if split_mode == "full_image":
        return PatchGrid((h, w), (h, w), (h, w), (1, 1), split_mode, 0.0)
    if split_mode == "patches":
        for name, v in (("patch_height", patch_height), ("patch_width", patch_width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer, float)) or int(v) != v or v < 1:
                raise InputError(f"{name}={v!r}: expected a whole number of pixels >= 1")
        ay = _axis_plan(h, int(patch_height), None, overlap)
        ax = _axis_plan(w, int(patch_width), None, overlap)
    else:
        ny, nx = (2, 2) if split_mode == "quarters" else (1, 2) if split_direction == "vertical" else (2, 1)
        if overlap == 0.0:  # Aegle's split: at length // 2
            ay, ax = (_halves(h) if ny == 2 else (h, h, 1)), (_halves(w) if nx == 2 else (w, w, 1))
        else:
            ay = _axis_plan(h, None, ny, overlap)
            ax = _axis_plan(w, None, nx, overlap)
    return PatchGrid((h, w), (ay[0], ax[0]), (ay[1], ax[1]), (ay[2], ax[2]), split_mode, overlap)


def _halves(length: int) -> tuple[int, int, int]:
    """Two patches split at length // 2: (size, step, 2), size = the larger half."""
    if length < 2:
        raise InputError(f"an image side of {length} pixel cannot be split in two")
    return length - length // 2, length // 2, 2


def read_patch(image: MultichannelImage, grid: PatchGrid, patch_id: int, nuclear: int, wholecell, *,
               aggregation="max", normalisation="none", statistics=None) -> np.ndarray:
    """Model input of one patch, (patch_height, patch_width, 2), zero-padded beyond the image."""
    _, _, y0, x0 = grid.position(patch_id)
    vh, vw = grid.valid_shape(patch_id)
    region = model_input(image, nuclear, wholecell, slice(y0, y0 + vh), slice(x0, x0 + vw), aggregation=aggregation,
                         normalisation=normalisation, statistics=statistics)
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
        Aegle's ``patches_metadata.csv`` columns: ``nucleus_mean``,
        ``nucleus_std``, ``nucleus_non_zero_perc`` (a fraction, as in Aegle) and
        the same three for ``wholecell``; ``is_empty``, ``is_noisy``,
        ``is_bad_patch`` (empty or noisy) and ``is_informative`` (not bad).

    Notes
    -----
    The same tests as Aegle's informative-patch QC ("Phase B"), on the nuclear
    channel.  :class:`PatchStats` gives the same numbers block by block.
    """
    patch = np.asarray(patch)
    if patch.ndim != 3 or patch.shape[-1] != 2:
        raise InputError(f"patch_qc: expected a (h, w, 2) patch, got shape {patch.shape}")
    stats = PatchStats()
    stats.add(patch)
    return stats.qc(non_zero_perc_threshold=non_zero_perc_threshold, mean_intensity_threshold=mean_intensity_threshold)


class PatchStats:
    """Mean, standard deviation and non-zero fraction of both model-input channels, accumulated over
    blocks of a patch (Chan et al.'s pairwise update: no float copy of the patch)."""

    def __init__(self):
        self.n = 0
        self.mean = np.zeros(2)
        self.m2 = np.zeros(2)
        self.nonzero = np.zeros(2, np.int64)

    def add(self, block):
        block = np.asarray(block)
        k = block.shape[0] * block.shape[1]
        if k == 0:
            return
        for c in range(2):
            ch = block[..., c]
            mean = float(ch.mean(dtype=np.float64))
            m2 = float(np.square(ch - mean, dtype=np.float64).sum())
            delta = mean - self.mean[c]
            total = self.n + k
            self.mean[c] += delta * k / total
            self.m2[c] += m2 + delta * delta * self.n * k / total
            self.nonzero[c] += np.count_nonzero(ch)
        self.n += k

    def qc(self, *, non_zero_perc_threshold=0.05, mean_intensity_threshold=1.0) -> dict:
        out = {}
        for c, name in enumerate(("nucleus", "wholecell")):
            out[f"{name}_mean"] = float(self.mean[c]) if self.n else 0.0
            out[f"{name}_std"] = float(np.sqrt(self.m2[c] / self.n)) if self.n else 0.0
            out[f"{name}_non_zero_perc"] = float(self.nonzero[c] / self.n) if self.n else 0.0
        empty = out["nucleus_non_zero_perc"] < non_zero_perc_threshold
        noisy = out["nucleus_mean"] < mean_intensity_threshold
        out.update(is_empty=bool(empty), is_noisy=bool(noisy), is_bad_patch=bool(empty or noisy),
                   is_informative=bool(not empty and not noisy))
        return out
