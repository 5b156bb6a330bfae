"""``make demo``: run the agent on this machine for a few seconds and show what it saw.

The demo is a known workload: it freezes the stall sampler of the last CPU with SIGSTOP
for 300 ms, so the printout shows that stall recovered beside everything else the agent
noticed (the machine's own stalls, clock steps, kernel warnings), its health, and a few
lines of its /metrics.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psutil

from probe.durations import format_duration
from probe.events import Event, parse_event
from tsprobe.cli import agent_command

FREEZE_S = 0.300
RUN_S = 6.0


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sampler_pid(agent_pid: int, cpu: int) -> int | None:
    for child in psutil.Process(agent_pid).children(recursive=True):
        cmd = child.cmdline()
        if "probe.stall" in cmd and "--cpu" in cmd and cmd[cmd.index("--cpu") + 1] == str(cpu):
            return child.pid
    return None


def _events(url: str) -> list[Event]:
    body = _get(f"{url}/events?since=0&limit=10000").decode()
    return [parse_event(line) for line in body.splitlines() if line]


def main() -> int:
    """Run the demo; return the process exit status."""
    workdir = Path(tempfile.mkdtemp(prefix="tsprobe-demo-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = agent_command(port, workdir / "events.jsonl", "--duration", f"{RUN_S + 4}s")
    print(f"demo: starting the agent: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _get(f"{url}/healthz")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read() if proc.stderr else ""
                    print(f"demo: the agent did not start:\n{err}")
                    return 1
                time.sleep(0.1)
        cpus = sorted(os.sched_getaffinity(0))
        victim = cpus[-1]
        time.sleep(2.0)
        pid = _sampler_pid(proc.pid, victim)
        held_ns = 0
        if pid is not None:
            print(f"demo: freezing CPU {victim}'s sampler (pid {pid}) for {FREEZE_S * 1000:.0f} ms")
            t0 = time.monotonic_ns()
            os.kill(pid, signal.SIGSTOP)
            time.sleep(FREEZE_S)
            held_ns = time.monotonic_ns() - t0
            os.kill(pid, signal.SIGCONT)
        time.sleep(RUN_S - 2.0)
        events = _events(url)
        health = json.loads(_get(f"{url}/healthz"))
        metrics = _get(f"{url}/metrics").decode()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    print("\n== agent's own messages ==")
    print(stderr.strip() or "(none)")
    _print_events(events, victim if held_ns else None, held_ns)
    print("\n== health ==")
    print(json.dumps(health, indent=1))
    _print_metrics(metrics)
    print(f"\nevent log: {workdir / 'events.jsonl'}")
    return 0


def _print_events(events: list[Event], victim: int | None, held_ns: int) -> None:
    """The events by kind, the stalls per CPU, and the injected freeze against its stall."""
    print("\n== events ==")
    kinds = Counter(e.kind for e in events)
    print(", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())))
    stalls = [e for e in events if e.kind == "stall"]
    by_cpu: dict[int, list[Event]] = {}
    for event in stalls:
        by_cpu.setdefault(int(event.get("cpu", -1)), []).append(event)
    for cpu in sorted(by_cpu):
        lengths = sorted(e.duration_ns or 0 for e in by_cpu[cpu])
        causes = Counter(str(e.get("cause")) for e in by_cpu[cpu])
        print(
            f"CPU {cpu}: {len(lengths)} stalls, longest {format_duration(lengths[-1])}, "
            f"causes {dict(causes)}"
        )
    if victim is not None:
        mine = [e for e in by_cpu.get(victim, []) if (e.duration_ns or 0) >= held_ns // 2]
        for event in mine:
            error_ns = (event.duration_ns or 0) - held_ns
            print(
                f"injected freeze of {format_duration(held_ns)} on CPU {victim}: the agent "
                f"reported {format_duration(event.duration_ns or 0)} ({error_ns / 1e6:+.2f} ms)"
            )
    for event in events:
        if event.kind in ("clock_step", "clocksource_change", "kernel_warning"):
            print(f"{event.kind}: {json.dumps(dict(event.fields))}")


def _print_metrics(metrics: str) -> None:
    """The lines of /metrics a reader checks first."""
    print("\n== /metrics (excerpt) ==")
    for line in metrics.splitlines():
        if line.startswith(
            (
                "tsprobe_cpu_stall_longest",
                "tsprobe_cpu_samples_total",
                "tsprobe_probe_up",
                "tsprobe_clock_steps_total",
                "tsprobe_events_dropped_total",
            )
        ):
            print(line)


if __name__ == "__main__":
    sys.exit(main())
