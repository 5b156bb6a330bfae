"""The per-CPU stall sampler: a small process pinned to one CPU that reports each gap once.

What it measures
    How long a thread on CPU n could not run when it wanted to: the guest scheduler ran
    something else, the host preempted the vCPU, or the vCPU was blocked in the host (a
    postcopy page fault, a pause). An application on that CPU felt the same gap.

How (mode ``tick``, the default)
    A periodic CLOCK_MONOTONIC timerfd (``probe.timerfd``) expires on an absolute grid,
    ``first + k * interval``. Each read returns how many grid points passed since the last
    read. A count of 1 means "on time"; the loop then touches no clock at all. A larger count,
    or every ``~100 ms`` for housekeeping, makes the loop read CLOCK_MONOTONIC: the gap is
    ``now - previous wake`` (the previous wake's time is known exactly when that wake read
    the clock, else bounded below by its grid point, so a gap may read up to one interval
    too long). A gap longer than the threshold becomes ONE stall event, however many grid
    points it covered; the timer then simply continues on its grid. (cyclictest instead
    advances its deadline by one interval and reports a stall of S as S/interval shrinking
    samples.) A gap can only be seen if it covers a grid point, so the interval bounds both
    the shortest gap seen and the error of its length; with ``threshold < 2 * interval``
    every wake reads the clock, because then an on-time count of 1 can hide a gap.

    The sampler runs at SCHED_FIFO priority 1 when permitted (``--fifo``), so that ordinary
    tasks on its CPU do not delay it; it never spins at that priority.

How (mode ``spin``)
    A busy loop on ``time.monotonic_ns()`` (about 6 M reads/s): any two successive reads
    further apart than the threshold are a gap. It costs a whole CPU and sees every gap with
    sub-microsecond resolution. It always runs at SCHED_OTHER (RT throttling would take 50 ms
    of every second from a spinning FIFO task).

Cause hint, from deltas over the gap
    ``run_delay`` of the sampler thread (``/proc/self/task/TID/schedstat``, field 2) grew by
    at least half the gap: ``guest-sched``; else the CPU's ``steal`` (``/proc/stat``, 8th
    field of ``cpuN``, 10 ms ticks) grew by about the gap: ``host-preempt``; else
    ``vcpu-blocked``. When a counter cannot be read the hint is ``unknown`` where it would
    have decided. The baselines are re-read every ~100 ms, not on every wake. A sampler that
    is stopped (SIGSTOP, ptrace) is neither runnable nor stolen from: it reads
    ``vcpu-blocked``.

Talking to the parent (``agent.samplers``)
    JSON Lines on stdout, one object per line with a type ``t``:
    ``status`` once after set-up (pid, cpu, mode, whether SCHED_FIFO was granted, ``notes``
    naming each degraded capability), ``samples`` about once a second (``n``: expirations
    consumed so far; ``mono_ns``/``real_ns``: a sign of life), ``stall`` per gap
    (``mono_ns``/``real_ns`` at the gap's start, ``duration_ns``, ``cause``, ``run_delay_ns``,
    ``steal_ns``, ``expirations``), ``note`` when a counter fails later, and ``error`` before
    exiting when set-up fails. Stall and note lines wait for the next ``samples`` line and
    go out with it in one write (or earlier when ``MAX_PENDING`` pile up): each line that
    wakes the parent costs it about 0.1 ms of CPU here. A stall brings that line forward to
    ``probe.worker.FLUSH_AFTER_NS`` (250 ms) after it, so no event waits longer.
    The sampler exits when its stdout is closed (at its next write).

Footprint
    Each sampler is an interpreter started with ``-I -S`` (or forked from one, see
    ``agent.workers``). Its imports are kept to
    ``os``, ``sys``, ``time``, ``gc``, ``ctypes`` (for the timerfd) and two small modules of
    this package; no argparse, json or typing (each would add 1 to 2 MB per sampler). The hot
    loop allocates nothing: ``os.readv`` fills a preallocated buffer that is compared with a
    constant, and the countdown stays within Python's cached small integers.

Cost (measured with schedstat run time on a 2-vCPU KVM guest, 1 ms interval)
    About 45 us of CPU per wake-up, so about 45 ms/s per sampler; a C loop on the same
    timerfd costs about 39 us per wake-up here, nearly all of it the vCPU's halt and wake-up.
    Reading the clock and running the full loop body on every wake costs about 18 % more;
    SCHED_FIFO about 4 % more than SCHED_OTHER. PSS about 4.5 MB per sampler next to the
    agent (9 MB RSS).

Usage::

    python -m probe.stall --cpu 1 --interval-ns 1000000 --threshold-ns 2000000 --mode tick
"""

