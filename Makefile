# One-command set-up: every target creates/updates the virtualenv first.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export TF_CPP_MIN_LOG_LEVEL ?= 2
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo test test-fast lint train-real train-field docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,lint]"
	touch $@

venv: $(VENV)/.installed

## Synthetic images → local Ray → trained, evaluated model artifact (path printed at the end)
demo: venv
	RAY_ADDRESS=$${RAY_ADDRESS:-local} $(BIN)/python jobs/train.py --config jobs/configs/demo.yaml

## The whole suite, slow tests included (starts its own Ray clusters and S3 server on 127.0.0.1);
## TEST_WORKERS pytest-xdist processes, one test at a time each (tests wait on Ray/TF start-up about half the time);
## --maxschedchunk 1: each worker takes the next test in collection order (longest first) when it frees up
TEST_WORKERS ?= 2
test: venv
	$(BIN)/python -m pytest -v --durations=25 -n $(TEST_WORKERS) --dist load --maxschedchunk 1 tests

## Style (ruff lint + format check) and the package's layering (import-linter contracts in pyproject.toml)
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

## Everything but the slow tests
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

## The quality-bar run on the real 6,000-image sample in ../shared/data (docs/benchmarks.md has its time)
train-real: venv
	RAY_ADDRESS=$${RAY_ADDRESS:-local} $(BIN)/python jobs/train.py --config jobs/configs/real_sample.yaml

## The general model: every source in ../shared/data, METU crops and the field sets (docs/benchmarks.md has its time)
train-field: venv
	RAY_ADDRESS=$${RAY_ADDRESS:-local} $(BIN)/python jobs/train.py --config jobs/configs/field.yaml $(ARGS)

## docs/configuration.md, generated from the config dataclasses' help texts (crackscale/config/)
docs: venv
	$(BIN)/python -m crackscale.config_docs

clean:
	rm -rf demo runs .pytest_cache
