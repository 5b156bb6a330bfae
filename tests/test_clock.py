"""The clock probe: step detection on literal pairs, regimes, and the real probe on this machine.

The last test steps this machine's CLOCK_REALTIME (+0.5 s, then back) and expects exactly
those two steps back; it runs only where that is allowed (TSPROBE_STEP_HOST_CLOCK=1, or
CI=true on a disposable runner) and always restores the clock.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from probe.adjtimex import AdjtimexState
from probe.base import Health, read_pair
from probe.clock import (
    BOOTTIME,
    REALTIME,
    REGIMES,
    ClockProbe,
    RealtimeSetWatch,
    StepDetector,
    clock_regime,
    detect_steps,
    explain_clocksource,
    parse_available_clocksources,
    parse_clocksource,
    sync_changes,
)
from probe.errors import ParseError
from probe.events import RawEvent
from probe.ptp import NO_DEVICE, find_kvm_ptp
from probe.roots import Roots

FIXTURES = Path(__file__).parent / "fixtures"
SECOND = 1_000_000_000
MS = 1_000_000
US = 1_000
REAL0 = 1_795_600_000 * SECOND  # a realtime offset against monotonic, as on a real guest


def pairs(
    offsets: list[int], start: int = 5 * SECOND, every: int = 10 * MS
) -> list[tuple[int, int]]:
    """(mono, other) pairs every ``every`` ns whose other-minus-mono offset follows ``offsets``."""
    return [(start + i * every, start + i * every + off) for i, off in enumerate(offsets)]


class Collector:
    """An emit callback that keeps the events and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[RawEvent] = []
        self._cond = threading.Condition()

    def __call__(self, event: RawEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def of(self, kind: str) -> list[RawEvent]:
        with self._cond:
            return [e for e in self.events if e.kind == kind]

    def wait_for(self, kind: str, count: int = 1, timeout: float = 3.0) -> list[RawEvent]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.of(kind)) >= count, timeout)
        return self.of(kind)


def wait_until(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


# -- step detection on literal pairs ---------------------------------------------------------


def test_two_second_realtime_step_is_one_step_of_two_seconds() -> None:
    offsets = [REAL0] * 5 + [REAL0 + 2 * SECOND] * 5
    steps = detect_steps(REALTIME, pairs(offsets))
    assert len(steps) == 1
    step = steps[0]
    assert step.clock == REALTIME
    assert step.step_ns == 2 * SECOND
    assert step.mono_ns == 5 * SECOND + 5 * 10 * MS
    assert step.since_mono_ns == 5 * SECOND + 4 * 10 * MS
    assert step.other_ns == step.mono_ns + REAL0 + 2 * SECOND
    assert step.bracket_ns == 0


def test_drift_below_the_threshold_is_not_a_step() -> None:
    # 5 us per pair for 1000 pairs: 5 ms in all, but never 1 ms between two pairs.
    offsets = [REAL0 + i * 5 * US for i in range(1000)]
    assert detect_steps(REALTIME, pairs(offsets)) == []
    # Jitter right at the threshold is not a step either; just above it is.
    assert detect_steps(REALTIME, pairs([REAL0, REAL0 + MS, REAL0])) == []
    assert len(detect_steps(REALTIME, pairs([REAL0, REAL0 + MS + 1]))) == 1


def test_boottime_step_after_a_suspend() -> None:
    boot0 = 3 * SECOND  # boottime ahead of monotonic by an earlier suspend
    steps = detect_steps(BOOTTIME, pairs([boot0] * 3 + [boot0 + 30 * SECOND] * 3))
    assert [(s.clock, s.step_ns) for s in steps] == [(BOOTTIME, 30 * SECOND)]


def test_negative_steps() -> None:
    offsets = [REAL0, REAL0, REAL0 - 1_500 * MS, REAL0 - 1_500 * MS, REAL0 - 1_502 * MS]
    steps = detect_steps(REALTIME, pairs(offsets))
    assert [s.step_ns for s in steps] == [-1_500 * MS, -2 * MS]


def test_step_and_its_undo_are_two_steps() -> None:
    offsets = [REAL0, REAL0 + 500 * MS, REAL0 + 500 * MS, REAL0]
    assert [s.step_ns for s in detect_steps(REALTIME, pairs(offsets))] == [500 * MS, -500 * MS]


def test_long_brackets_are_ignored_and_error_bound_is_reported() -> None:
    detector = StepDetector(REALTIME, threshold_ns=MS, max_bracket_ns=50 * US)
    assert detector.feed(1 * SECOND, 1 * SECOND + REAL0, 10 * US) is None
    # A preempted read: 3 ms bracket and a wild value. Dropped, not compared.
    assert detector.feed(2 * SECOND, 2 * SECOND + REAL0 + 3 * MS, 3 * MS) is None
    assert detector.rejected == 1
    step = detector.feed(3 * SECOND, 3 * SECOND + REAL0 + 7 * MS, 20 * US)
    assert step is not None
    assert step.step_ns == 7 * MS
    assert step.bracket_ns == 5 * US + 10 * US  # half of each bracket
    assert step.since_mono_ns == 1 * SECOND
    assert detector.accepted == 2


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError):
        StepDetector(REALTIME, threshold_ns=0)


