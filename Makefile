# Two entry points for a fresh machine: `make run` (the pipeline on built-in MNIST) and `make test`.
# Both create .venv with the pinned dependencies first (once; re-done when pyproject or constraints change).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# No telemetry from any tool, in the pipeline or the tests.
export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := True
export GX_ANALYTICS_ENABLED := False
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run run-gpu run-fashion test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

run: setup
	$(BIN)/dvc repro

# The GPU profile (profiles/gpu.yaml) as the DVC experiment gpu-profile; a bad profile stops before DVC starts.
run-gpu: setup
	args=$$($(BIN)/python -m tgm.profiles profiles/gpu.yaml) && $(BIN)/dvc exp run -n gpu-profile $$args

# The Fashion-MNIST profile (profiles/fashion.yaml) as the DVC experiment fashion: about 90 minutes on 2 cores.
run-fashion: setup
	args=$$($(BIN)/python -m tgm.profiles profiles/fashion.yaml) && $(BIN)/dvc exp run -n fashion $$args

# The suite in TEST_WORKERS processes, each test file whole in one of them (its servers and fixtures with it);
# tests/conftest.py gives each worker its share of torch's threads. TEST_WORKERS=1 runs it in this process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

# ruff's settings are in pyproject.toml; `ruff format .` fixes what the second check reports.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV)
