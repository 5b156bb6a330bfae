r"""The application-timeout canaries as probes: supervised workers whose lines become events.

Three canaries, each named after itself (the ``probe`` label of ``tsprobe_probe_up`` and
the ``canary`` label of the timeout metrics); their workers are described in their own
modules, the ladder rule in ``probe.canary``:

``timer`` (``TimerCanary``)
    one ``probe.canary_timer`` process per CPU: timed waits whose deadlines fire late.
``heartbeat``
    rides the stall samplers (``agent.samplers``, ``probe.canary_heartbeat``): each CPU's
    sampler beats on a shared board and declares its peer dead when it falls silent; no
    process of its own.
``rpc`` (``RpcCanary``)
    one ``probe.canary_rpc`` server and client on the first and last CPU, over loopback
    TCP; the agent binds the listening socket on a free port.

The timer and rpc canaries are ``agent.workers.Supervisor``\ s: a unit (a CPU's timer, the
rpc client and server) is started, read and restarted as one. What the probe adds (the
stall probe does the same for the heartbeat's lines, with ``timeout_event`` and
``Histograms``):

- each ``timeout`` line (one per expired timeout of a measurement, ``probe.canary``)
  becomes a ``timeout`` event: the worker's ``mono_ns`` (when the deadline fell due),
  ``real_ns`` and ``duration_ns`` (how late), then the fields ``canary`` and the worker's
  own (``timeout_ns``, ``cpu``, ...); the agent's metrics count one expiration per event;
- each ``life`` line carries the worker's latency histogram (``probe.canary.Latency``
  counts); ``latency()`` sums them over the probe's processes, keeping the counts of dead
  processes, for ``tsprobe_canary_latency_seconds{canary}``;
- a unit that died and was replaced gives one ``canary_outage`` event (the window in
  which the canary measured nothing): ``mono_ns``/``real_ns`` at its last sign of life,
  ``duration_ns`` until the replacement ran, fields ``canary``, ``cpus``, ``reason``,
  ``detail``, ``attempts``.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.workers import Launch, Outage, Supervisor, Unit, worker_command
from probe.base import Health
from probe.canary import DEFAULT_LADDER_NS, LATENCY_BUCKETS_NS
from probe.canary_rpc import DEFAULT_INTERVAL_NS as DEFAULT_RPC_INTERVAL_NS
from probe.canary_timer import DEFAULT_WAIT_NS
from probe.events import RawEvent
from probe.procfs import format_cpu_list

__all__ = [
    "DEFAULT_RPC_INTERVAL_NS",
    "DEFAULT_WAIT_NS",
    "CanaryProbe",
    "Histograms",
    "LatencySnapshot",
    "RpcCanary",
    "TimerCanary",
    "heartbeat_pairs",
    "timeout_event",
]

#: Worker fields that are not copied into a ``timeout`` event's kind-specific fields.
_BASE = frozenset({"t", "mono_ns", "real_ns", "duration_ns", "pid"})


@dataclass(frozen=True)
class LatencySnapshot:
    """A canary's latency histogram: per-bucket counts over ``LATENCY_BUCKETS_NS`` (not
    cumulative; the last entry counts values above every bound) and the sum.
    """

    counts: tuple[int, ...]
    sum_ns: int

    @property
    def count(self) -> int:
        """How many measurements."""
        return sum(self.counts)


def heartbeat_pairs(cpus: Sequence[int]) -> list[tuple[int, int]]:
    """Pair up CPUs for heartbeat pairs: neighbours, the odd one out with the first.

    :param cpus: the CPUs, any order.
    :raise ValueError: on an empty list.
    :return: ``[(0, 1), (2, 3), (4, 0)]`` for CPUs 0-4; ``[(0, 0)]`` for CPU 0 alone.
    """
    ordered = sorted(set(cpus))
    if not ordered:
        raise ValueError("no CPUs to pair")
    if len(ordered) == 1:
        return [(ordered[0], ordered[0])]
    pairs = [(ordered[i], ordered[i + 1]) for i in range(0, len(ordered) - 1, 2)]
    if len(ordered) % 2:
        pairs.append((ordered[-1], ordered[0]))
    return pairs


class Histograms:
    """A unit's latency histograms: each live process's newest, and the dead ones' total."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[list[int], int]] = {}  # pid -> (counts, sum_ns)
        self.base_counts = [0] * (len(LATENCY_BUCKETS_NS) + 1)
        self.base_sum = 0

    def take(self, msg: dict[str, Any]) -> None:
        """Keep a ``life`` line's histogram (``h``, ``hsum``) for its ``pid``."""
        self.live[int(msg["pid"])] = ([int(value) for value in msg["h"]], int(msg["hsum"]))

    def retire(self) -> None:
        """The processes died: add their counts to the total."""
        for counts, sum_ns in self.live.values():
            for index, value in enumerate(counts[: len(self.base_counts)]):
                self.base_counts[index] += value
            self.base_sum += sum_ns
        self.live = {}

    def add_to(self, counts: list[int]) -> int:
        """Add every count to ``counts``; return the sum."""
        total = 0
        for unit_counts, unit_sum in [(self.base_counts, self.base_sum), *self.live.values()]:
            for index, value in enumerate(unit_counts[: len(counts)]):
                counts[index] += value
            total += unit_sum
        return total


