"""The metrics collector: the contract's names and labels, zeros from the start, hooks."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest

from agent.metrics import (
    DEFAULT_TIMEOUTS_NS,
    STALL_BUCKETS_NS,
    AgentMetrics,
    ScrapeHooks,
    SyncReading,
)
from probe.base import Health
from probe.events import Event

MS = 1_000_000
S = 1_000_000_000
PROBES = ("stall", "clock", "adjtimex", "ptp", "kmsg")
KINDS = ("soft_lockup", "rcu_stall", "hung_task", "clocksource_unstable")


def event(seq: int, kind: str, duration_ns: int | None = None, **fields: Any) -> Event:
    return Event(seq, "boot", kind, 1_000 * seq, 2_000 * seq, duration_ns, fields)


def make(hooks: ScrapeHooks | None = None, canaries: tuple[str, ...] = ("timer",)) -> AgentMetrics:
    return AgentMetrics(
        [0, 1],
        warning_kinds=KINDS,
        probes=("stall", "clock", "adjtimex", "ptp", "kmsg"),
        canaries=canaries,
        timeouts_ns=DEFAULT_TIMEOUTS_NS,
        info={"version": "9.9", "boot_id": "boot", "agent_id": "a1"},
        start_time_s=1_700_000_000.5,
        hooks=hooks,
    )


def value(metrics: AgentMetrics, name: str, **labels: str) -> float | None:
    result = metrics.registry.get_sample_value(name, labels)
    return None if result is None else float(result)


def test_buckets_span_1ms_to_300s_log_spaced() -> None:
    assert STALL_BUCKETS_NS[0] == 1 * MS and STALL_BUCKETS_NS[-1] == 300 * S
    assert list(STALL_BUCKETS_NS) == sorted(set(STALL_BUCKETS_NS))
    ratios = [b / a for a, b in itertools.pairwise(STALL_BUCKETS_NS)]
    assert all(1.4 <= r <= 2.5 for r in ratios)


def test_every_known_series_is_zero_from_the_start() -> None:
    m = make()
    for cpu in ("0", "1"):
        assert value(m, "tsprobe_cpu_stall_seconds_count", cpu=cpu) == 0
        assert value(m, "tsprobe_cpu_stall_seconds_bucket", cpu=cpu, le="0.001") == 0
        assert value(m, "tsprobe_cpu_stall_seconds_bucket", cpu=cpu, le="300.0") == 0
        assert value(m, "tsprobe_cpu_stall_seconds_bucket", cpu=cpu, le="+Inf") == 0
        assert value(m, "tsprobe_cpu_stall_longest_seconds", cpu=cpu) == 0
        assert value(m, "tsprobe_cpu_samples_total", cpu=cpu) == 0
        assert value(m, "tsprobe_sampler_outages_total", cpu=cpu) == 0
    for clock in ("realtime", "boottime"):
        assert value(m, "tsprobe_clock_steps_total", clock=clock) == 0
        assert value(m, "tsprobe_clock_last_step_seconds", clock=clock) == 0
    for timeout in ("0.01", "0.1", "1.0", "5.0", "30.0"):
        assert value(m, "tsprobe_timeout_expirations_total", canary="timer", timeout=timeout) == 0
    for kind in KINDS:
        assert value(m, "tsprobe_kernel_warnings_total", kind=kind) == 0
    for probe in ("stall", "clock", "adjtimex", "ptp", "kmsg"):
        assert value(m, "tsprobe_probe_up", probe=probe) == 0
    assert value(m, "tsprobe_events_total", kind="stall") == 0
    assert value(m, "tsprobe_events_dropped_total") == 0
    assert value(m, "tsprobe_events_spool_errors_total") == 0
    assert value(m, "tsprobe_kmsg_lost_total") == 0
    assert value(m, "tsprobe_agent_start_time_seconds") == 1_700_000_000.5
    info = {"version": "9.9", "boot_id": "boot", "agent_id": "a1", "clocksource": ""}
    assert value(m, "tsprobe_info", **info) == 1


def test_stalls_fill_the_histogram_per_cpu() -> None:
    m = make()
    m.observe(event(1, "stall", 3 * MS, cpu=1, cause="guest-sched"))
    m.observe(event(2, "stall", 2 * MS, cpu=1))  # on a bound: le is inclusive
    m.observe(event(3, "stall", 4_400 * MS, cpu=1))
    m.observe(event(4, "stall", 150 * MS, cpu=0))
    assert value(m, "tsprobe_cpu_stall_seconds_count", cpu="1") == 3
    assert value(m, "tsprobe_cpu_stall_seconds_sum", cpu="1") == pytest.approx(4.405)
    assert value(m, "tsprobe_cpu_stall_seconds_bucket", cpu="1", le="0.001") == 0
    assert value(m, "tsprobe_cpu_stall_seconds_bucket", cpu="1", le="0.002") == 1
    assert value(m, "tsprobe_cpu_stall_seconds_bucket", cpu="1", le="0.005") == 2
    assert value(m, "tsprobe_cpu_stall_seconds_bucket", cpu="1", le="5.0") == 3
    assert value(m, "tsprobe_cpu_stall_longest_seconds", cpu="1") == pytest.approx(4.4)
    assert value(m, "tsprobe_cpu_stall_longest_seconds", cpu="0") == pytest.approx(0.15)
    assert value(m, "tsprobe_events_total", kind="stall") == 4


def test_stall_longer_than_every_bucket_lands_in_inf() -> None:
    m = make()
    m.observe(event(1, "stall", 400 * S, cpu=0))
    assert value(m, "tsprobe_cpu_stall_seconds_bucket", cpu="0", le="300.0") == 0
    assert value(m, "tsprobe_cpu_stall_seconds_bucket", cpu="0", le="+Inf") == 1


def test_a_cpu_outside_the_universe_gets_its_series() -> None:
    m = make()
    m.observe(event(1, "stall", 3 * MS, cpu=12))
    assert value(m, "tsprobe_cpu_stall_seconds_count", cpu="12") == 1
    assert value(m, "tsprobe_cpu_samples_total", cpu="12") == 0


def test_malformed_events_are_counted_by_kind_only() -> None:
    m = make()
    m.observe(event(1, "stall", None, cpu=0))
    m.observe(event(2, "stall", 3 * MS, cpu="zero"))
    m.observe(event(3, "clock_step", None, clock="realtime"))
    m.observe(event(4, "future_kind", None))
    assert value(m, "tsprobe_cpu_stall_seconds_count", cpu="0") == 0
    assert value(m, "tsprobe_clock_steps_total", clock="realtime") == 0
    assert value(m, "tsprobe_events_total", kind="stall") == 2
    assert value(m, "tsprobe_events_total", kind="future_kind") == 1


def test_clock_steps_count_and_keep_the_last_signed_size() -> None:
    m = make()
    m.observe(event(1, "clock_step", None, clock="realtime", step_ns=-99_200_000))
    m.observe(event(2, "clock_step", None, clock="realtime", step_ns=2 * S))
    m.observe(event(3, "clock_step", None, clock="boottime", step_ns=-5 * MS))
    m.observe(event(4, "clocksource_change", None, **{"from": "kvm-clock", "to": "tsc"}))
    assert value(m, "tsprobe_clock_steps_total", clock="realtime") == 2
    assert value(m, "tsprobe_clock_last_step_seconds", clock="realtime") == 2.0
    assert value(m, "tsprobe_clock_last_step_seconds", clock="boottime") == -0.005
    assert value(m, "tsprobe_clocksource_changes_total") == 1


def test_outages_warnings_and_timeouts() -> None:
    m = make()
    m.observe(event(1, "sampler_outage", 20 * MS, cpu=1, reason="restarted"))
    m.observe(event(2, "kernel_warning", None, warning="soft_lockup"))
    m.observe(event(3, "kernel_warning", None, warning="new_kind"))
    m.observe(event(4, "timeout", None, canary="timer", timeout_ns=100 * MS))
    m.observe(event(5, "timeout", None, canary="timer", timeout_ns=S))
    assert value(m, "tsprobe_sampler_outages_total", cpu="1") == 1
    assert value(m, "tsprobe_sampler_outage_seconds_total", cpu="1") == 0.02
    assert value(m, "tsprobe_kernel_warnings_total", kind="soft_lockup") == 1
    assert value(m, "tsprobe_kernel_warnings_total", kind="new_kind") == 1
    assert value(m, "tsprobe_timeout_expirations_total", canary="timer", timeout="0.1") == 1
    assert value(m, "tsprobe_timeout_expirations_total", canary="timer", timeout="1.0") == 1
    assert value(m, "tsprobe_timeout_expirations_total", canary="timer", timeout="0.01") == 0


def test_no_canary_means_no_timeout_series() -> None:
    m = make(canaries=())
    text = m.render().decode()
    assert "# TYPE tsprobe_timeout_expirations_total counter" in text
    assert "tsprobe_timeout_expirations_total{" not in text


class Stats:
    dropped = 4
    spool_errors = 2


def test_scrape_time_readings() -> None:
    samples = {0: 1_000, 1: 998}
    hooks = ScrapeHooks(
        health=lambda: {"stall": Health(True), "ptp": Health(False, "none"), "extra": Health(True)},
        samples=lambda: samples,
        host_offset_ns=lambda: -99_200_000,
        sync=lambda: SyncReading(False, 16_000_000),
        clocksource=lambda: "kvm-clock",
        kmsg_lost=lambda: 3,
        log_stats=Stats,
    )
    m = make(hooks)
    assert value(m, "tsprobe_cpu_samples_total", cpu="0") == 1_000
    assert value(m, "tsprobe_probe_up", probe="stall") == 1
    assert value(m, "tsprobe_probe_up", probe="ptp") == 0
    assert value(m, "tsprobe_probe_up", probe="clock") == 0  # no report: down
    assert value(m, "tsprobe_probe_up", probe="extra") == 1
    assert value(m, "tsprobe_clock_host_offset_seconds") == -0.0992
    assert value(m, "tsprobe_clock_sync_synchronised") == 0
    assert value(m, "tsprobe_clock_sync_maxerror_seconds") == 0.016
    assert value(m, "tsprobe_kmsg_lost_total") == 3
    assert value(m, "tsprobe_events_dropped_total") == 4
    assert value(m, "tsprobe_events_spool_errors_total") == 2
    info = {"version": "9.9", "boot_id": "boot", "agent_id": "a1", "clocksource": "kvm-clock"}
    assert value(m, "tsprobe_info", **info) == 1
    # A counter never goes backwards, even if a sampler's count restarts.
    samples[0] = 10
    assert value(m, "tsprobe_cpu_samples_total", cpu="0") == 1_000


def test_unavailable_values_have_no_sample() -> None:
    m = make()
    text = m.render().decode()
    for name in (
        "tsprobe_clock_host_offset_seconds",
        "tsprobe_clock_sync_synchronised",
        "tsprobe_clock_sync_maxerror_seconds",
    ):
        assert f"# TYPE {name} gauge" in text
        assert value(m, name) is None


def boom() -> Any:
    raise OSError("gone")


@pytest.mark.parametrize(
    ("hook", "probe"),
    [
        ("samples", "stall"),
        ("host_offset_ns", "ptp"),
        ("sync", "adjtimex"),
        ("clocksource", "clock"),
        ("kmsg_lost", "kmsg"),
    ],
)
def test_a_failing_reading_takes_its_probe_down_not_the_scrape(hook: str, probe: str) -> None:
    up: Mapping[str, Health] = {p: Health(True) for p in PROBES}
    hooks = ScrapeHooks(health=lambda: up, samples=lambda: {0: 5})
    m = make(hooks)
    assert value(m, "tsprobe_cpu_samples_total", cpu="0") == 5
    setattr(hooks, hook, boom)
    body = m.render()
    assert b"tsprobe_cpu_stall_seconds_bucket" in body
    assert value(m, "tsprobe_probe_up", probe=probe) == 0
    others = {"stall", "clock", "adjtimex", "ptp", "kmsg"} - {probe}
    assert all(value(m, "tsprobe_probe_up", probe=p) == 1 for p in others)
    assert value(m, "tsprobe_cpu_samples_total", cpu="0") == 5  # last good value kept


def test_a_failing_health_hook_reports_every_probe_down() -> None:
    m = make(ScrapeHooks(health=boom))
    assert value(m, "tsprobe_probe_up", probe="stall") == 0
    assert b"tsprobe_events_dropped_total 0.0" in m.render()


def test_collectors_do_not_share_state() -> None:
    a, b = make(), make()
    a.observe(event(1, "stall", 3 * MS, cpu=0))
    assert value(a, "tsprobe_cpu_stall_seconds_count", cpu="0") == 1
    assert value(b, "tsprobe_cpu_stall_seconds_count", cpu="0") == 0


def test_concurrent_scrapes_share_one_rendering() -> None:
    # A slow guest: every rendering takes 0.2 s (the samples hook). Five scrapes that
    # arrive while one renders wait for one more rendering, which they all take.
    started = threading.Event()

    def slow_samples() -> dict[int, int]:
        started.set()
        time.sleep(0.2)
        return {0: 5}

    m = make(ScrapeHooks(samples=slow_samples))
    bodies: list[bytes] = []
    first = threading.Thread(target=lambda: bodies.append(m.render()))
    first.start()
    assert started.wait(5)
    late = [threading.Thread(target=lambda: bodies.append(m.render())) for _ in range(5)]
    for thread in late:
        thread.start()
    for thread in [first, *late]:
        thread.join(10)
    assert len(bodies) == 6 and m.renders == 2
    assert len(set(bodies[1:])) == 1
    assert b'tsprobe_cpu_samples_total{cpu="0"} 5.0' in bodies[-1]


def test_a_scrape_never_gets_a_rendering_older_than_itself() -> None:
    m = make()
    before = m.render()
    m.observe(event(1, "stall", 3 * MS, cpu=0))
    after = m.render()
    assert m.renders == 2 and before != after
    assert b'tsprobe_cpu_stall_seconds_count{cpu="0"} 1.0' in after
