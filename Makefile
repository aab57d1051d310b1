# Two commands do everything on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Nothing phones home: these switches are exported to every recipe (dvc, mlflow, prefect, pytest).
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_UI_ENABLED ?= false
export HF_HUB_OFFLINE := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

# `make stack` / `make stack-down`: the team stack (see README "Team setup"), then `source .slotcon/stack.env`.
.PHONY: setup stack stack-down stack-status demo test test-fast bench gpu-check clean-outputs baseline compare promote

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision first and pinned: pip takes the wheels from this machine's disk (a CUDA build).
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev,stack]'
	touch $(STAMP)

stack: setup
	$(BIN)/python -m components stack up

stack-down:
	$(BIN)/python -m components stack down

stack-status:
	$(BIN)/python -m components stack status

# The main job on the embedded default: generated scenes -> shards -> SlotCon -> downstream, through the Prefect flow
# (which runs each DVC stage in order and records everything in MLflow).
# Ephemeral Prefect (no server, nothing scheduled): PREFECT_HOME in the repo, PREFECT_API_URL unset. With the team
# stack's env sourced (PREFECT_API_URL, MLFLOW_TRACKING_URI set) the flow run goes to its servers instead.
demo: setup
	if [ -n "$$PREFECT_API_URL" ]; then $(BIN)/python -m pipelines.flow; else \
	  env -u PREFECT_API_URL PREFECT_HOME=$(CURDIR)/.prefect PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180 \
	  $(BIN)/python -m pipelines.flow; fi

test: setup
	$(BIN)/python -m pytest -q tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not ddp" tests

bench: setup
	$(BIN)/python benchmarks/shard_throughput.py
	$(BIN)/python benchmarks/pretrain_throughput.py

# On a machine with a CUDA GPU: pytest -m gpu, pretraining/detection/segmentation throughput, nvJPEG; one JSON + table
# (<= 8 minutes on one H100/H200). `python benchmarks/gpu_check.py --dry-run` rehearses it on a CPU.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py --json gpu_check.json

clean-outputs:
	rm -rf data/scenes data/raw data/shards models metrics plots

# Commit the current results as the baseline that `dvc metrics diff` and `dvc exp show` compare with (after `make
# demo` or a `dvc repro`): dvc.lock, params.yaml and the git-tracked metrics and plots (cache: false outputs). With a
# DVC remote (the team stack's), `dvc push` then lets a fresh clone `dvc pull` and find `dvc repro` a no-op.
baseline:
	git add dvc.lock params.yaml metrics plots
	git commit -m "baseline: pipeline results of $$(git rev-parse --short HEAD)" -- dvc.lock params.yaml metrics plots
	@echo "baseline committed: compare variants with 'make compare' (dvc exp show) and 'dvc metrics diff'"

# The readable experiments table: headline metrics and the params that differ, one row per experiment.
compare: setup
	$(BIN)/dvc exp show --only-changed --drop 'Created|State|Executor' --md

# Move @champion to the newest exported backbone (@candidate) if its downstream figures beat the champion's.
promote: setup
	$(BIN)/python -m pipelines.registry promote
