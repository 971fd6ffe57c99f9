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
    run([exe("maskworks"), "demo-data", dest / "demo_data"])
    return dest


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Good inputs for every stage and each stage's golden outputs (one good run; tests/golden.py),
    shared by the reliability tests."""
    from golden import make_golden

    return make_golden(tmp_path_factory.mktemp("golden"))
