"""The study report (analysis.report.study): cells, aggregates and verdicts.

The recorded study under tests/fixtures/study/recorded is a real ``tsprobe lab study``
(QEMU 7.2.22, single-threaded TCG), trimmed by tests/fixtures/study/trim.py; the figures
asserted are that study's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from analysis.lab.cli import lab
from analysis.lab.study import RunRecord
from analysis.report.study import (
    aggregate,
    outcome_text,
    ran_while_blocked_ms,
    read_cell,
    regime_claim,
    stats,
    verdicts,
)

RECORDED = Path(__file__).parent / "fixtures" / "study" / "recorded"


def _line(endpoint: str, vcpu: int, tid: int, state: str, start_ms: int, end_ms: int) -> str:
    return json.dumps(
        {
            "endpoint": endpoint,
            "vcpu": vcpu,
            "tid": tid,
            "state": state,
            "start_mono_ns": start_ms * 1_000_000,
            "end_mono_ns": end_ms * 1_000_000,
        }
    )


def test_ran_while_blocked_counts_one_vcpu_running_while_another_waits() -> None:
    # MTTCG-like: vCPU 0 on a missing page 100-400 ms, vCPU 1 runs until 250 ms, then waits
    # on the big lock; the source's vCPUs run meanwhile (another QEMU: not counted with dst).
    lines = [
        _line("dst", 0, 11, "running", 0, 100),
        _line("dst", 0, 11, "userfault", 100, 400),
        _line("dst", 1, 12, "running", 0, 250),
        _line("dst", 1, 12, "lock-wait", 250, 400),
        _line("src", 0, 21, "running", 0, 400),
        "not json",
    ]
    assert ran_while_blocked_ms(lines) == 150.0
    # single-threaded TCG: one thread, both vCPUs in the same state: never uneven
    single = [
        _line("dst", 0, 11, "running", 0, 100),
        _line("dst", 1, 11, "running", 0, 100),
        _line("dst", 0, 11, "userfault", 100, 400),
        _line("dst", 1, 11, "userfault", 100, 400),
    ]
    assert ran_while_blocked_ms(single) == 0.0
    assert ran_while_blocked_ms([]) is None


def test_stats_and_outcome_text() -> None:
    assert stats([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert stats([None]) is None
    counts = {"recovered": 1, "degraded": 0, "not-recovered": 1, "lab-error": 0}
    assert outcome_text(counts, 2) == "1 of 2 recovered, 1 of 2 not-recovered"


def _record(rundir: Path, exit_code: int | None, timed_out: bool = False) -> None:
    rundir.mkdir(parents=True)
    RunRecord(
        "r", "paused", 30_000_000_000, "default", "auto", 1, ["tsprobe"], 0,
        wall_s=60.0, exit_code=exit_code, timed_out=timed_out, timeout_s=390.0,
        tail=["$ tsprobe lab run", "lab 12.0s: booting", "Error: QEMU exited (status 1)"],
    ).save(rundir)  # fmt: skip


def test_outcome_without_lab_outcome_json(tmp_path: Path) -> None:
    # a crash: no summary, exit 1 -> lab-error with the exit status and the output's tail
    _record(tmp_path / "runs" / "crash", 1)
    cell = read_cell(tmp_path, tmp_path / "runs" / "crash")
    assert cell["outcome"] == "lab-error"
    assert cell["evidence"] == [
        "tsprobe lab run exited with status 1",
        "no lab-outcome.json",
        "lab output: lab 12.0s: booting",
        "lab output: Error: QEMU exited (status 1)",
    ]
    # a hang killed on its timeout
    _record(tmp_path / "runs" / "hang", None, timed_out=True)
    cell = read_cell(tmp_path, tmp_path / "runs" / "hang")
    assert cell["outcome"] == "lab-error"
    assert cell["evidence"][0] == "tsprobe lab run did not end within 390 s: killed"
    # an exit status that names an outcome, with the lab's summary written
    _record(tmp_path / "runs" / "deg", 3)
    (tmp_path / "runs" / "deg" / "lab-summary.json").write_text("{}")
    cell = read_cell(tmp_path, tmp_path / "runs" / "deg")
    assert cell["outcome"] == "degraded"
    assert cell["rundir"] == "runs/deg" and cell["policy"] == "vCPUs kept running"


def _agg(scenario: str, outcomes: dict[str, int], stall: float, lag: float) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = []
    for outcome, k in outcomes.items():
        for i in range(k):
            cells.append(
                {
                    "scenario": scenario,
                    "hold_ms": 30000.0,
                    "clocksource": "default",
                    "accel": "auto",
                    "rundir": f"runs/{scenario}-{outcome}-{i}",
                    "outcome": outcome,
                    "evidence": [],
                    "kernel_warnings": {"soft_lockup": 1} if outcome == "degraded" else {},
                    "clocksource_used": "hpet",
                    "qemu_version": "10.0.2",
                    "accel_used": "tcg thread=multi",
                    "tcg_threads": "multi",
                    "longest_stall_ms": {"0": stall, "1": stall},
                    "stalled_ms": {"0": stall, "1": stall},
                    "clock_lag_growth_ms": lag,
                    "timeouts": {"1000": 2},
                    "peer_timeouts": {"1000": 1 if lag > 1000 else 0},
                    "stall_timeouts": {"1000": 2},
                }
            )
    return cells


def test_verdict_compares_the_policies_and_states_the_regime() -> None:
    cells = _agg("paused", {"not-recovered": 2}, 30500.0, 100.0)
    cells += _agg("paused-stop", {"degraded": 1, "recovered": 1}, 400.0, 30200.0)
    aggs = aggregate(cells)
    assert [a["outcome_text"] for a in aggs] == [
        "2 of 2 not-recovered",
        "1 of 2 recovered, 1 of 2 degraded",
    ]
    (v,) = verdicts(aggs)
    assert v["title"] == "Hold 30s, clocksource the kernel's choice (hpet), accel auto"
    assert v["comparison"].startswith("Stopping the vCPUs left the guest in a better state")
    assert "it fell 30.2 s behind" in v["comparison"]
    assert "multi-threaded TCG" in v["regime"] and "QEMU 10.0.2, tcg thread=multi" in v["regime"]
    assert "a peer outside the guest would time out at 1 s: 1" in v["policies"][1]
    assert "kernel warnings soft_lockup in 1 run(s)" in v["policies"][1]
    single = regime_claim(["QEMU 7.2.22, tcg thread=single"], ["single"])
    assert "cannot show CPUs running while others wait" in single
    assert "What it cannot claim" in single


def test_a_stop_that_did_not_happen_is_said_and_not_compared() -> None:
    # Through libvirt 9.0, virsh suspend on the destination waits for the migration job:
    # a paused-stop run whose vCPUs QEMU stopped only at the switchover (206 ms of a 30 s
    # hold) did not apply the policy; one stopped for the hold did.
    cells = _agg("paused", {"not-recovered": 2}, 30500.0, 100.0)
    stop = _agg("paused-stop", {"not-recovered": 2}, 0.0, 33000.0)
    for cell in cells + stop:
        cell["vcpus_stopped_ms"] = 206.0
    (v,) = verdicts(aggregate(cells + stop))
    assert v["comparison"] == (
        "No comparison of the policies: in the paused-stop runs the vCPUs were not "
        "stopped for the pause, so both kept them running."
    )
    assert (
        "but the policy did not take effect: QEMU had the vCPUs stopped 206 ms"
        in (v["policies"][1])
    )
    assert "did not take effect" not in v["policies"][0]
    for cell in stop:
        cell["vcpus_stopped_ms"] = 30300.0
    (v,) = verdicts(aggregate(cells + stop))
    assert "did not take effect" not in v["policies"][1]
    assert not v["comparison"].startswith("No comparison")


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    if not RECORDED.exists():
        pytest.skip("no recorded study fixture")
    out = tmp_path / "study"
    shutil.copytree(RECORDED, out)
    result = CliRunner().invoke(lab, ["study-report", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_recorded_study_cells(recorded: Path) -> None:
    doc = json.loads((recorded / "study.json").read_text())
    assert doc["kind"] == "tsprobe-study" and doc["runs_done"] == 4
    by_run = {c["rundir"].removeprefix("runs/"): c for c in doc["cells"]}
    assert {k: c["outcome"] for k, c in by_run.items()} == {
        "paused-h2s-csdefault-auto-r1": "recovered",
        "paused-stop-h2s-csdefault-auto-r1": "recovered",
        "paused-h30s-csdefault-auto-r1": "not-recovered",
        "paused-stop-h30s-csdefault-auto-r1": "recovered",
    }
    dead = by_run["paused-h30s-csdefault-auto-r1"]
    # the guest's clock (hpet) stood still: no stall seen, 31.2 s of guest time lost
    assert dead["longest_stall_ms"] == {"0": 0.0, "1": 0.0}
    assert dead["clock_lag_growth_ms"] == pytest.approx(31403.475)
    assert dead["time_lost_ms"] == pytest.approx(31202.811)
    assert any("took no sample" in e for e in dead["evidence"])
    assert dead["clocksource_used"] == "hpet" and dead["qemu_version"] == "7.2.22"
    assert dead["accel_used"] == "tcg thread=single"
    assert dead["pause_ms"] == pytest.approx(30023.501)
    assert dead["recovery_ms"] == pytest.approx(242.845)
    assert list(dead["timeouts"]) == ["50", "100", "1000", "5000", "30000"]
    stopped = by_run["paused-stop-h30s-csdefault-auto-r1"]
    assert stopped["vcpus_stopped_ms"] == pytest.approx(30370.961)
    assert stopped["time_lost_ms"] == pytest.approx(104.39)
    assert stopped["peer_timeouts"]["30000"] == 1 and stopped["timeouts"]["1000"] == 0
    running = by_run["paused-h2s-csdefault-auto-r1"]
    assert running["longest_stall_ms"] == {"0": 2354.396, "1": 2318.377}
    assert running["timeouts"]["1000"] == 2
    # single-threaded TCG: the vCPUs share one thread, never one running while one waits
    assert all(c["host_ran_while_blocked_ms"] == 0.0 for c in doc["cells"])


def test_recorded_study_aggregates_and_verdicts(recorded: Path) -> None:
    doc = json.loads((recorded / "study.json").read_text())
    rows = {(a["scenario"], a["hold_ms"]): a for a in doc["aggregates"]}
    assert rows[("paused", 30000.0)]["outcome_text"] == "1 of 1 not-recovered"
    assert rows[("paused-stop", 30000.0)]["outcome_text"] == "1 of 1 recovered"
    assert rows[("paused", 2000.0)]["longest_stall_ms"]["0"] == {
        "median": 2354.396, "min": 2354.396, "max": 2354.396, "n": 1,
    }  # fmt: skip
    assert rows[("paused", 30000.0)]["regimes"] == ["QEMU 7.2.22, tcg thread=single"]
    two, thirty = doc["verdicts"]
    assert two["title"] == "Hold 2s, clocksource the kernel's choice (hpet), accel auto"
    assert two["comparison"].startswith("Both policies left the guest in the same state")
    assert "stalled 2.35 s with the vCPUs running and 691 ms with them stopped" in two["comparison"]
    assert thirty["comparison"].startswith("Stopping the vCPUs left the guest in a better state")
    assert "clock stood still for 31.2 s" in thirty["comparison"]
    assert "no stall seen by the guest" in thirty["policies"][0]
    assert "cannot show CPUs running while others wait" in thirty["regime"]
    md = (recorded / "study.md").read_text()
    assert "| vCPUs kept running (paused) | 30s | default (hpet) |" in md
    assert "31.4 s (lost while running: 31.2 s)" in md
    page = (recorded / "study.html").read_text()
    assert page.count("<img ") == 2 and "data:image/png;base64," in page
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched
