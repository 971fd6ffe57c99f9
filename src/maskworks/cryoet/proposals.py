"""Where corrections matter most: patch centres from an uncertainty (or probability, or score) map.

A person corrects a few patches by hand; the patches that teach the network most are where it is
least sure.  The map is reduced block by block (bounded memory on a whole tomogram), every
candidate centre is scored by the uncertainty around it (a Gaussian of a quarter patch), and the best
centres are taken greedily, at least a patch apart and with the whole patch inside the tomogram.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from maskworks.io import InputError
from maskworks.io.params import Choice, Number, checked

MAP_KINDS = ("uncertainty", "probability", "scores")
_SLAB_VOXELS = 2**25  # voxels read at once from a lazy map


def to_uncertainty(values, kind: str, threshold: float = 0.0) -> np.ndarray:
    """Per-voxel uncertainty, higher = less sure: an ``uncertainty`` map as it is (MemBrain-seg's
    ``--store-uncertainty-map``), ``1 - 2|p - 0.5|`` for a ``probability`` map, ``-|s - threshold|`` for
    ``scores`` (logits; MemBrain-seg's ``_scores.mrc`` with its segmentation threshold 0)."""
    v = np.asarray(values, dtype=np.float32)
    if kind == "uncertainty":
        return v
    if kind == "probability":
        return 1.0 - 2.0 * np.abs(v - 0.5)
    return -np.abs(v - np.float32(threshold))


def coarse_map(data, factor: int, kind: str, threshold: float = 0.0) -> np.ndarray:
    """The uncertainty of ``data`` (z, y, x; a lazy array is read by z-slabs) averaged over blocks of
    ``factor`` voxels a side (edge blocks over the voxels they have)."""
    shape = tuple(int(n) for n in data.shape)
    out_shape = tuple(-(-n // factor) for n in shape)
    sums = np.zeros(out_shape, np.float64)
    counts = np.zeros(out_shape, np.float64)
    step = max(factor, (_SLAB_VOXELS // max(1, shape[1] * shape[2])) // factor * factor)
    for z0 in range(0, shape[0], step):
        slab = to_uncertainty(np.asarray(data[z0:z0 + step]), kind, threshold)
        if not np.isfinite(slab).all():
            raise InputError(f"the map has non-finite values in z-slices {z0}..{z0 + slab.shape[0] - 1}")
        pad = [(0, -n % factor) for n in slab.shape]
        valid = np.pad(np.ones(slab.shape, np.float32), pad)
        slab = np.pad(slab, pad)
        blocks = tuple(n // factor for n in slab.shape)
        view = (blocks[0], factor, blocks[1], factor, blocks[2], factor)
        b0 = z0 // factor
        sums[b0:b0 + blocks[0]] += slab.reshape(view).sum(axis=(1, 3, 5))
        counts[b0:b0 + blocks[0]] += valid.reshape(view).sum(axis=(1, 3, 5))
    return (sums / np.maximum(counts, 1)).astype(np.float32)


@checked(
    n=Number(integer=True, minimum=1),
    patch_size=Number(integer=True, minimum=1, unit="voxels"),
    kind=Choice(MAP_KINDS),
    margin=Number(integer=True, minimum=0, unit="voxels"),
    min_distance=Number(integer=True, minimum=1, unit="voxels", nullable=True),
    factor=Number(integer=True, minimum=1, nullable=True),
)
def propose_centres(
    volume_map,
    *,
    n: int = 10,
    patch_size: int = 160,
    kind: str = "uncertainty",
    threshold: float = 0.0,
    margin: int = 0,
    min_distance: int | None = None,
    factor: int | None = None,
    candidates=None,
) -> list[dict]:
    """The ``n`` patch centres where the map is least sure, best first.

    Parameters
    ----------
    volume_map : array-like (z, y, x)
        Uncertainty, probability or score map (``kind``, see :func:`to_uncertainty`); may be lazy.
    n : int
        How many centres.
    patch_size : int
        Side of the patch a centre cuts; a centre's score is the uncertainty around it, averaged
        with a Gaussian of sigma ``patch_size / 4`` (most weight inside the patch, peaking where an
        uncertain region is centred).
    margin : int
        Extra voxels kept between a patch and the tomogram's faces; with the patch inside.
    min_distance : int, optional
        Smallest distance between two centres along some axis (Chebyshev); default ``patch_size``
        (the patches do not overlap).
    factor : int, optional
        Block size of the reduced map the search runs on (default ``patch_size // 16``): centres
        are placed to within half a block.
    candidates : array-like (m, 3) of z, y, x, optional
        Only these positions may be proposed (e.g. copick picks), each scored on the map.

    Returns
    -------
    list of dict
        ``z``, ``y``, ``x`` (voxels, integers), ``score`` (the weighted uncertainty), ``rank``.
        Fewer than ``n`` when the tomogram has no room for more.
    """
    shape = tuple(int(s) for s in volume_map.shape)
    if len(shape) != 3:
        raise InputError(f"the map has shape {shape}; a 3-D (z, y, x) map is needed")
    factor = int(factor or max(1, patch_size // 16))
    min_distance = int(min_distance or patch_size)
    coarse = coarse_map(volume_map, factor, kind, threshold)
    # the uncertainty around each block, weighted towards the patch's middle (a box filter of the
    # patch's size would be flat wherever the patch holds a whole uncertain spot, and place it anywhere)
    score = ndimage.gaussian_filter(coarse.astype(np.float64), sigma=patch_size / (4 * factor), mode="nearest")
    centres = [(np.arange(m) + 0.5) * factor - 0.5 for m in coarse.shape]  # voxel centre of each block
    lo = [min(patch_size / 2 + margin, (s - 1) / 2) for s in shape]
    hi = [max(s - patch_size / 2 - margin, (s - 1) / 2) for s in shape]
    if candidates is not None:
        return _pick_candidates(np.asarray(candidates, float).reshape(-1, 3), score, factor, lo, hi, n,
                                min_distance)
    allowed = [(c >= lo[a] - factor / 2) & (c <= hi[a] + factor / 2) for a, c in enumerate(centres)]
    free = np.ix_(*allowed)
    masked = np.full(score.shape, -np.inf)
    masked[free] = score[free]
    picked = []
    while len(picked) < n and np.isfinite(masked).any():
        flat = int(np.argmax(masked))
        idx = np.unravel_index(flat, masked.shape)
        pos = [float(np.clip(centres[a][i], lo[a], hi[a])) for a, i in enumerate(idx)]
        picked.append({"z": int(round(pos[0])), "y": int(round(pos[1])), "x": int(round(pos[2])),
                       "score": float(score[idx])})
        # no later centre closer than min_distance along every axis
        near = [np.abs(centres[a] - pos[a]) < min_distance for a in range(3)]
        masked[np.ix_(*near)] = -np.inf
    return [{**p, "rank": i + 1} for i, p in enumerate(picked)]


def _pick_candidates(cands, score, factor, lo, hi, n, min_distance):
    """Greedy choice among given positions (z, y, x), each moved inside the margins and scored."""
    if not len(cands):
        return []
    inside = np.clip(cands, lo, hi)
    idx = np.clip((inside // factor).astype(int), 0, np.array(score.shape) - 1)
    scores = score[idx[:, 0], idx[:, 1], idx[:, 2]]
    order = np.argsort(-scores, kind="stable")
    picked = []
    for i in order:
        pos = inside[i]
        if all(np.max(np.abs(pos - np.array([p["z"], p["y"], p["x"]]))) >= min_distance for p in picked):
            picked.append({"z": int(round(pos[0])), "y": int(round(pos[1])), "x": int(round(pos[2])),
                           "score": float(scores[i])})
        if len(picked) == n:
            break
    return [{**p, "rank": i + 1} for i, p in enumerate(picked)]
