"""Benchmark U-Net inference (predict_volume): blending and out-of-core against whole-volume inference.

Modes, each in its own subprocess so that its peak resident memory (VmHWM) is its own:

- ``memory``    whole volume in memory, Gaussian blending (the baseline)
- ``constant``  whole volume in memory, constant (box) blending
- ``chunked``   Zarr in, Zarr out, block by block (``--chunk``), Gaussian blending; the output
                Zarr chunks tile the block as the predict_unet stage writes them

Ratios are against ``memory``, measured in the same run.  The model has random weights
(speed does not depend on them) and the volume is uniform noise; sizes are printed.
The default block is the stage's automatic one (``AUTO_CHUNK_SHAPE``, 128 x 512 x 512,
rounded to whole window steps: 96 x 480 x 480) and the default volume holds 2 x 1 x 2 of them,
so that window shares are carried across z, x and their edge.

    python bench/bench_unet.py [--shape 192 480 960] [--chunk 128 512 512] [--device cpu|cuda] [--repeat 3]
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

from maskworks.em.stages import AUTO_CHUNK_SHAPE

MODES = ("memory", "constant", "chunked")


def _model(args):
    import torch

    from maskworks.em.unet import build_unet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_unet(channels=args.channels, strides=args.strides, num_res_units=args.num_res_units)


def _worker(args) -> dict:
    import torch
    import zarr

    from maskworks.em.stages import _zarr_chunks
    from maskworks.em.unet import inference_chunk_shape, predict_volume

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _model(args)
    src = zarr.open(str(args.data / "volume.zarr"), mode="r")
    kw = {"roi_size": args.roi, "overlap": args.overlap, "sw_batch_size": args.sw_batch_size,
          "device": args.device, "progress": False, "mean": 127.5, "std": 73.6}
    # Warm-up on one window, so that one-off costs (CUDA context, kernel selection) are not timed.
    predict_volume(model, np.zeros((args.roi,) * 3, np.uint8), **kw)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    if args.worker == "chunked":
        chunks = _zarr_chunks(inference_chunk_shape(src.shape, tuple(args.chunk), args.roi, args.overlap))
        out_p = zarr.open(str(args.data / "prob.zarr"), mode="w", shape=src.shape, chunks=chunks, dtype="f2")
        out_m = zarr.open(str(args.data / "mask.zarr"), mode="w", shape=src.shape, chunks=chunks, dtype="u1")
        prob, mask, stats = predict_volume(model, src, chunk_shape=tuple(args.chunk), out_prob=out_p,
                                           out_mask=out_m, **kw)
    else:
        blend = "constant" if args.worker == "constant" else "gaussian"
        prob, mask, stats = predict_volume(model, src[...], blend=blend, **kw)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mb()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    np.save(args.data / f"prob_{args.worker}.npy", np.asarray(prob[...]))
    np.save(args.data / f"mask_{args.worker}.npy", np.asarray(mask[...]))
    return {"mode": args.worker, "seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": base,
            "gpu_peak_mb": gpu, "voxels": stats["voxels"], "blocks": stats["blocks"], "windows": stats["windows"],
            "evaluations": stats["evaluations"],
            "chunk_shape": stats["chunk_shape"], "device": stats["device"]}


def _run_worker(mode: str, args, data: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--data", str(data), *_shared_flags(args)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _shared_flags(args) -> list[str]:
    return ["--chunk", *map(str, args.chunk), "--roi", str(args.roi), "--overlap", str(args.overlap),
            "--sw-batch-size", str(args.sw_batch_size), "--device", args.device, "--threads", str(args.threads),
            "--channels", *map(str, args.channels), "--strides", *map(str, args.strides),
            "--num-res-units", str(args.num_res_units)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(192, 480, 960), help="volume (z y x)")
    ap.add_argument("--chunk", type=int, nargs=3, default=AUTO_CHUNK_SHAPE,
                    help="chunk_shape of the chunked run (default: the stage's automatic block)")
    ap.add_argument("--roi", type=int, default=64, help="window side")
    ap.add_argument("--overlap", type=int, default=16, help="window overlap (voxels)")
    ap.add_argument("--sw-batch-size", type=int, default=4)
    ap.add_argument("--channels", type=int, nargs="+", default=(16, 32, 64, 128, 256))
    ap.add_argument("--strides", type=int, nargs="+", default=(2, 2, 2, 2))
    ap.add_argument("--num-res-units", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds over the modes (interleaved, so that a busy spell hits all); fastest reported")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    import zarr

    with tempfile.TemporaryDirectory(prefix="bench_unet_") as tmp:
        data = Path(tmp)
        image = np.random.default_rng(0).integers(0, 256, tuple(args.shape), dtype=np.uint8)
        zarr.array(image, chunks=(64, 64, 64), store=str(data / "volume.zarr"))
        rows = {}
        for _ in range(max(1, args.repeat)):
            for mode in MODES:
                r = _run_worker(mode, args, data)
                if mode not in rows or r["seconds"] < rows[mode]["seconds"]:
                    rows[mode] = r
        probs = {m: np.load(data / f"prob_{m}.npy") for m in ("memory", "chunked")}
        masks = {m: np.load(data / f"mask_{m}.npy") for m in ("memory", "chunked")}

    n = image.size
    print(f"predict_volume on a {tuple(args.shape)} uint8 volume ({n / 1e6:.1f} M voxels, "
          f"{n / np.prod(rows['chunked']['chunk_shape']):.1f}x the block {tuple(rows['chunked']['chunk_shape'])}); "
          f"UNet channels {tuple(args.channels)} strides {tuple(args.strides)} res units {args.num_res_units} "
          f"(random weights); roi {args.roi}^3, overlap {args.overlap}, sw_batch_size {args.sw_batch_size}; "
          f"device {rows['memory']['device']}")
    gpu = rows["memory"]["gpu_peak_mb"] is not None
    print(f"{'mode':<9} {'blocks':>6} {'windows':>7} {'evals':>6} {'seconds':>8} {'Mvoxel/s':>9} {'peak RSS MB':>12} {'baseline MB':>12} "
          f"{'above baseline':>15}" + (f" {'GPU peak MB':>12}" if gpu else ""))
    for r in rows.values():
        print(f"{r['mode']:<9} {r['blocks']:>6} {r['windows']:>7} {r['evaluations']:>6} {r['seconds']:8.2f} {r['voxels'] / r['seconds'] / 1e6:9.3f} "
              f"{r['peak_rss_mb']:12.0f} {r['baseline_rss_mb']:12.0f} {r['peak_rss_mb'] - r['baseline_rss_mb']:15.0f}"
              + (f" {r['gpu_peak_mb']:12.0f}" if gpu else ""))
    m = rows["memory"]
    above = max(1.0, m["peak_rss_mb"] - m["baseline_rss_mb"])
    for mode in ("constant", "chunked"):
        r = rows[mode]
        print(f"ratio {mode}/memory: voxels/s {m['seconds'] / r['seconds']:.2f}x (network evaluations "
              f"{m['evaluations'] / r['evaluations']:.2f}x), peak RSS "
              f"{r['peak_rss_mb'] / m['peak_rss_mb']:.2f}x, above baseline "
              f"{(r['peak_rss_mb'] - r['baseline_rss_mb']) / above:.2f}x"
              + (f", GPU peak {r['gpu_peak_mb'] / max(m['gpu_peak_mb'], 1.0):.2f}x" if gpu else ""))
    # the chunked run stores its probabilities in a float16 Zarr: compare with the in-memory ones at that precision
    stored = probs["memory"].astype(probs["chunked"].dtype)
    diff = float(np.abs(probs["chunked"].astype(np.float32) - stored.astype(np.float32)).max())
    print(f"chunked == memory: masks equal {np.array_equal(masks['chunked'], masks['memory'])}; probabilities "
          f"(as stored, {probs['chunked'].dtype}) max |diff| {diff:.2e}, equal {np.array_equal(probs['chunked'], stored)}")


if __name__ == "__main__":
    main()
