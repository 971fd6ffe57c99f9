"""Clean up a binary EM mask: close gaps, open, keep the largest object, fill holes, grow/shrink."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from maskworks.io import InputError
from maskworks.io.params import Choice, Flag, Number, checked

# The axis of the slices that ``fill_holes_2d`` fills, by name.
SLICE_AXES = {"z": 0, "y": 1, "x": 2}

# A ball radius beyond this is no clean-up any more (and its structuring element alone would be huge).
MAX_RADIUS = 50


@checked(
    opening_radius=Number(integer=True, minimum=0, maximum=MAX_RADIUS, unit="voxels; 0: off"),
    closing_radius=Number(integer=True, minimum=0, maximum=MAX_RADIUS, unit="voxels; 0: off"),
    grow_radius=Number(integer=True, minimum=-MAX_RADIUS, maximum=MAX_RADIUS, unit="voxels; < 0 shrinks"),
    keep_largest=Flag(),
    fill_holes=Flag(),
    fill_holes_2d=Choice(tuple(SLICE_AXES), nullable=True),
)
def postprocess_mask(
    mask,
    *,
    opening_radius: int = 1,
    keep_largest: bool = True,
    fill_holes: bool = True,
    grow_radius: int = 0,
    closing_radius: int = 0,
    fill_holes_2d: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Post-process a binary segmentation mask in 3-D (or 2-D).

    Parameters
    ----------
    mask : array-like of bool or int, shape (z, y, x) or (y, x)
        Binary mask; any non-zero value (1, 255, ...) is foreground.
    opening_radius : int
        Radius in voxels of the ball for a binary opening, which removes specks
        and thin spurs; 0 turns it off.
    keep_largest : bool
        Keep only the largest connected component (26-connected in 3-D,
        8-connected in 2-D).  Ties go to the component met first in C order.
    fill_holes : bool
        Fill cavities: background regions (6-connected in 3-D, 4-connected in
        2-D) that touch no face of the array.
    grow_radius : int
        Dilate (> 0) or erode (< 0) the result by a ball of ``abs(grow_radius)``
        voxels; 0 leaves it as it is.
    closing_radius : int
        Radius in voxels of the ball for a binary closing that bridges small
        gaps before anything else; 0 turns it off.
    fill_holes_2d : {"z", "y", "x"} or None
        After the 3-D fill, also fill the holes of every 2-D slice across this
        axis (background 4-connected regions that touch no edge of the slice):
        a tissue outline closed in each section is filled even where the hole
        opens to a neighbouring section.  None: no per-slice fill.

    Returns
    -------
    mask : ndarray of uint8
        0/1 mask, same shape as the input.
    stats : dict
        ``voxels_in``, ``voxels_out``, ``fraction_in``, ``fraction_out``,
        ``components_in`` (connected components of the input),
        ``components_removed`` (dropped by ``keep_largest``), ``components_out``,
        ``holes_filled`` (voxels), and the parameters.

    Notes
    -----
    Follows the intent of the Catena EM-mask post-processing (opening, largest
    connected component, hole filling, optional growing), but every step is done
    in 3-D on the whole volume instead of slice by slice.  The order is:
    closing -> opening -> largest component -> hole filling -> grow/shrink.

    Structuring elements are Euclidean balls, ``x**2 + y**2 + z**2 <= r**2``
    (``skimage.morphology.ball(r)``), in voxels; anisotropic voxel sizes are not
    taken into account.  Erosion and dilation are computed from exact Euclidean
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
    arr = np.asarray(mask)
    if arr.ndim not in (2, 3):
        raise InputError(
            f"mask has shape {arr.shape} ({arr.ndim}-D) but a 3-D volume or 2-D image is needed"
        )
    if arr.dtype != bool and arr.dtype.kind not in "iu":
        raise InputError(
            f"mask has dtype {arr.dtype} but an integer or boolean mask is needed; "
            "threshold probabilities before post-processing"
        )

    fg = arr != 0
    full = ndi.generate_binary_structure(fg.ndim, fg.ndim)
    _, components_in = ndi.label(fg, structure=full)
    voxels_in = int(np.count_nonzero(fg))

    if closing_radius:
        fg = _erode(_dilate(fg, closing_radius), closing_radius)
    if opening_radius:
        fg = _dilate(_erode(fg, opening_radius), opening_radius)

    labels, n = ndi.label(fg, structure=full)
    components_removed = 0
    if keep_largest and n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = labels == int(np.argmax(sizes))
        components_removed = n - 1

    holes_filled = 0
    if fill_holes:
        holes = _holes(fg)
        holes_filled = int(np.count_nonzero(holes))
        fg |= holes
    holes_filled_2d = 0
    if fill_holes_2d is not None:
        holes_filled_2d = _fill_slices(fg, SLICE_AXES[fill_holes_2d] if fg.ndim == 3 else None)

    if grow_radius > 0:
        fg = _dilate(fg, grow_radius)
    elif grow_radius < 0:
        fg = _erode(fg, -grow_radius)

    out = fg.astype(np.uint8)
    voxels_out = int(np.count_nonzero(out))
    size = max(out.size, 1)
    stats = {
        "voxels_in": voxels_in,
        "voxels_out": voxels_out,
        "fraction_in": voxels_in / size,
        "fraction_out": voxels_out / size,
        "components_in": int(components_in),
        "components_removed": int(components_removed),
        "components_out": int(ndi.label(fg, structure=full)[1]),
        "holes_filled": holes_filled,
        "holes_filled_2d": holes_filled_2d,
        "fill_holes_2d": fill_holes_2d,
        "opening_radius": opening_radius,
        "keep_largest": bool(keep_largest),
        "fill_holes": bool(fill_holes),
        "grow_radius": grow_radius,
        "closing_radius": closing_radius,
    }
    return out, stats


def _bbox(fg: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """Bounding box of the foreground grown by ``margin``, clipped to the array; None if empty."""
    box = []
    for axis in range(fg.ndim):
        hit = np.flatnonzero(fg.any(axis=tuple(a for a in range(fg.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(0, hit[0] - margin), min(fg.shape[axis], hit[-1] + 1 + margin)))
    return tuple(box)


def _dilate(fg: np.ndarray, r: int) -> np.ndarray:
    """Dilation by ``ball(r)``: voxels within distance ``r`` of the foreground."""
    box = _bbox(fg, r)
    if box is None:
        return fg.copy()
    out = np.zeros_like(fg)
    out[box] = ndi.distance_transform_edt(~fg[box]) <= r
    return out


def _erode(fg: np.ndarray, r: int) -> np.ndarray:
    """Erosion by ``ball(r)`` with the outside of the array counted as foreground.

    Background beyond the bounding box is at least as far as the box's
    one-voxel rim, so the transform only needs the box plus that rim.
    """
    box = _bbox(fg, 1)
    if box is None:
        return fg.copy()
    out = np.zeros_like(fg)
    crop = fg[box]
    if crop.all():  # no background in reach: the mask touches the faces all round
        out[box] = True
    else:
        out[box] = ndi.distance_transform_edt(crop) > r
    return out


def _fill_slices(fg: np.ndarray, axis: int | None) -> int:
    """Fill the 2-D holes of every slice of ``fg`` across ``axis`` in place (None: ``fg`` is one
    2-D slice); returns the voxels filled."""
    if axis is None:
        holes = _holes(fg)
        fg |= holes
        return int(np.count_nonzero(holes))
    filled = 0
    for i in range(fg.shape[axis]):
        plane = np.take(fg, i, axis=axis)
        if plane.any() and not plane.all():
            holes = _holes(plane)
            n = int(np.count_nonzero(holes))
            if n:
                index = [slice(None)] * fg.ndim
                index[axis] = i
                fg[tuple(index)] |= holes
                filled += n
    return filled


def _holes(fg: np.ndarray) -> np.ndarray:
    """Background not face-connected to any face of the array (as ``binary_fill_holes``)."""
    labels, n = ndi.label(~fg)
    if n == 0:
        return np.zeros_like(fg)
    on_face = np.zeros(n + 1, dtype=bool)
    for axis in range(fg.ndim):
        for end in (0, -1):
            on_face[np.take(labels, end, axis=axis)] = True
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
    tp = int(np.count_nonzero(m & t))
    fp = int(np.count_nonzero(m & ~t))
    fn = int(np.count_nonzero(~m & t))
    denom = 2 * tp + fp + fn
    return {
        "dice": 1.0 if denom == 0 else 2 * tp / denom,
        "jaccard": 1.0 if denom == 0 else tp / (tp + fp + fn),
        "voxels": int(np.count_nonzero(keep)),
        "true_positive": tp, "false_positive": fp, "false_negative": fn,
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
        parts = [None] * len(self.bounds)

        def one(sl):
            for k in range(sl[0].start, sl[0].stop):
                parts[k] = self._summary(k, keep)
        par.run(one, (len(self.bounds),))
        counts = [p["n"] for p in parts]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self.offsets[-1])
        sizes = np.zeros(total + 1, np.int64)
        border = np.zeros(total + 1, bool)
        pairs = []
        for k, p in enumerate(parts):
            off = self.offsets[k]
            sizes[off + 1:off + 1 + p["n"]] = p["sizes"][1:]
            border[off + p["border"][p["border"] > 0]] = True
            if k:
                pairs.append(self._face_pairs(parts[k - 1]["last"], self.offsets[k - 1], p["first"], off))
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
        self._labels = [p.get("labels") for p in parts]

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
        for i in range(0, flat.size, 1 << 22):  # in pieces: bincount casts its input to int64
            sizes += np.bincount(flat[i:i + (1 << 22)], minlength=n + 1)
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
