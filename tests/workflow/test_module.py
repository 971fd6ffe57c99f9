"""maskworks used the way other workflows use it, and jobs that import it from their own env.

- As a Snakemake module: a Snakefile in another directory (its own config and tables) uses
  this checkout through ``module maskworks: snakefile: ...`` with a local path and prefixed
  rules (``use rule * from maskworks as maskworks_*``); dry run of every arm, then a small real run.
- As snakedeploy deploys it from a local checkout (workflow/Snakefile, copies of config/ and
  profiles/), with the module's ``snakefile:`` pointed at the checkout (snakedeploy writes
  ``"Snakefile"``, which names the deployed Snakefile itself): a dry run on the user's own table.
- The conda envs' own pip entry (``${MASKWORKS_SOURCE}``, set by rules/common.smk) installs
  maskworks from the workflow's source into a clean virtual environment, and a job's script
  run there, with Snakemake's preamble appending the host's paths, imports maskworks and
  NumPy from that environment only.
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
import yaml
from conftest import ROOT, exe, list_copick_runs, run, write_demo

pytestmark = pytest.mark.workflow

USER_SNAKEFILE = f"""\
configfile: "config.yaml"


module maskworks:
    snakefile:
        "{ROOT / 'Snakefile'}"
    config:
        config


use rule * from maskworks as maskworks_*


rule all:
    input:
        rules.maskworks_all.input,
    default_target: True
"""


def _demo_config() -> dict:
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    cfg["em"]["volumes"] = "tables/em.tsv"
    cfg["cryoet"]["tomograms"] = "tables/cryoet.tsv"
    cfg["codex"]["images"] = "tables/codex.tsv"
    cfg["cryoet"]["refine_membranes"]["copick_config"] = "data/cryoet/copick/copick_config.json"
    return cfg


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's project: own Snakefile, config and tables, data beside them; no maskworks files."""
    d = tmp_path_factory.mktemp("user-project")
    write_demo(d / "data")
    (d / "tables").mkdir()
    for arm, table in [("em", "demo_em_volumes.tsv"), ("cryoet", "demo_cryoet_tomograms.tsv"),
                       ("codex", "demo_codex_images.tsv")]:
        text = (ROOT / "config" / table).read_text().replace("demo_data/", "data/")
        (d / "tables" / f"{arm}.tsv").write_text(text)
    (d / "Snakefile").write_text(USER_SNAKEFILE)
    (d / "config.yaml").write_text(yaml.safe_dump(_demo_config()))
    return d


def test_module_dry_run_of_every_arm(project):
    list_copick_runs(project, rule="maskworks_copick_runs")  # the refinement's jobs are known from here on
    proc = run([exe("snakemake"), "-n", "--cores", "2"], cwd=project)
    out = proc.stdout + proc.stderr
    for rule, n in [("texture_mask", 2), ("postprocess_mask", 4), ("train_unet", 1), ("extract_patches", 1),
                    ("refine_membranes", 2), ("tile_image", 1), ("segment_cells", 1), ("stitch", 1)]:
        assert re.search(rf"^maskworks_{rule}\s+{n}$", out, re.M), (rule, out[-3000:])


# workflow/Snakefile as `snakedeploy deploy-workflow /path/to/maskworks DEST --branch main --name
# maskworks` (snakedeploy 0.17.1) writes it, with the one line README says to change: `snakefile:`
# names the checkout's Snakefile instead of "Snakefile" (relative to this file: itself).
DEPLOYED_SNAKEFILE = f"""\
from snakemake.utils import min_version


min_version("6.10.0")


configfile: "config/config.yaml"


# declare {ROOT} as a module
module maskworks:
    snakefile:
        "{ROOT / 'Snakefile'}"
    config:
        config


# use all rules from {ROOT}
use rule * from maskworks
"""


def test_snakedeploy_layout_from_a_local_checkout(tmp_path):
    d = tmp_path / "deployed"
    for name in ("config", "profiles"):  # what snakedeploy copies from the repository
        shutil.copytree(ROOT / name, d / name)
    (d / "workflow").mkdir()
    (d / "workflow" / "Snakefile").write_text(DEPLOYED_SNAKEFILE)
    # the user's step: one volume in the copied table (config/config.yaml points at it, as shipped)
    (d / "data").mkdir()
    np.save(d / "data" / "v1.npy", np.random.default_rng(0).integers(0, 255, (32, 64, 64), dtype=np.uint8))
    (d / "config" / "em_volumes.tsv").write_text(
        "name\tpath\tvoxel_size\tunit\ttruth\nv1\tdata/v1.npy\t10\tnanometer\t\n")
    proc = run([exe("snakemake"), "-n"], cwd=d)
    out = proc.stdout + proc.stderr
    assert "workflow specific profile profiles/default" in out, out[:2000]  # the copied workflow profile
    for rule, n in [("texture_mask", 1), ("postprocess_mask", 1), ("all", 1), ("total", 3)]:
        assert re.search(rf"^{rule}\s+{n}$", out, re.M), (rule, out[-3000:])
    assert "results/em/v1/texture_final.zarr" in out
    assert not (ROOT / "results" / "em" / "v1").exists()