def snapshot(histograms: Sequence[Histograms]) -> LatencySnapshot:
    """The sum of several units' histograms."""
    counts = [0] * (len(LATENCY_BUCKETS_NS) + 1)
    total = sum(h.add_to(counts) for h in histograms)
    return LatencySnapshot(tuple(counts), total)


def timeout_event(canary: str, msg: dict[str, Any]) -> RawEvent:
    """A worker's ``timeout`` line as a ``timeout`` event of ``canary``.

    :raise ValueError: without a positive ``timeout_ns`` (the supervisor counts the line
        as malformed).
    """
    mono, real = int(msg["mono_ns"]), int(msg["real_ns"])
    duration = int(msg["duration_ns"])
    fields: dict[str, Any] = {"canary": canary}
    fields.update((key, value) for key, value in msg.items() if key not in _BASE)
    timeout = fields.get("timeout_ns")
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError("timeout line without a positive 'timeout_ns'")
    return RawEvent("timeout", mono, real, duration, fields)


class _CanaryUnit(Unit):
    """One canary unit and its processes' histograms."""

    def __init__(self, key: Any, label: str, cpus: Sequence[int]) -> None:
        super().__init__(key, label, cpus)
        self.hist = Histograms()


class CanaryProbe(Supervisor[_CanaryUnit]):
    """What every canary shares (see the module docstring); subclasses say what to start.

    :param units: the units.
    :param timeouts_ns: the timeout ladder.
    :param python: the interpreter that runs the workers.
    :raise ValueError: on an empty or non-positive ladder.
    """

    noun = "canary"

    def __init__(
        self,
        units: Sequence[_CanaryUnit],
        timeouts_ns: Sequence[int] = DEFAULT_LADDER_NS,
        python: str = sys.executable,
    ) -> None:
        ladder = sorted(set(timeouts_ns))
        if not ladder or ladder[0] <= 0:
            raise ValueError(f"{self.name} canary: the timeout ladder must be positive")
        self.timeouts_ns = ladder
        self.python = python
        super().__init__(units)

    def ladder_arg(self) -> list[str]:
        """The ``--timeouts-ns`` argument of every worker."""
        return ["--timeouts-ns", ",".join(str(t) for t in self.timeouts_ns)]

    # -- the Probe protocol ------------------------------------------------------------

    def health(self) -> Mapping[str, Health]:
        """Whether every unit runs and has shown life lately.

        :return: ``{NAME: Health}``; when down, the detail names each unit and why.
        """
        problems = self.problems()
        if problems:
            return {self.name: Health(False, "; ".join(problems))}
        return {self.name: Health(True)}

    # -- views for the agent ------------------------------------------------------------

    def latency(self) -> LatencySnapshot:
        """The latency histogram over all of this canary's processes since it started.

        :return: the counts and sum; updated about once a second per process.
        """
        with self.locked():
            return snapshot([unit.hist for unit in self.units().values()])

    # -- the supervisor's hooks ---------------------------------------------------------

    def on_died(self, unit: _CanaryUnit) -> None:
        unit.hist.retire()

    def on_message(self, unit: _CanaryUnit, msg: dict[str, Any]) -> list[RawEvent]:
        kind = msg.get("t")
        if kind == "life":
            unit.hist.take(msg)
        elif kind == "timeout":
            return [timeout_event(self.name, msg)]
        return []

    def outage_event(
        self, unit: _CanaryUnit, outage: Outage, attempts: int, mono_ns: int
    ) -> RawEvent | None:
        life_mono, life_real = outage.life
        fields = {
            "canary": self.name,
            "cpus": list(unit.cpus),
            "reason": outage.reason,
            "detail": outage.detail,
            "attempts": attempts,
        }
        return RawEvent("canary_outage", life_mono, life_real, mono_ns - life_mono, fields)


