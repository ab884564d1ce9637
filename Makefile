# Everything starts from a fresh machine: each target (re)creates .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench-m4 bench-etth1 bench-serving gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# [ray]: the tests race on a real Ray cluster and search on Ray Tune
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,ray]'
	touch $(STAMP)

demo: $(STAMP)  ## race small models into ./mlflow.db, then serve the champion on :3000 (Ctrl-C stops)
	# one thread: the small networks are fastest so, and the machine may have two cores
	OMP_NUM_THREADS=1 $(BIN)/forecaster train configs/quick.yaml
	# no API token (FORECASTER_API_TOKEN empty): POST /actuals takes requests without one, as
	# the service's log says; forecasts and actuals go to ./forecaster-store.db
	FORECASTER_API_TOKEN= OMP_NUM_THREADS=1 $(BIN)/forecaster serve --port 3000 --first-forecast configs/quick.yaml

test: lint  ## lint, then the whole test suite (slow end-to-end tests included): what CI runs
	$(BIN)/python -m pytest --durations=20

test-fast: lint  ## lint, then the tests not marked slow (a few minutes): the edit-test loop
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check forecaster pipelines serving cli tests benchmarks deploy

bench-m4: $(STAMP)
	$(BIN)/forecaster bench m4-hourly

bench-etth1: $(STAMP)
	$(BIN)/forecaster bench etth1

bench-serving: $(STAMP)  ## the service against batching off and mlflow models serve
	$(BIN)/python -m benchmarks.serving

gpu-check: $(STAMP)  ## on a GPU machine (CUDA torch): every network on CUDA (bf16) and the CPU, a race on Ray with GPU shares; writes gpu_check.md
	$(BIN)/python -m benchmarks.gpu_check --out gpu_check.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
