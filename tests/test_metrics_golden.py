"""End-to-end golden test of /metrics, as node_exporter does it.

An Agent runs on the fixture roots (tests/fixtures/roots: boot id, CPUs 0-1 online,
clocksource kvm-clock) with fake probes and a frozen wall clock; a fixed list of events goes
through the event log; the /metrics body is compared byte for byte with
tests/fixtures/metrics.golden and linted with ``promtool check metrics``.

After an intended change of the exposition, regenerate the golden file and review the diff::

    TSPROBE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_metrics_golden.py
"""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.main import Agent
from agent.metrics import DEFAULT_WARNING_KINDS
from tests.fakeprobes import FIXTURE_ROOTS, FakeClock, FakeKmsg, FakeStall, FakeSync

GOLDEN = Path(__file__).parent / "fixtures" / "metrics.golden"
MS = 1_000_000


@pytest.fixture
def golden_agent(tmp_path: Path) -> Iterator[Agent]:
    stall = FakeStall({0: 120_000, 1: 119_874})
    clock = FakeClock(host_offset_ns=None, sync=FakeSync(True, 16_000_000))
    kmsg = FakeKmsg(lost=0)
    agent = Agent(
        AgentConfig(listen="127.0.0.1:0", events_path=None),
        [stall, clock, kmsg],
        FIXTURE_ROOTS,
        warning_kinds=DEFAULT_WARNING_KINDS,
        say=lambda _: None,
        agent_id="0123456789abcdef",
        wall_clock=lambda: 1_767_225_600.0,
    )
    agent.start()
    try:
        stall.send("stall", 3_500_000, cpu=0, cause="guest-sched", run_delay_ns=3_400_000)
        stall.send("stall", 150 * MS, cpu=1, cause="vcpu-blocked", run_delay_ns=0)
        stall.send("stall", 4_400 * MS, cpu=1, cause="vcpu-blocked", run_delay_ns=0)
        stall.send("stall", 180 * MS, cpu=0, cause="host-preempt", steal_ns=179 * MS)
        stall.send("sampler_outage", 20 * MS, cpu=1, reason="restarted")
        clock.send("clock_step", None, clock="realtime", step_ns=-99_200_000, bracket_ns=900)
        kmsg.send("kernel_warning", None, warning="soft_lockup", text="watchdog: BUG: soft lockup")
        yield agent
    finally:
        agent.stop()


def scrape(agent: Agent) -> bytes:
    with urllib.request.urlopen(f"{agent.url}/metrics", timeout=5) as resp:
        assert resp.status == 200
        body: bytes = resp.read()
        return body


def test_metrics_match_the_golden_file(golden_agent: Agent) -> None:
    body = scrape(golden_agent)
    if os.environ.get("TSPROBE_UPDATE_GOLDEN"):
        GOLDEN.write_bytes(body)
    expected = GOLDEN.read_bytes()
    if body != expected:
        diff = difflib.unified_diff(
            expected.decode().splitlines(),
            body.decode().splitlines(),
            "metrics.golden",
            "/metrics",
            lineterm="",
        )
        pytest.fail("/metrics differs from the golden file:\n" + "\n".join(diff))


def test_scrapes_are_repeatable(golden_agent: Agent) -> None:
    assert scrape(golden_agent) == scrape(golden_agent)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) missing")
def test_promtool_accepts_the_golden_file() -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=GOLDEN.read_bytes(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
