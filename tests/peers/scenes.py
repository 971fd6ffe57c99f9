"""Synthetic organelle + membrane segmentations in the style of SABER's test inputs, for the
differential tests against SABER (tests/peers): instance labels, membrane shells with gaps,
fragments, edge junk, internal membranes, an organelle without membrane, organelles that
share membrane voxels, elongated ones and ones cut by the volume border."""

from __future__ import annotations

import numpy as np


def _ellipsoid(shape, centre, radii):
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + ((xx - centre[2]) / radii[2]) ** 2


def saber_scene(seed: int, shape=(96, 192, 192)) -> dict:
    """``organelles`` (int32 ids 1..n, some absent), ``membranes`` (uint8 0/1)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    labels = np.zeros(shape, np.int32)
    membranes = np.zeros(shape, bool)
    specs = [
        # centre (fractions), radii (voxels): round, elongated, at the border, a touching pair
        ((0.5, 0.3, 0.3), (20, 26, 24)),
        ((0.5, 0.72, 0.3), (14, 14, 60)),            # elongated along x
        ((0.45, 0.3, 0.75), (22, 24, 24)),
        ((0.5, 0.55, 0.75) if seed % 2 else (0.55, 0.56, 0.74), (18, 20, 22)),  # shares membrane with the one above
        ((0.5, 0.97, 0.6), (20, 24, 26)),            # cut by the y border
        ((0.5, 0.5, 0.5), (8, 8, 8)),                # too small for min_roi_relative_size
    ]
    for oid, (c, r) in enumerate(specs, start=1):
        centre = [f * n + rng.uniform(-3, 3) for f, n in zip(c, shape)]
        radii = [v * rng.uniform(0.9, 1.1) for v in r]
        q = _ellipsoid(shape, centre, radii)
        inside = q <= 1.0
        labels[inside & (labels == 0)] = oid
        shell = (q > 1.0) & (q <= (1 + 2.5 / min(radii)) ** 2)
        if oid == 3:
            shell[:] = False  # an organelle without membrane
        # a gap in the shell
        gap = _ellipsoid(shape, [centre[0] + radii[0], centre[1], centre[2]], [radii[0] / 2] * 3) <= 1
        membranes |= shell & ~gap
        # an internal membrane sheet
        if oid in (1, 4):
            sheet = inside & (np.abs(np.arange(nx)[None, None, :] - centre[2] - radii[2] / 3) < 1.0)
            membranes |= sheet & (q <= 0.2)
            # a small closed vesicle membrane deep inside (what keep_surface_membranes removes)
            v = _ellipsoid(shape, [centre[0], centre[1] - radii[1] / 3, centre[2] - radii[2] / 4], [7, 7, 7])
            membranes |= (v > 1.0) & (v <= 1.5)
    for _ in range(25):  # spurious fragments
        c = [int(rng.integers(4, n - 4)) for n in shape]
        membranes[tuple(slice(v - 2, v + 3) for v in c)] = True
    membranes[:2, 20:-20, 20:-20] = True  # edge junk (a slab in the first z-slices)
    membranes[20:-20, :, :2] = True
    return {"organelles": labels, "membranes": membranes.astype(np.uint8)}
