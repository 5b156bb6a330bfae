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
# A 5 s baseline: with the canaries a TCG guest answers /clock slowly, and the clock-lag
# figures need samples from before the migration.
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
demo: setup
	$(VENV)/bin/tsprobe lab build-guest
	$(VENV)/bin/tsprobe lab run --scenario paused --baseline 5s --out $(DEMO_DIR)/paused
	$(VENV)/bin/tsprobe lab run --scenario paused-stop --baseline 5s --out $(DEMO_DIR)/paused-stop
	$(VENV)/bin/tsprobe report $(DEMO_DIR)/paused
	$(VENV)/bin/tsprobe report $(DEMO_DIR)/paused-stop
	$(VENV)/bin/tsprobe compare $(DEMO_DIR)/paused $(DEMO_DIR)/paused-stop --out $(DEMO_DIR)/comparison
	@echo "demo: reports $(DEMO_DIR)/paused/report.html $(DEMO_DIR)/paused-stop/report.html"
	@echo "demo: comparison $(DEMO_DIR)/comparison/comparison.html (and comparison.md)"

# The agent alone on this machine, with a known 300 ms freeze of one sampler.
agent-demo: setup
	$(PY) -m tsprobe.demo

bench: setup
	$(PY) bench/agent_overhead

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
