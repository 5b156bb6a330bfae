"""Alignment and attribution on the hand-built run of tests/analysis_runs.py: every figure
is known exactly (see that module's docstring)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.analyze.attribution import Analysis, analyse
from analysis.analyze.findings import findings
from analysis.analyze.load import load_run
from analysis.rundir.qmp import stop_request
from tests.analysis_runs import BASE, MS, RESUME, STOP, S, build_run, write_jsonl


@pytest.fixture(scope="module")
def analysis(tmp_path_factory: pytest.TempPathFactory) -> Analysis:
    return analyse(load_run(build_run(tmp_path_factory.mktemp("hb") / "run"), strict=True))


def _phase(a: Analysis, label: str) -> int:
    return next(s.index for s in a.spans if a.phase_label(s.index) == label)


def test_phases_follow_the_qmp_sequence(analysis: Analysis) -> None:
    labels = [analysis.phase_label(s.index) for s in analysis.spans]
    assert labels == [
        "before migration", "setup", "precopy", "switchover", "postcopy-active #1",
        "postcopy-paused", "postcopy-recover", "postcopy-active #2", "completed",
    ]  # fmt: skip
    sw = analysis.spans[_phase(analysis, "switchover")]
    assert (sw.start_ns - BASE, sw.length_ns) == (3 * S, 100 * MS)


def test_alignment_finds_the_freeze_and_places_stalls_exactly(analysis: Analysis) -> None:
    (step,) = analysis.alignment.steps
    assert step.lag_ns == 100 * MS
    assert step.error_ns == 2 * MS  # two stretches of +-1 ms
    assert step.stopped_ns == 100 * MS
    p = analysis.placed
    assert (p.start - BASE).tolist() == [2 * S, 4500 * MS, 7 * S, 8 * S, 8 * S]
    assert (p.end - BASE).tolist() == [2020 * MS, 5500 * MS, 7050 * MS, 8200 * MS, 8200 * MS]
    assert p.err.tolist() == [1 * MS] * 5
    assert not p.near.any()


def test_per_phase_and_cpu_figures(analysis: Analysis) -> None:
    a = analysis
    paused, active2, pre = (
        _phase(a, n) for n in ("postcopy-paused", "postcopy-active #2", "precopy")
    )
    s = a.stat(paused, 1)
    assert s is not None
    assert (s.count, s.stalled_ns, s.longest_ns, s.p50_ns, s.p99_ns) == (1, S, S, S, S)
    assert s.fraction == 0.5 and s.alone_ns == S
    s0 = a.stat(paused, 0)
    assert s0 is not None and (s0.count, s0.stalled_ns) == (0, 0)
    c0 = a.stat(active2, 0)
    assert c0 is not None
    assert (c0.count, c0.stalled_ns, c0.longest_ns) == (2, 250 * MS, 200 * MS)
    assert (c0.p50_ns, c0.p99_ns, c0.alone_ns) == (125 * MS, 198_500_000, 50 * MS)
    assert c0.fraction == pytest.approx(250 / 2990)
    c1 = a.stat(active2, 1)
    assert c1 is not None and (c1.count, c1.stalled_ns, c1.alone_ns) == (1, 200 * MS, 0)
    p1 = a.stat(pre, 1)
    assert p1 is not None and (p1.count, p1.longest_ns) == (1, 20 * MS)


def test_asymmetry(analysis: Analysis) -> None:
    a = analysis
    by = {a.phase_label(x.phase): (x.some_ns, x.all_ns) for x in a.asymmetry}
    assert by["postcopy-paused"] == (S, 0)
    assert by["postcopy-active #2"] == (50 * MS, 200 * MS)
    assert by["precopy"] == (20 * MS, 0)
    assert by["switchover"] == (0, 0)


def test_timeout_sensitivity(analysis: Analysis) -> None:
    a = analysis
    sens = a.sensitivity
    assert sens.ladder == [10 * MS, 100 * MS, S]
    paused, active2, sw = (
        _phase(a, n) for n in ("postcopy-paused", "postcopy-active #2", "switchover")
    )
    assert sens.stalls[paused] == [1, 1, 0]  # S = 1 s expires T < 1 s only
    assert sens.stalls[active2] == [3, 2, 0]
    assert sens.worst_lane[active2] == [2, 1, 0]
    assert sens.peer[sw] == [1, 0, 0]  # the 100 ms freeze, seen from outside
    assert sens.canary == {paused: {"timer": [0, 1, 0]}}
    assert sum(sens.grid_counts[paused]) > 0


def test_points_and_validation(analysis: Analysis) -> None:
    a = analysis
    paused = _phase(a, "postcopy-paused")
    kinds = {(p.kind, p.host_ns - BASE, p.phase, p.lane) for p in a.points}
    assert kinds == {("kernel_warning", 5200 * MS, paused, 1), ("timeout", 5 * S, paused, 1)}
    (check,) = a.checks
    assert (check.host_ns, check.guest_ns, check.ok) == (100 * MS, 100 * MS, True)


def test_findings_in_plain_words(analysis: Analysis) -> None:
    texts = [f.text for f in findings(analysis)]
    assert "CPU 1 stalled 1s in postcopy-paused while CPU 0 ran" in texts
    assert any(t.startswith("the guest clock fell 100ms behind the host (±2ms)") for t in texts)
    assert any("postcopy-paused: an application with a 100ms timeout" in t for t in texts)


def test_spool_only_run_has_no_phases(tmp_path: Path) -> None:
    run = build_run(tmp_path / "spool", qmp=False)
    (run / "clock-samples.jsonl").unlink()
    (run / "meta.json").unlink()
    a = analyse(load_run(run))
    assert not a.phases_known
    assert [s.name for s in a.spans] == ["whole run (phases unknown)"]
    assert sum(s.count for s in a.stats) == 5
    assert any("phases are unknown" in f.text for f in findings(a))


def _lost_more_than_stopped(run: Path, extra_ns: int, stop_sent_before_ns: int | None) -> Path:
    """The hand-built run, but the guest lost ``extra_ns`` more than STOP -> RESUME (its
    clocks stopped before STOP, as when `stop` waits for a vCPU blocked on a page); with
    the lab's `stop` command sent ``stop_sent_before_ns`` before STOP when given."""
    build_run(run)
    path = run / "clock-samples.jsonl"
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    for sample in samples:
        if sample["host_send_real_ns"] >= BASE + RESUME:
            sample["clock"]["monotonic_ns"] -= extra_ns
            sample["clock"]["realtime_ns"] -= extra_ns
    write_jsonl(path, samples)
    if stop_sent_before_ns is not None:
        sent = BASE + STOP - stop_sent_before_ns
        steps = [{"type": "command", "endpoint": "src", "command": "stop", "arguments": {},
                  "oob": False, "host_real_ns": sent, "host_mono_ns": 0, "outcome": "reply",
                  "return": {}, "elapsed_ns": stop_sent_before_ns + MS}]  # fmt: skip
        write_jsonl(run / "lab-steps.jsonl", steps)
    return run


