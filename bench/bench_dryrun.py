"""Dry-run scale: how long Snakemake takes to plan a run with many inputs.

Generates EM volume tables of N tiny (8x8x8 .npy) volumes in a temporary copy of
the workflow and times `snakemake -n` for each N (10 as the baseline, then 1,000),
printing seconds, the cost per input and the ratio to the baseline, all measured
in this run.

    python bench/bench_dryrun.py [--sizes 10 1000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def _setup(d: Path, n: int) -> str:
    for item in ["Snakefile", "rules", "scripts", "config", "envs", "profiles"]:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / item)
    data = d / "data"
    data.mkdir()
    rows = ["name\tpath\tvoxel_size\tunit\ttruth"]
    tiny = np.zeros((8, 8, 8), np.uint8)
    for i in range(n):
        np.save(data / f"v{i:05d}.npy", tiny)
        rows.append(f"v{i:05d}\tdata/v{i:05d}.npy\t40,16,16\tnanometer\t")
    (d / "volumes.tsv").write_text("\n".join(rows) + "\n")
    (d / "bench.yaml").write_text("em:\n  volumes: volumes.tsv\n")
    return "bench.yaml"


def _dry_run(d: Path, cfg: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([SNAKEMAKE, "-n", "--quiet", "rules", "--cores", "1", "--configfile", cfg],
                          cwd=d, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"dry-run failed:\n{proc.stderr[-3000:]}")
    table = proc.stdout.split("Job stats:", 1)[-1].split("\n\n", 1)[0]  # the first table only
    jobs = sum(int(line.split()[-1]) for line in table.splitlines()
               if line.split() and line.split()[0] in ("texture_mask", "postprocess_mask"))
    return dt, jobs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--repeat", type=int, default=2, help="dry-runs per size; the fastest counts")
    a = ap.parse_args(argv)
    print(f"snakemake -n on the EM arm (texture_mask + postprocess_mask per input), best of {a.repeat}")
    print(f"{'inputs':>7} {'jobs':>6} {'seconds':>8} {'ms/input':>9}")
    results = {}
    for n in a.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            cfg = _setup(d, n)
            best, jobs = min(_dry_run(d, cfg) for _ in range(a.repeat))
        results[n] = best
        print(f"{n:>7} {jobs:>6} {best:>8.2f} {1000 * best / n:>9.2f}")
    base, top = min(a.sizes), max(a.sizes)
    marginal = (results[top] - results[base]) / (top - base)
    print(f"ratio {top}/{base} inputs: {results[top] / results[base]:.2f}x the time for {top / base:.0f}x the inputs; "
          f"marginal cost {1000 * marginal:.2f} ms per input")
    print(f"command: python bench/bench_dryrun.py --sizes {' '.join(map(str, a.sizes))} --repeat {a.repeat}")


if __name__ == "__main__":
    main()
