"""What the safety of the outputs costs, and how extract-patches scales with the number of centres.

1. Commit: a stage's outputs written through :func:`maskworks.io.transaction` (ownership checks,
   locks, staging, flush, journal, exchange/rename, recovery scan) against the baseline of the same
   bytes written to a temporary name and renamed into place, file by file, with no checks; for a
   set of 4 outputs (2 files, 2 stores of 64 chunk files) and for 2,000 small files (a patch folder).
2. Centres: ``maskworks extract-patches`` on 10^3, 10^4 and 10^5 centres that all lie within half
   a patch of a face (``--edge skip``: every centre is planned, listed in the manifest and drawn in
   the QC picture, none written), as whole processes; wall time and peak RSS above the baseline of
   one centre (start-up, imports, reading the tomogram), per centre.

    python bench/bench_outputs.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _write_plain(targets, payload):
    for t in targets:
        tmp = t.with_name(f".tmp.{t.name}")
        if t.name.endswith(".zarr"):
            tmp.mkdir()
            for i in range(64):
                (tmp / str(i)).write_bytes(payload)
            if t.exists():
                shutil.rmtree(t)
        else:
            tmp.write_bytes(payload)
        os.replace(tmp, t)


def _write_transaction(targets, payload):
    from maskworks.io import atomic_path, transaction

    with transaction(*targets):
        for t in targets:
            with atomic_path(t) as tmp:
                if t.name.endswith(".zarr"):
                    tmp.mkdir()
                    for i in range(64):
                        (tmp / str(i)).write_bytes(payload)
                else:
                    tmp.write_bytes(payload)


def bench_commit(root: Path, repeats: int) -> None:
    payload = np.random.default_rng(0).bytes(16 << 10)
    sets = {"4 outputs (2 stores of 64 chunks, 2 files)": ["mask.zarr", "conf.zarr", "stats.json", "qc.png"],
            "2000 small files (a patch folder)": [f"p{i}.nrrd" for i in range(2000)]}
    print("1. commit of a stage's outputs: journaled transaction vs plain write+rename (median of "
          f"{repeats}, s; each run replaces the previous one's outputs)")
    for label, names in sets.items():
        times = {"plain": [], "transaction": []}
        for how, fn in (("plain", _write_plain), ("transaction", _write_transaction)):
            folder = root / f"{how}-{len(names)}"
            folder.mkdir()
            targets = [folder / n for n in names]
            fn(targets, payload)  # the earlier outputs, replaced by every timed run
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(targets, payload)
                times[how].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"  {label:<44} plain {med['plain']:.3f}  transaction {med['transaction']:.3f}  "
              f"ratio {med['transaction'] / med['plain']:.2f}x")


def bench_centres(root: Path, repeats: int) -> None:
    from maskworks.io import write_volume

    rng = np.random.default_rng(3)
    write_volume(root / "tomo.mrc", rng.normal(size=(64, 64, 64)).astype(np.float32), 10.0, unit="angstrom")
    write_volume(root / "seg.mrc", (rng.random((64, 64, 64)) > 0.5).astype(np.uint8), 10.0, unit="angstrom")
    exe = Path(sys.executable).with_name("maskworks")
    print("2. extract-patches, centres within half a patch of a face (--edge skip), whole processes "
          f"(median of {repeats})")
    rows = {}
    for n in (1, 1000, 10_000, 100_000):
        c = rng.uniform(0, 63, size=(n, 3))
        c[:, 0] = rng.choice([0.5, 62.5], size=n)
        np.savetxt(root / f"c{n}.csv", c, delimiter=",", header="x,y,z", comments="")
        walls = []
        for k in range(repeats):
            out = root / f"out{n}-{k}"
            # a fresh interpreter per run, so that ru_maxrss of the children is this run's own
            cmd = [sys.executable, "-c", "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
                   "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)",
                   str(exe), "extract-patches", str(root / "tomo.mrc"), str(root / "seg.mrc"), str(out),
                   "--centres", str(root / f"c{n}.csv"), "--patch-size", "8", "--border", "1", "--edge", "skip"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            walls.append((time.perf_counter() - t0, int(proc.stdout.split()[-1]) / 1024))
        rows[n] = (statistics.median(w for w, _ in walls), max(m for _, m in walls))
    base_s, base_mb = rows[1]
    print(f"  {'centres':>8} {'seconds':>8} {'peak MiB':>9} {'ms/centre':>10} {'KiB/centre':>11}  (beyond 1 centre: "
          f"{base_s:.2f} s, {base_mb:.0f} MiB)")
    for n, (s, mb) in rows.items():
        if n == 1:
            continue
        print(f"  {n:>8} {s:8.2f} {mb:9.0f} {1e3 * (s - base_s) / n:10.3f} {1024 * (mb - base_mb) / n:11.2f}")
    print(f"  ratio 10^5 / 10^4 centres (time beyond start-up): "
          f"{(rows[100_000][0] - base_s) / (rows[10_000][0] - base_s):.1f}x (linear: 10x)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_outputs_") as tmp:
        bench_commit(Path(tmp), args.repeats)
        bench_centres(Path(tmp), args.repeats)
    print("command: python bench/bench_outputs.py")


if __name__ == "__main__":
    main()
