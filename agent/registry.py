"""The agent's built-in probes, each registered once: its name, how it is switched on, its
options, its factory, the ``probe`` labels it reports and the readings /metrics asks it.

A probe's option lives in its entry only. ``agent.cli`` generates the flags from
``PROBES``: a probe switched by flag gets ``--NAME/--no-NAME``, each ``Option`` its
``--FLAG`` (a duration typed as users write it, a switch as ``--FLAG/--no-FLAG``, a choice);
``AgentConfig.option(key)`` answers the value (the entry's default when unset) and
``AgentConfig.to_dict`` writes every option under its ``key`` in the ``agent_start`` event.
The canaries are switched on by name in ``--canaries``, the log watcher by ``--watch-log``.

A factory imports its probe's module only when the probe is enabled, so a missing module
is a probe reported down, not an agent that cannot start (node_exporter registers each
collector with its flags beside it the same way). ``hooks`` name the probe's methods that
``/metrics`` reads at each scrape (``agent.metrics.ScrapeHooks`` field -> method).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from probe.base import Probe
from probe.durations import parse_duration
from probe.roots import Roots

if TYPE_CHECKING:
    from agent.config import AgentConfig

#: The probe name of the log watcher (``--watch-log``).
LOGWATCH = "logwatch"


@dataclass(frozen=True)
class Option:
    """One option of one probe.

    :param flag: the flag without its dashes (``clock-period``).
    :param kind: ``duration`` (a value in ns, typed ``10ms``), ``switch`` or ``choice``.
    :param default: as typed on the command line (``"10ms"``), or a bool for a switch.
    :param choices: a choice's values.
    """

    flag: str
    kind: Literal["duration", "switch", "choice"]
    default: str | bool
    help: str
    choices: tuple[str, ...] = ()

    @property
    def param(self) -> str:
        """The command line's parameter name (``clock_period``)."""
        return self.flag.replace("-", "_")

    @property
    def key(self) -> str:
        """The configuration's key: the parameter, with ``_ns`` for a duration."""
        return self.param + "_ns" if self.kind == "duration" else self.param

    def default_value(self) -> Any:
        """The default as the configuration holds it (ns for a duration)."""
        if self.kind == "duration":
            return parse_duration(str(self.default))
        return self.default


Factory = Callable[["AgentConfig", Roots, list[int]], Probe]


@dataclass(frozen=True)
class ProbeSpec:
    """A built-in probe.

    :param switch: ``flag`` (``--NAME/--no-NAME``, on by default), ``canary`` (listed in
        --canaries) or ``log`` (on when --watch-log is given).
    :param sources: the ``probe`` labels its ``health()`` reports (default: its name).
    :param hooks: ScrapeHooks field -> the probe's method that answers it.
    :param rides: the probe that carries this one in its own workers (the heartbeat rides
        the stall samplers): no factory call of its own; the carrier's factory reads its
        options, its health and hooks come from the carrier.
    """

    name: str
    help: str
    switch: Literal["flag", "canary", "log"]
    build: Factory
    options: tuple[Option, ...] = ()
    sources: tuple[str, ...] = ()
    hooks: Mapping[str, str] = field(default_factory=dict)
    rides: str | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        """The ``probe`` labels of its health."""
        return self.sources or (self.name,)


def load(module: str, attr: str) -> Any:
    """``module.attr``, imported now."""
    return getattr(importlib.import_module(module), attr)


def _stall(config: AgentConfig, roots: Roots, cpus: list[int]) -> Probe:
    samplers = importlib.import_module("agent.samplers")
    heartbeat = None
    if config.enabled("heartbeat"):
        heartbeat = samplers.Heartbeat(config.option("heartbeat_interval_ns"), config.timeouts_ns)
    probe: Probe = samplers.StallProbe(
        cpus,
        config.interval_ns,
        config.threshold_ns,
        mode=config.option("stall_mode"),
        fifo=config.option("stall_fifo"),
        roots=roots,
        heartbeat=heartbeat,
    )
    return probe


