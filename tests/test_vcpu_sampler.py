"""The vCPU sampler on real threads in known states, with known lengths.

Known workloads (threads of this process or a child, blocked in the kernel for real):

- a thread blocked on a userfaultfd-registered missing page for 300 ms and for 80 ms
  reads back as one ``userfault`` interval of that length;
- the seed's case: two "vCPU" threads idle on their own futex words while the "VM" is
  stopped, then run, then vCPU 0 faults on a missing page while vCPU 1 and a "main loop"
  thread wait on a word other than vCPU 1's own for 400 ms: ``stopped``, then
  ``halted``/``running``, then ``userfault`` and ``lock-wait`` (with ``main`` also
  waiting) of that length;
- a busy child process SIGSTOPped for 250 ms reads ``running``, ``stopped`` (250 ms),
  ``running``.

Tolerance: an interval's ends are each late by at most one poll period plus one pass of
reads (docstring of analysis.record.vcpu_sampler), so a length is within ``TOL_NS`` (one 10 ms
period plus 5 ms) of the truth. The truth comes from an independent reading: the test's own
1 ms polls of the thread's ``wchan``/``syscall`` for the start, its own release for the end.
The states are cross-checked against ``ps`` (procps), another reader of the same threads.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from analysis.record.vcpu_sampler import VcpuSampler
from analysis.record.vcpu_threads import ThreadFiles, classify
from analysis.rundir import JsonlWriter
from tests.blocked_threads import FutexWords, MissingPage, sigstop_for, wait_futex

POLL_NS = 10_000_000
TOL_NS = POLL_NS + 5_000_000


def intervals(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def length(record: dict[str, Any]) -> int:
    return int(record["end_mono_ns"]) - int(record["start_mono_ns"])


def first_seen(checks: dict[int, tuple[int, str, str]]) -> dict[int, int]:
    """Poll threads of this process every millisecond, all at once, until each shows its mark.

    :param checks: key -> (thread id, /proc task file, text the file must start with).
    :return: key -> CLOCK_MONOTONIC (ns) of the first reading that showed the mark.
    """
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 5
    while len(seen) < len(checks) and time.monotonic() < deadline:
        for key, (tid, name, mark) in checks.items():
            if key not in seen:
                with open(f"/proc/self/task/{tid}/{name}") as fh:
                    if fh.read().startswith(mark):
                        seen[key] = time.monotonic_ns()
        time.sleep(0.001)
    assert len(seen) == len(checks), f"never saw {checks} (saw {seen})"
    return seen


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class Sampling:
    """A VcpuSampler writing into tmp_path/vcpu-states.jsonl, stopped by close()."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "vcpu-states.jsonl"
        self.writer = JsonlWriter(self.path)
        self.notes: list[str] = []
        self.sampler = VcpuSampler(self.writer, poll_ns=POLL_NS, on_note=self.notes.append)

    def close(self) -> list[dict[str, Any]]:
        self.sampler.stop()
        self.writer.close()
        return intervals(self.path)


@pytest.mark.parametrize("hold_ms", [300, 80])
def test_a_thread_blocked_on_a_missing_page_reads_userfault(tmp_path: Path, hold_ms: int) -> None:
    run = Sampling(tmp_path)
    page = MissingPage()
    try:
        tid = page.block()
        run.sampler.watch("q", os.getpid(), {0: tid})
        run.sampler.start()
        time.sleep(hold_ms / 1000)
        page.release()
        time.sleep(0.05)
    finally:
        records = run.close()
        page.close()
    faults = [r for r in records if r["state"] == "userfault"]
    assert len(faults) == 1, records
    (fault,) = faults
    assert fault["wchan"] == "handle_userfault" and fault["tid"] == tid
    # The sampler started after the block: its interval starts with the first pass.
    truth = page.released_at_ns - fault["start_mono_ns"]
    assert abs(length(fault) - truth) <= TOL_NS, (length(fault), truth)
    assert length(fault) >= hold_ms * 1_000_000 - TOL_NS
    assert any("exited" in n for n in run.notes)  # the thread ended after the release


