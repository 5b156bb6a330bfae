"""The application-timeout canaries: the ladder rules on numbers, then real canaries frozen.

The known-workload tests stop canary processes (and, for the heartbeat, which rides the
stall samplers, the victim CPU's sampler) with SIGSTOP for 1.3 s and expect the timeouts
of the default ladder that a 1.3 s stall expires (10 ms, 100 ms, 1 s) and none of the
others (5 s, 30 s). This machine adds stalls of its own (other tenants' work makes
SCHED_OTHER processes wait tens of ms at times), so events are matched to the frozen window
rather than counted overall.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.canaries import (
    LatencySnapshot,
    RpcCanary,
    TimerCanary,
    heartbeat_pairs,
)
from agent.metrics import AgentMetrics, ScrapeHooks
from agent.samplers import Heartbeat, StallProbe
from agent.workers import worker_command
from probe.canary import (
    DEFAULT_LADDER_NS,
    LATENCY_BUCKETS_NS,
    Latency,
    Reporter,
    outlived,
    slack_ns,
    timer_expirations,
)
from probe.canary_heartbeat import Watcher
from probe.events import Event, RawEvent
from probe.worker import WorkerUsageError, int_list_option, int_option, parse_options
from tests.fakeprobes import EventSink
from tests.liveagent import is_worker, live_agent

MS = 1_000_000
S = 1_000_000_000
CPUS = sorted(os.sched_getaffinity(0))
LADDER = list(DEFAULT_LADDER_NS)
HOLD_S = 1.3
#: The heartbeat canary must report the frozen side gone for the freeze, within this.
GONE_TOLERANCE_NS = 20 * MS
ATTEMPTS = 3


# -- the ladder rules --------------------------------------------------------------------


def test_slack_is_a_tenth_of_the_timeout_but_at_least_1ms() -> None:
    assert [slack_ns(t) for t in LADDER] == [1 * MS, 10 * MS, 100 * MS, 500 * MS, 3 * S]
    assert slack_ns(1) == 1 * MS


def test_outlived_needs_more_than_the_timeout_plus_its_slack() -> None:
    assert outlived(11 * MS, LADDER) == []  # exactly 10 ms + 1 ms of slack
    assert outlived(11 * MS + 1, LADDER) == [(10 * MS, 1 * MS + 1)]
    assert [t for t, _ in outlived(1_300 * MS, LADDER)] == [10 * MS, 100 * MS, S]
    # A heartbeat observer decides on what it saw, and reports how long the peer was gone.
    assert outlived(150 * MS, LADDER, total_ns=160 * MS) == [
        (10 * MS, 150 * MS),
        (100 * MS, 60 * MS),
    ]


@pytest.mark.parametrize("stop_after_ms", [0, 1, 25, 49, 50])
def test_timer_rule_on_the_known_workload(stop_after_ms: int) -> None:
    """A 50 ms wait stopped ``stop_after_ms`` into it for 1.3 s: 10 ms, 100 ms, 1 s expire."""
    start = 1_000 * S
    due = start + 50 * MS
    actual = start + stop_after_ms * MS + 1_300 * MS
    expired = timer_expirations(start, due, actual, LADDER)
    assert [t for t, _ in expired] == [10 * MS, 100 * MS, S]
    late = dict(expired)
    assert late[10 * MS] == actual - due  # T divides the wait: the deadline at its due time
    assert late[100 * MS] == actual - (start + 100 * MS)  # T > wait: set at the wait's start
    assert late[S] == actual - (start + S)


def test_timer_rule_on_time_and_slightly_late() -> None:
    start, wait = 0, 50 * MS
    assert timer_expirations(start, start + wait, start + wait + 1 * MS, LADDER) == []
    assert timer_expirations(start, start + wait, start + wait + 2 * MS, LADDER) == [
        (10 * MS, 2 * MS)
    ]
    # 100 ms deadline set at the start: due at 100 ms, so 59 ms late is still on time.
    assert [t for t, _ in timer_expirations(0, wait, 109 * MS, LADDER)] == [10 * MS]
    assert [t for t, _ in timer_expirations(0, wait, 111 * MS, LADDER)] == [10 * MS, 100 * MS]
    # A wait of exactly T: the deadline is the wait's own due time.
    assert timer_expirations(0, 10 * MS, 12 * MS, [10 * MS]) == [(10 * MS, 2 * MS)]
    # T not dividing the wait: the first deadline at or after the due time.
    assert timer_expirations(0, 50 * MS, 70 * MS, [15 * MS]) == [(15 * MS, 10 * MS)]


def test_latency_buckets_follow_le_semantics() -> None:
    latency = Latency()
    for value in (-5, 0, 1 * MS, 1 * MS + 1, 300 * S, 300 * S + 1):
        latency.observe(value)
    assert len(latency.counts) == len(LATENCY_BUCKETS_NS) + 1
    assert latency.counts[0] == 3  # -5 counts as 0; 0 and 1 ms are <= 1 ms
    assert latency.counts[1] == 1  # just above 1 ms: the 2 ms bucket
    assert latency.counts[-2] == 1 and latency.counts[-1] == 1  # 300 s, and above
    assert latency.sum_ns == 0 + 0 + 1 * MS + 1 * MS + 1 + 300 * S + 300 * S + 1


def test_reporter_lines_are_json() -> None:
    lines: list[str] = []
    reporter = Reporter(lines.append, cpu=3)
    reporter.latency.observe(7 * MS)
    reporter.count = 12
    # A measurement that ended at 400 ns expired two timeouts, 290 and 40 ns late.
    reporter.expirations(400, 450, [(10, 290), (20, 40)], wait="poll", peer_cpu=None)
    reporter.note('a "quoted" note')
    assert lines == []  # events wait for the life line
    reporter.life(500, dropped=2)
    assert len(lines) == 1
    first, second, note, life = (json.loads(line) for line in lines[0].splitlines())
    assert first["t"] == "timeout" and first["cpu"] == 3 and first["wait"] == "poll"
    assert first["peer_cpu"] is None
    assert (first["timeout_ns"], first["mono_ns"], first["duration_ns"]) == (10, 110, 290)
    assert (second["timeout_ns"], second["mono_ns"], second["duration_ns"]) == (20, 360, 40)
    assert abs(first["real_ns"] - (time.time_ns() - 340)) < 5 * S
    assert second["real_ns"] - first["real_ns"] == 250
    assert note == {"t": "note", "msg": 'a "quoted" note'}
    assert life["t"] == "life" and life["n"] == 12 and life["dropped"] == 2
    assert life["pid"] == os.getpid() and sum(life["h"]) == 1 and life["hsum"] == 7 * MS


# -- the heartbeat judge -----------------------------------------------------------------


class Judge:
    """A heartbeat side's judge fed by hand, and the events it wrote."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.watcher = Watcher(LADDER, Reporter(self.lines.append, cpu=0), peer_cpu=1)

    def events(self) -> list[dict[str, Any]]:
        self.watcher.reporter.flush()
        out = [json.loads(line) for text in self.lines for line in text.splitlines()]
        return [e for e in out if e["t"] == "timeout"]


