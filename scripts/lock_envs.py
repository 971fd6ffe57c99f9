"""Pin every conda env (envs/*.yaml, envs/gpu/*.yaml) to the stack the tests ran: `make lock`.

Each env's pip section becomes the exact closure of its pyproject extras as installed in the venv
that runs that env's code in the tests (.venv, .venv-cryoet, .venv-deepcell, .venv-scverse): every distribution
the extras need, transitively, with the environment markers of that venv (Linux x86-64), pinned
``name==version`` (a local label such as torch's ``+cpu`` dropped).  Python and pip are pinned
``=x.y.z`` from conda-forge, at the venv's versions.  What the venv cannot hold -- CuPy (needs
CUDA), the CUDA wheels of PyPI's torch (the tests ran its CPU wheel), conda's CUDA libraries --
keeps the exact pin written in the env file (and is removed from it by hand).  maskworks itself
and editable installs are never pinned; ``${MASKWORKS_SOURCE}`` stays the last pip entry, and
each file keeps its header comment.

    .venv/bin/python scripts/lock_envs.py [ENV ...]           # rewrite (ENV: core.yaml, gpu/core.yaml, ...)
    .venv/bin/python scripts/lock_envs.py --check [ENV ...]   # exit 1 listing what differs
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tomllib
import yaml
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
ENVS_DIR = ROOT / "envs"
SOURCE_ENTRY = "${MASKWORKS_SOURCE}"


@dataclass(frozen=True)
class Lock:
    venv: str  # the venv that runs this env's code in the tests, relative to the checkout
    extras: tuple[str, ...]  # pyproject extras installed there, pinned from it
    by_hand: tuple[str, ...] = ()  # pyproject extras the venv cannot hold (CuPy needs CUDA): pinned in the file
    # pip entries the venv does not hold stay as written: the closure of by_hand, or torch's CUDA wheels
    keeps_unheld: bool = False


ENVS = {
    "core.yaml": Lock(".venv", ("core",)),
    # the tests ran torch's CPU wheel: the CUDA wheels PyPI's torch brings on Linux are pinned in the file
    "monai.yaml": Lock(".venv", ("core", "unet", "instanseg"), keeps_unheld=True),
    "gpu/core.yaml": Lock(".venv", ("core",), by_hand=("gpu",), keeps_unheld=True),
    "cryoet.yaml": Lock(".venv-cryoet", ("cryoet",)),
    "gpu/cryoet.yaml": Lock(".venv-cryoet", ("cryoet",), by_hand=("gpu",), keeps_unheld=True),
    "deepcell.yaml": Lock(".venv-deepcell", ("deepcell",)),
    # + cudatoolkit and cudnn from conda-forge, kept from the file
    "gpu/deepcell.yaml": Lock(".venv-deepcell", ("deepcell",)),
    # spatialdata 0.8 (Python 3.12); no GPU variant: the SpatialData store is written on the CPU
    "scverse.yaml": Lock(".venv-scverse", ("core", "scverse")),
}
SETUP = {".venv": "make setup", ".venv-cryoet": "make setup-cryoet", ".venv-deepcell": "make setup-deepcell",
         ".venv-scverse": "make setup-scverse"}

# Runs inside the venv (any Python >= 3.8 with pip): the installed closure of the requirements in argv[1].
CLOSURE = r"""
import json, platform, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

pins, skipped, errors, done = {}, {}, [], set()
roots = [Requirement(r) for r in json.loads(sys.argv[1])]
todo = [(str(r), "pyproject extras") for r in roots if r.marker is None or r.marker.evaluate({"extra": ""})]
while todo:
    text, needed_by = todo.pop()
    req = Requirement(text)
    name = canonicalize_name(req.name)
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        errors.append(f"{req} (needed by {needed_by}) is not installed")
        continue
    if not req.specifier.contains(dist.version, prereleases=True):
        errors.append(f"{req} (needed by {needed_by}): {dist.version} is installed")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if name == "maskworks" or direct.get("dir_info", {}).get("editable"):
        skipped[name] = dist.version
    else:
        pins[name] = dist.version.split("+")[0]
    for extra in ["", *sorted(req.extras)]:
        if (name, extra) in done:
            continue
        done.add((name, extra))
        for dep in dist.requires or []:
            marker = Requirement(dep).marker
            if marker is None and extra == "" or marker is not None and marker.evaluate({"extra": extra}):
                todo.append((dep, name if not extra else f"{name}[{extra}]"))
