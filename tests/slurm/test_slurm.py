"""The demo through `snakemake --profile profiles/slurm` against a real single-node Slurm.

tests/slurm/slurm.sh starts munged, slurmctld and slurmd (one fake GPU); the workflow is
submitted job by job through the Slurm executor plugin with the profile exactly as shipped,
plus only what a user adds for their site: the account and partition (config keys
slurm.account / slurm.partition), the status command of a cluster without accounting
(``--slurm-status-command squeue``: this one has none, so sacct knows no jobs) and, as this
machine has no conda, the choice of the local virtual environments over conda envs
(``--sdm env-modules``: the rules name no modules, so jobs run in the venv that runs Snakemake).  The test checks, from ``scontrol show job``, that
every job finished with the shipped latency, memory and time limits, account and partition,
that no job asked for a GPU its environment cannot use (the CPU envs are the default), and
that the outputs equal those of a local run of the same config.
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

from maskworks.codex.stages import QUANTIFY_MEMORY_MB, STITCH_MEMORY_MB

pytestmark = pytest.mark.slurm

SCRIPT = ROOT / "tests" / "slurm" / "slurm.sh"


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
    cmd = [
        exe("snakemake"), "--profile", "profiles/slurm", "--configfile", "config/demo.yaml",
        # the site: this cluster's account and partition; no conda here (local venvs); and no
        # Slurm accounting, so job states come from squeue (sacct has nothing to report)
        "--config", "slurm={account: maskworks, partition: main}", "--sdm", "env-modules",
        "--slurm-status-command", "squeue",
    ]
    proc = run(cmd, cwd=d, timeout=1800)
    (d / "slurm_run.log").write_text(proc.stdout + proc.stderr)
    return d, proc.stdout + proc.stderr


def _rules() -> list[str]:
    return sorted(r for smk in (ROOT / "rules").glob("*.smk")
                  for r in re.findall(r"^rule (\w+):", smk.read_text(), re.M))


def _submitted_jobs(out: str) -> dict[str, set[str]]:
    """Slurm job id -> the rules it ran, from Snakemake's report of each submission: its
    Slurm log folder is rule_<rule> or group_<group>_<rules...> (a grouped submission)."""
    rules = _rules()
    jobs: dict[str, set[str]] = {}
    for job_id, logfile in re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+?)\)", out):
        folder = Path(logfile).parts
        top = next(p for p in folder if p.startswith(("rule_", "group_")))
        jobs[job_id] = {top[5:]} if top.startswith("rule_") else {r for r in rules if r in top}
    return jobs


def _job_record(job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def _demo_megapixels(d: Path) -> float:
    """Megapixels of the demo slide in the workflow copy ``d`` (its header)."""
    from maskworks.io.slides import open_multichannel

    row = (d / "config" / "demo_codex_images.tsv").read_text().splitlines()[1].split("\t")
    with open_multichannel(d / row[1], lazy=True) as img:
        return img.shape[0] * img.shape[1] / 1e6


def _shipped_resources(out_log: str = "", slide_dir: Path | None = None) -> dict[str, tuple[int, int]]:
    """rule -> (mem_mb, runtime minutes) at attempt 1, as the rules declare them; a runtime a function
    computes (refine_membranes: from its batch's size) is the one Snakemake resolved for the job (its
    log's resources line for that rule); a memory that grows with the slide (``per_pixel``) is computed
    for the demo slide of the workflow copy ``slide_dir``."""
    out = {}
    for smk in (ROOT / "rules").glob("*.smk"):
        for name, body in re.findall(r"^rule (\w+):\n((?:    .*\n|\n)*)", smk.read_text(), re.M):
            mem = re.search(r"mem_mb=(?:scaled\()?(\d+)", body)
            runtime = re.search(r"runtime=(?:scaled\()?(\d+)", body)
            if mem and not runtime and re.search(r"runtime=\w+,", body):
                found = re.search(rf"^rule {name}:\n(?: +(?!resources:).*\n)* +resources: .*\bruntime=(\d+)",
                                  out_log, re.M)
                runtime = found
            per_pixel = re.search(r"mem_mb=scaled\((\d+), \"mem_mb\", per_pixel=(\d+)(?:, extra_mb=(\d+))?", body)
            if mem and runtime:
                out[name] = (int(mem.group(1)), int(runtime.group(1)))
                if per_pixel and slide_dir is not None:  # memory that follows the demo slide's size
                    mb = int(per_pixel.group(1)) + int(per_pixel.group(2)) * _demo_megapixels(slide_dir)
                    mb += int(per_pixel.group(3)) if per_pixel.group(3) else 0
                    cap = re.search(r"cap_mb=(\w+)", body)  # a stage that keeps to its budget (plus 1 GB)
                    if cap:
                        mb = min(mb, {"STITCH_CAP_MB": STITCH_MEMORY_MB,
                                      "QUANTIFY_CAP_MB": QUANTIFY_MEMORY_MB}[cap.group(1)] + 1000)
                    out[name] = (round(mb), out[name][1])
    return out


def _minutes(limit: str) -> int:
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days) if days else 0) * 1440 + h * 60 + m + (s > 0)


def test_every_job_finished_on_slurm(slurm_run):
    d, out = slurm_run
    m = re.search(r"(\d+) of (\d+) steps \(100%\) done", out)
    assert m and m.group(1) == m.group(2), out[-3000:]
    jobs = _submitted_jobs(out)
    ran = set().union(*jobs.values())
    assert {"texture_mask", "postprocess_mask", "train_unet", "predict_unet", "extract_patches",
            "merge_corrections", "refine_membranes", "tile_image", "segment_cells", "repair_masks",
            "stitch"} <= ran, jobs
    for job_id, rules in jobs.items():
        info = _job_record(job_id)
        assert info.get("JobState") == "COMPLETED", (rules, job_id, info)
        # the site settings the user gave (config keys slurm.account / slurm.partition)
        assert info["Account"] == "maskworks" and info["Partition"] == "main", (rules, info)
    # short steps go in one submission with their producer (group jobs), not one each
    assert any({"texture_mask", "postprocess_mask"} <= rules for rules in jobs.values()), jobs
    assert any({"repair_masks", "stitch"} <= rules for rules in jobs.values()), jobs


def test_jobs_ran_with_the_shipped_resources_and_latency(slurm_run):
    """Memory and time limits are the rules' own (a group: the largest memory, the summed time),
    and each job's Snakemake waits the profile's 60 s for its files (shared file systems)."""
    d, out = slurm_run
    shipped = _shipped_resources(out, d)
    for job_id, rules in _submitted_jobs(out).items():
        info = _job_record(job_id)
        mems = [shipped[r][0] for r in rules]
        assert info["MinMemoryNode"] == f"{max(mems)}M", (rules, info["MinMemoryNode"])
        assert _minutes(info["TimeLimit"]) == sum(shipped[r][1] for r in rules), (rules, info["TimeLimit"])
        script = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], capture_output=True,
                                text=True).stdout
        assert re.search(r"--latency-wait 60\b", script) and "--attempt 1" in script, script[-2000:]
    assert "latency-wait 5" not in out


def test_no_job_holds_a_gpu_it_cannot_use(slurm_run):
    """With the CPU envs (the default, software.gpu: false) `device: auto` asks for no GPU."""
    _, out = slurm_run
    for job_id, rules in _submitted_jobs(out).items():
        info = _job_record(job_id)
        tres = info.get("TresPerJob", "") + info.get("TresPerNode", "") + info.get("TRES", "")
        assert "gpu" not in tres, (rules, info)


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


@pytest.fixture(scope="module")
def cluster_wd(cluster, tmp_path_factory):
    """A workflow copy with the demo data, for the runs of a few jobs on the test cluster."""
    return workflow_copy(tmp_path_factory.mktemp("slurm-small"))


@pytest.fixture(scope="module")
def campaign_run(slurm_run):
    """A campaign with a bad row of each kind, through the shipped profile: a missing volume (found by the
    check when the run is planned) and a volume whose header is right but whose voxels are not (a NaN: its
    job stops on it, exit 2), beside a good one.  Run in the demo run's folder, after it."""
    import mrcfile

    d, _ = slurm_run
    data = np.random.default_rng(0).normal(size=(16, 32, 32)).astype(np.float32)
    data[8, 16, 16] = np.nan
    with mrcfile.new(d / "nan.mrc", overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = 8.0
    (d / "campaign.tsv").write_text("name\tpath\n" "good\tdemo_data/em/sample2.mrc\n" "nan\tnan.mrc\n"
                                    "missing\tdemo_data/em/nope.mrc\n")
    (d / "campaign.yaml").write_text("em: {volumes: campaign.tsv, train_unet: {enabled: false}}\n"
                                     "cryoet: {enabled: false}\ncodex: {enabled: false}\n")
    cmd = [exe("snakemake"), "--profile", "profiles/slurm", "--configfile", "campaign.yaml",
           "--config", "slurm={account: maskworks, partition: main}", "--sdm", "env-modules",
           "--slurm-status-command", "squeue"]
    proc = run(cmd, cwd=d, timeout=1800, check=False)
    (d / "campaign_run.log").write_text(proc.stdout + proc.stderr)
    return d, proc.returncode, proc.stdout + proc.stderr


def test_a_bad_row_is_reported_before_submission_and_the_good_rows_run(campaign_run):
    d, code, out = campaign_run
    assert code != 0, out[-3000:]  # the NaN row failed: the run says so
    report = out.index("1 input row(s) cannot run")
    assert "missing (campaign.tsv): demo_data/em/nope.mrc: no such file" in out
    assert report < out.index("submitted with SLURM jobid"), "the bad row must be reported before any submission"
    jobs = _submitted_jobs(out)
    assert not any("missing" in line for line in re.findall(r"submitted with SLURM jobid .*", out))
    assert (d / "results" / "em" / "good" / "texture_final.zarr").is_dir()  # keep-going: the good row ran
    assert not (d / "results" / "em" / "missing").exists()
    assert jobs


def test_an_input_error_is_retried_small_and_short_never_bigger(campaign_run):
    """Snakemake retries every failed job (retries: 2); a job that stopped on bad input is resubmitted
    with the least resources (1 GB, 5 min for its own rule), never 2x and 3x the rule's."""
    d, _, out = campaign_run
    # the job Snakemake retried (the NaN row's em_mask group: its Slurm log folder names the group only)
    retried = set(re.findall(r"Trying to restart job (\S+)\.", out))
    assert len(retried) == 1, out[-4000:]
    nan_jobs = re.findall(rf"Job {re.escape(retried.pop())} has been submitted with SLURM jobid (\d+)", out)
    assert len(nan_jobs) == 3, out[-4000:]  # the first attempt and two retries (Snakemake cannot skip them)
    records = [_job_record(j) for j in nan_jobs]
    shipped = _shipped_resources(out)
    # attempt 1: the group em_mask as shipped (texture_mask + postprocess_mask)
    assert records[0]["MinMemoryNode"] == f"{shipped['texture_mask'][0]}M", records[0]
    for r in records[1:]:
        assert r["MinMemoryNode"] == "1000M", r  # not 32000M / 48000M
        assert _minutes(r["TimeLimit"]) == 10, r["TimeLimit"]  # 5 + 5 minutes for the two rules of the group
    log = (d / "logs" / "em" / "texture_mask" / "nan.log").read_text()
    assert "[input error, exit 2: a retry with the same input cannot succeed]" in log


def test_array_jobs_of_an_ungrouped_rule_with_more_ready_jobs_than_jobs(cluster_wd):
    """Job arrays with executor plugin 2.8.0 on this cluster: 3 ready tile_image jobs and `--jobs 2` go as
    an array of 2 and then the third, and all finish -- the hang reported as plugin issue #473 (200
    ready jobs, `jobs: 50`) does not happen at this size (README: Job arrays)."""
    d = cluster_wd
    slide = d / "demo_data" / "codex" / "slide1.ome.tif"
    names = d / "demo_data" / "codex" / "slide1_channels.txt"
    rows = "".join(f"a{i}\t{slide}\t{names}\tDAPI\tCD45,PanCK\t0.5\n" for i in range(3))
    (d / "arrays.tsv").write_text("name\timage\tchannels\tnuclear_channel\twholecell_channels\timage_mpp\n" + rows)
    (d / "arrays.yaml").write_text("em: {enabled: false}\ncryoet: {enabled: false}\n"
                                   "codex: {enabled: true, images: arrays.tsv, segment_cells: {backend: watershed}}\n")
    targets = [f"results/codex/a{i}/tiles" for i in range(3)]
    cmd = [exe("snakemake"), "--profile", "profiles/slurm", "--configfile", "arrays.yaml",
           "--config", "slurm={account: maskworks, partition: main}", "--sdm", "env-modules",
           "--slurm-status-command", "squeue", "--slurm-array-jobs", "tile_image", "--jobs", "2", "--", *targets]
    proc = run(cmd, cwd=d, timeout=600)
    out = proc.stdout + proc.stderr
    assert re.search(r"Submitted array job with Snakemake IDs \S+ and SLURM job ID \d+\. The individual task IDs are "
                     r"1-2\.", out), out[-3000:]
    assert all((d / t).is_dir() for t in targets)


def test_a_job_out_of_memory_is_retried_with_more(cluster_wd):
    """The cluster kills a job over its memory ("Exceeded job memory limit"); Snakemake's retry asks for more, as the
    resource's expression of the attempt says.  The base is a user's --set-resources expression (the
    shipped 8 GB cannot be exceeded by a demo slide here): attempt 1 gets 40 MB, which the job's own
    Snakemake outgrows at once; attempt 2 gets 2000 MB x 2 and finishes."""
    d = cluster_wd
    slide = d / "demo_data" / "codex" / "slide1.ome.tif"
    names = d / "demo_data" / "codex" / "slide1_channels.txt"
    (d / "oom.tsv").write_text("name\timage\tchannels\tnuclear_channel\twholecell_channels\timage_mpp\n"
                               f"oom\t{slide}\t{names}\tDAPI\tCD45,PanCK\t0.5\n")
    (d / "oom.yaml").write_text("em: {enabled: false}\ncryoet: {enabled: false}\n"
                                "codex: {enabled: true, images: oom.tsv, segment_cells: {backend: watershed}}\n")
    cmd = [exe("snakemake"), "--profile", "profiles/slurm", "--configfile", "oom.yaml",
           "--set-resources", "tile_image:mem_mb=(attempt==1)*40+(attempt>1)*2000*attempt",
           "--config", "slurm={account: maskworks, partition: main}", "--sdm", "env-modules",
           "--slurm-status-command", "squeue", "--", "results/codex/oom/tiles"]
    proc = run(cmd, cwd=d, timeout=900)
    out = proc.stdout + proc.stderr
    jobs = [jid for jid, log in re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+?)\)", out) if "oom" in log]
    assert len(jobs) == 2, out[-4000:]
    first, second = (_job_record(j) for j in jobs)
    assert first["JobState"] == "FAILED" and first["MinMemoryNode"] == "40M", first
    killed = (d / ".snakemake" / "slurm_logs" / "rule_tile_image" / "oom" / f"{jobs[0]}.log").read_text()
    assert "Exceeded job memory limit" in killed, killed[-2000:]  # killed by the cluster for its memory
    assert second["JobState"] == "COMPLETED" and second["MinMemoryNode"] == "4000M", second
    assert "stopped on bad input" not in out  # out of memory is not bad input: the retry is bigger
    assert (d / "results" / "codex" / "oom" / "tiles").is_dir()
