"""QC pictures: three orthogonal mid-slices of a volume with mask outlines and maps.

Drawn with Pillow and NumPy alone: matplotlib's import (~0.7 s) would be most of a small
stage's start-up, and these pictures need nothing it has that Pillow lacks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .outputs import atomic_path

# Longest side of one panel (pixels); planes are scaled to it, keeping their physical aspect.
PANEL = 320
# Outline colours of the masks, in order.
OUTLINES = ((255, 59, 48), (52, 199, 89), (10, 132, 255), (255, 204, 0))
# Anchors of the "magma" colour map (matplotlib's, at 0, 0.2, ..., 1), linearly interpolated.
_MAGMA = np.array([[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109],
                   [252, 253, 191]], np.float32)
_PLANES = ("z mid (y, x)", "y mid (z, x)", "x mid (z, y)")
_PAD, _TITLE = 8, 16
_BACKGROUND = (255, 255, 255)


def mid_slices(array) -> list[np.ndarray]:
    """The (y, x), (z, x) and (z, y) planes through the centre; reads only those planes."""
    z, y, x = (s // 2 for s in array.shape)
    return [np.asarray(array[z]), np.asarray(array[:, y, :]), np.asarray(array[:, :, x])]


def magma(values: np.ndarray) -> np.ndarray:
    """RGB (uint8) of ``values`` in [0, 1] on the magma colour map (NaN: black)."""
    v = np.nan_to_num(np.clip(np.asarray(values, np.float32), 0.0, 1.0), nan=0.0) * (len(_MAGMA) - 1)
    i = np.minimum(v.astype(np.int64), len(_MAGMA) - 2)
    f = (v - i)[..., None]
    return np.round(_MAGMA[i] * (1 - f) + _MAGMA[i + 1] * f).astype(np.uint8)


def _panel_shape(shape, aspect: float) -> tuple[int, int]:
    """Output (rows, cols) of a plane of ``shape`` whose rows are ``aspect`` times as tall as its
    columns are wide, scaled so that the longer side is ``PANEL`` pixels."""
    rows, cols = shape[0] * aspect, shape[1]
    scale = PANEL / max(rows, cols, 1e-9)
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def _resize(plane: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a 2-D array to ``out`` (rows, cols)."""
    r = np.minimum((np.arange(out[0]) + 0.5) * plane.shape[0] / out[0], plane.shape[0] - 1).astype(np.int64)
    c = np.minimum((np.arange(out[1]) + 0.5) * plane.shape[1] / out[1], plane.shape[1] - 1).astype(np.int64)
    return plane[np.ix_(r, c)]


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the array border does not count)."""
    p = np.pad(mask, 1, mode="edge")
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def _grey(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = hi - lo if hi > lo else 1.0
    g = np.clip((plane.astype(np.float32) - np.float32(lo)) / np.float32(span), 0.0, 1.0)
    return np.repeat(np.round(g * 255).astype(np.uint8)[..., None], 3, axis=2)


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
    and of each array in ``maps`` (one row each, magma colours on [0, 1], with a colour bar).

    ``masks`` maps a legend label to a 3-D mask; ``maps`` a label to a 3-D float map.
    Aspect ratios follow ``voxel_size`` so anisotropic volumes are not squashed.  Only the
    three mid-planes of each array are read.
    """
    from PIL import Image, ImageDraw

    masks = masks or {}
    maps = maps or {}
    vz, vy, vx = (float(v) for v in voxel_size)
    aspects = (vy / vx, vz / vx, vz / vy)
    img = mid_slices(image)
    sizes = [_panel_shape(p.shape, a) for p, a in zip(img, aspects)]
    lo, hi = np.percentile(np.concatenate([p.ravel() for p in img]).astype(np.float64), [1, 99])

    rows = [[_grey(_resize(p, s), lo, hi) for p, s in zip(img, sizes)]]
    for k, mask in enumerate(masks.values()):
        for panel, plane, s in zip(rows[0], mid_slices(mask), sizes):
            panel[_outline(_resize(np.asarray(plane) != 0, s))] = OUTLINES[k % len(OUTLINES)]
    for arr in maps.values():
        rows.append([magma(_resize(p, s)) for p, s in zip(mid_slices(arr), sizes)])

    bar_w = 70 if maps else 0
    cell_h = max(s[0] for s in sizes) + _TITLE + _PAD
    width = sum(s[1] for s in sizes) + _PAD * 4 + bar_w
    top = (_TITLE + _PAD) if title else _PAD
    legend = 14 * len(masks)
    height = top + cell_h * len(rows) + legend + _PAD
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, _PAD // 2), title, fill=(0, 0, 0))
    labels = [""] + [f"{label}: " for label in maps]
    for r, row in enumerate(rows):
        y0 = top + r * cell_h
        x0 = _PAD
        for name, panel in zip(_PLANES, row):
            draw.text((x0, y0), labels[r] + name, fill=(0, 0, 0))
            canvas.paste(Image.fromarray(panel), (x0, y0 + _TITLE))
            x0 += panel.shape[1] + _PAD
        if r:  # colour bar of a map row
            h = max(s[0] for s in sizes)
            ramp = magma(np.linspace(1.0, 0.0, h, dtype=np.float32))[:, None, :].repeat(14, axis=1)
            canvas.paste(Image.fromarray(np.ascontiguousarray(ramp)), (x0 + 4, y0 + _TITLE))
            draw.text((x0 + 22, y0 + _TITLE), "1", fill=(0, 0, 0))
            draw.text((x0 + 22, y0 + _TITLE + h - 11), "0", fill=(0, 0, 0))
    y = top + cell_h * len(rows)
    for k, label in enumerate(masks):
        draw.rectangle((_PAD, y + 14 * k + 2, _PAD + 20, y + 14 * k + 10), fill=OUTLINES[k % len(OUTLINES)])
        draw.text((_PAD + 26, y + 14 * k), f"outline: {label}", fill=(0, 0, 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
