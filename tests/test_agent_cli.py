"""``tsprobe agent`` on the command line: flags, one-line errors, probe factories, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner

import agent.cli as cli
from agent.config import AgentConfig, resolve_cpus
from agent.errors import ConfigError
from agent.metrics import DEFAULT_WARNING_KINDS
from probe.errors import ProbeUnavailable
from probe.events import iter_event_file
from probe.procfs import format_cpu_list, parse_cpu_list
from probe.roots import Roots
from tests.fakeprobes import FIXTURE_ROOTS, FIXTURE_ROOTS_DIR
from tests.liveagent import free_port, http_get, is_worker
from tsprobe.cli import main

ROOT_FLAGS = [
    "--path.procfs", str(FIXTURE_ROOTS_DIR / "proc"),
    "--path.sysfs", str(FIXTURE_ROOTS_DIR / "sys"),
    "--path.devfs", str(FIXTURE_ROOTS_DIR / "dev"),
]  # fmt: skip
NO_PROBES = ["--no-stall", "--no-clock", "--no-kmsg"]


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, ["agent", *args], catch_exceptions=False)


def test_help_has_an_example() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output and "tsprobe agent --duration 10s" in result.output
    for flag in ("--cpus", "--interval", "--threshold", "--listen", "--events", "--timeouts",
                 "--canaries", "--duration", "--no-stall", "--no-clock", "--no-kmsg",
                 "--stall-mode", "--clock-period", "--clock-ptp", "--path.procfs"):  # fmt: skip
        assert flag in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--interval", "5x"], "Invalid value for '--interval': invalid duration '5x'"),
        (["--interval", "0"], "Invalid value for --interval: must be positive"),
        (["--threshold", "1ms"], "must be longer than --interval"),
        (["--duration", "ten"], "Invalid value for '--duration'"),
        (["--timeouts", "10ms,x"], "Invalid value for '--timeouts'"),
        (["--cpus", "a-b"], "Invalid value for '--cpus': cpu list: bad item 'a-b'"),
        (["--canaries", "timer,ntp"], "unknown canary 'ntp'"),
        (["--canaries", "none,timer"], "unknown canary 'none'"),
        (["--listen", "9466"], "Invalid value for '--listen'"),
        (["--stall-mode", "busy"], "Invalid value for '--stall-mode'"),
        (["--clock-period", "0"], "Invalid value for --clock-period: must be positive"),
    ],
)
def test_bad_flags_are_one_clear_line(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output


def test_offline_cpu_is_one_line(tmp_path: Path) -> None:
    result = invoke("--cpus", "0-3", "--events", "none", *ROOT_FLAGS)
    assert result.exit_code == 1
    assert result.output == "Error: --cpus: CPU 2-3 is not online (online: 0-1)\n"


def test_unwritable_events_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    result = invoke("--events", str(tmp_path / "f" / "e.jsonl"), "--listen", "127.0.0.1:0",
                    *NO_PROBES, *ROOT_FLAGS)  # fmt: skip
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--events" in errors[0] and "is not a directory" in errors[0]
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "e.jsonl").mkdir()  # a directory where the spool file should be
    result = invoke("--events", str(tmp_path / "ro" / "e.jsonl"), "--listen", "127.0.0.1:0",
                    *NO_PROBES, *ROOT_FLAGS)  # fmt: skip
    assert result.exit_code == 2 and "is a directory" in result.output


def test_events_in_a_missing_directory_is_refused_and_not_created(tmp_path: Path) -> None:
    """Issue 18: --events /nonexistent/dir/x.jsonl created /nonexistent/dir (as root)."""
    missing = tmp_path / "nonexistent" / "dir"
    result = invoke("--events", str(missing / "x.jsonl"), "--listen", "127.0.0.1:0",
                    *NO_PROBES, *ROOT_FLAGS)  # fmt: skip
    assert result.exit_code == 2
    assert "does not exist (it is not created)" in result.output
    assert not (tmp_path / "nonexistent").exists()


def test_a_short_run_with_every_probe_disabled(tmp_path: Path) -> None:
    spool = tmp_path / "events.jsonl"
    result = invoke("--events", str(spool), "--listen", "127.0.0.1:0", "--duration", "100ms",
                    "--cpus", "1", "--timeouts", "1s,10ms", *NO_PROBES, *ROOT_FLAGS)  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "tsprobe: probe stall: down: disabled (--no-stall)" in lines
    assert "tsprobe: probe ptp: down: disabled (--no-clock)" in lines
    # The timer canary runs; the heartbeat rides the stall samplers, which are off.
    assert "tsprobe: probe timer: up" in lines
    assert "tsprobe: probe heartbeat: down: disabled (rides the stall probe: --no-stall)" in lines
    events = [e for e in iter_event_file(spool) if e.kind != "timeout"]
    assert [e.kind for e in events] == ["agent_start", "probe_status", "agent_stop"]
    assert [e.get("probe") for e in events[1:2]] == ["timer"]
    start = events[0]
    assert start.get("cpus") == [1]
    assert start.get("config")["timeouts_ns"] == [10_000_000, 1_000_000_000]
    assert start.get("config")["canaries"] == ["timer", "heartbeat"]


def test_canaries_none_says_nothing_about_canaries(tmp_path: Path) -> None:
    result = invoke("--events", "none", "--listen", "127.0.0.1:0", "--duration", "0",
                    "--canaries", "none", *NO_PROBES, *ROOT_FLAGS)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "canaries" not in result.output
    assert "events -> memory only" in result.output


def test_default_spool_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.default_spool_path() == "/var/lib/tsprobe/events.jsonl"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.chdir(tmp_path)
    assert cli.default_spool_path() == str(tmp_path / "tsprobe-events.jsonl")


def test_parse_and_format_cpu_lists() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("1,0,1") == [0, 1]
    assert format_cpu_list([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    for bad in ("", "1-", "-1", "a", "3-1", "0,,1"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_resolve_cpus_against_the_fixture() -> None:
    assert resolve_cpus(None, FIXTURE_ROOTS) == [0, 1]
    assert resolve_cpus([1], FIXTURE_ROOTS) == [1]
    with pytest.raises(ConfigError, match="CPU 4 is not online"):
        resolve_cpus([0, 4], FIXTURE_ROOTS)
    with pytest.raises(ConfigError, match="cannot read the online CPUs"):
        resolve_cpus(None, Roots("/nonexistent", "/nonexistent", "/nonexistent"))


def test_probe_factories(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []

    def ok(config: AgentConfig, roots: Roots, cpus: list[int]) -> Any:
        built.append("stall")
        return object()

    def missing(config: AgentConfig, roots: Roots, cpus: list[int]) -> Any:
        raise ModuleNotFoundError("No module named 'probe.clock'")

    def unavailable(config: AgentConfig, roots: Roots, cpus: list[int]) -> Any:
        raise ProbeUnavailable("/dev/kmsg: permission denied")

    monkeypatch.setattr(cli, "FACTORIES", {"stall": ok, "clock": missing, "kmsg": unavailable})
    probes, down = cli.build_probes(AgentConfig(), FIXTURE_ROOTS, [0, 1])
    assert len(probes) == 1 and built == ["stall"]
    assert down == {
        "clock": "not available in this install (No module named 'probe.clock')",
        "kmsg": "/dev/kmsg: permission denied",
    }
    config = AgentConfig(off=frozenset({"stall", "kmsg"}))
    probes, down = cli.build_probes(config, FIXTURE_ROOTS, [0])
    assert probes == [] and list(down) == ["clock"]


def test_a_probe_rejecting_a_setting_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def picky(config: AgentConfig, roots: Roots, cpus: list[int]) -> Any:
        raise ValueError("period must be positive")

    monkeypatch.setattr(cli, "FACTORIES", {"clock": picky})
    with pytest.raises(ConfigError, match="clock probe: period must be positive"):
        cli.build_probes(AgentConfig(), FIXTURE_ROOTS, [0])


def test_warning_kinds_fall_back_without_the_kmsg_patterns(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_module(module: str, attr: str) -> Any:
        raise ImportError(module)

    monkeypatch.setattr(cli, "_load", no_module)
    assert cli.warning_kinds() == DEFAULT_WARNING_KINDS


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """``tsprobe agent`` (canaries only): the process, its base URL and its spool; killed
    at the end if a failed test left it running."""
    port = free_port()
    spool = tmp_path / "events.jsonl"
    cmd = [sys.executable, "-m", "tsprobe.cli", "agent", "--listen", f"127.0.0.1:{port}",
           "--events", str(spool), *NO_PROBES, *ROOT_FLAGS]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield proc, f"http://127.0.0.1:{port}", spool
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _first_health(proc: subprocess.Popen[bytes], url: str, deadline: float) -> dict[str, Any]:
    """/healthz's first answer (the server answers while the probes are still starting)."""
    while True:
        try:
            status, _, body = http_get(f"{url}/healthz", timeout=1)
        except OSError:
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "agent did not come up"
            time.sleep(0.01)
            continue
        assert status == 200
        health: dict[str, Any] = json.loads(body)
        return health


