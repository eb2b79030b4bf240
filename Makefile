# aim-platform: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (it lies on this machine's disk); on a CUDA machine, e.g.
#   make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.setup-done
PYTEST_ARGS ?=
# `make test` runs the suite in this many pytest processes (pytest-xdist), whole files each: a
# file's journeys keep their order and module fixtures; each process starts its own Ray. Files
# go out heaviest first (tests/conftest.py: HEAVY_FIRST), not xdist's most-tests-first.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: setup demo test test-faults test-fast lint doctor clean

setup: $(STAMP)
	@bash infra/pillow_simd.sh --check $(PY)

$(STAMP): pyproject.toml Makefile infra/pillow_simd.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	bash infra/pillow_simd.sh $(PY)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/aimctl selfcheck --steps 20
	$(VENV)/bin/aimctl pretrain jobs/configs/demo.yaml

test: setup
	$(PY) -m pytest $(XDIST) --durations=15 -m "not faults" $(PYTEST_ARGS)

# The heaviest fault journeys (S3 through the fault proxy: about 8 minutes), outside `make test`.
test-faults: setup
	$(PY) -m pytest $(XDIST) --durations=15 -m faults $(PYTEST_ARGS)

# The fast lane: no Ray, no servers, no slow tests (a few minutes); `make test` runs all.
test-fast: setup
	AIM_TEST_FAST=1 $(PY) -m pytest -m "not slow and not cluster" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check platform tests jobs

doctor: setup
	$(VENV)/bin/aimctl doctor

clean:
	rm -rf $(VENV) .pytest_cache