# -- clocksource and regimes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "regime"),
    [
        ("kvm-clock", "kvm-clock"),
        ("tsc", "tsc"),
        ("hpet", "emulated"),
        ("acpi_pm", "emulated"),
        ("hyperv_clocksource_tsc_page", "hyperv"),
        ("jiffies", "tick"),
        ("something-new", "other"),
        (None, "other"),
    ],
)
def test_clock_regime(name: str | None, regime: str) -> None:
    assert clock_regime(name) == regime
    line = explain_clocksource(name)
    assert regime in line and "\n" not in line


def test_every_regime_has_a_one_line_explanation() -> None:
    assert {"kvm-clock", "tsc", "emulated", "other"} <= set(REGIMES)
    for text in REGIMES.values():
        assert text and "\n" not in text
    assert "do not advance over a stop" in REGIMES["kvm-clock"]


def test_clocksource_parsers() -> None:
    assert parse_clocksource("tsc\n") == "tsc"
    assert parse_available_clocksources("tsc kvm-clock \n") == ("tsc", "kvm-clock")
    assert parse_available_clocksources("\n") == ()
    for bad in ("", "\n", "tsc hpet\n"):
        with pytest.raises(ParseError):
            parse_clocksource(bad)


# -- adjtimex change rule --------------------------------------------------------------------

UNSYNCED = AdjtimexState(
    state=5,
    state_name="TIME_ERROR",
    synchronised=False,
    offset_ns=0,
    freq_ppm=0.0,
    maxerror_ns=16 * SECOND,
    esterror_ns=16 * SECOND,
    status=0x40,
    flags=("STA_UNSYNC",),
    constant=2,
    precision_ns=1_000,
    tolerance_ppm=500.0,
    tick_us=10_000,
    tai_s=0,
    time_ns=REAL0,
)
SYNCED = dataclasses.replace(
    UNSYNCED, state=0, state_name="TIME_OK", synchronised=True, status=0x1, flags=("STA_PLL",)
)


def test_sync_changes() -> None:
    assert sync_changes(UNSYNCED, UNSYNCED, MS) == []
    assert sync_changes(UNSYNCED, SYNCED, MS) == ["synchronised", "state"]
    small = dataclasses.replace(SYNCED, offset_ns=900 * US, maxerror_ns=1)
    assert sync_changes(SYNCED, small, MS) == []  # maxerror growing is not news
    jumped = dataclasses.replace(SYNCED, offset_ns=-2 * MS)
    assert sync_changes(SYNCED, jumped, MS) == ["offset"]


# -- the probe on fixture roots ----------------------------------------------------------------


def copy_fixture(name: str, tmp_path: Path) -> Roots:
    sys_root = tmp_path / "sys"
    shutil.copytree(FIXTURES / name, sys_root)
    (tmp_path / "dev").mkdir()
    return Roots(proc="/proc", sys=str(sys_root), dev=str(tmp_path / "dev"))