@pytest.fixture(scope="module")
def em_run(project) -> Path:
    """A small real run through the module: the EM arm with the default temp() intermediates."""
    cfg = _demo_config()
    cfg["cryoet"]["enabled"] = cfg["codex"]["enabled"] = False
    cfg["em"]["train_unet"]["enabled"] = False
    cfg["em"]["keep_intermediates"] = False
    (project / "em_only.yaml").write_text(yaml.safe_dump(cfg))
    run([exe("snakemake"), "--cores", "2", "--configfile", "em_only.yaml", "--skip-script-cleanup"], cwd=project)
    return project


def test_module_real_run_em_arm_with_temp_intermediates(em_run):
    project = em_run
    for name in ["sample1", "sample2"]:
        d = project / "results" / "em" / name
        assert (d / "texture_final.zarr").is_dir() and (d / "texture_mask.zarr").is_dir()
        assert not (d / "texture_confidence.zarr").exists()  # temp(): deleted once the mask is made
        stats = json.loads((d / "texture_final_stats.json").read_text())
        assert stats["truth"]["dice"] > 0.9
    log = (project / "logs" / "em" / "texture_mask" / "sample1.log").read_text()
    assert re.search(rf"maskworks \S+ from {re.escape(str(ROOT / 'src' / 'maskworks'))}", log), log[:2000]
    proc = run([exe("snakemake"), "-n", "--cores", "2", "--configfile", "em_only.yaml"], cwd=project)
    assert "Nothing to be done" in proc.stdout + proc.stderr  # missing temp files rerun nothing


def _env_venv(tmp: Path, env_file: str) -> Path:
    """A clean venv holding what envs/<env_file> installs: its conda packages by their pip names
    (the same versions, tests/unit/test_envs.py) and its pip section as written, which conda
    hands to pip as a requirements file (pip expands ${MASKWORKS_SOURCE} there)."""
    env = yaml.safe_load((ROOT / "envs" / env_file).read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str) and not d.startswith(("python", "pip"))]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    venv = tmp / "env"
    run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    if conda:  # the locked envs take all but python and pip from PyPI (their pip section)
        run([py, "-m", "pip", "install", "-q", "--no-compile", *conda], timeout=1200)
    req = tmp / "condaenv.requirements.txt"
    req.write_text("\n".join(pip_section) + "\n")
    # the value rules/common.smk gives it for a local checkout
    run([py, "-m", "pip", "install", "-q", "--no-compile", "-r", req], env={"MASKWORKS_SOURCE": str(ROOT)},
        timeout=1200)
    return venv


@pytest.mark.slow
def test_job_imports_maskworks_from_its_own_env(em_run, tmp_path):
    from maskworks.io import read_volume

    venv = _env_venv(tmp_path, "core.yaml")
    py = venv / "bin" / "python"
    where = subprocess.run([py, "-I", "-c", "import maskworks; print(maskworks.__file__)"], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # installed from the source, not a link to the checkout
    # The texture_mask job script as Snakemake generated it (preamble + script), run the way a
    # conda job runs it: that env's python, no PYTHONPATH, a minimal environment.
    project = em_run
    scripts = sorted((project / ".snakemake" / "scripts").glob("*texture_mask.py"))
    assert scripts, "the module run keeps its job scripts (--skip-script-cleanup)"
    out = project / "results" / "em" / "sample1"
    before = read_volume(out / "texture_mask.zarr").numpy()
    job = next(s for s in scripts if "texture_mask/sample1.log" in s.read_text(errors="replace"))
    clean = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    proc = subprocess.run([py, job], cwd=project, env=clean, capture_output=True, text=True, timeout=600)
    log = (project / "logs" / "em" / "texture_mask" / "sample1.log").read_text()
    assert proc.returncode == 0, proc.stderr[-3000:] + log[-3000:]
    assert re.search(rf"maskworks \S+ from {re.escape(str(venv))}", log) and f"python {py}" in log, log[:2000]
    assert np.array_equal(read_volume(out / "texture_mask.zarr").numpy(), before)
