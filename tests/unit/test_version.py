"""maskworks' version names the git commit it runs from (dirty when the tree has uncommitted
changes), and every provenance record carries it."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, run

import maskworks
from maskworks import checkout_version
from maskworks import checkout_version as _checkout_version
from maskworks.jobs import provenance

GIT = shutil.which("git")
FROM_CHECKOUT = GIT is not None and (ROOT / ".git").exists() and \
    maskworks.__file__ == str(ROOT / "src" / "maskworks" / "__init__.py")
needs_checkout = pytest.mark.skipif(not FROM_CHECKOUT, reason="maskworks is not imported from a git checkout")


def _git(cwd, *args):
    return run(["git", "-C", cwd, *args], env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                                                 "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}).stdout.strip()


@needs_checkout
def test_version_names_the_current_commit():
    version = maskworks.__version__
    full, short = _git(ROOT, "rev-parse", "HEAD"), _git(ROOT, "rev-parse", "--short", "HEAD")
    dirty = bool(_git(ROOT, "status", "--porcelain", "--untracked-files=no"))
    node = re.search(r"\+g([0-9a-f]{7,})", version)
    if node is None:  # a clean checkout of a tag: the tag's version
        assert not dirty and run(["git", "-C", ROOT, "describe", "--tags", "--exact-match"], check=False).returncode == 0
    else:
        assert full.startswith(node[1]) and node[1][: len(short)] == short[: len(node[1])], (version, short)
    assert bool(re.search(r"\.d\d{8}$", version)) == dirty, version


@needs_checkout
def test_version_is_what_setuptools_scm_builds():
    if importlib.util.find_spec("setuptools_scm") is None:
        pytest.skip("setuptools-scm is not installed here (the dev extra has it)")
    built = run([sys.executable, "-m", "setuptools_scm"], cwd=ROOT).stdout.strip()
    assert built == checkout_version(ROOT) == maskworks.__version__


def test_provenance_records_and_the_command_line_carry_the_version():
    record = provenance("texture_mask", {"input": "volume.mrc", "other": None}, {"threshold": "otsu"})
    assert record["maskworks_version"] == maskworks.__version__ != "unknown"
    out = run([sys.executable, "-m", "maskworks.cli", "--version"]).stdout.strip()
    assert out == f"maskworks {maskworks.__version__}"


@pytest.mark.skipif(GIT is None, reason="needs git")
def test_checkout_version_known_answers(tmp_path, monkeypatch):
    """setuptools-scm's default schemes on a history drawn by hand (and setuptools-scm's own answers
    where it is installed)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")  # 2026-01-01 UTC: the date of a dirty tree
    scm = importlib.util.find_spec("setuptools_scm") is not None

    def checkout_version(repo):
        version = _checkout_version(repo)
        if scm and version is not None:
            assert run([sys.executable, "-m", "setuptools_scm"], cwd=repo).stdout.strip() == version
        return version

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pyproject.toml").write_text('[tool.setuptools_scm]\nfallback_version = "0.1.0.dev0"\n')
    _git(repo, "init", "-q")
    assert checkout_version(repo) is None  # no commit yet: git cannot say
    _git(repo, "add", "pyproject.toml")
    _git(repo, "commit", "-q", "-m", "one")
    first = _git(repo, "rev-parse", "HEAD")
    assert checkout_version(repo) == f"0.1.0.dev1+g{first[:9]}"
    (repo / "pyproject.toml").write_text((repo / "pyproject.toml").read_text() + "# edited\n")
    assert checkout_version(repo) == f"0.1.0.dev1+g{first[:9]}.d20260101"
    (repo / "untracked.py").write_text("")  # untracked files do not make a tree dirty
    _git(repo, "commit", "-q", "-am", "two")
    _git(repo, "tag", "v0.2.0")
    assert checkout_version(repo) == "0.2.0"
    (repo / "pyproject.toml").write_text((repo / "pyproject.toml").read_text() + "# again\n")
    _git(repo, "commit", "-q", "-am", "three")
    third = _git(repo, "rev-parse", "HEAD")
    assert checkout_version(repo) == f"0.2.1.dev1+g{third[:9]}"
    _git(repo, "tag", "maskworks-1.0.0rc1")
    assert checkout_version(repo) == "1.0.0rc1"


def test_no_checkout_or_no_git_falls_back_quietly(tmp_path, monkeypatch):
    assert checkout_version(tmp_path) is None  # a tarball's copy: the installed metadata answers
    (tmp_path / ".git").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    assert checkout_version(tmp_path) is None  # not a repository git can read
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert checkout_version(ROOT) is None  # no git at all
    out = subprocess.run([sys.executable, "-c", "import maskworks; print(maskworks.__version__)"],
                         capture_output=True, text=True, env={"PATH": "", "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
