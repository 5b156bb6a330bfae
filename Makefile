# tsprobe: `make demo` runs the main job, `make test` runs every check.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint typecheck pytest demo agent-demo bench clean

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

# The main job: a real QEMU guest running the agent, migrated with postcopy and paused for
# 3 s twice: vCPUs kept running (QEMU's behaviour) and vCPUs stopped (the proposed policy).
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
demo: setup
	$(VENV)/bin/tsprobe lab build-guest
	$(VENV)/bin/tsprobe lab run --scenario paused --out $(DEMO_DIR)/paused
	$(VENV)/bin/tsprobe lab run --scenario paused-stop --out $(DEMO_DIR)/paused-stop
	@echo "demo: run directories in $(DEMO_DIR)"

# The agent alone on this machine, with a known 300 ms freeze of one sampler.
agent-demo: setup
	$(PY) -m tsprobe.demo

bench: setup
	$(PY) bench/agent_overhead

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