def test_a_stop_command_dates_the_freeze_before_its_stop_event(tmp_path: Path) -> None:
    # The guest fell 160 ms behind over a STOP -> RESUME of 100 ms.
    alone = analyse(load_run(_lost_more_than_stopped(tmp_path / "a", 60 * MS, None)))
    (check,) = alone.checks
    assert (check.host_ns, check.guest_ns, check.ok) == (100 * MS, 160 * MS, False)
    # The `stop` was sent 70 ms before STOP: the freeze began between the two, so the
    # guest's 160 ms lies in [100 ms - 15 ms, 170 ms + 15 ms].
    lab = analyse(load_run(_lost_more_than_stopped(tmp_path / "b", 60 * MS, 70 * MS)))
    (window,) = lab.alignment.windows
    assert (window.requested_ns, window.length_ns, window.length_max_ns) == (
        BASE + STOP - 70 * MS, 100 * MS, 170 * MS,
    )  # fmt: skip
    (check,) = lab.checks
    assert (check.host_ns, check.guest_ns, check.ok) == (100 * MS, 160 * MS, True)
    assert "stopped up to 70.0 ms before STOP" in check.note
    # Beyond the range it still fails: 200 ms lost.
    far = analyse(load_run(_lost_more_than_stopped(tmp_path / "c", 100 * MS, 70 * MS)))
    assert far.checks[0].ok is False


def test_stop_request_matches_its_own_endpoint_and_time() -> None:
    req = {"endpoint": "dst", "host_real_ns": 1000, "elapsed_ns": 300}
    assert stop_request("dst", 1200, [req]) == 1000
    assert stop_request("src", 1200, [req]) is None
    assert stop_request("dst", 999, [req]) is None
    assert stop_request("dst", 1300 + 1_000_001, [req]) is None
