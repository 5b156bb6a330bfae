"""`tsprobe record`'s host truth per vCPU against real QEMU processes (no guest OS).

Bare QEMUs (each test on every QEMU installed: the system's, and the 10.0 that scripts/setup
unpacks) under multi-threaded TCG with two vCPUs (a host thread each) whose firmware
halts: the source runs, the destination waits with ``-incoming defer``. Checked:

- the QEMU pid the recorder found from the monitor's peer credentials is the pid the test
  started (an independent reading), and the vCPU threads are that process's threads;
- an incoming destination's vCPUs read ``stopped``, a running source's idle vCPUs ``halted``;
- a QMP ``stop`` .. ``cont`` of 400 ms reads ``stopped`` for as long as QEMU's own STOP and
  RESUME events say (within one poll period plus 5 ms and the events' delivery);
- a SIGSTOPped QEMU reads ``stopped``; a killed one ends its intervals with a note;
- a TCP monitor has no peer credentials: a note, or ``--qemu-pid``; a wrong pid: a note;
- bad ``--qemu-pid`` and ``--vcpu-poll`` values: one line, exit 2;
- the recorder hands an endpoint's threads to the sampler only once QMP said whether its VM
  runs (without a QEMU: the order of the recorder's calls).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from analysis.record.recorder import Recorder
from tests.blocked_threads import sigstop_for
from tests.qemu_helpers import QEMU_PARAMS, free_port

#: Every test with a QEMU runs on each QEMU installed (the system's, and 10.0 when unpacked).
on_each_qemu = pytest.mark.parametrize("binary", QEMU_PARAMS)
TOL_NS = 15_000_000


@contextmanager
def bare_qemu(
    tmp: Path, name: str, binary: str, *, incoming: bool = False, tcp: int | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A bare MTTCG QEMU with 2 vCPUs: (process, the recorder's monitor, the test's monitor)."""
    ctl = tmp / f"{name}-ctl.qmp"
    rec = f"127.0.0.1:{tcp}" if tcp else str(tmp / f"{name}.qmp")
    rec_arg = f"tcp:{rec},server=on,wait=off" if tcp else f"unix:{rec},server=on,wait=off"
    cmd = [binary, "-M", "q35", "-accel", "tcg,thread=multi", "-smp", "2", "-m", "64",
           "-nodefaults", "-display", "none", "-qmp", rec_arg,
           "-qmp", f"unix:{ctl},server=on,wait=off"]  # fmt: skip
    if incoming:
        cmd += ["-incoming", "defer"]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not ctl.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "QEMU did not start"
            time.sleep(0.02)
        time.sleep(0.2)  # the firmware reaches its halt
        yield proc, rec, ctl
    finally:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(5)


