"""Training data from corrected patches: MemBrain-seg's layout, a split by tomogram, resampling.

MemBrain-seg trains from ``imagesTr/<key>_0000.nii.gz`` + ``labelsTr/<key>.nii.gz`` and
validates on ``imagesVal`` / ``labelsVal`` (nnU-Net's naming: ``_0000`` is the channel), labels
0 background, 1 membrane, 2 ignore.  Patches of one tomogram are alike (same grid, often
overlapping), so the split is by tomogram: no tomogram has patches on both sides.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from maskworks.io import InputError
from maskworks.io.params import Number, checked


@checked(val_fraction=Number(minimum=0, maximum=1), seed=Number(integer=True, minimum=0))
def split_by_tomogram(names, *, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split tomogram names into training and validation, seeded: ``(train, val)``, each sorted.

    ``round(val_fraction * n)`` tomograms go to validation, at least one and at most ``n - 1``
    when ``val_fraction > 0`` and there are two or more; with one tomogram, or ``val_fraction``
    0, all go to training.  The choice depends only on the sorted names and ``seed``, not on the
    order they are given in.
    """
    names = sorted(set(map(str, names)))
    if val_fraction == 0 or len(names) < 2:
        return names, []
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    order = np.random.default_rng(int(seed)).permutation(len(names))
    val = sorted(names[i] for i in order[:n_val])
    return [n for n in names if n not in val], val


def resampled_shape(shape, voxel_size, target) -> tuple[int, ...]:
    """The shape that covers the same extent at voxel size ``target`` (rounded, at least 1)."""
    return tuple(max(1, int(round(n * v / t))) for n, v, t in zip(shape, voxel_size, target))


def resample_patch(image, label, voxel_size, target) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """An image/label patch resampled to voxel size ``target`` (per axis, same unit as ``voxel_size``).

    The image linearly, the label by nearest neighbour, so its values (0, 1 and the ignore label 2)
    stay as they are; both on the grid that keeps the patch's extent (voxel corners aligned).
    Returns ``(image, label, voxel size)``: the voxel size is the extent over the new shape, which
    differs from ``target`` by the rounding of the shape only.
    """
    image, label = np.asarray(image), np.asarray(label)
    if image.shape != label.shape:
        raise InputError(f"image patch {image.shape} and label patch {label.shape} differ in shape")
    shape = resampled_shape(label.shape, voxel_size, target)
    zoom = [n / m for n, m in zip(shape, label.shape)]
    out_vs = tuple(float(v) * m / n for v, m, n in zip(voxel_size, label.shape, shape))
    if shape == label.shape:
        return image, label, tuple(map(float, voxel_size))
    img = ndimage.zoom(image.astype(np.float32, copy=False), zoom, order=1, mode="nearest", grid_mode=True)
    lab = ndimage.zoom(label, zoom, order=0, mode="nearest", grid_mode=True)
    if img.shape != shape or lab.shape != shape:  # zoom rounds the same way; make sure
        raise RuntimeError(f"resampling gave {img.shape}/{lab.shape}, expected {shape}")
    return img, lab, out_vs


def corner_origin_shift(voxel_size, new_voxel_size) -> tuple[float, ...]:
    """What to add to an origin (the centre of voxel 0) so that voxel 0's corner stays in place."""
    return tuple((n - v) / 2 for v, n in zip(voxel_size, new_voxel_size))