def _beats(watcher: Watcher, start: int, end: int, interval: int, seq0: int) -> int:
    """Wake every ``interval`` from ``start`` to ``end`` hearing one heartbeat each time."""
    seq = seq0
    now = start
    while now <= end:
        seq += 1
        watcher.wake(now, [(now - 100_000, seq)])
        now += interval
    return seq


def test_a_live_observer_declares_a_silent_peer_dead() -> None:
    judge = Judge()
    watcher = judge.watcher
    seq = _beats(watcher, 0, 100 * MS, 5 * MS, 0)
    last_sent = 100 * MS - 100_000
    # The peer is silent for 1.3 s; the observer keeps waking every 5 ms.
    now = 105 * MS
    while now < 100 * MS + 1_300 * MS:
        watcher.wake(now, [])
        now += 5 * MS
    back = 100 * MS + 1_300 * MS
    watcher.wake(now, [(back, seq + 1)])
    events = judge.events()
    assert [e["timeout_ns"] for e in events] == [10 * MS, 100 * MS, S]
    for event in events:
        t = event["timeout_ns"]
        assert event["mono_ns"] == last_sent + t  # declared dead T after the last heartbeat
        assert event["duration_ns"] == back - last_sent - t  # dead until it came back
        assert event["gone_ns"] == back - last_sent
        assert event["peer_cpu"] == 1 and event["cpu"] == 0
        assert back - last_sent - 5 * MS <= event["seen_ns"] <= event["gone_ns"]