def record_command(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tsprobe.cli", "record", "-q", "--out", str(out), *args]


def record(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(record_command(out, *args), capture_output=True, text=True, timeout=60)


def states(out: Path) -> list[dict[str, Any]]:
    path = out / "vcpu-states.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def meta(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((out / "meta.json").read_text())
    return result


def time_in(records: list[dict[str, Any]], endpoint: str, vcpu: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if r["endpoint"] == endpoint and r["vcpu"] == vcpu:
            out[r["state"]] = out.get(r["state"], 0) + r["end_mono_ns"] - r["start_mono_ns"]
    return out


@on_each_qemu
def test_both_qemus_sampled_with_the_pid_from_the_socket(tmp_path: Path, binary: str) -> None:
    with (
        bare_qemu(tmp_path, "src", binary) as (src, src_sock, _),
        bare_qemu(tmp_path, "dst", binary, incoming=True) as (dst, dst_sock, _),
    ):
        done = record(tmp_path / "run", "--qmp", f"src={src_sock}", "--qmp", f"dst={dst_sock}",
                      "--duration", "1.5s")  # fmt: skip
        tasks = {p.pid: {int(t) for t in os.listdir(f"/proc/{p.pid}/task")} for p in (src, dst)}
    assert done.returncode == 0, done.stderr
    sampler = meta(tmp_path / "run")["vcpu_sampler"]
    for name, proc in (("src", src), ("dst", dst)):
        assert sampler[name]["pid"] == proc.pid and sampler[name]["note"] is None
        threads = {int(v): t for v, t in sampler[name]["threads"].items()}
        assert sorted(threads) == [0, 1] and len(set(threads.values())) == 2  # MTTCG
        assert set(threads.values()) <= tasks[proc.pid] - {proc.pid}
        assert sampler[name]["samples"] > 100
    records = states(tmp_path / "run")
    for vcpu in (0, 1):
        dst_time = time_in(records, "dst", vcpu)
        assert set(dst_time) == {"stopped"} and dst_time["stopped"] > 1_200_000_000
        src_time = time_in(records, "src", vcpu)
        assert src_time.get("halted", 0) > 0.9 * sum(src_time.values()), src_time
    for name in ("src", "dst"):
        for vcpu in (0, 1):
            mine = sorted(
                (r for r in records if r["endpoint"] == name and r["vcpu"] == vcpu),
                key=lambda r: r["start_mono_ns"],
            )
            for a, b in itertools.pairwise(mine):
                assert a["end_mono_ns"] == b["start_mono_ns"]  # contiguous, no overlap
            assert all(r["samples"] >= 1 and r["end_mono_ns"] > r["start_mono_ns"] for r in mine)


async def _stop_cont(ctl: Path, hold_s: float) -> None:
    client = QMPClient("test")
    await client.connect(str(ctl))
    await asyncio.sleep(0.4)
    await client.execute("stop")
    await asyncio.sleep(hold_s)
    await client.execute("cont")
    await asyncio.sleep(0.4)
    await client.disconnect()


@on_each_qemu
def test_a_qmp_stop_reads_stopped_as_long_as_qemus_events_say(tmp_path: Path, binary: str) -> None:
    out = tmp_path / "run"
    with bare_qemu(tmp_path, "src", binary) as (_src, sock, ctl):
        proc = subprocess.Popen(record_command(out, "--qmp", f"src={sock}", "--duration", "2s"))
        time.sleep(0.5)
        asyncio.run(_stop_cont(ctl, 0.4))
        assert proc.wait(30) == 0
    qmp = [json.loads(line) for line in (out / "qmp-src.jsonl").read_text().splitlines()]
    stop = next(r["host_mono_ns"] for r in qmp if r.get("event") == "STOP")
    resume = next(r["host_mono_ns"] for r in qmp if r.get("event") == "RESUME")
    for vcpu in (0, 1):
        (held,) = [r for r in states(out) if r["vcpu"] == vcpu and r["state"] == "stopped"]
        assert abs(held["start_mono_ns"] - stop) <= TOL_NS
        assert abs(held["end_mono_ns"] - resume) <= TOL_NS


@on_each_qemu
def test_sigstopped_then_killed_qemu(tmp_path: Path, binary: str) -> None:
    out = tmp_path / "run"
    with bare_qemu(tmp_path, "src", binary) as (qemu, sock, _):
        command = record_command(out, "--qmp", f"src={sock}", "--duration", "10s", "--grace", "0")
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        time.sleep(0.8)
        stopped, resumed = sigstop_for(qemu.pid, 0.3)
        time.sleep(0.3)
        qemu.kill()
        # SIGKILL is not the end: the threads stay readable until QEMU's exit has torn
        # down its memory (a CI run read them 16 ms after kill()); reaped, they are gone
        qemu.wait(10)
        gone = time.monotonic_ns()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    records = states(out)
    for vcpu in (0, 1):
        held = [r for r in records if r["vcpu"] == vcpu and r["state"] == "stopped"]
        assert len(held) == 1
        assert abs(held[0]["end_mono_ns"] - held[0]["start_mono_ns"] - (resumed - stopped)) <= (
            TOL_NS
        )
        assert held[0]["wchan"] == "do_signal_stop"
    assert max(r["end_mono_ns"] for r in records) <= gone + TOL_NS
    note = meta(out)["vcpu_sampler"]["src"]["note"]
    assert note and "exited" in note


@on_each_qemu
def test_a_tcp_monitor_needs_the_pid(tmp_path: Path, binary: str) -> None:
    port = free_port()
    with bare_qemu(tmp_path, "src", binary, tcp=port) as (qemu, address, _):
        plain = record(tmp_path / "plain", "--qmp", f"src={address}", "--duration", "0.5s")
        given = record(tmp_path / "given", "--qmp", f"src={address}", "--duration", "0.5s",
                       "--qemu-pid", f"src={qemu.pid}")  # fmt: skip
        wrong = record(tmp_path / "wrong", "--qmp", f"src={address}", "--duration", "0.5s",
                       "--qemu-pid", f"src={os.getpid()}")  # fmt: skip
    for done in (plain, given, wrong):
        assert done.returncode == 0, done.stderr
    assert "--qemu-pid" in meta(tmp_path / "plain")["vcpu_sampler"]["src"]["note"]
    assert states(tmp_path / "plain") == []
    assert meta(tmp_path / "given")["vcpu_sampler"]["src"]["pid"] == qemu.pid
    assert {r["vcpu"] for r in states(tmp_path / "given")} == {0, 1}
    note = meta(tmp_path / "wrong")["vcpu_sampler"]["src"]["note"]
    assert "does not run on this host" in note
    assert states(tmp_path / "wrong") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--qemu-pid", "src=abc"], "--qemu-pid src=abc: the pid must be a number"),
        (["--qemu-pid", "src=0"], "the pid must be a number from 1"),
        (["--qemu-pid", "src=99999999999999999999"], "the pid must be a number from 1"),
        (["--qemu-pid", "src"], "--qemu-pid 'src': expected NAME=PID"),
        (["--qemu-pid", "dst=12"], "--qemu-pid dst: no --qmp endpoint of that name"),
        (["--vcpu-poll", "-1ms"], "--vcpu-poll"),
        (["--vcpu-poll", "soon"], "--vcpu-poll"),
    ],
)
def test_bad_vcpu_options_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    done = record(tmp_path / "run", "--qmp", "src=/nonexistent.qmp", *args)
    assert done.returncode == 2
    assert done.stderr.startswith("tsprobe: ") and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@on_each_qemu
def test_vcpu_poll_zero_turns_the_sampler_off(tmp_path: Path, binary: str) -> None:
    with bare_qemu(tmp_path, "src", binary) as (_qemu, sock, _):
        done = record(tmp_path / "run", "--qmp", f"src={sock}", "--duration", "0.3s",
                      "--vcpu-poll", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "run" / "vcpu-states.jsonl").exists()
    assert meta(tmp_path / "run")["vcpu_sampler"] == {}


class _CallsOfTheRecorder:
    """Stands in for the VcpuSampler: keeps the recorder's calls in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def watch(self, name: str, pid: int, threads: dict[int, int]) -> None:
        self.calls.append(("watch", name, pid, threads))

    def set_vm_running(self, name: str, running: bool) -> None:
        self.calls.append(("running", name, running))


def test_threads_reach_the_sampler_only_once_the_vms_run_state_is_known(tmp_path: Path) -> None:
    # A CI run read an incoming QEMU's vCPUs as halted for the 10 ms before its first
    # query-status answer: the sampler took the VM for a running one until told.
    recorder = Recorder(tmp_path / "run", qmp={"dst": str(tmp_path / "dst.qmp")})
    calls = _CallsOfTheRecorder()
    recorder.vcpu_sampler = calls  # type: ignore[assignment]
    threads = {0: threading.get_native_id()}
    recorder._on_vcpus("dst", os.getpid(), threads)
    assert calls.calls == []
    recorder._on_runstate("dst", False)
    assert calls.calls == [("running", "dst", False), ("watch", "dst", os.getpid(), threads)]
    recorder._on_vcpus("dst", os.getpid(), threads)  # known from now on: at once
    assert calls.calls[-1] == ("watch", "dst", os.getpid(), threads)
    recorder._on_runstate("dst", True)
    assert calls.calls[-1] == ("running", "dst", True) and len(calls.calls) == 4
