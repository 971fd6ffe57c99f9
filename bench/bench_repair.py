"""Benchmark repair_masks: speed-up over the straightforward pixel-set matcher, and a whole slide.

1. On synthetic tilings of ``--cells`` cells (default 2k and 8k), time ``repair_masks`` (best of
   ``--repeat``) and the pixel-set reference of ``tests/reference_matcher.py`` (best of 2) on the same
   masks, check that they agree pixel for pixel, and print the ratio (target >= 100x).
2. On a large synthetic slide of ``--large`` cells (default ~1 M), time ``repair_masks`` in its own
   subprocess and report its peak resident memory above the worker's baseline (the slide).

The slides are Voronoi cells of seeds jittered on a grid (``--spacing`` pixels apart, so about
``spacing**2`` pixels per cell), with background gaps where a pixel is farther than a per-cell
reach from its seed, disc nuclei jittered off the seeds (some crossing into a neighbour, about
one in ten missing), and shuffled ids with gaps.

    python bench/bench_repair.py [--cells 2000 8000] [--large 1000000] [--spacing 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_texture import _peak_rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def synthetic_slide(n_cells: int, spacing: int = 10, seed: int = 0, band_rows: int = 256):
    """(cells, nuclei) uint32 label images of about ``n_cells`` cells, built band by band."""
    rng = np.random.default_rng(seed)
    gy = gx = int(np.ceil(np.sqrt(n_cells)))
    n = gy * gx
    height, width = gy * spacing, gx * spacing
    seed_y = ((np.arange(gy)[:, None] + rng.uniform(0.2, 0.8, (gy, gx))) * spacing).astype(np.float32)
    seed_x = ((np.arange(gx)[None, :] + rng.uniform(0.2, 0.8, (gy, gx))) * spacing).astype(np.float32)
    reach2 = ((rng.uniform(0.55, 0.95, n) * spacing) ** 2).astype(np.float32)
    nuc_y = (seed_y + rng.normal(0, 0.15 * spacing, (gy, gx))).astype(np.float32)
    nuc_x = (seed_x + rng.normal(0, 0.15 * spacing, (gy, gx))).astype(np.float32)
    nuc_r2 = (rng.uniform(0.18, 0.4, (gy, gx)) * spacing) ** 2
    nuc_r2[rng.random((gy, gx)) < 0.1] = -1  # no nucleus
    nuc_r2 = nuc_r2.astype(np.float32)
    cell_ids = (rng.permutation(n) * 3 + 1).astype(np.uint32)
    nuc_ids = (rng.permutation(n) * 2 + 5).astype(np.uint32)

    cells = np.zeros((height, width), dtype=np.uint32)
    nuclei = np.zeros((height, width), dtype=np.uint32)
    xx = np.arange(width, dtype=np.float32)[None, :] + 0.5
    ix = (np.arange(width) // spacing)[None, :]
    for y0 in range(0, height, band_rows):
        y1 = min(y0 + band_rows, height)
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
        iy = (np.arange(y0, y1) // spacing)[:, None]
        best = np.full((y1 - y0, width), np.inf, dtype=np.float32)
        owner = np.zeros((y1 - y0, width), dtype=np.int64)
        nuc = np.zeros((y1 - y0, width), dtype=np.uint32)
        for dy in (-1, 0, 1):
            jy = np.clip(iy + dy, 0, gy - 1)
            for dx in (-1, 0, 1):
                jx = np.clip(ix + dx, 0, gx - 1)
                d2 = (yy - seed_y[jy, jx]) ** 2 + (xx - seed_x[jy, jx]) ** 2
                closer = d2 < best
                best[closer] = d2[closer]
                owner[closer] = (jy * gx + jx + np.zeros_like(owner))[closer]
                disc = ((yy - nuc_y[jy, jx]) ** 2 + (xx - nuc_x[jy, jx]) ** 2 <= nuc_r2[jy, jx]) & (nuc == 0)
                nuc[disc] = nuc_ids[(jy * gx + jx + np.zeros_like(owner))[disc]]
        cells[y0:y1] = np.where(best <= reach2[owner], cell_ids[owner], 0)
        nuclei[y0:y1] = nuc
    return cells, nuclei


def _time(func, repeat: int):
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = func()
        best = min(best, time.perf_counter() - t0)
    return best, out


def compare(n_cells: int, spacing: int, repeat: int, seed: int) -> dict:
    from reference_matcher import reference_repair

    from maskworks.codex.repair import repair_masks

    cells, nuclei = synthetic_slide(n_cells, spacing, seed)
    fast_s, fast = _time(lambda: repair_masks(cells, nuclei), repeat)
    ref_s, ref = _time(lambda: reference_repair(cells, nuclei), 2)
    equal = all(np.array_equal(a, b) for a, b in zip(fast[:3], ref[:3]))
    return {"cells": int(fast[3]["cells_in"]), "pixels": cells.size, "matched": fast[3]["matched"],
            "fast_s": fast_s, "reference_s": ref_s, "equal": equal}


def _worker(n_cells: int, spacing: int, seed: int) -> dict:
    from maskworks.codex.repair import repair_masks

    t0 = time.perf_counter()
    cells, nuclei = synthetic_slide(n_cells, spacing, seed)
    generated = time.perf_counter() - t0
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    *_, metrics = repair_masks(cells, nuclei)
    seconds = time.perf_counter() - t0
    return {"cells": metrics["cells_in"], "nuclei": metrics["nuclei_in"], "matched": metrics["matched"],
            "matched_fraction": metrics["matched_fraction"], "pixels": cells.size, "shape": cells.shape,
            "generated_s": generated, "seconds": seconds, "baseline_rss_mb": base, "peak_rss_mb": _peak_rss_mb()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[2000, 8000], help="tilings timed against the reference")
    ap.add_argument("--large", type=int, default=1_000_000, help="cells of the large slide (0: skip)")
    ap.add_argument("--spacing", type=int, default=10, help="grid spacing of the cell seeds (pixels)")
    ap.add_argument("--repeat", type=int, default=3, help="repair_masks runs per small case (best is kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.large, args.spacing, args.seed)))
        return

    print(f"repair_masks vs the pixel-set reference (tests/reference_matcher.py), ~{args.spacing ** 2} px/cell")
    print(f"{'cells':>8} {'pixels':>10} {'matched':>8} {'reference s':>12} {'repair s':>9} {'ratio':>8}  equal")
    for n in args.cells:
        r = compare(n, args.spacing, args.repeat, args.seed)
        print(f"{r['cells']:>8} {r['pixels']:>10} {r['matched']:>8} {r['reference_s']:12.2f} {r['fast_s']:9.4f} "
              f"{r['reference_s'] / r['fast_s']:7.0f}x  {'yes' if r['equal'] else 'NO'}")
    if args.large:
        cmd = [sys.executable, __file__, "--worker", "--large", str(args.large), "--spacing", str(args.spacing),
               "--seed", str(args.seed)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"large slide: {r['cells']} cells, {r['nuclei']} nuclei, {r['shape'][0]} x {r['shape'][1]} px "
              f"({r['pixels'] / 1e6:.0f} M px, uint32 inputs {r['pixels'] * 8 / 2**20:.0f} MB; generated in "
              f"{r['generated_s']:.1f} s)")
        print(f"  repair_masks {r['seconds']:.1f} s ({r['cells'] / r['seconds'] / 1e3:.0f} k cells/s, "
              f"{r['pixels'] / r['seconds'] / 1e6:.0f} M px/s), matched {r['matched']} "
              f"(matched_fraction {r['matched_fraction']:.3f}); peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} MB above the worker with its slide")


if __name__ == "__main__":
    main()
