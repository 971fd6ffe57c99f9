"""Shared fixtures: the repository root, the venv's executables, small synthetic volumes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# copick 1.31 needs zarr 2: its rules and tests run in the cryo-ET environment (`make setup-cryoet`).
CRYOET_BIN = ROOT / ".venv-cryoet" / "bin"


def exe(name: str) -> str:
    """An executable of the running venv (snakemake, maskworks), else from PATH."""
    p = BIN / name
    return str(p) if p.exists() else (shutil.which(name) or name)


def run(cmd, cwd=None, check=True, timeout=900, env=None):
    """Run a command, capturing its output; on failure show it in the assertion message."""
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


WORKFLOW_FILES = ["Snakefile", "rules", "scripts", "config", "envs", "profiles"]


def workflow_copy(dest: Path) -> Path:
    """The workflow's files copied to ``dest`` with the demo data written there, so a test
    runs Snakemake without touching the checkout's results/."""
    for name in WORKFLOW_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    if CRYOET_BIN.exists():  # the copy's own source directory has the cryo-ET environment, as a checkout has
        (dest / ".venv-cryoet").symlink_to(CRYOET_BIN.parent)
    write_demo(dest / "demo_data")
    return dest


def list_copick_runs(wd: Path, *configfiles, rule="copick_runs") -> None:
    """Run the copick_runs checkpoint of a workflow copy: the refinement's jobs are known (and shown in
    a dry run) once it has listed the project's runs."""
    configs = ["--configfile", *configfiles] if configfiles else []
    run([exe("snakemake"), "--cores", "1", *configs, "--until", rule], cwd=wd)


def write_demo(dest: Path, arms=None) -> Path:
    """The demo data (``arms``: all), as `make demo` writes it: every part from this environment, the
    copick project from the cryo-ET environment."""
    from maskworks.demo import copick_available, default_arms

    arms = list(arms or ("em", "cryoet", "codex", "copick"))
    here = [a for a in arms if a in default_arms()]
    if here:
        run([exe("maskworks"), "demo-data", dest, "--arms", ",".join(here)])
    if "copick" in arms and not copick_available():
        run([cryoet_exe("maskworks"), "demo-data", dest, "--arms", "copick"])
    return dest


def cryoet_exe(name: str) -> str:
    """An executable of the cryo-ET environment; the test is skipped, loudly, where it is missing."""
    path = CRYOET_BIN / name
    if not path.exists():
        pytest.skip("!!! .venv-cryoet is MISSING: the copick parts are NOT TESTED; build it with "
                    "`make setup-cryoet` (`make test` does) !!!")
    return str(path)


def chunk_file(array: Path, index) -> Path:
    """The file of chunk ``index`` of a Zarr array folder, Zarr v2 (``0.1.2``) or v3 (``c/0/1/2``)."""
    array = Path(array)
    if (array / ".zarray").exists():
        return array / ".".join(str(i) for i in index)
    return array.joinpath("c", *(str(i) for i in index))


@pytest.fixture(params=["0.4", "0.5"])
def ome_zarr_version(request):
    """Each OME-Zarr version the writer makes (0.5 only where zarr 3 is installed)."""
    from maskworks.io import ngff, volumes

    if request.param == "0.5" and ngff.zarr_major() < 3:
        pytest.skip("OME-Zarr 0.5 needs zarr 3")
    before = volumes.OME_ZARR_VERSION
    volumes.set_ome_zarr_version(request.param)
    yield request.param
    volumes.OME_ZARR_VERSION = before


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Good inputs for every stage and each stage's golden outputs (one good run; tests/golden.py),
    shared by the reliability tests."""
    from golden import make_golden

    return make_golden(tmp_path_factory.mktemp("golden"))
