"""The container route: the image definition's own install step run in a clean venv (neither Docker nor
Apptainer can be installed here: Debian has no Apptainer and no registry is reachable), and
`--sdm apptainer` refused where an environment has no image instead of running its jobs on the host."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, exe, run

DOCKERFILE = ROOT / "containers" / "Dockerfile"


def _context(dest: Path) -> Path:
    """The build context the Dockerfile sees: exactly what its COPY lines take from the repository."""
    for src, _ in re.findall(r"^COPY (.+?) (\S+)$", DOCKERFILE.read_text(), re.M):
        for item in src.split():  # each lands at its own path (the Dockerfile keeps the layout)
            path = ROOT / item
            out = dest / item
            out.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if path.is_dir() else shutil.copy)(path, out)
    return dest


def test_the_dockerfile_runs_the_install_script_with_what_it_copies():
    text = DOCKERFILE.read_text()
    assert re.search(r'^RUN sh containers/install.sh "\$\{ENV\}"', text, re.M)
    copied = {i for src, _ in re.findall(r"^COPY (.+?) (\S+)$", text, re.M) for i in src.split()}
    assert {"pyproject.toml", "src", "envs", "scripts/env_constraints.py", "containers/install.sh"} <= copied


@pytest.mark.slow
def test_the_image_install_step_builds_the_core_environment_in_a_clean_venv(tmp_path):
    python = shutil.which("python3.11") or sys.executable
    ctx = _context(tmp_path / "ctx")
    venv = tmp_path / "venv"
    run([python, "-m", "venv", venv])
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(Path.home()),
           "SETUPTOOLS_SCM_PRETEND_VERSION_FOR_MASKWORKS": "0.1.0.dev1", "PYTHON": str(venv / "bin" / "python")}
    proc = subprocess.run(["sh", "containers/install.sh", "core"], cwd=ctx, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "maskworks 0.1.0.dev1" in proc.stdout
    assert "No broken requirements found" in proc.stdout
    # exactly the pins of envs/core.yaml, nothing else but maskworks and the venv's own pip
    frozen = run([venv / "bin" / "python", "-m", "pip", "list", "--format=freeze"]).stdout.split()
    sys.path.insert(0, str(ROOT / "scripts"))
    from env_constraints import constraints

    def norm(p):
        name, _, version = p.partition("==")
        return f"{name.lower().replace('_', '-')}=={version}"

    pins = {norm(p) for p in constraints(ROOT / "envs" / "core.yaml")}
    got = {norm(p) for p in frozen if not p.lower().startswith(("maskworks==", "pip==", "setuptools=="))}
    assert got == pins, (got ^ pins)


def test_install_script_refuses_what_pip_cannot_build(tmp_path):
    proc = subprocess.run(["sh", str(ROOT / "containers" / "install.sh"), "gpu/deepcell"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "use --sdm conda" in proc.stderr


def test_apptainer_without_images_is_refused_before_any_job(tmp_path):
    for name in ["Snakefile", "rules", "scripts", "config", "envs", "profiles"]:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    proc = run([exe("snakemake"), "-n", "--sdm", "apptainer"], cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "software.containers.core names no image" in out and "would run on the host" in out, out[-2000:]
