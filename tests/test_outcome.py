"""The guest outcome classifier (analysis/lab/outcome.py) on recorded lab runs.

tests/fixtures/outcome-runs holds real runs of ``tsprobe lab run`` on this project's
machine (2 cores, TCG), trimmed by its trim.py (QMP poll replies thinned; no host truth):

- ``recovered-hpet-2s-qemu7.2``: ``--scenario paused --hold 2s`` on QEMU 7.2.22, the
  kernel's clocksource (hpet): every CPU sampling again, no warning.
- ``soft-lockup-tsc-27s-qemu7.2``: ``--scenario paused --hold 27s --clocksource tsc``: the
  TSC bridged the pause (the guest saw 27.4 s stalls on both CPUs and lost no time) and
  the soft-lockup watchdog fired on both CPUs ("stuck for 27s!"), on the console and in
  the agent's events alike.
- ``stopped-tsc-27s-qemu7.2``: ``--scenario paused-stop --hold 27s --clocksource tsc``: the
  destination's vCPUs stopped for the pause; the guest's clocks stood still with them
  (lag growth 27.14 s for 27.13 to 27.21 s stopped), no stall longer than 0.39 s, no
  lockup: recovered, and the report says the guest could not see the freeze.
- ``timers-died-hpet-30s-qemu7.2`` and ``-qemu10.0``: ``--scenario paused --hold 30s`` with
  the hpet: the guest answered /clock after the recovery but its CLOCK_MONOTONIC stood
  still for 11 s, both samplers took no sample, and the guest clock ended 31 s behind
  the host with no stall reported. (The 7.2 run predates the health check's
  ``sampling_window_s``: its evidence says "the settle time".)

The other causes (a panic, a second boot, an agent that does not answer, ...) are tested
on copies of the recovered run with only what that fault would change edited in, each
named ``derived`` below.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from analysis.analyze.load import load_run
from analysis.lab.outcome import EXIT_CODES, OUTCOME_FILE, classify
from analysis.lab.summary import render, summarize, write_summary

RUNS = Path(__file__).parent / "fixtures" / "outcome-runs"
RECOVERED = RUNS / "recovered-hpet-2s-qemu7.2"
SOFT_LOCKUP = RUNS / "soft-lockup-tsc-27s-qemu7.2"
STOPPED = RUNS / "stopped-tsc-27s-qemu7.2"
TIMERS_DIED = [RUNS / "timers-died-hpet-30s-qemu7.2", RUNS / "timers-died-hpet-30s-qemu10.0"]


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    (dst / OUTCOME_FILE).unlink(missing_ok=True)
    return dst


def test_recovered() -> None:
    outcome = classify(RECOVERED)
    assert outcome.name == "recovered" and outcome.exit_code == 0
    assert outcome.kernel_warnings == {}
    assert outcome.evidence[0].startswith("lab-health.json: every CPU sampled again (0: ")
    assert outcome.clocksource == {"requested": None, "used": "hpet", "seen": ["hpet"]}
    assert abs(outcome.details["time_lost_ms"]) < 100


def test_soft_lockup_is_degraded_and_counted_once() -> None:
    outcome = classify(SOFT_LOCKUP)
    assert outcome.name == "degraded" and outcome.exit_code == 3
    # Two records (CPU 0 and CPU 1), each on the console and among the agent's events.
    assert outcome.kernel_warnings == {"soft_lockup": 2}
    assert outcome.evidence[0].startswith(
        'serial-dst.log: "watchdog: BUG: soft lockup - CPU#0 stuck for 27s! [timer 0:174]"'
    )
    assert outcome.evidence[0].endswith("(soft_lockup: 2 records)")
    assert outcome.clocksource == {"requested": "tsc", "used": "tsc", "seen": ["tsc"]}
    # The TSC bridged the pause: no time lost, so the lockup is the only evidence.
    assert len(outcome.evidence) == 1 and abs(outcome.details["time_lost_ms"]) < 100


def test_soft_lockup_counted_from_either_source_alone(tmp_path: Path) -> None:
    no_console = _copy(SOFT_LOCKUP, tmp_path / "a")
    (no_console / "serial-dst.log").unlink()
    assert classify(no_console).kernel_warnings == {"soft_lockup": 2}
    no_events = _copy(SOFT_LOCKUP, tmp_path / "b")
    lines = (no_events / "guest-events.jsonl").read_text().splitlines()
    kept = [x for x in lines if json.loads(x)["kind"] != "kernel_warning"]
    (no_events / "guest-events.jsonl").write_text("".join(f"{x}\n" for x in kept))
    assert classify(no_events).kernel_warnings == {"soft_lockup": 2}


@pytest.mark.parametrize("run", TIMERS_DIED, ids=lambda p: p.name)
def test_timers_died_is_not_recovered(run: Path) -> None:
    outcome = classify(run)
    assert outcome.name == "not-recovered" and outcome.exit_code == 4
    assert outcome.evidence[0].startswith("CPU 0 and 1 took no sample in the ")
    assert "(lab-health.json samplers 0: 0/s, 1: 0/s)" in outcome.evidence[0]
    (still,) = [e for e in outcome.evidence if "stood still" in e]
    assert still.startswith("clock-samples.jsonl: the guest's clock stood still: CLOCK_MONOTONIC")
    assert outcome.details["standstills"][0]["span_ns"] > 10_000_000_000
    assert outcome.details["time_lost_ms"] > 30_000
    # What hurt it comes after what kept it from recovering.
    assert outcome.evidence[-1].startswith("the guest clock lost 31.")
    assert (
        "s the vCPUs were stopped (clock-samples.jsonl: lag behind the host" in outcome.evidence[-1]
    )
    assert outcome.kernel_warnings == {}
    notes = " ".join(outcome.details["clock_notes"])
    assert "stood still for" in notes and "time the guest never saw pass" in notes


@pytest.mark.parametrize("run", TIMERS_DIED, ids=lambda p: p.name)
def test_summary_leads_with_the_outcome_and_never_says_no_stall(run: Path, tmp_path: Path) -> None:
    copy = _copy(run, tmp_path)
    summary = write_summary(copy)
    assert summary["guest_outcome"]["outcome"] == "not-recovered"
    text = (copy / "lab-summary.txt").read_text()
    assert text.startswith("guest outcome: not-recovered (clocksource hpet, the kernel choice)")
    assert "none above the threshold" not in text
    assert "stalls: none reported, and the guest could not have seen them" in text
    written = json.loads((copy / OUTCOME_FILE).read_text())
    assert set(written) == {"outcome", "evidence", "kernel_warnings", "clocksource", "details"}


def test_report_leads_with_the_outcome(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from analysis.report.cli import report

    copy = _copy(SOFT_LOCKUP, tmp_path)
    write_summary(copy)
    result = CliRunner().invoke(report, [str(copy)])
    assert result.exit_code == 0, result.output
    md = (copy / "report.md").read_text().splitlines()
    assert md[2] == "## Guest outcome: degraded (clocksource tsc, asked for)"
    assert md[4].startswith('- serial-dst.log: "watchdog: BUG: soft lockup - CPU#0 stuck')
    doc = json.loads((copy / "summary.json").read_text())
    assert doc["guest_outcome"]["outcome"] == "degraded"
    assert doc["findings"][0] == {
        "category": "outcome",
        "text": "guest outcome: degraded (clocksource tsc, asked for)",
        "warn": True,
    }
    html = (copy / "report.html").read_text()
    assert html.index("guest outcome: degraded") < html.index("<h2>Findings</h2>")


def test_a_long_stop_is_recovered_and_the_report_says_the_clock_stood_still(
    tmp_path: Path,
) -> None:
    from click.testing import CliRunner

    from analysis.report.cli import report

    outcome = classify(STOPPED)
    assert outcome.name == "recovered" and outcome.kernel_warnings == {}
    assert outcome.details["vcpus_stopped_ms"] > 27_000
    assert abs(outcome.details["time_lost_ms"]) < 200
    copy = _copy(STOPPED, tmp_path)
    write_summary(copy)
    assert CliRunner().invoke(report, [str(copy)]).exit_code == 0
    doc = json.loads((copy / "summary.json").read_text())
    (note,) = [f["text"] for f in doc["findings"] if "this freeze is not a stall" in f["text"]]
    assert note.startswith("QEMU had the vCPUs stopped for 27.13s in 2 windows (STOP to RESUME)")
    assert "the guest's clocks (tsc) stood still with them" in note
    assert "no CPU could see it as a gap" in note and "a peer outside the guest" in note
    assert note in (copy / "report.md").read_text()


def test_report_of_a_run_without_an_outcome_has_none(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from analysis.report.cli import report

    copy = _copy(RECOVERED, tmp_path)
    assert CliRunner().invoke(report, [str(copy)]).exit_code == 0
    doc = json.loads((copy / "summary.json").read_text())
    assert doc["guest_outcome"] is None
    assert all(f["category"] != "outcome" for f in doc["findings"])


# -- derived from the recovered run: only what the fault would change is edited ----------


def _append(path: Path, text: str) -> None:
    with path.open("a") as fh:
        fh.write(text)


@pytest.mark.parametrize(
    ("line", "evidence"),
    [
        (  # a panic
            "[   31.123456] Kernel panic - not syncing: hung_task\n",
            'serial-dst.log: "Kernel panic - not syncing: hung_task": the guest panicked',
        ),
        (  # a second boot
            "tsprobe-lab: init at 2.71s\n",
            'serial-dst.log: "tsprobe-lab: init at 2.71s": the guest booted again',
        ),
    ],
)
def test_derived_serial_line_is_not_recovered(tmp_path: Path, line: str, evidence: str) -> None:
    run = _copy(RECOVERED, tmp_path)
    _append(run / "serial-dst.log", line)
    outcome = classify(run)
    assert outcome.name == "not-recovered"
    assert outcome.evidence == (evidence,)


def test_derived_agent_not_answering_is_not_recovered(tmp_path: Path) -> None:
    run = _copy(RECOVERED, tmp_path)
    health = json.loads((run / "lab-health.json").read_text())
    problem = "agent on dst does not answer: timed out"
    health.update(ok=False, problems=[problem], answer_s=None, probes_up_s=None, samples_per_s={})
    (run / "lab-health.json").write_text(json.dumps(health))
    outcome = classify(run)
    assert outcome.name == "not-recovered"
    assert outcome.evidence == (f"lab-health.json: {problem}",)


def test_derived_rcu_stall_and_boot_warnings(tmp_path: Path) -> None:
    run = _copy(RECOVERED, tmp_path)
    # Before the agent was up (boot) a warning changes nothing; after, it degrades.
    src = (run / "serial-src.log").read_text()
    boot_line = "[    2.500000] clocksource: timekeeping watchdog on CPU1: Marking clocksource 'tsc' as unstable because the skew is too large:\n"  # noqa: E501
    (run / "serial-src.log").write_text(boot_line + src)
    assert classify(run).name == "recovered"
    assert classify(run).details["boot_warnings"]
    _append(
        run / "serial-dst.log", "[   30.000001] rcu: INFO: rcu_preempt self-detected stall on CPU\n"
    )
    outcome = classify(run)
    assert outcome.name == "degraded" and outcome.kernel_warnings == {"rcu_stall": 1}
    assert outcome.evidence[0].startswith('serial-dst.log: "rcu: INFO: rcu_preempt self-detected')


def test_derived_injected_line_is_not_a_warning(tmp_path: Path) -> None:
    run = _copy(RECOVERED, tmp_path)
    line = "watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [lab-app:42]"
    _append(run / "lab-steps.jsonl", json.dumps({"type": "kmsg", "text": line}) + "\n")
    event = {"v": 1, "seq": 999, "kind": "kernel_warning", "mono_ns": 9_000_000_000,
             "real_ns": 1, "warning": "soft_lockup", "text": line, "facility": 1}  # fmt: skip
    _append(run / "guest-events.jsonl", json.dumps(event) + "\n")
    _append(run / "serial-dst.log", f"[    9.000000] {line}\n")
    outcome = classify(run)
    assert outcome.name == "recovered" and outcome.kernel_warnings == {}
    assert outcome.details["injected_warnings"] == 1


def test_derived_lab_errors(tmp_path: Path) -> None:
    run = _copy(RECOVERED, tmp_path / "a")
    health = json.loads((run / "lab-health.json").read_text())
    health["memory"]["bad_pages"] = 3
    (run / "lab-health.json").write_text(json.dumps(health))
    outcome = classify(run)
    assert outcome.name == "lab-error"
    assert "3 of 16384 workload pages lost a write" in outcome.evidence[0]
    gone = _copy(RECOVERED, tmp_path / "b")
    (gone / "lab-health.json").unlink()
    assert classify(gone).evidence == (
        "lab-health.json is missing: the run ended before the health check",
    )


def test_exit_codes_are_distinct_and_leave_1_and_2_to_the_tool() -> None:
    assert EXIT_CODES == {"recovered": 0, "degraded": 3, "not-recovered": 4, "lab-error": 5}


def test_derived_recovery_that_never_came_is_not_recovered_not_a_lab_error(
    tmp_path: Path,
) -> None:
    # A libvirt run whose --postcopy-resume left the destination in postcopy-paused
    # (analysis/lab/libvirt.py): the lab wrote recovery_failed, then lab_error, and ended
    # the run before the health check, its destination monitor unanswered.
    run = _copy(RECOVERED, tmp_path)
    (run / "lab-health.json").unlink()
    error = "dst did not reach postcopy-active or completed within 60 s (last: postcopy-paused)"
    for record in (
        {"type": "recovery_failed", "command": "virsh migrate --postcopy-resume",
         "waited_s": 60.0, "paused_for_s": 63.2, "error": error},
        {"type": "lab_error", "error": error},
    ):  # fmt: skip
        _append(run / "lab-steps.jsonl", json.dumps(record) + "\n")
    for i, command in enumerate(("query-migrate", "query-migrate", "query-status")):
        timeout = {"type": "timeout", "command": command, "timeout_ns": 1_000_000_000,
                   "sent_mono_ns": i, "host_real_ns": i, "host_mono_ns": i}  # fmt: skip
        _append(run / "qmp-dst.jsonl", json.dumps(timeout) + "\n")
    outcome = classify(run)
    assert outcome.name == "not-recovered"
    assert outcome.evidence == (
        "lab-steps.jsonl: the migration was never recovered: virsh migrate --postcopy-resume"
        f" did not take the destination out of postcopy-paused in 60.0 s ({error}); the guest"
        " stayed on a destination missing pages",
        # the recorded run's own monitor timeout (a query-migrate during its pause) and ours
        "qmp-dst.jsonl: the destination's monitor left 4 commands unanswered past the"
        " recorder's timeout (query-migrate 3, query-status 1)",
    )
    # Without the recovery_failed step the same run is the lab's error.
    steps = (run / "lab-steps.jsonl").read_text().splitlines(keepends=True)
    (run / "lab-steps.jsonl").write_text("".join(s for s in steps if "recovery_failed" not in s))
    assert classify(run).name == "lab-error"


def test_a_first_migrate_that_never_returned_is_named_in_the_evidence(tmp_path: Path) -> None:
    # A pause during libvirt's Finish phase on the destination: the first virsh migrate got no
    # answer, and libvirt refused --postcopy-resume while it ran (analysis/lab/libvirt.py).
    run = _copy(RECOVERED, tmp_path)
    (run / "lab-health.json").unlink()
    error = "... is being actively monitored by another thread"
    for returned in (True, False):
        record = {"type": "recovery_failed", "command": "virsh migrate --postcopy-resume",
                  "waited_s": 60.0, "paused_for_s": 60.2, "error": error,
                  "first_migrate_returned": returned}  # fmt: skip
        (run / "lab-steps.jsonl").write_text(json.dumps(record) + "\n")
        outcome = classify(run)
        assert outcome.name == "not-recovered"
        named = [e for e in outcome.evidence if "the first virsh migrate never returned" in e]
        assert len(named) == (0 if returned else 1), outcome.evidence


def test_events_the_agent_counted_but_the_recorder_never_got_are_not_continuous(
    tmp_path: Path,
) -> None:
    # A CI run: the agent counted 37 events, the recorder's /events fetches after a paused
    # postcopy failed and its file ended at seq 12; it had read "continuous".
    run = _copy(RECOVERED, tmp_path)
    last = 83  # the fixture's last seq, one agent start
    for counted, unfetched in ((last, 0), (last + 5, 5)):
        (run / "agent-metrics.prom").write_text(
            "# TYPE tsprobe_events_total counter\n"
            f'tsprobe_events_total{{kind="stall"}} {counted - 3}\n'
            'tsprobe_events_total{kind="agent_start"} 1\n'
            'tsprobe_events_total{kind="probe_status"} 2\n'
        )
        cont = summarize(run)["continuity"]
        assert (cont["unfetched"], cont["continuous"]) == (unfetched, not unfetched), cont
    line = next(x for x in render(summarize(run)).splitlines() if "events:" in x)
    assert line == "  events: 83 (seq 1..83), 5 the agent counted never arrived, agent starts 1"
    # The recorder's own word that its last fetch failed (meta.json), with the loader's note.
    meta = json.loads((run / "meta.json").read_text())
    meta["agents"]["guest"].update(final_fetch=False, agent_last_seq=83)
    (run / "meta.json").write_text(json.dumps(meta))
    assert summarize(run)["continuity"]["last_fetch_failed"] is True
    notes = [i.reason for i in load_run(run).issues if i.path.endswith("meta.json")]
    assert notes == [
        "agent 'guest': the recorder's last fetch of events failed, so events after seq 83"
        " may be missing from this run"
    ]
    meta["agents"]["guest"].update(final_fetch=True, agent_last_seq=90)
    (run / "meta.json").write_text(json.dumps(meta))
    notes = [i.reason for i in load_run(run).issues if i.path.endswith("meta.json")]
    assert notes == [
        "agent 'guest' had assigned seq up to 90, the recording ends at 83: 7 events never"
        " reached the recorder"
    ]


def test_workers_behind_at_the_end_are_not_continuous(tmp_path: Path) -> None:
    # A CI run: a paused postcopy's 1 s timeout of one CPU's timer canary never reached the
    # run directory, while every seq the agent had assigned did; the recorder now waits for
    # the workers and says which stayed behind (meta.json).
    run = _copy(RECOVERED, tmp_path)
    meta = json.loads((run / "meta.json").read_text())
    for behind in ({}, {"timer cpu 1": 81_234_000_000}):
        meta["agents"]["guest"].update(drained=not behind, workers_behind=behind)
        (run / "meta.json").write_text(json.dumps(meta))
        cont = summarize(run)["continuity"]
        assert (cont["workers_behind"], cont["continuous"]) == (sorted(behind), not behind)
    line = next(x for x in render(summarize(run)).splitlines() if "events:" in x)
    assert line == (
        "  events: 83 (seq 1..83), timer cpu 1 had not reported past the end, agent starts 1"
    )
    notes = [i.reason for i in load_run(run).issues if i.path.endswith("meta.json")]
    assert notes == [
        "agent 'guest': timer cpu 1 had not reported past the end of the recording, so what"
        " they measured last may be missing"
    ]
