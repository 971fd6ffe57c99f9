"""stitch under a memory budget: peak RSS against the budget, outputs against the in-memory path.

A ``--size`` x ``--size`` slide of the demo generator's cells (bench_codex_arm's slide, tiled
OME-TIFF) goes through tile-image, segment-cells (``--backend``, expansion by default: the
fastest) and repair-masks once; then ``maskworks stitch`` runs twice as the user runs it, one
process each: with no limit (the whole slide in memory) and with ``--memory-mb`` (Zarr label
stores and row bands once the slide does not fit).  Printed: each run's wall time and peak RSS,
the in-memory peak over the budget (the issue asks for a slide whose in-memory path needs at
least 4x the budget), whether the budget run kept under it, and whether the five label images
are byte-equal and ``cells.csv`` and the stats (placement, repair, check) equal.

    python bench/bench_stitch.py                          # 8192 x 8192, budget 700 MB (about 10 min)
    python bench/bench_stitch.py --size 12288 --memory-mb 1100
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_channels import run
from bench_codex_arm import MAIN, write_slide

LABELS = ("cell", "nucleus", "cytoplasm", "cell_original", "nucleus_original")
SAME_STATS = ("cells", "cell_stitch", "nucleus_stitch", "repair", "check", "nucleus_fragments_removed")


def _same_outputs(a: Path, b: Path) -> dict:
    import tifffile
    import zarr

    same = {}
    for k in LABELS:
        with tifffile.TiffFile(a / f"{k}.ome.tif") as ta, tifffile.TiffFile(b / f"{k}.ome.tif") as tb:
            xa, xb = (zarr.open(t.series[0].aszarr(), mode="r") for t in (ta, tb))
            same[k] = all(np.array_equal(xa[y:y + 2048], xb[y:y + 2048]) for y in range(0, xa.shape[0], 2048))
    same["cells.csv"] = (a / "cells.csv").read_bytes() == (b / "cells.csv").read_bytes()
    sa, sb = (json.loads((d / "stitch_stats.json").read_text()) for d in (a, b))
    same["stats"] = all(sa[k] == sb[k] for k in SAME_STATS)
    return same


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--memory-mb", type=float, default=700)
    ap.add_argument("--backend", default="expansion", choices=("expansion", "watershed"))
    ap.add_argument("--work", type=Path, help="keep the slide and the stages' outputs in this folder (and reuse "
                    "its repair-masks output on a rerun) instead of a temporary one")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.work or Path(tmp)
        slide = tmp / "slide.ome.tif"
        tiles, seg, rep = tmp / "tiles", tmp / "segment", tmp / "repair"
        if not (rep / "patches_metadata.csv").is_file():
            tmp.mkdir(parents=True, exist_ok=True)
            write_slide(slide, args.size, args.channels)
            _prepare(slide, tiles, seg, rep, args.backend)
        base = run([sys.executable, "-c", "import numpy, scipy, skimage, tifffile, zarr, pandas"])
        rows = {}
        for label, budget in (("in memory", 1e9), ("budget", args.memory_mb)):
            out = tmp / f"stitch_{label.replace(' ', '_')}"
            if out.exists():
                shutil.rmtree(out)  # this bench's own output of an earlier run
            rows[label] = run([*MAIN, "stitch", str(tiles), str(rep), str(out), "--memory-mb", str(budget)])
            rows[label]["plan"] = json.loads((out / "stitch_stats.json").read_text())["memory"]
            print(label, json.dumps(rows[label]), flush=True)
        same = _same_outputs(tmp / "stitch_in_memory", tmp / "stitch_budget")
        cells = json.loads((tmp / "stitch_budget" / "stitch_stats.json").read_text())["cells"]
    _report(args, base, rows, same, cells)


def _prepare(slide, tiles, seg, rep, backend):
    """tile-image, segment-cells and repair-masks of the slide, as the user runs them."""
    for name, cmd in (("tile_image", ["tile-image", str(slide), str(tiles), "--nuclear-channel", "DAPI",
                                      "--wholecell-channels", "CD45,PanCK"]),
                      ("segment_cells", ["segment-cells", str(tiles), str(seg), "--backend", backend]),
                      ("repair_masks", ["repair-masks", "--segment-dir", str(seg), "--metadata",
                                        str(tiles / "patches_metadata.csv"), "--out", str(rep)])):
        print(name, json.dumps(run([*MAIN, *cmd])), flush=True)


def _report(args, base, rows, same, cells):
    mem, bud = rows["in memory"], rows["budget"]
    print(f"\nstitch, {args.size} x {args.size} px, {cells} cells; interpreter with libraries: {base['peak_mb']:.0f} MB")
    print(f"{'run':10} {'seconds':>8} {'peak MB':>8}  plan")
    for label, r in rows.items():
        p = r["plan"]
        how = "in memory" if p["in_memory"] else f"label stores, bands of {p['band_rows']} rows"
        print(f"{label:10} {r['seconds']:8.1f} {r['peak_mb']:8.0f}  {how}")
    print(f"in-memory peak / budget: {mem['peak_mb'] / args.memory_mb:.2f} (goal >= 4); budget run peak "
          f"{bud['peak_mb']:.0f} MB {'<=' if bud['peak_mb'] <= args.memory_mb else '>'} {args.memory_mb:.0f} MB; "
          f"time {bud['seconds'] / mem['seconds']:.2f}x the in-memory run")
    print("identical outputs:", "yes" if all(same.values()) else f"NO: {same}")


if __name__ == "__main__":
    main()
