# expertmesh: `make demo` runs the main job, `make test` runs the tests.
# Both create/refresh .venv first (`make setup` does only that).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Machines without an NVIDIA GPU get the CPU build of torch (2.13.0 lies on local disk on our
# CI and developer machines); GPU machines get the default (CUDA) build.
TORCH  ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo "torch>=2.4"; else echo "torch==2.13.0"; fi)

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

demo: setup
	$(PY) -m expertmesh.cli demo

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests/model

bench: setup
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
