"""Benchmark refine_membranes: time and peak memory, and whether memory grows with the organelle count.

Three cases on the same volume size: 20 organelles (time), 5 and 40 organelles (memory must stay
flat: crop-wise work and one output volume).  Each case runs in its own subprocess so its peak
resident memory (VmHWM) is its own; the baseline is the worker after loading the inputs, and the
peak of Python/NumPy allocations during the call (tracemalloc) is reported beside it.  With a GPU
(``--device auto`` finds one, or ``cuda``) the CuPy memory pool's size at the end is shown too.

    python bench/bench_refine.py [--shape 200 400 400] [--device auto] [--counts 5 20 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from bench_texture import _peak_rss_mb

MEMBRANE_THICKNESS = 3


def make_scene(shape, n_organelles: int, seed: int = 0):
    """``n_organelles`` ellipsoids with membrane shells on a grid of slots, and a few spurious blobs.

    Sizes scale with the volume so that every organelle passes the default
    ``min_roi_relative_size`` (0.15) and every shell the default ``min_membrane_area``.
    """
    from maskworks.demo import shelled_ellipsoids

    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    layers, rows, cols = 2, 5, 5
    slots = [((k + 0.5) * nz / layers, (i + 0.5) * ny / rows, (j + 0.5) * nx / cols)
             for k in range(layers) for i in range(rows) for j in range(cols)]
    if n_organelles > len(slots):
        raise SystemExit(f"at most {len(slots)} organelles fit the slot grid")
    order = rng.permutation(len(slots))[:n_organelles]
    specs = []
    for oid, s in enumerate(sorted(order), start=1):
        rz = rng.uniform(0.09, 0.11) * nz
        ry, rx = (rng.uniform(0.076, 0.085) * n for n in (ny, nx))
        specs.append((oid, slots[s], (rz, ry, rx)))
    labels, shells = shelled_ellipsoids(shape, specs, thickness=MEMBRANE_THICKNESS)
    for _ in range(20):  # spurious fragments, far below min_membrane_area
        c = [int(rng.integers(6, n - 6)) for n in shape]
        shells[tuple(slice(v - 3, v + 4) for v in c)] = True
    shells &= labels == 0
    return labels, shells.astype(np.uint8)


def _worker(data: Path, device: str, membrane_output: str = "dilated") -> dict:
    from maskworks.cryoet.refine import refine_membranes

    org = np.load(data / "organelles.npy")
    mem = np.load(data / "membranes.npy")
    base = _peak_rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    out_org, out_mem, stats = refine_membranes(org, mem, device=device, progress=False,
                                               membrane_output=membrane_output)
    seconds = time.perf_counter() - t0
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = _peak_rss_mb()
    gpu_pool = None
    if stats["device"] != "cpu":
        import cupy

        gpu_pool = cupy.get_default_memory_pool().total_bytes() / 2**20
    return {"seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": base, "traced_peak_mb": traced / 2**20,
            "gpu_pool_mb": gpu_pool, "device": stats["device"], "kept": stats["organelles_kept"],
            "organelles": stats["organelles_in"], "voxels": int(org.size),
            "membrane_voxels_out": stats["membrane_voxels_out"],
            "checksum": int(out_org.astype(np.int64).sum() + 3 * out_mem.astype(np.int64).sum())}


def _case(shape, n: int, device: str, seed: int, membrane_output: str = "dilated") -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_refine_") as tmp:
        data = Path(tmp)
        t0 = time.perf_counter()
        org, mem = make_scene(shape, n, seed)
        gen = time.perf_counter() - t0
        np.save(data / "organelles.npy", org)
        np.save(data / "membranes.npy", mem)
        del org, mem
        cmd = [sys.executable, __file__, "--worker", "--data", str(data), "--device", device,
               "--membrane-output", membrane_output]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {"n": n, "generated_s": gen, **json.loads(res.stdout.strip().splitlines()[-1])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(200, 400, 400), help="volume (z y x)")
    ap.add_argument("--counts", type=int, nargs=3, default=(5, 20, 40),
                    help="organelle counts: few, timed, many (memory of few vs many must stay flat)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--membrane-output", default="dilated", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.data, args.device, args.membrane_output)))
        return

    from maskworks.backend import resolve_device

    device = resolve_device(args.device)
    shape = tuple(args.shape)
    rows = [_case(shape, n, device, args.seed) for n in args.counts]
    print(f"refine_membranes on {shape} ({np.prod(shape) / 1e6:.0f} M voxels), default filter parameters, "
          f"device {device}")
    print(f"{'organelles':>10} {'kept':>5} {'seconds':>8} {'s/organelle':>12} {'peak RSS MB':>12} "
          f"{'baseline MB':>12} {'above base':>11} {'traced MB':>10}" + ("  GPU pool MB" if device != "cpu" else ""))
    for r in rows:
        print(f"{r['n']:>10} {r['kept']:>5} {r['seconds']:8.2f} {r['seconds'] / r['n']:12.3f} "
              f"{r['peak_rss_mb']:12.0f} {r['baseline_rss_mb']:12.0f} {r['peak_rss_mb'] - r['baseline_rss_mb']:11.0f} "
              f"{r['traced_peak_mb']:10.0f}" + (f"  {r['gpu_pool_mb']:11.0f}" if r["gpu_pool_mb"] is not None else ""))
    few, timed, many = rows
    input_mb = np.prod(shape) * 5 / 2**20  # int32 organelles + uint8 membranes
    print(f"time for {timed['n']} organelles: {timed['seconds']:.1f} s "
          f"({np.prod(shape) / timed['seconds'] / 1e6:.1f} M voxel/s); inputs {input_mb:.0f} MB")
    print(f"memory ratio {many['n']}/{few['n']} organelles: peak RSS above baseline "
          f"{(many['peak_rss_mb'] - many['baseline_rss_mb']) / max(1.0, few['peak_rss_mb'] - few['baseline_rss_mb']):.2f}x, "
          f"traced peak {many['traced_peak_mb'] / max(1e-6, few['traced_peak_mb']):.2f}x "
          f"(flat = 1.00x); time ratio {many['seconds'] / few['seconds']:.2f}x")
    inp = _case(shape, timed["n"], device, args.seed, membrane_output="input")
    print(f"membrane_output input / dilated (SABER's, the default), {timed['n']} organelles: membrane voxels "
          f"{inp['membrane_voxels_out'] / max(1, timed['membrane_voxels_out']):.2f}x, "
          f"time {inp['seconds'] / timed['seconds']:.2f}x")
    print("command: python bench/bench_refine.py" + "".join(
        f" {flag} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        for flag, v, d in (("--shape", tuple(args.shape), (200, 400, 400)), ("--counts", tuple(args.counts), (5, 20, 40)),
                           ("--device", args.device, "auto")) if v != d))


if __name__ == "__main__":
    main()
