"""Clean up a binary EM mask: close gaps, open, keep the largest object, fill holes, grow/shrink."""

from __future__ import annotations

import itertools
import threading

import numpy as np
from scipy import ndimage as ndi

from maskworks.backend import Backend, get_backend
from maskworks.io import InputError
from maskworks.io.blocks import Slabs, resolve_threads, return_freed_memory
from maskworks.io.params import DEVICE, Choice, Flag, Number, Scale, bad_value, checked

# The axis of the slices that ``fill_holes_2d`` fills, by name.
SLICE_AXES = {"z": 0, "y": 1, "x": 2}

# A ball radius beyond this is no clean-up any more (and its structuring element alone would be huge).
MAX_RADIUS = 50
# Bytes per voxel of a slab (with its halo) of one pass: the planes read, the Euclidean distance
# transform's own arrays (measured: 41 bytes per voxel with scipy 1.17) and the planes written.
SLAB_BYTES_PER_VOXEL = 56
# The smallest working-memory budget.
MIN_MEMORY_MB = 16
# cupyx's distance transform pads its input to a cube of the longest side (and encodes that cube
# in two int32 arrays, int64 beyond 1024): on a GPU it runs on tiles of at most this side.
GPU_EDT_TILE = 256
# NumPy and scipy.ndimage: the morphology and labelling helpers take a backend (the CPU's or a GPU's).
_HOST = Backend("cpu", np, ndi)


