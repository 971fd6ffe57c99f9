"""Classical tissue mask for volume EM: textured tissue versus smooth resin.

Follows the Catena EM-mask design (brain tissue versus resin / non-brain on a
downsampled FIB-SEM block): evidence of fine texture, local contrast and edges
is combined into a confidence map that is thresholded and cleaned in 3-D.
Everything is computed block by block with a halo that covers the support of
every filter, so the result does not depend on the chunking.

The filters run on the CPU (slabs of each block in a pool of threads) or, through
:mod:`maskworks.backend`, on a GPU (CuPy and cupyx.scipy.ndimage, a whole block at a
time).  The steps are written once: the array module and ndimage come with the
runner (``par``), and NumPy's ufuncs and functions dispatch to CuPy's on CuPy arrays.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

from maskworks.backend import Backend, get_backend
from maskworks.io import InputError, iter_blocks, n_blocks, progress_reporter
from maskworks.io.blocks import Slabs, resolve_threads, return_freed_memory
from maskworks.io.params import DEVICE, Number, Scale, Size, bad_value, checked, per_axis

from .postprocess import SlabComponents

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
# Bytes of working memory per voxel of a chunk read with its halo: six float32 block-sized
# arrays at the peak of _evidence, the normalised copy and the chunk as read (measured:
# bench/bench_texture.py --memory-mb reports the peak against the budget).
WORK_BYTES_PER_VOXEL = 36
# Bytes per voxel of a slab of the clean-up: its planes, the selection and the int32 labels.
CLEAN_BYTES_PER_VOXEL = 16
# The smallest budget: a chunk of a few voxels and its halo, plus the libraries' own buffers.
MIN_MEMORY_MB = 64

__all__ = ["local_variance", "sym3_eigenvalues", "texture_mask"]


class _OnDevice:
    """Runs the steps of a block on a GPU, in place of the thread pool (:class:`Slabs`): each
    step is one call on the whole block (the device parallelises it), in ``backend``'s
    array module and ndimage (CuPy, cupyx.scipy.ndimage)."""

    threads = 1

    def __init__(self, backend: Backend):
        self.backend, self.xp, self.ndi = backend, backend.xp, backend.ndi

    def run(self, fn, shape, avoid: int | None = None) -> list:
        return [fn(tuple(slice(0, int(n)) for n in shape))]


def _xp(par):
    """The array module of a runner's arrays: NumPy for the thread pool, CuPy on a GPU."""
    return getattr(par, "xp", np)


def _ndi(par):
    return getattr(par, "ndi", ndi)


def _host(par, a) -> np.ndarray:
    """``a`` as a NumPy array (copied from the device on a GPU)."""
    return par.backend.to_numpy(a) if isinstance(par, _OnDevice) else np.asarray(a)


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


def _scales(texture_sigma, edge_sigma, block_size) -> dict:
    """Every filter scale of the method, per axis (z, y, x), and the halo that makes chunked ==
    unchunked (the widest axis's: one halo for every axis)."""
    ts, es, bs = per_axis(texture_sigma), per_axis(edge_sigma), per_axis(block_size, integer=True)
    s = {
        "texture_sigma": ts,
        "surround_sigma": tuple(4.0 * v for v in ts),  # DoG surround: the band is sigma .. 4 sigma
        "average_sigma": tuple(4.0 * v for v in ts),  # local averaging of the band-pass energies
        "edge_sigma": es,
        "integration_sigma": tuple(max(2.0 * e, 2.0 * t) for e, t in zip(es, ts)),  # structure tensor
        "block_size": bs,
    }
    r = {k: max(_radius(x) for x in v) for k, v in s.items() if k.endswith("sigma")}
    coherence = r["edge_sigma"] + r["integration_sigma"] + 2  # + 2: the coarse samples' interpolation
    chain = max(
        max(r["texture_sigma"], r["surround_sigma"], coherence) + r["average_sigma"],  # texture
        coherence + r["average_sigma"],  # edges
        max(bs) // 2,  # local contrast (uniform window)
    )
    minimum = max(math.ceil(4.0 * max(*s["surround_sigma"], *s["average_sigma"], *s["integration_sigma"])),
                  math.ceil(max(bs) / 2))
    s["halo"] = max(chain + 2, minimum)  # + 2: the confidence is interpolated from coarse samples too
    return s


def _on(scale, axis):
    """A scale's value along ``axis`` (a scale is one number or one per axis)."""
    return scale[axis] if isinstance(scale, tuple) else scale


def _g1(src, sigma, axis, order, out, par):
    """One 1-D Gaussian (``order`` 1: derivative) pass along ``axis``, ``src`` -> ``out`` (may be
    ``src``), split over the threads along another axis."""
    sigma = _on(sigma, axis)

    def one(sl):
        _ndi(par).gaussian_filter1d(src[sl], sigma, axis=axis, order=order, mode="reflect",
                                    truncate=TRUNCATE, output=out[sl])
    par.run(one, src.shape, avoid=axis)
    return out


def _gauss(src, sigma, out, par):
    """Gaussian smoothing along z, y, x (as ``scipy.ndimage.gaussian_filter``), ``src`` -> ``out``."""
    for axis in range(3):
        _g1(src if axis == 0 else out, sigma, axis, 0, out, par)
    return out


