# Two commands do all the set-up on a fresh machine:
#   make run    create .venv, install the pinned packages, run the whole study (mlflow run .)
#   make test   create .venv, install the pinned packages, check the layering, run the test suite
# Offline, MNIST is read from ../shared/datasets when it is there (override: DATA_DIR=...).
# A team's tracking server: make server / make server-stop; the champion over HTTP: make serve.

VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
DATA_DIR ?= $(if $(wildcard ../shared/datasets/MNIST/raw),../shared/datasets,data)
EXPERIMENT ?= mnist-mlp
PORT ?= 5000
# make server: PostgreSQL (a local cluster in SERVER_DIR unless BACKEND_STORE_URI is given),
# artifacts proxied to SERVER_DIR/artifacts (or ARTIFACTS_DESTINATION), logins on.
# BACKEND_STORE_URI reaches the server through the environment only (a password in it is never
# echoed nor put on a command line): set it in your shell, not on make's command line.
# SERVER_ALLOWED_HOSTS: the host names clients use beyond this machine (mlflow.team.example:*).
# AUTH=false on a SERVER_HOST other than 127.0.0.1 is refused unless ANONYMOUS_REMOTE=yes.
SERVER_DIR ?= .mlflow-server
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5050
SERVER_WORKERS ?= 2
PG_PORT ?= 5433
BACKEND_STORE_URI ?=
export BACKEND_STORE_URI
ARTIFACTS_DESTINATION ?=
SERVER_ALLOWED_HOSTS ?=
AUTH ?= true
ANONYMOUS_REMOTE ?= no
# make serve: models:/$(MODEL)@champion from $MLFLOW_TRACKING_URI (default ./mlflow.db).
MODEL ?= mnist-mlp
SERVE_PORT ?= 5001
# make test / test-fast: the suite in TEST_WORKERS processes (pytest-xdist; 0: in this one).
TEST_WORKERS ?= 2
PYTEST_WORKERS = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)
# `mlflow run` runs each stage's `python -m pipeline ...` with the python on PATH.
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
# Give up on an unreachable tracking server in seconds, not MLflow's minutes of retries
# (pipeline/tracking_access.py sets the same for `python -m pipeline`); yours win if set.
export MLFLOW_HTTP_REQUEST_MAX_RETRIES ?= 3
export MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR ?= 1
export MLFLOW_HTTP_REQUEST_TIMEOUT ?= 30

.PHONY: setup run test test-fast ui bench clean server server-stop serve

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: setup
	$(BIN)/mlflow run . --env-manager local --experiment-name $(EXPERIMENT) -P data_dir=$(DATA_DIR) $(ARGS)

# lint-imports first: the layering contracts in pyproject.toml (docs/architecture.md).
test: setup
	$(BIN)/lint-imports && $(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/lint-imports && $(BIN)/python -m pytest -m "not integration" $(PYTEST_WORKERS) $(PYTEST_ARGS)

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port $(PORT)

server: setup
	$(BIN)/python -m pipeline.server start --folder "$(SERVER_DIR)" --host $(SERVER_HOST) \
		--port $(SERVER_PORT) --workers $(SERVER_WORKERS) --pg-port $(PG_PORT) \
		--artifacts-destination "$(ARTIFACTS_DESTINATION)" \
		$(if $(SERVER_ALLOWED_HOSTS),--allowed-hosts "$(SERVER_ALLOWED_HOSTS)") \
		$(if $(filter false,$(AUTH)),--no-auth) \
		$(if $(filter yes,$(ANONYMOUS_REMOTE)),--allow-anonymous-remote)

server-stop: setup
	$(BIN)/python -m pipeline.server stop --folder "$(SERVER_DIR)"

serve: setup
	$(BIN)/mlflow models serve -m "models:/$(MODEL)@champion" --env-manager local \
		--host 127.0.0.1 --port $(SERVE_PORT)

bench: setup
	$(BIN)/python bench/train_loop.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/epoch_profile.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/compile_cost.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/logging_cost.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/pipeline_vs_seed.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/study_vs_seed.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/checkpoint_cost.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/full_mnist_epoch.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/system_metrics_cost.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/cached_rerun.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/ray_study.py --data_dir $(DATA_DIR)
	$(BIN)/python bench/ray_scheduler.py
	$(BIN)/python bench/tune_sweep.py --data_dir $(DATA_DIR) --trials 6 --epochs 3

clean:
	rm -rf $(VENV) mlruns mlartifacts mlflow.db
