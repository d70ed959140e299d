# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python

.PHONY: demo test install dev services chromium lint typecheck bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet -e .

dev: $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"

## demo: install, then run the quickstart, a short governed-agent demo and the example policies' tests (no servers)
demo: install
	$(PY) examples/run_quickstart.py
	$(PY) examples/governed_agent.py
	$(PY) -m limenex test examples/

## services: make sure Redis and PostgreSQL answer on 127.0.0.1 (starts them if stopped)
services:
	bash scripts/ensure-services.sh

## chromium: make sure Debian's Chromium is installed (the inbox's browser tests drive it)
chromium:
	bash scripts/ensure-chromium.sh

lint: dev
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: dev
	$(BIN)/mypy

## test: install the dev extras, make sure the servers and Chromium are there, lint, type-check, run the suite
test: dev services chromium lint typecheck
	$(BIN)/pytest

## bench: the performance table in the README (not part of the test suite)
bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