def _central_difference(a, axis, par, out=None) -> np.ndarray:
    """``(a[i + 1] - a[i - 1]) / 2`` along ``axis``, the array's ends repeated (``reflect``)."""
    out = _xp(par).empty(a.shape, np.float32) if out is None else out
    n = a.shape[axis]

    def one(sl):
        src, dst = np.moveaxis(a[sl], axis, 0), np.moveaxis(out[sl], axis, 0)
        if n == 1:
            dst[...] = 0.0
            return
        np.subtract(src[2:], src[:-2], out=dst[1:-1])
        np.subtract(src[1], src[0], out=dst[0])
        np.subtract(src[-1], src[-2], out=dst[-1])
        dst *= np.float32(0.5)
    par.run(one, a.shape, avoid=axis)
    return out


def _each(par, shape, fn):
    """``fn(slab)`` over slabs of ``shape`` in the threads (element-wise work)."""
    return par.run(fn, shape)


def _phase(outer) -> tuple[int, ...]:
    """Local index, per axis, of a block's first voxel at an even global index (0 or 1)."""
    return tuple(sl.start % 2 for sl in outer)


def _lo_crop(crop, phase) -> tuple[slice, ...]:
    """The coarse samples (even global indices) that lie inside ``crop`` of a block."""
    return tuple(slice(-(-(c.start - p) // 2), -(-(c.stop - p) // 2)) for c, p in zip(crop, phase))


class _Work:
    """Float32 work arrays reused from one step (and one chunk) to the next.

    A fresh array of hundreds of MiB costs its page faults every time (the allocator hands
    large blocks back to the system); the same memory reused costs them once.  Arrays are
    views of flat buffers grown to the largest size asked for under each name, in the array
    module ``xp`` (CuPy: on the GPU).
    """

    def __init__(self, xp=np):
        self._xp = xp
        self._flat: dict = {}

    def get(self, name: str, shape) -> np.ndarray:
        size = int(np.prod(shape))
        buf = self._flat.get(name)
        if buf is None or buf.size < size:
            self._flat.pop(name, None)
            buf = self._flat[name] = self._xp.empty(size, np.float32)
        return buf[:size].reshape(shape)


def _take_even(a, axis, start, par, out=None) -> np.ndarray:
    """``a[..., start::2, ...]`` along ``axis`` as a contiguous array (``out`` or a new one),
    copied by the threads."""
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, None, 2)
    src = a[tuple(index)]
    out = _xp(par).empty(src.shape, a.dtype) if out is None else out

    def one(sl):
        out[sl] = src[sl]
    par.run(one, out.shape, avoid=axis)
    return out


def _smooth_coarse(src, pass1d, phase, par, out=None) -> np.ndarray:
    """A separable smoothing of ``src`` evaluated at the even global indices only (a new array).

    The x pass runs on the whole block, the y pass (in place) on its even columns, the z pass
    on its even rows and columns (``pass1d(src, axis, out, par)``): the values at those samples
    are exactly those of the smoothing of the whole block, for 1 + 1/2 + 1/4 of one pass's
    work.  ``out`` receives the passes and may be ``src``.
    """
    a = pass1d(src, 2, _xp(par).empty(src.shape, src.dtype) if out is None else out, par)
    a = a[:, :, phase[2]::2]
    pass1d(a, 1, a, par)
    a = a[:, phase[1]::2, :]
    pass1d(a, 0, a, par)
    return _take_even(a, 0, phase[0], par)


def _gauss_pass(sigma):
    return lambda src, axis, out, par: _g1(src, sigma, axis, 0, out, par)


def _uniform_pass(size):
    def one(src, axis, out, par):
        n = _on(size, axis)
        par.run(lambda sl: _ndi(par).uniform_filter1d(src[sl], n, axis=axis, mode="reflect", output=out[sl]),
                src.shape, avoid=axis)
        return out
    return one


def upsample(coarse, phase, shape, par: Slabs | None = None, out=None) -> np.ndarray:
    """Linear interpolation of samples at the even global indices back to every voxel of a block.

    A voxel at an even index takes its sample; one between two samples their mean; one with
    a sample on one side only (the volume's first voxel at an odd start, its last at an even
    length) that sample.  ``out``: the array of ``shape`` to fill.  Each thread fills a z-slab
    from the samples in its reach, so no block-sized intermediate is made.
    """
    par = par or Slabs(1)
    xp = _xp(par)
    a = xp.asarray(coarse, dtype=np.float32)
    out = xp.empty(tuple(shape), np.float32) if out is None else out
    pz, m = phase[0], a.shape[0]

    def one(sl):
        z0, z1 = sl[0].start, sl[0].stop
        j0 = min(m - 1, max(0, (z0 - pz) // 2))
        j1 = min(m - 1, max(0, (z1 - 1 - pz) // 2 + 1))
        part = a[j0:j1 + 1]
        for axis in (1, 2):  # y, then x: every sample plane in reach, at full resolution
            full = part.shape[:axis] + (shape[axis],) + part.shape[axis + 1:]
            dst = xp.empty(full, np.float32)
            _upsample1(part, dst, axis, phase[axis], shape[axis])
            part = dst
        for z in range(z0, z1):
            t = z - pz
            lo = min(m - 1, max(0, t // 2))
            if t < 0 or t % 2 == 0 or lo + 1 > m - 1:
                out[z] = part[lo - j0]
            else:
                np.add(part[lo - j0], part[lo + 1 - j0], out=out[z])
                out[z] *= np.float32(0.5)
    par.run(one, out.shape)
    return out


def _upsample1(a, out, axis, p, n) -> None:
    a = np.moveaxis(a, axis, 0)
    out = np.moveaxis(out, axis, 0)
    m = a.shape[0]
    out[p::2] = a[: len(range(p, n, 2))]
    k = len(range(p + 1, n, 2))  # voxels between sample j and j + 1 (j = 0, 1, ...)
    if k:
        pairs = min(k, m - 1)
        mid = out[p + 1:p + 1 + 2 * pairs:2]
        np.add(a[:pairs], a[1:pairs + 1], out=mid)
        mid *= np.float32(0.5)
        if k > pairs:  # past the last sample
            out[p + 1 + 2 * pairs::2] = a[m - 1]
    if p:
        out[0] = a[0]


def _evidence(x: np.ndarray, sc: dict, phase, par: Slabs, work: _Work) -> dict[str, np.ndarray]:
    """Evidence maps of a normalised block ``x`` at the even global indices (coarse, float32,
    >= 0): texture, the local variance (the contrast's square) and edges.

    The band-pass, the gradients and their products are computed on every voxel; every wide
    smoothing after them (the surround at ``4 s``, the structure tensor at ``rho``, the averages
    at ``4 s``, the ``block_size`` window) is evaluated on the even samples only
    (:func:`_smooth_coarse`; the surround and the incoherence are interpolated back with
    :func:`upsample`): the maps are smooth at those scales, and the eigenvalues and the
    confidence need an eighth of the voxels.  Float32 throughout, in five block-sized work
    arrays (``work`` "a" .. "e"; ``x`` is "a"), reused in place.
    """
    shape = x.shape
    e, s, rho, avg = sc["edge_sigma"], sc["texture_sigma"], sc["integration_sigma"], sc["average_sigma"]
    b, c, d, g = (work.get(k, shape) for k in "bcde")

    # local variance E[x^2] - E[x]^2 over a block_size cube (the contrast is its square root)
    box = _uniform_pass(sc["block_size"])
    if isinstance(par, _OnDevice):
        # cupyx.scipy.ndimage sums a float32 input in float32, and the difference of the two
        # means cancels: on a GPU the box statistics are taken in float64 (scipy's own sums are)
        x64 = x.astype(np.float64)
        mean = _smooth_coarse(x64, box, phase, par)
        np.multiply(x64, x64, out=x64)
        var = _smooth_coarse(x64, box, phase, par, out=x64)
        del x64
        var -= mean * mean
        var = var.astype(np.float32)
    else:
        mean = _smooth_coarse(x, box, phase, par, out=b)
        _each(par, shape, lambda sl: np.multiply(x[sl], x[sl], out=b[sl]))
        var = _smooth_coarse(b, box, phase, par, out=b)
        var -= mean * mean
    np.maximum(var, 0.0, out=var)
    del mean

    # the image smoothed at the edge scale, S = G_e x (c); the fine band-pass scale from it
    # (G_s = G_sqrt(s^2 - e^2) G_e); the surround G_4s x on the coarse samples, interpolated (d)
    smooth = _gauss(x, e, c, par)
    surround = upsample(_smooth_coarse(x, _gauss_pass(sc["surround_sigma"]), phase, par, out=b),
                        phase, shape, par, out=d)
    if all(a > c for a, c in zip(s, e)):
        band = _gauss(smooth, tuple(math.sqrt(a * a - c * c) for a, c in zip(s, e)), b, par)
    else:  # a fine scale at or below the edge scale: from the image itself
        band = _gauss(x, s, b, par)
    _each(par, shape, lambda sl: np.abs(np.subtract(band[sl], surround[sl], out=band[sl]), out=band[sl]))

    # gradients: central differences of S along z, y and x (a, d, e)
    grads = (_central_difference(smooth, 0, par, out=x), _central_difference(smooth, 1, par, out=d),
             _central_difference(smooth, 2, par, out=g))
    prod = smooth  # c, free from here

    # structure tensor at rho on the coarse samples -> incoherence w = l3 / l1
    tensor = []
    for i, j in _TENSOR_INDEX:
        gi, gj = grads[i], grads[j]
        _each(par, shape, lambda sl, gi=gi, gj=gj: np.multiply(gi[sl], gj[sl], out=prod[sl]))
        tensor.append(_smooth_coarse(prod, _gauss_pass(rho), phase, par, out=prod))
    w_coarse = _xp(par).empty(tensor[0].shape, np.float32)
    # the float64 temporaries in pieces that stay in a CPU's cache; on a GPU in larger ones
    piece = 1 << 22 if isinstance(par, _OnDevice) else 1 << 16

    def incoherence(sl):
        flat = [t[sl].reshape(-1) for t in tensor]
        out = w_coarse[sl].reshape(-1)
        step = piece
        for i in range(0, out.size, step):
            part = [t[i:i + step].astype(np.float64) for t in flat]
            out[i:i + step] = 1.0 - _anisotropy(*part)
    _each(par, w_coarse.shape, incoherence)
    tensor.clear()
    w = upsample(w_coarse, phase, shape, par, out=prod)

    # w is applied to the band-pass energies and to the gradient magnitude (written over the
    # z gradient) before they are averaged, so that an isolated plane contributes (almost) no evidence
    gz, gy, gx = grads

    def apply(sl):
        edge, y, x = gz[sl], gy[sl], gx[sl]
        np.multiply(edge, edge, out=edge)
        np.multiply(y, y, out=y)
        edge += y
        np.multiply(x, x, out=x)
        edge += x
        np.sqrt(edge, out=edge)
        edge *= w[sl]
        band[sl] *= w[sl]
    _each(par, shape, apply)
    texture = _smooth_coarse(band, _gauss_pass(avg), phase, par, out=band)
    edges = _smooth_coarse(gz, _gauss_pass(avg), phase, par, out=gz)
    return {"texture": texture, "variance": var, "edges": edges}


def _cubic(a00, a11, a22, a01, a02, a12):
    """``q, p, phi`` of the trigonometric solution of the characteristic cubic: the eigenvalues
    are ``q + 2 p cos(phi + 2 pi k / 3)``, k = 0, 1, 2 (O. K. Smith, Comm. ACM 4:168, 1961)."""
    q = (a00 + a11 + a22) / 3.0
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p = np.sqrt((b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * (a01 * a01 + a02 * a02 + a12 * a12)) / 6.0)
    det = b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(p > 0, det / (2.0 * p**3), 0.0)
    return q, p, np.arccos(np.clip(r, -1.0, 1.0)) / 3.0


def _anisotropy(a00, a11, a22, a01, a02, a12) -> np.ndarray:
    """``clip((l1 - l3) / l1, 0, 1)`` of symmetric 3x3 matrices, in closed form.

    With the eigenvalues ``q + 2 p cos(phi + 2 pi k / 3)`` (:func:`sym3_eigenvalues`),
    ``l1 - l3 = 2 sqrt(3) p sin(phi + pi / 3)`` and ``l1 = q + 2 p cos(phi)``: the middle
    eigenvalue is not needed.
    """
    q, p, phi = _cubic(a00, a11, a22, a01, a02, a12)
    gap = (2.0 * math.sqrt(3.0)) * p * np.sin(phi + np.pi / 3.0)
    top = q + 2.0 * p * np.cos(phi)
    return np.clip(gap / (top + _TINY), 0.0, 1.0)


# Order of the six independent components of a symmetric 3x3 tensor: zz, yy, xx, zy, zx, yx.
_TENSOR_INDEX = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def sym3_eigenvalues(a00, a11, a22, a01, a02, a12):
    """Eigenvalues ``l1 >= l2 >= l3`` of symmetric 3x3 matrices given by their six components.

    Closed form (trigonometric solution of the characteristic cubic, O. K. Smith,
    Comm. ACM 4:168, 1961), element-wise on arrays of any shape; it agrees with
    :func:`numpy.linalg.eigvalsh` to ~1e-7 of the largest eigenvalue and is several
    times faster on stacks of millions of tensors.
    """
    q, p, phi = _cubic(a00, a11, a22, a01, a02, a12)
    l1 = q + 2.0 * p * np.cos(phi)
    l3 = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    return l1, 3.0 * q - l1 - l3, l3


def _extent(slices) -> tuple[int, ...]:
    return tuple(sl.stop - sl.start for sl in slices)


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


def _intensity_range(volume, shape, chunk_shape, threads: int = 1) -> tuple[float, float, int]:
    """1st and 99th percentile of the whole volume (of a strided subsample above MAX_SAMPLE voxels).

    Exactly :func:`numpy.percentile` of that sample (linear interpolation between order
    statistics), found without gathering it: a histogram over the chunks locates the bins
    that hold the order statistics needed, and a second pass counts the distinct values in
    those bins only.  Each chunk's passes run on ``threads`` slabs.  Memory: one chunk,
    whatever the volume's size.
    """
    size = int(np.prod(shape))
    stride = 1
    while size > MAX_SAMPLE * stride**3:
        stride += 1

    def parts():
        for blk in iter_blocks(shape, chunk_shape, 0):
            start = [(-sl.start) % stride for sl in blk.inner]
            sub = tuple(slice(sl.start + s0, sl.stop, stride) for sl, s0 in zip(blk.inner, start))
            yield np.asarray(volume[sub])

    with Slabs(threads) as par:
        def each(part, fn):  # fn over the part's slabs, in parallel
            return par.run(lambda sl: fn(part[sl]), part.shape) if part.size else []

        lo, hi, n = np.inf, -np.inf, 0
        for part in parts():
            for a, c in each(part, lambda x: (float(x.min()), float(x.max()))):
                lo, hi = min(lo, a), max(hi, c)
            n += part.size
        if hi <= lo:
            return float(lo), float(lo), stride
        nbins = 1 << 16

        def index(x):
            """Every value's bin: monotone in the value (correctly rounded steps), the same in both
            passes; in float32 where the values fit it (at most 4 bytes, a range far from overflow)."""
            dt = np.float32 if x.dtype.itemsize <= 4 and hi - lo < 1e30 else np.float64
            y = np.subtract(x, dt(lo), dtype=dt, casting="unsafe")
            y *= dt(nbins / (hi - lo))
            i = y.astype(np.intp)
            return np.clip(i, 0, nbins - 1, out=i)

        hist = np.zeros(nbins, np.int64)
        for part in parts():
            for h in each(part, lambda x: np.bincount(index(x).ravel(), minlength=nbins)):
                hist += h
        cum = np.cumsum(hist)
        ranks = {}
        for q in (1.0, 99.0):
            r = q / 100.0 * (n - 1)
            ranks[q] = (r, int(math.floor(r)))
        wanted = sorted({k for _, k0 in ranks.values() for k in (k0, min(k0 + 1, n - 1))})
        bins = {k: int(np.searchsorted(cum, k + 1)) for k in wanted}  # the bin holding order statistic k
        values = {b: {} for b in set(bins.values())}

        def in_bins(x):
            idx = index(x)
            return [np.unique(x[idx == b], return_counts=True) for b in values]

        for part in parts():
            for found in each(part, in_bins):
                for seen, (v, c) in zip(values.values(), found):
                    for a, k in zip(v.tolist(), c.tolist()):
                        seen[a] = seen.get(a, 0) + k

    def order_statistic(k):
        b = bins[k]
        before = int(cum[b - 1]) if b else 0
        for v in sorted(values[b]):
            before += values[b][v]
            if before > k:
                return v
        raise AssertionError("order statistic outside its bin")

    p1, p99 = (order_statistic(k0) + (r - k0) * (order_statistic(min(k0 + 1, n - 1)) - order_statistic(k0))
               for r, k0 in (ranks[1.0], ranks[99.0]))
    return float(p1), float(p99), stride


def _normalise(block, p1: float, p99: float, par: Slabs, out=None) -> np.ndarray:
    """``clip((block - p1) / (p99 - p1), 0, 1)`` as float32 (in ``out`` or a new array), on
    ``par``'s device (a block read from the volume is copied there first)."""
    xp = _xp(par)
    block = xp.asarray(block)
    x = xp.empty(block.shape, np.float32) if out is None else out
    span = p99 - p1 if p99 > p1 else 1.0

    def one(sl):
        np.subtract(block[sl], np.float32(p1), out=x[sl], dtype=np.float32, casting="unsafe")
        x[sl] *= np.float32(1.0 / span)
        np.clip(x[sl], 0.0, 1.0, out=x[sl])
    par.run(one, x.shape)
    return x


def _log_index(logs: np.ndarray) -> np.ndarray:
    """Bins of the fixed log10 histogram for values given by their log10."""
    idx = (logs - np.float32(_LOG_LO)) * np.float32(_NBINS / (_LOG_HI - _LOG_LO))
    return np.clip(idx, 0, _NBINS - 1).astype(np.intp)


def _confidence_block(ev: dict, crop_lo, par: Slabs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The unscaled confidence ``prod(map ** weight)`` on a block's coarse samples, and the log10
    histograms of each map and of the result over the samples inside the block's own region
    (``crop_lo``: each sample of the volume is counted once, whatever the chunking), as NumPy
    arrays.

    Done in log10: the histograms need the logs anyway, and the weighted geometric mean is
    their weighted sum.  The contrast is the square root of the variance map: half its log.
    """
    maps = {"texture": (ev["texture"], 1.0, _TINY), "contrast": (ev["variance"], 0.5, _TINY**2),
            "edges": (ev["edges"], 1.0, _TINY)}
    shape = ev["texture"].shape
    xp = _xp(par)
    logs = {k: xp.empty(shape, np.float32) for k in maps}
    total = xp.zeros(shape, np.float32)

    def one(sl):
        for k, (m, power, floor) in maps.items():
            lg = logs[k][sl]
            np.log10(np.maximum(m[sl], np.float32(floor)), out=lg)
            if power != 1.0:
                lg *= np.float32(power)
            total[sl] += lg * np.float32(WEIGHTS[k])
    par.run(one, shape)
    hists = {k: _host(par, xp.bincount(_log_index(v[crop_lo]).ravel(), minlength=_NBINS))
             for k, v in logs.items()}
    hists["raw"] = _host(par, xp.bincount(_log_index(total[crop_lo]).ravel(), minlength=_NBINS))
    par.run(lambda sl: np.power(np.float32(10.0), total[sl], out=total[sl]), shape)
    return total, hists


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
        if max(per_axis(value)) > max(shape):
            raise bad_value("texture_mask", name, value, f"at most the longest axis of the volume {shape} (voxels)")
    return volume, shape


@checked(
    block_size=Scale(integer=True, minimum=3),
    texture_sigma=Scale(exclusive_minimum=0),
    edge_sigma=Scale(exclusive_minimum=0),
    min_region_size=Number(integer=True, minimum=0, unit="voxels"),
    threshold=Number(exclusive_minimum=0, exclusive_maximum=1, words=("otsu",)),
    chunk_shape=Size(8, nullable=True),
    threads=Number(integer=True, minimum=1, nullable=True, unit="CPU threads; null: every CPU this process may use"),
    memory_mb=Number(minimum=MIN_MEMORY_MB, nullable=True, unit="MiB of working memory; null: no bound"),
    device=DEVICE,
)
def texture_mask(
    volume,
    *,
    block_size: int | tuple = 64,
    texture_sigma: float | tuple = 1.0,
    edge_sigma: float | tuple = 0.5,
    min_region_size: int = 250,
    threshold: str | float = "otsu",
    chunk_shape=None,
    out_confidence=None,
    out_mask=None,
    progress: Callable[[int, int], None] | bool | None = None,
    threads: int | None = None,
    memory_mb: float | None = None,
    device: str = "auto",
):
    """Mask the tissue of a downsampled volume-EM block: textured tissue versus smooth resin.

    Parameters
    ----------
    volume : array_like
        3-D (z, y, x) intensities: a NumPy array, a memory map or a ``zarr.Array``.
        With ``chunk_shape`` it is only ever sliced block by block.
    block_size : int or (int, int, int)
        Side (voxels) of the window of the local-contrast statistics (local
        standard deviation), the regional evidence; three values: per axis (z, y, x).
    texture_sigma : float or (float, float, float)
        Sigma (voxels) of the Difference-of-Gaussians band-pass that measures fine
        texture; the band is ``texture_sigma .. 4 * texture_sigma``.  Three values:
        per axis (z, y, x), e.g. the same physical width on anisotropic voxels.
    edge_sigma : float or (float, float, float)
        Sigma (voxels) of the smoothing whose central differences give the gradient
        (gradient magnitude and structure tensor); per axis as ``texture_sigma``.
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
    out_mask : array_like, optional
        Preallocated uint8 array of ``volume.shape`` (e.g. a Zarr array) that receives the
        mask chunk by chunk (and is cleaned in place, slab by slab); returned as ``mask``.
    progress : callable, bool or None
        None: a tqdm bar on stderr when there is more than one chunk; False: none;
        a callable: called as ``progress(done, total)`` after each chunk.
    threads : int or None
        CPU threads (None: every CPU this process may use); the result does not depend on it.
    memory_mb : float or None
        Working-memory budget (MiB) when ``chunk_shape`` is None: the chunks are sized to it
        (see *Memory*).  None: no bound.
    device : str
        Where the filters run: ``auto`` (a GPU when CuPy imports and a device is visible,
        else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` (see *GPU*).

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
        components_removed, holes_filled, chunks, halo, chunk_shape, threads, memory_mb,
        device ("cpu" or "cuda:N").

    Notes
    -----
    Follows the Catena EM-mask design: on a downsampled FIB-SEM block, brain tissue
    is told from resin (and other non-tissue) by its texture, not by its grey value.

    *Normalisation.* Intensities are scaled so that the 1st and 99th percentiles of
    the whole volume (a strided subsample above 16 M voxels, never per chunk) map
    to 0 and 1, then clipped to [0, 1].

    *Evidence* (scipy.ndimage, ``mode="reflect"``, kernels cut at 4 sigma), with
    ``s = texture_sigma``, ``e = edge_sigma``:

    - incoherence ``w = l3 / l1`` where ``l1 >= l2 >= l3`` are the eigenvalues
      of the structure tensor: outer products of the gradients of ``G_e * x``
      (central differences) along z, y and x, smoothed at the integration scale
      ``rho = max(2 e, 2 s)`` (eigenvalues in closed form, :func:`sym3_eigenvalues`).
      ``rho`` is tied to the texture scale because that is where tissue texture
      becomes isotropic: at ``rho = 2 s`` the membranes of neighbouring processes
      already mix.  ``w`` is ~0 on and next to a plane (a resin crack, a bright
      sheet: ``l2, l3 ~ 0``) and where two planes cross (``l1 ~ l2``, ``l3 ~ 0``:
      a test of ``l2`` alone would take a crossing for texture), and ~1 in
      isotropic texture (tissue, where many membranes of all orientations meet
      within ``rho``) and in plain noise; it is applied to the band-pass energies
      *before* they are averaged, so planar structures and their crossings
      contribute (almost) no evidence;
    - texture ``T``: Gaussian average (sigma ``4 s``) of ``w * |G_s * x - G_4s * x|``;
    - local contrast ``C``: local standard deviation over a ``block_size`` cube,
      ``sqrt(E[x^2] - E[x]^2)`` from two uniform filters;
    - edges ``E``: Gaussian average (sigma ``4 s``) of ``w * |grad G_e * x|``.

    *Sampling.*  ``x`` (normalised), ``G_e * x``, ``G_s * x`` (from it), the band-pass,
    the gradients and their products are computed at every voxel.  Every wide smoothing
    after them (``G_4s``, the tensor at ``rho``, the averages at ``4 s``, the
    ``block_size`` window) is evaluated at the voxels of even global index only (the x
    pass on every voxel, the y pass on even x, the z pass on even x and y: exact at those
    samples) and interpolated linearly back to every voxel where needed (the surround,
    ``w``, the confidence): those maps vary at scales of 2 sigma and more.  The
    histograms below are of the samples.

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
    than it are filled, in 3-D (as ``skimage.morphology.remove_small_objects`` /
    ``remove_small_holes``): the mask is labelled in z-slabs whose components are
    joined across the slab faces (:class:`~maskworks.em.postprocess.SlabComponents`).

    *Threads.*  Every filter pass and element-wise step runs on slabs of the block in
    ``threads`` threads (scipy.ndimage and NumPy release the GIL); a 1-D pass is split
    along another axis, so the result does not depend on the number of threads.

    *Memory.*  In memory, the work takes five float32 arrays of the block (reused from
    step to step) besides the input, the confidence and the mask.  With ``memory_mb`` the
    chunks are chosen (:func:`memory_chunks`) so that a chunk with its halo fits the
    budget (z-slabs with the full y/x extent where they fit), the clean-up's slabs too, and
    with ``out_confidence`` and ``out_mask`` (Zarr arrays) nothing of the volume's size is
    held: the peak is the budget, measured in bench/bench_texture.py.

    *GPU.*  With a GPU (:mod:`maskworks.backend`) each chunk is copied to the device and
    normalised there, and the evidence, its histograms and the confidence are computed by
    the same steps in CuPy and cupyx.scipy.ndimage (a whole chunk per call), then the chunk's
    confidence is copied back.  The percentiles, the threshold and the clean-up stay on the
    CPU (``threads``).  cupyx sums a float32 input in float32 where scipy sums in float64: the
    Gaussian passes differ from the CPU's by float32 rounding, and the box statistics of the
    local contrast (whose difference cancels) are taken in float64 on the device.  The
    confidence equals the CPU's to ~1e-4 and a voxel whose confidence lies that close to the
    threshold may flip.  ``memory_mb`` sizes the chunks by the CPU's working set; on the
    device a chunk takes more than that (the float64 box statistics, 16 bytes per voxel
    while they last, and CuPy's temporaries for passes done in place): to fit a GPU's
    memory, give a smaller budget or a ``chunk_shape``.  The volume is read on the host
    (NumPy, memory map or Zarr).

    *Chunks.*  Each chunk is read with a halo of ``stats["halo"]`` voxels, the
    summed support of the longest filter chain (at least ``max(4 x the largest
    sigma, block_size / 2)``), and only its centre is kept; at the volume border
    the chunk reaches the real border, so ``reflect`` matches the unchunked run;
    the coarse samples sit on the volume's even indices whatever the chunk.
    Results equal the unchunked ones to float rounding (the uniform filter's
    running sums start at different places); the mask is the same.
    """
    volume, shape = _check(volume, texture_sigma, edge_sigma)
    b = get_backend(device)  # before anything is read: a GPU asked for and missing is an error at once
    sc = _scales(texture_sigma, edge_sigma, block_size)
    halo = sc["halo"]
    itemsize = np.dtype(volume.dtype).itemsize
    if memory_mb is not None:
        return_freed_memory()
    if chunk_shape is None and memory_mb is not None:
        # what the stores hold while a chunk is read or written: a few of their decoded chunks
        reserve = 4 * _chunk_bytes(volume) + 2 * _chunk_bytes(out_confidence) + 2 * _chunk_bytes(out_mask)
        room = float(memory_mb) - reserve / 2**20
        if room < MIN_MEMORY_MB / 2:
            raise InputError(f"texture_mask: memory_mb={memory_mb} leaves {room:.0f} MiB for the work once the "
                             f"Zarr chunks of the input and outputs ({reserve / 2**20:.0f} MiB) are held; "
                             "give more memory or store them in smaller chunks")
        chunk_shape = memory_chunks(shape, halo, room, itemsize)
    chunk_shape = None if chunk_shape is None else tuple(int(c) for c in chunk_shape)
    if chunk_shape is None and not isinstance(volume, np.ndarray):
        volume = np.asarray(volume[...])
    total = n_blocks(shape, chunk_shape)
    nthreads = resolve_threads(threads)
    p1, p99, stride = _intensity_range(volume, shape, chunk_shape, nthreads)
    confidence = _output(out_confidence, "out_confidence", shape, np.float32)
    mask = _output(out_mask, "out_mask", shape, np.uint8)

    bar, report = progress_reporter(progress, total, "texture_mask")
    hists = {k: np.zeros(_NBINS, np.int64) for k in (*WEIGHTS, "raw")}
    try:
        with Slabs(nthreads) as par, b.context():
            run = _OnDevice(b) if b.is_gpu else par  # the evidence's runner: the GPU or the threads
            work = _Work(_xp(run))
            for done, blk in enumerate(iter_blocks(shape, chunk_shape, halo), start=1):
                phase = _phase(blk.outer)
                outer = _extent(blk.outer)
                x = _normalise(volume[blk.outer], p1, p99, run, out=work.get("a", outer))
                ev = _evidence(x, sc, phase, run, work)
                raw, h = _confidence_block(ev, _lo_crop(blk.crop, phase), run)
                del ev, x
                for k in hists:
                    hists[k] += h[k]
                if run is par and isinstance(confidence, np.ndarray) and blk.outer == blk.inner:
                    upsample(raw, phase, outer, par, out=confidence[blk.inner])
                else:
                    up = upsample(raw, phase, outer, run, out=work.get("b", outer))
                    confidence[blk.inner] = _host(run, up[blk.crop])
                    del up
                del raw
                report(done)

            scales = {k: max(_hist_percentile(hists[k], 99.0), MIN_SCALE) for k in WEIGHTS}
            gain = 1.0 / math.prod(scales[k] ** w for k, w in WEIGHTS.items())
            if threshold == "otsu":
                t = _otsu(hists["raw"], np.minimum(_bin_centres() * gain, 1.0), np.minimum(_bin_tops() * gain, 1.0))
                method = "otsu"
            else:
                t, method = float(threshold), "fixed"

            for blk in iter_blocks(shape, chunk_shape, 0):
                c = np.asarray(confidence[blk.inner], dtype=np.float32)
                m = np.empty(c.shape, np.uint8)

                def scale(sl, c=c, m=m):
                    c[sl] *= np.float32(gain)
                    np.clip(c[sl], 0.0, 1.0, out=c[sl])
                    np.greater(c[sl], t, out=m[sl], casting="unsafe")
                par.run(scale, c.shape)
                confidence[blk.inner] = c
                mask[blk.inner] = m
                del c, m
            del work
            if b.is_gpu:  # the chunks' work arrays go back to the device, not just to CuPy's pool
                b.xp.get_default_memory_pool().free_all_blocks()
            step = clean_step(shape, nthreads, memory_mb, in_memory=isinstance(mask, np.ndarray))
            removed, filled = _clean(mask, int(min_region_size), par, step)
            masked = sum(int(np.count_nonzero(mask[z0:z0 + step])) for z0 in range(0, shape[0], step))
    finally:
        if bar is not None:
            bar.close()

    stats = {
        "voxels": int(np.prod(shape)),
        "fraction_masked": masked / max(1, int(np.prod(shape))),
        "threshold": float(t),
        "threshold_method": method,
        "intensity_p1": p1,
        "intensity_p99": p99,
        "intensity_sample_stride": stride,
        "evidence_scales": scales,
        "evidence_weights": dict(WEIGHTS),
        # one number per scale where every axis has the same, else three (z, y, x)
        "filter_sigmas": {k: v[0] if len(set(v)) == 1 else list(v) for k, v in sc.items() if k.endswith("sigma")},
        "components_removed": removed,
        "holes_filled": filled,
        "chunks": total,
        "halo": halo,
        "chunk_shape": list(chunk_shape) if chunk_shape is not None else None,
        "threads": nthreads,
        "memory_mb": memory_mb,
        "device": b.device,
    }
    return mask, confidence, stats


def _chunk_bytes(array) -> int:
    """Bytes of one decoded chunk of a chunked array (Zarr); 0 for anything else."""
    chunks = getattr(array, "chunks", None)
    if array is None or isinstance(array, np.ndarray) or not chunks:
        return 0
    return int(np.prod([int(c) for c in chunks])) * np.dtype(array.dtype).itemsize


def _output(out, name, shape, dtype):
    """``out`` (a preallocated array of ``shape``, e.g. Zarr) or a new NumPy array."""
    if out is None:
        return np.zeros(shape, dtype)
    if tuple(out.shape) != shape:
        raise InputError(f"texture_mask: {name} has shape {tuple(out.shape)}; expected the volume's shape {shape}")
    return out


def memory_chunks(shape, halo: int, memory_mb: float, itemsize: int = 4) -> tuple[int, int, int]:
    """The chunk of the largest volume whose working set (with its halo) fits ``memory_mb``.

    z-slabs with the full y/x extent where they fit (the halo is then paid along z only); else
    the y and x extents are halved, the longer first, until a slab of at least 8 planes fits.
    """
    budget = float(memory_mb) * 2**20 / (WORK_BYTES_PER_VOXEL + itemsize)
    nz, ny, nx = (int(s) for s in shape)
    cy, cx = ny, nx
    while True:
        oy, ox = min(ny, cy + 2 * halo), min(nx, cx + 2 * halo)
        cz = int(budget // (oy * ox)) - 2 * halo
        if cz >= min(nz, 8) or (cy <= 8 and cx <= 8):
            return (max(8, min(nz, cz)), cy, cx)
        if cy >= cx:
            cy = max(8, -(-cy // 2))
        else:
            cx = max(8, -(-cx // 2))


def clean_step(shape, threads: int, memory_mb: float | None, in_memory: bool = True) -> int:
    """z-planes per slab of the clean-up: one slab per thread, fewer planes where ``memory_mb``
    bounds the slabs (each of the threads holds one)."""
    nz = int(shape[0])
    step = -(-nz // max(1, threads))
    if memory_mb is not None and not in_memory:
        plane = int(np.prod(shape[1:]))
        step = min(step, max(1, int(float(memory_mb) * 2**20 / (CLEAN_BYTES_PER_VOXEL * plane * max(1, threads)))))
    return step


def _clean(mask, min_size: int, par: Slabs, step: int) -> tuple[int, int]:
    """Remove small components and fill small holes of ``mask`` (a NumPy or Zarr array) in
    place, z-slab by z-slab (``step`` planes; components merged across the slabs, see
    :class:`~maskworks.em.postprocess.SlabComponents`); return how many of each."""
    if min_size <= 1:
        return 0, 0
    in_memory = isinstance(mask, np.ndarray)
    lock = threading.Lock()

    def flip_small(select, value) -> int:
        """Set 6-connected components of ``select(planes)`` below min_size to ``value``; count them."""
        comp = SlabComponents(lambda z0, z1: select(np.asarray(mask[z0:z1])), mask.shape, connectivity=1,
                              step=step, par=par, keep=in_memory)
        small = comp.sizes < min_size
        small[0] = False
        count = int(np.count_nonzero(small))
        if count:
            def one(sl):
                for k in range(sl[0].start, sl[0].stop):
                    if comp.touches(k, small):
                        z0, z1 = comp.bounds[k]
                        planes = np.asarray(mask[z0:z1])
                        np.putmask(planes, comp.lookup(k, small), value)
                        if not in_memory:
                            with lock:  # slabs may share a Zarr chunk: one write at a time
                                mask[z0:z1] = planes
            par.run(one, (len(comp.bounds),))
        return count

    removed = flip_small(lambda m: m != 0, 0)
    filled = flip_small(lambda m: m == 0, 1)
    return removed, filled
