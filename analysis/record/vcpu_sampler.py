"""The host's truth per vCPU: every vCPU thread's state as run-length intervals.

``VcpuSampler`` reads each watched vCPU thread every ``poll_ns`` (10 ms by default) with
``vcpu_threads.ThreadFiles``, classifies the reading (``vcpu_threads.classify``) and extends
the vCPU's current interval or closes it and opens the next. A closed interval is one line of
``vcpu-states.jsonl`` (docs/run-directory.md)::

    {"endpoint": "dst", "vcpu": 0, "tid": 4711, "state": "userfault",
     "start_mono_ns": ..., "end_mono_ns": ..., "start_real_ns": ..., "end_real_ns": ...,
     "wchan": "handle_userfault", "samples": 12}

plus ``futex`` (the word's address in hex) for futex waits (a wait on another futex object
starts a new interval); for ``other`` the state
``letter`` and the first ``stack`` frames seen when it began; and for a ``lock-wait``
``also_waiting``: the other threads seen waiting on the same futex object during the
interval (``main`` for QEMU's main loop thread, ``vcpu N`` for another vCPU). The main loop
thread (tid = pid) is read every pass too, though not classified: when it waits on the word
a vCPU waits on, that word is a lock the main loop takes, the big QEMU lock above all, and
no vCPU's own halt condition.

Timing: an interval starts at the first reading that saw its state and ends (exclusive) at
the first reading that saw another, so each boundary is late by at most one poll period plus
the time one pass of reads takes, plus the time the sampler waited for Python's GIL (at most
the switch interval, 5 ms, when another thread of the recorder keeps it busy); a state
shorter than a poll period can be missed.

It runs in a thread of its own and never waits on QMP: the recorder hands it each endpoint's
QEMU pid and vCPU thread ids (``watch``, from ``query-cpus-fast``, again whenever they can
change) and whether the VM runs (``set_vm_running``, from STOP/RESUME and ``query-status``);
both calls only swap values under a lock. Faults it lives through:

- a QEMU that is SIGSTOPped or frozen still has readable /proc files: its threads read
  ``stopped``;
- a thread or a QEMU that exits closes its intervals at the last reading and is dropped,
  with a note (``notes``); the other endpoints go on;
- a pass that starts late (the host starved the sampler) is counted in ``late_polls`` and
  its gap in ``max_gap_ns``: the intervals around it are as long as the readings show.

Its own CPU time is in ``cost()`` (``cpu_ns``), so every run states what the truth cost.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.record.vcpu_threads import (
    HomeFutex,
    Reading,
    ThreadFiles,
    ThreadGone,
    classify,
    same_object,
)
from analysis.rundir import JsonlWriter, host_now

#: A pass that starts this many periods late counts as late.
LATE_PERIODS = 3


@dataclass
class _Interval:
    state: str
    tid: int
    start_mono: int
    start_real: int
    wchan: str
    futex: int | None
    samples: int = 1
    also_waiting: set[str] = field(default_factory=set)
    letter: str = ""
    stack: list[str] | None = None


@dataclass
class _Endpoint:
    name: str
    pid: int
    threads: dict[int, int]
    main: int
    vm_running: bool = True
    files: dict[int, ThreadFiles] = field(default_factory=dict)
    previous: dict[int, Reading] = field(default_factory=dict)
    homes: dict[int, HomeFutex] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)
    open: dict[int, _Interval] = field(default_factory=dict)
    readings: int = 0
    note: str | None = None


def _continues(current: _Interval, state: str, tid: int, reading: Reading) -> bool:
    """Whether a reading extends the open interval: same state, same thread, and for a futex
    wait the same futex object (a wait on another lock or condition is a new interval)."""
    if current.state != state or current.tid != tid:
        return False
    word, last = reading.futex, current.futex
    return word is None or last is None or same_object(word, last)


class VcpuSampler:
    """Samples the vCPU threads of local QEMUs into ``vcpu-states.jsonl``.

    :param writer: where closed intervals go.
    :param poll_ns: period between passes.
    :param proc: the procfs root.
    :param on_note: called (from the sampler's thread) with things worth a status line.
    """

    def __init__(
        self,
        writer: JsonlWriter,
        *,
        poll_ns: int = 10_000_000,
        proc: str | Path = "/proc",
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        if poll_ns <= 0:
            raise ValueError("the vCPU poll period must be positive")
        self._writer = writer
        self.poll_ns = poll_ns
        self._proc = Path(proc)
        self._on_note = on_note
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[int, dict[int, int], int]] = {}
        self._running: dict[str, bool] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._unavailable: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.late_polls = 0
        self.max_gap_ns = 0
        self.passes = 0
        self.cpu_ns = 0
        self.notes: list[str] = []

    # -- the recorder's side (any thread) -----------------------------------------------

    def watch(
        self, endpoint: str, pid: int, threads: Mapping[int, int], main: int | None = None
    ) -> None:
        """Sample ``endpoint``'s vCPU threads (vCPU index -> thread id) of process ``pid``.

        Calling it again with other ids replaces them at the next pass; the same ids change
        nothing.

        :param main: the thread read as QEMU's main loop (default: ``pid``'s own thread).
        """
        with self._lock:
            self._pending[endpoint] = (pid, dict(threads), pid if main is None else main)
            self._unavailable.pop(endpoint, None)

    def set_vm_running(self, endpoint: str, running: bool) -> None:
        """Tell whether ``endpoint``'s VM runs (QMP's view), for the ``stopped`` rule."""
        with self._lock:
            self._running[endpoint] = running

    def start(self) -> None:
        """Start the sampling thread."""
        self._thread = threading.Thread(target=self._loop, name="tsprobe-vcpu", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Take a last pass, close every open interval and stop (bounded: 5 s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def endpoints(self) -> dict[str, dict[str, Any]]:
        """meta.json's ``vcpu_sampler``: per endpoint pid, threads, poll, samples, note."""
        with self._lock:
            out = {
                name: {
                    "pid": ep.pid,
                    "threads": {str(v): t for v, t in sorted(ep.threads.items())},
                    "poll_ns": self.poll_ns,
                    "samples": ep.readings,
                    "note": ep.note,
                }
                for name, ep in self._endpoints.items()
            }
            out.update(self._unavailable)
        return out

    def cost(self) -> dict[str, int]:
        """The sampler's own figures: passes, late passes, the longest gap, its CPU time."""
        return {
            "passes": self.passes,
            "late_polls": self.late_polls,
            "max_gap_ns": self.max_gap_ns,
            "cpu_ns": self.cpu_ns,
        }

    def note_unavailable(self, endpoint: str, why: str) -> None:
        """Record that ``endpoint`` has no host truth, and why (meta.json, a status line)."""
        with self._lock:
            if endpoint in self._unavailable:
                return
            self._unavailable[endpoint] = {
                "pid": None,
                "threads": {},
                "poll_ns": self.poll_ns,
                "samples": 0,
                "note": why,
            }
        self._say(f"{endpoint}: no host truth per vCPU: {why}")

    # -- the sampling thread ---------------------------------------------------------------

    def _say(self, text: str) -> None:
        self.notes.append(text)
        if self._on_note is not None:
            with contextlib.suppress(Exception):
                self._on_note(text)

    def _loop(self) -> None:
        period_s = self.poll_ns / 1e9
        last_mono = 0
        try:
            while True:
                self._apply_updates()
                real, mono = host_now()
                if last_mono:
                    gap = mono - last_mono
                    self.max_gap_ns = max(self.max_gap_ns, gap)
                    if gap > LATE_PERIODS * self.poll_ns:
                        self.late_polls += 1
                last_mono = mono
                for ep in list(self._endpoints.values()):
                    self._pass(ep, real, mono)
                self.passes += 1
                if self._stop.is_set():
                    break
                spent = (time.monotonic_ns() - mono) / 1e9
                time.sleep(max(0.0, period_s - spent))  # stop() is seen within a period
        finally:
            end_real, end_mono = host_now()
            for ep in self._endpoints.values():
                self._drop(ep, end_real, end_mono)
            self.cpu_ns = time.thread_time_ns()

    def _apply_updates(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            running = dict(self._running)
        real, mono = host_now()
        for name, spec in pending.items():
            ep = self._endpoints.get(name)
            pid, threads, main = spec
            if ep is not None and (ep.pid, ep.threads, ep.main) == spec and ep.note is None:
                continue
            if ep is not None:
                self._drop(ep, real, mono)
            self._endpoints[name] = self._open_endpoint(name, pid, threads, main)
        for name, ep in self._endpoints.items():
            ep.vm_running = running.get(name, True)

    def _open_endpoint(self, name: str, pid: int, threads: dict[int, int], main: int) -> _Endpoint:
        ep = _Endpoint(name, pid, threads, main)
        for tid in sorted(set(threads.values())):
            try:
                ep.files[tid] = ThreadFiles(self._proc, pid, tid)
            except ThreadGone as err:
                ep.note = f"cannot read vCPU thread: {err}"
        if main not in ep.files:
            with contextlib.suppress(ThreadGone):  # the main loop only adds detail
                ep.files[main] = ThreadFiles(self._proc, pid, main)
        if ep.note is not None:
            self._say(f"{name}: {ep.note}")
        else:
            listed = ", ".join(f"vCPU {v}: {t}" for v, t in sorted(threads.items()))
            self._say(f"{name}: sampling vCPU threads of QEMU {pid} ({listed})")
        return ep

    def _pass(self, ep: _Endpoint, real: int, mono: int) -> None:
        readings: dict[int, Reading] = {}
        for tid, files in list(ep.files.items()):
            try:
                readings[tid] = files.read(ep.previous.get(tid))
            except ThreadGone as err:
                files.close()
                del ep.files[tid]
                if tid != ep.main or tid in ep.threads.values():
                    ep.note = str(err)
                    self._say(f"{ep.name}: {err}")
            except (OSError, ValueError) as err:
                ep.note = f"unreadable thread {tid}: {err}"
        ep.readings += 1
        words = Counter(r.futex for r in readings.values() if r.futex is not None)
        ep.shared.update(w for w, n in words.items() if n > 1)
        shared = frozenset(ep.shared)
        names = {tid: f"vcpu {v}" for v, tid in sorted(ep.threads.items(), reverse=True)}
        names.setdefault(ep.main, "main")
        for vcpu, tid in ep.threads.items():
            reading = readings.get(tid)
            if reading is None:
                self._close(ep, vcpu, real, mono)
                continue
            home = ep.homes.setdefault(vcpu, HomeFutex())
            home.observe(reading, ep.vm_running)
            state = classify(
                reading,
                ep.previous.get(tid),
                vm_running=ep.vm_running,
                home=home.home,
                shared=shared,
            )
            current = ep.open.get(vcpu)
            if current is None or not _continues(current, state, tid, reading):
                self._close(ep, vcpu, real, mono)
                current = ep.open[vcpu] = _Interval(
                    state, tid, mono, real, reading.wchan, reading.futex, samples=0
                )
                if state == "other":
                    current.letter = reading.letter
                    current.stack = ep.files[tid].stack() if tid in ep.files else None
            current.samples += 1
            current.wchan = reading.wchan
            current.futex = reading.futex if reading.futex is not None else current.futex
            if state == "lock-wait" and reading.futex is not None:
                current.also_waiting.update(
                    names[other]
                    for other, r in readings.items()
                    if other != tid and r.futex is not None and same_object(r.futex, reading.futex)
                )
        ep.previous = readings

    def _close(self, ep: _Endpoint, vcpu: int, real: int, mono: int) -> None:
        interval = ep.open.pop(vcpu, None)
        if interval is None:
            return
        record: dict[str, Any] = {
            "endpoint": ep.name,
            "vcpu": vcpu,
            "tid": interval.tid,
            "state": interval.state,
            "start_mono_ns": interval.start_mono,
            "end_mono_ns": mono,
            "start_real_ns": interval.start_real,
            "end_real_ns": real,
            "wchan": interval.wchan,
            "samples": interval.samples,
        }
        if interval.futex is not None and interval.state in ("lock-wait", "halted"):
            record["futex"] = hex(interval.futex)
        if interval.also_waiting:
            record["also_waiting"] = sorted(interval.also_waiting)
        if interval.state == "other":
            record["letter"] = interval.letter
            if interval.stack:
                record["stack"] = interval.stack
        try:
            self._writer.write(record)
        except (OSError, ValueError) as err:
            ep.note = f"cannot write vcpu-states: {err}"

    def _drop(self, ep: _Endpoint, real: int, mono: int) -> None:
        for vcpu in list(ep.open):
            self._close(ep, vcpu, real, mono)
        for files in ep.files.values():
            files.close()
        ep.files.clear()
