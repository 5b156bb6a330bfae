"""The migration phase timeline (analysis.analyze.timeline) and ``tsprobe timeline``.

The realistic sequences are tests/fixtures/qmp/*.jsonl, transcribed from QEMU 7.2
migrations of two bare machines on loopback (see the README there for how and the exact
event order), and two paused lab runs (tests/fixtures/lab-runs/paused-qemu7.2 and
paused-qemu10.0, copied from ``tsprobe lab run --scenario paused``, the latter with
``--qemu 10.0``). The small hand-built sequences below follow the same order and cover
what those runs did not show (an unknown status, a stop and cont, pre-switchover, polls
only, QEMU 10.0's ``device`` at the switchover and its recoveries).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from analysis.analyze.timeline import build_timeline
from analysis.analyze.timeline_model import Timeline, phase_name
from analysis.rundir import read_jsonl_numbered
from tsprobe.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
QMP_FIXTURES = FIXTURES / "qmp"
RUN_FIXTURES = FIXTURES / "runs"
LAB_FIXTURES = FIXTURES / "lab-runs"
TSPROBE = Path(sys.executable).parent / "tsprobe"

BASE = 1_795_640_000_000_000_000  # ns; around the time the fixtures were recorded


# --------------------------------------------------------------------------- helpers


def fixture_records(scenario: str) -> dict[str, list[dict[str, Any]]]:
    """The src and dst records of a transcribed QEMU 7.2 run."""
    out = {}
    for ep in ("src", "dst"):
        path = QMP_FIXTURES / f"{scenario}-{ep}.jsonl"
        out[ep] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def make_run(tmp_path: Path, scenario: str) -> Path:
    """A run directory holding a fixture's two QMP files."""
    run = tmp_path / scenario
    run.mkdir()
    for ep in ("src", "dst"):
        shutil.copy(QMP_FIXTURES / f"{scenario}-{ep}.jsonl", run / f"qmp-{ep}.jsonl")
    return run


def first_event(records: list[dict[str, Any]], event: str, status: str | None = None) -> int:
    """QEMU's timestamp (ns) of the first such event in a fixture."""
    for rec in records:
        if rec.get("type") != "event" or rec.get("event") != event:
            continue
        if status is not None and rec["data"].get("status") != status:
            continue
        ts = rec["timestamp"]
        return int(ts["seconds"]) * 1_000_000_000 + int(ts["microseconds"]) * 1_000
    raise AssertionError(f"no {event} {status or ''} in fixture")


