"""Refine organelle and membrane segmentations: keep each organelle together with the membrane around it."""

from __future__ import annotations

import sys

import numpy as np
from scipy import ndimage

from maskworks.backend import get_backend
from maskworks.io import InputError
from maskworks.io.params import DEVICE, Choice, Flag, Number, checked

# Fixed sizes of the per-organelle step (voxels), as in SABER's refine-membranes.
MIN_NEAR_MEMBRANE = 100
MIN_REFINED_MEMBRANE = 50
SURFACE_FRACTION = 0.1  # keep_surface_membranes: share of a component on the organelle's surface
ELONGATION = 3.0  # max/min extent of the crop above which an organelle counts as elongated
MEMBRANE_OUTPUTS = ("dilated", "input")

# Above this largest id the bounding boxes are found on compressed ids (find_objects lists every id up to it).
_DENSE_IDS = 2**22
_SLAB_VOXELS = 2**22
# CuPy's distance transform pads its input to a cube of the longest side and needs about this many
# bytes per voxel of that cube (read from cupyx.scipy.ndimage's EDT: int32 or int64 coordinates above
# 1024 voxels a side, float64 distances): a 60 x 900 x 900 crop would ask ~6.6 GB.  Crops whose cube
# exceeds GPU_EDT_BUDGET are done in tiles (exact: a ball of radius r only sees r voxels around).
GPU_EDT_BUDGET = 2**30  # bytes


def _edt_cube_bytes(shape) -> int:
    side = max(int(n) for n in shape)
    return (17 if side > 1024 else 9) * side**3


