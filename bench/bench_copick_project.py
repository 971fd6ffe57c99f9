"""A copick project of hundreds of runs through the workflow: batched jobs against one job per run.

Generates a project of N small runs (32 x 64 x 64, three organelles each; the last few without their
membranes: `maskworks demo-copick-project`, in the cryo-ET environment), then runs the refinement
through Snakemake on 2 cores twice, each in a fresh copy of the workflow and the project:

* batched: the default `runs_per_job: auto` (the listing's voxel counts -> ~1 min of work a job),
* baseline: `runs_per_job: 1`, one job per run (what the workflow did before),

and prints for each the refinement jobs, wall time, the sum of the jobs' own CPU time (Snakemake's
benchmark files) and the ratio to the baseline, all measured in this run; then the extrapolation to a
project of 500 real-sized runs.  Both runs write QC pictures (the default).

    python bench/bench_copick_project.py [--runs 300] [--lacking 3]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
CRYOET = ROOT / ".venv-cryoet"


def _workflow(d: Path, project: Path, runs_per_job) -> Path:
    for item in ["Snakefile", "rules", "scripts", "config", "envs", "profiles"]:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / item)
    (d / ".venv-cryoet").symlink_to(CRYOET.resolve())
    shutil.copytree(project, d / "data")
    (d / "tomograms.tsv").write_text("name\ttomogram\tsegmentation\tcentres\tcorrections\n")
    (d / "bench.yaml").write_text(yaml.safe_dump({
        "em": {"enabled": False}, "codex": {"enabled": False},
        "cryoet": {"enabled": True, "tomograms": "tomograms.tsv", "refine_membranes": {
            "copick_config": "data/copick/copick_config.json", "org_info": "organelles", "mem_info": "membrane",
            "min_membrane_area": 500, "device": "cpu", "runs_per_job": runs_per_job}}}))
    return d


def _run(d: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([SNAKEMAKE, "--cores", "2", "--configfile", "bench.yaml"], cwd=d, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"workflow failed in {d}:\n{proc.stderr[-3000:]}")
    bench = sorted((d / "benchmarks/cryoet/refine_membranes").glob("*.tsv"))
    cpu = sum(float(next(csv.DictReader(open(b), delimiter="\t"))["cpu_time"]) for b in bench)
    rows = list(csv.DictReader(open(d / "results/cryoet/refine/refine_summary.csv")))
    return {"jobs": len(bench), "wall": wall, "cpu": cpu, "runs": len({r["run"] for r in rows}),
            "skipped": len({r["run"] for r in rows if r["reason"] == "missing input"}),
            "kept": sum(r["kept"] == "True" for r in rows)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--lacking", type=int, default=3)
    a = ap.parse_args(argv)
    if not (CRYOET / "bin" / "maskworks").exists():
        sys.exit("no .venv-cryoet: run `make setup-cryoet` first")
    with tempfile.TemporaryDirectory(prefix="bench_copick_project_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        subprocess.run([CRYOET / "bin" / "maskworks", "demo-copick-project", tmp / "project", "--runs",
                        str(a.runs), "--lacking", str(a.lacking)], check=True, capture_output=True)
        print(f"copick project of {a.runs} runs (32x64x64, {a.lacking} lacking membranes) written in "
              f"{time.perf_counter() - t0:.0f} s; refinement through Snakemake, --cores 2, QC pictures on")
        found = {}
        for label, rpj in (("batched (runs_per_job: auto)", "auto"), ("one job per run (runs_per_job: 1)", 1)):
            d = tmp / f"wf_{rpj}"
            d.mkdir()
            found[label] = _run(_workflow(d, tmp / "project", rpj))
        base = found["one job per run (runs_per_job: 1)"]
        print(f"{'':36s} {'jobs':>5s} {'wall s':>8s} {'job CPU s':>10s} {'wall ratio':>10s}")
        for label, r in found.items():
            print(f"{label:36s} {r['jobs']:5d} {r['wall']:8.1f} {r['cpu']:10.1f} {r['wall'] / base['wall']:10.2f}x")
            assert r["runs"] == a.runs and r["skipped"] == a.lacking, r
        batched = found["batched (runs_per_job: auto)"]
        assert batched["kept"] == base["kept"], (batched, base)
        per_job = (base["cpu"] - batched["cpu"]) / max(1, base["jobs"] - batched["jobs"])
        print(f"both: {a.runs} runs in the table, {a.lacking} skipped (missing input), {batched['kept']} organelles "
              f"kept; fixed cost of a job ~{per_job:.1f} s CPU (saved by batching)")
        # 500 runs of 200 x 630 x 630 (80 M voxels, ~16 s of CPU each by the workflow's own estimate)
        run_s, n = 0.5 + 200 * 630 * 630 / 5e6, 500
        rpj = max(1, int(60 // run_s))
        print(f"extrapolation, 500 runs of 200x630x630: one job per run = {n} jobs, {n * (run_s + per_job) / 3600:.1f} "
              f"CPU-h; auto = {rpj} runs a job = {-(-n // rpj)} jobs, {(n * run_s + -(-n // rpj) * per_job) / 3600:.1f} "
              "CPU-h (and 1 listing of the project instead of one per job)")


if __name__ == "__main__":
    main()
