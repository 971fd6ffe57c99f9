"""profiles/slurm-site-example, the profile a site copies: Snakemake and the Slurm executor plugin
understand every setting in it, and its jobs reach the partitions and sbatch flags it promises.

The plugin's own code decides here: its settings are read from `snakemake --help`, the resources it
reads from its source, and each dry-run job is given to its partition selection and sbatch-string
functions (``partitions.get_best_partition``, ``utils.set_gres_string``,
``submit_string.get_submit_command``), as the executor calls them at submission.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, exe, run

SITE = ROOT / "profiles" / "slurm-site-example"
LOCAL_RULES = {"all", "copick_runs", "refine_summary"}  # run on the submit host: never submitted
GPU_RULES = {"train_unet", "predict_unet"}  # the jobs of the dry run below that ask for a GPU


def _profile_text(examples: bool = False) -> str:
    """The example profile; ``examples``: with its commented-out example settings switched on."""
    text = (SITE / "config.yaml").read_text()
    if examples:
        text = re.sub(r"^(\s*)# ( *[a-z][\w-]*:(?: .*)?)$", r"\1\2", text, flags=re.M)
    return text


def _profile(examples: bool = False) -> dict:
    return yaml.safe_load(_profile_text(examples))


def plugin_resource_names() -> set[str]:
    """Every job resource the Slurm executor plugin (and its job-step plugin) reads."""
    import snakemake_executor_plugin_slurm as slurm
    import snakemake_executor_plugin_slurm_jobstep as jobstep

    names: set[str] = set()
    for pkg in (slurm, jobstep):
        for source in Path(pkg.__file__).parent.glob("*.py"):
            text = source.read_text()
            names |= set(re.findall(r"resources\.get\(\s*[\"'](\w+)[\"']", text))
            names |= set(re.findall(r"resources\.(?!get\b|items\b|keys\b)(\w+)", text))
            names |= set(re.findall(r"getattr\(\s*job\.resources,\s*[\"'](\w+)[\"']", text))
    return names


@pytest.fixture(scope="module")
def snakemake_help() -> str:
    proc = run([exe("snakemake"), "--help"])
    return proc.stdout + proc.stderr


@pytest.mark.workflow
def test_every_setting_is_a_snakemake_or_plugin_option(snakemake_help):
    profile = _profile(examples=True)
    assert {"slurm-status-command", "set-resources"} <= set(profile), profile  # the examples are seen
    for key in profile:
        assert re.search(rf"--{re.escape(key)}\b", snakemake_help), f"{key}: not an option of `snakemake --help`"
    assert "--slurm-partition-config" in snakemake_help  # the plugin version this profile is written for


def test_it_holds_the_settings_of_profiles_slurm():
    site = _profile()
    shipped = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    for key, value in shipped.items():
        assert site.get(key) == value, f"{key}: {site.get(key)!r} here, {value!r} in profiles/slurm"


def test_resources_are_resources_the_plugin_reads():
    read = plugin_resource_names()
    assert {"slurm_account", "slurm_partition", "qos", "constraint", "slurm_extra", "gpu", "gpu_model",
            "gres"} <= read, read  # the scan finds what the plugin is known to read
    assert {"slurm_account", "qos"} <= set(_profile()["default-resources"])
    profile = _profile(examples=True)
    resources = set(profile["default-resources"])
    assert {"constraint", "slurm_extra", "slurm_partition"} <= resources
    assert resources <= read, resources - read  # e.g. slurm_qos would be ignored silently
    rules = set(re.findall(r"^rule (\w+):", "".join(p.read_text() for p in (ROOT / "rules").glob("*.smk")), re.M))
    for rule, per_rule in profile["set-resources"].items():
        assert rule in GPU_RULES | {"refine_membranes", "segment_cells"} and rule in rules, rule
        assert set(per_rule) <= read, (rule, set(per_rule) - read)


def test_partition_config_is_in_the_plugin_format():
    from snakemake_executor_plugin_slurm.partitions import read_partition_file

    config = _profile()["slurm-partition-config"]
    partitions = read_partition_file(SITE / config)  # PartitionLimits(**limits): unknown keys fail
    assert any(p.limits.max_gpu > 0 for p in partitions) and any(p.limits.max_gpu == 0 for p in partitions)


@pytest.mark.workflow
def test_a_copy_is_in_effect_with_its_own_partition_file(tmp_path):
    """profiles/<mysite> copied from the example: Snakemake resolves partitions.yaml in the copy."""
    shutil.copytree(SITE, tmp_path / "profiles" / "mysite")
    code = (
        "from snakemake.cli import parse_args\n"
        "_, a = parse_args(['--profile', 'profiles/mysite'])\n"
        "print(a.executor, a.jobs, a.latency_wait, a.retries, a.slurm_partition_config,"
        " sorted(a.default_resources))\n"
    )
    out = run([exe("python"), "-c", code], cwd=tmp_path).stdout.strip().splitlines()[-1]
    assert out.startswith("slurm 50 60 2 profiles/mysite/partitions.yaml "), out
    assert "'qos'" in out and "'slurm_account'" in out, out


class _Resources(dict):
    """Job resources as the plugin reads them: ``resources.get(name)`` and ``resources.name``."""

    def __getattr__(self, name):
        return self[name]


class _Job:
    def __init__(self, name: str, resources: dict, threads: int = 2):
        self.name, self.threads = name, threads
        self.resources = _Resources(resources)

    def __str__(self):
        return self.name


def _value(v: str):
    return int(v) if re.fullmatch(r"-?\d+", v) else v


def dry_run_jobs(project: Path, profile: Path, *configfiles: str) -> list[_Job]:
    """The jobs of a Slurm dry run with ``profile``, each with its resources as printed."""
    proc = run([exe("snakemake"), "-s", ROOT / "Snakefile", "--profile", profile, "--sdm", "env-modules", "-n",
                "--configfile", ROOT / "config" / "config.yaml", *configfiles], cwd=project)
    out = proc.stdout + proc.stderr
    jobs = []
    for rule, line in re.findall(r"^ *(?:local)?rule (\w+):\n(?: +(?!resources:).*\n)* +resources: (.*)$", out, re.M):
        res = dict(kv.split("=", 1) for kv in line.split(", "))
        jobs.append(_Job(rule, {k: _value(v) for k, v in res.items() if v != "<TBD>"}))
    assert {j.name for j in jobs} >= {"texture_mask", "postprocess_mask"} | GPU_RULES, out[-3000:]
    return jobs


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """One small EM volume with a truth: CPU texture masks, a U-Net trained and run on a GPU."""
    d = tmp_path_factory.mktemp("site-profile")
    for name in ("vol.npy", "truth.npy"):
        np.save(d / name, np.zeros((16, 16, 16), np.uint8))
    (d / "em.tsv").write_text("name\tpath\tvoxel_size\tunit\ttruth\nv1\tvol.npy\t10\tnanometer\ttruth.npy\n")
    (d / "site.yaml").write_text(yaml.safe_dump({
        "software": {"gpu": True},
        "em": {"volumes": "em.tsv", "train_unet": {"enabled": True},
               "texture_mask": {"device": "cpu"}, "postprocess_mask": {"device": "cpu"}}}))
    shutil.copytree(SITE, d / "profiles" / "mysite")
    return d


@pytest.mark.workflow
def test_jobs_get_the_site_resources_and_the_partition_that_fits(project):
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Log:  # the executor's logger, silent
        def info(self, msg):
            pass

        debug = warning = info

    partitions = read_partition_file(project / "profiles" / "mysite" / "partitions.yaml")
    submitted = [j for j in dry_run_jobs(project, project / "profiles" / "mysite", "site.yaml")
                 if j.name not in LOCAL_RULES]
    for job in submitted:
        res = job.resources
        assert res["slurm_account"] == "mylab" and res["qos"] == "normal", (job.name, res)
        assert "slurm_partition" not in res, (job.name, res)  # left to partitions.yaml
        gpu = job.name in GPU_RULES
        assert res["gpu"] == int(gpu), (job.name, res)
        assert get_best_partition(partitions, job, Log()) == ("gpu" if gpu else "cpu"), (job.name, res)
        assert set_gres_string(job) == (" --gpus=1" if gpu else ""), job.name
        params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": job.name, "account": "-A mylab",
                  "partition": "-p cpu", "workdir": str(project)}
        sbatch = get_submit_command(job, params)
        assert "--qos=normal" in sbatch and f"--mem {res['mem_mb']}" in sbatch, sbatch
    # a job that outgrows the cpu partition (a third attempt of a large volume) goes to bigmem
    big = _Job("texture_mask", {**next(j for j in submitted if j.name == "texture_mask").resources,
                                "mem_mb": 300000})
    assert get_best_partition(partitions, big, Log()) == "bigmem"


@pytest.mark.workflow
def test_the_examples_switched_on_with_a_fixed_partition(project):
    """Every commented-out example switched on: slurm_partition in default-resources (partitions.yaml
    is then unused), the config's slurm.gpu_partition for the jobs that ask for a GPU (the rules' own
    slurm_partition wins), a GPU model for them, a constraint and extra sbatch flags for all."""
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    profile = project / "profiles" / "examples"
    shutil.copytree(SITE, profile)
    (profile / "config.yaml").write_text(_profile_text(examples=True))
    (project / "gpu_partition.yaml").write_text(yaml.safe_dump({"slurm": {"gpu_partition": "gpu"}}))
    jobs = dry_run_jobs(project, profile, "site.yaml", "gpu_partition.yaml")
    found: dict[str, set] = {}
    for job in jobs:
        found.setdefault(job.name, set()).add(job.resources.get("slurm_partition"))
        res = job.resources
        assert res["slurm_account"] == "mylab" and res["constraint"] == "skylake", (job.name, res)
        assert res["slurm_extra"] == "--mail-type=FAIL", (job.name, res)
        if job.name in GPU_RULES:
            assert set_gres_string(job) == " --gpus=a100:1", (job.name, res)
        elif job.name not in LOCAL_RULES:
            assert "gpu_model" not in res and set_gres_string(job) == "", (job.name, res)
    assert found["train_unet"] == found["predict_unet"] == {"gpu"}, found
    assert found["texture_mask"] == found["all"] == {"cpu"}, found
