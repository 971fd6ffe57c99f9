"""Benchmark the volume readers: every format a lab brings is read lazily, so a stage touches only
the blocks it processes.

One volume (``--shape``, uint8, the demo texture tiled over y and x) is written once in each format,
by the library that writes it (NumPy, zarr-python 3, maskworks' OME-Zarr 0.5 writer, h5py,
tensorstore for N5, tifffile for a slice folder and a tiled zlib BigTIFF).  Then, each in its own
subprocess so that its peak resident memory (VmHWM) is its own:

- ``block``: open the volume with ``maskworks.io.read_volume(lazy=True)`` and read one
  ``--block``-sided cube from its middle: seconds, and the resident memory it took above the
  process's baseline (the interpreter and every reader's library imported), next to the size of the cube and of the
  whole volume.  A reader that decodes the whole volume (or whole planes) shows it here.
- ``whole``: the same, reading the whole volume (``Volume.numpy()``): the time every format pays to
  decode everything, as the ratio to ``.npy`` (the baseline, measured in the same run).
- ``stage``: ``maskworks texture-mask`` on the volume with ``--memory-mb`` (a budget well below the
  volume's size as float32), writing OME-Zarr: seconds as the ratio to the same stage on ``.npy``,
  and the peak above the baseline against the budget.  Its masks must all equal the ``.npy`` one.

    python bench/bench_formats.py [--shape 96 768 768] [--block 64] [--memory-mb 192]
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

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("npy", "zarr3-sharded", "ome-zarr-0.5", "hdf5", "n5", "tiff-slices", "tiff-tiled")


def _rss_mb(field: str = "VmHWM") -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _volume(shape) -> np.ndarray:
    from maskworks.demo import make_em_volume

    z, y, x = shape
    tile_y, tile_x = min(y, 256), min(x, 256)
    tile, _ = make_em_volume(shape=(z, tile_y, tile_x), seed=7)
    reps = (1, -(-y // tile_y), -(-x // tile_x))
    return np.ascontiguousarray(np.tile(tile, reps)[:, :y, :x]).astype(np.uint8)


def write_all(folder: Path, a: np.ndarray) -> dict:
    """Write ``a`` in every format; returns {format: path as maskworks takes it}."""
    import h5py
    import tensorstore as ts
    import tifffile
    import zarr

    from maskworks.io import write_volume

    paths = {}
    c64 = tuple(min(64, s) for s in a.shape)
    np.save(folder / "v.npy", a)
    paths["npy"] = folder / "v.npy"

    arr = zarr.create_array(str(folder / "sharded.zarr"), shape=a.shape, chunks=c64,
                            shards=(c64[0], min(256, a.shape[1]), min(256, a.shape[2])), dtype=a.dtype, zarr_format=3)
    arr[...] = a
    paths["zarr3-sharded"] = folder / "sharded.zarr"

    write_volume(folder / "ome.zarr", a, voxel_size=(8.0, 8.0, 8.0), unit="nanometer")
    paths["ome-zarr-0.5"] = folder / "ome.zarr"

    with h5py.File(folder / "v.h5", "w") as f:
        ds = f.create_dataset("volumes/raw", data=a, chunks=c64, compression="gzip")
        ds.attrs["resolution"] = (8.0, 8.0, 8.0)
    paths["hdf5"] = f"{folder / 'v.h5'}:/volumes/raw"

    spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(folder / "v.n5")},
            "metadata": {"dimensions": list(a.shape[::-1]), "blockSize": list(c64[::-1]), "dataType": "uint8",
                         "compression": {"type": "gzip"}}, "create": True, "delete_existing": True}
    store = ts.open(spec).result()
    store.write(a.transpose(2, 1, 0)).result()  # N5 lists dimensions x, y, z
    attrs = folder / "v.n5" / "attributes.json"
    meta = json.loads(attrs.read_text())
    meta["resolution"] = [8.0, 8.0, 8.0]
    attrs.write_text(json.dumps(meta))
    paths["n5"] = folder / "v.n5"

    (folder / "slices").mkdir()
    for i, plane in enumerate(a):
        tifffile.imwrite(folder / "slices" / f"slice_{i}.tif", plane)
    paths["tiff-slices"] = folder / "slices"

    tifffile.imwrite(folder / "tiled.tif", a, tile=(256, 256), compression="zlib", bigtiff=True)
    paths["tiff-tiled"] = folder / "tiled.tif"
    return paths


def _worker(mode: str, path: str, args) -> dict:
    import h5py  # noqa: F401  (every reader's library imported before the baseline: the import is not the read)
    import tensorstore  # noqa: F401
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    from maskworks.io import read_volume

    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    if mode == "stage":
        from maskworks.cli import main

        out = Path(args.out)
        rc = main(["texture-mask", path, str(out / "mask.zarr"), "--memory-mb", str(args.memory_mb),
                   "--stats", str(out / "stats.json"), "--qc", str(out / "qc.png"),
                   "--confidence", str(out / "confidence.zarr"), "--threads", str(args.threads)])
        seconds = time.perf_counter() - t0
        if rc:
            raise SystemExit(f"texture-mask exited {rc} on {path}")
        mask = read_volume(out / "mask.zarr", ndim=3).numpy()
        np.save(out / "mask.npy", mask)
        return {"seconds": seconds, "base_mb": base, "peak_mb": _rss_mb() - base}
    vol = read_volume(path, ndim=3, lazy=True)
    if mode == "block":
        c = [max(0, s // 2 - args.block // 2) for s in vol.shape]
        block = np.asarray(vol.data[tuple(slice(o, o + args.block) for o in c)])
        total = int(block.sum(dtype=np.int64))
    else:
        total = int(vol.numpy().sum(dtype=np.int64))
    return {"seconds": time.perf_counter() - t0, "base_mb": base, "peak_mb": _rss_mb() - base, "sum": total,
            "voxel_size": list(vol.voxel_size)}


def _run(mode, fmt, path, args, out=None) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--path", str(path), "--block", str(args.block),
           "--memory-mb", str(args.memory_mb), "--threads", str(args.threads)]
    if out is not None:
        cmd += ["--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{mode} {fmt} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(96, 768, 768))
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--memory-mb", type=int, default=192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-stage", action="store_true", help="only the reads")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.path, args)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_formats_") as tmp:
        folder = Path(tmp)
        a = _volume(args.shape)
        t0 = time.perf_counter()
        paths = write_all(folder, a)
        vol_mb = a.nbytes / 2**20
        print(f"volume {tuple(a.shape)} uint8 = {vol_mb:.0f} MiB, written in {len(FORMATS)} formats in "
              f"{time.perf_counter() - t0:.0f} s; block {args.block}^3 = {args.block ** 3 / 2**20:.2f} MiB")
        truth_block = None
        rows = {}
        for fmt in FORMATS:
            rows[fmt] = {"block": _run("block", fmt, paths[fmt], args), "whole": _run("whole", fmt, paths[fmt], args)}
            if truth_block is None:
                truth_block, truth_whole = rows[fmt]["block"]["sum"], rows[fmt]["whole"]["sum"]
            if (rows[fmt]["block"]["sum"], rows[fmt]["whole"]["sum"]) != (truth_block, truth_whole):
                raise SystemExit(f"{fmt}: read different values from the .npy")
        if not args.no_stage:
            ref = None
            for fmt in FORMATS:
                out = folder / f"stage_{fmt}"
                out.mkdir()
                rows[fmt]["stage"] = _run("stage", fmt, paths[fmt], args, out)
                mask = np.load(out / "mask.npy")
                if ref is None:
                    ref = mask
                rows[fmt]["stage"]["same_mask"] = bool(np.array_equal(mask, ref))
        base_whole = rows["npy"]["whole"]["seconds"]
        base_stage = rows["npy"].get("stage", {}).get("seconds")
        print(f"{'format':<15}{'block s':>9}{'block MiB':>11}{'whole s':>9}{'x npy':>7}{'whole MiB':>11}"
              + ("" if args.no_stage else f"{'stage s':>9}{'x npy':>7}{'stage MiB':>11}{'same':>6}"))
        for fmt in FORMATS:
            b, w = rows[fmt]["block"], rows[fmt]["whole"]
            line = (f"{fmt:<15}{b['seconds']:>9.3f}{b['peak_mb']:>11.1f}{w['seconds']:>9.2f}"
                    f"{w['seconds'] / base_whole:>7.2f}{w['peak_mb']:>11.0f}")
            if not args.no_stage:
                s = rows[fmt]["stage"]
                line += (f"{s['seconds']:>9.1f}{s['seconds'] / base_stage:>7.2f}{s['peak_mb']:>11.0f}"
                         f"{'yes' if s['same_mask'] else 'NO':>6}")
            print(line)
        print(f"(MiB: peak resident memory above the process's baseline; budget of the stage {args.memory_mb} MiB; "
              f"whole volume {vol_mb:.0f} MiB)")
        bad = [f for f in FORMATS if not args.no_stage and not rows[f]["stage"]["same_mask"]]
        if bad:
            print(f"masks differ from the .npy one: {bad}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
