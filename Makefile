# tsprobe: `make demo` runs the main job, `make test` runs every check.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint typecheck pytest demo bench clean

setup:
	@scripts/setup

lint: setup
	$(VENV)/bin/ruff check probe agent analysis tsprobe tests bench
	$(VENV)/bin/ruff format --check probe agent analysis tsprobe tests bench

typecheck: setup
	$(VENV)/bin/mypy probe agent tsprobe analysis

pytest: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS)

test: lint typecheck pytest

demo: setup
	$(PY) -m tsprobe.demo

bench: setup
	$(PY) bench/agent_overhead

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