print(json.dumps({"python": platform.python_version(), "pip": metadata.version("pip"), "pins": pins,
                  "skipped": skipped, "errors": errors}))
"""


def extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def installed_closure(lock: Lock) -> dict:
    """Python, pip and the pinned closure of ``lock.extras`` in its venv."""
    python = ROOT / lock.venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{lock.venv} does not exist: `{SETUP[lock.venv]}` builds it (the stack the tests run)")
    requirements = [r for e in lock.extras for r in extras()[e]]
    proc = subprocess.run([python, "-c", CLOSURE, json.dumps(requirements)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{python} could not list its installed closure:\n{proc.stderr}")
    found = json.loads(proc.stdout)
    if found["errors"]:
        raise SystemExit(f"{lock.venv} does not hold pyproject extras {list(lock.extras)}: "
                         + "; ".join(found["errors"]) + f" -- run `{SETUP[lock.venv]}`")
    return found


def _entry_name(entry: str) -> str:
    return canonicalize_name(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", entry)[1])


def locked_text(env_file: str, found: dict) -> str:
    """The env file with its dependencies pinned to ``found``; its header comment, its channels, the
    conda entries it pins by hand (CUDA libraries) and, where ``keeps_unheld``, the pip entries the
    venv does not hold (CuPy and its dependencies, torch's CUDA wheels) stay as written."""
    path = ENVS_DIR / env_file
    text = path.read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    env = yaml.safe_load(text)
    conda, pip = [], []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip = [str(p) for p in dep.get("pip", [])]
        elif _entry_name(dep) not in ("python", "pip", *found["pins"]):  # what the venv holds comes from PyPI
            conda.append(dep)
    lock = ENVS[env_file]
    hand = [p for p in pip if p != SOURCE_ENTRY and _entry_name(p) not in found["pins"]] if lock.keeps_unheld else []
    missing = {_entry_name(r) for e in lock.by_hand for r in extras()[e]} - {_entry_name(p) for p in hand}
    if missing:
        raise SystemExit(f"envs/{env_file}: pin {sorted(missing)} by hand (name==x.y.z in its pip section, with "
                         f"their own dependencies): {lock.venv} cannot hold them")
    pins = {**{n: f"{n}=={v}" for n, v in found["pins"].items()}, **{_entry_name(p): p for p in hand}}
    lines = [*header, "channels:", *[f"  - {c}" for c in env["channels"]], "dependencies:",
             f"  - python={found['python']}", f"  - pip={found['pip']}", *[f"  - {c}" for c in conda],
             "  - pip:", *[f"      - {pins[n]}" for n in sorted(pins)], f"      - {SOURCE_ENTRY}"]
    return "\n".join(lines) + "\n"


def differences(old: str, new: str) -> list[str]:
    def entries(text):
        env = yaml.safe_load(text)
        out = {}
        for dep in env["dependencies"]:
            for item in dep["pip"] if isinstance(dep, dict) else [dep]:
                out[_entry_name(item) if item != SOURCE_ENTRY else item] = item
        return out

    before, after = entries(old), entries(new)
    lines = [f"  {before[n]} -> {after[n]}" for n in sorted(before.keys() & after.keys()) if before[n] != after[n]]
    lines += [f"  + {after[n]}" for n in sorted(after.keys() - before.keys())]
    lines += [f"  - {before[n]}" for n in sorted(before.keys() - after.keys())]
    if not lines and old != new:
        lines.append("  (same pins, other text: layout or order)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("envs", nargs="*", metavar="ENV", help=f"env files under envs/ (default: all: {', '.join(ENVS)})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 listing what differs")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.envs) - set(ENVS))
    if unknown:
        parser.error(f"unknown env file(s) {unknown}; expected some of {list(ENVS)}")
    stale = []
    for env_file in args.envs or ENVS:
        lock = ENVS[env_file]
        found = installed_closure(lock)
        for name, version in sorted(found["skipped"].items()):
            if name != "maskworks":
                print(f"envs/{env_file}: {name} {version} is an editable install in {lock.venv}: not pinned",
                      file=sys.stderr)
        path = ENVS_DIR / env_file
        old, new = path.read_text(), locked_text(env_file, found)
        if old == new:
            continue
        if args.check:
            stale.append(f"envs/{env_file} differs from {lock.venv} (env file -> venv):")
            stale += differences(old, new)
        else:
            path.write_text(new)
            print(f"envs/{env_file}: pinned {len(found['pins'])} packages from {lock.venv}")
    if stale:
        print("\n".join([*stale, "`make lock` rewrites the env files from the venvs."]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
