"""Host truth per vCPU (``vcpu-states.jsonl``) joined to the guest's stalls and phases, on
the hand-built run of tests/analysis_runs.py with the vCPU threads' states added.

The host truth written here (host offsets in seconds, half-open; the destination ``dst``
runs the guest from the switchover's RESUME at 3.1 s, the source ``src`` before)::

    src vCPU 0  running 0.5-3.0, stopped 3.0-9.5
    src vCPU 1  running 0.5-2.0, halted 2.0-2.02, running 2.02-3.0, stopped 3.0-9.5
    dst vCPU 0  stopped 0.5-3.1, running 3.1-4.4, userfault 4.4-5.6, running 5.6-7.0,
                lock-wait 7.0-7.05, running 7.05-8.0, userfault 8.0-8.2, running 8.2-9.5
    dst vCPU 1  stopped 0.5-3.1, running 3.1-4.5, lock-wait 4.5-5.5, running 5.5-6.5,
                runnable 6.5-6.501, running 6.501-8.0, userfault 8.0-8.2, running 8.2-9.5

and the guest gets one stall more than the hand-built run: CPU 0 from 4.4 s for 1.2 s
(vCPU 0 blocked on a missing page while CPU 1 stalled on a QEMU lock).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.colors import to_rgba

from analysis.analyze.attribution import Analysis, analyse
from analysis.analyze.findings import findings
from analysis.analyze.load import load_run
from analysis.report.plots import BINS, HOST_COLOURS, _host_bands
from analysis.report.render import render_markdown
from analysis.report.summary import build_summary
from analysis.rundir.vcpu_states import read_vcpu_states, vcpu_interval
from tests.analysis_runs import BASE, MS, S, build_run, guest_event, qmp_event, write_jsonl
from tsprobe.cli import main

#: The QMP records' host_real_ns - host_mono_ns in analysis_runs (QEMU's timestamp and
#: mono at BASE + t, received at realtime BASE + t + 0.1 ms): the same clocks here put an
#: interval at host realtime BASE + t on mono BASE + t - 0.1 ms.
REAL_MINUS_MONO = 100_000

STATES: dict[tuple[str, int], list[tuple[str, int, int]]] = {
    ("src", 0): [("running", 500 * MS, 3 * S), ("stopped", 3 * S, 9500 * MS)],
    ("src", 1): [
        ("running", 500 * MS, 2 * S),
        ("halted", 2 * S, 2020 * MS),
        ("running", 2020 * MS, 3 * S),
        ("stopped", 3 * S, 9500 * MS),
    ],
    ("dst", 0): [
        ("stopped", 500 * MS, 3100 * MS),
        ("running", 3100 * MS, 4400 * MS),
        ("userfault", 4400 * MS, 5600 * MS),
        ("running", 5600 * MS, 7 * S),
        ("lock-wait", 7 * S, 7050 * MS),
        ("running", 7050 * MS, 8 * S),
        ("userfault", 8 * S, 8200 * MS),
        ("running", 8200 * MS, 9500 * MS),
    ],
    ("dst", 1): [
        ("stopped", 500 * MS, 3100 * MS),
        ("running", 3100 * MS, 4500 * MS),
        ("lock-wait", 4500 * MS, 5500 * MS),
        ("running", 5500 * MS, 6500 * MS),
        ("runnable", 6500 * MS, 6501 * MS),
        ("running", 6501 * MS, 8 * S),
        ("userfault", 8 * S, 8200 * MS),
        ("running", 8200 * MS, 9500 * MS),
    ],
}
WCHAN = {"userfault": "handle_userfault", "lock-wait": "futex_wait_queue", "halted": "futex_wait"}


def state_line(endpoint: str, vcpu: int, state: str, t0: int, t1: int) -> dict[str, Any]:
    """One vcpu-states.jsonl record for host offsets [t0, t1)."""
    tid = (100 if endpoint == "src" else 200) + vcpu
    rec: dict[str, Any] = {"endpoint": endpoint, "vcpu": vcpu, "tid": tid, "state": state,
                           "start_mono_ns": BASE + t0 - REAL_MINUS_MONO,
                           "end_mono_ns": BASE + t1 - REAL_MINUS_MONO,
                           "start_real_ns": BASE + t0, "end_real_ns": BASE + t1,
                           "wchan": WCHAN.get(state, "0"),
                           "samples": max(1, (t1 - t0) // (10 * MS))}  # fmt: skip
    if state == "lock-wait":
        rec["futex"] = "0x55d0c0de1000"
    return rec


def build_host_run(
    run: Path,
    qemu: str | None = "7.2.22 Debian 1:7.2+dfsg-7+deb12u18+b3",
    states: bool = True,
    blocktime: list[int] | None = None,
    also_waiting: list[str] | None = None,
) -> Path:
    """The hand-built run plus host truth (see the module docstring)."""
    build_run(run)
    meta = json.loads((run / "meta.json").read_text())
    if qemu is not None:
        meta["versions"] = {"qemu": {"src": qemu, "dst": qemu}}
    if states:
        meta["vcpu_sampler"] = {
            ep: {"pid": 4000 + k, "threads": {"0": 100 + 100 * k, "1": 101 + 100 * k},
                 "poll_ns": 10 * MS, "samples": 900, "note": None}
            for k, ep in enumerate(("src", "dst"))
        }  # fmt: skip
        lines = [
            state_line(ep, vcpu, state, t0, t1)
            for (ep, vcpu), spans in STATES.items()
            for state, t0, t1 in spans
        ]
        if also_waiting is not None:  # on dst vCPU 1's lock wait in postcopy-paused
            for line in lines:
                if (line["endpoint"], line["vcpu"], line["state"]) == ("dst", 1, "lock-wait"):
                    line["also_waiting"] = also_waiting
        lines.sort(key=lambda r: r["end_mono_ns"])  # written as intervals end
        write_jsonl(run / "vcpu-states.jsonl", lines)
    (run / "meta.json").write_text(json.dumps(meta))
    events = run / "guest-events.jsonl"
    extra = guest_event(90, "stall", 4400 * MS, duration_ns=1200 * MS, cpu=0, cause="guest-sched")
    events.write_text(events.read_text() + json.dumps(extra) + "\n")
    if blocktime is not None:
        reply = {"type": "reply", "command": "query-migrate", "latency_ns": MS,
                 "return": {"status": "completed", "postcopy-blocktime": max(blocktime),
                            "postcopy-vcpu-blocktime": blocktime},
                 "host_real_ns": BASE + 9200 * MS,
                 "host_mono_ns": BASE + 9200 * MS - REAL_MINUS_MONO}  # fmt: skip
        dst = run / "qmp-dst.jsonl"
        dst.write_text(dst.read_text() + json.dumps(reply) + "\n")
    return run


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Analysis:
    run = build_host_run(tmp_path_factory.mktemp("ht") / "run", blocktime=[0, 1000])
    return analyse(load_run(run, strict=True))


def _rows(a: Analysis) -> dict[tuple[str, str, int], dict[str, float]]:
    doc = build_summary(a)
    return {(r["phase"], r["endpoint"], r["vcpu"]): r["state_ms"] for r in doc["host_vcpu"]}


def test_state_ms_per_phase_and_vcpu(host: Analysis) -> None:
    rows = _rows(host)
    assert rows[("postcopy-paused", "dst", 0)] == {"running": 800.0, "userfault": 1200.0}
    assert rows[("postcopy-paused", "dst", 1)] == {"running": 1000.0, "lock-wait": 1000.0}
    assert rows[("postcopy-paused", "src", 0)] == {"stopped": 2000.0}
    assert rows[("postcopy-active #2", "dst", 1)] == {"running": 2789.0, "runnable": 1.0,
                                                      "userfault": 200.0}  # fmt: skip
    # every phase's states add up to its length where the sampler covered it
    doc = build_summary(host)
    lengths = {p["label"]: p["length_ms"] for p in doc["phases"]}
    for r in doc["host_vcpu"]:
        if r["phase"] not in ("before migration", "completed"):
            total = sum(r["state_ms"].values()) + r["unsampled_ms"]
            assert total == pytest.approx(lengths[r["phase"]], abs=1e-3), r
            assert r["unsampled_ms"] == 0.0, r
    ran = {(r["phase"], r["endpoint"]): r["ran_guest"] for r in doc["host_vcpu"]}
    assert ran[("precopy", "src")] and not ran[("precopy", "dst")]
    assert ran[("postcopy-paused", "dst")] and not ran[("postcopy-paused", "src")]


def test_intervals_are_clipped_at_phase_boundaries(host: Analysis) -> None:
    rows = _rows(host)
    # precopy runs 1.01 s to 3.0 s: src vCPU 1's first interval (0.5-2.0) counts from 1.01 s
    assert rows[("precopy", "src", 1)] == {"running": 1970.0, "halted": 20.0}
    assert rows[("setup", "src", 0)] == {"running": 10.0}
    # the switchover (3.0-3.1 s) holds exactly the 100 ms of stop on both sides
    assert rows[("switchover", "src", 0)] == {"stopped": 100.0}
    assert rows[("switchover", "dst", 0)] == {"stopped": 100.0}
    assert rows[("postcopy-active #1", "dst", 0)] == {"running": 900.0}
    # completed (9.0 s to the recording's end at 10 s): the sampler stopped at 9.5 s
    doc = build_summary(host)
    (done,) = [r for r in doc["host_vcpu"] if (r["phase"], r["endpoint"], r["vcpu"]) ==
               ("completed", "dst", 0)]  # fmt: skip
    assert done["state_ms"] == {"running": 500.0} and done["unsampled_ms"] == 500.0


def test_a_lock_the_main_loop_waited_for_too_is_said(tmp_path: Path) -> None:
    run = build_host_run(tmp_path / "run", also_waiting=["main"])
    doc = build_summary(analyse(load_run(run, strict=True)))
    by = {(s["cpu"], s["start_offset_ms"]): s for s in doc["host_stalls"]}
    cpu1 = by[("CPU 1", 4000.0)]
    assert cpu1["lock_shared_with"] == ["main"]
    assert cpu1["text"] == (
        "CPU 1 stalled 1s: its vCPU thread waited on a QEMU lock that QEMU's main loop waited "
        "for too while vCPU 0 was blocked on a missing page (guest hint: vcpu-blocked)"
    )
    assert by[("CPU 0", 3900.0)]["lock_shared_with"] == []
    bad = tmp_path / "bad"
    build_host_run(bad, also_waiting=["main", 7])  # type: ignore[list-item]
    doc = build_summary(analyse(load_run(bad, strict=True)))
    by = {(s["cpu"], s["start_offset_ms"]): s for s in doc["host_stalls"]}
    assert by[("CPU 1", 4000.0)]["lock_shared_with"] == []  # a malformed list is dropped


def test_stall_cause_lock_wait_while_another_vcpu_faults(host: Analysis) -> None:
    doc = build_summary(host)
    by = {(s["cpu"], s["start_offset_ms"]): s for s in doc["host_stalls"]}
    cpu1 = by[("CPU 1", 4000.0)]
    assert cpu1["host_cause"] == "lock-wait" and cpu1["guest_cause"] == "vcpu-blocked"
    assert cpu1["endpoints"] == ["dst"] and cpu1["vcpu"] == 1
    assert cpu1["state_ms"] == {"lock-wait": 1000.0}
    assert cpu1["others"] == [{"vcpu": 0, "state": "userfault", "ms": 1000.0,
                               "same_thread": False}]  # fmt: skip
    assert cpu1["text"] == (
        "CPU 1 stalled 1s: its vCPU thread waited on a QEMU lock while vCPU 0 was blocked on a "
        "missing page (guest hint: vcpu-blocked)"
    )
    cpu0 = by[("CPU 0", 3900.0)]
    assert cpu0["host_cause"] == "userfault" and cpu0["guest_cause"] == "guest-sched"
    assert cpu0["text"] == (
        "CPU 0 stalled 1.2s: its vCPU thread was blocked on a missing page while vCPU 1 waited "
        "on a QEMU lock (guest hint: guest-sched)"
    )
    assert by[("CPU 1", 1500.0)]["host_cause"] == "halted"  # precopy: the source's vCPU 1
    assert by[("CPU 1", 1500.0)]["endpoints"] == ["src"]
    assert by[("CPU 0", 6500.0)]["host_cause"] == "lock-wait"
    assert doc["host_truth"]["stall_causes"] == {"halted": 1, "userfault": 3, "lock-wait": 2}
    texts = [f.text for f in findings(host)]
    assert "postcopy-paused: " + cpu1["text"] in texts
    md = render_markdown(doc)
    assert "## Host states per phase and vCPU (ms)" in md and cpu1["text"] in md


def test_validation_guest_stalled_against_host_blocked(host: Analysis) -> None:
    checks = {c.what: c for c in host.checks}
    blocked = "blocked on the host (userfault, lock-wait, stopped)"
    paused1 = checks[f"vCPU 1 {blocked} vs CPU 1 stalled in postcopy-paused"]
    assert (paused1.host_ns, paused1.guest_ns, paused1.ok) == (S, S, True)
    paused0 = checks[f"vCPU 0 {blocked} vs CPU 0 stalled in postcopy-paused"]
    assert (paused0.host_ns, paused0.guest_ns, paused0.ok) == (1200 * MS, 1200 * MS, True)
    active0 = checks[f"vCPU 0 {blocked} vs CPU 0 stalled in postcopy-active #2"]
    assert (active0.host_ns, active0.guest_ns, active0.ok) == (250 * MS, 250 * MS, True)
    # 10 % + 5 ms + 1 ms alignment error + two 10 ms polls per run (2 runs)
    assert active0.tolerance_ns == 25 * MS + 5 * MS + 1 * MS + 40 * MS
    # the switchover's stop is QEMU's (a stop window): neither side counts it
    assert not any("switchover" in w for w in checks)
    assert all(c.ok is not False for c in host.checks), [c for c in host.checks if not c.ok]


def test_blocktime_of_qemu_before_10_1_is_a_cross_check_only(host: Analysis) -> None:
    (bt1,) = [
        c for c in host.checks if c.what.startswith("QEMU cross-check") and "vCPU 1" in c.what
    ]
    assert bt1.ok is None and bt1.host_ns == S
    (bt0,) = [
        c for c in host.checks if c.what.startswith("QEMU cross-check") and "vCPU 0" in c.what
    ]
    assert (bt0.host_ns, bt0.guest_ns, bt0.ok) == (0, 1450 * MS, None)
    assert bt0.note.startswith("QEMU's blocktime (7.2, known unreliable before 10.1) says 0 ms")
    assert "host truth: vCPU 0 blocked on missing pages 1400 ms" in bt0.note
    assert not any(f.category == "check" for f in findings(host))


def test_blocktime_of_qemu_10_1_is_judged(tmp_path: Path) -> None:
    run = build_host_run(tmp_path / "r", qemu="10.1.0", blocktime=[0, 1000])
    a = analyse(load_run(run, strict=True))
    (bt0,) = [c for c in a.checks if c.what.startswith("QEMU cross-check") and "vCPU 0" in c.what]
    assert bt0.ok is False and bt0.note.startswith("blocktime counts page-fault waits only")


def test_run_without_host_truth_says_so(tmp_path: Path) -> None:
    run = build_host_run(tmp_path / "r", states=False)
    res = CliRunner().invoke(main, ["report", str(run), "--strict"])
    assert res.exit_code == 0, res.output
    doc = json.loads((run / "summary.json").read_text())
    assert doc["host_vcpu"] == [] and doc["host_stalls"] == []
    assert doc["host_truth"]["available"] is False
    assert doc["host_truth"]["note"].startswith("no host truth: the run has no vcpu-states.jsonl")
    assert "- no host truth: the run has no vcpu-states.jsonl" in (run / "report.md").read_text()
    assert "no host truth" in (run / "report.html").read_text()
    assert not any("blocked on the host" in c["what"] for c in doc["validation"])


def test_malformed_vcpu_states_lines_are_counted_skips(tmp_path: Path) -> None:
    run = build_host_run(tmp_path / "r")
    path = run / "vcpu-states.jsonl"
    lines = path.read_text().splitlines()
    good = json.loads(lines[0])
    bad = [
        "not json at all",
        json.dumps({**good, "state": "sleeping"}),
        json.dumps({**good, "vcpu": -1}),
        json.dumps({**good, "tid": "x"}),
        json.dumps({**good, "end_mono_ns": good["start_mono_ns"] - 1}),
        json.dumps({**good, "start_real_ns": 2**63}),
        json.dumps([1, 2]),
    ]
    path.write_text("\n".join(lines + bad) + "\n")
    loaded = load_run(run)
    n = len(lines)
    reasons = {i.line: i.reason for i in loaded.skips if i.path.endswith("vcpu-states.jsonl")}
    assert sorted(reasons) == list(range(n + 1, n + 8))
    assert reasons[n + 1].startswith("not JSON")
    assert reasons[n + 2].startswith("vCPU state 'sleeping' unknown")
    assert reasons[n + 3].startswith("vCPU state with 'vcpu' -1 not an integer")
    assert reasons[n + 4].startswith("vCPU state with 'tid' 'x'")
    assert reasons[n + 5] == "vCPU state ending (monotonic) before it starts"
    assert reasons[n + 6].startswith("vCPU state with 'start_real_ns'")
    assert reasons[n + 7] == "expected a JSON object, got list"
    assert len(loaded.vcpu_states) == n
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "7 lines skipped" in res.output
    assert CliRunner().invoke(main, ["report", str(run), "--strict"]).exit_code == 1


def test_vcpu_interval_checks_and_defaults() -> None:
    rec = {"endpoint": "dst", "vcpu": 0, "tid": 4711, "state": "userfault",
           "start_mono_ns": 10, "end_mono_ns": 30, "start_real_ns": 1000}  # fmt: skip
    iv = vcpu_interval(rec, 3)
    assert not isinstance(iv, str)
    assert (iv.end_real_ns, iv.length_ns, iv.wchan, iv.samples, iv.line) == (
        1020,
        20,
        None,
        None,
        3,
    )
    assert vcpu_interval({**rec, "endpoint": ""}) == "vCPU state without an 'endpoint' name"
    assert isinstance(vcpu_interval({**rec, "vcpu": True}), str)
    optional = vcpu_interval({**rec, "samples": "many", "futex": 5, "syscall": 202})
    assert not isinstance(optional, str)
    assert (optional.samples, optional.futex, optional.syscall) == (None, None, 202)


def test_overlapping_intervals_are_cut_with_a_note(tmp_path: Path) -> None:
    path = tmp_path / "vcpu-states.jsonl"
    write_jsonl(path, [state_line("dst", 0, "running", 0, 100 * MS),
                       state_line("dst", 0, "userfault", 50 * MS, 150 * MS),
                       state_line("dst", 0, "halted", 60 * MS, 90 * MS)])  # fmt: skip
    issues: list[Any] = []
    got = read_vcpu_states(path, issues.append)
    assert [(iv.state, iv.length_ns) for iv in got] == [("running", 100 * MS),
                                                        ("userfault", 50 * MS)]  # fmt: skip
    (note,) = issues
    assert note.severity == "note" and note.line == 2 and "2 vCPU state intervals" in note.reason


def test_spool_beside_host_truth_is_still_found(tmp_path: Path) -> None:
    run = build_host_run(tmp_path / "r")
    (run / "guest-events.jsonl").rename(run / "events.jsonl")
    for name in ("qmp-src.jsonl", "qmp-dst.jsonl", "clock-samples.jsonl"):
        (run / name).unlink()
    loaded = load_run(run)
    assert len(loaded.stalls) == 6 and loaded.vcpu_states
    a = analyse(loaded)
    assert a.host is not None and not a.host.available
    assert "no QMP records" in a.host.note


def test_qmp_event_helper_matches_the_clock_pairs() -> None:
    rec = qmp_event("STOP", 3 * S)
    assert rec["host_real_ns"] - rec["host_mono_ns"] == REAL_MINUS_MONO


def test_timeline_draws_a_host_state_band_per_vcpu(host: Analysis, tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    edges = np.linspace(0.0, (host.end_ns - host.origin_ns) / 1e9, BINS + 1)
    assert _host_bands(ax, host, edges)
    colours = {tuple(float(x) for x in np.asarray(c.get_facecolor())[0]) for c in ax.collections}
    plt.close(fig)
    for state in ("running", "userfault", "lock-wait", "stopped"):
        assert to_rgba(HOST_COLOURS[state]) in colours, state
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["report", str(host.run.path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "Host states per phase and vCPU" in page


# --------------------------------------------------------------------------- lab runs

RUNS = Path(__file__).parent / "fixtures" / "runs"
#: Runs without a migration (tests/fixtures/runs holds migrations only: test_timeline).
NO_MIGRATION = Path(__file__).parent / "fixtures" / "vcpu-runs"


def test_lab_paused_on_qemu_7_2_single_threaded_tcg() -> None:
    """``tsprobe lab run --scenario paused`` (QEMU 7.2, single-threaded TCG, 3 s hold)
    recorded with the vCPU sampler: both vCPUs share one thread, which sat in
    handle_userfault for the whole of postcopy-paused."""
    a = analyse(load_run(RUNS / "vcpu-paused-qemu7.2", strict=True))
    doc = build_summary(a)
    paused = next(p for p in doc["phases"] if p["name"] == "postcopy-paused")
    for vcpu in (0, 1):
        (row,) = [r for r in doc["host_vcpu"] if (r["phase"], r["endpoint"], r["vcpu"]) ==
                  ("postcopy-paused", "dst", vcpu)]  # fmt: skip
        assert row["ran_guest"] and row["state_ms"] == {"userfault": paused["length_ms"]}
    longest = [s for s in doc["host_stalls"] if s["length_ms"] > 3000]
    assert len(longest) == 2
    for s in longest:
        assert (s["host_cause"], s["guest_cause"]) == ("userfault", "guest-sched")
        assert "its host thread (shared by every vCPU: single-threaded TCG) was blocked on a " \
            "missing page (guest hint: guest-sched)" in s["text"]  # fmt: skip
        assert all(o["same_thread"] for o in s["others"])
    checks = {c["what"]: c for c in doc["validation"]}
    for cpu in (0, 1):
        c = checks[f"vCPU {cpu} blocked on the host (userfault, lock-wait, stopped) vs CPU {cpu} "
                   "stalled in postcopy-paused"]  # fmt: skip
        assert c["ok"] is True and c["host_ms"] == pytest.approx(c["guest_ms"], abs=1.0)
    bt1 = checks["QEMU cross-check: postcopy-vcpu-blocktime vCPU 1 vs CPU 1 stalled in postcopy"]
    assert bt1["ok"] is None and bt1["host_ms"] == 0.0 and bt1["guest_ms"] > 3000
    assert bt1["note"].startswith("QEMU's blocktime (7.2, known unreliable before 10.1) says 0 ms")
    assert "host truth: vCPU 1 blocked on missing pages 31" in bt1["note"]


def test_lab_stall_vcpu_freeze_reads_stopped_on_one_vcpu_only() -> None:
    """``stall-vcpu`` (multi-threaded TCG, no migration): vCPU 1's thread frozen 700 ms by
    the cgroup freezer reads ``stopped``; vCPU 0's never does."""
    a = analyse(load_run(NO_MIGRATION / "stall-vcpu", strict=True))
    doc = build_summary(a)
    rows = {r["vcpu"]: r["state_ms"] for r in doc["host_vcpu"]}
    assert "stopped" not in rows[0] and rows[1]["stopped"] > 700
    (freeze,) = [s for s in doc["host_stalls"] if s["length_ms"] > 600]
    assert (freeze["cpu"], freeze["host_cause"]) == ("CPU 1", "stopped")
    assert freeze["others"][0]["state"] != "stopped" and not freeze["others"][0]["same_thread"]
    assert all(c["ok"] is not False for c in doc["validation"])


