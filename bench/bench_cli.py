"""Start-up cost of the command line: `maskworks texture-mask` versus the library call alone.

Both run as fresh interpreters on the same small TIFF, alternately, several times:

- baseline: ``python -c`` that imports :func:`maskworks.em.texture.texture_mask`, reads the TIFF
  and calls it (the import of NumPy/SciPy and the work itself, which any use pays);
- CLI: ``maskworks texture-mask vol.tif out.zarr`` (the parser, reading and checking the file,
  atomic OME-Zarr writes of the mask and confidence, the stats JSON and the QC PNG).

The overhead is the difference of the medians (goal: at most 0.5 s).

    python bench/bench_cli.py [--shape 32 64 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _time(cmd, cwd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    import tifffile

    from maskworks.demo import make_em_volume

    exe = Path(sys.executable).with_name("maskworks")
    with tempfile.TemporaryDirectory(prefix="bench_cli_") as tmp:
        image, _ = make_em_volume(tuple(args.shape), seed=1)
        tifffile.imwrite(Path(tmp) / "vol.tif", image)
        library = [sys.executable, "-c", "import tifffile; from maskworks.em.texture import texture_mask; "
                   "texture_mask(tifffile.imread('vol.tif'), progress=False)"]
        cli = [str(exe), "texture-mask", "vol.tif", "out.zarr"]
        times = {"library": [], "cli": []}
        _time(library, tmp)  # warm the file cache and the bytecode
        for _ in range(args.repeats):
            times["library"].append(_time(library, tmp))
            for p in Path(tmp).glob("out*"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            times["cli"].append(_time(cli, tmp))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"texture-mask on a {tuple(args.shape)} TIFF, {args.repeats} alternating runs of each (median, min, max s)")
    for k, v in times.items():
        print(f"  {k:<8} {med[k]:6.3f} {min(v):6.3f} {max(v):6.3f}")
    print(f"CLI overhead beyond the library call: {med['cli'] - med['library']:.3f} s "
          f"(ratio cli/library {med['cli'] / med['library']:.2f}x; goal <= 0.5 s)")
    print("command: python bench/bench_cli.py")


if __name__ == "__main__":
    main()
