"""The agent's Prometheus metrics: a custom collector over the event stream and the probes.

Two kinds of input, as in client_python's custom collectors:

* events: ``AgentMetrics.observe`` is an event-log listener and sees every ``Event`` once,
  in ``seq`` order. Counters, the stall histogram and the "last"/"longest" gauges are
  derived from them alone, so /metrics and the event log never disagree.
* scrape-time readings: ``ScrapeHooks`` holds plain callables (per-CPU sampler iterations,
  probe health, the host offset, the clocksource, ...) asked on every ``collect()``. A hook
  that raises never breaks the scrape: the reading is left out (counters keep their last
  good value) and the probe it belongs to is reported ``tsprobe_probe_up{probe} 0``.

``collect()`` builds fresh metric families on each scrape from a snapshot taken under a
lock. ``render()`` coalesces concurrent scrapes: one rendering at a time, and a request
that waited for another's rendering which began after it arrived takes that body (as
fresh as its own would be). In a slow guest (TCG: 0.5 to 5 s per rendering seen) a
scraper's retries then cost one rendering, not one each, and cannot pile up. The
collector lives in a private ``CollectorRegistry`` (``AgentMetrics.registry``), never the
global one, so tests and several agents in one process do not collide.

Label universes are given to the constructor (CPUs, clocks, warning kinds, probes,
canaries, the timeout ladder) and every series over them is exported from the first
scrape with 0, so a dashboard never meets a missing series. A label value first seen in
an event (an unknown warning kind, say) adds its series from then on.

The metric contract (DESIGN.md) and the extras::

    tsprobe_cpu_stall_seconds{cpu}                histogram  each stall event's duration
    tsprobe_cpu_stall_longest_seconds{cpu}        gauge      longest stall since start
    tsprobe_cpu_samples_total{cpu}                counter    sampler iterations (hook)
    tsprobe_sampler_outages_total{cpu}            counter    sampler_outage events
    tsprobe_sampler_outage_seconds_total{cpu}     counter    their summed duration
    tsprobe_clock_steps_total{clock}              counter    clock_step events
    tsprobe_clock_last_step_seconds{clock}        gauge      signed step_ns of the last one
    tsprobe_clocksource_changes_total             counter    clocksource_change events
    tsprobe_clock_host_offset_seconds             gauge      guest minus host realtime
    tsprobe_clock_sync_synchronised               gauge      1/0 from adjtimex
    tsprobe_clock_sync_maxerror_seconds           gauge      adjtimex maxerror
    tsprobe_timeout_expirations_total{canary,timeout}  counter  timeout events
    tsprobe_canary_latency_seconds{canary}        histogram  each canary measurement (hook)
    tsprobe_app_timeouts_total{name}              counter    app_timeout events (log lines)
    tsprobe_kernel_warnings_total{kind}           counter    kernel_warning events
    tsprobe_kmsg_lost_total                       counter    kernel messages lost (hook)
    tsprobe_probe_up{probe}                       gauge      1 while a source works
    tsprobe_events_total{kind}                    counter    events appended, by kind
    tsprobe_events_dropped_total                  counter    see agent.eventlog
    tsprobe_events_spool_errors_total             counter    failed spool operations
    tsprobe_info{version,boot_id,agent_id,clocksource}  gauge  always 1
    tsprobe_agent_start_time_seconds              gauge      Unix time of the start

"Not available" is no sample: the host offset and the two sync gauges are families without
a sample (HELP and TYPE only) while their source has no value, and the source's
``tsprobe_probe_up`` (``ptp``, ``adjtimex``) says 0. A made-up 0 would read as "in sync".

Events feed the counters with these fields (others are ignored): ``stall`` (``cpu``,
``duration_ns``), ``sampler_outage`` (``cpu``, ``duration_ns``), ``clock_step``
(``clock``, ``step_ns``), ``kernel_warning`` (``warning``), ``timeout`` (``canary`` and
``timeout_ns``: one event per timeout of the ladder a measurement outlived),
``app_timeout`` (``name``, ``count``).

The canary latency histogram is not derived from events (a canary measures hundreds of
waits and heartbeats a second and reports only those that expired a timeout): each canary
worker counts its measurements into ``LATENCY_BUCKETS_NS`` and the ``canary_latency`` hook
hands the sums over. Its buckets are the stall histogram's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from probe.base import Health
from probe.canary import LATENCY_BUCKETS_NS
from probe.durations import seconds_label
from probe.events import KNOWN_KINDS, Event

#: The Content-Type of ``AgentMetrics.render()`` (the Prometheus text format 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

_MS = 1_000_000
_S = 1_000_000_000

#: Stall histogram bounds in ns: 1, 2, 5 per decade from 1 ms to 200 s, then 300 s.
STALL_BUCKETS_NS: tuple[int, ...] = (
    *(m * 10**e * _MS for e in range(5) for m in (1, 2, 5)),
    100 * _S,
    200 * _S,
    300 * _S,
)

DEFAULT_CLOCKS = ("realtime", "boottime")
DEFAULT_TIMEOUTS_NS = (10 * _MS, 100 * _MS, _S, 5 * _S, 30 * _S)
#: Probe sources of the built-in probes, as ``tsprobe_probe_up`` labels.
DEFAULT_PROBES = ("stall", "clock", "adjtimex", "ptp", "kmsg")
#: Warning kinds used when probe.kmsg_patterns does not supply its own.
DEFAULT_WARNING_KINDS = ("soft_lockup", "rcu_stall", "hung_task", "clocksource_unstable")


@dataclass(frozen=True)
class SyncReading:
    """The kernel's clock discipline as adjtimex reports it.

    :param synchronised: False when the kernel says the clock is unsynchronised.
    :param maxerror_ns: the kernel's maximum error estimate, when known.
    """

    synchronised: bool
    maxerror_ns: int | None = None


def _none() -> None:
    return None


def _no_health() -> Mapping[str, Health]:
    return {}


def _no_latency() -> Mapping[str, Any]:
    return {}


@dataclass
class ScrapeHooks:
    """What the collector asks at each scrape; each hook may raise or return "unknown".

    :param health: every probe source's health, keyed by ``probe`` label.
    :param samples: sampler iterations per CPU (the stall probe).
    :param host_offset_ns: guest minus host realtime, or None (the clock probe, ptp).
    :param sync: adjtimex's view, or None (the clock probe).
    :param clocksource: the current clocksource name, or None.
    :param kmsg_lost: kernel messages the kmsg reader lost.
    :param log_stats: the event log's counters: an object with ``dropped`` and
        ``spool_errors``.
    :param canary_latency: per canary, its latency histogram: an object with ``counts``
        (per-bucket counts over ``LATENCY_BUCKETS_NS``, not cumulative, then the count
        above every bound) and ``sum_ns``.
    """

    health: Callable[[], Mapping[str, Health]] = _no_health
    samples: Callable[[], Mapping[int, int] | None] = _none
    host_offset_ns: Callable[[], int | None] = _none
    sync: Callable[[], SyncReading | None] = _none
    clocksource: Callable[[], str | None] = _none
    kmsg_lost: Callable[[], int | None] = _none
    log_stats: Callable[[], Any] = _none
    canary_latency: Callable[[], Mapping[str, Any]] = _no_latency


#: Which ``probe`` label goes down when a hook fails.
_HOOK_PROBE = {
    "samples": "stall",
    "host_offset_ns": "ptp",
    "sync": "adjtimex",
    "clocksource": "clock",
    "kmsg_lost": "kmsg",
}


@dataclass
class _Stalls:
    buckets: list[int]
    count: int = 0
    sum_ns: int = 0
    longest_ns: int = 0


@dataclass
class _State:
    """Everything derived from events; copied under the lock for each scrape."""

    stalls: dict[str, _Stalls] = field(default_factory=dict)
    outages: dict[str, int] = field(default_factory=dict)
    outage_ns: dict[str, int] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    last_step_ns: dict[str, int] = field(default_factory=dict)
    clocksource_changes: int = 0
    timeouts: dict[tuple[str, str], int] = field(default_factory=dict)
    app_timeouts: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


class AgentMetrics:
    """The collector behind ``/metrics``.

    :param cpus: the sampled CPUs (``cpu`` label universe).
    :param clocks: the ``clock`` label universe.
    :param warning_kinds: the ``kind`` universe of kernel warnings.
    :param probes: the ``probe`` universe of ``tsprobe_probe_up``.
    :param canaries: the ``canary`` universe (empty when no canary runs).
    :param timeouts_ns: the timeout ladder (``timeout`` label universe).
    :param app_timeout_names: the ``name`` universe of ``tsprobe_app_timeouts_total``.
    :param event_kinds: the ``kind`` universe of ``tsprobe_events_total``.
    :param info: labels of ``tsprobe_info`` besides ``clocksource`` (version, boot_id, ...).
    :param start_time_s: the agent's start, Unix seconds.
    :param hooks: scrape-time readings.
    """

    def __init__(
        self,
        cpus: Sequence[int],
        clocks: Sequence[str] = DEFAULT_CLOCKS,
        warning_kinds: Sequence[str] = DEFAULT_WARNING_KINDS,
        probes: Sequence[str] = DEFAULT_PROBES,
        canaries: Sequence[str] = (),
        timeouts_ns: Sequence[int] = DEFAULT_TIMEOUTS_NS,
        app_timeout_names: Sequence[str] = (),
        event_kinds: Sequence[str] = tuple(sorted(KNOWN_KINDS)),
        info: Mapping[str, str] | None = None,
        start_time_s: float = 0.0,
        hooks: ScrapeHooks | None = None,
    ) -> None:
        self._probes = list(dict.fromkeys(probes))
        self._info = dict(info or {})
        self._start_time_s = start_time_s
        self.hooks = hooks or ScrapeHooks()
        self._lock = threading.Lock()
        self._render_lock = threading.Lock()
        self._rendered: tuple[int, bytes] | None = None  # (start, body) of the last one
        self.renders = 0  # renderings done (coalesced requests do not count)
        self._samples: dict[str, int] = {}
        self._kmsg_lost = 0
        self._canaries = list(dict.fromkeys(canaries))
        self._latency: dict[str, tuple[list[int], int]] = {}
        self._state = _State()
        state = self._state
        for cpu in sorted(set(cpus)):
            label = str(cpu)
            state.stalls[label] = _Stalls([0] * len(STALL_BUCKETS_NS))
            state.outages[label] = 0
            state.outage_ns[label] = 0
            self._samples[label] = 0
        for clock in clocks:
            state.steps[clock] = 0
            state.last_step_ns[clock] = 0
        for canary in canaries:
            for timeout in sorted(set(timeouts_ns)):
                state.timeouts[(canary, seconds_label(timeout))] = 0
        for name in app_timeout_names:
            state.app_timeouts[name] = 0
        for kind in warning_kinds:
            state.warnings[kind] = 0
        for kind in event_kinds:
            state.kinds[kind] = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- events ---------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """Count one event (an ``EventLog`` listener).

        :param event: the event; unknown kinds and malformed fields are counted only in
            ``tsprobe_events_total``.
        """
        with self._lock:
            state = self._state
            state.kinds[event.kind] = state.kinds.get(event.kind, 0) + 1
            handler = _HANDLERS.get(event.kind)
            if handler is not None:
                handler(state, event)

    # -- scrape ---------------------------------------------------------------------

    def _read(self, name: str, down: dict[str, str]) -> Any:
        try:
            return getattr(self.hooks, name)()
        except Exception as err:
            probe = _HOOK_PROBE.get(name)
            if probe is not None:
                down.setdefault(probe, f"reading {name} failed: {err!r}")
            return None

    def collect(self) -> Iterator[Metric]:
        """Build every metric family from a fresh snapshot (the collector protocol).

        :return: the families, in a fixed order.
        """
        down: dict[str, str] = {}
        health: Mapping[str, Health] = self._read("health", down) or {}
        samples = self._read("samples", down)
        offset = _int_or_none(self._read("host_offset_ns", down))
        sync = self._read("sync", down)
        clocksource = self._read("clocksource", down)
        kmsg_lost = _int_or_none(self._read("kmsg_lost", down))
        log_stats = self._read("log_stats", down)
        latency = self._read("canary_latency", down)
        with self._lock:
            if isinstance(samples, Mapping):
                for cpu, count in samples.items():
                    value = _int_or_none(count)
                    if value is not None:
                        label = str(cpu)
                        self._samples[label] = max(self._samples.get(label, 0), value)
            if kmsg_lost is not None:
                self._kmsg_lost = max(self._kmsg_lost, kmsg_lost)
            if isinstance(latency, Mapping):
                self._take_latency(latency)
            latency_now = dict(self._latency)
            state = _copy_state(self._state)
            samples_now = dict(self._samples)
            kmsg_now = self._kmsg_lost
        yield from self._stall_families(state, samples_now)
        yield from self._clock_families(state, offset, sync)
        yield from self._warning_families(state, kmsg_now, latency_now)
        yield self._probe_up(health, down)
        yield from self._event_families(state, log_stats)
        yield from self._agent_families(clocksource)

    def _stall_families(self, state: _State, samples: Mapping[str, int]) -> Iterator[Metric]:
        hist = HistogramMetricFamily(
            "tsprobe_cpu_stall_seconds",
            "Gaps in a CPU's sampler longer than the threshold, one observation per gap.",
            labels=["cpu"],
        )
        longest = GaugeMetricFamily(
            "tsprobe_cpu_stall_longest_seconds",
            "The longest stall on the CPU since the agent started.",
            labels=["cpu"],
        )
        for cpu in _cpu_order(state.stalls):
            stalls = state.stalls[cpu]
            buckets: list[tuple[str, float]] = []
            running = 0
            for bound, count in zip(STALL_BUCKETS_NS, stalls.buckets, strict=True):
                running += count
                buckets.append((seconds_label(bound), running))
            buckets.append(("+Inf", stalls.count))
            hist.add_metric([cpu], buckets, stalls.sum_ns / _S)
            longest.add_metric([cpu], stalls.longest_ns / _S)
        yield hist
        yield longest
        yield _counter(
            "tsprobe_cpu_samples_total",
            "Sampler iterations on the CPU (liveness of the stall probe).",
            "cpu",
            {cpu: samples.get(cpu, 0) for cpu in _cpu_order([*samples, *state.stalls])},
        )
        yield _counter(
            "tsprobe_sampler_outages_total",
            "Times the CPU's sampler was not running (restarted, killed, not scheduled).",
            "cpu",
            {cpu: state.outages[cpu] for cpu in _cpu_order(state.outages)},
        )
        yield _counter(
            "tsprobe_sampler_outage_seconds_total",
            "Time the CPU's sampler was not running, summed over its outages.",
            "cpu",
            {cpu: state.outage_ns[cpu] / _S for cpu in _cpu_order(state.outage_ns)},
        )

    def _clock_families(self, state: _State, offset_ns: int | None, sync: Any) -> Iterator[Metric]:
        yield _counter(
            "tsprobe_clock_steps_total",
            "Steps of the clock against CLOCK_MONOTONIC.",
            "clock",
            state.steps,
        )
        yield _gauge(
            "tsprobe_clock_last_step_seconds",
            "Signed size of the clock's last step (0 before any).",
            "clock",
            {clock: ns / _S for clock, ns in state.last_step_ns.items()},
        )
        yield CounterMetricFamily(
            "tsprobe_clocksource_changes_total",
            "Changes of the kernel's current clocksource.",
            value=state.clocksource_changes,
        )
        offset = GaugeMetricFamily(
            "tsprobe_clock_host_offset_seconds",
            "Guest realtime minus host realtime via ptp_kvm; no sample when unavailable.",
        )
        if offset_ns is not None:
            offset.add_metric([], offset_ns / _S)
        yield offset
        synced = GaugeMetricFamily(
            "tsprobe_clock_sync_synchronised",
            "1 when adjtimex reports the clock synchronised, 0 when not; no sample if unknown.",
        )
        maxerror = GaugeMetricFamily(
            "tsprobe_clock_sync_maxerror_seconds",
            "adjtimex's maximum error estimate; no sample if unknown.",
        )
        if isinstance(sync, SyncReading):
            synced.add_metric([], 1.0 if sync.synchronised else 0.0)
            if sync.maxerror_ns is not None:
                maxerror.add_metric([], sync.maxerror_ns / _S)
        yield synced
        yield maxerror

    def _take_latency(self, latency: Mapping[str, Any]) -> None:
        """Keep each canary's newest histogram (lock held); malformed ones are skipped."""
        size = len(LATENCY_BUCKETS_NS) + 1
        for canary, snapshot in latency.items():
            counts = getattr(snapshot, "counts", None)
            total = _int_or_none(getattr(snapshot, "sum_ns", None))
            if not isinstance(counts, Sequence) or len(counts) != size or total is None:
                continue
            values = [_int_or_none(value) for value in counts]
            if any(value is None or value < 0 for value in values):
                continue
            self._latency[str(canary)] = ([int(value or 0) for value in values], total)

    def _warning_families(
        self, state: _State, kmsg_lost: int, latency: Mapping[str, tuple[list[int], int]]
    ) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "tsprobe_timeout_expirations_total",
            "Canary waits that outlived a timeout of the ladder (timeout in seconds).",
            labels=["canary", "timeout"],
        )
        for (canary, timeout), count in sorted(
            state.timeouts.items(), key=lambda item: (item[0][0], float(item[0][1]))
        ):
            family.add_metric([canary, timeout], count)
        yield family
        hist = HistogramMetricFamily(
            "tsprobe_canary_latency_seconds",
            "Each canary measurement: timer: how late a timed wait woke; heartbeat: the"
            " silence between two heartbeats of the peer; rpc: a request's round trip.",
            labels=["canary"],
        )
        size = len(LATENCY_BUCKETS_NS) + 1
        for canary in [*self._canaries, *sorted(set(latency) - set(self._canaries))]:
            counts, total = latency.get(canary, ([0] * size, 0))
            buckets: list[tuple[str, float]] = []
            running = 0
            for bound, count in zip(LATENCY_BUCKETS_NS, counts, strict=False):
                running += count
                buckets.append((seconds_label(bound), running))
            buckets.append(("+Inf", running + counts[-1]))
            hist.add_metric([canary], buckets, total / _S)
        yield hist
        yield _counter(
            "tsprobe_app_timeouts_total",
            "Application log lines matching a --watch-log pattern, by its name.",
            "name",
            state.app_timeouts,
        )
        yield _counter(
            "tsprobe_kernel_warnings_total",
            "Kernel warnings read from /dev/kmsg, by kind.",
            "kind",
            state.warnings,
        )
        yield CounterMetricFamily(
            "tsprobe_kmsg_lost_total",
            "Kernel messages overwritten before the agent read them.",
            value=kmsg_lost,
        )

    def _probe_up(self, health: Mapping[str, Health], down: Mapping[str, str]) -> Metric:
        family = GaugeMetricFamily(
            "tsprobe_probe_up",
            "1 while a probe's source works, 0 when it failed, is disabled or has no data.",
            labels=["probe"],
        )
        names = self._probes + sorted(set(health) - set(self._probes))
        for name in names:
            entry = health.get(name)
            up = isinstance(entry, Health) and entry.up and name not in down
            family.add_metric([name], 1.0 if up else 0.0)
        return family

    def _event_families(self, state: _State, log_stats: Any) -> Iterator[Metric]:
        yield _counter(
            "tsprobe_events_total",
            "Events appended to the event log, by kind.",
            "kind",
            state.kinds,
        )
        dropped = _int_or_none(getattr(log_stats, "dropped", 0)) or 0
        spool_errors = _int_or_none(getattr(log_stats, "spool_errors", 0)) or 0
        yield CounterMetricFamily(
            "tsprobe_events_dropped_total",
            "Events lost to a full buffer: evicted from the /events ring before any client "
            "fetched them, or lost at intake.",
            value=dropped,
        )
        yield CounterMetricFamily(
            "tsprobe_events_spool_errors_total",
            "Failed event spool operations (records kept in memory only, failed rotations).",
            value=spool_errors,
        )

    def _agent_families(self, clocksource: Any) -> Iterator[Metric]:
        labels = dict(self._info)
        labels["clocksource"] = clocksource if isinstance(clocksource, str) else ""
        info = GaugeMetricFamily(
            "tsprobe_info", "Agent version and the guest it runs in; always 1.", labels=list(labels)
        )
        info.add_metric(list(labels.values()), 1.0)
        yield info
        yield GaugeMetricFamily(
            "tsprobe_agent_start_time_seconds",
            "When the agent started, seconds since the Unix epoch.",
            value=self._start_time_s,
        )

    def render(self) -> bytes:
        """The whole exposition in the Prometheus text format (``CONTENT_TYPE``).

        Concurrent calls are coalesced (see the module docstring).

        :return: the body of a /metrics response.
        """
        arrived = time.monotonic_ns()
        with self._render_lock:
            last = self._rendered
            if last is not None and last[0] >= arrived:
                return last[1]
            started = time.monotonic_ns()
            body = bytes(generate_latest(self.registry))
            self._rendered = (started, body)
            self.renders += 1
            return body


