"""A real migration seen through Prometheus: the host exporter and reports from metrics.

One scenario, shared by the tests of this module: a live agent (one sampler frozen for
300 ms early in precopy, the known workload), two bare QEMUs migrating with precopy,
``tsprobe record --listen`` recording them, and a real Prometheus (the Debian package)
scraping the agent and the exporter every second. The exporter's /metrics is read during
the migration and after it; afterwards the per-phase tables are built from Prometheus
with ``fetch_tables``, with phases from the host exporter and from the run directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from analysis.analyze.timeline_io import load_timeline
from analysis.prom.source import fetch_tables
from analysis.prom.tables import BEFORE_PHASE, PromTables
from tests.liveagent import free_port, http_get, live_agent, stop_process
from tests.liveprom import PROMETHEUS, PROMTOOL, LiveProm, live_prometheus
from tests.qemu_helpers import QEMU, Controller, make_blob, qemu_pair

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None or QEMU is None or len(os.sched_getaffinity(0)) < 2,
        reason="needs prometheus, promtool, qemu-system-x86_64 and two CPUs",
    ),
]

REPO = Path(__file__).resolve().parent.parent
HOLD_S = 0.3
#: Slower than qemu_helpers' 20 MB/s, so precopy (about 5 s) outlasts the freeze, the
#: agent's report delay (up to 1 s) and a scrape interval.
BANDWIDTH = 10 * 1024 * 1024


@dataclass
class Scenario:
    prom: LiveProm
    instance: str
    run: Path
    victim: str
    held_s: float
    during: str
    after: str
    start_s: float
    end_s: float


def _metrics(port: int) -> str:
    status, _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return body.decode()


def _sample(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("promlive")
    blob = make_blob(tmp / "ram.bin")
    victim = max(os.sched_getaffinity(0))
    listen = free_port()
    with (
        live_agent(tmp, "--no-kmsg", "--threshold", "20ms") as agent,
        qemu_pair(tmp, blob) as pair,
    ):
        target = agent.url.removeprefix("http://")
        targets = {"tsprobe": [target], "tsprobe-migration": [f"127.0.0.1:{listen}"]}
        with live_prometheus(tmp, targets) as prom:
            cmd = [
                sys.executable, "-m", "tsprobe.cli", "record",
                "--qmp", f"src={pair.src.sockets[1]}", "--qmp", f"dst={pair.dst.sockets[1]}",
                "--agent", agent.url, "--listen", f"127.0.0.1:{listen}",
                "--out", str(tmp / "run"), "--grace", "3s", "--duration", "60s",
            ]  # fmt: skip
            log = open(tmp / "record.log", "w")  # noqa: SIM115
            rec = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            try:
                prom.wait_for("tsprobe_cpu_samples_total", len(os.sched_getaffinity(0)))
                prom.wait_for("tsprobe_migration_status_code")
                time.sleep(1.5)  # a few scrapes before the migration: the baseline
                start_s = time.time() - 1.0
                pid = agent.sampler_pid(victim)

                async def drive() -> tuple[str, float]:
                    async with Controller(pair) as ctl:
                        await ctl.prepare()
                        await ctl.src.execute(
                            "migrate-set-parameters", {"max-bandwidth": BANDWIDTH}
                        )
                        await ctl.migrate()
                        await ctl.wait_src("active")
                        await asyncio.sleep(0.3)
                        # The freeze the sampler must see at least: from the sampler
                        # seen stopped to SIGCONT about to be sent.
                        t0 = stop_process(pid) / 1e9
                        await asyncio.sleep(HOLD_S)
                        held = time.monotonic() - t0
                        os.kill(pid, signal.SIGCONT)
                        await asyncio.sleep(0.5)
                        during = _metrics(listen)
                        await ctl.wait_src("completed")
                        return during, held

                during, held = asyncio.run(drive())
                time.sleep(1.5)  # within the recorder's 3 s grace: the final state
                after = _metrics(listen)
                rec.wait(30)
                time.sleep(1.0)
                end_s = time.time()
            finally:
                if rec.poll() is None:
                    os.kill(rec.pid, signal.SIGTERM)
                    rec.wait(20)
                log.close()
            yield Scenario(
                prom, target, tmp / "run", str(victim), held, during, after, start_s, end_s
            )


def _promtool_ok(text: str) -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_exporter_during_and_after_the_migration(scenario: Scenario) -> None:
    during, after = scenario.during, scenario.after
    for text in (during, after):
        _promtool_ok(text)
        names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
        assert names and all(n.startswith("tsprobe_migration_") for n in names)
    status = 'tsprobe_migration_status{endpoint="src",status="%s"}'
    assert _sample(during, status % "active") == 1
    assert _sample(during, status % "completed") == 0
    assert _sample(during, 'tsprobe_migration_status_code{endpoint="src"}') == 2
    remaining = _sample(during, 'tsprobe_migration_remaining_bytes{endpoint="src"}')
    assert remaining is not None and remaining > 0
    assert _sample(during, 'tsprobe_migration_vm_running{endpoint="src"}') == 1
    assert _sample(during, 'tsprobe_migration_downtime_seconds{endpoint="src"}') is None
    assert _sample(after, status % "active") == 0
    assert _sample(after, status % "completed") == 1
    assert _sample(after, 'tsprobe_migration_status{endpoint="dst",status="completed"}') == 1
    assert _sample(after, 'tsprobe_migration_status_code{endpoint="src"}') == 10
    downtime = _sample(after, 'tsprobe_migration_downtime_seconds{endpoint="src"}')
    assert downtime is not None and 0 < downtime < 5
    assert _sample(after, 'tsprobe_migration_vm_running{endpoint="src"}') == 0
    assert _sample(after, 'tsprobe_migration_vm_running{endpoint="dst"}') == 1
    sent = _sample(after, 'tsprobe_migration_transferred_bytes_total{endpoint="src"}')
    assert sent is not None and sent > 40e6  # the 48 MB blob went over
    # Prometheus saw the flip too.
    flips = scenario.prom.query(
        'changes(tsprobe_migration_status{endpoint="src",status="active"}[5m])'
    )
    assert flips and float(flips[0]["value"][1]) >= 2  # 0 -> 1 -> 0


def _check_tables(tables: PromTables, scenario: Scenario) -> None:
    names = [w.name for w in tables.windows]
    assert names == [BEFORE_PHASE, "setup", "precopy", "stop-and-copy", "completed"], names
    assert tables.scrape_interval_s == pytest.approx(1.0, abs=0.2)
    assert tables.step_s == pytest.approx(1.0, abs=0.2)
    assert "coarser" in tables.note
    rows = {(tables.windows[r.phase].name, r.cpu): r for r in tables.stalls}
    assert {cpu for _, cpu in rows} == {str(c) for c in os.sched_getaffinity(0)}
    frozen = rows[("precopy", scenario.victim)]
    held_ns = scenario.held_s * 1e9
    assert frozen.count >= 1
    # The hold is timed from the sampler seen stopped, so the stall covers it; 0.1 ms slack.
    assert frozen.longest_ns is not None and held_ns - 1e5 <= frozen.longest_ns < held_ns + 190e6
    assert frozen.longest_bucket == (2e8, 5e8)
    assert frozen.stalled_ns >= held_ns - 1e5
    assert frozen.p99_ns is not None and 2e8 < frozen.p99_ns <= frozen.longest_ns
    others = [r for (phase, cpu), r in rows.items() if cpu != scenario.victim]
    assert all(r.longest_ns is None or r.longest_ns < 2e8 for r in others)
    assert tables.ladder_ns == [10**7, 10**8, 10**9, 5 * 10**9, 30 * 10**9]
    assert all(r.count >= 0 for r in tables.timeouts)


def test_tables_with_phases_from_the_host_exporter(scenario: Scenario) -> None:
    tables = fetch_tables(scenario.prom.url, scenario.instance, scenario.start_s, scenario.end_s)
    assert tables.phase_source == "host exporter 127.0.0.1:" + tables.phase_source.split(":")[-1]
    _check_tables(tables, scenario)


def test_tables_with_phases_from_the_run_directory(scenario: Scenario) -> None:
    tables = fetch_tables(
        scenario.prom.url, scenario.instance, scenario.start_s, scenario.end_s, run=scenario.run
    )
    assert tables.phase_source == f"run directory {scenario.run}"
    _check_tables(tables, scenario)
    # The exporter's timestamps give the run directory's own boundaries.
    timeline = load_timeline(scenario.run, lambda _s: None, lambda _n: None)
    by_exporter = fetch_tables(
        scenario.prom.url, scenario.instance, scenario.start_s, scenario.end_s
    )
    for ours, theirs in zip(by_exporter.windows[1:], tables.windows[1:], strict=True):
        assert abs(ours.start_ns - theirs.start_ns) < 1_000_000, (ours, theirs)
    assert tables.windows[2].start_ns == timeline.phases[1].start_ns


def test_report_command_from_prometheus(scenario: Scenario, tmp_path: Path) -> None:
    """``tsprobe report --prometheus`` through the real entry point: files, note, no traceback."""
    import datetime
    import json
    import subprocess

    def iso(t: float) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    out = tmp_path / "prom-report"
    result = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "tsprobe"),
            "report",
            "--prometheus",
            scenario.prom.url,
            "--instance",
            scenario.instance,
            "--from",
            iso(scenario.start_s),
            "--to",
            iso(scenario.end_s),
            "--run",
            str(scenario.run),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"] == "prometheus" and "coarser" in summary["note"]
    html_text = (out / "report.html").read_text()
    assert "coarser" in html_text and "<table>" in html_text
    stalls = [r for r in summary["stalls"] if str(r.get("cpu")) == scenario.victim]
    assert any((r.get("longest_ns") or 0) >= scenario.held_s * 1e9 * 0.9 for r in stalls), stalls
    bad = subprocess.run(
        [str(REPO / ".venv" / "bin" / "tsprobe"), "report", "--prometheus", scenario.prom.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("tsprobe: --prometheus needs")
