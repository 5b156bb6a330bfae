"""The log watcher: the PATH:REGEX[:NAME] rule, ``tail -F`` following, exact counts."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from probe.errors import LogSpecError
from probe.events import RawEvent
from probe.logwatch import MAX_LINE, Follower, LogWatchProbe, parse_log_spec, trim_line
from tests.fakeprobes import FIXTURE_ROOTS_DIR
from tsprobe.cli import main

ROOT_FLAGS = [
    "--path.procfs", str(FIXTURE_ROOTS_DIR / "proc"),
    "--path.sysfs", str(FIXTURE_ROOTS_DIR / "sys"),
    "--path.devfs", str(FIXTURE_ROOTS_DIR / "dev"),
]  # fmt: skip
QUIET = ["--no-stall", "--no-clock", "--no-kmsg", "--canaries", "none"]


# -- the specification -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "pattern", "name"),
    [
        ("/var/log/app.log:timeout", "/var/log/app.log", "timeout", "timeout"),
        ("/var/log/app.log:timeout:rpc", "/var/log/app.log", "timeout", "rpc"),
        ("app.log:ERROR: deadline", "app.log", "ERROR: deadline", "ERROR: deadline"),
        ("/l:deadline exceeded|DEADLINE_EXCEEDED:grpc deadline", "/l",
         "deadline exceeded|DEADLINE_EXCEEDED", "grpc deadline"),
        ("/l:(?:read|write) timed out", "/l", "(?:read|write) timed out",
         "(?:read|write) timed out"),
        ("/l:\\d+:\\d+ timeout", "/l", "\\d+:\\d+ timeout", "\\d+:\\d+ timeout"),
        ("/l:10:30", "/l", "10:30", "10:30"),  # a name starts with a letter or _
        ("/l:state:failed ", "/l", "state:failed ", "state:failed "),  # no trailing space
        ("/l:status\\:failed", "/l", "status\\:failed", "status\\:failed"),  # escaped
        ("/l:x\\:y:election_timeout-2", "/l", "x\\:y", "election_timeout-2"),
        ("/l:timeout\\:", "/l", "timeout\\:", "timeout\\:"),
    ],
)  # fmt: skip
def test_parse_log_spec(text: str, path: str, pattern: str, name: str) -> None:
    spec = parse_log_spec(text)
    assert (spec.path, spec.regex.pattern, spec.name, spec.text) == (path, pattern, name, text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nocolon", "expected PATH:REGEX[:NAME]"),
        (":timeout", "empty PATH"),
        ("/l:", "empty REGEX"),
        ("/l::rpc", "empty REGEX"),
        ("/l:timeout:", "empty NAME after the last ':'"),
        ("/l:time(out", "bad regex 'time(out': missing ), unterminated subpattern"),
        ("/l:*x:name", "bad regex '*x': nothing to repeat"),
    ],
)
def test_bad_log_specs_are_one_line(text: str, message: str) -> None:
    with pytest.raises(LogSpecError, match=re.escape(message)) as err:
        parse_log_spec(text)
    assert "\n" not in str(err.value) and repr(text) in str(err.value)


def test_trim_line() -> None:
    assert trim_line("short") == "short"
    assert trim_line("x" * 600) == "x" * 511 + "…"


# -- following a file --------------------------------------------------------------------


def append(path: Path, text: str) -> None:
    with path.open("a") as fh:
        fh.write(text)


def test_follower_starts_at_the_end_and_waits_for_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("old 1\nold 2\n")
    follower = Follower(str(log))
    assert follower.poll().lines == []
    append(log, "a\nb")
    assert follower.poll().lines == ["a"]
    append(log, " continued\r\n\n")
    assert follower.poll().lines == ["b continued", ""]
    assert follower.error == ""
    follower.close()


def test_follower_follows_rotation_by_rename(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    follower = Follower(str(log))
    follower.poll()
    append(log, "1\n")
    old = log.with_suffix(".log.1")
    log.rename(old)
    append(old, "2\n3 without newline")  # the writer still has the old file open
    result = follower.poll()
    assert result.lines == ["1", "2"] and result.changes == []  # no new file yet
    log.write_text("4\n")
    result = follower.poll()
    assert result.lines == ["3 without newline", "4"] and result.changes == ["rotated"]
    append(log, "5\n")
    assert follower.poll().lines == ["5"]
    follower.close()


def test_follower_follows_truncation(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    follower = Follower(str(log))
    follower.poll()
    append(log, "1\n2\n3\n")
    assert follower.poll().lines == ["1", "2", "3"]
    with log.open("r+") as fh:
        fh.truncate(0)
    append(log, "4\n")
    result = follower.poll()
    assert result.lines == ["4"] and result.changes == ["truncated"]
    # Truncated and written past the old offset between two polls: the bytes before the
    # offset changed, so this is seen too (tail -F would miss it).
    with log.open("r+") as fh:
        fh.truncate(0)
    append(log, "a line longer than before\n")
    result = follower.poll()
    assert result.lines == ["a line longer than before"] and result.changes == ["truncated"]
    follower.close()


def test_follower_waits_for_a_missing_file(tmp_path: Path) -> None:
    log = tmp_path / "later.log"
    follower = Follower(str(log))
    assert follower.poll().lines == []
    assert follower.error == f"waiting for {log} to appear"
    log.write_text("first\n")
    result = follower.poll()
    assert result.lines == ["first"] and result.changes == ["appeared"]  # from its beginning
    assert follower.error == ""
    follower.close()


def test_follower_cuts_overlong_lines_and_replaces_bad_bytes(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    follower = Follower(str(log))
    follower.poll()
    with log.open("ab") as fh:
        fh.write(b"x" * (MAX_LINE + 10) + b"\nok \xff\n")
    assert follower.poll().lines == ["x" * MAX_LINE, "ok \ufffd"]
    follower.close()


def test_follower_reports_an_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    log = tmp_path / "secret.log"
    log.write_text("")
    log.chmod(0)
    follower = Follower(str(log))
    assert follower.poll().lines == []
    assert follower.error == f"cannot open {log}: Permission denied"


# -- the probe ---------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[RawEvent] = []

    def emit(self, event: RawEvent) -> None:
        with self._lock:
            self.events.append(event)

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for event in self.events:
                name = event.fields["name"]
                out[name] = out.get(name, 0) + event.fields["count"]
            return out


def wait_for(condition: Any, timeout_s: float = 5.0, show: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {show() if show else ''}"
        time.sleep(0.02)


def test_counts_are_exact_through_appends_rotations_and_truncations(tmp_path: Path) -> None:
    """Known workload: 20 timeouts and 20 other lines, written across a rotation by
    rename, a truncation and a file that appears late; every timeout counted once."""
    log = tmp_path / "app.log"
    log.write_text("deadline exceeded before the start\n")
    later = tmp_path / "later.log"
    specs = [
        parse_log_spec(f"{log}:deadline exceeded:grpc"),
        parse_log_spec(f"{log}:(?:read|write) timed out:io"),
        parse_log_spec(f"{later}:election timeout"),
    ]
    probe = LogWatchProbe(specs, poll_s=0.02)
    recorder = Recorder()
    probe.start(recorder.emit)
    try:
        assert probe.notes() == [f"{later} does not exist yet; waiting for it to appear"]
        assert probe.health()["logwatch"].detail == f"waiting for {later} to appear"
        expected = {"grpc": 0, "io": 0, "election timeout": 0}

        serial = iter(range(1000))

        def write(path: Path, n: int) -> None:
            for _ in range(n):
                k = next(serial)  # as a log's timestamps, no two lines alike
                append(path, f"req {k}: context deadline exceeded\nok {k}\nread timed out\n")
            expected["grpc"] += n
            expected["io"] += n

        write(log, 5)
        wait_for(lambda: recorder.counts() == {k: v for k, v in expected.items() if v})
        # logrotate's default: rename, the writer keeps writing the old file, a new one.
        log.rename(tmp_path / "app.log.1")
        write(tmp_path / "app.log.1", 2)
        log.write_text("")
        write(log, 3)
        wait_for(lambda: recorder.counts() == {k: v for k, v in expected.items() if v})
        # copytruncate.
        with log.open("r+") as fh:
            fh.truncate(0)
        write(log, 4)
        later.write_text("raft: election timeout elapsed\n" * 6)
        expected["election timeout"] = 6
        wait_for(lambda: recorder.counts() == expected, 2.0, recorder.counts)
        assert probe.health()["logwatch"].up, probe.health()
        time.sleep(0.2)  # nothing more trickles in
    finally:
        probe.stop()
    assert recorder.counts() == {"grpc": 14, "io": 14, "election timeout": 6}
    assert probe.counts() == {"grpc": 14, "io": 14, "election timeout": 6}
    event = recorder.events[0]
    assert event.kind == "app_timeout" and event.duration_ns is None
    assert event.fields == {
        "name": "grpc",
        "path": str(log),
        "line": "req 0: context deadline exceeded",
        "count": 1,
    }
    assert abs(event.real_ns - time.time_ns()) < 60 * 1_000_000_000


def test_a_flood_is_folded_but_counted_exactly(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    probe = LogWatchProbe([parse_log_spec(f"{log}:timeout:t")], poll_s=0.02, max_events_per_s=5)
    recorder = Recorder()
    probe.start(recorder.emit)
    try:
        append(log, "timeout\n" * 12)
        wait_for(lambda: len(recorder.events) >= 5)
    finally:
        probe.stop()  # flushes what was folded
    counts = [event.fields["count"] for event in recorder.events]
    assert counts == [1, 1, 1, 1, 1, 7]
    assert recorder.counts() == {"t": 12}


def test_logwatch_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="nothing to watch"):
        LogWatchProbe([])
    with pytest.raises(ValueError, match="must be positive"):
        LogWatchProbe([parse_log_spec("/l:x")], poll_s=0)


# -- on the command line -----------------------------------------------------------------


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, ["agent", *args], catch_exceptions=False)


def test_a_bad_regex_is_one_clear_line() -> None:
    result = invoke("--watch-log", "/var/log/app.log:time(out:rpc", *QUIET, *ROOT_FLAGS)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: Invalid value for '--watch-log': '/var/log/app.log:time(out:rpc': bad regex"
        " 'time(out': missing ), unterminated subpattern at position 4"
    ]


def test_a_missing_file_is_said_at_start_and_waited_for(tmp_path: Path) -> None:
    missing = tmp_path / "missing.log"
    result = invoke("--events", "none", "--listen", "127.0.0.1:0", "--duration", "0",
                    "--watch-log", f"{missing}:timeout", *QUIET, *ROOT_FLAGS)  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"tsprobe: logwatch: {missing} does not exist yet; waiting for it to appear" in lines
    assert f"tsprobe: probe logwatch: down: waiting for {missing} to appear" in lines


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(" * 5000 + "a" + ")" * 5000, "at most 4096"),
        ("(" * 1000 + "a" + ")" * 1000, "too complex"),
        ("a{99999999999}", "too complex"),
        ("a" * 5000, "at most 4096"),
    ],
)
def test_deep_or_long_regex_is_one_line(pattern: str, reason: str) -> None:
    """Issue 18: --watch-log with a regex nested 5,000 deep raised RecursionError."""
    from probe.logwatch import parse_log_spec

    with pytest.raises(LogSpecError, match=reason) as info:
        parse_log_spec("/var/log/app.log:" + pattern)
    assert len(str(info.value)) < 250