# -- event handlers -----------------------------------------------------------------------


def _on_stall(state: _State, event: Event) -> None:
    cpu = _int_or_none(event.get("cpu"))
    duration = event.duration_ns
    if cpu is None or duration is None or duration < 0:
        return
    label = str(cpu)
    stalls = state.stalls.get(label)
    if stalls is None:
        stalls = state.stalls[label] = _Stalls([0] * len(STALL_BUCKETS_NS))
    for index, bound in enumerate(STALL_BUCKETS_NS):
        if duration <= bound:
            stalls.buckets[index] += 1
            break
    stalls.count += 1
    stalls.sum_ns += duration
    stalls.longest_ns = max(stalls.longest_ns, duration)


def _on_outage(state: _State, event: Event) -> None:
    cpu = _int_or_none(event.get("cpu"))
    if cpu is None:
        return
    label = str(cpu)
    state.outages[label] = state.outages.get(label, 0) + 1
    state.outage_ns[label] = state.outage_ns.get(label, 0) + max(0, event.duration_ns or 0)


def _on_clock_step(state: _State, event: Event) -> None:
    clock = event.get("clock")
    step = _int_or_none(event.get("step_ns"))
    if not isinstance(clock, str) or step is None:
        return
    state.steps[clock] = state.steps.get(clock, 0) + 1
    state.last_step_ns[clock] = step