from __future__ import annotations

import gc
import os
import sys
import time

from probe.errors import ParseError
from probe.procfs import TICK_NS, parse_schedstat, parse_steal
from probe.worker import (
    FLUSH_AFTER_NS,
    Lines,
    WorkerUsageError,
    error_line,
    int_list_option,
    int_option,
    json_str,
    parse_options,
    run_worker,
    settle,
)
from probe.worker import json_int as _json_int
from probe.worker import write_stdout as _write_stdout

#: ``typing.TYPE_CHECKING`` without importing ``typing`` (see Footprint above).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from probe.canary_heartbeat import Side

#: Cause hints (``probe.events.STALL_CAUSES`` plus ``unknown`` for a missing counter).
GUEST_SCHED = "guest-sched"
HOST_PREEMPT = "host-preempt"
VCPU_BLOCKED = "vcpu-blocked"
UNKNOWN = "unknown"

#: How often the cause-hint baselines are re-read, and how often a ``samples`` line is sent.
HOUSEKEEPING_NS = 100_000_000
HEARTBEAT_NS = 1_000_000_000
#: Stall lines wait for the next heartbeat (one write, one wake-up of the parent, per
#: second) unless this many are pending.
MAX_PENDING = 32
#: SCHED_FIFO priority of a tick-mode sampler (the lowest: above every SCHED_OTHER task).
FIFO_PRIORITY = 1

USAGE = (
    "usage: python -m probe.stall --cpu N [--interval-ns NS] [--threshold-ns NS]"
    " [--mode tick|spin] [--fifo|--no-fifo] [--procfs ROOT]"
    " [--board-fd FD --slots N --slot N --peers SLOT:CPU,... --beat-ns NS --timeouts-ns LIST]"
)

#: The options that take a value (the heartbeat's from ``--board-fd`` on).
_VALUED = (
    "--cpu", "--interval-ns", "--threshold-ns", "--mode", "--procfs",
    "--board-fd", "--slots", "--slot", "--peers", "--beat-ns", "--timeouts-ns",
)  # fmt: skip

#: The sampler's command line is wrong (``probe.worker``'s usage error).
UsageError = WorkerUsageError


class Options:
    """The sampler's settings (see ``parse_args``); ``board_fd`` -1: no heartbeat."""

    __slots__ = (
        "beat_ns",
        "board_fd",
        "cpu",
        "fifo",
        "interval_ns",
        "ladder",
        "mode",
        "peers",
        "procfs",
        "slot",
        "slots",
        "threshold_ns",
    )

    def __init__(
        self,
        cpu: int,
        interval_ns: int = 1_000_000,
        threshold_ns: int = 2_000_000,
        mode: str = "tick",
        fifo: bool = True,
        procfs: str = "/proc",
    ) -> None:
        self.cpu = cpu
        self.interval_ns = interval_ns
        self.threshold_ns = threshold_ns
        self.mode = mode
        self.fifo = fifo
        self.procfs = procfs
        self.board_fd = -1
        self.slots = self.slot = 0
        self.peers: list[tuple[int, int]] = []
        self.beat_ns = 5_000_000
        self.ladder: list[int] = []