def test_a_deaf_observer_declares_nothing() -> None:
    """The observer itself was stalled: the peer's heartbeats wait for it, nothing expires."""
    judge = Judge()
    watcher = judge.watcher
    seq = _beats(watcher, 0, 100 * MS, 5 * MS, 0)
    queued = [(100 * MS - 100_000 + k * 5 * MS, seq + k) for k in range(1, 261)]
    watcher.wake(100 * MS + 1_300 * MS, queued)
    assert judge.events() == []
    # The histogram saw 5 ms gaps only.
    assert sum(watcher.reporter.latency.counts[3:]) == 0


def test_dropped_heartbeats_are_not_a_silence() -> None:
    judge = Judge()
    watcher = judge.watcher
    seq = _beats(watcher, 0, 50 * MS, 5 * MS, 0)
    watcher.wake(55 * MS, [(54 * MS, seq + 40)])  # 39 lost, but it arrived on time
    assert judge.events() == []
    assert sum(watcher.reporter.latency.counts[3:]) == 0  # the gap across the drop is not kept


def test_heartbeat_pairs() -> None:
    assert heartbeat_pairs([1, 0]) == [(0, 1)]
    assert heartbeat_pairs([0, 1, 2, 3]) == [(0, 1), (2, 3)]
    assert heartbeat_pairs([0, 1, 2, 3, 4]) == [(0, 1), (2, 3), (4, 0)]
    assert heartbeat_pairs([5]) == [(5, 5)]
    with pytest.raises(ValueError):
        heartbeat_pairs([])


# -- worker command lines ----------------------------------------------------------------


def test_worker_options() -> None:
    values = parse_options(["--cpu", "1", "--fd=4", "--flag"], ("--cpu", "--fd"), ("--flag",))
    assert values == {"--cpu": "1", "--fd": "4", "--flag": ""}
    assert int_option(values, "--cpu") == 1
    assert int_option(values, "--wait-ns", 7) == 7
    assert int_list_option({"--t": "30,10,10"}, "--t", ()) == [10, 30]
    assert int_list_option({}, "--t", (5, 1)) == [1, 5]
    for argv, message in (
        (["--nope"], "unknown option"),
        (["--cpu"], "needs a value"),
    ):
        with pytest.raises(WorkerUsageError, match=message):
            parse_options(argv, ("--cpu",))
    with pytest.raises(WorkerUsageError, match="is required"):
        int_option({}, "--cpu")
    with pytest.raises(WorkerUsageError, match="needs an integer"):
        int_option({"--cpu": "x"}, "--cpu")
    with pytest.raises(WorkerUsageError, match="must be positive"):
        int_list_option({"--t": "10,0"}, "--t", ())


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("probe.canary_timer", ["--cpu", "100000"]),
        (
            "probe.canary_rpc",
            ["--role", "client", "--cpu", "100000", "--server-cpu", "0", "--port", "9"],
        ),
    ],
)
def test_canary_workers_report_usage_and_unusable_cpus(module: str, args: list[str]) -> None:
    usage = subprocess.run(worker_command(module, ["--bogus"]), capture_output=True, timeout=30)
    assert usage.returncode == 2 and b"unknown option" in usage.stderr and b"usage:" in usage.stderr
    bad = subprocess.run(worker_command(module, args), capture_output=True, timeout=30)
    assert bad.returncode == 1, bad
    message = json.loads(bad.stdout)
    assert message["t"] == "error" and "cpu 100000" in message["msg"]


def test_canaries_reject_bad_settings() -> None:
    with pytest.raises(ValueError, match="no CPUs"):
        TimerCanary([])
    with pytest.raises(ValueError, match="ladder"):
        TimerCanary([0], timeouts_ns=[0])
    with pytest.raises(ValueError, match="interval"):
        StallProbe([0, 1], heartbeat=Heartbeat(interval_ns=0))
    with pytest.raises(ValueError, match="ladder"):
        StallProbe([0, 1], heartbeat=Heartbeat(timeouts_ns=()))
    with pytest.raises(ValueError, match="interval"):
        RpcCanary([0], interval_ns=-1)
    assert any("one CPU only" in note for note in StallProbe([0], heartbeat=Heartbeat()).notes())


# -- metrics -----------------------------------------------------------------------------