def _clock(config: AgentConfig, roots: Roots, cpus: list[int]) -> Probe:
    probe: Probe = load("probe.clock", "ClockProbe")(
        period_ns=config.option("clock_period_ns"),
        step_threshold_ns=config.option("clock_step_threshold_ns"),
        roots=roots,
        ptp=config.option("clock_ptp"),
    )
    return probe


def _kmsg(config: AgentConfig, roots: Roots, cpus: list[int]) -> Probe:
    probe: Probe = load("probe.kmsg", "KmsgProbe")(roots=roots)
    return probe


def _timer(config: AgentConfig, roots: Roots, cpus: list[int]) -> Probe:
    probe: Probe = load("agent.canaries", "TimerCanary")(cpus, config.timeouts_ns)
    return probe


def _rpc(config: AgentConfig, roots: Roots, cpus: list[int]) -> Probe:
    probe: Probe = load("agent.canaries", "RpcCanary")(
        cpus, config.timeouts_ns, config.option("rpc_interval_ns")
    )
    return probe


def _logwatch(config: AgentConfig, roots: Roots, cpus: list[int]) -> Probe:
    parse_log_spec = load("probe.logwatch", "parse_log_spec")
    probe: Probe = load("probe.logwatch", "LogWatchProbe")(
        [parse_log_spec(text) for text in config.watch_logs]
    )
    return probe


#: The built-in probes, in start order (the canaries and the log watcher last).
PROBES: tuple[ProbeSpec, ...] = (
    ProbeSpec(
        "stall",
        "Per-CPU stall probe.",
        "flag",
        _stall,
        (
            Option(
                "stall-mode",
                "choice",
                "tick",
                "tick: sleeping loop; spin: busy loop (never at SCHED_FIFO).",
                ("tick", "spin"),
            ),
            Option("stall-fifo", "switch", True, "Run tick samplers at SCHED_FIFO when permitted."),
        ),
        hooks={"samples": "samples"},
    ),
    ProbeSpec(
        "clock",
        "Clock step probe.",
        "flag",
        _clock,
        (
            Option(
                "clock-period",
                "duration",
                "100ms",
                "How often the clocks are compared (a set of the realtime clock wakes the"
                " probe at once; 10ms at most without that timerfd).",
            ),
            Option("clock-step-threshold", "duration", "1ms", "Smallest clock step reported."),
            Option(
                "clock-ptp", "switch", True, "Read the host clock through ptp_kvm when present."
            ),
        ),
        sources=("clock", "adjtimex", "ptp"),
        hooks={
            "host_offset_ns": "host_offset_ns",
            "sync": "sync_state",
            "clocksource": "clocksource",
        },
    ),
    ProbeSpec("kmsg", "Kernel warning probe.", "flag", _kmsg, hooks={"kmsg_lost": "lost"}),
    ProbeSpec("timer", "Timed waits.", "canary", _timer, hooks={"canary_latency": "latency"}),
    ProbeSpec(
        "heartbeat",
        "Heartbeats between two CPUs.",
        "canary",
        _stall,
        (
            Option(
                "heartbeat-interval",
                "duration",
                "5ms",
                "Heartbeat canary: time between two heartbeats of a side.",
            ),
        ),
        hooks={"canary_latency": "heartbeat_latency"},
        rides="stall",
    ),
    ProbeSpec(
        "rpc",
        "Loopback requests.",
        "canary",
        _rpc,
        (
            Option(
                "rpc-interval",
                "duration",
                "10ms",
                "Rpc canary: time between the starts of two requests.",
            ),
        ),
        hooks={"canary_latency": "latency"},
    ),
    ProbeSpec(LOGWATCH, "Application log lines.", "log", _logwatch),
)

BY_NAME: dict[str, ProbeSpec] = {spec.name: spec for spec in PROBES}
OPTIONS: dict[str, Option] = {opt.key: opt for spec in PROBES for opt in spec.options}
