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

# The main job: the policy study in small. A real QEMU guest running the agent, migrated
# with postcopy and paused for 2 s and for 30 s, with the vCPUs kept running (QEMU's
# behaviour, scenario paused) and stopped (the proposed policy, paused-stop): four runs,
# each reported, and the study report comparing the policies (analysis/lab/study.py).
# Each run takes the lab lock (/tmp/tsprobe-lab.lock), so it waits for any other lab.
# A 5 s baseline: with the canaries a TCG guest answers /clock slowly, and the clock-lag
# figures need samples from before the migration.
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
demo: setup
	$(VENV)/bin/tsprobe lab build-guest
	$(VENV)/bin/tsprobe lab study --scenario paused,paused-stop --hold 2s,30s --baseline 5s \
		--out $(DEMO_DIR)
	@echo "demo: study report $(DEMO_DIR)/study.html (and study.md, study.json)"
	@echo "demo: each run's report under $(DEMO_DIR)/runs/*/report.html"

# The agent alone on this machine, with a known 300 ms freeze of one sampler.
agent-demo: setup
	$(PY) -m tsprobe.demo

bench: setup
	$(PY) bench/agent_overhead

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
