# expertmesh: `make demo` runs the main job, `make test` runs the tests.
# Both create/refresh .venv first (`make setup` does only that).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Machines without an NVIDIA GPU get the CPU build of torch (2.13.0 lies on local disk on our
# CI and developer machines); GPU machines get the default (CUDA) build.
TORCH  ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo "torch>=2.4"; else echo "torch==2.13.0"; fi)

.PHONY: setup demo demo-real test test-fast bench bench-soak bench-train bench-store-10m eval eval-realtext eval-realtext-quick data-text data-demo-v2 \
        train-demo-model train-demo-model-v2 train-demo-model-cpu clean

setup: $(VENV)/.ready
	@scripts/install-test-packages.sh  # system packages of some tests (prometheus, chromium), where root with apt-get

$(VENV)/.ready: pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -c constraints.txt -e ".[test,eval]"
	touch $@

demo: setup
	$(PY) -m expertmesh.cli demo

# a real trained model: SmolLM2-135M-Instruct from PyPI, upcycled to 4 experts (cached), over a shared document
demo-real: setup
	$(PY) -m expertmesh.cli demo --real

# two pytest workers (pytest-xdist), a module per worker at a time in collection order (handing the
# longest modules out first ran them together: 20 min 23 s against 17 min 46 s); each worker has its
# own Ray cluster. PYTEST_WORKERS=0: one process, one cluster.
PYTEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadscope --durations=15 tests

test-fast: setup
	$(PY) -m pytest -q tests/model

# the chaos soak: streaming clients through faults on a cluster of network-namespace hosts (root; --minutes)
bench-soak: setup
	$(PY) benchmarks/bench_soak.py --minutes 10

# every benchmark (~15 min here), then the tables of README.md and docs/ from their results files
bench: setup
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_user_path.py
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_store.py
	$(PY) benchmarks/bench_dataplane.py
	$(PY) benchmarks/bench_elastic.py
	$(PY) benchmarks/bench_routers.py
	$(PY) benchmarks/bench_shared_store.py
	$(PY) benchmarks/kv_sizes.py
	$(PY) benchmarks/bench_serving_features.py
	$(PY) benchmarks/readme_tables.py

# the 10M-token store run (~25 min here) and its 1M counterpart (docs/benchmarks.md, "Context store")
bench-store-10m: setup
	$(PY) benchmarks/bench_store.py --tenm --depths 0.5 --kv-dtype bfloat16
	$(PY) benchmarks/bench_store.py --tenm --tokens 1000000 --depths 0.5 --kv-dtype bfloat16 \
	    --out benchmarks/results/store_1m_memory.json
	$(PY) benchmarks/readme_tables.py

bench-train: setup
	$(PY) benchmarks/bench_train.py

# retrieval accuracy of the built-in model on held-out text (docs/training.md, "The built-in model"): ~15 min here
eval: setup
	PY=$(PY) scripts/eval_realtext.sh record builtin
	$(PY) benchmarks/readme_tables.py

# retrieval on held-out real text (Debian packages named with versions; issue 13's targets):
# every cell of benchmarks/results/eval_realtext_$(EVAL_NAME)_*.json names its text source
EVAL_NAME ?= after
eval-realtext: setup
	PY=$(PY) scripts/eval_realtext.sh full $(EVAL_NAME)

eval-realtext-quick: setup
	PY=$(PY) scripts/eval_realtext.sh quick $(EVAL_NAME)

# the real text for training and evaluation: pinned Debian packages -> data/text (apt-get download)
data-text: setup
	$(PY) -m expertmesh.cli data --fetch-text --text train,heldout --text-cache data/text

# the training data of the built-in model v2 (real text, random lengths, eos after the answer)
data-demo-v2: data-text
	PY=$(PY) WORKERS=$$(nproc) scripts/train_demo_model_v2.sh data

# the recorded commands that train the built-in model v2 (on a GPU host; data/text fetched first)
train-demo-model-v2: setup
	for s in data 1 2 3 install; do PY=$(PY) scripts/train_demo_model_v2.sh $$s; done

# one round of the built-in model's CPU training (docs/training.md): ROUND_S seconds of training from the
# training state in STATE_DIR (outside the repository), then a held-out point of its learning curve.
# First run (STATE_DIR empty): the round starts from the installed model (step 0); to continue the
# recorded rounds, first `STATE_DIR=... scripts/train_demo_model_cpu.sh restore` (a full clone's history).
ROUND_S ?= 1200
STATE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/expertmesh/demo-model-cpu/state
train-demo-model-cpu: setup data-text
	PY=$(PY) STATE_DIR="$(STATE_DIR)" scripts/train_demo_model_cpu.sh round $(ROUND_S)

# the recorded command that trained expertmesh/assets/default-model (on a GPU host)
train-demo-model: setup
	for r in 1 2 3; do PY=$(PY) scripts/train_demo_model.sh $$r; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
