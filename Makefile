# leverlm — run `make help` for the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Pinned so pip never picks another torch; override for your own CUDA build, e.g.
#   make install TORCH_PINS="torch==2.11.0 torchvision==0.26.0"
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.install.stamp
RUNS ?= runs
DEMO_DIR ?= $(RUNS)/demo
# Offline by default: nothing waits on a network that is not there.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
# Extra arguments for the pipeline targets, e.g. make train ARGS="--trainer.max_epochs 5"
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint format demo demo-models gt-data train eval report bench clean

help: ## show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[dev,flamingo]' $(TORCH_PINS)
	$(PIP) install -q --no-deps 'open-flamingo==2.0.1' || echo "note: open-flamingo extra not installed (see README)"
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install leverlm (idempotent)

test: install ## run the test suite
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install ## the unit tests only (no end-to-end job runs), under a minute
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install ## ruff check + format check
	$(VENV)/bin/ruff check src tests tools
	$(VENV)/bin/ruff format --check src tests tools

format: install ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests tools
	$(VENV)/bin/ruff format src tests tools

demo: install ## the whole pipeline on the embedded easy-vqa set (CPU, minutes)
	$(VENV)/bin/leverlm demo --out $(DEMO_DIR) $(ARGS)

# The demo's own small models (a CLIP and an in-context Idefics3), committed under
# src/leverlm/assets/demo: this retrains them from the embedded data (CPU, ~15 min).
DEMO_MODELS_OUT ?= src/leverlm/assets/demo
demo-models: install ## retrain the demo's CLIP and LVLM (writes src/leverlm/assets/demo) [ARGS=]
	$(VENV)/bin/leverlm prep easyvqa --out $(DEMO_DIR)/data
	$(PY) -m tools.demo_models all --out $(DEMO_MODELS_OUT) --data $(DEMO_DIR)/data $(ARGS)

# Pipeline steps. Without CONFIG they run on the demo's easy-vqa set under $(DEMO_DIR) (each
# step prepares what it needs); with CONFIG they run that config, e.g.
#   make gt-data CONFIG=experiments/vqav2/gt_idefics.yaml ARGS="--trainer.devices 8"
CONFIG ?=
gt-data: install ## ground-truth ICD sequences (LVLM beam search) [CONFIG=, ARGS=]
ifeq ($(CONFIG),)
	$(VENV)/bin/leverlm demo --out $(DEMO_DIR) --steps prep,models,features,gt --gt_args "$(ARGS)"
else
	$(VENV)/bin/leverlm gt predict --config $(CONFIG) $(ARGS)
endif

train: install ## train Lever-LM on the gt data [CONFIG=, ARGS=]
ifeq ($(CONFIG),)
	$(VENV)/bin/leverlm demo --out $(DEMO_DIR) --steps prep,models,features,gt,train --train_args "$(ARGS)"
else
	$(VENV)/bin/leverlm train fit --config $(CONFIG) $(ARGS)
endif

eval: install ## in-context evaluation of Lever-LM vs the baselines, prints the table [CONFIG=, ARGS=]
ifeq ($(CONFIG),)
	$(VENV)/bin/leverlm demo --out $(DEMO_DIR) --eval_args "$(ARGS)"
else
	$(VENV)/bin/leverlm eval predict --config $(CONFIG) $(ARGS)
endif

report: install ## tables and plot of eval results, written beside them: make report RESULTS=dir [OUT=dir]
	$(VENV)/bin/leverlm report $(or $(RESULTS),$(DEMO_DIR)/eval) $(if $(OUT),--out $(OUT))

bench: install ## benchmarks: fast paths vs reference paths, ratios in one run
	$(VENV)/bin/leverlm bench $(ARGS)

clean: ## remove run outputs (keeps .venv)
	rm -rf $(RUNS) .pytest_cache .ruff_cache
