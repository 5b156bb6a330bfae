"""The clock probe: steps of the guest's wall clock, its clocksource, its sync state, the host.

What applications feel as "the clock jumped" is a change of CLOCK_REALTIME (or
CLOCK_BOOTTIME) *relative to* CLOCK_MONOTONIC. The kernel keeps ``REALTIME - MONOTONIC``
(and ``BOOTTIME - MONOTONIC``) constant while it runs: NTP slewing changes the rate of both
clocks alike. The difference moves only when something sets the clock (``clock_settime``,
``settimeofday``, ``adjtimex(ADJ_SETOFFSET)``, a leap second) or, for BOOTTIME, when the
guest is suspended. So every period (10 ms by default) the probe reads both clocks as a
bracketed pair (``probe.base.read_pair``: MONOTONIC, other, MONOTONIC; pairs with a long
bracket are dropped, since a preemption inside the bracket would look like a step) and
compares the offset with the previous one (``StepDetector``, pure, tested on literal
pairs). A change above the threshold (1 ms) is a ``clock_step`` event::

    clock         "realtime" or "boottime"
    step_ns       signed size of the step (positive: the clock jumped forward)
    bracket_ns    bound on step_ns's error (half of each pair's bracket, summed)
    since_mono_ns MONOTONIC of the previous good pair: the step happened in between
    clocksource   the clocksource at the time
    (mono_ns and real_ns of the event are those of the detecting pair; no duration)

A timerfd on CLOCK_REALTIME armed with ``TFD_TIMER_CANCEL_ON_SET`` wakes the probe as soon
as the clock is set, so a step is seen (and stamped) within microseconds rather than at the
next period, and two opposite steps inside one period are not lost. With it the period only
bounds how late a BOOTTIME step (a suspend) and a set the timerfd missed are seen, so the
agent's default is 100 ms; without it (an old kernel, seccomp) the probe compares every
``fallback_period_ns`` (10 ms) at the longest, finds every step that outlives that, and
says so in its health detail.

About once a second (``slow_period_ns``) the probe also

* reads ``devices/system/clocksource/clocksource0/current_clocksource`` under the sys root:
  a change is a ``clocksource_change`` event (``from``, ``to``, ``regime``, ``available``);
  ``clock_regime`` tells which behaviour over a QEMU stop the name implies;
* calls adjtimex(2) read-only (``probe.adjtimex``): when ``synchronised`` flips, the clock
  state changes, or the PLL offset moves by more than the step threshold, it emits a
  ``clock_sync`` event carrying the new state's fields plus ``changed`` (what changed) and
  ``previous_synchronised`` / ``previous_offset_ns``;
* reads the KVM virtual PTP device where there is one (``probe.ptp``) and keeps the latest
  guest-minus-host realtime offset for ``host_offset_ns()``.

Health has three entries: ``clock`` (the sampler thread), ``adjtimex`` and ``ptp`` (up only
while a KVM virtual PTP device answers). ``health()`` never raises.

Cost, measured on a 2-vCPU Debian 12 VM (clocksource tsc) at the default 10 ms period, from
the sampler thread's ``/proc/self/task/TID/schedstat`` runtime over 3 runs of 20 s: 15.7 to
16.6 ms of CPU per second (1.6 % of one CPU), about 160 us per period. Reading the clocks is
only ~3.6 us of that; the rest is the price of waking up 100 times a second on that VM (a C
loop sleeping 10 ms costs 46 us per wake-up there, and Python's return from a blocking call
roughly doubles it). With the timerfd active, sets are seen at once whatever the period, so
a longer period (100 ms: ~2 ms/s, measured) only delays BOOTTIME steps and the detection of
a set the timerfd missed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from probe import timerfd
from probe.adjtimex import AdjtimexState, read_adjtimex
from probe.base import Emit, Health, now_pair, read_pair
from probe.errors import ParseError, ProbeError
from probe.events import RawEvent
from probe.ptp import PtpOffset, PtpReader
from probe.roots import DEFAULT_ROOTS, Roots

log = logging.getLogger(__name__)

REALTIME = "realtime"
BOOTTIME = "boottime"

#: Pairs whose MONOTONIC bracket is longer than this are not compared (DESIGN: ~50 us).
MAX_BRACKET_NS = 50_000

_CLOCKSOURCE_DIR = ("devices", "system", "clocksource", "clocksource0")

# ---------------------------------------------------------------------------------------
# Step detection (pure)


@dataclass(frozen=True)
class ClockStep:
    """A change of ``other - MONOTONIC`` above the threshold between two good pairs.

    :param clock: ``realtime`` or ``boottime``.
    :param step_ns: the signed change of the offset (positive: the clock jumped forward).
    :param bracket_ns: the bound on ``step_ns``'s error.
    :param mono_ns: MONOTONIC of the pair that showed the step.
    :param other_ns: the other clock's reading in that pair.
    :param since_mono_ns: MONOTONIC of the previous good pair.
    """

    clock: str
    step_ns: int
    bracket_ns: int
    mono_ns: int
    other_ns: int
    since_mono_ns: int


class StepDetector:
    """Compares successive ``(MONOTONIC, other)`` pairs of one clock and reports steps.

    Pure: it reads no clock, so it is fed literal pairs in tests. Pairs whose bracket is
    longer than ``max_bracket_ns`` are ignored (counted in ``rejected``), and the next good
    pair is compared with the last good one. Each pair is compared with the one before it,
    so a slow drift of the offset never adds up to a step.
    """

    def __init__(
        self,
        clock: str,
        threshold_ns: int = 1_000_000,
        max_bracket_ns: int = MAX_BRACKET_NS,
    ) -> None:
        """Set up a detector with no reference pair yet.

        :param clock: the name reported in steps (``realtime`` or ``boottime``).
        :param threshold_ns: a change of the offset larger than this (absolute) is a step.
        :param max_bracket_ns: pairs with a longer bracket are ignored.
        :raise ValueError: when the threshold is not positive.
        """
        if threshold_ns <= 0:
            raise ValueError(f"threshold_ns must be positive, got {threshold_ns}")
        self.clock = clock
        self.threshold_ns = threshold_ns
        self.max_bracket_ns = max_bracket_ns
        self.rejected = 0
        self.accepted = 0
        self._offset: int | None = None
        self._mono = 0
        self._half_bracket = 0

    @property
    def offset_ns(self) -> int | None:
        """``other - MONOTONIC`` of the last good pair, or None before the first."""
        return self._offset

    def feed(self, mono_ns: int, other_ns: int, bracket_ns: int = 0) -> ClockStep | None:
        """Take one pair; report a step when the offset moved by more than the threshold.

        :param mono_ns: MONOTONIC (the midpoint of the bracket).
        :param other_ns: the other clock read inside the bracket.
        :param bracket_ns: the bracket's length (0 for exact literal pairs).
        :return: the step, or None.
        """
        if bracket_ns > self.max_bracket_ns:
            self.rejected += 1
            return None
        self.accepted += 1
        offset = other_ns - mono_ns
        half = (bracket_ns + 1) // 2
        previous, since, prev_half = self._offset, self._mono, self._half_bracket
        self._offset, self._mono, self._half_bracket = offset, mono_ns, half
        if previous is None:
            return None
        change = offset - previous
        if abs(change) <= self.threshold_ns:
            return None
        return ClockStep(self.clock, change, prev_half + half, mono_ns, other_ns, since)


def detect_steps(
    clock: str,
    pairs: Iterable[tuple[int, int] | tuple[int, int, int]],
    threshold_ns: int = 1_000_000,
    max_bracket_ns: int = MAX_BRACKET_NS,
) -> list[ClockStep]:
    """Run a fresh ``StepDetector`` over a sequence of pairs.

    :param clock: the name reported in steps.
    :param pairs: ``(mono_ns, other_ns)`` or ``(mono_ns, other_ns, bracket_ns)``.
    :param threshold_ns: see ``StepDetector``.
    :param max_bracket_ns: see ``StepDetector``.
    :return: the steps, in order.
    """
    detector = StepDetector(clock, threshold_ns, max_bracket_ns)
    steps = []
    for pair in pairs:
        step = detector.feed(*pair)
        if step is not None:
            steps.append(step)
    return steps


# ---------------------------------------------------------------------------------------
# Clocksource (pure parsers, regimes)

#: One line per regime: what a QEMU stop (or migration downtime) does to the guest's clocks.
REGIMES: Mapping[str, str] = {
    "kvm-clock": (
        "QEMU saves kvm-clock at a stop and restores it on resume, so guest MONOTONIC, "
        "BOOTTIME and REALTIME do not advance over a stop: it shows as realtime falling "
        "behind the host's, not as a gap"
    ),
    "tsc": (
        "the guest reads the TSC itself; whether it advances over a stop is the "
        "hypervisor's choice (a KVM pause lets it run, so the stop shows as a gap; a "
        "migration restores the saved TSC), so check the offset against the host"
    ),
    "emulated": (
        "an emulated timer (hpet, acpi_pm), slow to read and common under TCG; it follows "
        "QEMU's virtual clock, which stops while the VM is stopped, so a stop is hidden"
    ),
    "hyperv": (
        "Hyper-V's reference TSC page; how it behaves over a stop is the hypervisor's choice"
    ),
    "xen": "Xen's paravirtual clock; how it behaves over a stop is the hypervisor's choice",
    "tick": (
        "jiffies, the tick-based last resort: 1 to 10 ms resolution, so shorter steps and "
        "gaps are invisible"
    ),
    "other": "an unknown clocksource: how the guest's clocks behave over a stop is not known",
}

_REGIME_OF = {
    "kvm-clock": "kvm-clock",
    "tsc": "tsc",
    "tsc-early": "tsc",
    "hpet": "emulated",
    "acpi_pm": "emulated",
    "hyperv_clocksource_tsc_page": "hyperv",
    "hyperv_clocksource_msr": "hyperv",
    "xen": "xen",
    "jiffies": "tick",
    "refined-jiffies": "tick",
}


def clock_regime(name: str | None) -> str:
    """Which clock regime a clocksource implies (a key of ``REGIMES``).

    :param name: a clocksource name such as ``kvm-clock`` or ``tsc``; None when unknown.
    :return: ``kvm-clock``, ``tsc``, ``emulated``, ``hyperv``, ``xen``, ``tick`` or ``other``.
    """
    if name is None:
        return "other"
    return _REGIME_OF.get(name, "other")


def explain_clocksource(name: str | None) -> str:
    """One line saying what the clocksource means over a QEMU stop.

    :param name: a clocksource name, or None.
    :return: e.g. ``"kvm-clock (kvm-clock regime): QEMU saves ..."``.
    """
    regime = clock_regime(name)
    return f"{name or 'unknown'} ({regime} regime): {REGIMES[regime]}"


def parse_clocksource(text: str) -> str:
    """Parse ``current_clocksource``.

    :param text: the file's content, e.g. ``"tsc\\n"``.
    :raise ParseError: when it is empty or holds more than one word.
    :return: the clocksource's name.
    """
    words = text.split()
    if len(words) != 1:
        raise ParseError(f"current_clocksource should hold one name, got {text.strip()!r}")
    return words[0]


def parse_available_clocksources(text: str) -> tuple[str, ...]:
    """Parse ``available_clocksource`` (names separated by spaces).

    :param text: the file's content, e.g. ``"tsc kvm-clock \\n"``.
    :return: the names, in the kernel's order (possibly empty).
    """
    return tuple(text.split())


def read_clocksource(roots: Roots = DEFAULT_ROOTS) -> str:
    """Read the current clocksource.

    :param roots: where sysfs is.
    :raise OSError: when the file cannot be read.
    :raise ParseError: when it does not hold one name.
    :return: its name, e.g. ``kvm-clock``.
    """
    return parse_clocksource(
        roots.read_text(roots.sys_path(*_CLOCKSOURCE_DIR, "current_clocksource"))
    )


def read_available_clocksources(roots: Roots = DEFAULT_ROOTS) -> tuple[str, ...]:
    """Read the clocksources the kernel could switch to.

    :param roots: where sysfs is.
    :raise OSError: when the file cannot be read.
    :return: their names.
    """
    path = roots.sys_path(*_CLOCKSOURCE_DIR, "available_clocksource")
    return parse_available_clocksources(roots.read_text(path))


# ---------------------------------------------------------------------------------------
# timerfd with TFD_TIMER_CANCEL_ON_SET

_HUNDRED_YEARS_S = 100 * 365 * 86400


class RealtimeSetWatch:
    """A timerfd that becomes readable whenever CLOCK_REALTIME is set.

    The timer is armed at an absolute realtime a century away with
    ``TFD_TIMER_CANCEL_ON_SET``; the kernel then wakes readers on every discontinuous change
    of the clock (a set, a leap second, a resume) and ``read`` fails with ECANCELED.
    """

    def __init__(self) -> None:
        """Create and arm the timer.

        :raise OSError: when libc or the kernel does not offer it.
        """
        try:
            fd = timerfd.timerfd_create(
                time.CLOCK_REALTIME, timerfd.TFD_NONBLOCK | timerfd.TFD_CLOEXEC
            )
        except AttributeError as err:
            raise OSError(errno.ENOSYS, f"no timerfd in libc: {err}") from err
        self.fd: int = fd
        try:
            self._arm()
        except OSError:
            os.close(fd)
            raise

    def _arm(self) -> None:
        century = (time.time_ns() // 1_000_000_000 + _HUNDRED_YEARS_S) * 1_000_000_000
        timerfd.timerfd_settime(self.fd, century, 0, absolute=True, cancel_on_set=True)

    def consume(self) -> bool:
        """Drain the descriptor after it polled readable.

        :raise OSError: when reading or re-arming fails unexpectedly.
        :return: True when the clock was set since the last call.
        """
        try:
            os.read(self.fd, 8)
        except OSError as err:
            if err.errno == errno.ECANCELED:
                return True
            if err.errno == errno.EAGAIN:
                return False
            raise
        self._arm()  # the century expired (someone set the clock far ahead): re-arm
        return True

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self.fd)


# ---------------------------------------------------------------------------------------
# The probe

_NOT_STARTED = Health(False, "not started")
_DISABLED = Health(False, "disabled")


class ClockProbe:
    """Clock steps, clocksource changes, NTP sync changes and the host offset (ptp_kvm).

    Implements ``probe.base.Probe`` with ``name = "clock"``; see the module docstring for
    the events it emits.
    """

    name = "clock"

    def __init__(
        self,
        period_ns: int = 10_000_000,
        step_threshold_ns: int = 1_000_000,
        roots: Roots = DEFAULT_ROOTS,
        ptp: bool = True,
        adjtimex: bool = True,
        *,
        slow_period_ns: int = 1_000_000_000,
        max_bracket_ns: int = MAX_BRACKET_NS,
        timerfd: bool = True,
        fallback_period_ns: int = 10_000_000,
    ) -> None:
        """Configure the probe; nothing runs before ``start``.

        :param period_ns: how often clock pairs are read.
        :param step_threshold_ns: an offset change above this is a ``clock_step``; also the
            PLL offset jump that makes a ``clock_sync`` event.
        :param roots: where sysfs and /dev are.
        :param ptp: read the KVM virtual PTP device where there is one.
        :param adjtimex: watch the kernel's NTP state.
        :param slow_period_ns: how often clocksource, adjtimex and ptp are read (about 1 s).
        :param max_bracket_ns: clock pairs with a longer bracket are dropped.
        :param timerfd: wake on realtime sets with a TFD_TIMER_CANCEL_ON_SET timerfd.
        :param fallback_period_ns: the longest period without that timerfd.
        :raise ValueError: when a period or the threshold is not positive.
        """
        if period_ns <= 0 or slow_period_ns <= 0 or fallback_period_ns <= 0:
            raise ValueError("periods must be positive")
        if step_threshold_ns <= 0:
            raise ValueError(f"step_threshold_ns must be positive, got {step_threshold_ns}")
        self.period_ns = period_ns
        self.step_threshold_ns = step_threshold_ns
        self.roots = roots
        self.slow_period_ns = slow_period_ns
        self.fallback_period_ns = fallback_period_ns
        self.max_bracket_ns = max_bracket_ns
        self._use_ptp = ptp
        self._use_adjtimex = adjtimex
        self._use_timerfd = timerfd
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._emit: Emit | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self._reset_state()

    def _reset_state(self) -> None:
        self._clock_health = _NOT_STARTED
        self._adjtimex_health = _DISABLED if not self._use_adjtimex else _NOT_STARTED
        self._ptp_health = _DISABLED if not self._use_ptp else _NOT_STARTED
        self._notes: dict[str, str] = {}
        self._clocksource: str | None = None
        self._last_known_source: str | None = None
        self._available: tuple[str, ...] = ()
        self._sync: AdjtimexState | None = None
        self._ptp_reader: PtpReader | None = None
        self._ptp_offset: PtpOffset | None = None
        self._watch: RealtimeSetWatch | None = None
        self._tid: int | None = None
        self._samples = 0
        self._detectors = {
            REALTIME: StepDetector(REALTIME, self.step_threshold_ns, self.max_bracket_ns),
            BOOTTIME: StepDetector(BOOTTIME, self.step_threshold_ns, self.max_bracket_ns),
        }

    # -- public interface ---------------------------------------------------------------

    def start(self, emit: Emit) -> None:
        """Read the slow sources once, then sample on a daemon thread; returns at once.

        :param emit: receives every event, from the probe's thread.
        :raise RuntimeError: when the probe is already running.
        """
        if self._thread is not None:
            raise RuntimeError("clock probe already started")
        self._reset_state()
        self._emit = emit
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._use_timerfd:
            try:
                self._watch = RealtimeSetWatch()
            except OSError as err:
                self._note("timerfd", f"no timerfd cancel-on-set ({err}): steps seen per period")
        else:
            self._note("timerfd", "timerfd off: steps seen per period")
        self._slow_tick()
        self._prime_detectors()
        with self._lock:
            self._clock_health = Health(True, self._detail())
        self._thread = threading.Thread(target=self._run, name="tsprobe-clock", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close the timerfd, the wake pipe and the PTP device."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        thread.join(timeout=5.0)
        if thread.is_alive():
            log.error("clock probe thread did not stop within 5 s")
        self._thread = None
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._ptp_reader is not None:
            self._ptp_reader.close()
            self._ptp_reader = None
        with self._lock:
            self._clock_health = Health(False, "stopped")
            if self._use_ptp:
                self._ptp_health = Health(False, "stopped")
            if self._use_adjtimex:
                self._adjtimex_health = Health(False, "stopped")

    def health(self) -> dict[str, Health]:
        """The state of each source: ``clock``, ``adjtimex``, ``ptp``. Never raises.

        :return: a new dict.
        """
        with self._lock:
            return {
                "clock": self._clock_health,
                "adjtimex": self._adjtimex_health,
                "ptp": self._ptp_health,
            }

    def clocksource(self) -> str | None:
        """The current clocksource as last read (about once a second).

        :return: e.g. ``kvm-clock``, or None when the file could not be read.
        """
        return self._clocksource

    def available_clocksources(self) -> tuple[str, ...]:
        """The clocksources the kernel offers, as last read.

        :return: their names (empty when unknown).
        """
        return self._available

    def host_offset_ns(self) -> int | None:
        """The latest guest-minus-host realtime offset from ptp_kvm.

        :return: nanoseconds, or None while no KVM virtual PTP device answers.
        """
        sample = self._ptp_offset
        return None if sample is None else sample.offset_ns

    def host_offset(self) -> PtpOffset | None:
        """The latest ptp_kvm sample with its error bound and method.

        :return: the sample, or None while no KVM virtual PTP device answers.
        """
        return self._ptp_offset

    def sync_state(self) -> AdjtimexState | None:
        """The latest adjtimex reading.

        :return: the state, or None when adjtimex is off or failed.
        """
        return self._sync

    def samples(self) -> int:
        """How many times the sampler has read its clock pairs since ``start`` (liveness).

        :return: the count.
        """
        return self._samples

    def rejected_pairs(self) -> int:
        """Clock pairs dropped for a bracket longer than ``max_bracket_ns``.

        :return: the count over both clocks since ``start``.
        """
        return sum(d.rejected for d in self._detectors.values())

    def thread_id(self) -> int | None:
        """The kernel thread id of the sampler (for /proc/self/task/TID/schedstat).

        :return: the id, or None before the thread runs.
        """
        return self._tid

    # -- the thread -----------------------------------------------------------------------

    def _note(self, key: str, text: str | None) -> None:
        if text is None:
            self._notes.pop(key, None)
        else:
            self._notes[key] = text

    def _detail(self) -> str:
        return "; ".join(self._notes[key] for key in sorted(self._notes))

    def _send(self, event: RawEvent) -> None:
        assert self._emit is not None
        try:
            self._emit(event)
        except Exception:  # the agent's failure must not kill the sampler
            log.exception("clock probe: emit failed for a %s event", event.kind)

    def _prime_detectors(self) -> None:
        for _ in range(3):
            rt = read_pair(time.CLOCK_REALTIME, self.max_bracket_ns)
            bt = read_pair(time.CLOCK_BOOTTIME, self.max_bracket_ns)
            self._detectors[REALTIME].feed(rt.mono_ns, rt.other_ns, rt.bracket_ns)
            self._detectors[BOOTTIME].feed(bt.mono_ns, bt.other_ns, bt.bracket_ns)
            if all(d.offset_ns is not None for d in self._detectors.values()):
                return

    def _run(self) -> None:
        self._tid = threading.get_native_id()
        try:
            self._loop()
        except Exception as err:
            log.error("clock probe failed: %s", err)
            log.debug("clock probe failure", exc_info=True)
            with self._lock:
                self._clock_health = Health(False, f"sampler failed: {err}")

    def _loop(self) -> None:
        monotonic = time.monotonic_ns
        period = self.period_ns
        if self._watch is None:
            period = min(period, self.fallback_period_ns)
        fds = [self._wake_r]
        if self._watch is not None:
            fds.append(self._watch.fd)
        next_ns = monotonic() + period
        next_slow = monotonic() + self.slow_period_ns
        while not self._stopping:
            timeout = max(0, next_ns - monotonic()) / 1e9
            ready, _, _ = select.select(fds, [], [], timeout)
            if self._stopping:
                break
            if ready and self._watch is not None and self._watch.fd in ready:
                self._watch.consume()
            self._sample()
            now = monotonic()
            if now >= next_ns:
                next_ns += period
                if next_ns <= now:  # overran (a stall): one sample per gap, no catching up
                    next_ns = now + period
            if now >= next_slow:
                self._slow_tick()
                next_slow = now + self.slow_period_ns

    def _sample(self) -> None:
        rt = read_pair(time.CLOCK_REALTIME, self.max_bracket_ns)
        bt = read_pair(time.CLOCK_BOOTTIME, self.max_bracket_ns)
        self._samples += 1
        step = self._detectors[REALTIME].feed(rt.mono_ns, rt.other_ns, rt.bracket_ns)
        if step is not None:
            self._send_step(step, step.other_ns)
        step = self._detectors[BOOTTIME].feed(bt.mono_ns, bt.other_ns, bt.bracket_ns)
        if step is not None:
            self._send_step(step, rt.other_ns + (bt.mono_ns - rt.mono_ns))

    def _send_step(self, step: ClockStep, real_ns: int) -> None:
        fields: dict[str, Any] = {
            "clock": step.clock,
            "step_ns": step.step_ns,
            "bracket_ns": step.bracket_ns,
            "since_mono_ns": step.since_mono_ns,
            "clocksource": self._clocksource,
        }
        self._send(RawEvent("clock_step", step.mono_ns, real_ns, None, fields))

    # -- the once-a-second sources ----------------------------------------------------------

    def _slow_tick(self) -> None:
        self._check_clocksource()
        if self._use_adjtimex:
            self._check_adjtimex()
        if self._use_ptp:
            self._check_ptp()
        with self._lock:
            if self._clock_health.up:
                self._clock_health = Health(True, self._detail())

    def _check_clocksource(self) -> None:
        try:
            current = read_clocksource(self.roots)
        except (OSError, ParseError) as err:
            self._clocksource = None
            self._note("clocksource", f"clocksource unreadable: {err}")
            return
        self._note("clocksource", None)
        try:
            self._available = read_available_clocksources(self.roots)
        except OSError:
            self._available = ()
        self._clocksource = current
        previous, self._last_known_source = self._last_known_source, current
        if previous is not None and previous != current:
            mono, real = now_pair()
            fields = {
                "from": previous,
                "to": current,
                "regime": clock_regime(current),
                "available": list(self._available),
            }
            log.info("clocksource changed from %s to %s", previous, current)
            self._send(RawEvent("clocksource_change", mono, real, None, fields))

    def _check_adjtimex(self) -> None:
        try:
            state = read_adjtimex()
        except (OSError, ProbeError) as err:
            with self._lock:
                self._adjtimex_health = Health(False, f"adjtimex failed: {err}")
            return
        with self._lock:
            self._adjtimex_health = Health(True)
        previous, self._sync = self._sync, state
        if previous is None:
            return
        changed = sync_changes(previous, state, self.step_threshold_ns)
        if changed:
            mono, real = now_pair()
            fields = state.to_fields()
            fields["changed"] = changed
            fields["previous_synchronised"] = previous.synchronised
            fields["previous_offset_ns"] = previous.offset_ns
            self._send(RawEvent("clock_sync", mono, real, None, fields))

    def _check_ptp(self) -> None:
        try:
            if self._ptp_reader is None:
                self._ptp_reader = PtpReader.open(self.roots)
            sample = self._ptp_reader.read()
        except ProbeError as err:
            if self._ptp_reader is not None:
                self._ptp_reader.close()
                self._ptp_reader = None
            self._ptp_offset = None
            with self._lock:
                self._ptp_health = Health(False, str(err))
            return
        self._ptp_offset = sample
        with self._lock:
            self._ptp_health = Health(True, f"{self._ptp_reader.device.name} {sample.method}")


def sync_changes(previous: AdjtimexState, current: AdjtimexState, offset_jump_ns: int) -> list[str]:
    """What changed between two adjtimex readings that deserves a ``clock_sync`` event.

    :param previous: the earlier reading.
    :param current: the later reading.
    :param offset_jump_ns: a PLL offset change larger than this counts.
    :return: any of ``synchronised``, ``state``, ``offset`` (empty: nothing worth telling).
    """
    changed = []
    if previous.synchronised != current.synchronised:
        changed.append("synchronised")
    if previous.state != current.state:
        changed.append("state")
    if abs(current.offset_ns - previous.offset_ns) > offset_jump_ns:
        changed.append("offset")
    return changed
