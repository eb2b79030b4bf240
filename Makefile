# aim-platform: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Every install takes its versions from one lock (pip constraints): `make setup`, the
# Dockerfile and CI (.ci/run -> make test). `make lock` regenerates it after a change to
# pyproject.toml's dependencies (LOCK_ARGS=--upgrade: newest of everything that fits).
LOCK := infra/constraints.txt
LOCK_ARGS ?=
SETUP_EXTRAS := dev,server
# torch: TORCH_BUILD=cpu (the default without a GPU; the CPU wheel, which pip also finds on a
# machine's local disk) or cuda (the default where `nvidia-smi -L` lists a GPU: the CUDA wheel
# from TORCH_CUDA_INDEX, its CUDA libraries from PyPI). Switching an existing .venv from cuda
# back to cpu: `make clean setup`. TORCH_SPEC/TORCH_INDEX still override both, e.g.
#   make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_VERSION ?= 2.13.0
TORCH_BUILD ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
TORCH_CUDA ?= cu128
TORCH_CUDA_INDEX ?= https://download.pytorch.org/whl/$(TORCH_CUDA)
ifeq ($(TORCH_BUILD),cuda)
TORCH_SPEC ?= torch==$(TORCH_VERSION)+$(TORCH_CUDA)
TORCH_INDEX ?= $(TORCH_CUDA_INDEX)
else ifeq ($(TORCH_BUILD),cpu)
TORCH_SPEC ?= torch==$(TORCH_VERSION)
TORCH_INDEX ?=
else
$(error TORCH_BUILD=$(TORCH_BUILD): use cpu or cuda)
endif
STAMP := $(VENV)/.setup-done
# Which torch build the venv was set up with: choosing another re-runs the set-up.
TORCH_STAMP := $(VENV)/.torch-$(TORCH_BUILD)
PYTEST_ARGS ?=
# `make test` runs the suite in this many pytest processes (pytest-xdist), whole files each: a
# file's journeys keep their order and module fixtures; each process starts its own Ray. Files
# go out heaviest first (tests/conftest.py: HEAVY_FIRST), not xdist's most-tests-first.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: setup demo test test-faults test-fast lint doctor clean lock

setup: $(STAMP)
	@bash infra/pillow_simd.sh --check $(PY)

# torch first, with pip (from TORCH_INDEX without its dependencies, which come from PyPI with
# the rest, pinned by the lock; pip also finds the CPU wheel on a machine's local disk), then uv
# (itself pinned by the lock), which installs the package and every dependency the lock pins:
# about 35 s where pip takes 2.5 min on a fresh 2-core machine (CI's set-up). uv keeps the torch
# just installed (it satisfies the lock's torch==...). Both compile the bytecode as they install:
# where PYTHONDONTWRITEBYTECODE is set (as on the development box) nothing else would, and every
# Ray worker would compile torch, Ray and MLflow again at each import (journeys 2-2.5x as long).
# Then the Pillow-SIMD swap, last.
$(STAMP): pyproject.toml Makefile infra/pillow_simd.sh $(LOCK) $(TORCH_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--no-deps --index-url $(TORCH_INDEX),-c $(LOCK)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(LOCK) uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -c $(LOCK) -e ".[$(SETUP_EXTRAS)]"
	bash infra/pillow_simd.sh $(PY)
	touch $(STAMP)

$(TORCH_STAMP):
	mkdir -p $(VENV) && rm -f $(VENV)/.torch-* && touch $@

# Regenerate the lock from pyproject.toml (pip resolves without installing); then `make setup`.
lock:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) infra/lock.py --torch "torch==$(TORCH_VERSION)" $(LOCK_ARGS)

demo: setup
	$(VENV)/bin/aimctl selfcheck --steps 20
	$(VENV)/bin/aimctl pretrain jobs/configs/demo.yaml

test: setup
	$(PY) -m pytest $(XDIST) --durations=15 -m "not faults" $(PYTEST_ARGS)

# The fault journeys (each restarts, kills or stops something: minutes each), outside `make test`.
test-faults: setup
	$(PY) -m pytest $(XDIST) --durations=15 -m faults $(PYTEST_ARGS)

# The fast lane: no Ray, no servers, no slow tests (a few minutes); `make test` runs all.
test-fast: setup
	AIM_TEST_FAST=1 $(PY) -m pytest -m "not slow and not cluster" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check platform tests jobs infra

doctor: setup
	$(VENV)/bin/aimctl doctor

clean:
	rm -rf $(VENV) .pytest_cache
