"""The fork server: workers forked from it run as fresh interpreters would, and the
supervisor falls back to fresh interpreters when it cannot be used."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest

from agent import workers
from agent.forkserver import STATUS_UNKNOWN, ForkServer
from agent.zygote import parse_request, worker_name

MODULE = "tests.forkserver_worker"


@pytest.fixture
def server() -> Iterator[ForkServer]:
    fs = workers.new_fork_server()
    yield fs
    fs.close()


def _read_all(fd: int) -> str:
    chunks = []
    while data := os.read(fd, 65536):
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks).decode()


def test_a_worker_runs_main_with_its_status_output_and_descriptors(server: ForkServer) -> None:
    out_r, out_w = os.pipe()
    side_r, side_w = os.pipe()
    target = fcntl.fcntl(side_w, fcntl.F_DUPFD, 100)  # a number the server will not get
    os.close(side_w)
    proc = server.spawn(MODULE, ["--fd", str(target), "--exit", "3"], out_w, [target])
    os.close(out_w)
    os.close(target)
    assert proc.wait(10) == 3
    assert proc.returncode == 3 and proc.poll() == 3
    out = _read_all(out_r)
    assert "name=forkserver_wor" in out  # its role name: the module's last part, cut at 15
    assert "stdin=/dev/null" in out
    assert "sigint_default=True" in out  # the server ignores SIGINT; its workers do not
    assert _read_all(side_r) == "through the passed descriptor\n"


def test_a_killed_worker_reads_as_killed_and_an_unknown_module_is_refused(
    server: ForkServer,
) -> None:
    out_r, out_w = os.pipe()
    proc = server.spawn(MODULE, ["--sleep", "30"], out_w)
    os.close(out_w)
    assert psutil.Process(proc.pid).ppid() == server.server_pid
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.2)
    proc.kill()
    assert proc.wait(10) == -signal.SIGKILL
    _read_all(out_r)
    with pytest.raises(workers.ForkServerError, match="no_such_module"):
        server.spawn("tests.no_such_module", [], 1)


def test_workers_outlive_their_server_and_a_new_one_starts(server: ForkServer) -> None:
    out_r, out_w = os.pipe()
    proc = server.spawn(MODULE, ["--sleep", "30"], out_w)
    os.close(out_w)
    first = server.server_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.server_pid is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.server_pid is None
    assert proc.poll() is None and psutil.pid_exists(proc.pid)  # runs on
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(10) == STATUS_UNKNOWN  # its status went with the server
    _read_all(out_r)
    out_r, out_w = os.pipe()
    again = server.spawn(MODULE, [], out_w)
    os.close(out_w)
    assert again.wait(10) == 0
    assert server.server_pid not in (None, first)
    _read_all(out_r)


def test_the_supervisor_starts_fresh_interpreters_when_the_server_cannot_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent.samplers import StallProbe

    broken = workers.new_fork_server("/nonexistent/python3")
    monkeypatch.setattr(workers, "_fork_server", broken)
    probe = StallProbe([0], interval_ns=1_000_000, threshold_ns=50_000_000)
    probe.start(lambda event: None)
    try:
        assert probe.wait_ready(20)
        pid = probe.sampler_pids()[0]
        assert "probe.stall" in psutil.Process(pid).cmdline()  # a fresh interpreter
        assert any("cannot start the fork server" in note for note in probe.notes())
    finally:
        probe.stop()


def test_worker_names_and_requests() -> None:
    assert worker_name("probe.stall", ["--cpu", "1", "--fifo"]) == "stall 1"
    assert worker_name("probe.canary_heartbeat", ["--cpu", "0", "--peer-cpu", "1"]) == (
        "heartbeat 0"
    )
    assert worker_name("probe.canary_rpc", ["--role", "client", "--cpu", "12"]) == ("rpc-client 12")
    assert parse_request(b"S\x007\x001,2,5\x00probe.stall\x00--cpu\x000") == (
        "7",
        [1, 2, 5],
        "probe.stall",
        ["--cpu", "0"],
    )
    for bad in (b"X\x001", b"S\x007\x001", b"S\x007\x00-1\x00m"):
        with pytest.raises(ValueError):
            parse_request(bad)


def test_a_server_that_does_not_answer_neither_blocks_health_nor_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stopped server: health() answers at once meanwhile, and after ANSWER_S the
    sampler starts as a fresh interpreter."""
    from agent import forkserver
    from agent.samplers import StallProbe

    stuck = workers.new_fork_server()
    out_r, out_w = os.pipe()
    assert stuck.spawn(MODULE, [], out_w).wait(10) == 0
    os.close(out_w)
    _read_all(out_r)
    pid = stuck.server_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    monkeypatch.setattr(workers, "_fork_server", stuck)
    monkeypatch.setattr(forkserver, "ANSWER_S", 1.5)
    probe = StallProbe([0], interval_ns=1_000_000, threshold_ns=50_000_000)
    try:
        probe.start(lambda event: None)
        time.sleep(0.3)
        t0 = time.monotonic()
        assert not probe.health()["stall"].up  # starting
        assert time.monotonic() - t0 < 0.5
        assert probe.wait_ready(20)
        assert "probe.stall" in psutil.Process(probe.sampler_pids()[0]).cmdline()
        assert any("did not answer" in note for note in probe.notes())
    finally:
        probe.stop()
        with contextlib.suppress(ProcessLookupError):  # killed when it did not answer
            os.kill(pid, signal.SIGCONT)
        stuck.close()