def parse_args(argv: list[str]) -> Options:
    """Parse the sampler's command line (``probe.worker``'s parser: no argparse, to keep the
    process small).

    :param argv: the arguments, without the program name; ``--name value`` or ``--name=value``.
    :raise UsageError: on an unknown option, a missing or invalid value, or no ``--cpu``.
    :return: the options (with ``--board-fd``, the heartbeat's too).
    """
    values = parse_options(
        argv,
        _VALUED,
        ("--fifo", "--no-fifo"),
    )
    opts = Options(int_option(values, "--cpu"), fifo="--no-fifo" not in values)
    opts.interval_ns = int_option(values, "--interval-ns", opts.interval_ns)
    opts.threshold_ns = int_option(values, "--threshold-ns", opts.threshold_ns)
    opts.mode = values.get("--mode", opts.mode)
    opts.procfs = values.get("--procfs", opts.procfs)
    if opts.cpu < 0:
        raise UsageError("--cpu must not be negative")
    if opts.interval_ns <= 0 or opts.threshold_ns <= 0:
        raise UsageError("--interval-ns and --threshold-ns must be positive")
    if opts.mode not in ("tick", "spin"):
        raise UsageError(f"--mode must be tick or spin, got {opts.mode!r}")
    if "--board-fd" in values:
        opts.board_fd = int_option(values, "--board-fd")
        opts.slots = int_option(values, "--slots")
        opts.slot = int_option(values, "--slot")
        opts.beat_ns = int_option(values, "--beat-ns", opts.beat_ns)
        opts.ladder = int_list_option(values, "--timeouts-ns", (10_000_000,))
        opts.peers = _peers(values.get("--peers", ""), opts.slots)
        if opts.board_fd < 0 or not 0 <= opts.slot < opts.slots or opts.beat_ns <= 0:
            raise UsageError("bad --board-fd, --slot or --beat-ns")
    return opts


def _peers(text: str, slots: int) -> list[tuple[int, int]]:
    """``SLOT:CPU,...`` -> [(slot, cpu)]; each slot within the board."""
    out = []
    for item in filter(None, text.split(",")):
        slot, _, cpu = item.partition(":")
        try:
            peer = (int(slot), int(cpu))
        except ValueError:
            raise UsageError(f"--peers: not SLOT:CPU: {item!r}") from None
        if not 0 <= peer[0] < slots or peer[1] < 0:
            raise UsageError(f"--peers: {item!r} outside the board")
        out.append(peer)
    return out


def classify(
    gap_ns: int,
    run_delay_ns: int | None,
    steal_ns: int | None,
    steal_resolution_ns: int = TICK_NS,
) -> str:
    """Name the likely cause of a gap from what two counters did over it.

    Pure: the decision only, on the deltas the sampler measured.

    :param gap_ns: the gap's length.
    :param run_delay_ns: growth of the sampler thread's run_delay over the gap, or None when
        schedstat could not be read.
    :param steal_ns: growth of the CPU's steal time over the gap, or None when /proc/stat
        could not be read.
    :param steal_resolution_ns: the unit steal is counted in (a USER_HZ tick); steal
        that is non-zero and within one unit of half the gap counts as "about the gap".
    :return: ``guest-sched`` when run_delay grew by at least half the gap; else
        ``host-preempt`` when steal did (allowing one unit of rounding); else
        ``vcpu-blocked``; ``unknown`` when the missing counter could have decided.
    """
    if run_delay_ns is not None and 2 * run_delay_ns >= gap_ns:
        return GUEST_SCHED
    if steal_ns is not None and steal_ns > 0 and 2 * (steal_ns + steal_resolution_ns) >= gap_ns:
        return HOST_PREEMPT
    if run_delay_ns is None or steal_ns is None:
        return UNKNOWN
    return VCPU_BLOCKED