@pytest.fixture
def short_gil_turns() -> Iterator[None]:
    """Python threads standing in for vCPUs hand the GIL on every 0.5 ms, not 5 ms.

    Real vCPU threads never hold the sampler's GIL; these spin in Python and would delay the
    sampler's passes (and the test's own 1 ms truth polls) by up to the switch interval.
    """
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("short_gil_turns")
def test_seed_case_one_vcpu_on_a_missing_page_the_other_waiting_on_a_lock(
    tmp_path: Path,
) -> None:
    """vCPU 0 blocked on a missing page, vCPU 1 on a word that is not its own, 400 ms."""
    run = Sampling(tmp_path)
    page = MissingPage()
    words = FutexWords(3)  # 0, 1: each vCPU's own condition; 2: the lock
    fault_now = threading.Event()
    vm_runs = threading.Event()

    def vcpu(index: int) -> None:
        while not fault_now.is_set():
            if vm_runs.is_set():  # a running VM's vCPU halts briefly and works
                words.wait(index, timeout_s=0.02)
                spin(0.004)
            else:  # a stopped VM's vCPU sleeps on its own condition through the stop
                words.wait(index, timeout_s=0.5)
        if index == 0:
            page.touch()
        else:
            words.wait(2)

    def main_loop() -> None:  # takes the same lock as vCPU 1 once the fault happened
        fault_now.wait()
        words.wait(2)

    threads = [threading.Thread(target=vcpu, args=(i,), daemon=True) for i in (0, 1)]
    threads.append(threading.Thread(target=main_loop, daemon=True))
    for t in threads:
        t.start()
    tids = {i: t.native_id or 0 for i, t in enumerate(threads[:2])}
    try:
        run.sampler.set_vm_running("q", False)
        run.sampler.watch("q", os.getpid(), tids, main=threads[2].native_id)
        run.sampler.start()
        time.sleep(0.2)
        stopped_until = time.monotonic_ns()
        run.sampler.set_vm_running("q", True)
        vm_runs.set()
        time.sleep(0.3)
        fault_now.set()
        began = first_seen(
            {
                0: (tids[0], "wchan", "handle_userfault"),
                1: (tids[1], "syscall", f"202 {words.address(2):#x} "),
            }
        )
        time.sleep(0.4)
        page.release()
        released = time.monotonic_ns()
        words.wake(2)
        for t in threads:
            t.join(5)
        time.sleep(0.05)
    finally:
        records = run.close()
        page.close()
    per_vcpu = {i: [r for r in records if r["vcpu"] == i] for i in (0, 1)}
    for i in (0, 1):
        first = per_vcpu[i][0]
        assert first["state"] == "stopped", per_vcpu[i][:3]
        assert abs(first["end_mono_ns"] - stopped_until) <= TOL_NS
        # While the VM ran, each vCPU mostly idled on its own word (brief waits for
        # Python's GIL are lock waits of the test process itself).
        ran = [
            r
            for r in per_vcpu[i]
            if r["start_mono_ns"] >= stopped_until and r["end_mono_ns"] <= began[i]
        ]
        halted = sum(length(r) for r in ran if r["state"] == "halted")
        assert halted >= 0.5 * sum(length(r) for r in ran), [
            {k: r.get(k) for k in ("state", "wchan", "futex", "stat", "stack")} for r in ran
        ]
        assert not [r for r in ran if r["state"] in ("userfault", "stopped")]
    faults = [r for r in per_vcpu[0] if r["state"] == "userfault"]
    assert len(faults) == 1, [
        (r["state"], r.get("wchan"), r["start_mono_ns"] - began[0], length(r) // 1_000_000)
        for r in per_vcpu[0]
    ]
    (fault,) = faults
    on_lock = [r for r in per_vcpu[1] if r.get("futex") == hex(words.address(2))]
    brief = [(r["state"], length(r) // 1_000_000, r.get("futex")) for r in per_vcpu[1]]
    assert len(on_lock) == 1, brief  # one interval on the lock's word ...
    (lock,) = on_lock
    assert lock["state"] == "lock-wait"  # ... and others are the GIL of this test process
    assert lock["also_waiting"] == ["main"]  # the "main loop" waited on the same lock
    assert "also_waiting" not in fault
    for record, start in ((fault, began[0]), (lock, began[1])):
        assert abs(length(record) - (released - start)) <= TOL_NS, (record, released - start)
    # vCPU 0 never waited on the lock; a lock wait of its Python thread is on this test
    # process's GIL, another word, and short
    waits = [r for r in per_vcpu[0] if r["state"] == "lock-wait"]
    assert all(r["futex"] != hex(words.address(2)) and length(r) <= TOL_NS for r in waits)


BUSY = "import sys\nsys.stdout.write('r')\nsys.stdout.flush()\nwhile True: pass\n"


def busy() -> subprocess.Popen[bytes]:
    """A process spinning on a CPU, returned once it spins: while its interpreter starts it
    sleeps in the kernel now and then (page faults on its files), which reads ``other``."""
    child = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.read(1) == b"r"
    return child


def test_a_sigstopped_process_reads_stopped_for_as_long_as_it_was_stopped(
    tmp_path: Path,
) -> None:
    child = busy()
    run = Sampling(tmp_path)
    try:
        run.sampler.watch("q", child.pid, {0: child.pid})
        run.sampler.start()
        time.sleep(0.15)
        stopped, resumed = sigstop_for(child.pid, 0.25)
        time.sleep(0.15)
    finally:
        records = run.close()
        child.kill()
        child.wait()
    states = [r["state"] for r in records]
    assert states[0] in ("running", "runnable") and "stopped" in states
    stop = next(r for r in records if r["state"] == "stopped")
    assert abs(length(stop) - (resumed - stopped)) <= TOL_NS
    assert set(states) <= {"running", "runnable", "stopped"}


def test_a_process_that_exits_closes_its_intervals_with_a_note(tmp_path: Path) -> None:
    child = busy()
    run = Sampling(tmp_path)
    try:
        run.sampler.watch("q", child.pid, {0: child.pid, 1: child.pid})
        run.sampler.start()
        time.sleep(0.1)
        child.kill()
        child.wait()
        killed = time.monotonic_ns()
        time.sleep(0.1)
    finally:
        records = run.close()
    assert {r["vcpu"] for r in records} == {0, 1}  # one thread, two vCPUs (single-threaded TCG)
    assert all(r["end_mono_ns"] <= killed + TOL_NS for r in records)
    assert any("exited" in n for n in run.notes)
    assert "exited" in (run.sampler.endpoints()["q"]["note"] or "")


@pytest.mark.skipif(shutil.which("ps") is None, reason="procps ps is not installed")
def test_states_agree_with_ps(tmp_path: Path) -> None:
    """Each thread's state as the sampler reads it, against procps ps on the same threads."""
    page = MissingPage()
    words = FutexWords(2)
    child = busy()
    stopped_child = busy()
    os.kill(stopped_child.pid, signal.SIGSTOP)
    waiter = threading.Thread(target=words.wait, args=(1,), daemon=True)
    waiter.start()
    try:
        fault_tid = page.block()
        wait_futex(waiter.native_id or 0, words.address(1))
        time.sleep(0.2)  # the busy child is on a CPU by now
        subjects = {
            (os.getpid(), fault_tid): "userfault",
            (os.getpid(), waiter.native_id or 0): "futex",
            (child.pid, child.pid): "running",
            (stopped_child.pid, stopped_child.pid): "stopped",
        }
        ours: dict[tuple[int, int], str] = {}
        for pid, tid in subjects:
            files = ThreadFiles(Path("/proc"), pid, tid)
            reading = files.read()
            files.close()
            ours[(pid, tid)] = classify(reading, None, vm_running=True, home=None)
        theirs: dict[tuple[int, int], str] = {}
        for pid, tid in subjects:
            out = subprocess.run(
                ["ps", "-L", "-o", "tid=,stat=,wchan:40=", "-p", str(pid)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            for line in out.splitlines():
                fields = line.split()
                if int(fields[0]) == tid:
                    stat, wchan = fields[1], fields[2] if len(fields) > 2 else "-"
                    theirs[(pid, tid)] = (
                        "stopped" if stat[0] in "Tt"
                        else "userfault" if wchan == "handle_userfault"
                        else "running" if stat[0] == "R"
                        else "futex" if wchan.startswith("futex")
                        else wchan
                    )  # fmt: skip
    finally:
        page.close()
        words.wake(1)
        for proc in (child, stopped_child):
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    futex_states = {"lock-wait", "halted"}
    for key, expected in subjects.items():
        ours_as_ps = "futex" if ours[key] in futex_states else ours[key]
        ours_as_ps = "running" if ours_as_ps == "runnable" else ours_as_ps
        assert ours_as_ps == theirs[key] == expected, (key, ours[key], theirs[key])


def test_an_other_interval_keeps_its_letter_and_kernel_stack(tmp_path: Path) -> None:
    """A thread asleep in nanosleep is none of the named states: its stack says where."""
    libc = ctypes.CDLL(None)
    sleeper = threading.Thread(target=libc.usleep, args=(400_000,), daemon=True)
    run = Sampling(tmp_path)
    sleeper.start()
    try:
        run.sampler.watch("q", os.getpid(), {0: sleeper.native_id or 0})
        run.sampler.start()
        sleeper.join(5)
        time.sleep(0.05)
    finally:
        records = run.close()
    slept = [r for r in records if r["state"] == "other"]
    assert slept and slept[0]["letter"] == "S", records
    assert "nanosleep" in slept[0]["wchan"] or "nanosleep" in " ".join(slept[0]["stack"])
    if os.geteuid() == 0:  # /proc/PID/task/TID/stack needs root
        assert any("nanosleep" in frame for frame in slept[0]["stack"]), slept[0]