def test_recorded_qemu10_paused_run_one_vcpu_on_a_page_the_other_on_the_main_loops_lock() -> None:
    """QEMU 10.0.2, multi-threaded TCG, 8 s hold: the seed's case, recorded end to end."""
    doc = build_summary(analyse(load_run(RUNS / "vcpu-paused-qemu10.0", strict=True)))
    paused = next(p for p in doc["phases"] if p["name"] == "postcopy-paused")
    rows = {
        r["vcpu"]: r["state_ms"]
        for r in doc["host_vcpu"]
        if (r["phase"], r["endpoint"]) == ("postcopy-paused", "dst")
    }
    assert rows == {0: {"lock-wait": paused["length_ms"]}, 1: {"userfault": paused["length_ms"]}}
    long = {s["cpu"]: s for s in doc["host_stalls"] if s["phase"] == "postcopy-paused"}
    assert long["CPU 0"]["host_cause"] == "lock-wait"
    assert long["CPU 0"]["lock_shared_with"] == ["main"]
    assert "its vCPU thread waited on a QEMU lock that QEMU's main loop waited for too while " \
        "vCPU 1 was blocked on a missing page" in long["CPU 0"]["text"]  # fmt: skip
    assert long["CPU 1"]["host_cause"] == "userfault"
    assert doc["qemu"]["accel"].startswith("tcg thread=multi")
    checks = {c["what"]: c for c in doc["validation"]}
    for cpu in (0, 1):
        c = checks[f"vCPU {cpu} blocked on the host (userfault, lock-wait, stopped) vs CPU {cpu} "
                   "stalled in postcopy-paused"]  # fmt: skip
        assert c["ok"] is True
    # QEMU's blocktime counts missing-page time only: it cannot see vCPU 0's 8 s on the lock
    bt0 = checks["QEMU cross-check: postcopy-vcpu-blocktime vCPU 0 vs CPU 0 stalled in postcopy"]
    assert bt0["ok"] is None and bt0["host_ms"] < 1000 < 8000 < bt0["guest_ms"]
    assert bt0["note"].startswith("QEMU's blocktime (10.0, known unreliable before 10.1)")
