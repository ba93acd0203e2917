# The two commands in the README: `make run` and `make test`. Both set up .venv on first use.
# For development: `make test-fast` (unit tests, no Ray cluster, < 2 min) and `make lint` (ruff).
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export RAY_DATA_DISABLE_PROGRESS_BARS ?= 1
export WANDB_MODE ?= offline

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, from the machine's local CPU wheel; the range in pyproject keeps pip from pulling a CUDA build.
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/llmos pretrain

test: install
	$(PY) -m pytest -x -q --durations=25 tests

test-fast: install
	LLMOS_TEST_FAST=1 $(PY) -m pytest -x -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check .

.PHONY: install run test test-fast lint
