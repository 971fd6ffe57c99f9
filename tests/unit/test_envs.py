"""The conda envs for clusters are exact locks of the stacks the tests run (`make lock`,
scripts/lock_envs.py), within the ranges of pyproject's extras; each installs maskworks itself from
the workflow's source, and Snakemake builds it from a copy that names that source, so a new source
builds a new env."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import ROOT, run
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

# env file -> the pyproject extras its pins must satisfy, and its Python
ENVS = {
    "core.yaml": (["core"], "3.11"),
    "monai.yaml": (["core", "unet", "instanseg"], "3.11"),
    "deepcell.yaml": (["deepcell"], "3.10"),
    "gpu/core.yaml": (["core", "gpu"], "3.11"),
    "cryoet.yaml": (["cryoet"], "3.11"),
    "gpu/cryoet.yaml": (["cryoet", "gpu"], "3.11"),
    "gpu/deepcell.yaml": (["deepcell"], "3.10"),
    "scverse.yaml": (["core", "scverse"], "3.12"),
}
SOURCE_ENTRY = "${MASKWORKS_SOURCE}"
CONDA_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)=(\d+(?:\.\d+)+)$")
PIP_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\d[0-9A-Za-z.]*)$")


def _lock_envs():
    """scripts/lock_envs.py as a module."""
    if "lock_envs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("lock_envs", ROOT / "scripts" / "lock_envs.py")
        sys.modules["lock_envs"] = importlib.util.module_from_spec(spec)  # its dataclass looks itself up there
        spec.loader.exec_module(sys.modules["lock_envs"])
    return sys.modules["lock_envs"]


def _env(env_file) -> tuple[list[str], list[str]]:
    """The conda entries and the pip entries of envs/<env_file>, as written."""
    env = yaml.safe_load((ROOT / "envs" / env_file).read_text())
    conda = [d for d in env["dependencies"] if not isinstance(d, dict)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return conda, pip


def _pins(env_file) -> dict[str, str]:
    """name -> exact version of every entry (conda and pip) but maskworks' own."""
    conda, pip = _env(env_file)
    pins = {}
    for entry in conda:
        m = CONDA_PIN.match(entry)
        pins[canonicalize_name(m[1]) if m else entry] = m[2] if m else None
    for entry in pip:
        if entry != SOURCE_ENTRY:
            m = PIP_PIN.match(entry)
            pins[canonicalize_name(m[1]) if m else entry] = m[2] if m else None
    return pins


@pytest.fixture(scope="module")
def extras():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {k: [Requirement(r) for r in v] for k, v in data["project"]["optional-dependencies"].items()}


def test_every_env_file_is_locked():
    on_disk = {str(p.relative_to(ROOT / "envs")) for p in (ROOT / "envs").rglob("*.yaml")}
    assert on_disk == set(ENVS) == set(_lock_envs().ENVS)


@pytest.mark.parametrize("env_file", sorted(ENVS))
def test_every_entry_is_pinned_exactly(env_file):
    conda, pip = _env(env_file)
    loose = [e for e in conda if not CONDA_PIN.match(e)] + [e for e in pip if e != SOURCE_ENTRY and not PIP_PIN.match(e)]
    assert not loose, f"envs/{env_file}: not pinned exactly (conda name=x.y.z, pip name==x.y.z): {loose}"
    python = next(CONDA_PIN.match(e)[2] for e in conda if e.startswith("python="))
    assert re.fullmatch(r"\d+\.\d+\.\d+", python) and python.startswith(ENVS[env_file][1] + "."), python
    names = [canonicalize_name(PIP_PIN.match(e)[1]) for e in pip if e != SOURCE_ENTRY]
    assert len(names) == len(set(names)), f"envs/{env_file} pins a package twice"


@pytest.mark.parametrize("env_file", sorted(ENVS))
def test_pins_satisfy_the_pyproject_extras(env_file, extras):
    pins = _pins(env_file)
    wrong = {}
    for extra in ENVS[env_file][0]:
        for req in extras[extra]:
            if req.marker and not req.marker.evaluate():
                continue
            version = pins.get(canonicalize_name(req.name))
            if version is None or not req.specifier.contains(Version(version), prereleases=True):
                wrong[req.name] = (str(req.specifier), version)
    assert not wrong, f"envs/{env_file} pins outside pyproject's {ENVS[env_file][0]} (pyproject, env): {wrong}"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Requirement(f"python{requires}").specifier.contains(pins["python"])


def test_gpu_deepcell_has_the_cuda_tensorflow_2_8_is_built_for():
    pins = _pins("gpu/deepcell.yaml")
    assert pins["cudatoolkit"].startswith("11.2.") and pins["cudnn"].startswith("8.1.")
    assert "cudatoolkit" not in _pins("deepcell.yaml")  # the CPU variant holds no CUDA


def test_tensorflow_and_torch_never_share_an_env():
    for env_file in ENVS:
        pins = _pins(env_file)
        assert not ({"tensorflow", "deepcell"} & set(pins) and {"torch", "monai"} & set(pins)), env_file


