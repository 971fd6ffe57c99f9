"""Memory against the number of channels: tile-image and quantify on 4 and on 48 channels.

One synthetic slide (cells on a jittered grid; ``--size`` x ``--size`` uint16) is written with
4 and with 48 channels in the layouts whole-slide scanners write: a tiled, zlib-compressed
OME-TIFF (512 x 512 tiles, one page per channel) and a QPTIFF-like file (the same, as Akoya
lays it out: one tiled page per channel with its XML description).  ``maskworks tile-image``
and ``maskworks quantify`` (on stitched labels of the same cells) run as the user runs them,
one subprocess each, and the peak RSS of each is compared between 48 and 4 channels: the
goal of issue 23 is a ratio <= 1.1 (memory does not grow with the channel count).  The
baseline in the same run is the bare interpreter with the libraries imported.

    python bench/bench_channels.py               # 4096 x 4096 px (a few minutes)
    python bench/bench_channels.py --size 4800   # the 23 Mpx slide of issue 23
    python bench/bench_channels.py --stages quantify --layouts ome   # quantify on the OME-TIFF only
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

MAIN = [sys.executable, "-m", "maskworks.cli"]
STAGES = ("tile_image", "quantify")
LAYOUTS = ("ome", "qptiff")


def _cells(size: int, seed: int = 0):
    """Cell and nucleus labels: a cell every 16 px, a nucleus in its middle (uint32)."""
    step = 16
    yy, xx = np.mgrid[0:size, 0:size]
    cell = ((yy // step) * (size // step + 1) + xx // step + 1).astype(np.uint32)
    cell[((yy % step) == 0) | ((xx % step) == 0)] = 0
    nucleus = np.where((((yy % step) - 8) ** 2 + ((xx % step) - 8) ** 2) <= 12, cell, 0).astype(np.uint32)
    return cell, nucleus


def _plane(cell, nucleus, k: int, rng) -> np.ndarray:
    base = np.where(nucleus > 0, 2000, np.where(cell > 0, 600 + 40 * (k % 7), 20)).astype(np.uint16)
    return base + rng.integers(0, 16, base.shape, dtype=np.uint16)


def write_slides(folder: Path, size: int, channels: int) -> dict:
    import tifffile

    cell, nucleus = _cells(size)
    rng = np.random.default_rng(channels)
    names = ["DAPI", "CD45"] + [f"M{k}" for k in range(2, channels)]
    ome = folder / f"slide_{channels}.ome.tif"
    qpi = folder / f"slide_{channels}.qptiff"
    with tifffile.TiffWriter(ome, bigtiff=True, ome=True) as tw:
        tw.write(np.stack([_plane(cell, nucleus, k, rng) for k in range(channels)]), tile=(512, 512),
                 compression="zlib", metadata={"axes": "CYX", "Channel": {"Name": names},
                                               "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with tifffile.TiffWriter(qpi, bigtiff=True) as tw:
        for k in range(channels):
            desc = ('<?xml version="1.0" encoding="utf-16"?><PerkinElmer-QPI-ImageDescription>'
                    f"<ImageType>FullResolution</ImageType><Name>Opal {k}</Name><Biomarker>{names[k]}</Biomarker>"
                    "</PerkinElmer-QPI-ImageDescription>")
            tw.write(_plane(cell, nucleus, k, rng), tile=(512, 512), compression="zlib", software="PerkinElmer-QPI",
                     description=desc, metadata=None, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    return {"ome": ome, "qptiff": qpi}


def write_stitch(folder: Path, size: int) -> Path:
    """A stitch folder as the stitch stage writes it (cell, nucleus, cytoplasm OME-TIFFs)."""
    import tifffile

    cell, nucleus = _cells(size)
    out = folder / "stitch"
    out.mkdir(exist_ok=True)
    for k, a in (("cell", cell), ("nucleus", nucleus), ("cytoplasm", np.where(nucleus > 0, 0, cell))):
        tifffile.imwrite(out / f"{k}.ome.tif", a.astype(np.uint32), ome=True, tile=(512, 512), compression="zlib",
                         metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    return out


def run(cmd) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cmd)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_mb": json.loads(proc.stdout.splitlines()[-1])}


def child(cmd) -> None:
    """Run one command as a grandchild and print its peak RSS (MB): the child's own RSS is excluded."""
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(json.dumps(round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run (default both)")
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                    help="slide layouts to run (default both)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stitch = write_stitch(tmp, args.size)
        base = run([sys.executable, "-c", "import numpy, tifffile, zarr, scipy, skimage, pandas, anndata"])
        for n in (4, 48):
            slides = write_slides(tmp, args.size, n)
            for layout in args.layouts:
                path, row = slides[layout], {"channels": n, "layout": layout}
                if "tile_image" in args.stages:
                    row["tile_image"] = run([*MAIN, "tile-image", str(path), str(tmp / f"tiles_{n}_{layout}"),
                                             "--nuclear-channel", "DAPI", "--wholecell-channels", "CD45",
                                             "--patch-height", "1024", "--patch-width", "1024"])
                if "quantify" in args.stages:
                    row["quantify"] = run([*MAIN, "quantify", str(path), str(stitch), str(tmp / f"quant_{n}_{layout}")])
                rows.append(row)
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nslide {args.size} x {args.size} px; baseline (interpreter + libraries) peak {base['peak_mb']} MB")
    print(f"{'layout':8} {'stage':11} {'4 ch MB':>9} {'48 ch MB':>9} {'ratio':>6} {'4 ch s':>7} {'48 ch s':>8}")
    for layout in args.layouts:
        r4, r48 = (next(r for r in rows if r["channels"] == n and r["layout"] == layout) for n in (4, 48))
        for stage in args.stages:
            a, b = r4[stage], r48[stage]
            print(f"{layout:8} {stage:11} {a['peak_mb']:9.0f} {b['peak_mb']:9.0f} {b['peak_mb'] / a['peak_mb']:6.2f} "
                  f"{a['seconds']:7.1f} {b['seconds']:8.1f}")
    print("goal (issue 23): 48-channel peak <= 1.1 x the 4-channel peak, for both stages and layouts")


if __name__ == "__main__":
    main()
