"""quantify throughput: cells/s and channels/s against one skimage regionprops_table pass.

A synthetic slide (cells on a jittered grid, each with a nucleus; ``--channels`` uint16
markers) is measured by ``maskworks.codex.quantify.quantify_cells`` (mean per cell, nucleus
and cytoplasm of every marker, morphology, Delaunay graph) and, as the baseline measured in
the same run, by ONE ``skimage.measure.regionprops_table(cell, intensity_image=plane,
properties=["label", "intensity_mean"])`` pass per marker on the cell compartment only — the
least a per-cell marker table costs with the standard tool.  Each thread count is timed
``--repeat`` times (the best kept) without tracing: tracemalloc's bookkeeping serialises the
threads' allocations (it cut the 2-thread speed-up from 1.79x to 1.53x).  Peak memory
(tracemalloc) comes from one more, traced run, and is reported against the label images' size.

    python bench/bench_quantify.py                  # 4000 x 4000 px, 20 channels (a few minutes)
    python bench/bench_quantify.py --size 10000     # the 10k x 10k slide of issue 12
    python bench/bench_quantify.py --size 3000 --channels 8 --threads 1 2   # issue 23's ratios, small
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np


def make_slide(size: int, channels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    step = 16  # a cell every 16 px: (size / 16)^2 cells
    yy, xx = np.mgrid[0:size, 0:size]
    gy, gx = yy // step, xx // step
    cell = (gy * (size // step + 1) + gx + 1).astype(np.int32)
    inner = ((yy % step) >= 1) & ((xx % step) >= 1)
    cell[~inner] = 0
    nuc_zone = ((yy % step) >= 5) & ((yy % step) < 11) & ((xx % step) >= 5) & ((xx % step) < 11)
    nucleus = np.where(nuc_zone, cell, 0)
    planes = [rng.integers(0, 4000, (size, size), dtype=np.uint16) for _ in range(channels)]
    return cell, nucleus, planes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4000, help="slide side, pixels")
    ap.add_argument("--channels", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to time (default 1 2)")
    ap.add_argument("--memory-mb", type=float, default=None, help="quantify_cells' memory_mb (block size)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per thread count (the best is kept)")
    args = ap.parse_args(argv)
    from skimage.measure import regionprops_table

    from maskworks.codex.quantify import quantify_cells

    cell, nucleus, planes = make_slide(args.size, args.channels)
    n_cells = int(np.unique(cell).size - 1)
    names = [f"M{i}" for i in range(args.channels)]

    t0 = time.perf_counter()
    for plane in planes:
        regionprops_table(cell, intensity_image=plane, properties=["label", "intensity_mean"])
    base = time.perf_counter() - t0

    small = make_slide(64, 1)  # imports (scipy.spatial, sparse) outside the timings
    quantify_cells(small[0], small[1], [("M0", small[2][0])])
    labels_mb = (cell.nbytes + nucleus.nbytes) / 2**20
    print(f"quantify on {args.size} x {args.size} px, {n_cells} cells, {args.channels} channels (uint16)")
    print(f"  baseline: one regionprops_table(intensity_mean) pass per channel, cell compartment only: {base:.2f} s")
    first = None
    for threads in args.threads:
        ours, cpu = min(_timed(cell, nucleus, names, planes, threads, args.memory_mb) for _ in range(args.repeat))
        first = first or ours
        print(f"  maskworks, threads={threads}: 3 compartments x {args.channels} markers + morphology + Delaunay "
              f"graph: {ours:.2f} s = {ours / base:.2f}x the baseline's time for 3x its measurements; "
              f"speed-up {first / ours:.2f}x over threads={args.threads[0]} (CPU {cpu:.2f} s, "
              f"load average {os.getloadavg()[0]:.1f}: on a busy machine threads cannot scale)")
        print(f"    {n_cells / ours:,.0f} cells/s, {args.channels / ours:.2f} channels/s")
    tracemalloc.start()
    _, _, _, st = quantify_cells(cell, nucleus, zip(names, planes), image_mpp=0.5, threads=args.threads[0],
                                 memory_mb=args.memory_mb)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"  {st['edges']} neighbour edges; traced peak (threads={args.threads[0]}) {peak / 2**20:.0f} MB = "
          f"{peak / 2**20 / labels_mb:.2f}x the two label images ({labels_mb:.0f} MB; one uint16 channel is "
          f"{planes[0].nbytes / 2**20:.0f} MB)")


def _timed(cell, nucleus, names, planes, threads, memory_mb):
    """Wall and CPU seconds of one quantify_cells call."""
    from maskworks.codex.quantify import quantify_cells

    cpu0, t0 = os.times(), time.perf_counter()
    quantify_cells(cell, nucleus, zip(names, planes), image_mpp=0.5, threads=threads, memory_mb=memory_mb)
    wall, cpu1 = time.perf_counter() - t0, os.times()
    return wall, cpu1.user - cpu0.user + cpu1.system - cpu0.system

if __name__ == "__main__":
    main()
