"""Benchmark texture_mask: whole volume in memory versus chunked out-of-core (Zarr in, Zarr out).

Each mode runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own;
the baseline (interpreter, imports, the Zarr store opened) is measured the same way and reported
beside it.  Ratios are chunked / unchunked, measured in the same run.

    python bench/bench_texture.py [--shape 128 256 256] [--chunk 64 128 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB).

    VmHWM rather than ru_maxrss: on Linux ru_maxrss survives exec, so a worker would report
    its parent's peak (the parent has just generated the volume).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _worker(mode: str, data: Path, chunk) -> dict:
    import zarr

    from maskworks.em.texture import texture_mask

    src = zarr.open(str(data / "volume.zarr"), mode="r")
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    if mode == "unchunked":
        volume = src[...]
        mask, conf, stats = texture_mask(volume, progress=False)
    else:
        out = zarr.open(str(data / "confidence.zarr"), mode="w", shape=src.shape, chunks=tuple(chunk), dtype="f4")
        mask, conf, stats = texture_mask(src, chunk_shape=tuple(chunk), out_confidence=out, progress=False)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mb()  # before the results are saved (that reads the chunked confidence back)
    np.save(data / f"mask_{mode}.npy", mask)
    np.save(data / f"conf_{mode}.npy", np.asarray(conf[...]))
    return {"mode": mode, "seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": base,
            "voxels": stats["voxels"], "chunks": stats["chunks"], "halo": stats["halo"]}


def _run_worker(mode: str, data: Path, chunk) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--data", str(data), "--chunk", *map(str, chunk)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256), help="volume (z y x)")
    ap.add_argument("--chunk", type=int, nargs=3, default=(64, 128, 128), help="chunk_shape of the chunked run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=("unchunked", "chunked"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.data, args.chunk)))
        return

    import zarr

    from maskworks.demo import make_em_volume

    with tempfile.TemporaryDirectory(prefix="bench_texture_") as tmp:
        data = Path(tmp)
        t0 = time.perf_counter()
        image, truth = make_em_volume(tuple(args.shape), seed=args.seed)
        gen = time.perf_counter() - t0
        zarr.array(image, chunks=tuple(args.chunk), store=str(data / "volume.zarr"))
        rows = [_run_worker(mode, data, args.chunk) for mode in ("unchunked", "chunked")]
        masks = {m: np.load(data / f"mask_{m}.npy") for m in ("unchunked", "chunked")}
        confs = {m: np.load(data / f"conf_{m}.npy") for m in ("unchunked", "chunked")}

    truth = truth.astype(bool)
    dice = 2 * np.count_nonzero(masks["unchunked"].astype(bool) & truth) / (
        np.count_nonzero(masks["unchunked"]) + np.count_nonzero(truth))
    print(f"texture_mask on make_em_volume{tuple(args.shape)} seed {args.seed} "
          f"({image.size / 1e6:.1f} M voxels, generated in {gen:.1f} s); chunk {tuple(args.chunk)}, "
          f"halo {rows[1]['halo']}, {rows[1]['chunks']} chunks")
    print(f"{'mode':<10} {'seconds':>8} {'Mvoxel/s':>9} {'peak RSS MB':>12} {'baseline MB':>12} {'above baseline':>15}")
    for r in rows:
        print(f"{r['mode']:<10} {r['seconds']:8.2f} {r['voxels'] / r['seconds'] / 1e6:9.2f} "
              f"{r['peak_rss_mb']:12.0f} {r['baseline_rss_mb']:12.0f} {r['peak_rss_mb'] - r['baseline_rss_mb']:15.0f}")
    u, c = rows
    print(f"ratio chunked/unchunked: time {c['seconds'] / u['seconds']:.2f}x, peak RSS "
          f"{c['peak_rss_mb'] / u['peak_rss_mb']:.2f}x, above baseline "
          f"{(c['peak_rss_mb'] - c['baseline_rss_mb']) / max(1.0, u['peak_rss_mb'] - u['baseline_rss_mb']):.2f}x")
    print(f"chunked == unchunked: mask {np.array_equal(masks['chunked'], masks['unchunked'])}, "
          f"max |confidence diff| {float(np.abs(confs['chunked'] - confs['unchunked']).max()):.2e}; "
          f"Dice vs truth {dice:.4f}")
    print("command: python bench/bench_texture.py" + "".join(
        f" {flag} {' '.join(map(str, v))}" for flag, v, d in (("--shape", args.shape, (128, 256, 256)),
                                                             ("--chunk", args.chunk, (64, 128, 128)))
        if tuple(v) != d))


if __name__ == "__main__":
    main()