def _on_clocksource_change(state: _State, event: Event) -> None:
    state.clocksource_changes += 1


def _on_timeout(state: _State, event: Event) -> None:
    canary = event.get("canary")
    timeout = _int_or_none(event.get("timeout_ns"))
    if not isinstance(canary, str) or timeout is None or timeout <= 0:
        return
    key = (canary, seconds_label(timeout))
    state.timeouts[key] = state.timeouts.get(key, 0) + 1


def _on_app_timeout(state: _State, event: Event) -> None:
    name = event.get("name")
    count = _int_or_none(event.get("count"))
    if isinstance(name, str) and count is not None and count > 0:
        state.app_timeouts[name] = state.app_timeouts.get(name, 0) + count


def _on_kernel_warning(state: _State, event: Event) -> None:
    kind = event.get("warning")
    if isinstance(kind, str) and kind:
        state.warnings[kind] = state.warnings.get(kind, 0) + 1


_HANDLERS: dict[str, Callable[[_State, Event], None]] = {
    "stall": _on_stall,
    "sampler_outage": _on_outage,
    "clock_step": _on_clock_step,
    "clocksource_change": _on_clocksource_change,
    "timeout": _on_timeout,
    "app_timeout": _on_app_timeout,
    "kernel_warning": _on_kernel_warning,
}


# -- helpers -------------------------------------------------------------------------------


def _copy_state(state: _State) -> _State:
    return _State(
        stalls={
            cpu: _Stalls(list(s.buckets), s.count, s.sum_ns, s.longest_ns)
            for cpu, s in state.stalls.items()
        },
        outages=dict(state.outages),
        outage_ns=dict(state.outage_ns),
        steps=dict(state.steps),
        last_step_ns=dict(state.last_step_ns),
        clocksource_changes=state.clocksource_changes,
        timeouts=dict(state.timeouts),
        app_timeouts=dict(state.app_timeouts),
        warnings=dict(state.warnings),
        kinds=dict(state.kinds),
    )


def _cpu_order(labels: Iterable[str]) -> list[str]:
    """CPU labels in numeric order."""
    return sorted(set(labels), key=lambda label: (len(label), label))


def _counter(name: str, doc: str, label: str, values: Mapping[str, float]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def _gauge(name: str, doc: str, label: str, values: Mapping[str, float]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family
