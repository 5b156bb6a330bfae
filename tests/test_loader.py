"""Bad input to the loader and to ``tsprobe report``: counted skips with file and line, a
clear message, never a traceback; ``--strict`` fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from analysis.analyze.load import load_run
from analysis.errors import RecordFormatError
from tests.analysis_runs import BASE, MS, S, build_run, guest_event
from tsprobe.cli import main


def _bad_run(tmp_path: Path) -> Path:
    run = build_run(tmp_path / "bad")
    events = run / "guest-events.jsonl"
    lines = events.read_text().splitlines()
    other = "99999999-0000-0000-0000-000000000000"
    lines.insert(3, "this is not json")  # line 4
    lines.insert(4, json.dumps(guest_event(50, "stall", 2 * S, duration_ns=5 * MS)))  # no cpu
    lines.insert(5, json.dumps(guest_event(51, "new_kind", 2 * S)))  # unknown kind
    lines.insert(6, json.dumps(guest_event(52, "stall", 100 * MS, duration_ns=5 * MS, cpu=0)))
    lines.append(json.dumps(guest_event(1, "agent_start", 9 * S, boot_id=other)))  # reboot
    lines.append('{"v":1,"seq":2,"boot_id":"' + other + '","kind":"stall","mono_')
    events.write_text("\n".join(lines))  # the last line has no newline: truncated
    return run


def test_skips_are_counted_with_file_and_line(tmp_path: Path) -> None:
    run = load_run(_bad_run(tmp_path))
    reasons = {(Path(i.path).name, i.line, i.severity): i.reason for i in run.issues}
    name = "guest-events.jsonl"
    assert reasons[(name, 4, "skip")].startswith("not JSON")
    assert reasons[(name, 5, "skip")] == "stall with 'cpu' None not a CPU index in [0, 8192)"
    at6 = [i.reason for i in run.notes if Path(i.path).name == name and i.line == 6]
    assert "unknown event kind 'new_kind': kept, not analysed" in at6
    # seqs 50-52 inserted among low ones: a jump, and then the older seqs going back
    assert any(r.startswith("seq jumped 1 time (first to 51, 47 missing)") for r in at6)
    assert any(r.startswith("seq went back") for r in (i.reason for i in run.notes))
    assert reasons[(name, 7, "note")] == (
        "1 stall event from before the recording started (the agent's history) left out"
    )
    assert any("guest rebooted" in i.reason and i.line == 13 for i in run.notes)
    assert reasons[(name, 14, "skip")] == "truncated last line"
    assert len(run.skips) == 3
    assert run.unknown_kinds == {"new_kind": 1}
    assert len(run.stalls) == 5  # the good ones
    assert [s.boot_id for s in run.segments][1].startswith("9999")


def test_strict_raises(tmp_path: Path) -> None:
    with pytest.raises(RecordFormatError, match=r"guest-events.jsonl:4: not JSON.*3 lines"):
        load_run(_bad_run(tmp_path), strict=True)


def test_report_cli_reports_and_strict_fails(tmp_path: Path) -> None:
    run = _bad_run(tmp_path)
    runner = CliRunner()
    res = runner.invoke(main, ["report", str(run), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "guest-events.jsonl:4: not JSON" in res.stderr
    assert "3 lines skipped" in res.stderr
    assert "Traceback" not in res.output
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert doc["input"]["skipped"] == 3
    res = runner.invoke(main, ["report", "--strict", str(run), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 1
    assert "failing because of --strict" in res.stderr


def test_missing_rundir_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"tsprobe: {tmp_path / 'nope'}: no such run directory"


def test_garbage_qmp_and_samples(tmp_path: Path) -> None:
    run = build_run(tmp_path / "g")
    with open(run / "qmp-src.jsonl", "a") as fh:
        fh.write("[1,2]\n{garbage\n")
    with open(run / "clock-samples.jsonl", "a") as fh:
        fh.write('{"agent":"guest"}\n')
    loaded = load_run(run)
    got = sorted((Path(i.path).name, i.reason.split(":")[0]) for i in loaded.skips)
    assert got == [
        ("clock-samples.jsonl", "clock sample without 'clock' and host send/receive times"),
        ("qmp-src.jsonl", "expected a JSON object, got list"),
        ("qmp-src.jsonl", "not JSON"),
    ]
    assert BASE  # the run still analyses


def test_clock_samples_of_an_agent_without_events_are_noted(tmp_path: Path) -> None:
    # A clock sample names its agent; one no events file has cannot place anything, and
    # the figures may then change: the reader says which samples it did not use.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "lab-runs" / "paused", run)
    path = run / "clock-samples.jsonl"
    lines = path.read_text().splitlines()
    sample = json.loads(lines[2])
    sample["agent"] = "\x00\x1b[2J"
    lines[2] = json.dumps(sample)
    path.write_text("\n".join(lines) + "\n")
    notes = [i for i in load_run(run).issues if "which no events file has" in i.reason]
    assert len(notes) == 1 and notes[0].line == 3 and notes[0].severity == "note", notes
    assert notes[0].path.endswith("clock-samples.jsonl") and "\\x00\\x1b[2J" in notes[0].reason
