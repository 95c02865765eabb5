# Two commands from a fresh clone: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-scale test-fast

install: $(STAMP)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_modules.fit --config configs/demo.yaml

# The suite on both cores (pytest-xdist), all but the multi-process runs (make test-scale).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not scale"

# The multi-process runs: every method under FSDP / DDP / DeepSpeed, 1-vs-N-process equality, and the
# fault, pre-emption and cluster scenarios (ranks killed, hung or out of memory, Slurm requeues,
# sharded checkpoints cut mid-write); CI runs them after `make test`.
test-scale: $(STAMP)
	$(PY) -m pytest -q -n 2 -m scale

# Everything that does not train, generate or spawn, on both cores (≤ 90 s on a 2-core laptop).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2
