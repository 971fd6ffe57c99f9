"""A copick project of 300 runs, three lacking their membranes, through the workflow as a user runs it:
the project listed once, the runs batched several to a job, the runs lacking an input skipped with
their reason (never failing the workflow), one project table."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, WORKFLOW_FILES, cryoet_exe, exe, run

N_RUNS, LACKING = 300, 3
pytestmark = pytest.mark.slow  # ~1 min on 2 cores: `-m "not slow"` skips it locally


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("project-scale")
    for name in WORKFLOW_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / name)
    (d / ".venv-cryoet").symlink_to((ROOT / ".venv-cryoet").resolve())
    run([cryoet_exe("maskworks"), "demo-copick-project", d / "data", "--runs", N_RUNS, "--lacking", LACKING])
    (d / "tomograms.tsv").write_text("name\ttomogram\tsegmentation\tcentres\tcorrections\n")
    (d / "scale.yaml").write_text(yaml.safe_dump({
        "em": {"enabled": False}, "codex": {"enabled": False},
        "cryoet": {"enabled": True, "tomograms": "tomograms.tsv", "refine_membranes": {
            "copick_config": "data/copick/copick_config.json", "org_info": "organelles", "mem_info": "membrane",
            "min_membrane_area": 500, "device": "cpu", "qc_pictures": False}}}))
    return d


def test_a_project_of_300_runs_runs_in_a_few_jobs_and_skips_the_runs_lacking_inputs(project):
    proc = run([exe("snakemake"), "--cores", "2", "--configfile", "scale.yaml"], cwd=project, timeout=1800)
    out = proc.stdout + proc.stderr
    # the project listed once; 297 runs in 3 jobs (auto: ~1 min of work each at this size); no job failed
    assert len(re.findall(r"^(?:local)?checkpoint copick_runs:", out, re.M)) == 1, out[-3000:]
    batches = sorted((project / "results/cryoet/refine/batches").glob("*_refine_stats.csv"))
    assert len(batches) == 3 == len(re.findall(r"^(?:local)?rule refine_membranes:", out, re.M))
    in_batches = [r["run"] for b in batches for r in csv.DictReader(open(b))]
    assert sorted(set(in_batches)) == [f"run_{i:04d}" for i in range(N_RUNS - LACKING)]
    assert batches[0].name.startswith("run_0000--") and batches[-1].name.endswith("--run_0296_refine_stats.csv")
    rows = list(csv.DictReader(open(project / "results/cryoet/refine/refine_summary.csv")))
    runs = {r["run"] for r in rows}
    assert len(runs) == N_RUNS
    skipped = {r["run"]: r for r in rows if r["reason"] == "missing input"}
    assert sorted(skipped) == ["run_0297", "run_0298", "run_0299"]
    assert all("no segmentation matches 'membrane'" in r["note"] for r in skipped.values())
    kept = [r for r in rows if r["kept"] == "True"]
    assert len(kept) == 3 * (N_RUNS - LACKING) and all(float(r["surface_area_nm2"]) > 0 for r in kept)
    log = (project / "logs/cryoet/refine_summary.log").read_text()
    assert log.count("skipped (missing input)") == LACKING
    # a rerun has nothing to do: the listing is not redone, no batch reruns
    again = run([exe("snakemake"), "-n", "--cores", "2", "--configfile", "scale.yaml"], cwd=project)
    assert "Nothing to be done" in again.stdout + again.stderr, (again.stdout + again.stderr)[-3000:]
