#!/bin/sh
# Install the maskworks environment ENV (core, monai, cryoet, deepcell, scverse, gpu/core, gpu/cryoet) into the
# Python that runs it: exactly the pip pins of envs/ENV.yaml (its whole closure, --no-deps), then
# maskworks itself from this source, then `pip check`.  The Dockerfile runs it; so does
# tests/unit/test_containers.py, in a clean venv.  Run from the build context (the repository root or
# a copy of pyproject.toml, README.md, src/, scripts/, envs/, containers/).
#   PYTHON=/path/to/python sh containers/install.sh core
set -eu
env="${1:?usage: install.sh ENV (core | monai | cryoet | deepcell | scverse | gpu/core | gpu/cryoet)}"
py="${PYTHON:-python}"
case "$env" in
  gpu/deepcell) echo "install.sh: gpu/deepcell needs conda's CUDA 11.2 + cuDNN 8.1 (envs/gpu/deepcell.yaml): use --sdm conda" >&2; exit 2 ;;
esac
test -f "envs/$env.yaml" || { echo "install.sh: no envs/$env.yaml" >&2; exit 2; }
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
"$py" scripts/env_constraints.py "envs/$env.yaml" > "$pins"
"$py" -m pip install --no-cache-dir --no-deps -r "$pins"
"$py" -m pip install --no-cache-dir --no-deps .
"$py" -m pip check
"$py" -m maskworks.cli --version
