"""QC pictures: three orthogonal mid-slices of a volume with a mask outline and a map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path


def mid_slices(array) -> list[np.ndarray]:
    """The (y, x), (z, x) and (z, y) planes through the centre; reads only those planes."""
    z, y, x = (s // 2 for s in array.shape)
    return [np.asarray(array[z]), np.asarray(array[:, y, :]), np.asarray(array[:, :, x])]


def save_orthoslices(
    path: str | Path,
    image,
    *,
    masks: dict | None = None,
    maps: dict | None = None,
    voxel_size=(1.0, 1.0, 1.0),
    title: str = "",
) -> Path:
    """Save a PNG with mid-slices of ``image`` (row 1, outlines of ``masks`` on top)
    and of each array in ``maps`` (one row each, colour bar in [0, 1] scale of the map).

    ``masks`` maps a legend label to a 3-D mask; ``maps`` a label to a 3-D float map.
    Aspect ratios follow ``voxel_size`` so anisotropic volumes are not squashed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = masks or {}
    maps = maps or {}
    vz, vy, vx = (float(v) for v in voxel_size)
    planes = [("z mid (y, x)", vy / vx), ("y mid (z, x)", vz / vx), ("x mid (z, y)", vz / vy)]
    rows = 1 + len(maps)
    fig, axes = plt.subplots(rows, 3, figsize=(12, 4 * rows), squeeze=False)
    img = mid_slices(image)
    lo, hi = np.percentile(np.concatenate([p.ravel() for p in img]).astype(np.float64), [1, 99])
    colours = ["#ff3b30", "#34c759", "#0a84ff", "#ffcc00"]
    for col, ((name, aspect), plane) in enumerate(zip(planes, img)):
        ax = axes[0, col]
        ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect,
                  interpolation="nearest")
        for k, (label, mask) in enumerate(masks.items()):
            m = mid_slices(mask)[col].astype(bool)
            if m.any() and not m.all():
                ax.contour(m, levels=[0.5], colors=colours[k % len(colours)], linewidths=1.0)
            ax.plot([], [], color=colours[k % len(colours)], label=label)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
        if masks and col == 0:
            ax.legend(loc="lower left", fontsize=8, framealpha=0.7)
    for r, (label, arr) in enumerate(maps.items(), start=1):
        for col, ((name, aspect), plane) in enumerate(zip(planes, mid_slices(arr))):
            ax = axes[r, col]
            im = ax.imshow(plane.astype(np.float32), cmap="magma", vmin=0, vmax=1, aspect=aspect,
                           interpolation="nearest")
            ax.set_title(f"{label}: {name}", fontsize=9)
            ax.set_axis_off()
        fig.colorbar(im, ax=axes[r, :].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