def test_deepcell_side_is_constrained(extras):
    dc = {canonicalize_name(r.name): str(r.specifier) for r in extras["deepcell"]}
    assert dc["deepcell"] == "==0.12.10" and dc["tensorflow"] == "==2.8.4"
    assert dc["numpy"] == "<2" and dc["protobuf"].startswith("==3.19")
    assert not {"torch", "copick", "monai"} & set(dc)


def test_must_pins_are_exact(extras):
    spec = {canonicalize_name(r.name): str(r.specifier) for e in ("unet", "workflow") for r in extras[e]}
    assert spec["torch"] == "==2.13.0"
    assert spec["snakemake"].startswith("==9.")
    assert spec["snakemake-executor-plugin-slurm"].startswith("==")
    assert _pins("monai.yaml")["torch"] == "2.13.0"


@pytest.mark.parametrize("env_file", sorted(ENVS))
def test_every_env_installs_maskworks_from_the_workflow_source(env_file):
    _, pip = _env(env_file)
    assert pip[-1] == SOURCE_ENTRY and pip.count(SOURCE_ENTRY) == 1, \
        f"envs/{env_file}: the pip section must end by installing maskworks ({SOURCE_ENTRY})"
    assert "maskworks" not in _pins(env_file)


@pytest.mark.parametrize("env_file", sorted(ENVS))
def test_lock_agrees_with_the_venvs(env_file):
    """The pins are the stack the tests run: `scripts/lock_envs.py --check` finds nothing to change."""
    venv = _lock_envs().ENVS[env_file].venv
    if not (ROOT / venv / "bin" / "python").exists():
        pytest.skip(f"{venv} is absent: envs/{env_file} is not compared with the stack it pins")
    proc = run([sys.executable, ROOT / "scripts" / "lock_envs.py", "--check", env_file], check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_lock_check_lists_what_differs(tmp_path, monkeypatch):
    lock_envs = _lock_envs()
    found = {"python": "3.11.7", "pip": "26.3", "pins": {"numpy": "2.4.6", "zarr": "3.1.6"}, "skipped": {}}
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "core.yaml").write_text(
        "# header kept\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.11\n  - pip\n  - numpy>=1.24\n"
        "  - pip:\n      - zarr==3.1.5\n      - gone==1.0\n      - ${MASKWORKS_SOURCE}\n")
    monkeypatch.setattr(lock_envs, "ENVS_DIR", tmp_path / "envs")
    new = lock_envs.locked_text("core.yaml", found)
    assert new == ("# header kept\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.11.7\n  - pip=26.3\n"
                   "  - pip:\n      - numpy==2.4.6\n      - zarr==3.1.6\n      - ${MASKWORKS_SOURCE}\n")
    listed = lock_envs.differences((tmp_path / "envs" / "core.yaml").read_text(), new)
    assert listed == ["  numpy>=1.24 -> numpy==2.4.6", "  pip -> pip=26.3", "  python=3.11 -> python=3.11.7",
                      "  zarr==3.1.5 -> zarr==3.1.6", "  - gone==1.0"]


def test_gpu_deepcell_env_puts_its_cuda_on_the_library_path():
    script = ROOT / "envs" / "gpu" / "deepcell.post-deploy.sh"
    assert script.is_file() and "LD_LIBRARY_PATH" in script.read_text()


def test_rules_name_only_env_files_that_exist():
    for smk in (ROOT / "rules").glob("*.smk"):
        for name in re.findall(r'conda_env\("(\w+)"\)', smk.read_text()):
            assert (ROOT / "envs" / f"{name}.yaml").is_file(), (smk.name, name)
            assert name in ("monai", "scverse") or (ROOT / "envs" / "gpu" / f"{name}.yaml").is_file(), (smk.name, name)


# ----------------------------------------------------------------------------- envs follow the source


def _smk_function(name):
    """A top-level function of rules/common.smk, compiled on its own."""
    lines = (ROOT / "rules" / "common.smk").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"def {name}("))
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[start:end])


