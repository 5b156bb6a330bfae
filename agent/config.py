"""What one agent runs with: ``AgentConfig``, and the CPUs it samples.

``AgentConfig`` is the agent's whole configuration in one frozen value (the command line's
options, checked by ``agent.cli``; tests build it directly): which probes and canaries
run, on which CPUs, at which interval and threshold, where events go and where /metrics
listens. Each probe's own options are in ``options``, keyed and defaulted by its entry in
``agent.registry`` (``option(key)``). ``enabled(probe)`` is the one answer to "does this
probe run".
``resolve_cpus`` turns ``--cpus`` (or all online CPUs, from the injected /sys root) into
the list the samplers are pinned to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ConfigError
from agent.eventlog import (
    DEFAULT_KEEP_SPOOLS,
    DEFAULT_MAX_SPOOL_BYTES,
    DEFAULT_RING_SIZE,
)
from agent.http import DEFAULT_LISTEN
from agent.metrics import (
    DEFAULT_TIMEOUTS_NS,
)
from agent.registry import BY_NAME, OPTIONS
from probe.canary import DEFAULT_CANARIES
from probe.procfs import format_cpu_list, read_online_cpus
from probe.roots import Roots


@dataclass(frozen=True)
class AgentConfig:
    """Every setting of ``tsprobe agent``; the field names follow the flags.

    :param cpus: CPUs to sample; None means every online CPU.
    :param interval_ns: the samplers' period (--interval).
    :param threshold_ns: the shortest gap recorded as a stall (--threshold).
    :param listen: the HTTP address (--listen).
    :param events_path: the spool file, or None for memory only (--events).
    :param timeouts_ns: the timeout ladder (--timeouts).
    :param canaries: requested canaries (--canaries); empty for none.
    :param watch_logs: ``PATH:REGEX[:NAME]`` specifications (--watch-log), as given.
    :param duration_ns: run this long, then exit; None runs until a signal (--duration).
    :param off: the probes switched off (``--no-stall``, ``--no-clock``, ``--no-kmsg``).
    :param options: the probes' own options by ``agent.registry.Option.key``
        (``clock_period_ns``); an option left out has its registered default.
    :param procfs: the proc root (--path.procfs).
    :param sysfs: the sys root (--path.sysfs).
    :param devfs: the dev root (--path.devfs).
    :param ring_size: events /events can serve (--events-ring).
    :param spool_max_bytes: spool size that triggers a rotation.
    :param spool_keep: rotated spool files kept.
    """

    cpus: tuple[int, ...] | None = None
    interval_ns: int = 1_000_000
    threshold_ns: int = 2_000_000
    listen: str = DEFAULT_LISTEN
    events_path: str | None = None
    timeouts_ns: tuple[int, ...] = DEFAULT_TIMEOUTS_NS
    canaries: tuple[str, ...] = DEFAULT_CANARIES
    watch_logs: tuple[str, ...] = ()
    duration_ns: int | None = None
    off: frozenset[str] = frozenset()
    options: dict[str, Any] = field(default_factory=dict)
    procfs: str = "/proc"
    sysfs: str = "/sys"
    devfs: str = "/dev"
    ring_size: int = DEFAULT_RING_SIZE
    spool_max_bytes: int = DEFAULT_MAX_SPOOL_BYTES
    spool_keep: int = DEFAULT_KEEP_SPOOLS

    def roots(self) -> Roots:
        """The filesystem roots the path flags name."""
        return Roots(self.procfs, self.sysfs, self.devfs)

    def enabled(self, probe: str) -> bool:
        """Whether the flags enable a probe.

        :param probe: a name of ``agent.registry.PROBES``.
        :return: a canary when listed in --canaries, the log watcher when --watch-log was
            given, another probe unless switched off (True for names not registered).
        """
        spec = BY_NAME.get(probe)
        if spec is not None and spec.switch == "canary":
            return probe in self.canaries
        if spec is not None and spec.switch == "log":
            return bool(self.watch_logs)
        return probe not in self.off

    def option(self, key: str) -> Any:
        """A probe's option (``clock_period_ns``): as set, else its registered default.

        :raise KeyError: for a key no probe registers.
        """
        if key in self.options:
            return self.options[key]
        return OPTIONS[key].default_value()

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values (for the ``agent_start`` event): the settings,
        each switched probe's state under its name and every option under its key."""
        out: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            if key not in ("off", "options"):
                out[key] = list(value) if isinstance(value, tuple) else value
        for name, spec in BY_NAME.items():
            if spec.switch == "flag":
                out[name] = name not in self.off
        out.update({key: self.option(key) for key in OPTIONS})
        return out


def online_cpus(roots: Roots) -> list[int]:
    """The online CPUs, from /sys/devices/system/cpu/online.

    :param roots: where /sys is.
    :raise ConfigError: when the file is unreadable or malformed.
    :return: the CPUs, ascending.
    """
    path = roots.sys_path("devices", "system", "cpu", "online")
    try:
        return read_online_cpus(roots)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the online CPUs from {path}: {err}") from err


def resolve_cpus(requested: Sequence[int] | None, roots: Roots) -> list[int]:
    """The CPUs to sample: the requested ones, which must be online, or every online CPU.

    :param requested: --cpus, or None for all online.
    :param roots: where /sys is.
    :raise ConfigError: when a requested CPU is not online, or /sys cannot say.
    :return: the CPUs, ascending.
    """
    online = online_cpus(roots)
    if requested is None:
        return online
    offline = sorted(set(requested) - set(online))
    if offline:
        raise ConfigError(
            f"--cpus: CPU {format_cpu_list(offline)} is not online"
            f" (online: {format_cpu_list(online)})"
        )
    return sorted(set(requested))
