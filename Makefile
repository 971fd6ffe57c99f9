# maskworks: everything a fresh clone needs is installed from here (no hand installs).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
VENV_DC     := .venv-deepcell
VENV_CRYOET := .venv-cryoet
VENV_PEERS  := .venv-peers
VENV_SCVERSE := .venv-scverse
PY          := $(VENV)/bin/python
PY311       ?= $(shell command -v python3.11 || command -v python3)
# deepcell 0.12.10 needs Python < 3.11; pyenv keeps 3.10 out of PATH on some machines.
PY310       ?= $(shell for p in $$HOME/.pyenv/versions/3.10*/bin/python3.10 $$(command -v python3.10); do \
                 "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null && { echo "$$p"; break; }; done)
# spatialdata 0.8 needs Python 3.12 (.venv-scverse); the resolver test installs maskworks[core] beside the
# current scverse stack there too, dry-run.
PY312       ?= $(shell for p in $$HOME/.pyenv/versions/3.12*/bin/python3.12 $$(command -v python3.12); do \
                 "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
NGPU        := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NGPU        := $(if $(NGPU),$(NGPU),0)
DEMO_DIR    ?= demo_data
PYTEST_ARGS ?=

.PHONY: help setup setup-deepcell setup-cryoet setup-scverse setup-peers slurm-packages demo test test-peers lint lock bench clean

help:
	@echo "make demo    set up .venv, make synthetic data in $(DEMO_DIR)/, run the workflow on it"
	@echo "make test    set up the venvs and run the whole test suite (pytest in .venv, then the copick tests in .venv-cryoet and the SpatialData tests in .venv-scverse)"
	@echo "make test-peers  differential tests against SABER 1.0.1 and MemBrain-seg 0.0.10 (own venv; not in make test)"
	@echo "make lint    ruff + snakefmt --check + snakemake --lint"
	@echo "make lock    pin envs/*.yaml exactly to the stacks the tests run (the venvs); scripts/lock_envs.py --check compares"
	@echo "make container-core  an image of one environment (core, monai, cryoet, deepcell, gpu-core, gpu-cryoet) for --sdm apptainer"
	@echo "make bench   benchmarks in bench/ (ratios against a baseline measured in the same run)"
	@echo "make clean   remove results, logs, demo data and caches (not the venvs)"

setup: $(VENV)/.stamp

# Each venv is installed within the exact pins of the conda env its code runs in on clusters
# (envs/*.yaml, `make lock`), so the tests run the stacks the clusters' envs pin.
$(VENV)/.stamp: pyproject.toml envs/monai.yaml
	@test -x $(PY) || $(PY311) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY311) scripts/env_constraints.py envs/monai.yaml > $(VENV)/constraints.txt
	$(PY) -m pip install -q -e '.[core,unet,instanseg,workflow,dev,ecosystem]' -c $(VENV)/constraints.txt
	@touch $@

# copick 1.31 needs zarr 2: the copick rules (refine_membranes, copick_runs) run here (envs/cryoet.yaml
# on clusters), and so do the tests that use copick itself (marker `copick`).
setup-cryoet: $(VENV_CRYOET)/.stamp

$(VENV_CRYOET)/.stamp: pyproject.toml envs/cryoet.yaml
	@test -x $(VENV_CRYOET)/bin/python || $(PY311) -m venv $(VENV_CRYOET)
	$(VENV_CRYOET)/bin/python -m pip install -q --upgrade pip
	$(PY311) scripts/env_constraints.py envs/cryoet.yaml > $(VENV_CRYOET)/constraints.txt
	$(VENV_CRYOET)/bin/python -m pip install -q -e '.[cryoet,dev]' -c $(VENV_CRYOET)/constraints.txt
	@touch $@

setup-deepcell: $(VENV_DC)/.stamp

$(VENV_DC)/.stamp: pyproject.toml envs/deepcell.yaml
	@test -n "$(PY310)" || { echo "Python 3.10 not found (deepcell 0.12.10 needs Python < 3.11); set PY310=/path/to/python3.10" >&2; exit 1; }
	@test -x $(VENV_DC)/bin/python || $(PY310) -m venv $(VENV_DC)
	$(VENV_DC)/bin/python -m pip install -q --upgrade pip
	$(PY311) scripts/env_constraints.py envs/deepcell.yaml > $(VENV_DC)/constraints.txt
	$(VENV_DC)/bin/python -m pip install -q -e '.[deepcell]' -c $(VENV_DC)/constraints.txt
	@touch $@

# spatialdata 0.8 needs Python 3.12 (and anndata 0.13, zarr 3): the SpatialData store of a quantified slide
# (rule spatialdata, `maskworks write-spatialdata`) is written here (envs/scverse.yaml on clusters), and the
# tests that use spatialdata run here (marker `scverse`).
setup-scverse: $(VENV_SCVERSE)/.stamp

$(VENV_SCVERSE)/.stamp: pyproject.toml envs/scverse.yaml
	@test -n "$(PY312)" || { echo "Python 3.12 not found (spatialdata 0.8 needs it); set PY312=/path/to/python3.12" >&2; exit 1; }
	@test -x $(VENV_SCVERSE)/bin/python || $(PY312) -m venv $(VENV_SCVERSE)
	$(VENV_SCVERSE)/bin/python -m pip install -q --upgrade pip
	$(PY311) scripts/env_constraints.py envs/scverse.yaml > $(VENV_SCVERSE)/constraints.txt
	$(VENV_SCVERSE)/bin/python -m pip install -q -e '.[core,scverse,dev]' -c $(VENV_SCVERSE)/constraints.txt
	@touch $@

# Slurm 22.05 + munge from Debian for tests/slurm (root + apt-get); without them that test
# is skipped with a loud message.
slurm-packages:
	@tests/slurm/slurm.sh install || echo "!!! Slurm packages could not be installed: the real Slurm test will be skipped !!!" >&2

demo: setup setup-cryoet
	$(VENV)/bin/maskworks demo-data $(DEMO_DIR)
	$(VENV_CRYOET)/bin/maskworks demo-data $(DEMO_DIR) --arms copick
	$(VENV)/bin/snakemake --profile profiles/local --configfile config/demo.yaml --resources gpu=$(NGPU)
	@$(PY) -m maskworks.cli demo-summary --results results

test: setup setup-deepcell setup-cryoet setup-scverse slurm-packages
	PY312=$(PY312) $(PY) -m pytest --ignore=tests/peers -m "not copick and not scverse" $(PYTEST_ARGS)
	$(VENV_CRYOET)/bin/python -m pytest --ignore=tests/peers -m copick $(PYTEST_ARGS)
	$(VENV_SCVERSE)/bin/python -m pytest --ignore=tests/peers -m scverse $(PYTEST_ARGS)

# The published tools maskworks is compared with, for understanding and comparison only:
# installed with --no-deps plus what they import, never vendored.
setup-peers: $(VENV_PEERS)/.stamp

$(VENV_PEERS)/.stamp: Makefile
	@test -x $(VENV_PEERS)/bin/python || $(PY311) -m venv $(VENV_PEERS)
	$(VENV_PEERS)/bin/python -m pip install -q --no-deps saber-em==1.0.1 membrain-seg==0.0.10
	$(VENV_PEERS)/bin/python -m pip install -q torch==2.13.0 numpy scipy tqdm SimpleITK mrcfile typer click scikit-image monai
	@touch $@

test-peers: setup setup-peers
	$(PY) -m pytest -s tests/peers $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src scripts tests bench
	$(VENV)/bin/snakefmt --check Snakefile rules
	$(VENV)/bin/snakemake --lint --configfile config/demo.yaml

# The conda envs pinned to the closure of their pyproject extras as installed in the venvs the tests
# run (python, pip and CUDA libraries from conda-forge, the rest from PyPI); CuPy and torch's CUDA
# wheels, which the venvs cannot hold, keep the pins written in the env files.
lock: setup setup-cryoet setup-deepcell setup-scverse
	$(PY) scripts/lock_envs.py

# An image per environment (containers/Dockerfile; README: Containers), e.g. `make container-core`,
# `make container-gpu-core`; needs Docker (or Podman: DOCKER=podman) and PyPI.
DOCKER ?= docker
container-%: setup
	v=$$($(PY) -c 'import maskworks; print(maskworks.__version__)') && \
	$(DOCKER) build -f containers/Dockerfile --build-arg ENV=$(subst gpu-,gpu/,$*) \
	  --build-arg PYTHON=$(if $(findstring deepcell,$*),3.10,$(if $(findstring scverse,$*),3.12,3.11)) --build-arg VERSION=$$v \
	  -t maskworks-$*:$$(echo $$v | tr + -) .

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf results logs benchmarks $(DEMO_DIR) .snakemake .pytest_cache report.zip