def _sigterm(proc: subprocess.Popen[bytes]) -> bytes:
    """Send SIGTERM, wait for the exit; kill it when it does not end within 10 s."""
    try:
        os.kill(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return output


def _stopped_cleanly(
    proc: subprocess.Popen[bytes],
    output: bytes,
    children: list[psutil.Process],
    spool: Path,
    health: dict[str, Any] | None = None,
) -> None:
    """Exit 0 without a traceback, every child process gone (the canaries stopped too), and
    ``agent_stop`` with reason SIGTERM last in the spool."""
    assert proc.returncode == 0, (health, output.decode())
    assert b"Traceback" not in output
    assert not any(child.is_running() for child in children)
    last = list(iter_event_file(spool))[-1]
    assert last.kind == "agent_stop" and last.get("reason") == "SIGTERM"


def test_sigterm_stops_the_agent_process_cleanly(
    agent_process: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    proc, url, spool = agent_process
    deadline = time.monotonic() + 20
    health = _first_health(proc, url, deadline)
    # The default canaries run; /healthz says "ok" once their processes reported in.
    while health["status"] != "ok":
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
        health = _first_health(proc, url, deadline)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any(is_worker(child, "probe.canary_timer") for child in children)
    _stopped_cleanly(proc, _sigterm(proc), children, spool)


def test_sigterm_while_the_agent_starts_stops_it_cleanly(
    agent_process: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    """A supervisor may send SIGTERM as soon as /healthz answers, before the canaries are up.

    The agent then still stops cleanly, writes ``agent_stop`` and stops its canaries.
    """
    proc, url, spool = agent_process
    health = _first_health(proc, url, time.monotonic() + 20)
    children = psutil.Process(proc.pid).children(recursive=True)
    _stopped_cleanly(proc, _sigterm(proc), children, spool, health)


def test_every_registered_option_is_a_flag_with_its_default() -> None:
    # One probe option lives in one place (agent.registry): its flag, its default in the
    # config and its key in agent_start's config all come from the entry.
    from agent.registry import PROBES
    from probe.canary import CANARY_NAMES

    assert [s.name for s in PROBES if s.switch == "canary"] == list(CANARY_NAMES)
    help_text = " ".join(invoke("--help").output.split())
    written = AgentConfig().to_dict()
    for spec in PROBES:
        if spec.switch == "flag":
            assert f"--{spec.name} / --no-{spec.name}" in help_text
            assert written[spec.name] is True
        for option in spec.options:
            assert f"--{option.flag}" in help_text
            assert written[option.key] == option.default_value()
            assert AgentConfig(options={option.key: "x"}).option(option.key) == "x"
    assert written["clock_period_ns"] == 100_000_000 and written["stall_fifo"] is True