class Counters:
    """The two cause-hint counters, read through descriptors kept open (``pread`` at 0).

    A counter that cannot be opened, read or parsed is None from then on, and its failure is
    kept in ``notes`` (one line each).

    :param procfs: the proc root (``/proc``, or a fixture tree in tests).
    :param cpu: the CPU whose steal is read.
    :param tid: the sampler thread's id (the process id: the sampler has one thread).
    """

    def __init__(self, procfs: str, cpu: int, tid: int) -> None:
        self.cpu = cpu
        self.notes: list[str] = []
        self._sched_path = os.path.join(procfs, "self", "task", str(tid), "schedstat")
        self._stat_path = os.path.join(procfs, "stat")
        self._sched_fd = self._open(self._sched_path, "no guest-sched hint")
        self._stat_fd = self._open(self._stat_path, "no host-preempt hint")
        # /proc/stat: the cpuN lines come first, about 100 bytes each; a read that fills
        # the buffer is repeated with a larger one, so a line is never cut.
        self._stat_size = 4096 + 128 * (cpu + 1)

    def _open(self, path: str, consequence: str) -> int | None:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            self.notes.append(f"cannot open {path} ({err.strerror}): {consequence}")
            return None

    def run_delay(self) -> int | None:
        """The sampler thread's run_delay (ns) now, or None when unavailable."""
        fd = self._sched_fd
        if fd is None:
            return None
        try:
            return parse_schedstat(os.pread(fd, 256, 0).decode("ascii", "replace")).run_delay_ns
        except (OSError, ParseError) as err:
            self._sched_fd = None
            os.close(fd)
            self.notes.append(f"cannot read {self._sched_path} ({err}): no guest-sched hint")
            return None

    def steal(self) -> int | None:
        """This CPU's steal time (ns) now, or None when unavailable."""
        fd = self._stat_fd
        if fd is None:
            return None
        try:
            data = os.pread(fd, self._stat_size, 0)
            while len(data) >= self._stat_size:  # maybe cut short: read it all
                self._stat_size *= 2
                data = os.pread(fd, self._stat_size, 0)
            return parse_steal(data.decode("ascii", "replace"), self.cpu)
        except (OSError, ParseError) as err:
            self._stat_fd = None
            os.close(fd)
            self.notes.append(f"cannot read {self._stat_path} ({err}): no host-preempt hint")
            return None


def _delta(now: int | None, then: int | None) -> int | None:
    return None if now is None or then is None else now - then