@pytest.fixture
def stamped_env(tmp_path, monkeypatch):
    """rules/common.smk's source_stamped_env for a local source ``tmp_path/source`` (a small copy of
    this checkout: two env files, pyproject.toml, maskworks' __init__ and one module)."""
    source = tmp_path / "source"
    for rel in ["envs/core.yaml", "envs/gpu/deepcell.yaml", "envs/gpu/deepcell.post-deploy.sh", "pyproject.toml",
                "src/maskworks/__init__.py"]:
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, source / rel)
    (source / "src" / "maskworks" / "em").mkdir()
    (source / "src" / "maskworks" / "em" / "texture.py").write_text("THRESHOLD = 1\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("MASKWORKS_SOURCE_STAMP", raising=False)
    cache = types.SimpleNamespace(open=lambda f, mode: open(f, mode), exists=lambda f: Path(f).exists())
    namespace = {
        "os": os, "re": re, "sys": sys, "Path": Path, "SOURCE_VARIABLE": "MASKWORKS_SOURCE",
        "SOURCE": types.SimpleNamespace(get_path_or_uri=lambda secret_free: str(source), join=lambda rel: source / rel),
        "is_local_source": lambda: True, "maskworks_source": lambda: str(source.resolve()),
        "workflow": types.SimpleNamespace(sourcecache=cache),
    }
    exec(_smk_function("source_stamped_env"), namespace)

    def stamped(env, new_run=True):
        if new_run:  # the stamp is made once per run (and handed to its jobs)
            monkeypatch.delenv("MASKWORKS_SOURCE_STAMP", raising=False)
        path = Path(namespace["source_stamped_env"](env))
        return path, path.read_text()

    stamped.source = source
    return stamped


def test_generated_env_changes_with_the_source_and_only_then(stamped_env):
    source = stamped_env.source
    path, text = stamped_env("envs/core.yaml")
    assert path == Path.cwd().resolve() / ".snakemake" / "maskworks-envs" / "core.yaml"
    first, rest = text.split("\n", 1)
    assert rest == (source / "envs" / "core.yaml").read_text()  # the env file itself, one comment line above
    assert re.fullmatch(r"# maskworks source sha256:[0-9a-f]{16}: written by rules/common.smk from envs/core.yaml",
                        first), first
    written = path.stat().st_mtime_ns

    (source / "README.md").write_text("not part of the package\n")
    assert stamped_env("envs/core.yaml") == (path, text)  # the same source: the same env, file untouched
    assert path.stat().st_mtime_ns == written

    (source / "src" / "maskworks" / "em" / "texture.py").write_text("THRESHOLD = 2\n")
    assert stamped_env("envs/core.yaml", new_run=False)[1] == text  # within a run (its jobs): the run's stamp
    path2, edited = stamped_env("envs/core.yaml")
    assert path2 == path and edited != text and edited.split("\n", 1)[1] == rest

    (source / "pyproject.toml").write_text((source / "pyproject.toml").read_text() + "\n")
    assert stamped_env("envs/core.yaml")[1] not in (text, edited)
    (source / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    assert stamped_env("envs/core.yaml")[1] == edited  # back to that source: back to its env


def test_generated_gpu_env_keeps_its_post_deploy_script(stamped_env):
    path, text = stamped_env("envs/gpu/deepcell.yaml")
    assert path.parent.name == "gpu" and text.endswith((stamped_env.source / "envs/gpu/deepcell.yaml").read_text())
    script = path.with_name("deepcell.post-deploy.sh")  # Snakemake runs the script beside the env file
    assert script.read_bytes() == (ROOT / "envs" / "gpu" / "deepcell.post-deploy.sh").read_bytes()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_generated_env_follows_the_code_not_the_commit(stamped_env):
    """A commit that changes no code (docs, tests) reuses the envs, so Snakemake's software-env trigger
    reruns nothing; a commit that changes code builds new ones."""
    source = stamped_env.source
    git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run(["git", "-C", source, "init", "-q"])
    run(["git", "-C", source, "add", "."])
    run(["git", "-C", source, "commit", "-q", "-m", "one"], env=git)
    first = stamped_env("envs/core.yaml")[1]
    (source / "README.md").write_text("docs\n")
    run(["git", "-C", source, "add", "."])
    run(["git", "-C", source, "commit", "-q", "-m", "docs"], env=git)
    assert stamped_env("envs/core.yaml")[1] == first
    (source / "src" / "maskworks" / "em" / "texture.py").write_text("THRESHOLD = 3\n")
    run(["git", "-C", source, "commit", "-q", "-am", "code"], env=git)
    assert stamped_env("envs/core.yaml")[1] != first


def _python312():
    import glob

    for candidate in [os.environ.get("PY312"), *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))),
                      shutil.which("python3.12")]:
        if candidate and run([candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                             check=False).returncode == 0:
            return candidate
    return None


@pytest.mark.slow
def test_core_installs_beside_the_current_scverse_stack(tmp_path):
    """pip resolves maskworks[core] together with spatialdata 0.8, anndata 0.13 and squidpy 1.8 on Python
    3.12 (a dry run: the resolver's answer, nothing installed), on zarr 3."""
    import json

    py = _python312()
    if py is None:
        pytest.skip("!!! Python 3.12 not found: the co-installation with the scverse stack is NOT TESTED; set PY312 !!!")
    report = tmp_path / "report.json"
    run([py, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", report,
         f"{ROOT}[core]", "spatialdata==0.8.*", "anndata==0.13.*", "squidpy==1.8.*"], timeout=1200)
    chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert chosen["maskworks"] and chosen["spatialdata"].startswith("0.8.") and chosen["anndata"].startswith("0.13.")
    assert chosen["squidpy"].startswith("1.8.") and int(chosen["zarr"].split(".")[0]) >= 3
