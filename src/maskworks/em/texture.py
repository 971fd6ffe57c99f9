"""Classical tissue mask for volume EM: textured tissue versus smooth resin.

Follows the Catena EM-mask design (brain tissue versus resin / non-brain on a
downsampled FIB-SEM block): evidence of fine texture, local contrast and edges
is combined into a confidence map that is thresholded and cleaned in 3-D.
Everything is computed block by block with a halo that covers the support of
every filter, so the result does not depend on the chunking.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

from maskworks.io import InputError, iter_blocks, n_blocks, progress_reporter
from maskworks.io.params import Number, Size, bad_value, checked

# Gaussian kernels are cut at TRUNCATE sigmas (scipy's default, spelled out because the halo depends on it).
TRUNCATE = 4.0
# Percentiles are taken on at most this many voxels (a strided subsample of larger volumes).
MAX_SAMPLE = 1 << 24
# Weights of the weighted geometric mean of the evidence maps: texture, local contrast, edges.
WEIGHTS = {"texture": 0.4, "contrast": 0.3, "edges": 0.3}
# Fixed log-spaced bins for the whole-volume histograms (evidence scales, Otsu).
_LOG_LO, _LOG_HI, _NBINS = -8.0, 1.0, 4608
_TINY = 1e-8
# Evidence scales are never below this (in units of the normalised intensity range): a volume
# without any texture (a constant one, say) keeps a confidence near 0 instead of amplified noise.
MIN_SCALE = 1e-3

__all__ = ["local_variance", "sym3_eigenvalues", "texture_mask"]


def _radius(sigma: float) -> int:
    """Half-width of scipy's Gaussian kernel at ``sigma`` (same rounding as scipy.ndimage)."""
    return int(TRUNCATE * float(sigma) + 0.5)


def local_variance(x, size) -> np.ndarray:
    """Variance of ``x`` in a moving ``size`` window (uniform weights, mirror-reflected borders).

    Parameters
    ----------
    x : array_like
        N-D array.
    size : int or sequence of int
        Window size per axis (as :func:`scipy.ndimage.uniform_filter`).

    Returns
    -------
    ndarray of float64
        ``E[x^2] - E[x]^2`` over each window, clipped at 0 (the two local means are
        computed in float64 so that the difference does not cancel catastrophically).

    Notes
    -----
    The window of voxel ``i`` covers ``i - size//2 .. i + (size-1)//2`` and the
    array is extended by ``mode="reflect"`` (``d c b a | a b c d | d c b a``),
    exactly as :func:`scipy.ndimage.uniform_filter` does.
    """
    x = np.asarray(x, dtype=np.float64)
    mean = ndi.uniform_filter(x, size, mode="reflect")
    mean_sq = ndi.uniform_filter(x * x, size, mode="reflect")
    var = mean_sq - mean * mean
    np.maximum(var, 0.0, out=var)
    return var


def _scales(texture_sigma: float, edge_sigma: float, block_size: int) -> dict:
    """Every filter scale of the method and the halo that makes chunked == unchunked."""
    s = {
        "texture_sigma": texture_sigma,
        "surround_sigma": 4.0 * texture_sigma,  # DoG surround: the band is sigma .. 4 sigma
        "average_sigma": 4.0 * texture_sigma,  # local averaging of the band-pass energies
        "edge_sigma": edge_sigma,
        "integration_sigma": max(2.0 * edge_sigma, 2.0 * texture_sigma),  # structure tensor
        "block_size": block_size,
    }
    r = {k: _radius(v) for k, v in s.items() if k.endswith("sigma")}
    coherence = r["edge_sigma"] + r["integration_sigma"]
    chain = max(
        max(r["texture_sigma"], r["surround_sigma"], coherence) + r["average_sigma"],  # texture
        coherence + r["average_sigma"],  # edges
        block_size // 2,  # local contrast (uniform window)
    )
    minimum = max(math.ceil(4.0 * max(s["surround_sigma"], s["average_sigma"], s["integration_sigma"])),
                  math.ceil(block_size / 2))
    s["halo"] = max(chain, minimum)
    return s