class Sampler(Lines):
    """One sampler's state and its two loops. ``write`` sends one line to the parent.

    :param opts: the settings.
    :param counters: the cause-hint counters.
    :param write: called with each complete line (newline included).
    """

    def __init__(self, opts: Options, counters: Counters, write: Callable[[str], object]) -> None:
        super().__init__(write)
        self.opts = opts
        self.counters = counters
        self._notes_sent = len(counters.notes)
        self._run_delay0 = counters.run_delay()
        self._steal0 = counters.steal()
        #: The heartbeat canary's member on this CPU (``join_heartbeat``), or None.
        self.side: Side | None = None

    def join_heartbeat(self) -> None:
        """Become this CPU's heartbeat member (``probe.canary_heartbeat``) on the board the
        options name; its lines go out with this sampler's.

        :raise OSError: when the board cannot be mapped.
        """
        from probe.canary import Reporter
        from probe.canary_heartbeat import Board, Side

        opts = self.opts
        reporter = Reporter(self.pending.append, opts.cpu)
        self.side = Side(
            Board(opts.board_fd, opts.slots), opts.slot, opts.peers, opts.ladder, reporter
        )

    def stall(self, start_mono: int, now_mono: int, expirations: int) -> None:
        """Report one gap from ``start_mono`` to ``now_mono`` and refresh the baselines.

        :param start_mono: CLOCK_MONOTONIC at the gap's start (the previous wake).
        :param now_mono: CLOCK_MONOTONIC at its end (this wake).
        :param expirations: grid points the gap covered (1 in spin mode).
        """
        gap = now_mono - start_mono
        real_start = time.time_ns() - gap
        run_delay = self.counters.run_delay()
        steal = self.counters.steal()
        d_run_delay = _delta(run_delay, self._run_delay0)
        d_steal = _delta(steal, self._steal0)
        self._run_delay0, self._steal0 = run_delay, steal
        self.pending.append(
            f'{{"t":"stall","mono_ns":{start_mono},"real_ns":{real_start},'
            f'"duration_ns":{gap},"cause":"{classify(gap, d_run_delay, d_steal)}",'
            f'"run_delay_ns":{_json_int(d_run_delay)},"steal_ns":{_json_int(d_steal)},'
            f'"expirations":{expirations},"mode":"{self.opts.mode}"}}\n'
        )
        self._send_notes()
        if len(self.pending) >= MAX_PENDING:
            self.flush()

    def refresh(self) -> None:
        """Re-read the cause-hint baselines (every ~100 ms)."""
        self._run_delay0 = self.counters.run_delay()
        self._steal0 = self.counters.steal()
        self._send_notes()

    def heartbeat(self, samples: int, now_mono: int) -> None:
        """Send the pending lines, then the samples count and a sign of life, in one write.

        :param samples: iterations (tick: timer expirations) so far.
        :param now_mono: CLOCK_MONOTONIC now.
        """
        if self.side is not None:
            self.side.reporter.life(now_mono)  # the heartbeat canary's sign of life
        self.pending.append(
            f'{{"t":"samples","n":{samples},"mono_ns":{now_mono},"real_ns":{time.time_ns()}}}\n'
        )
        self.flush()

    def _send_notes(self) -> None:
        notes = self.counters.notes
        while self._notes_sent < len(notes):
            self.pending.append(f'{{"t":"note","msg":{json_str(notes[self._notes_sent])}}}\n')
            self._notes_sent += 1

    def run_tick(self) -> None:
        """Sample on a periodic timerfd until the process is killed. Never returns."""
        from probe.timerfd import periodic_timer

        fd, first = periodic_timer(self.opts.interval_ns)
        settle()
        gc.disable()
        self.tick_loop(fd, first, os.readv, time.monotonic_ns)

    def tick_loop(
        self,
        fd: int,
        first: int,
        readv: Callable[[int, list[bytearray]], int],
        mono: Callable[[], int],
    ) -> None:
        """The tick mode's loop on timerfd ``fd`` whose grid starts at ``first``.

        Housekeeping (re-reading the cause-hint baselines) comes every ``per_house`` wakes;
        the heartbeat by time: at the first wake that reads the clock a second after the
        last one. A CPU that wakes less often than the grid (each wake then reads a count
        above 1 and takes the slow path, as under TCG, where 400 to 900 wakes a second
        were seen) still reports once a second, not once per 1000 wakes. Returns only when
        ``readv`` raises (tests script it).
        """
        interval = self.opts.interval_ns
        threshold = self.opts.threshold_ns
        per_house = max(1, min(200, HOUSEKEEPING_NS // interval))
        side = self.side
        # Wakes that read the clock on time: every housekeeping, or every heartbeat beat.
        per_slow = per_house
        if side is not None:
            per_slow = max(1, min(per_house, self.opts.beat_ns // interval))
        slow_per_house = max(1, per_house // per_slow)
        buf = bytearray(8)
        bufs = [buf]
        order = sys.byteorder
        # An on-time wake reads as ONE. Below 2 intervals an on-time wake can hide a gap,
        # so then no wake takes the fast path (b"" never equals the 8-byte buffer).
        one = (1).to_bytes(8, order) if threshold >= 2 * interval else b""
        done = 0  # expirations consumed up to the last wake that read the clock
        left = since = per_slow  # countdown of wakes to the next slow one on time
        house = slow_per_house  # countdown of those to the next housekeeping
        beat_due = first - interval + HEARTBEAT_NS
        last_now = first - interval  # a virtual previous wake, on the grid
        while True:
            readv(fd, bufs)
            left -= 1
            if left and buf == one:
                continue
            # Slow path: late, or time for housekeeping. Every wake since the last slow one
            # consumed exactly one expiration.
            now = mono()
            before = done + since - left - 1
            n = int.from_bytes(buf, order)
            done = before + n
            prev = first + (before - 1) * interval  # grid point of the previous wake
            if prev < last_now:
                prev = last_now  # the previous wake read the clock: its time is exact
            if side is not None:
                side.beat(now)  # every wake that reads the clock: at once after a stall
                if side.reporter.next_life < beat_due:
                    beat_due = side.reporter.next_life  # a heartbeat timeout is waiting
            if now - prev > threshold:
                self.stall(prev, now, n)
                if now + FLUSH_AFTER_NS < beat_due:
                    beat_due = now + FLUSH_AFTER_NS
            if not left:
                left = per_slow
                house -= 1
                if not house:
                    house = slow_per_house
                    self.refresh()
            if now >= beat_due:
                beat_due = now + HEARTBEAT_NS
                self.heartbeat(done, now)
            since = left
            last_now = now

    def run_spin(self) -> None:
        """Busy-loop on CLOCK_MONOTONIC until the process is killed. Never returns."""
        threshold = self.opts.threshold_ns
        mono = time.monotonic_ns
        count = 0
        total = 0
        beats = beats_per = max(1, HEARTBEAT_NS // HOUSEKEEPING_NS)
        prev = mono()
        house_at = prev + HOUSEKEEPING_NS
        side = self.side
        beat_ns = self.opts.beat_ns
        beat_at = prev if side is not None else 1 << 62
        while True:
            now = mono()
            count += 1
            if now >= beat_at and side is not None:
                side.beat(now)
                beat_at = now + beat_ns
            if now - prev > threshold:
                self.stall(prev, now, 1)
                beats = min(beats, 1 + FLUSH_AFTER_NS // HOUSEKEEPING_NS)
                now = mono()
            elif now >= house_at:
                house_at = now + HOUSEKEEPING_NS
                total += count
                count = 0
                self.refresh()
                beats -= 1
                if not beats:
                    beats = beats_per
                    self.heartbeat(total, now)
                now = mono()
            prev = now


def _setup(opts: Options) -> tuple[bool, list[str]]:
    """Pin to the CPU and, in tick mode, ask for SCHED_FIFO.

    :raise OSError: when the CPU cannot be used (offline, outside the allowed set).
    :return: whether SCHED_FIFO was granted, and a note per degraded capability.
    """
    os.sched_setaffinity(0, {opts.cpu})
    notes: list[str] = []
    fifo = False
    if opts.mode == "tick" and opts.fifo:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY))
            fifo = True
        except OSError as err:
            notes.append(f"SCHED_FIFO not permitted ({err.strerror}); sampling at SCHED_OTHER")
    return fifo, notes


def _sample(opts: Options) -> int:
    try:
        fifo, notes = _setup(opts)
    except OSError as err:
        _write_stdout(error_line(f"cannot run on cpu {opts.cpu}: {err.strerror}"))
        return 1
    pid = os.getpid()
    counters = Counters(opts.procfs, opts.cpu, pid)
    all_notes = notes + counters.notes
    sampler = Sampler(opts, counters, _write_stdout)
    if opts.board_fd >= 0:
        try:
            sampler.join_heartbeat()
        except (OSError, ValueError) as err:
            all_notes.append(f"cannot map the heartbeat board ({err}): no heartbeat canary")
    _write_stdout(
        f'{{"t":"status","pid":{pid},"cpu":{opts.cpu},"mode":"{opts.mode}",'
        f'"interval_ns":{opts.interval_ns},"threshold_ns":{opts.threshold_ns},'
        f'"fifo":{"true" if fifo else "false"},'
        f'"heartbeat":{"true" if sampler.side is not None else "false"},'
        f'"mono_ns":{time.monotonic_ns()},'
        f'"real_ns":{time.time_ns()},"notes":[{",".join(json_str(n) for n in all_notes)}]}}\n'
    )
    if opts.mode == "spin":
        sampler.run_spin()
    else:
        sampler.run_tick()
    return 0  # pragma: no cover - the loops never return


def main(argv: list[str] | None = None) -> int:
    """Run a sampler: set up, send the status line, sample until killed.

    :param argv: the arguments (default ``sys.argv[1:]``).
    :return: the exit status: 2 on a usage error, 1 when set-up fails (an ``error`` line
        says why), 0 when the parent went away.
    """
    args = sys.argv[1:] if argv is None else argv
    return run_worker("probe.stall", USAGE, lambda: parse_args(args), _sample)


if __name__ == "__main__":
    sys.exit(main())
