"""What a QEMU vCPU thread is doing, read from the host's /proc: one reading, one state.

The host side's truth about a vCPU is its thread in the QEMU process (thread ids from QMP
``query-cpus-fast``; under single-threaded TCG every vCPU shares one thread). Per thread,
four records of ``/proc/PID/task/TID/`` are read:

``stat``
    The scheduler state letter after the ``(comm)`` field: ``R`` running or runnable,
    ``S``/``D`` asleep, ``T``/``t`` stopped by a signal or a tracer.
``wchan``
    The kernel function the thread sleeps in (``0`` when running): ``handle_userfault``
    for a fault on a page a userfaultfd registered as missing (postcopy), a ``futex``
    wait function for a lock or condition variable, ``kvm_vcpu_block``/``kvm_vcpu_halt``
    for a halted KVM vCPU, ``__refrigerator``/``do_freezer_trap`` for a frozen cgroup,
    ``do_signal_stop`` for SIGSTOP.
``schedstat``
    On-CPU time and run delay in ns and timeslices (Documentation/scheduler/sched-stats.rst):
    between two readings, a thread in state ``R`` whose run delay grew more than its on-CPU
    time waited for a host CPU; a sleeping thread whose on-CPU time and timeslices did not
    move has not run, so it still sleeps where it slept (``wchan`` and ``syscall`` are not
    read again).
``syscall``
    Read only for a futex wait: ``202 UADDR OP ...``; ``UADDR`` names the futex word.
    ``running`` there means the thread woke between the two reads: the reading is then
    taken as state ``R``. Where it cannot be opened (no ptrace access), futex waits read
    ``other`` with their wchan.

The rule, applied in this order (``classify``), gives one of ``rundir.VCPU_STATE_NAMES``:

1. ``stopped``: state ``T``/``t``, or a freezer or signal-stop wchan (SIGSTOP, cgroup
   freezer), or state ``D`` in a futex wait or a KVM halt: those sleep interruptibly
   (``S``), and since Linux 6.1 the freezer freezes such a sleeper in place (its wchan and
   futex word stay, its state reads ``D``: ``TASK_FROZEN``);
2. ``userfault``: wchan ``handle_userfault`` (blocked on a missing postcopy page; a vCPU
   that faults while the VM is stopped is still blocked on the page);
3. ``running`` / ``runnable``: state ``R``; ``runnable`` when its run delay grew more than
   its on-CPU time since the previous reading (steal, seen from the host);
4. ``stopped``: the VM is not running by QMP (``STOP`` .. ``RESUME``, or ``query-status``
   ``running: false``: an ``-incoming`` destination, a paused VM) and the thread sleeps;
5. ``halted``: a KVM halt wchan, or a futex wait on the vCPU's *own* condition;
6. ``lock-wait``: a futex wait on any other futex word: a QEMU lock (the big QEMU lock,
   taken to emulate a device) or a condition shared with other threads (TCG's exclusive
   sections, where a vCPU waits until every other vCPU has left guest code);
7. ``other``: anything else (the wchan is kept).

Which futex word is a vCPU's own condition: every vCPU thread of QEMU idles in
``qemu_wait_io_event`` on its own ``halt_cond`` (a condition variable), both while the
guest halts the CPU and while the VM is stopped. glibc waits on one of several words inside
a ``pthread_cond_t`` (48 bytes: ``__g_signals[0]`` and ``[1]`` alternate between waits),
so words less than ``COND_SPAN`` bytes apart count as one object. The object a vCPU waits
on while the VM is stopped is its own; before the VM has been seen stopped, the object it
waited on in the most separate wait episodes (halts are many and short, a lock wait is one
long episode) stands in (``HomeFutex``). A word another vCPU of the same QEMU waited on at
the same moment is never a vCPU's own. Under KVM a running vCPU is in ``ioctl(KVM_RUN)``
in state ``R``; its halt is ``kvm_vcpu_block`` (``kvm_vcpu_halt`` on newer kernels), see
the snapshots in ``tests/fixtures/proc-vcpu/``.

What ``other`` was is kept for the reader: its state letter and, where the reader may read
it (root), the first frames of the thread's kernel stack (``stack``, read once when an
``other`` interval opens; a wchan of ``0`` on a sleeping thread means every frame was a
scheduler function or the stack could not be unwound; a thread read at the instant it
goes to sleep reads it too, so such a reading is never reused for the next one).

Reading is apart from parsing: ``parse_state``, ``parse_schedstat``, ``parse_syscall``
and ``parse_stack`` are pure and tested on literal text; ``ThreadFiles`` keeps the files of
one thread open and re-reads them with ``pread`` (the /proc seq files regenerate at offset
0), so a reading costs at most four ``pread`` calls and no ``open``, two for a thread that
slept through. A thread that has exited reads ``ESRCH``: the reader raises ``ThreadGone``.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from analysis.errors import AnalysisError

#: x86_64 syscall numbers that wait on a futex word (futex, futex_waitv).
FUTEX_SYSCALLS = frozenset({202, 449})
#: Kernel functions a thread waiting on a futex sleeps in (names changed across kernels).
FUTEX_WCHANS = frozenset(
    {"futex_wait_queue", "futex_wait_queue_me", "futex_do_wait", "futex_wait", "__futex_wait"}
)
USERFAULT_WCHANS = frozenset({"handle_userfault"})
#: A halted KVM vCPU (kvm_vcpu_block until 5.16, kvm_vcpu_halt around it since).
KVM_HALT_WCHANS = frozenset({"kvm_vcpu_block", "kvm_vcpu_halt", "kvm_vcpu_check_block"})
#: Frozen cgroups (v1 and v2) and signal stops.
STOP_WCHANS = frozenset({"__refrigerator", "do_freezer_trap", "do_signal_stop"})
STOP_LETTERS = frozenset({"T", "t"})
#: sizeof(pthread_cond_t) on x86_64 glibc: futex words closer than this are one object.
COND_SPAN = 48


def same_object(a: int, b: int) -> bool:
    """Whether two futex words lie in one condition variable (or are the same word)."""
    return abs(a - b) < COND_SPAN


class ThreadGone(AnalysisError):
    """The thread (or its whole process) no longer exists."""


@dataclass(frozen=True)
class Reading:
    """One reading of one thread.

    :param letter: the scheduler state letter from ``stat``.
    :param wchan: the wait channel (``0`` when running).
    :param run_ns: on-CPU time from ``schedstat``.
    :param run_delay_ns: run delay from ``schedstat``.
    :param slices: timeslices from ``schedstat`` (times switched onto a CPU).
    :param syscall: the syscall it sleeps in, when read (futex waits), else ``None``.
    :param futex: the futex word's address, for a futex wait whose syscall was read.
    """

    letter: str
    wchan: str
    run_ns: int
    run_delay_ns: int
    slices: int = 0
    syscall: int | None = None
    futex: int | None = None

    @property
    def futex_wait(self) -> bool:
        """Whether the thread sleeps in a futex wait."""
        return self.wchan in FUTEX_WCHANS or self.syscall in FUTEX_SYSCALLS


def parse_state(stat: str) -> str:
    """The state letter of a ``/proc/.../stat`` line (the field after ``(comm)``).

    >>> parse_state("4337 (qemu-system-x86) S 1 4334 ...")
    'S'

    :raise ValueError: when the line has no ``)`` followed by a state.
    """
    _head, sep, rest = stat.rpartition(")")
    fields = rest.split()
    if not sep or not fields or len(fields[0]) != 1:
        raise ValueError(f"not a stat line: {stat[:60]!r}")
    return fields[0]


def parse_schedstat(text: str) -> tuple[int, int, int]:
    """(on-CPU ns, run delay ns, timeslices) of a ``schedstat`` line.

    >>> parse_schedstat("72786730 8921125 74\\n")
    (72786730, 8921125, 74)

    :raise ValueError: when the line is not three integers.
    """
    parts = text.split()
    if len(parts) < 3:
        raise ValueError(f"not a schedstat line: {text[:60]!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def parse_syscall(text: str) -> tuple[int, int | None] | None:
    """(syscall number, first argument) of a ``syscall`` line; ``None`` when not in one.

    ``running`` (the thread was on a CPU) and ``-1 ...`` (blocked outside a syscall, as a
    fault in guest code under TCG is) give ``None``.

    >>> parse_syscall("202 0x55f74492faa8 0x189 0x0 0x0 0x0 0xffffffff 0x7ffd 0x7fb1")
    (202, 94532048812712)

    :raise ValueError: when the line is neither ``running`` nor starts with a number.
    """
    parts = text.split()
    if not parts or parts[0] == "running":
        return None
    number = int(parts[0])
    if number < 0:
        return None
    first = int(parts[1], 16) if len(parts) > 1 and parts[1].startswith("0x") else None
    return number, first


def parse_stack(text: str, frames: int = 6) -> list[str]:
    """The first ``frames`` function names of a ``/proc/.../stack`` dump, offsets dropped.

    >>> parse_stack("[<0>] futex_do_wait+0x3c/0x80\\n[<0>] __futex_wait+0x8d/0x120\\n")
    ['futex_do_wait', '__futex_wait']
    """
    names = []
    for line in text.splitlines():
        name = line.rpartition("] ")[2].split("+", 1)[0].strip()
        if name:
            names.append(name)
        if len(names) == frames:
            break
    return names


def _pread(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("ascii", "replace")


@dataclass
class ThreadFiles:
    """The open /proc files of one thread, re-read with ``pread``.

    :param proc: the procfs root (tests move it).
    :param pid: the process.
    :param tid: the thread.
    :raise ThreadGone: when the thread does not exist.
    """

    proc: Path
    pid: int
    tid: int
    _fds: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        base = self.proc / str(self.pid) / "task" / str(self.tid)
        try:
            for name in ("stat", "wchan", "schedstat"):
                self._fds[name] = os.open(base / name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            self.close()
            raise ThreadGone(f"thread {self.tid} of {self.pid}: {err.strerror or err}") from err
        with contextlib.suppress(PermissionError):
            self._fds["syscall"] = os.open(base / "syscall", os.O_RDONLY | os.O_CLOEXEC)

    def read(self, previous: Reading | None = None) -> Reading:
        """Read the thread now (``syscall`` only for a futex wait).

        A thread that has not run since ``previous`` (same on-CPU time and timeslices, the
        same sleeping state letter) still sleeps where it slept: its wchan and futex word
        are taken from ``previous`` instead of being read again, unless ``previous`` read a
        wchan of ``0``: a thread caught going to sleep (its state already set, its time
        already accounted, still on its CPU in ``schedule()``) reads ``0`` once, and kept,
        that reading would hide its real wait for as long as it sleeps.

        :param previous: this thread's previous reading, if any.
        :raise ThreadGone: when the thread has exited.
        :raise ValueError: when a record does not parse.
        """
        try:
            letter = parse_state(_pread(self._fds["stat"]))
            run_ns, delay_ns, slices = parse_schedstat(_pread(self._fds["schedstat"]))
            if (
                previous is not None
                and letter != "R"
                and previous.wchan != "0"
                and (letter, run_ns, slices) == (previous.letter, previous.run_ns, previous.slices)
            ):
                return previous
            wchan = _pread(self._fds["wchan"]).strip() or "0"
            reading = Reading(letter, wchan, run_ns, delay_ns, slices)
            syscall = self._fds.get("syscall")
            if letter != "R" and wchan in FUTEX_WCHANS and syscall is not None:
                text = _pread(syscall)
                call = parse_syscall(text)
                if call is not None:
                    number, first = call
                    futex = first if number in FUTEX_SYSCALLS else None
                    reading = Reading(letter, wchan, run_ns, delay_ns, slices, number, futex)
                elif text.startswith("running"):
                    reading = Reading("R", "0", run_ns, delay_ns, slices)
        except OSError as err:
            if err.errno in (errno.ESRCH, errno.ENOENT):
                raise ThreadGone(f"thread {self.tid} of {self.pid} exited") from err
            raise
        return reading

    def stack(self) -> list[str] | None:
        """The first frames of the thread's kernel stack (``None``: not readable here)."""
        path = self.proc / str(self.pid) / "task" / str(self.tid) / "stack"
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                return parse_stack(fh.read(8192))
        except OSError:
            return None

    def close(self) -> None:
        """Close the files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass
class HomeFutex:
    """Learns the futex word a vCPU thread idles on (its own ``halt_cond``).

    ``observe`` is called with every reading: a word seen while the VM was stopped becomes
    the home at once; otherwise each new wait episode (a futex wait after something else)
    counts for its object (words within ``COND_SPAN`` count for the first one seen) and the
    most counted object stands in.
    """

    stopped_home: int | None = None
    episodes: Counter[int] = field(default_factory=Counter)
    _last: int | None = None

    def observe(self, reading: Reading, vm_running: bool) -> None:
        """Account for one reading of the vCPU's thread."""
        word = reading.futex if reading.futex_wait else None
        if word is not None and not vm_running:
            self.stopped_home = word
        if word is not None and (self._last is None or not same_object(word, self._last)):
            key = next((k for k in self.episodes if same_object(k, word)), word)
            self.episodes[key] += 1
        self._last = word

    @property
    def home(self) -> int | None:
        """The word taken as the vCPU's own condition (``None``: not known yet)."""
        if self.stopped_home is not None:
            return self.stopped_home
        if not self.episodes:
            return None
        return self.episodes.most_common(1)[0][0]