def ev(t_us: int, event: str, **data: Any) -> dict[str, Any]:
    """An event record at BASE + t_us, received 300 us later."""
    t = BASE + t_us * 1_000
    return {
        "type": "event",
        "event": event,
        "data": data,
        "timestamp": {"seconds": t // 1_000_000_000, "microseconds": t % 1_000_000_000 // 1_000},
        "host_real_ns": t + 300_000,
        "host_mono_ns": 1_000_000_000 + t_us * 1_000,
    }


def mig(t_us: int, status: str) -> dict[str, Any]:
    """A MIGRATION event."""
    return ev(t_us, "MIGRATION", status=status)


def reply(t_us: int, ret: dict[str, Any], command: str = "query-migrate") -> dict[str, Any]:
    """A reply record received at BASE + t_us."""
    return {
        "type": "reply",
        "command": command,
        "return": ret,
        "host_real_ns": BASE + t_us * 1_000,
        "host_mono_ns": 1_000_000_000 + t_us * 1_000,
    }


def at(t_us: int) -> int:
    return BASE + t_us * 1_000


def assert_contiguous(tl: Timeline) -> None:
    for before, after in zip(tl.phases, tl.phases[1:], strict=False):
        assert before.end_ns == after.start_ns, (before.name, after.name)
        assert before.end_ns is not None and before.start_ns <= before.end_ns


def runner() -> CliRunner:
    """A CliRunner keeping stderr apart (click 8.1 needs mix_stderr=False; 8.2 dropped it)."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def invoke(*args: str) -> Any:
    return runner().invoke(main, ["timeline", *args], catch_exceptions=False)


# --------------------------------------------------------------------------- QEMU 7.2 runs


def test_precopy_phases_from_qemu_72() -> None:
    recs = fixture_records("precopy")
    tl = build_timeline(recs)
    assert tl.names() == ["setup", "precopy", "stop-and-copy", "completed"]
    assert_contiguous(tl)
    setup, precopy, stop, done = tl.phases
    assert setup.start_ns == first_event(recs["src"], "MIGRATION", "setup")
    assert setup.start_by.endpoints == ("src",) and setup.start_by.clock == "qemu"
    assert precopy.start_ns == first_event(recs["src"], "MIGRATION", "active")
    assert precopy.passes == (1, 2)  # pass 1 is reported during setup, it belongs here
    # the pause the guest feels: source STOP to destination RESUME
    stop_ns = first_event(recs["src"], "STOP")
    resume_ns = first_event(recs["dst"], "RESUME")
    assert (stop.start_ns, stop.end_ns) == (stop_ns, resume_ns)
    assert stop.start_by.label() == "src STOP" and stop.end_by is not None
    assert stop.end_by.label() == "dst RESUME"
    assert stop.vm_stopped and stop.passes == (3,)
    assert stop.details["qemu_downtime_ms"] == 30
    # the source stays "active" until it reports completed; the guest already runs on dst
    assert done.start_ns == resume_ns and done.end_ns is None
    assert any("dst reported completed" in n for n in done.notes)
    summary = tl.summary()
    assert summary.outcome == "completed"
    assert summary.downtime_ns == resume_ns - stop_ns
    assert summary.qemu_downtime_ms == 30 and summary.qemu_total_time_ms == 2447
    assert tl.statuses("src") == ["setup", "active", "completed"]
    assert tl.statuses("dst") == ["setup", "active", "completed"]
    assert summary.final_status == {"src": "completed", "dst": "completed"}
    assert tl.endpoint("src").role == "source" and tl.endpoint("dst").role == "destination"
    assert tl.issues == ()


def test_phase_at() -> None:
    tl = build_timeline(fixture_records("precopy"))
    stop = tl.phases[2]
    assert stop.end_ns is not None
    assert tl.phase_at(stop.start_ns) is stop
    assert tl.phase_at((stop.start_ns + stop.end_ns) // 2) is stop
    assert tl.phase_at(stop.end_ns) is tl.phases[3]  # half-open
    assert tl.phase_at(tl.phases[0].start_ns - 1) is None
    assert tl.phase_at(stop.end_ns + 10**12) is tl.phases[-1]  # the outcome is open


def test_postcopy_phases_from_qemu_72() -> None:
    recs = fixture_records("postcopy")
    tl = build_timeline(recs)
    assert tl.names() == ["setup", "precopy", "switchover", "postcopy-active", "completed"]
    assert_contiguous(tl)
    precopy, switchover, postcopy = tl.phases[1:4]
    stop_ns = first_event(recs["src"], "STOP")
    resume_ns = first_event(recs["dst"], "RESUME")
    # QEMU sets postcopy-active just before the STOP: the guest is in precopy until STOP
    assert first_event(recs["src"], "MIGRATION", "postcopy-active") < stop_ns
    assert precopy.end_ns == stop_ns
    assert (switchover.start_ns, switchover.end_ns) == (stop_ns, resume_ns)
    assert switchover.passes == (2,)
    assert switchover.details["qemu_downtime_ms"] == 2
    assert any("not the pause the guest feels" in n for n in switchover.notes)
    assert postcopy.start_ns == resume_ns and postcopy.status == "postcopy-active"
    summary = tl.summary()
    assert summary.downtime_ns == resume_ns - stop_ns
    assert summary.downtime_ns is not None and summary.qemu_downtime_ms is not None
    assert summary.downtime_ns > summary.qemu_downtime_ms * 1_000_000  # the felt pause is longer
    assert summary.postcopy_blocktime_ms == 0 and summary.postcopy_vcpu_blocktime_ms == (0,)
    assert tl.pauses[0].name == "switchover" and tl.pauses[0].handover


def test_postcopy_paused_and_recovered_from_qemu_72() -> None:
    recs = fixture_records("postcopy-paused")
    tl = build_timeline(recs)
    assert tl.names() == [
        "setup",
        "precopy",
        "switchover",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover-setup",
        "postcopy-recover",
        "postcopy-active",
        "completed",
    ]
    assert_contiguous(tl)
    paused = tl.phases[4]
    # the destination saw the broken stream first; the pause starts there
    dst_paused = first_event(recs["dst"], "MIGRATION", "postcopy-paused")
    src_paused = first_event(recs["src"], "MIGRATION", "postcopy-paused")
    assert dst_paused < src_paused
    assert paused.start_ns == dst_paused and paused.start_by.endpoints == ("dst", "src")
    assert paused.start_by.label() == "dst+src MIGRATION postcopy-paused"
    # QEMU 7.2 has no postcopy-recover-setup: the destination says "setup" after migrate-recover
    recover_setup = tl.phases[5]
    assert recover_setup.start_by.label() == "dst MIGRATION setup"
    assert tl.statuses("dst") == [
        "setup",
        "active",
        "postcopy-active",
        "postcopy-paused",
        "setup",
        "postcopy-recover",
        "postcopy-active",
        "completed",
    ]
    assert tl.statuses("src") == [
        "setup",
        "active",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
        "postcopy-active",
        "completed",
    ]
    assert tl.summary().outcome == "completed"
    assert len(tl.pauses) == 1  # postcopy-paused is not a vCPU stop


def test_cancelled_from_qemu_72() -> None:
    tl = build_timeline(fixture_records("cancelled"))
    assert tl.names() == ["setup", "precopy", "cancelling", "cancelled"]
    assert_contiguous(tl)
    # the destination fails its incoming side first; the source's outcome is the migration's
    assert any(
        "dst reported failed; the source went on to cancelled" in n for n in tl.phases[1].notes
    )
    assert any("dst: monitor closed" in n for n in tl.phases[2].notes)
    summary = tl.summary()
    assert summary.outcome == "cancelled" and summary.downtime_ns is None
    assert summary.final_status == {"src": "cancelled", "dst": "failed"}
    assert summary.qemu_setup_time_ms == 2 and summary.qemu_total_time_ms is None


def test_failed_from_qemu_72() -> None:
    tl = build_timeline(fixture_records("failed"))
    assert tl.names() == ["setup", "precopy", "failed"]
    failed = tl.phases[-1]
    assert failed.details["qemu_error"] == {"src": "Unable to write to socket: Bad file descriptor"}
    assert any("dst: monitor closed" in n for n in tl.phases[1].notes)
    assert tl.final_status("dst") == "active"
    assert tl.summary().outcome == "failed"


def test_records_out_of_order_within_and_across_files() -> None:
    recs = fixture_records("postcopy-paused")
    expected = build_timeline(recs)
    rng = random.Random(7)
    shuffled = {ep: rng.sample(records, len(records)) for ep, records in recs.items()}
    # endpoints given destination first, each file's lines shuffled
    got = build_timeline({"dst": shuffled["dst"], "src": shuffled["src"]})
    assert [p.to_dict() for p in got.phases] == [p.to_dict() for p in expected.phases]
    assert got.statuses("dst") == expected.statuses("dst")


def test_destination_file_holding_the_earlier_records() -> None:
    # dst's file starts before src's (migrate-incoming runs first) and the dst is listed first
    recs = fixture_records("precopy")
    tl = build_timeline({"dst": recs["dst"], "src": recs["src"]})
    assert tl.names() == ["setup", "precopy", "stop-and-copy", "completed"]
    assert tl.phases[0].start_by.endpoints == ("src",)  # the source leads setup
    assert tl.origin_ns is not None and tl.origin_ns < tl.phases[0].start_ns


# --------------------------------------------------------------------------- hand-built


def precopy_prefix() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The start QEMU 7.2 emits (see the fixtures): dst setup first, then src."""
    src = [mig(3_000, "setup"), ev(5_000, "MIGRATION_PASS", **{"pass": 1}), mig(5_100, "active")]
    dst = [mig(0, "setup"), mig(4_000, "active")]
    return src, dst


def test_unknown_status_is_kept_by_name() -> None:
    src, dst = precopy_prefix()
    src += [mig(500_000, "teleporting"), mig(700_000, "completed")]
    dst += [mig(699_000, "completed")]
    tl = build_timeline({"src": src, "dst": dst})
    assert tl.names() == ["setup", "precopy", "teleporting", "completed"]
    assert tl.phases[2].start_ns == at(500_000) and tl.phases[2].status == "teleporting"
    notes = [i for i in tl.issues if i.severity == "note"]
    assert [(i.endpoint, i.index) for i in notes] == [("src", 3)]
    assert "unknown migration status 'teleporting'" in notes[0].message
    assert tl.skipped == ()


def test_unknown_status_inside_a_pause_splits_it() -> None:
    src, dst = precopy_prefix()
    src += [ev(400_000, "STOP"), mig(410_000, "sealing"), mig(430_000, "completed")]
    dst += [ev(429_000, "RESUME"), mig(429_100, "completed")]
    tl = build_timeline({"src": src, "dst": dst})
    assert tl.names() == ["setup", "precopy", "stop-and-copy", "sealing", "completed"]
    assert tl.phases[3].vm_stopped
    assert tl.summary().downtime_ns == at(429_000) - at(400_000)


def test_pre_switchover_and_device_are_kept() -> None:
    # pause-before-switchover: STOP, pre-switchover (waits for migrate-continue), device
    src, dst = precopy_prefix()
    src += [
        ev(400_000, "STOP"),
        mig(400_100, "pre-switchover"),
        mig(600_000, "device"),
        mig(640_000, "completed"),
    ]
    dst += [ev(639_000, "RESUME"), mig(639_100, "completed")]
    tl = build_timeline({"src": src, "dst": dst})
    assert tl.names() == [
        "setup",
        "precopy",
        "stop-and-copy",
        "pre-switchover",
        "device",
        "completed",
    ]
    assert [p.vm_stopped for p in tl.phases] == [False, False, True, True, True, False]
    assert tl.pauses[0].start_ns == at(400_000) and tl.pauses[0].end_ns == at(639_000)
    assert tl.summary().downtime_ns == at(639_000) - at(400_000)


def test_failed_after_stop_resumes_on_the_source() -> None:
    # The stream breaks during stop-and-copy: the source fails and restarts its guest.
    src, dst = precopy_prefix()
    src += [ev(400_000, "STOP"), mig(420_000, "failed"), ev(420_500, "RESUME")]
    dst += [mig(419_000, "failed")]
    tl = build_timeline({"src": src, "dst": dst})
    assert tl.names() == ["setup", "precopy", "stop-and-copy", "failed"]
    stop = tl.phases[2]
    assert stop.end_ns == at(420_500) and stop.end_by is not None
    assert stop.end_by.label() == "src RESUME"
    assert any("guest resumed on src" in n for n in stop.notes)
    assert not tl.pauses[0].handover
    assert tl.summary().downtime_ns is None and tl.summary().paused_ns == 20_500_000


def test_stop_and_cont_on_the_source_is_not_a_switchover() -> None:
    src, dst = precopy_prefix()
    src += [ev(200_000, "STOP"), ev(300_000, "RESUME"), ev(900_000, "STOP")]
    src += [mig(930_000, "completed")]
    dst += [ev(929_000, "RESUME"), mig(929_200, "completed")]
    tl = build_timeline({"src": src, "dst": dst})
    assert tl.names() == [
        "setup",
        "precopy",
        "vm-stopped",
        "precopy",
        "stop-and-copy",
        "completed",
    ]
    assert tl.summary().downtime_ns == at(929_000) - at(900_000)
    assert tl.summary().paused_ns == at(929_000) - at(900_000) + 100_000_000


def test_source_only_run_ends_the_pause_at_the_outcome() -> None:
    src, _ = precopy_prefix()
    src += [ev(400_000, "STOP"), mig(430_000, "completed")]
    tl = build_timeline({"src": src})
    assert tl.names() == ["setup", "precopy", "stop-and-copy", "completed"]
    assert tl.phases[2].end_ns == at(430_000)
    assert any("no RESUME recorded" in n for n in tl.phases[2].notes)


def test_recording_that_stops_mid_migration_leaves_the_last_phase_open() -> None:
    src, dst = precopy_prefix()
    tl = build_timeline({"src": src, "dst": dst})
    assert tl.names() == ["setup", "precopy"]
    assert tl.phases[-1].is_open and tl.phases[-1].duration_ns is None
    assert tl.summary().outcome is None and tl.summary().total_ns is None
    open_stop = build_timeline({"src": [*src, ev(90_000, "STOP")], "dst": dst})
    assert open_stop.names() == ["setup", "precopy", "stop-and-copy"]
    assert open_stop.pauses[0].end_ns is None and open_stop.phases[-1].is_open


def test_started_mid_migration_uses_the_first_poll() -> None:
    # the recorder attached during postcopy: no setup event, a poll says postcopy-active
    src = [
        reply(0, {"status": "postcopy-active", "ram": {"remaining": 4096}}),
        reply(100_000, {"status": "postcopy-active", "ram": {"remaining": 0}}),
        mig(150_000, "completed"),
        reply(200_000, {"status": "completed", "downtime": 2, "total-time": 3000}),
    ]
    tl = build_timeline({"src": src})
    assert tl.names() == ["postcopy-active", "completed"]
    assert tl.phases[0].start_by.clock == "poll"
    assert tl.phases[0].start_by.what == "query-migrate postcopy-active"
    assert tl.phases[1].start_by.clock == "qemu"
    assert tl.statuses("src") == ["postcopy-active", "completed"]


def test_polls_only_without_the_events_capability() -> None:
    src = [
        reply(0, {"status": "setup"}),
        reply(100_000, {"status": "active", "ram": {}}),
        reply(200_000, {"status": "active", "ram": {}}),
        reply(300_000, {"status": "completed", "ram": {}, "downtime": 40}),
    ]
    dst = [reply(50_000, {"status": "active", "socket-address": []})]
    tl = build_timeline({"a": src, "b": dst})  # roles from what they said
    assert tl.endpoint("a").role == "source" and tl.endpoint("b").role == "destination"
    assert tl.names() == ["setup", "precopy", "completed"]
    assert {p.start_by.clock for p in tl.phases} == {"poll"}


def test_event_without_timestamp_falls_back_to_host_time() -> None:
    src, dst = precopy_prefix()
    late = mig(600_000, "completed")
    del late["timestamp"]
    src.append(late)
    tl = build_timeline({"src": src, "dst": dst})
    assert tl.phases[-1].start_by.clock == "host"
    assert tl.phases[-1].start_ns == late["host_real_ns"]


def test_roles_from_behaviour_when_names_say_nothing() -> None:
    src, dst = precopy_prefix()
    tl = build_timeline({"left": dst, "right": src})  # right sends MIGRATION_PASS
    assert tl.endpoint("right").role == "source"
    assert tl.phases[0].start_by.endpoints == ("right",)


def test_bad_records_are_skipped_with_their_position() -> None:
    src, dst = precopy_prefix()
    bad: list[Any] = [
        {"host_real_ns": 1},  # 3: no type
        {"type": "event", "event": "MIGRATION", "data": {}, "host_real_ns": at(1)},  # 4
        {"type": "reply", "command": "query-migrate", "return": {"status": "setup"}},  # 5
        {"type": "reply", "command": "query-migrate", "return": "oops", "host_real_ns": 7},  # 6
        ["not", "an", "object"],  # 7
        {"type": "event", "event": "MIGRATION_PASS", "data": {"pass": "two"}, "host_real_ns": 9},
        {"type": "brand-new-type", "host_real_ns": 9},  # ignored, not skipped
        {"type": "event", "event": "BLOCK_JOB_READY", "data": {}, "host_real_ns": 9},  # ignored
    ]
    tl = build_timeline({"src": src, "dst": dst + bad})
    assert [(i.endpoint, i.index) for i in tl.skipped] == [
        ("dst", 2),
        ("dst", 3),
        ("dst", 4),
        ("dst", 5),
        ("dst", 6),
        ("dst", 7),
    ]
    messages = [i.message for i in tl.skipped]
    assert messages[0] == "record without a 'type'"
    assert messages[1] == "MIGRATION event without data.status"
    assert "host_real_ns" in messages[2]
    assert tl.names() == ["setup", "precopy"]


def test_a_second_attempt_after_a_cancel() -> None:
    src, dst = precopy_prefix()
    src += [mig(300_000, "cancelling"), mig(310_000, "cancelled")]
    dst += [mig(305_000, "failed")]
    src += [mig(900_000, "setup"), ev(901_900, "MIGRATION_PASS", **{"pass": 1})]
    src += [mig(902_000, "active"), ev(1_500_000, "STOP")]
    src += [mig(1_530_000, "completed")]
    dst2 = [mig(899_000, "setup"), mig(901_000, "active"), ev(1_529_000, "RESUME")]
    dst2 += [mig(1_529_100, "completed")]
    tl = build_timeline({"src": src, "dst": dst + dst2})
    assert tl.names() == [
        "setup",
        "precopy",
        "cancelling",
        "cancelled",
        "setup",
        "precopy",
        "stop-and-copy",
        "completed",
    ]
    assert tl.statuses("dst")[-1] == "completed"
    assert tl.phases[1].passes == (1,) and tl.phases[5].passes == (1,)  # pass 1 again


def test_a_second_monitor_of_the_source() -> None:
    # the recorder's own monitor plus libvirt's stream of the same source QEMU
    recs = fixture_records("precopy")
    tl = build_timeline({"src": recs["src"], "src-libvirt": recs["src"], "dst": recs["dst"]})
    assert tl.names() == ["setup", "precopy", "stop-and-copy", "completed"]
    assert tl.phases[1].passes == (1, 2) and tl.phases[2].passes == (3,)
    assert tl.phases[0].start_by.endpoints == ("src", "src-libvirt")
    assert len(tl.pauses) == 1 and tl.pauses[0].handover


def test_monitor_timeouts_are_counted_per_phase() -> None:
    recs = fixture_records("postcopy-paused")
    paused_at = first_event(recs["dst"], "MIGRATION", "postcopy-paused")
    hung = [
        {
            "type": "timeout",
            "command": "query-status",
            "timeout_ns": 500_000_000,
            "host_real_ns": paused_at + k * 100_000_000,
            "host_mono_ns": 1,
        }
        for k in (1, 2, 3)
    ]
    tl = build_timeline({"src": recs["src"], "dst": recs["dst"] + hung})
    paused = tl.phase_at(paused_at)
    assert paused is not None and paused.name == "postcopy-paused"
    assert "dst: 3 x timeout query-status" in paused.notes
    assert tl.skipped == ()


def test_phases_are_hashable_values() -> None:
    tl = build_timeline(fixture_records("precopy"))
    assert len(set(tl.phases)) == len(tl.phases)
    assert build_timeline(fixture_records("precopy")).phases == tl.phases


def test_no_records_no_phases() -> None:
    tl = build_timeline({})
    assert tl.phases == () and tl.origin_ns is None and tl.phase_at(BASE) is None
    assert tl.summary().outcome is None
    assert build_timeline({"src": []}).statuses("src") == []


def test_to_dict_is_json() -> None:
    tl = build_timeline(fixture_records("postcopy-paused"))
    doc = json.loads(json.dumps(tl.to_dict()))
    assert [p["name"] for p in doc["phases"]][-1] == "completed"
    assert doc["summary"]["statuses"]["src"][-1] == "completed"


# --------------------------------------------------------------------------- reading


def test_read_numbered_keeps_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "qmp-src.jsonl"
    path.write_text('{"a": 1}\n\nnot json\n[1]\n{"b": 2}\n{"c":')
    skips: list[str] = []
    numbered = list(read_jsonl_numbered(path, lambda s: skips.append(str(s))))
    assert numbered == [(1, {"a": 1}), (5, {"b": 2})]
    assert skips[0].startswith(f"{path}:3: not JSON")
    assert skips[1] == f"{path}:4: expected a JSON object, got list"
    assert skips[2] == f"{path}:6: truncated last line"


# --------------------------------------------------------------------------- command line


def test_cli_table(tmp_path: Path) -> None:
    run = make_run(tmp_path, "postcopy")
    result = invoke(str(run))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["phase", "start", "duration", "boundaries", "details"]
    assert [line.split()[0] for line in lines[1:6]] == [
        "setup",
        "precopy",
        "switchover",
        "postcopy-active",
        "completed",
    ]
    assert "src STOP -> dst RESUME" in result.stdout
    assert "outcome: completed" in result.stdout
    assert "src (source): setup -> active -> postcopy-active -> completed" in result.stdout
    assert result.stderr == ""


def test_cli_json(tmp_path: Path) -> None:
    run = make_run(tmp_path, "precopy")
    result = invoke("--json", str(run))
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert [p["name"] for p in doc["phases"]] == ["setup", "precopy", "stop-and-copy", "completed"]
    assert doc["skipped"] == 0 and doc["issues"] == []
    assert doc["summary"]["qemu_downtime_ms"] == 30


def test_cli_help_has_examples() -> None:
    result = invoke("--help")
    assert result.exit_code == 0 and "tsprobe timeline run1" in result.stdout


def test_cli_missing_run_directory(tmp_path: Path) -> None:
    result = invoke(str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert result.stderr == f"tsprobe: {tmp_path / 'nope'}: no such run directory\n"


def test_cli_empty_run_directory(tmp_path: Path) -> None:
    result = invoke(str(tmp_path))
    assert result.exit_code == 2
    assert "empty run directory" in result.stderr and result.stdout == ""


def test_cli_run_directory_without_qmp_files(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text("{}\n")
    result = invoke(str(tmp_path))
    assert result.exit_code == 0
    assert "no qmp-*.jsonl files" in result.stderr
    assert "no migration phases" in result.stdout


def break_run(run: Path) -> dict[str, int]:
    """Garbage on src line 4, an unknown status on dst, a truncated dst last line."""
    src = run / "qmp-src.jsonl"
    lines = src.read_text().splitlines(keepends=True)
    lines[3] = "garbage {\n"
    src.write_text("".join(lines))
    dst = run / "qmp-dst.jsonl"
    text = dst.read_text().replace('"status":"completed"', '"status":"teleporting"')
    dst.write_text(text + '{"type":"event","event":"MIGRA')
    unknown = next(i for i, line in enumerate(text.splitlines(), start=1) if "teleporting" in line)
    return {"garbage": 4, "unknown": unknown, "truncated": len(text.splitlines()) + 1}


def test_cli_bad_lines_are_named_and_counted(tmp_path: Path) -> None:
    run = make_run(tmp_path, "precopy")
    where = break_run(run)
    result = invoke(str(run))
    assert result.exit_code == 0
    err = result.stderr.splitlines()
    assert f"tsprobe: {run}/qmp-src.jsonl:{where['garbage']}: not JSON: " in result.stderr
    assert f"tsprobe: {run}/qmp-dst.jsonl:{where['truncated']}: truncated last line" in err
    assert (
        f"tsprobe: {run}/qmp-dst.jsonl:{where['unknown']}: unknown migration status "
        "'teleporting' (kept as a phase of that name)"
    ) in err
    assert err[-1] == "tsprobe: 2 lines skipped"
    assert "teleporting" in result.stdout  # kept by name
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_strict_fails_on_skips_only(tmp_path: Path) -> None:
    run = make_run(tmp_path, "precopy")
    break_run(run)
    result = invoke("--strict", str(run))
    assert result.exit_code == 1
    assert "tsprobe: 2 lines skipped" in result.stderr and result.stdout == ""
    # an unknown status alone is not a skip
    clean = make_run(tmp_path, "postcopy")
    dst = clean / "qmp-dst.jsonl"
    dst.write_text(dst.read_text().replace('"status":"completed"', '"status":"teleporting"'))
    result = invoke("--strict", str(clean))
    assert result.exit_code == 0 and "unknown migration status" in result.stderr


def test_cli_record_level_skip_names_the_line(tmp_path: Path) -> None:
    run = make_run(tmp_path, "precopy")
    dst = run / "qmp-dst.jsonl"
    lines = dst.read_text().splitlines(keepends=True)
    bad = '{"type":"event","event":"MIGRATION","data":{},"host_real_ns":1}\n'
    lines[2:2] = ["\n", "garbage\n", bad]  # blank line 3, garbage 4, bad record 5
    dst.write_text("".join(lines))
    result = invoke("--json", str(run))
    assert result.exit_code == 0
    assert f"tsprobe: {dst}:4: not JSON" in result.stderr
    assert f"tsprobe: {dst}:5: MIGRATION event without data.status" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["skipped"] == 2
    assert {(i["line"], i["severity"]) for i in doc["issues"]} == {(4, "skip"), (5, "skip")}


# --------------------------------------------------------------------------- QEMU 10.0


def lab_records(name: str) -> dict[str, list[dict[str, Any]]]:
    """The src and dst records of a recorded lab run."""
    run = LAB_FIXTURES / name
    return {
        ep: [json.loads(line) for line in (run / f"qmp-{ep}.jsonl").read_text().splitlines()]
        for ep in ("src", "dst")
    }


def assert_adds_up(tl: Timeline) -> None:
    """Contiguous phases whose lengths add up to the migration's total time."""
    assert_contiguous(tl)
    total = tl.summary().total_ns
    assert total is not None
    assert sum(p.duration_ns or 0 for p in tl.phases[:-1]) == total


PAUSED_PHASES = [
    "setup",
    "precopy",
    "switchover",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover-setup",
    "postcopy-recover",
    "postcopy-active",
    "completed",
]


@pytest.mark.parametrize("name", ["paused-qemu7.2", "paused-qemu10.0"])
def test_paused_lab_run_of_each_qemu(name: str) -> None:
    """Both versions' paused runs give the same phases; each source status is a phase,
    or (QEMU 10.0's ``device``) the status of its switchover."""
    meta = json.loads((LAB_FIXTURES / name / "meta.json").read_text())
    version = name.removeprefix("paused-qemu")
    assert all(v.startswith(version + ".") for v in meta["versions"]["qemu"].values())
    assert meta["lab"]["qemu_version"].startswith(version + ".")
    tl = build_timeline(lab_records(name))
    assert tl.names() == PAUSED_PHASES
    assert_adds_up(tl)
    assert [p.vm_stopped for p in tl.phases] == [n == "switchover" for n in PAUSED_PHASES]
    switchover = tl.phases[2]
    assert tl.pauses[0].duration_ns == switchover.duration_ns == tl.summary().downtime_ns
    assert switchover.details["qemu_downtime_ms"] >= 1
    shown = {p.name for p in tl.phases} | {p.details.get("qemu_status") for p in tl.phases}
    assert {phase_name(s) for s in tl.statuses("src")} - {"none"} <= shown
    # the operator held the pause 3 s: postcopy-paused lasts that long, the recovery after
    paused = tl.phases[4]
    assert paused.duration_ns is not None and 2.9e9 < paused.duration_ns < 3.5e9
    assert tl.phases[5].start_ns == tl.phases[4].end_ns
    assert tl.skipped == ()


def test_qemu_100_device_is_the_switchover() -> None:
    tl = build_timeline(lab_records("paused-qemu10.0"))
    assert "device" in tl.statuses("src") and "device" not in tl.names()
    switchover = tl.phases[2]
    assert switchover.details["qemu_status"] == "device"
    after = switchover.details["qemu_status_after_ns"]
    assert 0 < after < 5_000_000  # reported right after the STOP
    assert switchover.start_by.label() == "src STOP"
    assert switchover.end_by is not None and switchover.end_by.label() == "dst RESUME"
    assert any("reported device" in n for n in switchover.notes)
    # QEMU 10.0 reports postcopy-recover-setup on the source (7.2's destination: setup)
    assert tl.phases[5].start_by.what == "MIGRATION postcopy-recover-setup"


def test_qemu_100_precopy_device() -> None:
    # QEMU 10.0 precopy: STOP, device 85 us later, completed, then the destination's RESUME
    src, dst = precopy_prefix()
    src += [ev(400_000, "STOP"), mig(400_085, "device"), mig(413_000, "completed")]
    dst += [ev(418_000, "RESUME"), mig(418_200, "completed")]
    tl = build_timeline({"src": src, "dst": dst})
    assert tl.names() == ["setup", "precopy", "stop-and-copy", "completed"]
    assert_adds_up(tl)
    stop = tl.phases[2]
    assert stop.vm_stopped and stop.start_ns == at(400_000) and stop.end_ns == at(418_000)
    assert stop.details["qemu_status"] == "device"
    assert stop.details["qemu_status_after_ns"] == 85_000
    assert tl.summary().downtime_ns == at(418_000) - at(400_000)


def test_qemu_100_long_recovery_with_recover_setup_on_both_sides() -> None:
    # A 3 s hold, then a recovery that takes 5.5 s more: the source reports
    # postcopy-recover-setup, the destination too but later (after the source's
    # postcopy-recover); neither is a step back, and every phase adds up.
    src, dst = precopy_prefix()
    src += [
        mig(1_000_000, "postcopy-active"),
        ev(1_000_100, "STOP"),
        mig(1_000_200, "device"),
        mig(1_300_000, "postcopy-paused"),
        mig(4_300_000, "postcopy-recover-setup"),
        mig(6_000_000, "postcopy-recover"),
        mig(9_800_000, "postcopy-active"),
        mig(10_000_000, "completed"),
    ]
    dst += [
        mig(1_000_500, "postcopy-active"),
        ev(1_100_000, "RESUME"),
        mig(1_299_000, "postcopy-paused"),
        mig(6_000_400, "postcopy-recover-setup"),
        mig(6_001_000, "postcopy-recover"),
        mig(9_799_000, "postcopy-active"),
        mig(9_999_000, "completed"),
    ]
    tl = build_timeline({"src": src, "dst": dst})
    assert tl.names() == PAUSED_PHASES
    assert_adds_up(tl)
    phases = {p.name: p for p in tl.phases[4:7]}
    assert phases["postcopy-paused"].start_ns == at(1_299_000)
    assert phases["postcopy-paused"].duration_ns == at(4_300_000) - at(1_299_000)
    recover_setup = phases["postcopy-recover-setup"]
    assert recover_setup.start_by.label() == "src+dst MIGRATION postcopy-recover-setup"
    assert recover_setup.duration_ns == at(6_000_000) - at(4_300_000)
    assert phases["postcopy-recover"].duration_ns == at(9_799_000) - at(6_000_000)
    assert tl.phases[2].name == "switchover" and tl.phases[2].details["qemu_status"] == "device"


# --------------------------------------------------------------------------- recorded runs


def recorded_runs() -> list[Path]:
    if not RUN_FIXTURES.is_dir():
        return []
    return sorted(p for p in RUN_FIXTURES.iterdir() if any(p.glob("qmp-*.jsonl")))


@pytest.mark.parametrize("run", recorded_runs() or [None], ids=lambda p: p.name if p else "none")
def test_recorded_run_has_the_phases_its_statuses_say(run: Path | None) -> None:
    """A run the recorder wrote: every source status shows up as a phase, in order."""
    if run is None:
        pytest.skip("no recorded run under tests/fixtures/runs yet")
    result = invoke("--json", "--strict", str(run))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    names = [p["name"] for p in doc["phases"]]
    assert names and names[-1] in ("completed", "failed", "cancelled")
    sources = [ep for ep in doc["endpoints"] if ep["role"] == "source"]
    assert sources
    wanted = [phase_name(s) for s in sources[0]["statuses"] if s != "none"]
    # a status shows as a phase, or (rule 7: QEMU >= 9.0's 'device' first in a pause) as
    # the pause phase's qemu_status, right after its name
    shown = []
    for p in doc["phases"]:
        shown += [p["name"], *filter(None, [(p.get("details") or {}).get("qemu_status")])]
    it = iter(shown)
    assert all(any(n == w for n in it) for w in wanted), (wanted, names)
    if any(p["handover"] for p in doc["pauses"]):
        assert "stop-and-copy" in names or "switchover" in names


# --------------------------------------------------------------------------- real entry point


def run_tsprobe(*args: str) -> subprocess.CompletedProcess[str]:
    if not TSPROBE.exists():
        pytest.skip(f"{TSPROBE} not installed (pip install -e .)")
    return subprocess.run(
        [str(TSPROBE), "timeline", *args], capture_output=True, text=True, timeout=60
    )


def bad_dirs(tmp_path: Path) -> Iterator[tuple[str, Path, list[str], int]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    yield "empty", empty, [], 2
    yield "missing", tmp_path / "missing", [], 2
    broken = make_run(tmp_path, "postcopy-paused")
    break_run(broken)
    yield "broken", broken, [], 0
    yield "broken-strict", broken, ["--strict"], 1
    yield "broken-json", broken, ["--json"], 0


def test_entry_point_never_shows_a_traceback(tmp_path: Path) -> None:
    for label, path, flags, code in bad_dirs(tmp_path):
        proc = run_tsprobe(*flags, str(path))
        assert proc.returncode == code, (label, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout, label
        assert proc.stderr.startswith("tsprobe: "), (label, proc.stderr)
        assert all(line.startswith("tsprobe: ") for line in proc.stderr.splitlines()), label
    proc = run_tsprobe(str(tmp_path / "postcopy-paused"))
    assert "qmp-dst.jsonl:" in proc.stderr and "truncated last line" in proc.stderr
    assert "postcopy-paused" in proc.stdout


def test_entry_point_on_a_good_run(tmp_path: Path) -> None:
    proc = run_tsprobe("--json", str(make_run(tmp_path, "postcopy-paused")))
    assert proc.returncode == 0 and proc.stderr == ""
    assert json.loads(proc.stdout)["summary"]["outcome"] == "completed"