def test_metrics_count_each_expired_timeout_and_show_the_latency() -> None:
    snapshot = LatencySnapshot((5, 1, *([0] * (len(LATENCY_BUCKETS_NS) - 2)), 2), 9 * S)
    metrics = AgentMetrics(
        [0, 1],
        canaries=("timer", "heartbeat"),
        timeouts_ns=LADDER,
        app_timeout_names=("grpc",),
        hooks=ScrapeHooks(canary_latency=lambda: {"timer": snapshot, "bogus": object()}),
    )
    for seq, t in enumerate((10 * MS, 100 * MS, S), start=1):
        metrics.observe(Event(seq, "b", "timeout", t, 0, 1, {"canary": "timer", "timeout_ns": t}))
    metrics.observe(Event(4, "b", "timeout", 0, 0, 1, {"canary": "heartbeat", "timeout_ns": S}))
    metrics.observe(Event(5, "b", "timeout", 0, 0, 1, {"canary": "heartbeat"}))  # malformed
    metrics.observe(Event(6, "b", "app_timeout", 0, 0, None, {"name": "grpc", "count": 3}))
    metrics.observe(Event(7, "b", "app_timeout", 0, 0, None, {"name": "other", "count": 1}))

    def value(metric: str, **labels: str) -> float | None:
        result = metrics.registry.get_sample_value(metric, labels)
        return None if result is None else float(result)

    expirations = "tsprobe_timeout_expirations_total"
    ladder = ("0.01", "0.1", "1.0", "5.0", "30.0")
    assert [value(expirations, canary="timer", timeout=t) for t in ladder] == [1, 1, 1, 0, 0]
    assert value(expirations, canary="heartbeat", timeout="1.0") == 1
    latency = "tsprobe_canary_latency_seconds"
    assert value(f"{latency}_bucket", canary="timer", le="0.001") == 5
    assert value(f"{latency}_bucket", canary="timer", le="0.002") == 6
    assert value(f"{latency}_bucket", canary="timer", le="300.0") == 6
    assert value(f"{latency}_bucket", canary="timer", le="+Inf") == 8
    assert value(f"{latency}_count", canary="timer") == 8
    assert value(f"{latency}_sum", canary="timer") == 9.0
    assert value(f"{latency}_count", canary="heartbeat") == 0  # zero from the start
    assert value(f"{latency}_count", canary="bogus") is None  # a malformed reading is left out
    assert value("tsprobe_app_timeouts_total", name="grpc") == 3
    assert value("tsprobe_app_timeouts_total", name="other") == 1
    if shutil.which("promtool"):
        lint = subprocess.run(
            ["promtool", "check", "metrics"], input=metrics.render(), capture_output=True
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr


# -- real canaries, frozen ---------------------------------------------------------------


def overlapping(
    events: list[RawEvent], canary: str, cpu: int, t0: int, held: int
) -> list[RawEvent]:
    """The canary's timeout events measured on ``cpu`` that overlap [t0, t0 + held)."""
    return [
        e
        for e in events
        if e.kind == "timeout"
        and e.fields["canary"] == canary
        and e.fields["cpu"] == cpu
        and e.mono_ns < t0 + held
        and e.mono_ns + (e.duration_ns or 0) > t0
    ]


def measurement(events: list[RawEvent], key: str) -> tuple[list[int], dict[str, Any]]:
    """The timeouts one measurement expired, and its fields; ``events`` must be its lines.

    :param key: the field that describes the measurement (the same on each of its lines).
    """
    assert events, "no timeout event for the freeze"
    ends = {e.mono_ns + (e.duration_ns or 0) for e in events}
    assert len(ends) == 1 and len({e.fields[key] for e in events}) == 1, events
    return sorted(e.fields["timeout_ns"] for e in events), dict(events[0].fields)


@dataclass
class Freeze:
    t0: int
    held: int


@dataclass
class FrozenRun:
    victim: int
    observer: int
    freezes: list[Freeze] = field(default_factory=list)
    events: list[RawEvent] = field(default_factory=list)
    health: dict[str, Any] = field(default_factory=dict)


def _wait_for(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def frozen() -> Iterator[FrozenRun]:
    """The three canaries; their processes on the second CPU stopped for 1.3 s.

    The timer canary, the stall sampler carrying the heartbeat side and the rpc server of
    the second CPU are stopped together. A freeze is repeated (up to ``ATTEMPTS``) until the
    heartbeat canary reports
    the side gone within ``GONE_TOLERANCE_NS`` of the freeze: this machine's other tenants
    can hold the side back for tens of ms right before the stop or after the continue.
    """
    if len(CPUS) < 2:
        pytest.skip("needs two CPUs: the frozen side and its observer")
    observer, victim = CPUS[0], CPUS[1]  # the heartbeat pair of the first two CPUs
    recorder = EventSink()
    probes = [
        TimerCanary(CPUS),
        StallProbe(CPUS[:2], heartbeat=Heartbeat()),
        RpcCanary([observer, victim]),
    ]
    for probe in probes:
        probe.start(recorder.emit)
    run = FrozenRun(victim, observer)
    try:
        for probe in probes:
            assert probe.wait_ready(20.0), probe.health()
        time.sleep(0.5)
        timer, heartbeat, rpc = probes
        pids = [
            timer.pids()[victim][0],
            heartbeat.pids()[victim][0],  # the sampler carrying the victim CPU's side
            rpc.pids()[(observer, victim)][0],  # the server
        ]
        for _ in range(ATTEMPTS):
            t0 = time.monotonic_ns()
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            time.sleep(HOLD_S)
            held = time.monotonic_ns() - t0
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            run.freezes.append(Freeze(t0, held))

            def reported(t0: int = t0, held: int = held) -> bool:
                events = recorder.events()
                return all(
                    overlapping(events, canary, cpu, t0, held)
                    for canary, cpu in (
                        ("timer", victim),
                        ("heartbeat", observer),
                        ("rpc", observer),
                    )
                )

            assert _wait_for(reported, 5.0), recorder.events()
            gone = overlapping(recorder.events(), "heartbeat", observer, t0, held)
            if all(abs(e.fields["gone_ns"] - held) <= GONE_TOLERANCE_NS for e in gone):
                break
            time.sleep(0.3)
        for probe in probes:
            run.health.update(probe.health())
        assert timer.pids()[victim][0] == pids[0]  # stopped, not restarted
    finally:
        for probe in probes:
            probe.stop()
    assert all(probe.pids() == {} for probe in probes)
    run.events = recorder.events()
    yield run


@pytest.mark.slow
def test_timer_known_workload(frozen: FrozenRun) -> None:
    """Each 1.3 s freeze of a timer canary: one wait, expiring 10 ms, 100 ms and 1 s only."""
    for freeze in frozen.freezes:
        mine = overlapping(frozen.events, "timer", frozen.victim, freeze.t0, freeze.held)
        expired, fields = measurement(mine, "wake_late_ns")
        assert expired == [10 * MS, 100 * MS, S]  # not 5 s, not 30 s
        assert fields["wait"] in ("poll", "select", "sleep")
        # The wait was stopped somewhere in its 50 ms; the machine may add a stall of its own.
        late = fields["wake_late_ns"]
        assert late >= freeze.held - 60 * MS
        print(f"timer: held {freeze.held / 1e6:.1f} ms, woke {late / 1e6:.1f} ms late")


@pytest.mark.slow
def test_heartbeat_known_workload(frozen: FrozenRun) -> None:
    """Each freeze of one side: the other side declares it dead for T <= 1 s, for ~1.3 s."""
    misses = []
    for freeze in frozen.freezes:
        mine = overlapping(frozen.events, "heartbeat", frozen.observer, freeze.t0, freeze.held)
        expired, fields = measurement(mine, "gone_ns")
        assert fields["peer_cpu"] == frozen.victim
        assert expired == [10 * MS, 100 * MS, S]  # declared dead for T <= 1 s only
        gone = fields["gone_ns"]
        print(f"heartbeat: held {freeze.held / 1e6:.1f} ms, gone {gone / 1e6:.1f} ms")
        assert gone >= freeze.held - 1 * MS
        if gone - freeze.held > GONE_TOLERANCE_NS:
            misses.append((freeze.held, gone))
        # The frozen side was deaf, not abandoned: it declares nothing of 1 s or more.
        deaf = overlapping(frozen.events, "heartbeat", frozen.victim, freeze.t0, freeze.held)
        assert not any(e.fields["timeout_ns"] >= S for e in deaf), deaf
    assert len(misses) < len(frozen.freezes), f"never within 20 ms: {misses}"


@pytest.mark.slow
def test_rpc_known_workload(frozen: FrozenRun) -> None:
    """Each freeze of the rpc server: the request in flight misses 10 ms, 100 ms and 1 s."""
    for freeze in frozen.freezes:
        mine = overlapping(frozen.events, "rpc", frozen.observer, freeze.t0, freeze.held)
        expired, fields = measurement(mine, "round_trip_ns")
        assert expired == [10 * MS, 100 * MS, S]
        assert fields["server_cpu"] == frozen.victim
        assert fields["round_trip_ns"] >= freeze.held - 200 * MS  # sent after the stop began


@pytest.mark.slow
def test_frozen_canaries_stay_healthy(frozen: FrozenRun) -> None:
    assert all(health.up for health in frozen.health.values()), frozen.health
    assert [e for e in frozen.events if e.kind == "canary_outage"] == []


@pytest.mark.slow
def test_heard_passes_a_mark_only_with_every_event_measured_before_it() -> None:
    """A timer canary stopped for 1.3 s: its unit's ``heard()`` stays before a mark taken
    during the stop, the other CPU's passes it; once the stopped one passes it too, the
    freeze's expirations are already in the sink (a recorder that stops waits on this)."""
    if len(CPUS) < 2:
        pytest.skip("needs two CPUs: the stopped canary and a running one")
    victim, other = CPUS[1], CPUS[0]
    sink = EventSink()
    timer = TimerCanary(CPUS[:2])
    # What heard() said of the victim's unit as each of its events was emitted.
    heard_at_emit: list[tuple[RawEvent, int | None]] = []

    def emit(event: RawEvent) -> None:
        if event.fields.get("cpu") == victim:
            heard_at_emit.append((event, timer.heard().get(f"cpu {victim}")))
        sink.emit(event)

    timer.start(emit)
    try:
        assert timer.wait_ready(20.0), timer.health()
        assert _wait_for(lambda: None not in timer.heard().values(), 5.0), timer.heard()
        pid = timer.pids()[victim][0]
        t0 = time.monotonic_ns()
        os.kill(pid, signal.SIGSTOP)
        time.sleep(HOLD_S)
        mark = time.monotonic_ns()
        # The running canary reports past the mark within its sign of life (about 1 s).
        assert _wait_for(lambda: (timer.heard()[f"cpu {other}"] or 0) >= mark, 5.0)
        assert (timer.heard()[f"cpu {victim}"] or 0) < mark
        os.kill(pid, signal.SIGCONT)
        assert _wait_for(lambda: (timer.heard()[f"cpu {victim}"] or 0) >= mark, 5.0)
        events = sink.events()  # read after heard() passed the mark
    finally:
        timer.stop()
    mine = overlapping(events, "timer", victim, t0, mark - t0)
    expired, _ = measurement(mine, "wake_late_ns")
    assert S in expired, mine
    # Each was in before heard() moved past the mark, not merely by the time it was read.
    seen = [(e.fields["timeout_ns"], h) for e, h in heard_at_emit if e in mine]
    assert len(seen) == len(mine) and all(h is not None and h < mark for _, h in seen), seen


@pytest.mark.slow
def test_a_killed_sampler_is_replaced_and_its_heartbeat_goes_on() -> None:
    recorder = EventSink()
    probe = StallProbe(CPUS[:2], heartbeat=Heartbeat())
    probe.start(recorder.emit)
    try:
        assert probe.wait_ready(20.0), probe.health()
        time.sleep(1.2)  # a sign of life, with the first histograms
        victim = CPUS[:2][-1]
        (old,) = probe.pids()[victim]
        killed_at = time.monotonic_ns()
        os.kill(old, signal.SIGKILL)
        assert _wait_for(lambda: recorder.events("sampler_outage"), 10.0), probe.health()
        (new,) = probe.pids()[victim]
        assert new != old
        before = probe.heartbeat_latency()
        assert before is not None and before.count > 0
        time.sleep(1.5)  # the new sampler beats on the same board, its peer hears it
        after = probe.heartbeat_latency()
        assert after is not None and after.count > before.count
        assert probe.health()["heartbeat"].up, probe.health()
    finally:
        probe.stop()
    (outage,) = recorder.events("sampler_outage")
    assert outage.fields["cpu"] == victim
    assert outage.fields["reason"] == "killed by SIGKILL"
    assert outage.mono_ns <= killed_at < outage.mono_ns + (outage.duration_ns or 0)
    # The restart is no silence of 1 s or more: the new sampler went on from the old
    # one's sequence number and was heard at once.
    long = [e for e in recorder.events("timeout") if e.fields["timeout_ns"] >= S]
    assert long == [], long


# -- through the agent -------------------------------------------------------------------


def _metric(text: str, metric: str, **labels: str) -> float | None:
    want = metric + (
        "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    )
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return None


@pytest.mark.slow
def test_the_agent_counts_canary_timeouts_and_log_lines(tmp_path: Path) -> None:
    """The agent runs the default canaries and a log watcher; a freeze and log lines show
    up in /events and /metrics, and stopping the agent stops every canary process."""
    log = tmp_path / "app.log"
    log.write_text("before the agent: deadline exceeded\n")
    victim = CPUS[-1]
    args = [  # the stall samplers stay: the heartbeat rides them
        "--no-clock",
        "--no-kmsg",
        "--watch-log",
        f"{log}:deadline exceeded:grpc",
        "--watch-log",
        f"{tmp_path}/later.log:ERROR: t",
    ]
    with live_agent(tmp_path, *args) as agent:
        assert _wait_for(lambda: agent.healthz()["probes"]["timer"]["up"], 10.0)
        children = psutil.Process(agent.proc.pid).children(recursive=True)
        timer = next(c.pid for c in children if is_worker(c, "probe.canary_timer", victim))
        t0 = time.monotonic_ns()
        os.kill(timer, signal.SIGSTOP)
        time.sleep(0.3)
        held = time.monotonic_ns() - t0
        os.kill(timer, signal.SIGCONT)
        with log.open("a") as fh:
            fh.write("x deadline exceeded\nnothing\ny deadline exceeded\n")
        (tmp_path / "later.log").write_text("ERROR: timeout\n")

        def seen() -> bool:
            events = agent.events()
            raw = [RawEvent(e.kind, e.mono_ns, e.real_ns, e.duration_ns, e.fields) for e in events]
            return bool(overlapping(raw, "timer", victim, t0, held)) and (
                sum(e.get("count", 0) for e in events if e.kind == "app_timeout") == 3
            )

        assert _wait_for(seen, 5.0), agent.events()

        def counted() -> bool:  # each worker's histogram comes with its sign of life (1 s)
            text = agent.get("/metrics")[2].decode()
            hist = "tsprobe_canary_latency_seconds_count"
            return all(_metric(text, hist, canary=c) for c in ("timer", "heartbeat"))

        _wait_for(counted, 5.0)
        _, _, body = agent.get("/metrics")
        text = body.decode()
        health = agent.healthz()
    assert _metric(text, "tsprobe_timeout_expirations_total", canary="timer", timeout="0.1") >= 1  # type: ignore[operator]
    assert (
        _metric(text, "tsprobe_timeout_expirations_total", canary="heartbeat", timeout="30.0") == 0
    )
    assert _metric(text, "tsprobe_canary_latency_seconds_count", canary="timer") > 0  # type: ignore[operator]
    assert _metric(text, "tsprobe_canary_latency_seconds_count", canary="heartbeat") > 0  # type: ignore[operator]
    assert _metric(text, "tsprobe_app_timeouts_total", name="grpc") == 2
    assert _metric(text, "tsprobe_app_timeouts_total", name="ERROR: t") == 1
    for probe in ("timer", "heartbeat", "logwatch"):
        assert _metric(text, "tsprobe_probe_up", probe=probe) == 1, probe
    assert health["status"] == "ok", health
    assert not any(child.is_running() for child in children)
    stderr = (tmp_path / "agent.stderr").read_text()
    assert (
        f"tsprobe: logwatch: {tmp_path}/later.log does not exist yet; waiting for it to appear"
        in stderr
    )
    assert "Traceback" not in stderr


# -- the heartbeat's board ---------------------------------------------------------------


def test_the_board_keeps_each_slots_last_heartbeats() -> None:
    from probe.canary_heartbeat import RING, Board, board_size

    fd = os.memfd_create("test-board")
    try:
        os.ftruncate(fd, board_size(2))
        writer, reader = Board(fd, 2), Board(fd, 2)  # two mappings, as two samplers have
        assert reader.seq(1) == 0 and reader.since(1, 0) == []
        for seq in range(1, 4):
            writer.beat(1, seq, 1000 * seq)
        assert reader.seq(1) == 3 and reader.seq(0) == 0
        assert reader.since(1, 1) == [(2000, 2), (3000, 3)]
        for seq in range(4, RING + 10):
            writer.beat(1, seq, 1000 * seq)
        kept = reader.since(1, 0)  # the ring wrapped: only the last RING are there
        assert len(kept) == RING and kept[0] == (1000 * 10, 10) and kept[-1][1] == RING + 9
    finally:
        os.close(fd)


def test_two_sides_on_a_board_declare_the_silent_one_dead() -> None:
    from probe.canary_heartbeat import Board, Side, board_size

    fd = os.memfd_create("test-board")
    try:
        os.ftruncate(fd, board_size(2))
        lines: list[str] = []
        board = Board(fd, 2)
        a = Side(board, 0, [(1, 7)], LADDER, Reporter(lines.append, cpu=3))
        b = Side(board, 1, [(0, 3)], LADDER, Reporter(lines.append, cpu=7))
        t = 0
        for _ in range(20):  # both beat every 5 ms
            t += 5 * MS
            a.beat(t)
            b.beat(t + MS)
        silent_from = t + MS
        for _ in range(60):  # b stalls 300 ms; a goes on and watches
            t += 5 * MS
            a.beat(t)
        b.beat(t + MS)  # b is back: heard at a's next beat
        a.beat(t + 5 * MS)
        a.reporter.flush()
        events = [json.loads(line) for text in lines for line in text.splitlines()]
        timeouts = [e for e in events if e["t"] == "timeout"]
        assert {e["timeout_ns"] for e in timeouts} == {10 * MS, 100 * MS}
        assert all(e["cpu"] == 3 and e["peer_cpu"] == 7 for e in timeouts)
        assert all(e["gone_ns"] == t + MS - silent_from for e in timeouts)
        # b was deaf, not abandoned: it found a's beats waiting and declares nothing.
        b.beat(t + 6 * MS)
        b.reporter.flush()
        later = [json.loads(line) for text in lines for line in text.splitlines()]
        assert [e for e in later if e["t"] == "timeout" and e["cpu"] == 7] == []
    finally:
        os.close(fd)


class _ReferenceSide:
    """``Side.beat`` with no short path: every wake-up takes the rule in full
    (``Side.hear``) for each peer."""

    def __init__(self, side: Any) -> None:
        self.side = side

    def beat(self, now_ns: int) -> None:
        side = self.side
        side.seq += 1
        side.board.beat(side.slot, side.seq, now_ns)
        for k in range(len(side.watchers)):
            side.hear(k, now_ns)


@pytest.mark.parametrize("seed", range(40))
def test_the_short_paths_of_a_beat_change_nothing(seed: int) -> None:
    """Random schedules (steady beats with jitter, silences past each timeout, a ring that
    wraps, a peer whose board slot starts over) played on two boards: sides with the short
    paths and sides without them write the same lines and histograms."""
    import random

    from probe.canary_heartbeat import SLOT_WORDS, Board, Side, board_size

    rng = random.Random(seed)
    steps = []
    t = 0
    for _ in range(600):
        roll = rng.random()
        if roll < 0.90:
            t += rng.choice((4, 5, 5, 5, 6)) * MS + rng.randrange(-200_000, 200_000)
        elif roll < 0.97:
            t += rng.choice((12, 30, 115, 150, 400, 1200)) * MS
        steps.append((rng.randrange(2), max(t, 1), rng.random() < 0.01))
    played = []
    for short in (True, False):
        fd = os.memfd_create("test-board")
        try:
            os.ftruncate(fd, board_size(2))
            board = Board(fd, 2)
            lines: list[str] = []
            sides = [
                Side(board, 0, [(1, 1)], LADDER, Reporter(lines.append, cpu=0)),
                Side(board, 1, [(0, 0)], LADDER, Reporter(lines.append, cpu=1)),
            ]
            beaters = sides if short else [_ReferenceSide(side) for side in sides]
            for who, now, restart in steps:
                if restart:  # this CPU's slot starts over, as on a board made anew
                    sides[who].seq = 0
                    board.words[who * SLOT_WORDS] = 0
                beaters[who].beat(now)
            for side in sides:
                side.reporter.flush()
        finally:
            os.close(fd)
        events = [json.loads(line) for text in lines for line in text.splitlines()]
        for event in events:
            event.pop("real_ns", None)
        played.append(
            (
                events,
                [
                    (s.reporter.count, s.reporter.latency.counts, s.reporter.latency.sum_ns)
                    for s in sides
                ],
            )
        )
    assert played[0] == played[1]
    assert any(e["t"] == "timeout" for e in played[0][0])  # the schedule declares someone dead