@checked(
    opening_radius=Scale(minimum=0, maximum=MAX_RADIUS, unit="voxels; 0: off"),
    closing_radius=Scale(minimum=0, maximum=MAX_RADIUS, unit="voxels; 0: off"),
    grow_radius=Scale(minimum=-MAX_RADIUS, maximum=MAX_RADIUS, unit="voxels; < 0 shrinks"),
    keep_largest=Flag(),
    fill_holes=Flag(),
    fill_holes_2d=Choice(tuple(SLICE_AXES), nullable=True),
    threads=Number(integer=True, minimum=1, nullable=True, unit="CPU threads; null: every CPU this process may use"),
    memory_mb=Number(minimum=MIN_MEMORY_MB, nullable=True, unit="MiB of working memory; null: no bound"),
    device=DEVICE,
)
def postprocess_mask(
    mask,
    *,
    opening_radius: float | tuple = 1,
    keep_largest: bool = True,
    fill_holes: bool = True,
    grow_radius: float | tuple = 0,
    closing_radius: float | tuple = 0,
    fill_holes_2d: str | None = None,
    threads: int | None = None,
    memory_mb: float | None = None,
    out=None,
    device: str = "auto",
) -> tuple[np.ndarray, dict]:
    """Post-process a binary segmentation mask in 3-D (or 2-D).

    Parameters
    ----------
    mask : array-like of bool or int, shape (z, y, x) or (y, x)
        Binary mask; any non-zero value (1, 255, ...) is foreground.
    opening_radius : float or (float, float, float)
        Radius in voxels of the ball for a binary opening, which removes specks
        and thin spurs; 0 turns it off.  Three values (z, y, x): the radii of an
        ellipsoid, e.g. the same physical radius on anisotropic voxels (3-D only;
        so for every radius).
    keep_largest : bool
        Keep only the largest connected component (26-connected in 3-D,
        8-connected in 2-D).  Ties go to the component met first in C order.
    fill_holes : bool
        Fill cavities: background regions (6-connected in 3-D, 4-connected in
        2-D) that touch no face of the array.
    grow_radius : float or (float, float, float)
        Dilate (> 0) or erode (< 0) the result by a ball of ``abs(grow_radius)``
        voxels; 0 leaves it as it is.
    closing_radius : float or (float, float, float)
        Radius in voxels of the ball for a binary closing that bridges small
        gaps before anything else; 0 turns it off.
    fill_holes_2d : {"z", "y", "x"} or None
        After the 3-D fill, also fill the holes of every 2-D slice across this
        axis (background 4-connected regions that touch no edge of the slice):
        a tissue outline closed in each section is filled even where the hole
        opens to a neighbouring section.  None: no per-slice fill.
    threads : int or None
        CPU threads (None: every CPU this process may use).  A 3-D mask is processed in
        z-slabs, one or more per thread, with a halo of the ball radius: the result is the
        same whatever the number of threads.
    memory_mb : float or None
        Bound the working memory (MiB) of a 3-D mask: it is then read, processed and written
        slab by slab (``mask`` and ``out`` may be Zarr arrays), the intermediate masks kept in
        compressed in-memory Zarr arrays, the components and holes found by
        :class:`SlabComponents`.  None: the whole mask in memory.
    out : array_like, optional
        Preallocated uint8 array of the mask's shape (e.g. a Zarr array) that receives the
        result; returned as ``mask``.
    device : str
        ``auto`` (a GPU when CuPy imports and a device is visible, else the CPU), ``cpu``,
        ``cuda`` or ``cuda:N``.  On a GPU the whole mask is processed on the device
        (cupyx.scipy.ndimage: labels of the whole mask, distance transforms on tiles of
        ``GPU_EDT_TILE`` voxels a side with the ball's reach around them); with
        ``memory_mb`` the slabs' morphology runs there one slab at a time and the
        components are found on the CPU.  Same voxels as on the CPU.  The mask is read on
        the host (NumPy, memory map or Zarr).

    Returns
    -------
    mask : ndarray of uint8
        0/1 mask, same shape as the input.
    stats : dict
        ``voxels_in``, ``voxels_out``, ``fraction_in``, ``fraction_out``,
        ``components_in`` (connected components of the input),
        ``components_removed`` (dropped by ``keep_largest``), ``components_out``,
        ``holes_filled`` (voxels), ``holes_filled_2d``, the parameters, ``threads``,
        ``memory_mb`` and ``device``.

    Notes
    -----
    Follows the intent of the Catena EM-mask post-processing (opening, largest
    connected component, hole filling, optional growing), but every step is done
    in 3-D on the whole volume instead of slice by slice.  The order is:
    closing -> opening -> largest component -> hole filling -> grow/shrink.

    Structuring elements are Euclidean balls, ``x**2 + y**2 + z**2 <= r**2``
    (``skimage.morphology.ball(r)``), in voxels, or with three radii the ellipsoids
    ``(z/rz)**2 + (y/ry)**2 + (x/rx)**2 <= 1`` (the distance transform measured with
    ``sampling = 1 / r``).  Erosion and dilation are computed from exact Euclidean
    distance transforms (a voxel is within ``r`` of the foreground iff the
    dilation by ``ball(r)`` covers it), which gives the same voxels as the
    structuring-element definition at a cost independent of ``r``.

    The object is assumed to continue beyond the array faces: erosions treat
    the outside as foreground, so neither the closing nor the opening nor a
    shrink eats into a mask where it meets a face (scipy's ``binary_closing``
    would), and the closing never removes voxels.  Foreground components use
    full connectivity and background (holes) face connectivity, the pair that
    keeps digital topology consistent.
    """
    shape = tuple(int(n) for n in np.shape(mask))
    if len(shape) not in (2, 3):
        raise InputError(f"mask has shape {shape} ({len(shape)}-D) but a 3-D volume or 2-D image is needed")
    dtype = np.dtype(mask.dtype) if hasattr(mask, "dtype") else np.asarray(mask).dtype
    if dtype.kind not in "biu":
        raise InputError(
            f"mask has dtype {dtype} but an integer or boolean mask is needed; "
            "threshold probabilities before post-processing"
        )
    radii = {k: _radius(v, k, len(shape)) for k, v in (("opening_radius", opening_radius),
                                                       ("closing_radius", closing_radius), ("grow_radius", grow_radius))}
    params = {"opening_radius": radii["opening_radius"], "keep_largest": bool(keep_largest),
              "fill_holes": bool(fill_holes), "grow_radius": radii["grow_radius"],
              "closing_radius": radii["closing_radius"], "fill_holes_2d": fill_holes_2d}
    nthreads = resolve_threads(threads)
    b = get_backend(device)
    if len(shape) == 2 or (b.is_gpu and memory_mb is None):
        with b.context():
            out_mask, st = _whole(b, mask, params)
        if out is not None:
            out[...] = out_mask
            out_mask = out
        # in one piece, one thread (the device's own parallelism on a GPU)
        return out_mask, {**st, **params, "threads": 1, "memory_mb": None, "device": b.device}
    if memory_mb is not None:
        return_freed_memory()
    if memory_mb is None and not isinstance(mask, np.ndarray):
        mask = np.asarray(mask[...])
    with Slabs(nthreads) as par, b.context():
        job = _Slabwise(shape, par, memory_mb, max(_reach(r)[0] for r in radii.values()), b)
        return job.run(mask, out, params)


