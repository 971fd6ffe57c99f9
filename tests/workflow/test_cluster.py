"""What a cluster run gets: the effective profile settings, site resources and GPU requests.

Snakemake loads profiles/default (the workflow profile) on every run and lets it win over
--profile, so the settings in effect are read here the way Snakemake itself computes them
(``snakemake.cli.parse_args`` in the workflow directory), not from the YAML files.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, exe, list_copick_runs, run, workflow_copy

pytestmark = pytest.mark.workflow

LOCAL_RULES = {"all", "copick_runs", "refine_summary"}  # run on the submit host: no Slurm resources
GPU_RULES = {"refine_membranes", "train_unet", "predict_unet", "texture_mask", "postprocess_mask"}
SETTINGS = ["cores", "jobs", "latency_wait", "retries", "keep_going", "group_components", "executor", "software_deployment_method",
            "set_resources", "default_resources", "printshellcmds", "rerun_incomplete"]


@pytest.fixture(scope="module")
def wd(tmp_path_factory) -> Path:
    wd = workflow_copy(tmp_path_factory.mktemp("cluster"))
    list_copick_runs(wd, "config/demo.yaml")  # the refinement's jobs appear in dry runs from here on
    return wd


def effective(wd: Path, *argv: str) -> dict:
    """The settings Snakemake would run with for ``argv`` (profiles and workflow profile applied)."""
    code = (
        "import json, sys\nfrom snakemake.cli import parse_args\n"
        f"_, a = parse_args({list(argv)!r})\n"
        f"out = {{k: getattr(a, k, None) for k in {SETTINGS!r}}}\n"
        "out['software_deployment_method'] = sorted(m.name.lower() for m in out['software_deployment_method'])\n"
        "out['set_resources'] = sorted(out['set_resources'] or {})\n"
        "out['default_resources'] = None if out['default_resources'] is None else 'set'\n"
        "print(json.dumps(out))\n"
    )
    proc = run([exe("python"), "-c", code], cwd=wd)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_slurm_profile_settings_are_in_effect(wd):
    got = effective(wd, "--profile", "profiles/slurm")
    assert got["executor"] == "slurm" and got["jobs"] == 50
    assert got["latency_wait"] == 60 and got["retries"] == 2 and got["keep_going"]
    assert got["group_components"] == {"cryoet_patches": 4}  # a few minutes of patch work a submission
    assert got["software_deployment_method"] == ["conda"]
    assert got["cores"] is None  # no local `cores: all` on the submit host
    assert got["set_resources"] == [] and got["default_resources"] is None  # resources live in the rules
    assert got["printshellcmds"] and got["rerun_incomplete"]  # from the workflow profile


def test_local_profile_settings_are_in_effect(wd):
    got = effective(wd, "--profile", "profiles/local")
    assert got["cores"] == os.cpu_count() and got["latency_wait"] == 5
    assert got["executor"] is None and got["retries"] == 0 and got["software_deployment_method"] == []


def test_no_local_setting_leaks_into_the_cluster_run(wd):
    local = yaml.safe_load((ROOT / "profiles" / "local" / "config.yaml").read_text())
    slurm = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    workflow = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    # the workflow profile wins over --profile: it must not set what an executor profile sets
    assert not set(workflow) & (set(local) | set(slurm)), set(workflow) & (set(local) | set(slurm))
    on_slurm = effective(wd, "--profile", "profiles/slurm")
    on_local = effective(wd, "--profile", "profiles/local")
    for key in local:
        k = key.replace("-", "_")
        if key not in slurm:
            assert on_slurm[k] != on_local[k], f"local setting {key}={on_local[k]} is in effect on Slurm"


def dry_run_resources(wd: Path, *args, env=None) -> dict[str, set[str]]:
    """rule -> the set of 'resources:' lines of its jobs in a Slurm dry run."""
    # No conda on this machine: the user's choice of local environments (the rules name no
    # env modules, so nothing is loaded); everything else is the shipped profile.
    proc = run([exe("snakemake"), "--profile", "profiles/slurm", "--sdm", "env-modules", "-n",
                "--configfile", "config/demo.yaml", *args], cwd=wd, env=env)
    out = proc.stdout + proc.stderr
    found: dict[str, set[str]] = {}
    for rule, res in re.findall(r"^ *(?:local)?rule (\w+):\n(?: +(?!resources:).*\n)* +resources: (.*)$", out, re.M):
        found.setdefault(rule, set()).add(res)
    return found


def _resources(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split(", "))


def test_site_settings_from_the_config_and_gpu_partition(wd):
    (wd / "site.yaml").write_text(yaml.safe_dump({
        "software": {"gpu": True, "scverse_python": sys.executable},  # a dry run only needs it to exist
        "codex": {"spatialdata": {"enabled": True}},
        "slurm": {"account": "mylab", "partition": "cpu", "gpu_partition": "gpu"}}))
    found = dry_run_resources(wd, "site.yaml")
    assert GPU_RULES | {"spatialdata"} <= set(found), found
    for rule, lines in found.items():
        for line in lines:
            res = _resources(line)
            if rule in GPU_RULES:
                assert res.get("gpu") == "1" and res["slurm_partition"] == "gpu", (rule, res)
            elif rule not in LOCAL_RULES:
                assert res.get("gpu", "0") == "0" and res["slurm_partition"] == "cpu", (rule, res)
            if rule not in LOCAL_RULES:
                assert res["slurm_account"] == "mylab" and int(res["mem_mb"]) >= 2000 and int(res["runtime"]) > 0


def test_a_cpu_job_shares_the_partition_of_the_gpu_job_of_its_group(wd):
    """texture_mask / predict_unet and the postprocess_mask of their mask are submitted together
    (group em_mask): a job that asks for no GPU goes to the GPU partition when the other one
    asks for a GPU, and stays on the CPU partition otherwise."""
    site = {"software": {"gpu": True}, "slurm": {"account": "mylab", "partition": "cpu", "gpu_partition": "gpu"}}
    (wd / "post_cpu.yaml").write_text(yaml.safe_dump({**site, "em": {
        "texture_mask": {"device": "cpu"}, "postprocess_mask": {"device": "cpu"}}}))
    found = dry_run_resources(wd, "post_cpu.yaml")
    post = [_resources(line) for line in found["postprocess_mask"]]
    assert all(r.get("gpu", "0") == "0" for r in post)
    # the U-Net mask's post-processing goes with predict_unet (GPU), the texture mask's stays on the CPU
    assert {r["slurm_partition"] for r in post} == {"cpu", "gpu"}
    assert {_resources(line)["slurm_partition"] for line in found["texture_mask"]} == {"cpu"}
    (wd / "texture_cpu.yaml").write_text(yaml.safe_dump({**site, "em": {"texture_mask": {"device": "cpu"}}}))
    found = dry_run_resources(wd, "texture_cpu.yaml")
    # its post-processing asks for the GPU: texture_mask goes to the GPU partition, without a GPU of its own
    assert {line for line in found["texture_mask"]} and all(
        _resources(line).get("gpu", "0") == "0" and _resources(line)["slurm_partition"] == "gpu"
        for line in found["texture_mask"])


def test_site_settings_from_sbatch_environment_or_none(wd):
    found = dry_run_resources(wd, env={"SBATCH_ACCOUNT": "envlab", "SBATCH_PARTITION": "envpart"})
    res = _resources(next(iter(found["refine_membranes"])))
    assert res["slurm_account"] == "envlab" and res["slurm_partition"] == "envpart"
    if not any(k in os.environ for k in ("SBATCH_ACCOUNT", "SBATCH_PARTITION")):
        for rule, lines in dry_run_resources(wd).items():
            for line in lines:  # nothing given: no account or partition, Slurm's defaults apply
                assert "slurm_account" not in line and "slurm_partition" not in line, (rule, line)


def test_device_auto_asks_for_a_gpu_only_with_the_gpu_envs(wd):
    found = dry_run_resources(wd)
    for rule, lines in found.items():
        assert all(_resources(line).get("gpu", "0") == "0" for line in lines), (rule, lines)
    (wd / "gpu.yaml").write_text(yaml.safe_dump({"software": {"gpu": True}}))
    found = dry_run_resources(wd, "gpu.yaml")
    for rule in GPU_RULES:
        assert all(_resources(line)["gpu"] == "1" for line in found[rule]), rule


def test_a_job_given_a_gpu_that_it_cannot_use_fails(wd):
    from maskworks.backend import resolve_device

    if resolve_device("auto") != "cpu":
        pytest.skip("this machine has a usable GPU")
    (wd / "gpu.yaml").write_text(yaml.safe_dump({"software": {"gpu": True}}))
    proc = run([exe("snakemake"), "--cores", "1", "--resources", "gpu=1", "--configfile", "config/demo.yaml",
                "gpu.yaml", "--forcerun", "refine_membranes", "--", *REFINED], cwd=wd, check=False)
    assert proc.returncode != 0
    logs = "".join(p.read_text() for p in (wd / "logs" / "cryoet" / "refine_membranes").glob("*.log"))
    assert "refine-membranes: error: device='cuda' asks for a GPU but cupy cannot be imported" in logs, logs[-3000:]
    assert "Traceback" not in logs


# The refinement's targets (--until cannot name rules whose jobs a checkpoint makes known).
REFINED = ["results/cryoet/refine/refine_summary.csv"]


def test_refine_reruns_when_its_input_segmentation_changes(wd):
    run([exe("snakemake"), "--cores", "2", "--configfile", "config/demo.yaml", "--", *REFINED], cwd=wd)
    proc = run([exe("snakemake"), "-n", "--cores", "2", "--configfile", "config/demo.yaml", "--", *REFINED],
               cwd=wd)
    assert not re.search(r"^refine_membranes\s+\d", proc.stdout, re.M), proc.stdout[-2000:]
    # rewrite one chunk of TS_002's membrane segmentation as zarr 2 (copick) does, a new file renamed over
    # the old one; the store's own mtime stays (the state is read from the folders, never chunk by chunk)
    store = next((wd / "demo_data" / "cryoet" / "copick" / "ExperimentRuns" / "TS_002" / "Segmentations")
                 .glob("*_membrain-seg_1_membrane.zarr"))  # the input, not a refined output
    chunk = next(p for p in store.rglob("*") if p.is_file() and not p.name.startswith("."))
    before = store.stat().st_mtime_ns
    tmp = chunk.with_name(f".{chunk.name}.partial")
    tmp.write_bytes(chunk.read_bytes())
    os.replace(tmp, chunk)
    os.utime(store, ns=(before, before))
    proc = run([exe("snakemake"), "-n", "--cores", "2", "--configfile", "config/demo.yaml", "--", *REFINED],
               cwd=wd)
    out = proc.stdout + proc.stderr
    assert re.search(r"refine_membranes\s+1\b", out), out[-3000:]
    assert "TS_002" in out
