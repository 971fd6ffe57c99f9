"""The demo through `snakemake --profile profiles/slurm` against a real single-node Slurm.

tests/slurm/slurm.sh starts munged, slurmctld and slurmd (one fake GPU); the workflow is
submitted job by job through the Slurm executor plugin with test-only overrides on the
command line (the profile itself is used as shipped).  The test checks that every job
finished, that GPU-capable rules were submitted with one GPU, and that the outputs equal
those of a local run of the same config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, exe, run, workflow_copy

pytestmark = pytest.mark.slurm

SCRIPT = ROOT / "tests" / "slurm" / "slurm.sh"
# Rules that can use a GPU (they ask for gpu=1 unless their device is 'cpu').
GPU_RULES = {"refine_membranes", "train_unet", "predict_unet"}


def _slurm_available() -> str | None:
    """None when Slurm can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the test cluster runs as root"
    have = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sinfo", "munged"))
    if not have and not shutil.which("apt-get"):
        return "Slurm is not installed and apt-get is unavailable to install it"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _slurm_available()
    if reason:
        print(f"\n!!! SKIPPING THE REAL SLURM TEST: {reason} !!!\n", file=sys.stderr)
        pytest.skip(f"real Slurm test skipped: {reason}")
    state = tmp_path_factory.mktemp("slurm-state")
    run(["bash", SCRIPT, "start", state], timeout=600)
    try:
        yield state
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], check=False)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    d = workflow_copy(tmp_path_factory.mktemp("local"))
    run([exe("snakemake"), "--cores", "2", "--configfile", "config/demo.yaml"], cwd=d)
    return d


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    d = workflow_copy(tmp_path_factory.mktemp("slurm"))
    mem_mb = 2000
    cmd = [
        exe("snakemake"), "--profile", "profiles/slurm", "--configfile", "config/demo.yaml",
        # test-only overrides: this cluster's partition/account and small memory; no conda here,
        # so the deployment method is swapped (the rules name no env modules: nothing is loaded)
        "--sdm", "env-modules",
        "--default-resources", "slurm_partition=main", "slurm_account=maskworks", f"mem_mb={mem_mb}", "runtime=30",
        # the rules ask for up to 16 GB; this node has half the machine's memory
        "--set-resources", *[f"{rule}:mem_mb={mem_mb}" for rule in _rules()],
        "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs",
        "--jobs", "4", "--latency-wait", "10", "--retries", "0",
    ]
    proc = run(cmd, cwd=d, timeout=1500)
    (d / "slurm_run.log").write_text(proc.stdout + proc.stderr)
    return d, proc.stdout + proc.stderr


def _rules() -> list[str]:
    return sorted(r for smk in (ROOT / "rules").glob("*.smk")
                  for r in re.findall(r"^rule (\w+):", smk.read_text(), re.M))


def _submitted_jobs(workdir: Path) -> dict[str, set[str]]:
    """Slurm job id -> the rules it ran, from the executor plugin's per-job log files
    (a grouped submission runs several rules)."""
    jobs: dict[str, set[str]] = {}
    for log in (workdir / ".snakemake" / "slurm_logs").glob("**/*.log"):
        rules = set(re.findall(r"^\s*(?:local)?rule (\w+):", log.read_text(errors="replace"), re.M))
        if rules:
            jobs.setdefault(log.stem, set()).update(rules)
    return jobs


def _job_record(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout


def test_every_job_finished_on_slurm(slurm_run):
    d, out = slurm_run
    m = re.search(r"(\d+) of (\d+) steps \(100%\) done", out)
    assert m and m.group(1) == m.group(2), out[-3000:]
    jobs = _submitted_jobs(d)
    ran = set().union(*jobs.values())
    assert {"texture_mask", "postprocess_mask", "train_unet", "predict_unet", "extract_patches",
            "merge_corrections", "refine_membranes", "tile_image", "segment_cells", "repair_masks",
            "stitch"} <= ran, jobs
    for job_id, rules in jobs.items():
        info = _job_record(job_id)
        assert "JobState=COMPLETED" in info, (rules, job_id, info)
    # short steps go in one submission with their producer (group jobs), not one each
    assert any({"texture_mask", "postprocess_mask"} <= rules for rules in jobs.values()), jobs
    assert any({"repair_masks", "stitch"} <= rules for rules in jobs.values()), jobs


def test_gpu_rules_were_submitted_with_one_gpu(slurm_run):
    d, _ = slurm_run
    for job_id, rules in _submitted_jobs(d).items():
        info = _job_record(job_id)
        gpu = re.search(r"TresPerJob=\S*gpu:(\d+)", info) or re.search(r"TresPerNode=\S*gpu:(\d+)", info)
        if rules & GPU_RULES:
            assert gpu and gpu.group(1) == "1", (rules, info)
        else:
            assert not gpu, (rules, info)


def test_outputs_equal_the_local_run(slurm_run, local_run):
    from maskworks.io import read_volume

    d, _ = slurm_run
    for name in ["sample1", "sample2"]:
        for f in ["texture_mask.zarr", "texture_confidence.zarr", "texture_final.zarr"]:
            a = read_volume(local_run / "results" / "em" / name / f).numpy()
            b = read_volume(d / "results" / "em" / name / f).numpy()
            assert np.array_equal(a, b), (name, f)
        sa = json.loads((local_run / "results" / "em" / name / "texture_final_stats.json").read_text())
        sb = json.loads((d / "results" / "em" / name / "texture_final_stats.json").read_text())
        assert sa["truth"] == sb["truth"]
    for sub in ["patches/tomo1/labelsCorr", "patches/tomo1/imagesCorr", "merged/tomo1"]:
        la = sorted(p.name for p in (local_run / "results" / "cryoet" / sub).iterdir())
        lb = sorted(p.name for p in (d / "results" / "cryoet" / sub).iterdir())
        assert la == lb
        for n in la:
            if n.endswith(".nrrd"):
                assert np.array_equal(read_volume(local_run / "results" / "cryoet" / sub / n).numpy(),
                                      read_volume(d / "results" / "cryoet" / sub / n).numpy()), (sub, n)
    for f in sorted((local_run / "results" / "cryoet" / "refine").glob("*.csv")):
        assert f.read_text() == (d / "results" / "cryoet" / "refine" / f.name).read_text(), f.name