def _radius(value, name, ndim):
    """A radius as one number, or three (z, y, x) when they differ (an ellipsoid); the three of a
    shrink (< 0) must all be <= 0 and those of a growth >= 0."""
    if not isinstance(value, (tuple, list)):
        return value
    values = tuple(float(v) for v in value)
    if ndim != 3:
        raise bad_value("postprocess_mask", name, value, "one number for a 2-D mask (three are a 3-D ellipsoid)")
    if min(values) < 0 < max(values):
        raise bad_value("postprocess_mask", name, value, "three radii of one sign (all < 0 shrinks, all > 0 grows)")
    return values[0] if len(set(values)) == 1 else values


def _magnitude(r):
    return tuple(abs(v) for v in r) if isinstance(r, tuple) else abs(r)


def _sign(r) -> int:
    v = sum(r) if isinstance(r, tuple) else r
    return (v > 0) - (v < 0)


def _reach(r, ndim: int = 3) -> tuple[int, ...]:
    """Per axis, the whole voxels a radius reaches (the margins and halos it needs)."""
    values = r if isinstance(r, tuple) else (r,) * ndim
    return tuple(int(np.ceil(abs(v))) for v in values)


def _whole(b: Backend, mask, p) -> tuple[np.ndarray, dict]:
    """The whole pipeline on the whole array at once, 2-D (disks, 8-/4-connectivity) or 3-D
    (balls, 26-/6-connectivity), in ``b``'s array module: a 2-D image, or a 3-D mask on a GPU.
    Gives the same voxels as the slab-wise pipeline (tested on the CPU)."""
    xp = b.xp
    host = np.asarray(mask[...]) if hasattr(mask, "dtype") and not isinstance(mask, np.ndarray) else np.asarray(mask)
    fg = b.asarray(host) != 0
    full = ndi.generate_binary_structure(fg.ndim, fg.ndim)  # on the host: cupyx's label takes it there
    _, components_in = b.ndi.label(fg, structure=full)
    voxels_in = int(xp.count_nonzero(fg))
    if p["closing_radius"]:
        fg = _erode(b, _dilate(b, fg, p["closing_radius"]), p["closing_radius"])
    if p["opening_radius"]:
        fg = _dilate(b, _erode(b, fg, p["opening_radius"]), p["opening_radius"])
    components_removed = 0
    if p["keep_largest"]:
        labels, n = b.ndi.label(fg, structure=full)
        if int(n) > 1:
            fg = labels == _first_largest(b, labels)
            components_removed = int(n) - 1
        del labels
    holes_filled = 0
    if p["fill_holes"]:
        holes = _holes(b, fg)
        holes_filled = int(xp.count_nonzero(holes))
        fg |= holes
        del holes
    holes_filled_2d = 0
    if p["fill_holes_2d"] is not None:
        holes_filled_2d = _fill_slices(b, fg, None if fg.ndim == 2 else SLICE_AXES[p["fill_holes_2d"]])
    if _sign(p["grow_radius"]) > 0:
        fg = _dilate(b, fg, p["grow_radius"])
    elif _sign(p["grow_radius"]) < 0:
        fg = _erode(b, fg, _magnitude(p["grow_radius"]))
    voxels_out = int(xp.count_nonzero(fg))
    components_out = int(b.ndi.label(fg, structure=full)[1])
    out = b.to_numpy(fg.astype(np.uint8))
    size = max(out.size, 1)
    return out, {
        "voxels_in": voxels_in, "voxels_out": voxels_out, "fraction_in": voxels_in / size,
        "fraction_out": voxels_out / size, "components_in": int(components_in),
        "components_removed": int(components_removed), "components_out": components_out,
        "holes_filled": holes_filled, "holes_filled_2d": holes_filled_2d,
    }


def _first_largest(b: Backend, labels) -> int:
    """The label of the largest component; ties go to the one met first in C order (a GPU's
    labelling need not number the components in that order)."""
    xp = b.xp
    sizes = xp.bincount(labels.ravel())
    sizes[0] = 0
    tied = b.to_numpy(xp.flatnonzero(sizes == sizes.max()))
    if len(tied) == 1:
        return int(tied[0])
    flat = labels.ravel()
    return int(min(tied, key=lambda c: int(xp.argmax(flat == int(c)))))