class TimerCanary(CanaryProbe):
    """One ``probe.canary_timer`` per CPU (``name = "timer"``).

    :param cpus: the CPUs.
    :param timeouts_ns: the timeout ladder.
    :param wait_ns: the length of each timed wait.
    :param python: the interpreter that runs the workers.
    :raise ValueError: on no CPUs, a non-positive wait or ladder.
    """

    name = "timer"

    def __init__(
        self,
        cpus: Sequence[int],
        timeouts_ns: Sequence[int] = DEFAULT_LADDER_NS,
        wait_ns: int = DEFAULT_WAIT_NS,
        python: str = sys.executable,
    ) -> None:
        if not cpus:
            raise ValueError("timer canary: no CPUs")
        if wait_ns <= 0:
            raise ValueError("timer canary: the wait must be positive")
        self.wait_ns = wait_ns
        units = [_CanaryUnit(cpu, f"cpu {cpu}", (cpu,)) for cpu in sorted(set(cpus))]
        super().__init__(units, timeouts_ns, python)

    def launch(self, unit: _CanaryUnit) -> Launch:
        args = ["--cpu", str(unit.cpus[0]), "--wait-ns", str(self.wait_ns), *self.ladder_arg()]
        return Launch([worker_command("probe.canary_timer", args, self.python)])


class RpcCanary(CanaryProbe):
    """A ``probe.canary_rpc`` client and server over loopback TCP (``name = "rpc"``).

    :param cpus: the CPUs; the client runs on the first, the server on the last.
    :param timeouts_ns: the timeout ladder (the deadlines of the requests).
    :param interval_ns: the time between two requests' starts.
    :param python: the interpreter that runs the workers.
    :raise ValueError: on no CPUs, a non-positive interval or ladder.
    """

    name = "rpc"

    def __init__(
        self,
        cpus: Sequence[int],
        timeouts_ns: Sequence[int] = DEFAULT_LADDER_NS,
        interval_ns: int = DEFAULT_RPC_INTERVAL_NS,
        python: str = sys.executable,
    ) -> None:
        if not cpus:
            raise ValueError("rpc canary: no CPUs")
        if interval_ns <= 0:
            raise ValueError("rpc canary: the interval must be positive")
        self.interval_ns = interval_ns
        ordered = sorted(set(cpus))
        self.client_cpu, self.server_cpu = ordered[0], ordered[-1]
        pair = (self.client_cpu, self.server_cpu)
        label = f"cpus {format_cpu_list(sorted(set(pair)))}"
        super().__init__([_CanaryUnit(pair, label, pair)], timeouts_ns, python)

    def launch(self, unit: _CanaryUnit) -> Launch:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(4)
            port = int(listener.getsockname()[1])
        except OSError:
            listener.close()
            raise
        fd = listener.detach()
        server = worker_command(
            "probe.canary_rpc",
            ["--role", "server", "--cpu", str(self.server_cpu), "--fd", str(fd)],
            self.python,
        )
        client = worker_command(
            "probe.canary_rpc",
            [
                "--role",
                "client",
                "--cpu",
                str(self.client_cpu),
                "--server-cpu",
                str(self.server_cpu),
                "--port",
                str(port),
                "--interval-ns",
                str(self.interval_ns),
                *self.ladder_arg(),
            ],
            self.python,
        )
        return Launch([server, client], pass_fds=[(fd,), ()], close_fds=(fd,))