def classify(
    reading: Reading,
    previous: Reading | None,
    *,
    vm_running: bool,
    home: int | None,
    shared: frozenset[int] = frozenset(),
) -> str:
    """The host state of a vCPU from one reading of its thread (rule in the module docstring).

    :param reading: the reading now.
    :param previous: the thread's previous reading (``None``: the first).
    :param vm_running: whether QMP says the VM runs.
    :param home: the vCPU's own futex word (``HomeFutex.home``).
    :param shared: futex words other vCPU threads of the same QEMU wait on now.
    :return: one of ``rundir.VCPU_STATE_NAMES``.
    """
    if reading.letter in STOP_LETTERS or reading.wchan in STOP_WCHANS:
        return "stopped"
    if reading.wchan in USERFAULT_WCHANS:
        return "userfault"
    if reading.letter == "D" and (reading.futex_wait or reading.wchan in KVM_HALT_WCHANS):
        return "stopped"
    if reading.letter == "R":
        if previous is not None:
            ran = reading.run_ns - previous.run_ns
            waited = reading.run_delay_ns - previous.run_delay_ns
            if waited > ran:
                return "runnable"
        return "running"
    if not vm_running:
        return "stopped"
    if reading.wchan in KVM_HALT_WCHANS:
        return "halted"
    if reading.futex_wait:
        word = reading.futex
        own = word is not None and home is not None and same_object(word, home)
        if own and word not in shared:
            return "halted"
        if word is not None:
            return "lock-wait"
    return "other"
