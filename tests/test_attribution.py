"""Alignment and attribution on the hand-built run of tests/analysis_runs.py: every figure
is known exactly (see that module's docstring)."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.attribution import Analysis, analyse
from analysis.findings import findings
from analysis.loader import load_run
from tests.analysis_runs import BASE, MS, S, build_run


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