def _evidence(x: np.ndarray, sc: dict) -> dict[str, np.ndarray]:
    """Raw evidence maps (float32, >= 0) of a normalised block ``x``."""
    f = np.float32
    # Structure tensor of Gaussian derivatives along z, y and x.
    grads = [ndi.gaussian_filter(x, sc["edge_sigma"], order=tuple(int(a == b) for b in range(3)),
                                 mode="reflect", truncate=TRUNCATE) for a in range(3)]
    grad_mag = np.sqrt(grads[0] ** 2 + grads[1] ** 2 + grads[2] ** 2)
    planarity = _planarity(grads, sc["integration_sigma"])
    del grads
    incoherence = 1.0 - planarity
    del planarity

    band = ndi.gaussian_filter(x, sc["texture_sigma"], mode="reflect", truncate=TRUNCATE)
    band -= ndi.gaussian_filter(x, sc["surround_sigma"], mode="reflect", truncate=TRUNCATE)
    np.abs(band, out=band)
    band *= incoherence
    texture = ndi.gaussian_filter(band, sc["average_sigma"], mode="reflect", truncate=TRUNCATE)
    del band
    grad_mag *= incoherence
    edges = ndi.gaussian_filter(grad_mag, sc["average_sigma"], mode="reflect", truncate=TRUNCATE)
    del grad_mag
    contrast = np.sqrt(local_variance(x, sc["block_size"])).astype(f)
    return {"texture": texture.astype(f, copy=False), "contrast": contrast, "edges": edges.astype(f, copy=False)}


def _planarity(grads, rho: float, slab: int = 1 << 18) -> np.ndarray:
    """(l1 - l2) / l1 of the structure tensor smoothed at ``rho`` (1: a single plane, 0: isotropic)."""
    comps = [ndi.gaussian_filter(grads[a] * grads[b], rho, mode="reflect", truncate=TRUNCATE).reshape(-1)
             for a, b in _TENSOR_INDEX]
    shape = grads[0].shape
    out = np.empty(comps[0].size, np.float32)
    for start in range(0, out.size, slab):  # slabs bound the float64 temporaries
        part = [c[start:start + slab].astype(np.float64) for c in comps]
        l1, l2, _ = sym3_eigenvalues(*part)
        out[start:start + slab] = np.clip((l1 - l2) / (l1 + _TINY), 0.0, 1.0)
    return out.reshape(shape)


# Order of the six independent components of a symmetric 3x3 tensor: zz, yy, xx, zy, zx, yx.
_TENSOR_INDEX = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def sym3_eigenvalues(a00, a11, a22, a01, a02, a12):
    """Eigenvalues ``l1 >= l2 >= l3`` of symmetric 3x3 matrices given by their six components.

    Closed form (trigonometric solution of the characteristic cubic, O. K. Smith,
    Comm. ACM 4:168, 1961), element-wise on arrays of any shape; it agrees with
    :func:`numpy.linalg.eigvalsh` to ~1e-7 of the largest eigenvalue and is several
    times faster on stacks of millions of tensors.
    """
    q = (a00 + a11 + a22) / 3.0
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p = np.sqrt((b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * (a01 * a01 + a02 * a02 + a12 * a12)) / 6.0)
    det = b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(p > 0, det / (2.0 * p**3), 0.0)
    phi = np.arccos(np.clip(r, -1.0, 1.0)) / 3.0
    l1 = q + 2.0 * p * np.cos(phi)
    l3 = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    return l1, 3.0 * q - l1 - l3, l3


def _log_hist(values: np.ndarray) -> np.ndarray:
    idx = (np.log10(np.maximum(values, 10.0**_LOG_LO)) - _LOG_LO) * (_NBINS / (_LOG_HI - _LOG_LO))
    idx = np.clip(idx.astype(np.int64), 0, _NBINS - 1)
    return np.bincount(idx.ravel(), minlength=_NBINS)


def _bin_centres() -> np.ndarray:
    edges = np.linspace(_LOG_LO, _LOG_HI, _NBINS + 1)
    return 10.0 ** (0.5 * (edges[:-1] + edges[1:]))


def _bin_tops() -> np.ndarray:
    return 10.0 ** np.linspace(_LOG_LO, _LOG_HI, _NBINS + 1)[1:]


def _hist_percentile(hist: np.ndarray, q: float) -> float:
    cum = np.cumsum(hist)
    if cum[-1] == 0:
        return 1.0
    i = int(np.searchsorted(cum, q / 100.0 * cum[-1]))
    return float(_bin_centres()[min(i, _NBINS - 1)])


