"""Freezing the guest from the host: the whole QEMU (``stall``) or one vCPU thread (``stall-vcpu``).

``_freeze_process`` stops every thread of QEMU with SIGSTOP and resumes them with SIGCONT:
one freeze of known length, the same under any TCG threading. ``_freeze_thread`` freezes
one vCPU thread through the cgroup v1 freezer (``FREEZER``; the thread id goes into a
new group's ``tasks``, then ``FROZEN`` / ``THAWED``).

The rule for one vCPU. A frozen vCPU thread can hold up the others: it may hold QEMU's big
lock (BQL), be the waiter a futex wake-up picked, or the guest's CPU may be frozen inside
an interrupts-off section that the other CPU then spins on (docs/lab-notes.md has the
cases seen and how they were told apart). An unhindered vCPU thread under the guest's
1 ms samplers goes idle and wakes about once per ms; a blocked one sleeps at most once in
a window. So the whole freeze is watched in windows of ``FREEZE_CHECK_NS``
(``_watch_freeze``, reading /proc/QEMU/task/*/stat) and kept only when every other vCPU
thread slept at least ``FREEZE_MIN_SLEEPS`` times in each window and none was on CPU for
``FREEZE_SPIN_SHARE`` of ``FREEZE_SPIN_WINDOWS`` windows in a row; otherwise it thaws at
once and freezes again (shortly after a block in the first window, whose loss stays under
the lab's 50 ms threshold; ``FREEZE_LATE_RETRY_S`` after a later one), up to
``FREEZE_ATTEMPTS`` times. A false alarm costs an attempt, never a wrong result. Each
attempt is a ``freeze_attempt`` record in lab-steps.jsonl (a blocked one with the
threads' states, ``_thread_states``, and ``blocked_at_ns``); the ``inject`` record
measures the kept freeze alone and counts the attempts.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.lab.errors import ScenarioError
from analysis.rundir import host_now

FREEZER = Path("/sys/fs/cgroup/freezer")


#: stall-vcpu keeps a freeze only if every other vCPU thread slept (went idle and was
#: woken again) at least FREEZE_MIN_SLEEPS times in each FREEZE_CHECK_NS window: the
#: guest's 1 ms samplers make an unhindered vCPU do so about once per ms, a blocked one at
#: most once (docs/lab-notes.md). Else it thaws and tries again.
FREEZE_CHECK_NS = 20_000_000
FREEZE_MIN_SLEEPS = 3


FREEZE_ATTEMPTS = 20


#: ... and is not on CPU for FREEZE_SPIN_SHARE of FREEZE_SPIN_WINDOWS windows in a row.
FREEZE_SPIN_SHARE = 0.95


FREEZE_SPIN_WINDOWS = 2


#: Seconds before freezing again after a freeze that blocked another vCPU past its start.
FREEZE_LATE_RETRY_S = 1.5


class _Freezer:
    """A cgroup v1 freezer group holding one thread."""

    def __init__(self, tid: int) -> None:
        if not (FREEZER / "tasks").exists():
            raise ScenarioError(f"no cgroup v1 freezer at {FREEZER}: stall-vcpu needs one")
        self.tid = tid
        self.group = FREEZER / f"tsprobe-lab-{os.getpid()}-{tid}"
        self.group.mkdir(exist_ok=True)
        (self.group / "tasks").write_text(str(tid))

    def set(self, state: str, timeout_s: float = 2.0) -> None:
        (self.group / "freezer.state").write_text(state)
        deadline = time.monotonic() + timeout_s
        while (self.group / "freezer.state").read_text().strip() != state:
            if time.monotonic() > deadline:
                raise ScenarioError(f"the freezer did not reach {state} in {timeout_s} s")
            time.sleep(0.0005)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            (self.group / "freezer.state").write_text("THAWED")
        with contextlib.suppress(OSError):
            (FREEZER / "tasks").write_text(str(self.tid))
        with contextlib.suppress(OSError):
            self.group.rmdir()


def _freeze_process(pid: int, stall_ns: int) -> dict[str, Any]:
    real0, _ = host_now()
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic_ns()
    try:
        time.sleep(stall_ns / 1e9)
    finally:
        t1 = time.monotonic_ns()
        os.kill(pid, signal.SIGCONT)
    return {
        "freeze_ns": t1 - t0,
        "host_start_ns": real0,
        "host_end_ns": real0 + (t1 - t0),
        "requested_ns": stall_ns,
    }


def _oncpu_ns(pid: int, tids: list[int]) -> dict[str, int]:
    out = {}
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text()
            out[str(tid)] = int(text.split()[0])
    return out


def _sleeps(pid: int, tids: list[int]) -> dict[int, int]:
    """Each thread's voluntary context switches so far (a thread gone is left out)."""
    out = {}
    for tid in tids:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            match = re.search(r"^voluntary_ctxt_switches:\s*(\d+)", status, re.M)
            if match:
                out[tid] = int(match.group(1))
    return out


