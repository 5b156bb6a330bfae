"""Bad run directories (issue 18): each case gets a counted skip, a note or one clear line,
never a traceback, a hang or a wrong figure.

Every case is a copy of ``tests/fixtures/lab-runs/paused`` with one thing broken, run
through the commands in-process (``CliRunner``); the seeded fuzz corpus over all of them
is tests/test_fuzz_rundir.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from analysis.analyze.load import load_run
from analysis.rundir.jsonl import Issue, decode_line, iter_records, read_document
from tsprobe.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "lab-runs" / "paused"
#: The fixture's stalls (every line of guest-events.jsonl in the agent's layout).
STALLS = 25
DOWNTIME_NS = 101_070_000


def copy(tmp_path: Path, name: str = "run") -> Path:
    run = tmp_path / name
    shutil.copytree(FIXTURE, run)
    return run


def cli(*args: Any) -> Result:
    return CliRunner().invoke(
        main, [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]
    )


def lines(run: Path, name: str) -> list[bytes]:
    return (run / name).read_bytes().splitlines(keepends=True)


def write(run: Path, name: str, data: list[bytes]) -> None:
    (run / name).write_bytes(b"".join(data))


def report(run: Path, out: Path) -> tuple[Result, dict[str, Any]]:
    res = cli("report", run, "--out", out)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    doc = json.loads((out / "summary.json").read_text()) if res.exit_code == 0 else {}
    return res, doc


def timeline_json(run: Path) -> tuple[Result, dict[str, Any]]:
    res = cli("timeline", "--json", run)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res, json.loads(res.stdout) if res.exit_code == 0 else {}


def set_field(line: bytes, key: str, value: bytes) -> bytes:
    head, sep, tail = line.partition(b'"' + key.encode() + b'":')
    assert sep, key
    end = min(i for i in (tail.find(b","), tail.find(b"}")) if i >= 0)
    return head + sep + value + tail[end:]


def stall_index(run: Path) -> int:
    return next(
        i for i, ln in enumerate(lines(run, "guest-events.jsonl")) if b'"kind":"stall"' in ln
    )


def no_traceback(res: Result) -> None:
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)


# --------------------------------------------------------------------------- lines


def test_nesting_10000_deep_in_a_jsonl_line_is_a_skip(tmp_path: Path) -> None:
    run = copy(tmp_path)
    for name in ("guest-events.jsonl", "qmp-src.jsonl", "clock-samples.jsonl"):
        data = lines(run, name)
        data.insert(2, b"[" * 10_000 + b"]" * 10_000 + b"\n")
        write(run, name, data)
    res, doc = report(run, tmp_path / "out")
    no_traceback(res)
    assert res.exit_code == 0
    for name in ("guest-events.jsonl", "qmp-src.jsonl", "clock-samples.jsonl"):
        assert f"{name}:3: nested deeper than 64" in res.stderr
    assert doc["input"]["guest_events"]["stalls"] == STALLS
    res, tl = timeline_json(run)
    assert res.exit_code == 0 and tl["summary"]["downtime_ns"] == DOWNTIME_NS


def test_nesting_10000_deep_in_meta_json_is_reported(tmp_path: Path) -> None:
    run = copy(tmp_path)
    (run / "meta.json").write_text('{"x":' + "[" * 10_000 + "]" * 10_000 + "}")
    res, _doc = report(run, tmp_path / "out")
    no_traceback(res)
    assert res.exit_code == 0
    assert "meta.json: nested deeper than 64" in res.stderr


@pytest.mark.parametrize("field", ["duration_ns", "mono_ns"])
@pytest.mark.parametrize("value", [2**63, 2**64 + 1, 10**30])
def test_integers_past_2_63_in_ns_fields_are_skips(tmp_path: Path, field: str, value: int) -> None:
    run = copy(tmp_path)
    data = lines(run, "guest-events.jsonl")
    i = stall_index(run)
    data[i] = set_field(data[i], field, str(value).encode())
    write(run, "guest-events.jsonl", data)
    loaded = load_run(run)
    assert [(Path(s.path).name, s.line) for s in loaded.skips] == [("guest-events.jsonl", i + 1)]
    assert len(loaded.stalls) == STALLS - 1
    res, _ = report(run, tmp_path / "out")
    no_traceback(res)
    assert res.exit_code == 0


def test_meta_start_past_2_63_is_ignored_with_a_word(tmp_path: Path) -> None:
    run = copy(tmp_path)
    meta = json.loads((run / "meta.json").read_text())
    meta["start"]["real_ns"] = 2**63
    (run / "meta.json").write_text(json.dumps(meta))
    res, _doc = report(run, tmp_path / "out")
    no_traceback(res)
    assert res.exit_code == 0
    assert "meta.json: start.real_ns not in [0, 2**63): ignored" in res.stderr


def test_a_4301_digit_integer_is_a_skip(tmp_path: Path) -> None:
    run = copy(tmp_path)
    data = lines(run, "guest-events.jsonl")
    i = stall_index(run)
    data[i] = set_field(data[i], "mono_ns", b"9" * 4301)
    write(run, "guest-events.jsonl", data)
    res, doc = report(run, tmp_path / "out")
    no_traceback(res)
    assert f"guest-events.jsonl:{i + 1}: not JSON" in res.stderr
    assert doc["input"]["guest_events"]["stalls"] == STALLS - 1


def test_duration_with_leading_zeros_is_a_skip_not_a_stall(tmp_path: Path) -> None:
    run = copy(tmp_path)
    data = lines(run, "guest-events.jsonl")
    i = stall_index(run)
    data[i] = set_field(data[i], "duration_ns", b"000000099")
    write(run, "guest-events.jsonl", data)
    loaded = load_run(run)
    assert len(loaded.stalls) == STALLS - 1
    assert [s.line for s in loaded.skips] == [i + 1]
    assert loaded.skips[0].reason.startswith("not JSON")


def test_a_lone_surrogate_in_a_qmp_status_is_a_skip_and_prints(tmp_path: Path) -> None:
    run = copy(tmp_path)
    data = lines(run, "qmp-src.jsonl")
    i = next(k for k, ln in enumerate(data) if b'"status":"active"' in ln)
    data[i] = data[i].replace(b'"status":"active"', b'"status":"\\ud800active"')
    write(run, "qmp-src.jsonl", data)
    for args in (("timeline", run), ("timeline", "--json", run)):
        res = cli(*args)
        no_traceback(res)
        assert res.exit_code == 0
        assert f"qmp-src.jsonl:{i + 1}: a string with a lone surrogate" in res.stderr
    res, _ = report(run, tmp_path / "out")
    no_traceback(res)
    assert res.exit_code == 0


def test_bytes_that_are_not_utf8_are_a_counted_skip(tmp_path: Path) -> None:
    run = copy(tmp_path)
    data = lines(run, "guest-events.jsonl")
    i = stall_index(run)
    data[i] = data[i].replace(b'"cause":"', b'"cause":"\xff\xfe')
    write(run, "guest-events.jsonl", data)
    loaded = load_run(run)
    assert [s.line for s in loaded.skips] == [i + 1]
    assert loaded.skips[0].reason.startswith("not UTF-8 (byte 0xff at column")


def test_a_line_longer_than_the_bound_is_skipped_unread(tmp_path: Path) -> None:
    run = copy(tmp_path)
    data = lines(run, "qmp-dst.jsonl")
    data.insert(1, b'{"pad":"' + b"x" * (2 << 20) + b'"}\n')
    write(run, "qmp-dst.jsonl", data)
    res, tl = timeline_json(run)
    assert res.exit_code == 0
    assert "qmp-dst.jsonl:2: line longer than 1 MiB" in res.stderr
    assert tl["summary"]["downtime_ns"] == DOWNTIME_NS


# --------------------------------------------------------------------------- files


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["qmp-src.jsonl", "meta.json", "guest-events.jsonl"])
def test_a_fifo_in_the_run_directory_does_not_block(tmp_path: Path, name: str) -> None:
    run = copy(tmp_path)
    (run / name).unlink()
    os.mkfifo(run / name)
    for args in (("timeline", run), ("timeline", "--json", run)):
        res = cli(*args)
        no_traceback(res)
        if name == "qmp-src.jsonl":
            assert f"{name}: a FIFO, not a regular file: not read" in res.stderr
    res, _ = report(run, tmp_path / "out")
    no_traceback(res)
    assert res.exit_code == 0
    assert f"{name}: a FIFO, not a regular file: not read" in res.stderr


@pytest.mark.timeout(60)
def test_devices_and_directories_are_not_read(tmp_path: Path) -> None:
    run = copy(tmp_path)
    (run / "qmp-dst.jsonl").unlink()
    (run / "qmp-dst.jsonl").symlink_to("/dev/zero")
    (run / "clock-samples.jsonl").unlink()
    (run / "clock-samples.jsonl").mkdir()
    res, _ = report(run, tmp_path / "out")
    no_traceback(res)
    assert res.exit_code == 0
    assert "qmp-dst.jsonl: a device, not a regular file: not read" in res.stderr
    assert "clock-samples.jsonl: a directory, not a regular file: not read" in res.stderr


def test_a_non_utf8_file_name_does_not_crash_writing_or_plotting(tmp_path: Path) -> None:
    run = copy(tmp_path)
    raw = os.fsencode(run)
    for bad in (b"guest-events-\xff\xfe.jsonl", b"qmp-\xff.jsonl"):
        source = "guest-events.jsonl" if bad.startswith(b"guest") else "qmp-dst.jsonl"
        with open(os.path.join(raw, bad), "wb") as fh:
            fh.write((run / source).read_bytes())
    res, doc = report(run, tmp_path / "out")
    no_traceback(res)
    assert res.exit_code == 0
    assert any("\\xff\\xfe" in cpu for cpu in doc["cpus"])
    res = cli("timeline", "--json", run)
    no_traceback(res)
    assert res.exit_code == 0
    cmp = cli("compare", run, FIXTURE, "--out", tmp_path / "cmp")
    no_traceback(cmp)
    assert cmp.exit_code == 0


def test_a_run_directory_whose_own_name_is_not_utf8(tmp_path: Path) -> None:
    run = copy(tmp_path)
    bad = os.path.join(os.fsencode(tmp_path), b"run-\xff")
    os.rename(os.fsencode(run), bad)
    for args in (("timeline", bad), ("timeline", "--json", bad), ("report", bad)):
        res = cli(*args)
        no_traceback(res)
        # the command line refuses it in one line (arguments must be UTF-8)
        assert res.exit_code == 2 and "is not valid UTF-8" in res.stderr


def test_a_path_too_long_is_one_line(tmp_path: Path) -> None:
    long = str(tmp_path) + "/" + "x" * 5000
    for args in (
        ("timeline", long),
        ("report", long),
        ("compare", long, FIXTURE, "--out", tmp_path),
    ):
        res = cli(*args)
        no_traceback(res)
        assert res.exit_code == 2
        lines_out = res.stderr.strip().splitlines()
        assert len(lines_out) == 1 and lines_out[0].startswith("tsprobe: ")
        assert "File name too long" in lines_out[0] or "too long" in lines_out[0]


# --------------------------------------------------------------------------- seq and CPUs


def test_every_event_line_duplicated_gives_the_same_stalls(tmp_path: Path) -> None:
    run = copy(tmp_path)
    write(
        run, "guest-events.jsonl", [ln for ln in lines(run, "guest-events.jsonl") for _ in (0, 1)]
    )
    loaded = load_run(run)
    assert len(loaded.stalls) == STALLS
    dups = [s for s in loaded.skips if "seen before" in s.reason]
    assert len(dups) == 29 and dups[0].line == 2
    _base, doc = report(copy(tmp_path, "base"), tmp_path / "out0")
    _res, got = report(run, tmp_path / "out1")
    assert got["stalls"] == doc["stalls"] and got["asymmetry"] == doc["asymmetry"]


def test_duplicated_qmp_records_are_skipped_once_each(tmp_path: Path) -> None:
    run = copy(tmp_path)
    write(run, "qmp-src.jsonl", lines(run, "qmp-src.jsonl") * 2)
    res, tl = timeline_json(run)
    _base_res, base = timeline_json(FIXTURE)
    assert tl["phases"] == base["phases"]
    assert "qmp-src.jsonl:105: repeats line 1: left out" in res.stderr


def test_seq_going_back_restarting_and_jumping_are_noted(tmp_path: Path) -> None:
    run = copy(tmp_path)
    data = lines(run, "guest-events.jsonl")
    data[10], data[11] = data[11], data[10]  # back
    write(run, "guest-events.jsonl", data)
    notes = [n.reason for n in load_run(run).notes]
    assert any(
        n.startswith("seq went back 1 time without an agent_start (first 12 -> 11)") for n in notes
    )

    run = copy(tmp_path, "restart")
    data = lines(run, "guest-events.jsonl")
    for k in range(20, len(data)):  # restart at 1 without an agent_start
        data[k] = set_field(data[k], "seq", str(k - 19).encode())
    write(run, "guest-events.jsonl", data)
    loaded = load_run(run)
    restart = [n for n in loaded.notes if n.reason.startswith("seq restarted")]
    assert [n.line for n in restart] == [21]
    assert "seq restarted (20 -> 1) later in guest time without an agent_start" in restart[0].reason
    assert not loaded.skips and len(loaded.stalls) == STALLS

    run = copy(tmp_path, "gap")
    data = lines(run, "guest-events.jsonl")
    for k in range(10, len(data)):  # 10 -> 1000
        data[k] = set_field(data[k], "seq", str(k + 990).encode())
    write(run, "guest-events.jsonl", data)
    gaps = [n for n in load_run(run).notes if n.reason.startswith("seq jumped")]
    assert len(gaps) == 1 and gaps[0].line == 11 and "989 missing" in gaps[0].reason


def test_a_stall_on_cpu_10_30_is_a_skip_not_a_phantom_lane(tmp_path: Path) -> None:
    run = copy(tmp_path)
    data = lines(run, "guest-events.jsonl")
    i = stall_index(run)
    for value in (str(10**30).encode(), b"7"):
        data[i] = set_field(data[i], "cpu", value)
        write(run, "guest-events.jsonl", data)
        loaded = load_run(run)
        assert [str(lane.cpu) for lane in loaded.lanes] == ["0", "1"]
        assert [s.line for s in loaded.skips] == [i + 1]
    assert "stall on CPU 7, which the agent did not announce (0, 1)" in loaded.skips[0].reason
    _res, doc = report(run, tmp_path / "out")
    assert doc["cpus"] == ["CPU 0", "CPU 1"]


def test_a_record_split_by_a_stray_newline_is_two_skips_in_timeline_and_report(
    tmp_path: Path,
) -> None:
    run = copy(tmp_path)
    data = lines(run, "qmp-src.jsonl")
    i = next(k for k, ln in enumerate(data) if b'"event":"STOP"' in ln)
    cut = len(data[i]) // 2
    data[i : i + 1] = [data[i][:cut] + b"\n", data[i][cut:]]
    write(run, "qmp-src.jsonl", data)
    res, tl = timeline_json(run)
    got, doc = report(run, tmp_path / "out")
    for out in (res.stderr, got.stderr):
        assert f"qmp-src.jsonl:{i + 1}: not JSON" in out
        assert f"qmp-src.jsonl:{i + 2}: not JSON" in out
    assert tl["summary"]["downtime_ns"] == doc["migration"]["downtime_ns"]


# --------------------------------------------------------------------------- the reader


def test_decode_line_rules() -> None:
    assert decode_line(b'{"a":1}\n') == {"a": 1}
    assert decode_line(b'{"a":NaN}') == "not JSON: NaN is not JSON"
    assert decode_line(b'{"a":1e400}') == "a number too large for a float"
    assert decode_line(b'{"a":"\\udc80"}') == "a string with a lone surrogate (not printable UTF-8)"
    assert decode_line(b'{"\\ud800":1}') == "a string with a lone surrogate (not printable UTF-8)"
    assert decode_line(b"[1]") == "expected a JSON object, got list"
    assert decode_line(b'{"a":' + b"[" * 65 + b"]" * 65 + b"}") == "nested deeper than 64"
    assert isinstance(decode_line(b'{"a":' + b"[" * 63 + b"]" * 63 + b"}"), dict)
    assert decode_line(b'{"a":18446744073709551615}') == {"a": 2**64 - 1}
    assert decode_line(b'{"a":18446744073709551616}').startswith("an integer of 20 digits")


def test_iter_records_numbers_lines_and_reports_the_truncated_last(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a":1}\n\n{"a":1}\r\n{"b":\n{"c":')
    issues: list[Issue] = []
    got = list(iter_records(path, issues.append, dedupe=True))
    assert got == [(1, {"a": 1})]  # line 3 is line 1 with a CRLF ending
    assert [str(i) for i in issues] == [
        f"{path}:3: repeats line 1: left out",
        f"{path}:4: not JSON: Expecting value: line 1 column 6 (char 5)",
        f"{path}:5: truncated last line",
    ]


def test_read_document_of_a_missing_file_is_one_issue(tmp_path: Path) -> None:
    issues: list[Issue] = []
    assert read_document(tmp_path / "meta.json", issues.append) is None
    assert issues[0].reason.startswith("cannot read: No such file")


def test_an_event_whose_name_is_not_a_qmp_name_is_a_skip(tmp_path: Path) -> None:
    run = copy(tmp_path)
    data = lines(run, "qmp-dst.jsonl")
    i = next(k for k, ln in enumerate(data) if b'"event":"MIGRATION"' in ln)
    data[i] = data[i].replace(b'"event":"MIGRATION"', b'"event":"\\u0000\\u001b[2J"')
    write(run, "qmp-dst.jsonl", data)
    res, _ = timeline_json(run)
    assert res.exit_code == 0
    assert f"qmp-dst.jsonl:{i + 1}: event record whose 'event' is not a QMP event name" in (
        res.stderr
    )


def test_a_record_type_that_is_no_type_name_and_a_pass_past_int64_are_skips(
    tmp_path: Path,
) -> None:
    # Found by the held-out fuzz seeds 1804 and 1805: a timeout record whose type became
    # 200,000 characters vanished from the phase notes without a word, and a
    # MIGRATION_PASS of 2**63 (not a QAPI int) was printed as the pass number.
    run = copy(tmp_path)
    dst = lines(run, "qmp-dst.jsonl")
    i = next(k for k, ln in enumerate(dst) if b'"type":"timeout"' in ln)
    dst[i] = dst[i].replace(b'"type":"timeout"', b'"type":"' + b"y" * 200_000 + b'"')
    write(run, "qmp-dst.jsonl", dst)
    src = lines(run, "qmp-src.jsonl")
    j = next(k for k, ln in enumerate(src) if b'"pass":2' in ln)
    src[j] = src[j].replace(b'"pass":2', b'"pass":' + str(2**63).encode())
    write(run, "qmp-src.jsonl", src)
    res, _ = timeline_json(run)
    assert res.exit_code == 0
    assert f"qmp-dst.jsonl:{i + 1}: record whose 'type' is not a record type name" in res.stderr
    assert (
        f"qmp-src.jsonl:{j + 1}: MIGRATION_PASS event whose data.pass is not an integer in"
        in res.stderr
    )


@pytest.mark.parametrize("name", ["qmp-src.jsonl", "qmp-dst.jsonl", "lab-steps.jsonl"])
def test_host_stamps_past_2_63_are_skips(tmp_path: Path, name: str) -> None:
    run = copy(tmp_path)
    data = lines(run, name)
    i = len(data) - 1
    data[i] = set_field(data[i], "host_mono_ns", str(2**63).encode())
    write(run, name, data)
    res, _ = report(run, tmp_path / "out")
    no_traceback(res)
    assert res.exit_code == 0
    assert f"{name}:{i + 1}: 'host_mono_ns' '9223372036854775808' not an integer" in res.stderr