@checked(
    ball_size=Number(integer=True, minimum=1, unit="voxels"),
    min_membrane_area=Number(integer=True, minimum=0, unit="voxels"),
    edge_trim_z=Number(integer=True, minimum=0, unit="slices"),
    edge_trim_xy=Number(integer=True, minimum=0, unit="voxels"),
    min_roi_relative_size=Number(minimum=0, maximum=1),
    keep_surface_membranes=Flag(),
    label_components=Flag(),
    membrane_output=Choice(MEMBRANE_OUTPUTS),
    device=DEVICE,
)
def refine_membranes(
    organelles,
    membranes,
    *,
    ball_size: int = 3,
    min_membrane_area: int = 10000,
    edge_trim_z: int = 5,
    edge_trim_xy: int = 3,
    min_roi_relative_size: float = 0.15,
    keep_surface_membranes: bool = False,
    label_components: bool = False,
    membrane_output: str = "dilated",
    device: str = "auto",
    progress=None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Clean a membrane segmentation and pair every organelle with the membrane around it.

    Parameters
    ----------
    organelles : array-like of int or bool, shape (z, y, x)
        Instance label map: 0 background, each organelle its own positive id.  A
        binary mask is a single organelle (id 1) unless ``label_components``.
    membranes : array-like, shape (z, y, x)
        Membrane segmentation; any non-zero value is membrane.
    ball_size : int
        Radius (voxels) of the ball that opens an organelle with its membrane; the
        bounding box of each organelle is padded by ``ball_size // 2``.
    min_membrane_area : int
        Membrane components (6-connected) with fewer voxels are removed first.
    edge_trim_z, edge_trim_xy : int
        Membrane in the first/last ``edge_trim_z`` z-slices and in a border of
        ``edge_trim_xy`` voxels in y and x is removed; 0 trims nothing.
    min_roi_relative_size : float
        An organelle whose bounding-box extent along any axis is below this
        fraction of the volume's extent along that axis is dropped.
    keep_surface_membranes : bool
        Keep only membrane components with more than 10 % of their voxels on the
        organelle's surface (removes fragments inside the organelle).
    label_components : bool
        Split the organelle mask into 6-connected components first and use those
        as the organelles (ids 1..n in the order their first voxel is met in C
        order); the input ids are not kept.
    membrane_output : {"dilated", "input"}
        ``dilated`` (SABER's output): the refined membrane is the near-membrane band
        (the membrane dilated within the organelle's vicinity) inside the cleaned
        organelle + membrane mask; ``input``: only the input membrane voxels of that
        band, so the membrane never grows.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`maskworks.backend.resolve_device`).
    progress : callable, bool or None
        None: a tqdm bar on stderr when there is more than one organelle; False:
        none; a callable: called as ``progress(done, total)`` after each organelle.

    Returns
    -------
    organelles : ndarray
        Refined organelles, each with its input id; 0 elsewhere.  The dtype is the
        smallest unsigned integer that holds the largest input id.
    membranes : ndarray
        The membrane kept for each organelle, labelled with that organelle's id.
    stats : dict
        ``organelles_in``, ``organelles_kept``, ``organelles_dropped``,
        ``organelles`` (one dict per input organelle: ``id``, ``kept``,
        ``reason``, voxel counts, bounding box, ``elongated``),
        ``membrane_voxels_in`` / ``_cleaned`` / ``_out``, ``organelle_voxels_in`` /
        ``_out``, ``z_slices_without_membrane``, ``device``, the parameters and a
        ``note`` when nothing is kept.

    Notes
    -----
    Gives SABER 1.0.1's ``refine-membranes`` result (its CPU path, ``FilteringConfig``
    defaults) voxel for voxel, with its defects fixed: ids of 127 and more no longer
    overflow uint8, ``edge_trim_* = 0`` trims nothing instead of wiping every membrane,
    uint16 inputs work, memory stays flat in the number of organelles (one crop at a
    time), and the output ids are the input ids (SABER writes id + 1).

    1. Membrane clean-up: the edge trims, then removal of 6-connected membrane
       components below ``min_membrane_area``; the result is binary.
    2. Organelle voxels in z-slices without any membrane left are zeroed.
    3. Organelles are taken one at a time in ascending id.  One whose tight
       bounding box (after step 2) is too small for ``min_roi_relative_size`` is
       dropped.  The crop is that box padded by ``ball_size // 2`` and clamped to
       the volume; membrane beyond it is not seen.  An organelle is *elongated*
       when the largest extent of the crop exceeds 3 times the smallest; it then
       uses a dilation radius of 1 and an opening radius of ``max(1, ball_size // 2)``,
       otherwise 2 and ``ball_size``.
    4. Near membrane = dilate(membrane) ∧ dilate(organelle), components of at least
       100 voxels (and, with ``keep_surface_membranes``, more than 10 % of them on
       the organelle's surface: the organelle minus its 26-neighbour erosion, the
       outside of the crop counting as background).  No near membrane: the
       organelle is dropped.  Combined = organelle ∪ near membrane, opened by the
       ball (the un-opened mask when the opening empties it), largest component.
       Refined organelle = organelle ∧ combined, largest component (an empty one
       drops the organelle).  Refined membrane = near membrane ∧ combined
       (``membrane_output="input"``: also ∧ the input membrane), components of at
       least 50 voxels; it may be empty while the organelle is kept.

    Structuring elements are Euclidean balls ``x**2 + y**2 + z**2 <= r**2`` (as
    ``skimage.morphology.ball``), applied through exact distance transforms inside
    the crop; the outside of the crop is background for dilations and erosions
    alike (scipy's ``border_value=0``, as in both of SABER's paths).  Components are
    6-connected throughout; ties for "largest" go to the component met first in C
    order, so the result does not depend on how a backend numbers components, and
    CPU and GPU give the same voxels.

    Overlaps: a refined organelle is a subset of its own input voxels, so
    organelles never overlap; a membrane voxel near two organelles goes to the
    higher id (organelles are written in ascending id and later ones overwrite
    membrane voxels), as SABER's 3-D label conversion does.
    """
    org = np.asarray(organelles)
    mem = np.asarray(membranes)
    _check_inputs(org, mem)

    b = get_backend(device)
    params = {
        "ball_size": ball_size, "min_membrane_area": min_membrane_area, "edge_trim_z": edge_trim_z,
        "edge_trim_xy": edge_trim_xy, "min_roi_relative_size": min_roi_relative_size,
        "keep_surface_membranes": bool(keep_surface_membranes), "label_components": bool(label_components),
        "membrane_output": membrane_output,
    }
    with b.context():
        labels = _instance_labels(b, org, label_components)
        max_id = int(labels.max()) if labels.size else 0
        out_dtype = label_dtype(max_id)
        out_org = np.zeros(org.shape, dtype=out_dtype)
        out_mem = np.zeros(org.shape, dtype=out_dtype)

        membrane, membrane_in = _clean_membrane(b, mem, min_membrane_area, edge_trim_z, edge_trim_xy)
        membrane_cleaned = int(membrane.sum())
        has_membrane_z = b.to_numpy(membrane.any(axis=(1, 2)))

        boxes = label_boxes(labels)
        records = []
        tick, bar = _progress(progress, len(boxes))
        try:
            for done, (oid, box) in enumerate(boxes, start=1):
                records.append(_refine_one(b, labels, membrane, has_membrane_z, oid, box, out_org, out_mem,
                                           ball_size, min_roi_relative_size, bool(keep_surface_membranes),
                                           membrane_output == "input"))
                tick(done)
        finally:
            if bar is not None:
                bar.close()

    kept = [r for r in records if r["kept"]]
    stats = {
        "organelles_in": len(records),
        "organelles_kept": len(kept),
        "organelles_dropped": len(records) - len(kept),
        "organelle_voxels_in": int(sum(r["voxels_in"] for r in records)),
        "organelle_voxels_out": int(np.count_nonzero(out_org)),
        "membrane_voxels_in": membrane_in,
        "membrane_voxels_cleaned": membrane_cleaned,
        "membrane_voxels_out": int(np.count_nonzero(out_mem)),
        "z_slices_without_membrane": int(np.count_nonzero(~has_membrane_z)),
        "max_id": max_id,
        "dtype": str(out_dtype),
        "device": b.device,
        **params,
        "organelles": records,
    }
    if not kept:
        stats["note"] = ("no organelle kept: the outputs are empty"
                         + (" (the organelle input has no labels)" if not records else ""))
    return out_org, out_mem, stats


def label_dtype(max_id: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ``max_id``."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_id <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise InputError(f"label {max_id} does not fit any unsigned integer dtype")


# ----------------------------------------------------------------------------- steps


def _check_inputs(org: np.ndarray, mem: np.ndarray) -> None:
    if org.ndim != 3:
        raise InputError(f"organelles have shape {org.shape} but a 3-D (z, y, x) label volume is needed")
    if mem.shape != org.shape:
        raise InputError(f"membranes have shape {mem.shape} but the organelles have {org.shape}; "
                         "both segmentations must cover the same tomogram")
    if org.dtype != bool and org.dtype.kind not in "iu":
        raise InputError(f"organelles have dtype {org.dtype} but an integer instance label map is needed")
    if org.dtype.kind == "i" and org.size and int(org.min()) < 0:
        raise InputError(f"organelles hold negative labels (min {int(org.min())}); ids must be >= 0")
    if org.dtype == np.uint64 and org.size and int(org.max()) > np.iinfo(np.int64).max:
        raise InputError(f"organelle id {int(org.max())} is above the int64 range used for labels")


def _instance_labels(b, org: np.ndarray, label_components: bool) -> np.ndarray:
    """Host int32/int64 ids: the input's, or 6-connected components of its mask."""
    if label_components:
        lab, _ = b.ndi.label(b.asarray(org != 0), structure=_FACES)
        return b.to_numpy(lab).astype(np.int32, copy=False)
    big = org.size and int(org.max()) > np.iinfo(np.int32).max
    return org.astype(np.int64 if big else np.int32, copy=False)  # read only: no copy needed


def _clean_membrane(b, mem: np.ndarray, min_area: int, trim_z: int, trim_xy: int):
    """Step 1: trim the edges, drop small 6-connected components, binarise."""
    m = b.asarray(mem) != 0
    voxels_in = int(m.sum())
    if trim_z:
        m[:trim_z] = False
        m[-trim_z:] = False
    if trim_xy:
        m[:, :trim_xy] = False
        m[:, -trim_xy:] = False
        m[:, :, :trim_xy] = False
        m[:, :, -trim_xy:] = False
    if min_area > 1:
        m = _remove_small(b, m, min_area)
    return m, voxels_in


def label_boxes(labels: np.ndarray) -> list[tuple[int, tuple[slice, ...]]]:
    """(id, bounding box) of every id present, ascending."""
    max_id = int(labels.max()) if labels.size else 0
    if max_id == 0:
        return []
    if max_id <= _DENSE_IDS:
        return [(i + 1, box) for i, box in enumerate(ndimage.find_objects(labels)) if box is not None]
    nz = labels != 0
    ids = np.unique(labels[nz])
    dense = np.zeros(labels.shape, dtype=np.int32)
    dense[nz] = np.searchsorted(ids, labels[nz]) + 1
    return [(int(ids[i]), box) for i, box in enumerate(ndimage.find_objects(dense))]


def _refine_one(b, labels, membrane, has_membrane_z, oid, box, out_org, out_mem,
                ball_size, min_roi, keep_surface, input_only) -> dict:
    """Steps 2-4 for one organelle; its membrane overwrites that of lower ids."""
    shape = labels.shape
    mine = labels[box] == oid
    rec = {"id": int(oid), "kept": False, "reason": "",
           "voxels_in": int(np.count_nonzero(mine)), "voxels_refined": 0, "voxels_out": 0,
           "membrane_voxels_out": 0, "elongated": False,
           "box": [int(s.start) for s in box] + [int(s.stop) for s in box]}
    here = mine & has_membrane_z[box[0]][:, None, None]
    if not here.any():
        rec["reason"] = "no membrane in any of its z-slices"
        return rec
    tight = _tight(here, box)
    rec["box"] = [s.start for s in tight] + [s.stop for s in tight]
    extent = [s.stop - s.start for s in tight]
    small = [ax for ax in range(3) if extent[ax] < min_roi * shape[ax]]
    if small:
        names = "zyx"
        rec["reason"] = ("too small: extent " + ", ".join(f"{names[a]} {extent[a]}" for a in small)
                         + f" below {min_roi:g} x volume extent "
                         + ", ".join(f"{names[a]} {shape[a]}" for a in small))
        return rec
    pad = ball_size // 2
    crop = tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(tight, shape))
    crop_extent = [s.stop - s.start for s in crop]
    elongated = max(crop_extent) / min(crop_extent) > ELONGATION
    rec["elongated"] = bool(elongated)
    r_dilate, r_open = (1, max(1, ball_size // 2)) if elongated else (2, ball_size)
    organelle = b.asarray((labels[crop] == oid) & has_membrane_z[crop[0]][:, None, None])
    mem = membrane[crop]

    near = _dilate(b, mem, r_dilate) & _dilate(b, organelle, r_dilate)
    near = _remove_small(b, near, MIN_NEAR_MEMBRANE)
    if keep_surface and near.any():
        near = _on_surface(b, near, organelle)
    if not near.any():
        rec["reason"] = "no membrane nearby"
        return rec
    combined = organelle | near
    opened = _dilate(b, _erode(b, combined, r_open), r_open)
    combined = _largest(b, opened if opened.any() else combined)
    refined_org = _largest(b, organelle & combined)
    band = near & combined
    refined_mem = _remove_small(b, band & mem if input_only else band, MIN_REFINED_MEMBRANE)
    if not refined_org.any():
        rec["reason"] = "organelle lost in the opening"
        return rec
    refined_org, refined_mem = b.to_numpy(refined_org), b.to_numpy(refined_mem)
    rec["voxels_refined"] = int(np.count_nonzero(refined_org))
    out_org[crop][refined_org] = oid  # a subset of this organelle's own input voxels: no overlap possible
    out_mem[crop][refined_mem] = oid  # ascending ids: a shared membrane voxel ends with the higher id
    rec.update(kept=True, voxels_out=rec["voxels_refined"], membrane_voxels_out=int(np.count_nonzero(refined_mem)))
    if not refined_mem.any():
        rec["reason"] = f"kept without membrane (below {MIN_REFINED_MEMBRANE} voxels after the opening)"
    return rec


# ----------------------------------------------------------------------------- morphology on a crop


# 6-connectivity, as a NumPy array: cupyx.scipy.ndimage.label takes its structure on the host.
_FACES = ndimage.generate_binary_structure(3, 1)
_CUBE = np.ones((3, 3, 3), dtype=bool)


def _tight(mask: np.ndarray, box) -> tuple[slice, ...]:
    """Bounding box (in the full volume) of a non-empty ``mask`` cropped at ``box``."""
    out = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append(slice(box[axis].start + int(hit[0]), box[axis].start + int(hit[-1]) + 1))
    return tuple(out)


def _dilate(b, fg, r: int):
    """Dilation by ``ball(r)`` inside the crop: voxels within distance ``r`` of the foreground."""
    if r <= 0 or not fg.any():
        return fg.copy()
    return distance_within(b, ~fg, r)


def _erode(b, fg, r: int):
    """Erosion by ``ball(r)``, the outside of the crop counting as background (scipy's
    ``border_value=0``): the distance transform runs on the crop framed by one background voxel."""
    if r <= 0 or not fg.any():
        return fg.copy()
    framed = b.xp.pad(fg, 1, mode="constant", constant_values=False)
    return ~distance_within(b, framed, r)[1:-1, 1:-1, 1:-1]


def distance_within(b, mask, r: float, *, budget: int | None = None, tiled: bool | None = None):
    """``distance_transform_edt(mask) <= r``: the voxels of ``mask`` within distance ``r`` of one of its
    zeros, and every zero (an array without zeros: none).

    On a GPU a crop whose padded cube (:func:`_edt_cube_bytes`) exceeds ``budget`` (default
    ``GPU_EDT_BUDGET``) is done in tiles with a halo of ``r + 1`` voxels, the largest whose cube fits
    (the answer only depends on the zeros within ``r``, so the tiles give the same result); when not
    even a halo's cube fits, on the host with scipy.  ``tiled`` forces (True) or forbids (False) tiles,
    on any device (the CPU tests of the tiling).
    """
    budget = GPU_EDT_BUDGET if budget is None else int(budget)
    if tiled is None:
        tiled = b.is_gpu and _edt_cube_bytes(mask.shape) > budget
    if not tiled:
        return _within_whole(b, mask, r)
    halo = int(np.floor(r)) + 1
    side = 1
    while _edt_cube_bytes([side + 1 + 2 * halo] * 3) <= budget and side < max(mask.shape):
        side += 1
    if _edt_cube_bytes([1 + 2 * halo] * 3) > budget:  # not even one voxel and its halo: on the host
        host = get_backend("cpu")
        return b.asarray(_within_whole(host, b.to_numpy(mask), r))
    out = b.xp.empty(mask.shape, dtype=bool)
    starts = [range(0, n, side) for n in mask.shape]
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                core = tuple(slice(o, min(o + side, n)) for o, n in zip((z, y, x), mask.shape))
                outer = tuple(slice(max(0, c.start - halo), min(n, c.stop + halo)) for c, n in zip(core, mask.shape))
                inner = tuple(slice(c.start - o.start, c.stop - o.start) for c, o in zip(core, outer))
                out[core] = _within_whole(b, mask[outer], r)[inner]
    return out


def _within_whole(b, mask, r):
    if bool(mask.all()):  # no zero to measure from (what each library returns then differs)
        return b.xp.zeros(mask.shape, dtype=bool)
    return b.ndi.distance_transform_edt(mask) <= r


def _slabs(shape):
    """z-ranges of about ``_SLAB_VOXELS`` voxels: whole-volume label look-ups go slab by slab
    because NumPy widens int32 labels to int64 for ``bincount`` and indexing."""
    step = max(1, _SLAB_VOXELS // max(1, int(np.prod(shape[1:]))))
    return [slice(z, min(shape[0], z + step)) for z in range(0, shape[0], step)]


def _sizes(b, lab, n: int):
    """Voxels per label 0..n of a label array."""
    sizes = b.xp.zeros(n + 1, dtype=b.xp.int64)
    for sl in _slabs(lab.shape):
        sizes += b.xp.bincount(lab[sl].ravel(), minlength=n + 1)
    return sizes


def _lookup(b, table, lab):
    """``table[lab]`` (a boolean table), slab by slab."""
    out = b.xp.empty(lab.shape, dtype=bool)
    for sl in _slabs(lab.shape):
        out[sl] = table[lab[sl]]
    return out


def _remove_small(b, fg, min_size: int):
    """``fg`` without its 6-connected components of fewer than ``min_size`` voxels."""
    lab, n = b.ndi.label(fg, structure=_FACES)
    if int(n) == 0:
        return fg.copy()
    keep = _sizes(b, lab, int(n)) >= min_size
    keep[0] = False
    return _lookup(b, keep, lab)


def _largest(b, fg):
    """The largest 6-connected component of ``fg``; ties go to the one met first in C order."""
    xp = b.xp
    lab, n = b.ndi.label(fg, structure=_FACES)
    if int(n) <= 1:
        return fg.copy()
    sizes = _sizes(b, lab, int(n))
    sizes[0] = 0
    tied = b.to_numpy(xp.flatnonzero(sizes == sizes.max()))
    best = int(tied[0])
    if len(tied) > 1:  # a backend's numbering is not C order of first voxels: decide by position
        flat = lab.ravel()
        best = int(min(tied, key=lambda c: int(xp.argmax(flat == int(c)))))
    return lab == best


def _on_surface(b, near, organelle):
    """Components of ``near`` with more than ``SURFACE_FRACTION`` of their voxels on the
    organelle's surface: the organelle minus its erosion by the 3x3x3 cube (26 neighbours),
    the outside of the crop counting as background."""
    xp = b.xp
    if not organelle.any():
        return xp.zeros_like(near)
    surface = _surface(b, organelle)
    lab, n = b.ndi.label(near, structure=_FACES)
    n = int(n)
    sizes = xp.bincount(lab.ravel(), minlength=n + 1)
    touching = xp.bincount(lab[surface], minlength=n + 1)
    # more than 10 %: touching / size > 1 / 10, in integers
    keep = touching * int(round(1 / SURFACE_FRACTION)) > sizes
    keep[0] = False
    return keep[lab]


def _surface(b, organelle):
    """The organelle minus its erosion by the 3x3x3 cube, the outside of the crop being background."""
    return organelle & ~b.ndi.binary_erosion(organelle, structure=b.asarray(_CUBE), border_value=0)


def _progress(progress, total: int):
    if callable(progress):
        return (lambda done: progress(done, total)), None
    if progress is False or (progress is None and total <= 1):
        return (lambda done: None), None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="refine_membranes", unit="organelle", file=sys.stderr)
    return (lambda done: bar.update(1)), bar