class _Slabwise:
    """The 3-D pipeline as passes over z-slabs, each from one array to the next.

    In memory (``memory_mb`` None) the arrays are NumPy arrays and there is one slab per
    thread; with a budget, the intermediate masks are compressed in-memory Zarr arrays (a
    mask compresses to a few percent) and the slabs are as many planes as the budget allows
    for every thread at once.  A morphological pass reads its slab with a halo of the ball
    radius along z (the slabs span y and x whole), so each slab's result is exact.  With a GPU
    backend ``b`` the morphology of each slab runs on the device, one slab after another in the
    calling thread; the components are found on the CPU.
    """

    def __init__(self, shape, par, memory_mb, radius, b: Backend = _HOST):
        self.shape, self.par, self.memory_mb, self.b = shape, par, memory_mb, b
        nz, plane = shape[0], int(np.prod(shape[1:]))
        if memory_mb is None:
            self.step = -(-nz // par.threads)
        else:
            room = int(float(memory_mb) * 2**20 / (SLAB_BYTES_PER_VOXEL * plane * par.threads))
            self.step = room - 2 * radius
            if self.step < 1:
                need = (2 * radius + 1) * plane * SLAB_BYTES_PER_VOXEL * par.threads / 2**20
                raise InputError(
                    f"postprocess_mask: memory_mb={memory_mb} cannot hold one slab of {shape[1]}x{shape[2]} planes "
                    f"and a halo of {radius} (ball radius) for {par.threads} thread(s); at least {need:.0f} is needed")
            self.step = min(self.step, -(-nz // par.threads))
        self.bounds = [(z0, min(nz, z0 + self.step)) for z0 in range(0, nz, self.step)]

    def new(self):
        """An intermediate mask: NumPy in memory, else a compressed in-memory Zarr array."""
        if self.memory_mb is None:
            return np.zeros(self.shape, bool)
        from maskworks.io.ngff import scratch_array

        return scratch_array(self.shape, (self.step, *self.shape[1:]), bool)

    def read(self, src, z0, z1) -> np.ndarray:
        return np.asarray(src[z0:z1]) != 0

    def each(self, fn, halo, src, dst):
        """``dst[z0:z1] = fn(src planes z0 - halo .. z1 + halo)[crop]`` for every slab; the threads
        compute a batch of slabs at once, which are then written one after another."""
        nz = self.shape[0]
        for b0 in range(0, len(self.bounds), self.par.threads):
            batch = self.bounds[b0:b0 + self.par.threads]

            def one(sl, batch=batch):
                res = []
                for z0, z1 in batch[sl[0]]:
                    h0, h1 = max(0, z0 - halo), min(nz, z1 + halo)
                    res.append(fn(self.read(src, h0, h1))[z0 - h0:z1 - h0])
                return res
            parts = [one((slice(0, len(batch)),))] if self.b.is_gpu else self.par.run(one, (len(batch),))
            for (z0, z1), r in zip(batch, (r for p in parts for r in p)):
                dst[z0:z1] = r
        return dst

    def morph(self, op, r):
        """``fg -> op(fg, r)`` on host planes, computed with the backend (on its device)."""
        b = self.b
        if not b.is_gpu:
            return lambda fg: op(b, fg, r)
        return lambda fg: b.to_numpy(op(b, b.asarray(fg), r))

    def count(self, src) -> int:
        return sum(int(np.count_nonzero(np.asarray(src[z0:z1]))) for z0, z1 in self.bounds)

    def components(self, src, connectivity, background=False) -> SlabComponents:
        read = (lambda a, b: np.asarray(src[a:b]) == 0) if background else (lambda a, b: self.read(src, a, b))
        return SlabComponents(read, self.shape, connectivity=connectivity, step=self.step, par=self.par,
                              keep=False)

    def select(self, comp, table, src, dst, combine):
        """``dst = combine(src planes, table[component number])`` slab by slab."""
        def one(sl):
            for k in range(sl[0].start, sl[0].stop):
                z0, z1 = comp.bounds[k]
                res = combine(self.read(src, z0, z1), comp.lookup(k, table))
                dst[z0:z1] = res
        # the writes of a Zarr intermediate are not thread-safe across its chunks: one at a time
        if self.memory_mb is None:
            self.par.run(one, (len(comp.bounds),))
        else:
            one((slice(0, len(comp.bounds)),))
        return dst

    def run(self, mask, out, p):
        shape = self.shape
        voxels_in = self.count(mask)
        components_in = self.components(mask, 3).n
        cur = mask
        if p["closing_radius"]:
            r = p["closing_radius"]
            cur = self.each(self.morph(_dilate, r), _reach(r)[0], cur, self.new())
            cur = self.each(self.morph(_erode, r), _reach(r)[0], cur, self.new())
        if p["opening_radius"]:
            r = p["opening_radius"]
            cur = self.each(self.morph(_erode, r), _reach(r)[0], cur, self.new())
            cur = self.each(self.morph(_dilate, r), _reach(r)[0], cur, self.new())
        components_removed = 0
        if p["keep_largest"]:
            comp = self.components(cur, 3)
            if comp.n > 1:
                keep = np.zeros(comp.n + 1, bool)
                keep[int(np.argmax(comp.sizes))] = True  # sizes[0] = 0; ties: the first in C order
                cur = self.select(comp, keep, cur, self.new(), lambda fg, hit: hit)
                components_removed = comp.n - 1
        holes_filled = 0
        if p["fill_holes"]:
            comp = self.components(cur, 1, background=True)
            hole = ~comp.border
            hole[0] = False
            holes_filled = int(comp.sizes[hole].sum())
            if holes_filled:
                cur = self.select(comp, hole, cur, self.new(), lambda fg, hit: fg | hit)
        holes_filled_2d = 0
        if p["fill_holes_2d"] is not None:
            cur, holes_filled_2d = self._fill_2d(cur, SLICE_AXES[p["fill_holes_2d"]])
        g = p["grow_radius"]
        final = out if out is not None else np.zeros(shape, np.uint8)
        op = self.morph(_dilate, g) if _sign(g) > 0 else self.morph(_erode, _magnitude(g)) if _sign(g) < 0 \
            else (lambda fg: fg)
        self.each(lambda fg: op(fg).astype(np.uint8), _reach(g)[0], cur, final)
        voxels_out = self.count(final)
        size = max(int(np.prod(shape)), 1)
        stats = {
            "voxels_in": voxels_in, "voxels_out": voxels_out, "fraction_in": voxels_in / size,
            "fraction_out": voxels_out / size, "components_in": int(components_in),
            "components_removed": int(components_removed), "components_out": self.components(final, 3).n,
            "holes_filled": holes_filled, "holes_filled_2d": holes_filled_2d,
            **p, "threads": self.par.threads, "memory_mb": self.memory_mb, "device": self.b.device,
        }
        return final, stats

    def _fill_2d(self, src, axis):
        """Fill the 2-D holes of every slice across ``axis``, in slabs along that axis."""
        dst = self.new()
        n = self.shape[axis]
        plane = int(np.prod(self.shape)) // n
        if self.memory_mb is None:
            step = -(-n // self.par.threads)
        else:
            step = max(1, int(float(self.memory_mb) * 2**20 / (SLAB_BYTES_PER_VOXEL * plane * self.par.threads)))
        bounds = [(a, min(n, a + step)) for a in range(0, n, step)]

        def index(a, b):
            ix = [slice(None)] * 3
            ix[axis] = slice(a, b)
            return tuple(ix)

        lock = threading.Lock()  # slabs along y or x share the Zarr chunks of an intermediate

        def one(sl):
            filled = 0
            for a, b in bounds[sl[0]]:
                fg = np.asarray(src[index(a, b)]) != 0
                filled += _fill_slices(_HOST, fg, axis)
                with lock:
                    dst[index(a, b)] = fg
            return filled
        return dst, sum(self.par.run(one, (len(bounds),)))


def _bbox(b: Backend, fg, margin) -> tuple[slice, ...] | None:
    """Bounding box of the foreground grown by ``margin`` (one number, or one per axis), clipped to
    the array; None if empty."""
    margins = margin if isinstance(margin, tuple) else (margin,) * fg.ndim
    box = []
    for axis in range(fg.ndim):
        hit = b.to_numpy(b.xp.flatnonzero(fg.any(axis=tuple(a for a in range(fg.ndim) if a != axis))))
        if hit.size == 0:
            return None
        m = margins[axis]
        box.append(slice(max(0, int(hit[0]) - m), min(fg.shape[axis], int(hit[-1]) + 1 + m)))
    return tuple(box)


def _dilate(b: Backend, fg, r):
    """Dilation by ``ball(r)`` (an ellipsoid for three radii): voxels within ``r`` of the foreground."""
    box = _bbox(b, fg, _reach(r, fg.ndim))
    if box is None:
        return fg.copy()
    out = b.xp.zeros_like(fg)
    out[box] = _within(b, ~fg[box], r)
    return out


def _erode(b: Backend, fg, r):
    """Erosion by ``ball(r)`` with the outside of the array counted as foreground.

    Background beyond the bounding box is at least as far as the box's
    one-voxel rim, so the transform only needs the box plus that rim.
    """
    box = _bbox(b, fg, 1)
    if box is None:
        return fg.copy()
    out = b.xp.zeros_like(fg)
    out[box] = ~_within(b, fg[box], r)  # no background in the box: all kept
    return out


def _within(b: Backend, x, r, tile: int | None = None):
    """True where a zero of ``x`` lies within distance ``r`` (``distance_transform_edt(x) <= r``;
    three radii: within the ellipsoid, ``distance_transform_edt(x, sampling=1 / r) <= 1``).

    On a GPU (or with ``tile``) the transform runs on tiles of at most ``tile`` voxels a side,
    each read with a margin of ``r``: a zero within ``r`` of a voxel lies within ``r`` of it
    along every axis, so the tiles give the whole array's answer exactly.
    """
    tile = tile or (GPU_EDT_TILE if b.is_gpu else None)
    if tile is None or max(x.shape) <= tile:
        return _near_zero(b, x, r)
    reach = _reach(r, x.ndim)
    out = b.xp.empty(x.shape, bool)
    for start in itertools.product(*(range(0, n, tile) for n in x.shape)):
        inner = tuple(slice(a, min(n, a + tile)) for a, n in zip(start, x.shape))
        outer = tuple(slice(max(0, s.start - m), min(n, s.stop + m)) for s, n, m in zip(inner, x.shape, reach))
        crop = tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))
        out[inner] = _near_zero(b, x[outer], r)[crop]
    return out


def _near_zero(b: Backend, x, r):
    if bool(x.all()):  # no zero at all (where the transform has nothing to measure from)
        return b.xp.zeros(x.shape, bool)
    if isinstance(r, tuple):  # an ellipsoid: distances in units of each axis's radius
        sampling = [1.0 / v if v > 0 else 1e9 for v in r]
        return b.ndi.distance_transform_edt(x, sampling=sampling) <= 1.0
    return b.ndi.distance_transform_edt(x) <= r


def _fill_slices(b: Backend, fg, axis: int | None) -> int:
    """Fill the 2-D holes of every slice of ``fg`` across ``axis`` in place (None: ``fg`` is one
    2-D slice); returns the voxels filled."""
    xp = b.xp
    if axis is None:
        holes = _holes(b, fg)
        fg |= holes
        return int(xp.count_nonzero(holes))
    filled = 0
    for i in range(fg.shape[axis]):
        index = [slice(None)] * fg.ndim
        index[axis] = i
        plane = fg[tuple(index)]
        if bool(plane.any()) and not bool(plane.all()):
            holes = _holes(b, plane)
            n = int(xp.count_nonzero(holes))
            if n:
                fg[tuple(index)] |= holes
                filled += n
    return filled


def _holes(b: Backend, fg):
    """Background not face-connected to any face of the array (as ``binary_fill_holes``)."""
    xp = b.xp
    labels, n = b.ndi.label(~fg)
    n = int(n)
    if n == 0:
        return xp.zeros_like(fg)
    on_face = xp.zeros(n + 1, dtype=bool)
    for axis in range(fg.ndim):
        for end in (0, -1):
            index = [slice(None)] * fg.ndim
            index[axis] = end
            on_face[labels[tuple(index)]] = True
    on_face[0] = True
    return ~on_face[labels]


def mask_overlap(mask, truth, *, ignore_label: int | None = None) -> dict:
    """Dice and Jaccard of a binary mask against a reference mask.

    Parameters
    ----------
    mask, truth : array-like of the same shape
        Non-zero is foreground; in ``truth``, voxels equal to ``ignore_label``
        (e.g. 2 in training labels) are left out of both masks.

    Returns
    -------
    dict
        ``dice``, ``jaccard`` (1.0 when both masks are empty), ``voxels`` counted,
        ``true_positive``, ``false_positive``, ``false_negative``.
    """
    mask = np.asarray(mask)
    truth = np.asarray(truth)
    if mask.shape != truth.shape:
        raise InputError(f"mask shape {mask.shape} differs from the reference shape {truth.shape}")
    keep = truth != ignore_label if ignore_label is not None else np.ones(truth.shape, bool)
    m = (mask != 0) & keep
    t = (truth != 0) & keep
    return overlap_scores(int(np.count_nonzero(m & t)), int(np.count_nonzero(m & ~t)),
                          int(np.count_nonzero(~m & t)), int(np.count_nonzero(keep)))


def overlap_scores(true_positive: int, false_positive: int, false_negative: int, voxels: int) -> dict:
    """:func:`mask_overlap`'s dict from its counts (which add up over the parts of a volume)."""
    tp, fp, fn = true_positive, false_positive, false_negative
    denom = 2 * tp + fp + fn
    return {
        "dice": 1.0 if denom == 0 else 2 * tp / denom,
        "jaccard": 1.0 if denom == 0 else tp / (tp + fp + fn),
        "voxels": voxels, "true_positive": tp, "false_positive": fp, "false_negative": fn,
    }


# ----------------------------------------------------------------------------- components by slabs


class SlabComponents:
    """Connected components of a binary volume, labelled in z-slabs and merged across the slabs'
    faces with union-find, so that the volume is never labelled (or held) whole.

    ``read(z0, z1)`` returns the boolean planes ``z0:z1`` (from memory or a Zarr array); each
    slab is labelled with :func:`scipy.ndimage.label` (in the threads of ``par``), the labels
    that touch across a slab face are joined (:func:`scipy.sparse.csgraph.connected_components`),
    and every component gets its voxel count and whether it touches a face of the volume.
    The components are those of one :func:`scipy.ndimage.label` call on the whole volume.

    ``keep``: hold the slabs' labels (int32, 4 bytes per voxel) for :meth:`ids`; otherwise
    each slab is labelled again when asked for (what an out-of-core pass does).
    """

    def __init__(self, read, shape, *, connectivity: int, step: int, par, keep: bool = True):
        self.read, self.shape, self.step = read, tuple(int(s) for s in shape), max(1, int(step))
        self.structure = ndi.generate_binary_structure(len(self.shape), connectivity)
        self.connectivity = connectivity
        nz = self.shape[0]
        self.bounds = [(z0, min(nz, z0 + self.step)) for z0 in range(0, nz, self.step)]
        # slabs are labelled a batch (one per thread) at a time; a slab's first and last planes are
        # kept only until the face it shares with the next slab has been read
        counts, sizes_parts, border_parts, pairs = [], [], [], []
        self._labels = []
        offset, last = 0, None
        for b0 in range(0, len(self.bounds), par.threads):
            ks = range(b0, min(len(self.bounds), b0 + par.threads))
            batch = [None] * len(ks)

            def one(sl, ks=ks, batch=batch):
                for i in range(sl[0].start, sl[0].stop):
                    batch[i] = self._summary(ks[i], keep)
            par.run(one, (len(ks),))
            for p in batch:
                if last is not None:
                    pairs.append(self._face_pairs(last[0], last[1], p["first"], offset))
                counts.append(p["n"])
                sizes_parts.append(p["sizes"][1:])
                border_parts.append(p["border"][p["border"] > 0] + offset)
                self._labels.append(p.get("labels"))
                last = (p["last"], offset)
                offset += p["n"]
            del batch
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self.offsets[-1])
        sizes = np.concatenate([np.zeros(1, np.int64), *sizes_parts]) if sizes_parts else np.zeros(1, np.int64)
        border = np.zeros(total + 1, bool)
        if border_parts:
            border[np.concatenate(border_parts)] = True
        border[0] = False
        root = np.arange(total + 1)
        if pairs and sum(len(q) for q in pairs):
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            q = np.concatenate(pairs)
            graph = coo_matrix((np.ones(len(q), np.int8), (q[:, 0], q[:, 1])), shape=(total + 1, total + 1))
            _, root = connected_components(graph, directed=False)
        # component numbers 1..n in order of their first label (background stays 0)
        _, first, inverse = np.unique(root, return_index=True, return_inverse=True)
        order = np.argsort(first)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        self.lut = rank[inverse].astype(np.int64)  # label 0 (background) has the lowest index: 0
        self.n = int(self.lut.max()) if total else 0
        self.sizes = np.bincount(self.lut, weights=sizes, minlength=self.n + 1).astype(np.int64)
        self.sizes[0] = 0
        self.border = np.zeros(self.n + 1, bool)
        np.logical_or.at(self.border, self.lut, border)
        self.border[0] = False

    def _summary(self, k, keep):
        z0, z1 = self.bounds[k]
        labels, n = ndi.label(self.read(z0, z1), structure=self.structure, output=np.int32)
        faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
        if z0 > 0:
            faces[0] = labels[:0, 0]
        if z1 < self.shape[0]:
            faces[1] = labels[:0, 0]
        flat = labels.reshape(-1)
        sizes = np.zeros(n + 1, np.int64)
        for i in range(0, flat.size, 1 << 20):  # in pieces: bincount casts its input to int64
            sizes += np.bincount(flat[i:i + (1 << 20)], minlength=n + 1)
        out = {"n": int(n), "sizes": sizes,
               "border": np.unique(np.concatenate([f.ravel() for f in faces])),
               "first": labels[0].copy(), "last": labels[-1].copy()}
        if keep:
            out["labels"] = labels
        return out

    def _face_pairs(self, last, off_last, first, off_first) -> np.ndarray:
        """Pairs of global labels joined across a z face (6: the same (y, x); 26: any of the 9 in reach)."""
        shifts = [(0, 0)] if self.connectivity == 1 else [
            (dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if self.structure[0, 1 + dy, 1 + dx]]
        out = []
        ny, nx = last.shape
        for dy, dx in shifts:
            a = last[max(0, -dy):ny - max(0, dy), max(0, -dx):nx - max(0, dx)]
            b = first[max(0, dy):ny - max(0, -dy), max(0, dx):nx - max(0, -dx)]
            hit = (a > 0) & (b > 0)
            if hit.any():
                out.append(np.stack([a[hit] + off_last, b[hit] + off_first], axis=1))
        if not out:
            return np.zeros((0, 2), np.int64)
        q = np.concatenate(out).astype(np.int64)
        key = np.unique(q[:, 0] * (int(q[:, 1].max()) + 1) + q[:, 1])  # 1-D: a hash, not a sort of rows
        width = int(q[:, 1].max()) + 1
        return np.stack([key // width, key % width], axis=1)

    def ids(self, k) -> np.ndarray:
        """Component numbers (0: background) of slab ``k``'s voxels."""
        return self.lookup(k, np.arange(self.n + 1))

    def lookup(self, k, table) -> np.ndarray:
        """``table[component number]`` for each voxel of slab ``k`` (``table[0]``: background)."""
        labels = self._labels[k]
        if labels is None:
            z0, z1 = self.bounds[k]
            labels, _ = ndi.label(self.read(z0, z1), structure=self.structure, output=np.int32)
        local = table[self.lut[self.offsets[k]:self.offsets[k + 1] + 1]]
        local[0] = table[0]
        return local[labels]

    def touches(self, k, table) -> bool:
        """Whether any component of slab ``k`` has ``table`` True (without labelling it again)."""
        local = table[self.lut[self.offsets[k] + 1:self.offsets[k + 1] + 1]]
        return bool(local.any())


def nearest_indices(shape, voxel_size, origin, target_shape, target_voxel_size, target_origin, unit=None,
                    target_unit=None) -> list[np.ndarray]:
    """For each axis, the index into a grid of ``shape`` (``voxel_size``, ``origin``) of the voxel
    nearest to each voxel centre of a target grid: the maps :func:`upsample_nearest` gathers with.

    Both grids' geometry is physical (voxel centres at ``origin + i * voxel_size``); units are
    converted to the target's.  Indices outside the source are clipped to its edge.
    """
    from maskworks.io import convert_length

    vs = convert_length(voxel_size, unit, target_unit) if unit and target_unit else voxel_size
    org = convert_length(origin, unit, target_unit) if unit and target_unit else origin
    maps = []
    for n, v, o, tn, tv, to in zip(shape, vs, org, target_shape, target_voxel_size, target_origin):
        centres = to + tv * np.arange(int(tn), dtype=np.float64)
        maps.append(np.clip(np.floor((centres - o) / v + 0.5).astype(np.int64), 0, int(n) - 1))
    return maps


def upsample_nearest(mask, maps, *, out=None, slab_voxels: int = 1 << 26):
    """``mask`` (NumPy or any array read by slices) resampled to the target grid of ``maps``
    (:func:`nearest_indices`), written into ``out`` z-slab by z-slab so that neither the source
    nor the target is held whole: a mask made at a coarse pyramid level written back at level 0.

    Returns ``out`` (a new NumPy array when it is None).
    """
    zmap, ymap, xmap = maps
    shape = (len(zmap), len(ymap), len(xmap))
    if out is None:
        out = np.zeros(shape, np.asarray(mask[:1, :1, :1]).dtype)
    step = max(1, slab_voxels // max(1, shape[1] * shape[2]))
    for z0 in range(0, shape[0], step):
        zs = zmap[z0:z0 + step]
        lo, hi = int(zs.min()), int(zs.max()) + 1
        source = np.asarray(mask[lo:hi])
        out[z0:z0 + len(zs)] = source[np.ix_(zs - lo, ymap, xmap)]
    return out