def rewrite(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_clocksource_change_on_an_injected_sysfs(tmp_path: Path) -> None:
    roots = copy_fixture("sys-kvm", tmp_path)
    current = Path(roots.sys, "devices/system/clocksource/clocksource0/current_clocksource")
    events = Collector()
    probe = ClockProbe(roots=roots, ptp=False, slow_period_ns=50 * MS)
    probe.start(events)
    try:
        assert probe.clocksource() == "kvm-clock"
        assert probe.available_clocksources() == ("kvm-clock", "tsc", "hpet", "acpi_pm")
        time.sleep(0.12)
        rewrite(current, "tsc\n")
        changes = events.wait_for("clocksource_change")
        assert wait_until(lambda: probe.clocksource() == "tsc")
        time.sleep(0.2)  # several more reads: still one event
    finally:
        probe.stop()
    changes = events.of("clocksource_change")
    assert len(changes) == 1
    fields = changes[0].fields
    assert (fields["from"], fields["to"], fields["regime"]) == ("kvm-clock", "tsc", "tsc")
    assert fields["available"] == ["kvm-clock", "tsc", "hpet", "acpi_pm"]
    assert changes[0].duration_ns is None


def test_unreadable_clocksource_is_a_health_detail_not_an_error(tmp_path: Path) -> None:
    roots = Roots(sys=str(tmp_path / "empty"), dev=str(tmp_path))
    probe = ClockProbe(roots=roots, ptp=False, adjtimex=False)
    probe.start(Collector())
    try:
        assert probe.clocksource() is None
        health = probe.health()
    finally:
        probe.stop()
    assert health["clock"].up
    assert "clocksource unreadable" in health["clock"].detail
    assert health["adjtimex"] == Health(False, "disabled")
    assert health["ptp"] == Health(False, "disabled")


def test_kvm_ptp_in_sysfs_without_a_dev_node_is_down_with_a_reason(tmp_path: Path) -> None:
    probe = ClockProbe(roots=copy_fixture("sys-kvm", tmp_path))
    probe.start(Collector())
    try:
        health = probe.health()
        offset = probe.host_offset_ns()
    finally:
        probe.stop()
    assert health["clock"].up
    assert not health["ptp"].up
    assert "ptp1" in health["ptp"].detail and "cannot be opened" in health["ptp"].detail
    assert offset is None


def test_no_kvm_ptp_device(tmp_path: Path) -> None:
    probe = ClockProbe(roots=copy_fixture("sys-tsc", tmp_path))
    probe.start(Collector())
    try:
        health = probe.health()
    finally:
        probe.stop()
    assert health["ptp"] == Health(False, NO_DEVICE)
    assert probe.host_offset_ns() is None


def test_health_before_start_and_after_stop() -> None:
    probe = ClockProbe()
    assert all(not h.up for h in probe.health().values())
    assert probe.health()["clock"].detail == "not started"
    probe.stop()  # stopping a probe that never ran is harmless
    probe.start(Collector())
    with pytest.raises(RuntimeError):
        probe.start(Collector())
    probe.stop()
    assert probe.health()["clock"] == Health(False, "stopped")


def test_a_failing_emit_does_not_stop_the_sampler(tmp_path: Path) -> None:
    roots = copy_fixture("sys-kvm", tmp_path)
    current = Path(roots.sys, "devices/system/clocksource/clocksource0/current_clocksource")
    calls: list[str] = []

    def broken_emit(event: RawEvent) -> None:
        calls.append(event.kind)
        raise RuntimeError("event log full")

    probe = ClockProbe(roots=roots, ptp=False, slow_period_ns=20 * MS)
    probe.start(broken_emit)
    try:
        rewrite(current, "hpet\n")
        assert wait_until(lambda: "clocksource_change" in calls)
        before = probe.samples()
        assert wait_until(lambda: probe.samples() > before + 5)
        assert probe.health()["clock"].up
    finally:
        probe.stop()


def test_timerfd_cancel_on_set_is_available_here() -> None:
    watch = RealtimeSetWatch()
    try:
        assert watch.consume() is False  # nothing happened yet
    finally:
        watch.close()
    probe = ClockProbe(ptp=False, adjtimex=False, timerfd=False)
    probe.start(Collector())
    try:
        assert "timerfd off" in probe.health()["clock"].detail
    finally:
        probe.stop()


# -- the real probe on this machine ----------------------------------------------------------


def thread_runtime_ns(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/schedstat") as fh:
        return int(fh.read().split()[0])


def test_real_probe_for_two_seconds() -> None:
    events = Collector()
    probe = ClockProbe()
    probe.start(events)
    try:
        assert wait_until(lambda: probe.thread_id() is not None, 1.0)
        tid = probe.thread_id()
        assert tid is not None
        cpu0, t0 = thread_runtime_ns(tid), time.monotonic_ns()
        time.sleep(2.0)
        cpu1, t1 = thread_runtime_ns(tid), time.monotonic_ns()
        health = probe.health()
        samples = probe.samples()
        state = probe.sync_state()
    finally:
        probe.stop()
    assert events.of("clock_step") == [], "false steps on an undisturbed clock"
    assert health["clock"] == Health(True, "")
    assert health["adjtimex"].up and state is not None
    with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as fh:
        assert probe.clocksource() == fh.read().strip()
    if find_kvm_ptp() is None:
        assert health["ptp"] == Health(False, NO_DEVICE)
    # 10 ms period for 2 s: about 200 samples; a stalled or runaway loop fails this.
    assert 120 <= samples <= 260
    assert probe.rejected_pairs() < samples // 10
    # The sampler's own CPU time: well under 5 % of one CPU.
    assert (cpu1 - cpu0) / (t1 - t0) < 0.05


STEP_ALLOWED = os.environ.get("TSPROBE_STEP_HOST_CLOCK") == "1" or os.environ.get("CI") == "true"


@pytest.mark.needs_root
@pytest.mark.skipif(
    not STEP_ALLOWED,
    reason="steps this machine's CLOCK_REALTIME; set TSPROBE_STEP_HOST_CLOCK=1 (or CI=true) "
    "on a disposable machine to run it",
)
def test_known_realtime_steps_are_measured() -> None:
    if os.geteuid() != 0:
        pytest.skip("setting CLOCK_REALTIME needs root")
    events = Collector()
    probe = ClockProbe(ptp=False, adjtimex=False)
    probe.start(events)
    base = read_pair(time.CLOCK_REALTIME)

    def undisturbed_real() -> int:
        return base.other_ns + (time.monotonic_ns() - base.mono_ns)

    stepped = False
    try:
        time.sleep(0.05)
        set_forward = time.monotonic_ns()
        time.clock_settime_ns(time.CLOCK_REALTIME, undisturbed_real() + 500 * MS)
        stepped = True
        time.sleep(0.1)
        set_back = time.monotonic_ns()
        time.clock_settime_ns(time.CLOCK_REALTIME, undisturbed_real())
        stepped = False
        events.wait_for("clock_step", 2, timeout=1.0)
        time.sleep(0.05)
        timerfd_active = probe.health()["clock"].detail == ""
    finally:
        if stepped:
            time.clock_settime_ns(time.CLOCK_REALTIME, undisturbed_real())
        probe.stop()
    assert abs(time.clock_gettime_ns(time.CLOCK_REALTIME) - undisturbed_real()) < MS
    steps = events.of("clock_step")
    assert [s.fields["clock"] for s in steps] == [REALTIME, REALTIME]
    assert abs(steps[0].fields["step_ns"] - 500 * MS) < 5 * MS
    assert abs(steps[1].fields["step_ns"] + 500 * MS) < 5 * MS
    for step in steps:
        assert 0 <= step.fields["bracket_ns"] <= 50 * US
    # Seen promptly: the timerfd wakes the sampler at once; without it, within a period.
    latency = 5 * MS if timerfd_active else probe.period_ns + 5 * MS
    assert 0 < steps[0].mono_ns - set_forward < latency
    assert 0 < steps[1].mono_ns - set_back < latency
    assert steps[1].fields["since_mono_ns"] < set_back
