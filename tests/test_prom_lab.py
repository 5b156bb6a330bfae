"""Reports from Prometheus on a real lab guest: the ``paused`` scenario seen through metrics.

A real Prometheus (the Debian package) scrapes, every 5 s, the lab guest's agent through
the lab's forwarder on a fixed address (``tsprobe lab run --agent-listen``; it follows
the guest from the source QEMU to the destination) and, every 2 s, the recorder's host
migration exporter (``--listen``) while ``tsprobe lab run --scenario paused --hold 3s`` runs with
10 s of undisturbed guest recorded before and 20 s after (``--baseline``, ``--linger``), and
the ``timer`` canary only (the heartbeat pair doubles the TCG guest's load). Then
``tsprobe report --prometheus ... --run RUNDIR`` builds the per-phase tables from range
queries, and they are compared with what the event log says for the same run
(lab-summary.json).

What Prometheus can and cannot see here. During ``postcopy-paused`` both vCPUs block on
pages that are still on the source, so the agent cannot answer and those scrapes fail
(``up`` is 0). The agent counts a stall when it ends, after ``migrate-recover``: the
pause's stall (longer than the hold on each CPU) is counted in the first window whose
scrape saw it, after the pause, and the ``postcopy-paused`` window's own rows hold no
stall. The event log places the same stall from postcopy-active across postcopy-paused.
That is the coarseness the report states, and what the assertions below check.

About 80 s on 2 cores under TCG with the lab guest cached (``tsprobe lab build-guest``).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("qemu.qmp")

from analysis.prom.source import PromClient
from analysis.prom.tables import parse_matrix
from tests.liveagent import free_port
from tests.liveprom import PROMETHEUS, LiveProm, live_prometheus

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None
        or shutil.which("qemu-system-x86_64") is None
        or len(os.sched_getaffinity(0)) < 2,
        reason="needs prometheus, qemu-system-x86_64 and two CPUs",
    ),
    pytest.mark.timeout(300),
]

REPO = Path(__file__).resolve().parent.parent
TSPROBE = REPO / ".venv" / "bin" / "tsprobe"
HOLD_S = 3.0
PAUSED = "postcopy-paused"
#: Under TCG the loaded guest's agent takes 1 to 4 s for /metrics after the migration
#: (polled every 0.5 s on a precopy's destination: 1.0 to 3.9 s), and Prometheus' scrape
#: timeout cannot exceed the interval. With 2 s, CI once had no successful scrape between
#: the pause's canary timeouts being filed and the end of the run. The agent renders one
#: /metrics at a time, so timed-out scrapes do not pile up (agent.metrics).
SCRAPE_S = 5.0
SCRAPE = f"{SCRAPE_S:g}s"
#: The host exporter answers at once; it is scraped more often than the 3 s pause lasts,
#: so Prometheus holds a sample of ``postcopy-paused`` (at 5 s, CI once had none).
EXPORTER_SCRAPE = "2s"
#: Recorded after the migration. On a loaded CI host the guest's agent filed the pause's
#: canary timeouts 11 s after the recovery, when the last scrape that succeeded had begun
#: 1.2 s before and the lab (with 10 s) ended 2.5 s later: nothing could show them.
LINGER = "20s"


@dataclass
class LabProm:
    prom: LiveProm
    instance: str
    exporter: str
    run: Path
    report: Path
    start_s: float
    end_s: float
    lab: dict[str, Any]
    summary: dict[str, Any]


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture(scope="module")
def lab_prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabProm]:
    tmp = tmp_path_factory.mktemp("promlab")
    agent, exporter = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    targets = {"tsprobe": [agent], "tsprobe-migration": [exporter]}
    run, report = tmp / "run", tmp / "report"
    with live_prometheus(
        tmp, targets, scrape_interval=EXPORTER_SCRAPE, job_intervals={"tsprobe": SCRAPE}
    ) as prom:
        start_s = time.time()
        lab_cmd = [
            str(TSPROBE), "lab", "run", "--scenario", "paused", "--hold", f"{HOLD_S:g}s",
            "--accel", "tcg", "--out", str(run), "--agent-listen", agent, "--listen", exporter,
            "--canaries", "timer", "--baseline", "10s", "--linger", LINGER,
        ]  # fmt: skip
        lab = subprocess.run(
            lab_cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
        )
        (tmp / "lab.log").write_text(lab.stdout + lab.stderr)
        assert lab.returncode == 0, (lab.stdout + lab.stderr)[-3000:]
        time.sleep(SCRAPE_S)  # a last scrape of nothing: the range ends after the run
        end_s = time.time()
        report_cmd = [
            str(TSPROBE), "report", "--prometheus", prom.url, "--instance", agent,
            "--from", _iso(start_s), "--to", _iso(end_s), "--run", str(run), "--out", str(report),
        ]  # fmt: skip
        result = subprocess.run(
            report_cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        meta = json.loads((run / "meta.json").read_text())
        yield LabProm(
            prom=prom,
            instance=agent,
            exporter=exporter,
            run=run,
            report=report,
            start_s=start_s,
            end_s=end_s,
            lab=json.loads((run / "lab-summary.json").read_text()),
            summary=json.loads((report / "summary.json").read_text()) | {"meta": meta},
        )


def _windows(summary: dict[str, Any]) -> dict[int, str]:
    return {int(p["index"]): str(p["name"]) for p in summary["phases"]}


def _rows(summary: dict[str, Any], phase: int) -> dict[str, dict[str, Any]]:
    return {str(r["cpu"]): r for r in summary["stalls"] if r["phase"] == phase}


def test_the_lab_run_exposed_both_targets(lab_prom: LabProm) -> None:
    lab = lab_prom.summary["meta"]["lab"]
    assert lab["agent_url"] == f"http://{lab_prom.instance}"
    assert lab["exporter_url"] == f"http://{lab_prom.exporter}/metrics"
    assert lab_prom.lab["health"]["ok"], lab_prom.lab["health"]
    # Prometheus scraped both, and saw the agent fail while the guest was paused.
    up = lab_prom.prom.query('max_over_time(up{job="tsprobe-migration"}[10m])')
    assert up and float(up[0]["value"][1]) == 1
    status = lab_prom.prom.query(
        f'max_over_time(tsprobe_migration_status{{status="{PAUSED}"}}[10m])'
    )
    assert {s["metric"]["endpoint"] for s in status if float(s["value"][1]) == 1} == {
        "src",
        "dst",
    }


def test_report_from_prometheus_matches_the_event_log(lab_prom: LabProm) -> None:
    summary, lab = lab_prom.summary, lab_prom.lab
    assert summary["source"] == "prometheus" and "coarser" in summary["note"]
    assert summary["phase_source"] == f"run directory {lab_prom.run}"
    # The median gap between successful scrapes: failed ones (the pause, a busy agent)
    # make it longer than the configured interval (seen: 5.0 and 7.5 s).
    assert summary["scrape_interval_s"] >= SCRAPE_S * 0.9
    windows = _windows(summary)
    names = list(windows.values())
    assert PAUSED in names, names
    # The same phases as the event log (lab-summary.json), in the same order.
    assert [n for n in names if n in {p["name"] for p in lab["phases"]}] == [
        p["name"] for p in lab["phases"]
    ]
    paused = names.index(PAUSED)
    cpus = sorted(_rows(summary, paused))
    assert cpus == [str(c) for c in range(int(summary["meta"]["lab"]["vcpus"]))]


def test_the_pause_stall_reaches_prometheus(lab_prom: LabProm) -> None:
    summary, lab = lab_prom.summary, lab_prom.lab
    windows = _windows(summary)
    paused = list(windows.values()).index(PAUSED)
    cpus = sorted(_rows(summary, paused))
    # The event log: each CPU had a stall longer than the hold spanning the pause.
    spanning = {
        str(st["cpu"]): int(st["duration_ns"])
        for st in lab["stalls"]
        if PAUSED in st["phases_overlapped"] and st["duration_ns"] >= HOLD_S * 0.9e9
    }
    assert sorted(spanning) == cpus, lab["stalls"]
    # Prometheus: the agent could not be scraped while both vCPUs waited for pages, and
    # it counts a stall when it ends, so the pause's window shows no stall of its own ...
    assert all(r["count"] == 0 for r in _rows(summary, paused).values())
    # ... and the pause's stall turns up after it: as a new longest stall (exact) or in
    # the top bucket, of at least the hold, on a CPU whose event log has it.
    later = [
        r
        for phase in windows
        if phase > paused
        for r in _rows(summary, phase).values()
        if r["count"] >= 1
    ]
    seen = {
        str(r["cpu"])
        for r in later
        if (r["longest_ns"] or 0) >= HOLD_S * 0.9e9 or (r["longest_bucket_s"] or [0.0])[0] >= 2.0
    }
    assert seen and seen <= set(spanning), (later, lab["stalls"])
    for cpu in seen:
        longest = max(r["longest_ns"] or 0 for r in later if str(r["cpu"]) == cpu)
        assert longest == 0 or abs(longest - spanning[cpu]) < 0.2e9, (cpu, longest, spanning)


def test_the_pause_timeouts_reach_prometheus(lab_prom: LabProm) -> None:
    summary, lab = lab_prom.summary, lab_prom.lab
    windows = _windows(summary)
    paused = list(windows.values()).index(PAUSED)
    # The event log: each CPU's timer canary had a 1 s deadline fall due in the pause.
    logged = [
        t
        for t in lab["timeouts"]
        if t["canary"] == "timer" and t["timeout_ns"] == 1_000_000_000 and t["phase"] == PAUSED
    ]
    assert len(logged) == 2, lab["timeouts_per_phase"]
    # Prometheus: the agent files them after the pause (the canary reports when its wait
    # ends, then the guest's agent needs a few seconds), so the windows after it hold them.
    rows = [
        r
        for r in summary["timeouts"]
        if r["canary"] == "timer" and r["timeout_ns"] == 1_000_000_000
    ]
    expr = 'tsprobe_timeout_expirations_total{canary="timer",timeout="1.0"}'
    assert all(r["count"] == 0 for r in rows if r["phase"] <= paused), (
        rows,
        _scraped(lab_prom, expr),
    )
    # What follows needs a successful scrape after the agent had counted them: at the
    # latest when the recorder received them (their arrival).
    arrived = max(_arrival(lab_prom.run, int(t["seq"])) for t in logged)
    last_scrape = _last_scrape(lab_prom)
    assert last_scrape > arrived, (
        f"no successful scrape after the pause's timeouts reached the recorder "
        f"({arrived - last_scrape:.1f} s after the last one began): --linger too short for "
        "the guest's agent to catch up on this host"
    )
    assert sum(r["count"] for r in rows if r["phase"] > paused) == len(logged), (
        rows,
        _scraped(lab_prom, expr),
    )


def _arrival(run: Path, seq: int) -> float:
    """When the page holding event ``seq`` reached the recorder (Unix s)."""
    for line in (run / "arrivals-guest.jsonl").read_text().splitlines():
        record = json.loads(line)
        if int(record["last_seq"]) >= seq:
            return int(record["host_real_ns"]) / 1e9
    raise AssertionError(f"event {seq} has no arrival record")


def _last_scrape(lab_prom: LabProm) -> float:
    """When the agent's last successful scrape began (Unix s; 0 if none)."""
    query = f'timestamp(tsprobe_info{{instance="{lab_prom.instance}"}})'
    answer = PromClient(lab_prom.prom.url).query_range(query, lab_prom.start_s, lab_prom.end_s, 1.0)
    return max((v for s in parse_matrix(answer, query) for _, v in s.points), default=0.0)


def _scraped(lab_prom: LabProm, expr: str) -> dict[str, Any]:
    """What Prometheus holds for ``expr`` and the agent's ``up`` (for failure messages):
    every other 1 s sample, and the phases' starts, in seconds from the range's start."""
    client = PromClient(lab_prom.prom.url)
    found: dict[str, Any] = {}
    for name, query in (("series", expr), ("up", f'up{{instance="{lab_prom.instance}"}}')):
        answer = client.query_range(query, lab_prom.start_s, lab_prom.end_s, 1.0)
        found[name] = [
            [(round(t - lab_prom.start_s), v) for t, v in s.points][::2]
            for s in parse_matrix(answer, query)
        ]
    found["phases"] = [
        (p["name"], round(p["start_ns"] / 1e9 - lab_prom.start_s, 1))
        for p in lab_prom.summary["phases"]
    ]
    return found
