"""tile-image on a whole slide as one patch (split_mode full_image), against a plain read.

A synthetic ``--size`` x ``--size`` uint16 slide with three channels (nuclear, two
whole-cell markers: cells on a grid) is written as an uncompressed TIFF (read lazily,
memory-mapped, above ``maskworks.io.slides.IN_MEMORY_BYTES``, i.e. from about 13k x 13k) and tiled with ``split_mode=full_image``:
the patch is written block by block into 1024 x 1024 Zarr tiles (a one-chunk patch over
2 GiB is refused by Blosc).  The baseline measured in the same run is the least any tiler
pays: reading the nuclear channel and the maximum of the two whole-cell channels from the
same memory map, block by block.  Each run is a subprocess, so its peak RSS is its own.

    python bench/bench_slide.py                  # 8192 x 8192 px (under a minute)
    python bench/bench_slide.py --size 23000     # the 23k x 23k slide of issue 12 (3.2 GB on disk)
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


def write_slide(path: Path, size: int) -> None:
    """A contiguous (C, Y, X) TIFF filled through a memory map, row block by row block."""
    import tifffile

    step = 16
    data = tifffile.memmap(path, shape=(3, size, size), dtype=np.uint16, bigtiff=True,
                           photometric="minisblack", metadata={"axes": "CYX"})
    for r0 in range(0, size, 1024):
        yy, xx = np.mgrid[r0:min(r0 + 1024, size), 0:size]
        inside = ((yy % step) - 8) ** 2 + ((xx % step) - 8) ** 2
        for c, radius in ((0, 9), (1, 49), (2, 36)):
            plane = np.where(inside <= radius, 1000 + 500 * c, 30).astype(np.uint16)
            plane[:, int(size * 0.7):] = 0
            data[c, r0:r0 + plane.shape[0]] = plane
    data.flush()
    del data


def child(what: str, slide: str, out: str) -> None:
    t0 = time.perf_counter()
    if what == "tile":
        from maskworks.codex.stages import tile_image_files

        names = Path(out).with_suffix(".txt")
        names.write_text("DAPI\nCD45\nPanCK\n")
        tile_image_files(slide, names, out, nuclear_channel="DAPI", wholecell_channels="CD45,PanCK",
                         image_mpp=0.5, split_mode="full_image", channel_axis=0)
    else:
        from maskworks.io.slides import open_multichannel

        with open_multichannel(slide, channel_axis=0) as img:
            total = 0
            for r0 in range(0, img.shape[0], 1024):
                ys = slice(r0, r0 + 1024)
                nuc = img.region(0, ys, slice(None))
                wc = np.maximum(img.region(1, ys, slice(None)), img.region(2, ys, slice(None)))
                total += int(nuc[::97, ::97].sum()) + int(wc[::97, ::97].sum())
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run(what, slide, out) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", what, slide, out], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(*args.child)
    import zarr

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        slide = Path(tmp) / "slide.tif"
        write_slide(slide, args.size)
        base = run("read", str(slide), "")
        ours = run("tile", str(slide), str(Path(tmp) / "tiles"))
        arr = zarr.open_group(str(Path(tmp) / "tiles" / "patches.zarr"), mode="r")["patches"]
        stats = json.loads((Path(tmp) / "tiles" / "tiling_stats.json").read_text())
        block = np.asarray(arr[0, 5000 % args.size:5000 % args.size + 64, :64])
        assert block.shape[:2] == (64, 64) and block[..., 1].max() > 0
        mb = args.size * args.size * 2 * 2 / 2**20
        print(f"tile-image full_image on {args.size} x {args.size} px, 3 uint16 channels "
              f"(model input {mb:,.0f} MB): {arr.shape} in chunks {arr.chunks}")
        print(f"  baseline: read nuclear + max(whole-cell) block by block: {base['seconds']:.1f} s, "
              f"peak RSS {base['peak_mb']:.0f} MB")
        print(f"  maskworks: {ours['seconds']:.1f} s = {ours['seconds'] / base['seconds']:.2f}x the baseline; "
              f"peak RSS {ours['peak_mb']:.0f} MB = {ours['peak_mb'] / mb:.2f}x the model input; "
              f"read lazily: {stats['read_lazily']}; informative={stats['informative']}")
        print("  (RSS counts the pages of the memory-mapped slide each run touches; they are file cache, "
              "reclaimable)")


if __name__ == "__main__":
    main()