def _thread_states(pid: int, threads: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Where some of QEMU's threads are (the evidence kept for a blocked freeze).

    Per thread: its scheduler state, wchan and system call (number and first arguments);
    in a futex wait, the futex word and the int 8 bytes further, where a glibc
    ``pthread_mutex_t`` keeps its owner's thread id.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, tid in threads.items():
        task = Path(f"/proc/{pid}/task/{tid}")
        info: dict[str, Any] = {"tid": tid}
        with contextlib.suppress(OSError, IndexError, ValueError, struct.error):
            info["state"] = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            info["wchan"] = (task / "wchan").read_text().strip()
            syscall = (task / "syscall").read_text().split()
            info["syscall"] = " ".join(syscall[:4])
            if syscall[0] == "202":  # futex(uaddr, op, val, ...)
                with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
                    mem.seek(int(syscall[1], 16))
                    word, _, owner = struct.unpack("<iIi", mem.read(12))
                info["futex"] = {"addr": syscall[1], "word": word, "mutex_owner": owner}
        out[name] = info
    return out


@dataclass
class _Watch:
    """What ``_watch_freeze`` saw of the other vCPU threads."""

    #: Sleeps each thread took in the first window.
    first_sleeps: dict[int, int]
    #: Offset (ns from the freeze request) of the window that failed; None: none did.
    blocked_at: int | None = None
    #: Why it failed: ``sleeps`` (too few) or ``spin`` (on CPU all along).
    why: str | None = None
    #: The highest share of a judged window any other thread spent on CPU.
    oncpu_max: float = 0.0


def _watch_freeze(pid: int, others: list[int], t_req: int, stall_ns: int) -> _Watch:
    """Hold a freeze for ``stall_ns`` from ``t_req``, checking the other vCPU threads.

    Every ``FREEZE_CHECK_NS`` window (a last, shorter one is not judged) each other vCPU
    thread must go to sleep at least ``FREEZE_MIN_SLEEPS`` times, and none may be on CPU
    for ``FREEZE_SPIN_SHARE`` of ``FREEZE_SPIN_WINDOWS`` windows in a row: a guest CPU
    that waits in its kernel for the frozen one spins (its thread on CPU 98 % of a
    700 ms freeze, against 55 to 68 % in freezes that left CPU 0 alone) and can still
    sleep briefly several times a window.
    """
    sleeps0, oncpu0, t0 = _sleeps(pid, others), _oncpu_ns(pid, others), time.monotonic_ns()
    watch = _Watch(first_sleeps={})
    spinning = 0
    while True:
        elapsed = time.monotonic_ns() - t_req
        window_end = min(elapsed + FREEZE_CHECK_NS, stall_ns)
        time.sleep(max(0.0, (window_end - elapsed) / 1e9))
        sleeps1, oncpu1, t1 = _sleeps(pid, others), _oncpu_ns(pid, others), time.monotonic_ns()
        slept = {t: n - sleeps0[t] for t, n in sleeps1.items() if t in sleeps0}
        if not watch.first_sleeps:
            watch.first_sleeps = slept
        judged = window_end - elapsed >= FREEZE_CHECK_NS
        if judged:
            share = max(
                ((n - oncpu0[t]) / max(1, t1 - t0) for t, n in oncpu1.items() if t in oncpu0),
                default=0.0,
            )
            watch.oncpu_max = max(watch.oncpu_max, share)
            spinning = spinning + 1 if share >= FREEZE_SPIN_SHARE else 0
            if not all(slept.get(t, 0) >= FREEZE_MIN_SLEEPS for t in others):
                watch.blocked_at, watch.why = elapsed, "sleeps"
                return watch
            if spinning >= FREEZE_SPIN_WINDOWS:
                watch.blocked_at, watch.why = elapsed, "spin"
                return watch
        if window_end >= stall_ns:
            return watch
        sleeps0, oncpu0, t0 = sleeps1, oncpu1, t1


def _freeze_thread(
    cpu: int,
    threads: dict[int, int],
    stall_ns: int,
    pid: int,
    note: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Freeze vCPU ``cpu``'s thread for ``stall_ns``, where it blocks no other vCPU.

    The whole freeze is watched in windows of ``FREEZE_CHECK_NS``: in each, every other
    vCPU thread must go to sleep (a voluntary context switch) at least
    ``FREEZE_MIN_SLEEPS`` times and must not spin (``_watch_freeze``), or the thread is
    thawed at once and frozen again later
    (see the module docstring): 0.1 to 0.3 s later when the first window failed (the
    other vCPUs lost less than the guest's 50 ms threshold), ``FREEZE_LATE_RETRY_S``
    later otherwise, so that what the aborted freeze did to the guest ends more than a
    second before the kept one starts. ``note`` gets one ``freeze_attempt`` record per
    attempt.

    :raise ScenarioError: when ``FREEZE_ATTEMPTS`` attempts in a row were blocked.
    :return: the kept freeze, measured from its own FROZEN write.
    """
    tid = threads[cpu]
    others = [t for c, t in threads.items() if c != cpu]
    names = {"main": pid, **{f"cpu{c}": t for c, t in threads.items()}}
    freezer = _Freezer(tid)
    try:
        for attempt in range(1, FREEZE_ATTEMPTS + 1):
            real0, _ = host_now()
            before = _oncpu_ns(pid, others)
            t_req = time.monotonic_ns()
            freezer.set("FROZEN")
            t0 = time.monotonic_ns()
            watch = _watch_freeze(pid, others, t_req, stall_ns)
            record: dict[str, Any] = {
                "type": "freeze_attempt",
                "attempt": attempt,
                "host_start_ns": real0,
                "check_ns": FREEZE_CHECK_NS,
                "others_sleeps": {str(t): n for t, n in watch.first_sleeps.items()},
                "others_oncpu_max": round(watch.oncpu_max, 3),
            }
            blocked_at = watch.blocked_at
            if blocked_at is None:
                note({**record, "outcome": "kept"})
                break
            record["threads"] = _thread_states(pid, names)
            _thaw_blocked(freezer, record, (watch.why, blocked_at), t_req, note)
        else:
            raise ScenarioError(
                f"each of {FREEZE_ATTEMPTS} freezes of vCPU {cpu} blocked another vCPU "
                f"(lab-steps.jsonl has the threads' states)"
            )
        t1 = time.monotonic_ns()
        freezer.set("THAWED")
        t2 = time.monotonic_ns()
        after = _oncpu_ns(pid, others)
    finally:
        freezer.release()
    return {
        # On-CPU time of the other vCPU threads during the freeze (schedstat field 1):
        # near the freeze's length means they ran (or spun), near 0 that they slept.
        "others_oncpu_ns": {t: after[t] - before[t] for t in after if t in before},
        # Frozen from (about) the FROZEN write to the THAWED write's completion.
        "freeze_ns": t2 - t_req,
        "frozen_confirmed_ns": t1 - t0,
        "host_start_ns": real0,
        "host_end_ns": real0 + (t2 - t_req),
        "requested_ns": stall_ns,
        "attempts": attempt,
    }


def _thaw_blocked(
    freezer: _Freezer,
    record: dict[str, Any],
    blocked: tuple[str | None, int],
    t_req: int,
    note: Callable[[dict[str, Any]], None],
) -> None:
    """Thaw a freeze that blocked another vCPU, note the attempt, and wait before the next:
    0.1 to 0.3 s after a block in the first window, ``FREEZE_LATE_RETRY_S`` after a later
    one (so that what the aborted freeze did to the guest ends before the kept one)."""
    why, blocked_at = blocked
    freezer.set("THAWED")
    note(
        {
            **record,
            "outcome": "blocked",
            "blocked_by": why,
            "blocked_at_ns": blocked_at,
            "freeze_ns": time.monotonic_ns() - t_req,
        }
    )
    time.sleep(random.uniform(0.1, 0.3) if blocked_at < FREEZE_CHECK_NS else FREEZE_LATE_RETRY_S)