def _otsu(hist: np.ndarray, centres: np.ndarray, tops: np.ndarray) -> float:
    """Otsu's threshold of a histogram with (not necessarily even) bin centres.

    With a single occupied bin there is nothing to split: the threshold is the top of that
    bin (``tops``), so that ``value > threshold`` selects nothing.
    """
    hist = hist.astype(np.float64)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres)
    mean0 = m / np.maximum(w0, 1e-300)
    mean1 = (m[-1] - m) / np.maximum(w1, 1e-300)
    between = w0 * w1 * (mean0 - mean1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    i = int(np.argmax(between))
    if between[i] < 0:
        return float(tops[np.flatnonzero(hist)[-1]]) if hist.any() else 0.5
    # threshold halfway between the last bin of the low class and the next bin (mask = conf > t)
    return float(0.5 * (centres[i] + centres[min(i + 1, len(centres) - 1)]))


def _intensity_range(volume, shape, chunk_shape) -> tuple[float, float, int]:
    """1st and 99th percentile of the whole volume (of a strided subsample above MAX_SAMPLE voxels)."""
    size = int(np.prod(shape))
    stride = 1
    while size > MAX_SAMPLE * stride**3:
        stride += 1
    parts = []
    for blk in iter_blocks(shape, chunk_shape, 0):
        start = [(-sl.start) % stride for sl in blk.inner]
        sub = tuple(slice(sl.start + s0, sl.stop, stride) for sl, s0 in zip(blk.inner, start))
        parts.append(np.asarray(volume[sub]).ravel())
    sample = np.concatenate(parts) if len(parts) > 1 else parts[0]
    p1, p99 = np.percentile(sample, [1.0, 99.0])
    return float(p1), float(p99), stride


def _normalise(block, p1: float, p99: float) -> np.ndarray:
    x = np.asarray(block, dtype=np.float32)
    span = p99 - p1 if p99 > p1 else 1.0
    x = (x - np.float32(p1)) * np.float32(1.0 / span)
    return np.clip(x, 0.0, 1.0, out=x)


def _check(volume, texture_sigma, edge_sigma):
    """The volume's shape and dtype, and the sigmas against it (the keywords' own ranges are
    checked by :func:`~maskworks.io.params.checked`)."""
    if not (hasattr(volume, "shape") and hasattr(volume, "dtype") and hasattr(volume, "__getitem__")):
        volume = np.asarray(volume)
    shape = tuple(int(s) for s in volume.shape)
    if len(shape) != 3:
        raise InputError(f"texture_mask: volume has shape {shape} ({len(shape)}-D); expected a 3-D (z, y, x) array")
    if min(shape) < 1:
        raise InputError(f"texture_mask: volume has shape {shape}; every axis needs at least 1 voxel")
    dtype = np.dtype(volume.dtype)
    if dtype.kind not in "iuf":
        raise InputError(f"texture_mask: volume has dtype {dtype}; expected integer or floating-point intensities")
    # A Gaussian wider than the volume measures nothing, and its kernel (and halo) would grow
    # without bound: sigmas are kept within the longest axis.
    for name, value in (("texture_sigma", texture_sigma), ("edge_sigma", edge_sigma)):
        if value > max(shape):
            raise bad_value("texture_mask", name, value, f"at most the longest axis of the volume {shape} (voxels)")
    return volume, shape


@checked(
    block_size=Number(integer=True, minimum=3, unit="voxels"),
    texture_sigma=Number(exclusive_minimum=0, unit="voxels"),
    edge_sigma=Number(exclusive_minimum=0, unit="voxels"),
    min_region_size=Number(integer=True, minimum=0, unit="voxels"),
    threshold=Number(exclusive_minimum=0, exclusive_maximum=1, words=("otsu",)),
    chunk_shape=Size(8, nullable=True),
)
def texture_mask(
    volume,
    *,
    block_size: int = 64,
    texture_sigma: float = 1.0,
    edge_sigma: float = 0.5,
    min_region_size: int = 250,
    threshold: str | float = "otsu",
    chunk_shape=None,
    out_confidence=None,
    progress: Callable[[int, int], None] | bool | None = None,
):
    """Mask the tissue of a downsampled volume-EM block: textured tissue versus smooth resin.

    Parameters
    ----------
    volume : array_like
        3-D (z, y, x) intensities: a NumPy array, a memory map or a ``zarr.Array``.
        With ``chunk_shape`` it is only ever sliced block by block.
    block_size : int
        Side (voxels) of the window of the local-contrast statistics (local
        standard deviation), the regional evidence.
    texture_sigma : float
        Sigma (voxels) of the Difference-of-Gaussians band-pass that measures fine
        texture; the band is ``texture_sigma .. 4 * texture_sigma``.
    edge_sigma : float
        Sigma (voxels) of the Gaussian derivatives (gradient magnitude and structure tensor).
    min_region_size : int
        Connected components (6-connected) smaller than this are removed and holes
        smaller than it filled; 0 keeps the thresholded mask as it is.
    threshold : "otsu" or float
        ``"otsu"``: Otsu's threshold of the whole-volume confidence histogram; a
        number in (0, 1): that confidence.
    chunk_shape : sequence of int, optional
        Process the volume in chunks of this (z, y, x) shape, each read with a halo
        that covers the support of every filter, so the result equals the
        unchunked one.  None: the whole volume at once.
    out_confidence : array_like, optional
        Preallocated float32 array of ``volume.shape`` (e.g. a Zarr array) that
        receives the confidence block by block; returned as ``confidence``.
    progress : callable, bool or None
        None: a tqdm bar on stderr when there is more than one chunk; False: none;
        a callable: called as ``progress(done, total)`` after each chunk.

    Returns
    -------
    mask : ndarray of uint8
        1 tissue, 0 resin / background.
    confidence : array of float32
        Confidence of tissue in [0, 1] (``out_confidence`` when given).
    stats : dict
        voxels, fraction_masked, threshold (float), threshold_method ("otsu" or
        "fixed"), intensity_p1, intensity_p99, intensity_sample_stride,
        evidence_scales and evidence_weights (per map), filter_sigmas,
        components_removed, holes_filled, chunks, halo, chunk_shape.

    Notes
    -----
    Follows the Catena EM-mask design: on a downsampled FIB-SEM block, brain tissue
    is told from resin (and other non-tissue) by its texture, not by its grey value.

    *Normalisation.* Intensities are scaled so that the 1st and 99th percentiles of
    the whole volume (a strided subsample above 16 M voxels, never per chunk) map
    to 0 and 1, then clipped to [0, 1].

    *Evidence* (scipy.ndimage, ``mode="reflect"``, kernels cut at 4 sigma), with
    ``s = texture_sigma``, ``e = edge_sigma``:

    - incoherence ``w = 1 - (l1 - l2) / l1`` where ``l1 >= l2 >= l3`` are the
      eigenvalues of the structure tensor: outer products of the Gaussian
      derivatives (sigma ``e``) along z, y and x, smoothed at the integration
      scale ``rho = max(2 e, 2 s)`` (eigenvalues in closed form,
      :func:`sym3_eigenvalues`).  ``rho`` is tied to the texture scale because
      that is where tissue texture becomes isotropic: at ``rho = 2 s`` the
      membranes of neighbouring processes already mix.  ``w`` is ~0 on and next to a single plane (a
      resin crack, a bright sheet) and ~1 in isotropic texture (tissue, where
      many membranes of all orientations meet within ``rho``) and in plain noise;
      it is applied to the band-pass energies *before* they are averaged, so an
      isolated planar structure contributes (almost) no evidence;
    - texture ``T``: Gaussian average (sigma ``4 s``) of ``w * |G_s * x - G_4s * x|``;
    - local contrast ``C``: local standard deviation over a ``block_size`` cube,
      ``sqrt(E[x^2] - E[x]^2)`` from two uniform filters;
    - edges ``E``: Gaussian average (sigma ``4 s``) of ``w * |grad G_e * x|``
      (the gradient magnitude of :func:`scipy.ndimage.gaussian_gradient_magnitude`).

    *Confidence.*  Each map is divided by its scale, the 99th percentile of that
    map over the whole volume (from a fixed log-binned histogram accumulated over
    the chunks, hence independent of the chunking; never below ``MIN_SCALE`` =
    1e-3), and the confidence is the weighted geometric mean
    ``clip((T/sT)^0.4 (C/sC)^0.3 (E/sE)^0.3, 0, 1)`` (float32).
    All three must be present for a voxel to look like tissue: resin next to
    tissue has contrast (the wide window reaches the tissue) but no fine
    texture, a crack or sheet has edges and band-pass energy but no incoherence.
    Because the mean is geometric the scales only multiply the confidence by a
    constant, so the Otsu mask does not depend on them.  The fine maps (sigma
    ``4 s``) fix where the boundary is; ``C`` is the regional term.

    *Mask.*  ``confidence > threshold``, then 6-connected components smaller than
    ``min_region_size`` are removed and background components (holes) smaller
    than it are filled, in 3-D on the whole mask (as
    ``skimage.morphology.remove_small_objects`` / ``remove_small_holes``).  The
    uint8 mask and its int32 labels are held in memory (5 bytes per voxel);
    the confidence too (4 bytes per voxel) unless ``out_confidence`` is given.

    *Chunks.*  Each chunk is read with a halo of ``stats["halo"]`` voxels, the
    summed support of the longest filter chain (at least ``max(4 x the largest
    sigma, block_size / 2)``), and only its centre is kept; at the volume border
    the chunk reaches the real border, so ``reflect`` matches the unchunked run.
    Results equal the unchunked ones to float rounding (the uniform filter's
    running sums start at different places); the mask is the same.
    """
    volume, shape = _check(volume, texture_sigma, edge_sigma)
    chunk_shape = None if chunk_shape is None else tuple(chunk_shape)
    if chunk_shape is None and not isinstance(volume, np.ndarray):
        volume = np.asarray(volume[...])
    sc = _scales(float(texture_sigma), float(edge_sigma), int(block_size))
    halo = sc["halo"]
    total = n_blocks(shape, chunk_shape)
    p1, p99, stride = _intensity_range(volume, shape, chunk_shape)

    if out_confidence is None:
        confidence = np.empty(shape, np.float32)
    else:
        if tuple(out_confidence.shape) != shape:
            raise InputError(f"texture_mask: out_confidence has shape {tuple(out_confidence.shape)}; "
                             f"expected the volume's shape {shape}")
        confidence = out_confidence

    bar, report = progress_reporter(progress, total, "texture_mask")
    hists = {k: np.zeros(_NBINS, np.int64) for k in WEIGHTS}
    raw_hist = np.zeros(_NBINS, np.int64)
    try:
        for done, blk in enumerate(iter_blocks(shape, chunk_shape, halo), start=1):
            x = _normalise(volume[blk.outer], p1, p99)
            ev = {k: v[blk.crop] for k, v in _evidence(x, sc).items()}
            del x
            raw = np.ones(ev["texture"].shape, np.float32)
            for k, wgt in WEIGHTS.items():
                hists[k] += _log_hist(ev[k])
                raw *= np.maximum(ev[k], np.float32(_TINY)) ** np.float32(wgt)
            raw_hist += _log_hist(raw)
            confidence[blk.inner] = raw
            report(done)
    finally:
        if bar is not None:
            bar.close()

    scales = {k: max(_hist_percentile(h, 99.0), MIN_SCALE) for k, h in hists.items()}
    gain = 1.0 / math.prod(scales[k] ** w for k, w in WEIGHTS.items())
    if threshold == "otsu":
        t = _otsu(raw_hist, np.minimum(_bin_centres() * gain, 1.0), np.minimum(_bin_tops() * gain, 1.0))
        method = "otsu"
    else:
        t, method = float(threshold), "fixed"

    mask = np.zeros(shape, np.uint8)
    for blk in iter_blocks(shape, chunk_shape, 0):
        c = np.asarray(confidence[blk.inner], dtype=np.float32) * np.float32(gain)
        np.clip(c, 0.0, 1.0, out=c)
        confidence[blk.inner] = c
        mask[blk.inner] = c > t

    removed, filled = _clean(mask, int(min_region_size))
    stats = {
        "voxels": int(np.prod(shape)),
        "fraction_masked": float(np.count_nonzero(mask)) / max(1, int(np.prod(shape))),
        "threshold": float(t),
        "threshold_method": method,
        "intensity_p1": p1,
        "intensity_p99": p99,
        "intensity_sample_stride": stride,
        "evidence_scales": scales,
        "evidence_weights": dict(WEIGHTS),
        "filter_sigmas": {k: v for k, v in sc.items() if k.endswith("sigma")},
        "components_removed": removed,
        "holes_filled": filled,
        "chunks": total,
        "halo": halo,
        "chunk_shape": list(chunk_shape) if chunk_shape is not None else None,
    }
    return mask, confidence, stats


def _clean(mask: np.ndarray, min_size: int) -> tuple[int, int]:
    """Remove small components and fill small holes of ``mask`` in place; return how many of each."""
    if min_size <= 1:
        return 0, 0
    structure = ndi.generate_binary_structure(3, 1)

    def flip_small(region, value) -> int:
        """Set 6-connected components of ``region`` below min_size to ``value``; count them."""
        labels, n = ndi.label(region, structure=structure, output=np.int32)
        if not n:
            return 0
        small = np.bincount(labels.ravel()) < min_size
        small[0] = False
        count = int(np.count_nonzero(small))
        if count:
            mask[small[labels]] = value
        return count

    removed = flip_small(mask, 0)
    filled = flip_small(mask == 0, 1)
    return removed, filled
