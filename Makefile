# Two commands do all the set-up on a fresh machine:
#   make run    create .venv, install the pinned packages, run the whole study (mlflow run .)
#   make test   create .venv, install the pinned packages, run the test suite
# Offline, MNIST is read from ../shared/datasets when it is there (override: DATA_DIR=...).

VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
DATA_DIR ?= $(if $(wildcard ../shared/datasets/MNIST/raw),../shared/datasets,data)
EXPERIMENT ?= mnist-mlp
PORT ?= 5000
# `mlflow run` runs each stage's `python -m pipeline ...` with the python on PATH.
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup run test test-fast ui bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: setup
	$(BIN)/mlflow run . --env-manager local --experiment-name $(EXPERIMENT) -P data_dir=$(DATA_DIR) $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port $(PORT)

bench: setup
	$(BIN)/python bench/train_loop.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/logging_cost.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/pipeline_vs_seed.py --data_dir $(DATA_DIR)

clean:
	rm -rf $(VENV) mlruns mlartifacts mlflow.db
