"""Run a real ``tsprobe agent`` process for a test and talk to it over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from probe.events import Event, parse_event
from tsprobe.cli import agent_command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(pid: int, timeout_s: float = 2.0) -> int:
    """SIGSTOP ``pid`` and return the CLOCK_MONOTONIC ns at which it was first seen stopped.

    The freeze a sampler must report at least starts when the process actually stops, not
    when ``kill()`` is called: the caller can be preempted around the syscall, and a
    sampler running at that moment takes one more wake before it stops (CI once read
    0.28 ms short of a hold timed from before ``kill()``). Polling /proc/PID/stat until
    its state is ``T`` gives a start no earlier than the real one.

    :raise TimeoutError: when the process is not seen stopped within ``timeout_s``.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic_ns() + int(timeout_s * 1e9)
    while True:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        now = time.monotonic_ns()
        if state in ("T", "t"):
            return now
        if now > deadline:
            raise TimeoutError(f"process {pid} not stopped after {timeout_s} s (state {state})")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


@dataclass
class LiveAgent:
    proc: subprocess.Popen[bytes]
    url: str
    events_path: Path

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return http_get(self.url + path)

    def events(self, since: int = 0) -> list[Event]:
        out: list[Event] = []
        while True:
            status, _headers, body = self.get(f"/events?since={since}&limit=10000")
            assert status == 200, body
            page = [parse_event(line) for line in body.decode().splitlines() if line]
            out.extend(page)
            if not page:
                return out
            since = page[-1].seq

    def healthz(self) -> dict[str, Any]:
        status, _, body = self.get("/healthz")
        assert status == 200
        result: dict[str, Any] = json.loads(body)
        return result

    def timer_pid(self, cpu: int) -> int | None:
        """The pid of the timer canary pinned to ``cpu`` (None while there is none)."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if is_worker(child, "probe.canary_timer", cpu):
                return child.pid
        return None

    def sampler_pid(self, cpu: int) -> int:
        """The pid of the stall sampler process pinned to ``cpu``."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if is_worker(child, "probe.stall", cpu):
                return child.pid
        raise AssertionError(f"no sampler for cpu {cpu}")


def is_worker(proc: psutil.Process, module: str, cpu: int | None = None) -> bool:
    """Whether ``proc`` is a worker of ``module`` (on ``cpu``): by the name a worker
    forked by the fork server gives itself (``timer 1``), or by the command line of a
    fresh interpreter."""
    try:
        name, cmd = proc.name(), proc.cmdline()
    except psutil.Error:
        return False
    role = module.rsplit(".", 1)[-1].removeprefix("canary_")
    if name == role or name.startswith(role + " "):
        return cpu is None or name.endswith(f" {cpu}")
    if module in cmd:
        return cpu is None or ("--cpu" in cmd and cmd[cmd.index("--cpu") + 1] == str(cpu))
    return False


def wait_answering(
    proc: subprocess.Popen[bytes],
    answers: Callable[[], bool],
    timeout_s: float,
    exited: Callable[[], str],
    late: str,
) -> None:
    """Wait until a started server ``answers`` (an OSError counts as not yet).

    :raise AssertionError: ``exited()`` when the process ended first, ``late`` at timeout.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(exited())
        try:
            if answers():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(late)
        time.sleep(0.1)


@contextmanager
def live_agent(tmp_path: Path, *args: str, ready_timeout: float = 20.0) -> Iterator[LiveAgent]:
    port = free_port()
    events_path = tmp_path / "events.jsonl"
    cmd = agent_command(port, events_path, *args)
    stderr = open(tmp_path / "agent.stderr", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=stderr, stderr=stderr, start_new_session=True)
    agent = LiveAgent(proc, f"http://127.0.0.1:{port}", events_path)
    try:
        wait_answering(
            proc,
            lambda: agent.get("/healthz")[0] == 200,
            ready_timeout,
            lambda: f"agent exited {proc.returncode}: {(tmp_path / 'agent.stderr').read_text()}",
            "agent did not answer /healthz in time",
        )
        yield agent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stderr.close()
