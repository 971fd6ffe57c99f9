"""Cut annotation patches (image + label cubes) out of a tomogram around given centres.

The MemBrain-seg "patch corrections" workflow: a person corrects the predicted
membranes in small cubes, which are merged back (:mod:`maskworks.cryoet.corrections`)
and used as training data with 2 as the ignore label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from maskworks.io import InputError
from maskworks.io.params import Choice, Flag, Number, checked

EDGE_POLICIES = ("pad", "skip", "error")
IGNORE = 2  # the training label for "no loss here": patch borders, padding, Ignore masks

# Voxels read at once when a lazy (memory-mapped, Zarr) tomogram is scanned for its mean.
_SCAN_VOXELS = 2**24


@dataclasses.dataclass(frozen=True)
class Patch:
    """One centre's patch: where it lies and, once extracted, its image and label.

    ``index`` is the centre's row in ``centres_xyz`` (0-based); ``centre`` the
    coordinate as given (x, y, z); ``start`` the (z, y, x) index of the patch's
    first voxel in the tomogram (negative or past the end where it is padded);
    ``padded_voxels`` how many of its voxels lie outside the tomogram.
    ``reason`` is None for an extracted patch and says why it was skipped
    otherwise (then ``image`` and ``label`` are None).  ``pad_value`` is the
    value the image was padded with (None when nothing was padded).
    """

    index: int
    centre: tuple[float, float, float]
    start: tuple[int, int, int]
    padded_voxels: int
    reason: str | None = None
    image: np.ndarray | None = None
    label: np.ndarray | None = None
    pad_value: float | None = None


def label_border(label, border: int) -> np.ndarray:
    """Set the outer shell of ``border`` voxels on every face to the ignore label 2.

    Parameters
    ----------
    label : array-like of int, any number of axes
        Training label (0 background, 1 foreground, 2 ignore).
    border : int
        Shell thickness in voxels on each face; 0 leaves the label as it is.

    Returns
    -------
    ndarray of uint8
        A new array: ``label`` with the shell set to 2.

    Notes
    -----
    MemBrain-seg ignores a border of each corrected patch because the network
    sees too little context there; so do we, on all six faces.
    """
    out = np.array(label, dtype=np.uint8, copy=True)
    _set_border(out, _check_border(border, out.shape))
    return out


def _check_border(border, shape) -> int:
    if int(border) != border or border < 0:
        raise InputError(f"border={border!r}: expected a whole number of voxels >= 0")
    border = int(border)
    if border and any(2 * border >= s for s in shape):
        raise InputError(
            f"border={border} leaves nothing of a patch of shape {tuple(shape)} outside the ignored "
            f"shell; use a border below {min(shape) // 2 if min(shape) > 1 else 1} or larger patches"
        )
    return border


def _set_border(label: np.ndarray, border: int) -> int:
    """Set the shell to 2 in place; return how many voxels changed."""
    if not border:
        return 0
    changed = 0
    for axis in range(label.ndim):
        for sl in (slice(0, border), slice(label.shape[axis] - border, None)):
            face = label[(slice(None),) * axis + (sl,)]
            changed += int(np.count_nonzero(face != IGNORE))
            face[...] = IGNORE
    return changed


def class_counts(label) -> dict:
    """Voxels of each training class: ``background_voxels`` (0), ``foreground_voxels`` (1),
    ``ignore_voxels`` (2)."""
    counts = np.bincount(np.asarray(label, dtype=np.uint8).ravel(), minlength=3)
    return {"background_voxels": int(counts[0]), "foreground_voxels": int(counts[1]),
            "ignore_voxels": int(counts[2])}


def binary_label(values, *, binarize: bool, what: str, allowed=(0, 1)) -> np.ndarray:
    """``values`` as uint8, checked to hold only ``allowed`` values, or with
    every other value set to 1 when ``binarize`` is true.

    ``what`` names the data in the error message.
    """
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    ok = np.isin(arr, allowed)
    if ok.all():
        return arr.astype(np.uint8)
    if binarize:
        return np.where(ok, arr, 1).astype(np.uint8)
    bad = np.unique(arr[~ok])
    shown = ", ".join(f"{v:g}" for v in bad[:10]) + (f" and {bad.size - 10} more" if bad.size > 10 else "")
    allowed_s = "/".join(str(a) for a in allowed)
    raise InputError(
        f"{what} holds values other than {allowed_s}: {shown}; a label must be {allowed_s} "
        "(2 is the ignore label, so a segmentation value 2 would collide with it). "
        "Pass binarize=True (--binarize) to turn every other value into 1"
    )


def _round(values) -> np.ndarray:
    """Nearest integer voxel, halves rounded up (10.5 -> 11, -0.5 -> 0)."""
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5).astype(np.int64)


def _describe(i, xyz) -> str:
    x, y, z = (f"{v:g}" for v in xyz)
    return f"centre {i} (x={x}, y={y}, z={z})"


def _listing(items, most=20) -> str:
    items = list(items)
    more = f"; and {len(items) - most} more" if len(items) > most else ""
    return "; ".join(items[:most]) + more


def plan_patches(shape, centres_xyz, *, patch_size: int = 160, edge: str = "pad") -> list[Patch]:
    """Where each centre's patch lies in a volume of ``shape`` (z, y, x); no data is read.

    Parameters and rules as in :func:`iter_patches`.  Returns one :class:`Patch`
    (without image and label) per centre, skipped ones carrying their reason.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise InputError(f"the tomogram has shape {shape} but a 3-D volume (z, y, x) is needed")
    if int(patch_size) != patch_size or patch_size < 1:
        raise InputError(f"patch_size={patch_size!r}: expected a whole number of voxels >= 1")
    if edge not in EDGE_POLICIES:
        raise InputError(f"edge={edge!r}: expected one of {', '.join(EDGE_POLICIES)}")
    size = int(patch_size)
    centres = np.asarray(centres_xyz, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[1] != 3 or len(centres) == 0:
        raise InputError(f"centres have shape {centres.shape}; expected one or more rows of x, y, z")
    if not np.isfinite(centres).all():
        rows = [_describe(i, c) for i, c in enumerate(centres) if not np.isfinite(c).all()]
        raise InputError(f"non-finite patch centres: {_listing(rows)}")
    voxel_zyx = _round(centres)[:, ::-1]
    outside = np.flatnonzero(((voxel_zyx < 0) | (voxel_zyx >= np.array(shape))).any(axis=1)).tolist()
    if outside:
        nz, ny, nx = shape
        raise InputError(
            f"{len(outside)} patch centre(s) lie outside the tomogram (x 0..{nx - 1}, y 0..{ny - 1}, "
            f"z 0..{nz - 1}): {_listing(_describe(i, centres[i]) for i in outside)}. Centres are "
            "x, y, z voxel indices of this tomogram: check the column order and the binning"
        )
    # every centre at once (10^5 centres plan in a fraction of a second)
    starts = voxel_zyx - size // 2
    stops = starts + size
    inside = np.minimum(stops, shape) - np.maximum(starts, 0)
    padded = size**3 - np.prod(inside, axis=1)
    plans, needs_padding = [], []
    for i, (c, start, pad) in enumerate(zip(centres.tolist(), starts.tolist(), padded.tolist())):
        reason = None
        if pad:
            stop = [s + size for s in start]
            sides = [f"{ax}<0" for ax, s in zip("zyx", start) if s < 0]
            sides += [f"{ax}>{n - 1}" for ax, e, n in zip("zyx", stop, shape) if e > n]
            reason = f"needs {pad} padded voxels (runs past the tomogram at {', '.join(sides)})"
            if edge == "error":
                needs_padding.append(f"{_describe(i, c)}: {reason}")
        plans.append(Patch(i, tuple(c), tuple(start), pad, reason if edge == "skip" else None))
    if needs_padding and edge == "error":
        raise InputError(
            f"{len(needs_padding)} patch(es) of size {size} reach past the tomogram edge "
            f"and edge='error': {_listing(needs_padding)}. Use edge='pad' to pad them or "
            "edge='skip' to leave them out"
        )
    return plans


IMAGE_DTYPES = ("float32", "float64", "float16", "int8", "uint8", "int16", "uint16", "int32", "uint32")


@checked(
    patch_size=Number(integer=True, minimum=4, unit="voxels"),
    border=Number(integer=True, minimum=0, unit="voxels"),
    edge=Choice(EDGE_POLICIES),
    binarize=Flag(),
    image_dtype=Choice(IMAGE_DTYPES, nullable=True),
)
def iter_patches(
    tomogram,
    labels,
    centres_xyz,
    *,
    patch_size: int = 160,
    border: int = 16,
    edge: str = "pad",
    binarize: bool = False,
    image_dtype: str | None = None,
) -> Iterator[Patch]:
    """Cut a cube of image and label around each centre.

    Parameters
    ----------
    tomogram : array-like, shape (z, y, x)
        The tomogram; a memory map or Zarr array is fine: only the patches'
        regions are read (and, when a patch needs padding, the whole volume
        once, slab by slab, for its mean).
    labels : array-like, shape (z, y, x)
        Its segmentation, 0/1 (boolean is fine).
    centres_xyz : array-like, shape (n, 3)
        Patch centres as x, y, z voxel indices (MRC X/Y/Z, as IMOD shows them;
        0-based).  Floats are rounded to the nearest voxel, halves up.
    patch_size : int
        Side of the cube in voxels.  The patch starts at ``c - patch_size // 2``
        on each axis (so for an even size the centre voxel is the one just past
        the middle, as in MemBrain-seg).
    border : int
        Thickness of the shell on all six faces of the label patch set to 2
        (ignore); must be below ``patch_size / 2``.
    edge : {"pad", "skip", "error"}
        What to do with a patch that reaches past the tomogram: ``"pad"`` fills
        the outside with the tomogram mean in the image and 2 in the label;
        ``"skip"`` yields it with ``reason`` set and no data; ``"error"`` raises
        an InputError naming every such centre before anything is extracted.
    binarize : bool
        Turn every nonzero segmentation value into 1.  Without it a value other
        than 0/1 is an error (a 2 would collide with the ignore label).
    image_dtype : str, optional
        dtype of the image patches (e.g. ``float32``); None keeps the tomogram's, as
        MemBrain-seg does (an int8 tomogram gives int8 patches, a quarter of float32).

    Returns
    -------
    iterator of Patch
        One per centre, in order.  ``image`` has ``image_dtype`` (padding with the
        mean rounded to it for integers); ``label`` is uint8
        (0, 1, and 2 in the shell and the padding).

    Raises
    ------
    InputError
        Before the first patch: different shapes of tomogram and segmentation,
        a centre outside the tomogram (always, whatever ``edge`` says), a patch
        needing padding with ``edge="error"``, bad parameters.  While
        iterating: a segmentation patch with values other than 0/1, or NaN/Inf
        in an image patch.
    """
    if tuple(tomogram.shape) != tuple(labels.shape):
        raise InputError(
            f"the tomogram has shape {tuple(tomogram.shape)} but the segmentation has shape "
            f"{tuple(labels.shape)}; they must cover the same voxels"
        )
    plans = plan_patches(tomogram.shape, centres_xyz, patch_size=patch_size, edge=edge)
    _check_border(border, (int(patch_size),) * 3)
    try:
        dtype = np.dtype(tomogram.dtype if image_dtype in (None, "") else image_dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "iuf":
        raise InputError(f"image_dtype={image_dtype!r}: expected a numeric dtype such as float32, int8 or uint16")
    return _extract(tomogram, labels, plans, int(patch_size), int(border), binarize, dtype)


def _pad_value(mean: float, dtype: np.dtype):
    if dtype.kind == "f":
        return dtype.type(mean)
    info = np.iinfo(dtype)
    return dtype.type(min(max(round(mean), info.min), info.max))


def _extract(tomogram, labels, plans, size, border, binarize, dtype) -> Iterator[Patch]:
    shape = tuple(tomogram.shape)
    mean = None
    for plan in plans:
        if plan.reason is not None:
            yield plan
            continue
        start = np.array(plan.start)
        lo = np.maximum(start, 0)
        hi = np.minimum(start + size, shape)
        src = tuple(slice(a, b) for a, b in zip(lo, hi))
        dst = tuple(slice(a, b) for a, b in zip(lo - start, hi - start))
        where = f"the patch around {_describe(plan.index, plan.centre)}"
        region = np.asarray(tomogram[src])
        if region.dtype.kind == "f" and not np.isfinite(region).all():
            raise InputError(f"the tomogram holds NaN/Inf values in {where}")
        region = region.astype(dtype, copy=False)
        lab = binary_label(labels[src], binarize=binarize, what=f"the segmentation, in {where},")
        if plan.padded_voxels:
            if mean is None:
                mean = tomogram_mean(tomogram)
            image = np.full((size,) * 3, _pad_value(mean, dtype), dtype=dtype)
            image[dst] = region
            label = np.full((size,) * 3, IGNORE, dtype=np.uint8)
            label[dst] = lab
        else:
            image, label = region, lab
        _set_border(label, border)
        yield dataclasses.replace(plan, image=image, label=label,
                                  pad_value=mean if plan.padded_voxels else None)


def tomogram_mean(tomogram) -> float:
    """Mean of a (possibly memory-mapped or Zarr) volume, read slab by slab in float64.

    Raises InputError if the volume holds NaN or Inf.
    """
    shape = tuple(tomogram.shape)
    slab = max(1, _SCAN_VOXELS // max(1, int(np.prod(shape[1:]))))
    total = 0.0
    for z in range(0, shape[0], slab):
        total += float(np.asarray(tomogram[z:z + slab]).sum(dtype=np.float64))
    if not np.isfinite(total):
        raise InputError("the tomogram holds NaN/Inf values, so its mean (the padding value) is undefined")
    return total / max(1, int(np.prod(shape)))
