"""The whole CODEX arm on one big slide: per-stage time and peak RSS, and the extrapolation to a real one.

A ``--size`` x ``--size`` slide with ``--channels`` uint16 channels is made from the demo
generator's cells (``maskworks.demo.make_codex_slide``, a 2048 x 2048 piece tiled over the
slide, mirrored so that cells continue across the joins) and written as a tiled, zlib-compressed
OME-TIFF (512 x 512 tiles, written tile by tile, never whole).  The stages then run as the user
runs them, one ``maskworks`` process each: tile-image (1440 x 1920 patches), segment-cells
(``--backend`` watershed or expansion: Mesmer needs weights that cannot be downloaded here),
repair-masks, stitch, quantify.  Each stage's wall time and peak RSS are printed, with the
baseline of the same run (the interpreter with the libraries imported).  With several
``--size`` values, each stage's time and peak RSS are fitted as a + b x pixels and extrapolated
to ``--target-cells`` cells x ``--target-channels`` channels at the same cell density
(quantify's time also x target/run channels, an upper bound: its morphology does not grow with
the channels).

    python bench/bench_codex_arm.py                     # 4096 and 8192 px, 12 channels (about 15 min)
    python bench/bench_codex_arm.py --size 20000        # issue 23's 20k x 20k, 12 channels (an hour or more)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_channels import run  # one process per stage, its own peak RSS

MAIN = [sys.executable, "-m", "maskworks.cli"]
PIECE = 2048


def _piece():
    from maskworks.demo import make_codex_slide

    demo = make_codex_slide(shape=(PIECE, PIECE), seed=3)
    return demo["image"], demo["cells"]


def _mirror_index(n: int, start: int, stop: int) -> np.ndarray:
    """Indices into a piece of length ``n`` for positions start..stop of a slide that repeats it mirrored."""
    pos = np.arange(start, stop)
    k, r = np.divmod(pos, n)
    return np.where(k % 2 == 0, r, n - 1 - r)


def write_slide(path: Path, size: int, channels: int) -> list[str]:
    """The slide as a tiled OME-TIFF, written tile by tile from the mirrored demo piece."""
    import tifffile

    image, cells = _piece()
    rng = np.random.default_rng(0)
    # channels beyond the demo's four: per-cell markers (each cell bright or not, per channel)
    on = rng.random((channels, int(cells.max()) + 1)) < 0.3
    names = ["CD45", "DAPI", "Ki67", "PanCK"] + [f"M{k}" for k in range(4, channels)]
    tile = 512

    def tiles():
        for c in range(channels):
            for y0 in range(0, size, tile):
                for x0 in range(0, size, tile):
                    ys = _mirror_index(PIECE, y0, min(y0 + tile, size))
                    xs = _mirror_index(PIECE, x0, min(x0 + tile, size))
                    if c < 4:
                        block = image[c][np.ix_(ys, xs)]
                    else:
                        lab = cells[np.ix_(ys, xs)]
                        block = np.where(on[c][lab] & (lab > 0), 1500, 40).astype(np.uint16)
                    out = np.zeros((tile, tile), np.uint16)
                    out[:block.shape[0], :block.shape[1]] = block
                    yield out

    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(tiles(), shape=(channels, size, size), dtype=np.uint16, tile=(tile, tile), compression="zlib",
                 metadata={"axes": "CYX", "Channel": {"Name": names}, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    return names


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs="+", default=[4096, 8192], help="slide side(s), pixels")
    ap.add_argument("--channels", type=int, default=12)
    ap.add_argument("--backend", choices=("watershed", "expansion"), default="watershed")
    ap.add_argument("--target-cells", type=float, default=1.5e6)
    ap.add_argument("--target-channels", type=int, default=50)
    args = ap.parse_args(argv)
    base = run([sys.executable, "-c", "import numpy, tifffile, zarr, scipy, skimage, pandas, anndata"])
    runs = [one_slide(size, args) for size in args.size]
    print(f"\nbaseline (interpreter + libraries) peak {base['peak_mb']} MB")
    print(f"{'size':>6} {'cells':>9} {'stage':14} {'s':>8} {'peak MB':>9}")
    for r in runs:
        for name, v in r["stages"].items():
            print(f"{r['size']:6} {r['cells']:9,} {name:14} {v['seconds']:8.1f} {v['peak_mb']:9.0f}")
    px_per_cell = np.mean([r["size"] ** 2 / r["cells"] for r in runs])
    target_px = args.target_cells * px_per_cell
    print(f"\nextrapolated to {args.target_cells:,.0f} cells x {args.target_channels} channels at "
          f"{px_per_cell:.0f} px a cell ({target_px / 1e9:.2f} Gpx), fitted a + b x pixels over the sizes run:")
    print(f"{'stage':14} {'hours':>7} {'peak GB':>8}")
    pixels = np.array([r["size"] ** 2 for r in runs], dtype=float)
    for name in runs[0]["stages"]:
        secs = np.array([r["stages"][name]["seconds"] for r in runs])
        mem = np.array([r["stages"][name]["peak_mb"] for r in runs])
        t, m = (_fit(pixels, y, target_px) for y in (secs, mem))
        if name == "quantify":
            t *= args.target_channels / args.channels
        print(f"{name:14} {t / 3600:7.2f} {m / 1024:8.1f}")
    if len(runs) < 2:
        print("(one size: the figures above scale it by the pixels; run two sizes for a fit)")


def _fit(pixels, values, target):
    """a + b x pixels through the runs (proportional with one run), at ``target`` pixels."""
    if len(pixels) < 2:
        return float(values[0] * target / pixels[0])
    b, a = np.polyfit(pixels, values, 1)
    return float(a + b * target)


def one_slide(size: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slide = tmp / "slide.ome.tif"
        t0 = time.perf_counter()
        write_slide(slide, size, args.channels)
        print(f"slide {size} x {size} px, {args.channels} channels written in {time.perf_counter() - t0:.0f} s",
              flush=True)
        tiles, seg, rep, st, q = (tmp / n for n in ("tiles", "segment", "repair", "stitch", "quantify"))
        stages = {
            "tile_image": [*MAIN, "tile-image", str(slide), str(tiles), "--nuclear-channel", "DAPI",
                           "--wholecell-channels", "CD45,PanCK"],
            "segment_cells": [*MAIN, "segment-cells", str(tiles), str(seg), "--backend", args.backend],
            "repair_masks": [*MAIN, "repair-masks", "--segment-dir", str(seg), "--metadata",
                             str(tiles / "patches_metadata.csv"), "--out", str(rep)],
            "stitch": [*MAIN, "stitch", str(tiles), str(rep), str(st)],
            "quantify": [*MAIN, "quantify", str(slide), str(st), str(q)],
        }
        rows = {}
        for name, cmd in stages.items():
            rows[name] = run(cmd)
            print(size, name, json.dumps(rows[name]), flush=True)
        cells = json.loads((q / "quantify_stats.json").read_text())["cells"]
    return {"size": size, "cells": cells, "stages": rows}


if __name__ == "__main__":
    main()
