"""Benchmark postprocess_mask: 1 -> N threads in memory, and out of core under a memory budget.

The mask is the truth of ``make_em_volume`` with specks, pits and a cavity added (so every step
has work).  Each mode runs in its own subprocess so that its peak resident memory (VmHWM) is its
own, beside its baseline (interpreter, imports, the mask loaded or the Zarr opened):

- ``threads1`` / ``threadsN``: the whole mask in memory;
- ``bounded``: Zarr in, Zarr out, ``memory_mb`` = a quarter of the mask's in-memory working set
  (at least postprocess.MIN_MEMORY_MB); its peak above the baseline is compared with the budget
  and its result with the in-memory one;
- ``gpu`` (only where :mod:`maskworks.backend` sees a GPU): the whole mask on the device, timed on
  the second call in the process (the first compiles CuPy's kernels), against the N-thread run.

    python bench/bench_postprocess.py [--shape 128 512 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_texture import _peak_rss_mb  # VmHWM of this process; runs as `python bench/...`

PARAMS = dict(closing_radius=1, opening_radius=2, keep_largest=True, fill_holes=True, grow_radius=2)


def _worker(mode: str, data: Path, args) -> dict:
    import zarr

    from maskworks.em.postprocess import postprocess_mask

    if mode == "bounded":
        src = zarr.open(str(data / "mask.zarr"), mode="r")
        out = zarr.open(str(data / "out.zarr"), mode="w", shape=src.shape, chunks=src.chunks, dtype="u1")
    else:
        src = np.load(data / "mask.npy")
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    if mode == "bounded":
        res, st = postprocess_mask(src, threads=args.threads, memory_mb=args.memory_mb, out=out, device="cpu",
                                   **PARAMS)
    elif mode == "gpu":
        postprocess_mask(src, device="cuda", **PARAMS)  # compiles the kernels
        t0 = time.perf_counter()
        res, st = postprocess_mask(src, device="cuda", **PARAMS)
    else:
        res, st = postprocess_mask(src, threads=int(mode[len("threads"):]), device="cpu", **PARAMS)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mb()
    np.save(data / f"res_{mode}.npy", np.asarray(res[...]))
    return {"mode": mode, "seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": base,
            "voxels_out": st["voxels_out"], "components_in": st["components_in"]}


def _run(mode, data, args):
    cmd = [sys.executable, __file__, "--worker", mode, "--data", str(data), "--threads", str(args.threads),
           "--memory-mb", str(args.memory_mb)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 512, 512))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-mb", type=float)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.data, args)))
        return

    import zarr

    from maskworks.backend import resolve_device
    from maskworks.demo import make_em_volume
    from maskworks.em.postprocess import MIN_MEMORY_MB, SLAB_BYTES_PER_VOXEL

    gpu = resolve_device("auto") != "cpu"

    _, truth = make_em_volume(tuple(args.shape), seed=0)
    rng = np.random.default_rng(0)
    mask = truth.astype(np.uint8)
    mask[rng.random(mask.shape) < 0.002] ^= 1  # specks in the resin, pits in the tissue
    c = [s // 2 for s in mask.shape]
    mask[c[0] - 4:c[0] + 4, c[1] - 6:c[1] + 6, c[2] - 6:c[2] + 6] = 0  # a cavity
    work_mb = mask.size * SLAB_BYTES_PER_VOXEL / 2**20
    if args.memory_mb is None:
        args.memory_mb = max(float(MIN_MEMORY_MB), work_mb / 4)
    with tempfile.TemporaryDirectory(prefix="bench_postprocess_") as tmp:
        data = Path(tmp)
        np.save(data / "mask.npy", mask)
        zarr.array(mask, chunks=(32, 256, 256), store=str(data / "mask.zarr"))
        modes = ["threads1", f"threads{args.threads}", "bounded"] + (["gpu"] if gpu else [])
        rows = {m: _run(m, data, args) for m in modes}
        res = {m: np.load(data / f"res_{m}.npy") for m in modes}
    print(f"postprocess_mask {PARAMS} on a {tuple(args.shape)} mask ({mask.size / 1e6:.1f} M voxels, "
          f"in-memory working set about {work_mb:.0f} MiB)")
    print(f"{'mode':<10} {'seconds':>8} {'peak RSS MiB':>13} {'above base':>11}")
    for m, r in rows.items():
        print(f"{m:<10} {r['seconds']:8.2f} {r['peak_rss_mb']:13.0f} {r['peak_rss_mb'] - r['baseline_rss_mb']:11.0f}")
    n = f"threads{args.threads}"
    print(f"speed-up 1 -> {args.threads} threads: {rows['threads1']['seconds'] / rows[n]['seconds']:.2f}x")
    b = rows["bounded"]
    above = b["peak_rss_mb"] - b["baseline_rss_mb"]
    print(f"bounded (Zarr in and out, memory_mb {args.memory_mb:.0f}): peak above baseline {above:.0f} MiB = "
          f"{above / args.memory_mb:.2f}x the budget, time {b['seconds'] / rows[n]['seconds']:.2f}x in-memory; "
          f"result == in-memory: {np.array_equal(res['bounded'], res['threads1']) and np.array_equal(res[n], res['threads1'])}")
    if gpu:
        print(f"GPU (whole mask, second call): {rows['gpu']['seconds']:.2f} s = "
              f"{rows[n]['seconds'] / rows['gpu']['seconds']:.1f}x faster than {args.threads} CPU threads; "
              f"result == CPU: {np.array_equal(res['gpu'], res['threads1'])}")
    else:
        print("GPU: none visible here (CuPy not importable or no CUDA device): not measured")
    print("command: python bench/bench_postprocess.py")


if __name__ == "__main__":
    main()
