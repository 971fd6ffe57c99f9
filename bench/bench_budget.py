"""stitch and quantify under a memory budget: peak RSS against the budget, outputs against the in-memory path.

A ``--size`` x ``--size`` slide of the demo generator's cells (bench_codex_arm's slide, tiled
OME-TIFF, ``--channels`` channels) goes through tile-image, segment-cells (``--backend``,
expansion by default: the fastest) and repair-masks once.  Then ``maskworks stitch`` and
``maskworks quantify`` each run twice as the user runs them, one process each: with no limit
(``--memory-mb`` huge: stitch holds the slide, quantify reads it in one block) and with
``--memory-mb`` (stitch: Zarr label stores and row bands; quantify: the per-cell tables and
row blocks of what they leave).  Printed per stage: wall time and peak RSS of both runs, the
in-memory peak over the budget (the issue asks for a slide whose in-memory path needs at least
4x the budget), whether the budget run kept under it, and whether the outputs are the same
(stitch: the five label images byte-equal, ``cells.csv`` and the stats; quantify: every CSV
byte-equal and the stats).

    python bench/bench_budget.py                          # 8192 x 8192, budget 700 MB (about 15 min)
    python bench/bench_budget.py --size 12288 --memory-mb 1100 --work /tmp/budget
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

NO_LIMIT = "1e9"
LABELS = ("cell", "nucleus", "cytoplasm", "cell_original", "nucleus_original")
SAME_STATS = {"stitch": ("cells", "cell_stitch", "nucleus_stitch", "repair", "check", "nucleus_fragments_removed"),
              "quantify": ("cells", "markers", "statistics", "cells_without_nucleus", "edges", "nuclei_trimmed")}


def _same_stitch(a: Path, b: Path) -> dict:
    import tifffile
    import zarr

    same = {}
    for k in LABELS:
        with tifffile.TiffFile(a / f"{k}.ome.tif") as ta, tifffile.TiffFile(b / f"{k}.ome.tif") as tb:
            xa, xb = (zarr.open(t.series[0].aszarr(), mode="r") for t in (ta, tb))
            same[k] = all(np.array_equal(xa[y:y + 2048], xb[y:y + 2048]) for y in range(0, xa.shape[0], 2048))
    same["cells.csv"] = (a / "cells.csv").read_bytes() == (b / "cells.csv").read_bytes()
    return same


def _same_quantify(a: Path, b: Path) -> dict:
    return {p.name: p.read_bytes() == (b / p.name).read_bytes() for p in sorted(a.glob("*.csv"))}


def _stats(folder: Path, stage: str) -> dict:
    return json.loads((folder / f"{stage}_stats.json").read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--memory-mb", type=float, default=700)
    ap.add_argument("--backend", default="expansion", choices=("expansion", "watershed"))
    ap.add_argument("--stages", nargs="+", choices=("stitch", "quantify"), default=["stitch", "quantify"],
                    help="stages to run (quantify alone reuses the stitch output of --work)")
    ap.add_argument("--work", type=Path, help="keep the slide and the stages' outputs in this folder (and reuse "
                    "its repair-masks output on a rerun) instead of a temporary one")
    args = ap.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.work or Path(tmp)
        slide = tmp / "slide.ome.tif"
        tiles, seg, rep = tmp / "tiles", tmp / "segment", tmp / "repair"
        if not (rep / "patches_metadata.csv").is_file():
            tmp.mkdir(parents=True, exist_ok=True)
            write_slide(slide, args.size, args.channels)
            _prepare(slide, tiles, seg, rep, args.backend)
        base = run([sys.executable, "-c", "import numpy, scipy, skimage, tifffile, zarr, pandas, anndata"])
        same = {}
        for stage in args.stages:
            for label, budget in (("in memory", NO_LIMIT), ("budget", str(args.memory_mb))):
                out = tmp / f"{stage}_{label.replace(' ', '_')}"
                if out.exists():
                    shutil.rmtree(out)  # this bench's own output of an earlier run
                cmd = ([*MAIN, "stitch", str(tiles), str(rep), str(out)] if stage == "stitch" else
                       [*MAIN, "quantify", str(slide), str(tmp / "stitch_budget"), str(out)])
                rows[stage, label] = run([*cmd, "--memory-mb", budget])
                rows[stage, label]["plan"] = _stats(out, stage)["memory"]
                print(stage, label, json.dumps(rows[stage, label]), flush=True)
            a, b = tmp / f"{stage}_in_memory", tmp / f"{stage}_budget"
            same[stage] = (_same_stitch(a, b) if stage == "stitch" else _same_quantify(a, b))
            same[stage]["stats"] = all(_stats(a, stage)[k] == _stats(b, stage)[k] for k in SAME_STATS[stage])
        cells = _stats(tmp / "stitch_budget", "stitch")["cells"]
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
    print(f"\n{args.size} x {args.size} px, {args.channels} channels, {cells} cells, budget {args.memory_mb:.0f} MB; "
          f"interpreter with libraries: {base['peak_mb']:.0f} MB")
    print(f"{'stage':9} {'run':10} {'seconds':>8} {'peak MB':>8}  plan")
    for (stage, label), r in rows.items():
        p = r["plan"]
        if stage == "stitch":
            how = "in memory" if p["in_memory"] else f"label stores, bands of {p['band_rows']} rows"
        else:
            how = f"tables ~{p['tables_mb']} MB, blocks of {p['block_mb'] or 'the whole slide'} MB"
        print(f"{stage:9} {label:10} {r['seconds']:8.1f} {r['peak_mb']:8.0f}  {how}")
    for stage in args.stages:
        mem, bud = rows[stage, "in memory"], rows[stage, "budget"]
        print(f"{stage}: in-memory peak / budget {mem['peak_mb'] / args.memory_mb:.2f} (goal >= 4); budget run "
              f"peak {bud['peak_mb']:.0f} MB {'<=' if bud['peak_mb'] <= args.memory_mb else '>'} "
              f"{args.memory_mb:.0f} MB; {bud['seconds'] / mem['seconds']:.2f}x the in-memory time; identical "
              f"outputs: {'yes' if all(same[stage].values()) else f'NO: {same[stage]}'}")


if __name__ == "__main__":
    main()
