"""The stall probe: one sampler process per CPU, supervised, their lines turned into events.

``StallProbe`` starts a ``probe.stall`` sampler for each CPU as a supervised worker
(``agent.workers``: forked from the fork server, never from the agent; one supervisor
thread per CPU; restarts with back-off). Each sampler pins itself to its CPU and writes
JSON lines on its stdout (the protocol is described in ``probe.stall``). The probe:

- turns each ``stall`` line into a ``RawEvent`` of kind ``stall`` (``mono_ns``/``real_ns``
  at the gap's start, ``duration_ns`` the gap; fields ``cpu``, ``cause``, ``run_delay_ns``,
  ``steal_ns``, ``mode``) and hands it to ``emit``;
- keeps the CPU's sample count (``samples()``), monotone across restarts;
- collects the degraded capabilities the sampler reports (``notes()``), e.g. SCHED_FIFO
  not permitted;
- when a sampler exits or is killed and its replacement runs (at once, or after a back-off
  when it keeps dying within 10 s of a start), emits one ``sampler_outage`` event:
  ``mono_ns``/``real_ns`` at the dead sampler's last sign of life (its last line, at most
  about a second old), ``duration_ns`` until the replacement ran, fields ``cpu``,
  ``reason`` (``killed by SIGKILL``, ``exit 1``), ``detail`` (its last diagnostic line, or
  ""), ``attempts``. An outage is never silence: it is an event, and ``health()`` reports
  it while it lasts.

With a heartbeat plan (``Heartbeat``: the ``heartbeat`` canary on), the samplers are the
heartbeat's members too (``probe.canary_heartbeat``): the probe makes the shared board (a
memfd, one slot per CPU, kept open while the probe runs and passed to every sampler it
starts), pairs the CPUs (``agent.canaries.heartbeat_pairs``: each side watches the other)
and turns the samplers' ``timeout`` lines into the heartbeat's ``timeout`` events and their
``life`` lines into its latency histogram (``heartbeat_latency()``); its health is the
``heartbeat`` label, up while every sampler runs and joined the board.

Stall events reach ``emit`` within about a second: a sampler sends its stall lines together
with its once-a-second heartbeat, because every wake-up of this process costs more than the
line it carries.

Each sampler is a small process (forked from a ``python -I -S``, see ``agent.workers``; its
CPU and memory cost: ``probe.stall``'s header, ``bench/agent_overhead``, docs/lab-notes.md);
if the agent dies, each sampler exits at its next write (within about a second).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.canaries import Histograms, LatencySnapshot, heartbeat_pairs, snapshot, timeout_event
from agent.workers import Launch, Outage, Supervisor, Unit, exit_reason, worker_command
from probe.base import Health
from probe.canary import DEFAULT_LADDER_NS
from probe.canary_heartbeat import DEFAULT_INTERVAL_NS, board_size
from probe.events import RawEvent
from probe.roots import DEFAULT_ROOTS, Roots

__all__ = ["Heartbeat", "StallProbe", "exit_reason"]


@dataclass(frozen=True)
class Heartbeat:
    """The heartbeat canary's settings, for the samplers that carry it.

    :param interval_ns: time between two heartbeats of a side (``--heartbeat-interval``),
        rounded to whole sampler intervals.
    :param timeouts_ns: the timeout ladder.
    """

    interval_ns: int = DEFAULT_INTERVAL_NS
    timeouts_ns: Sequence[int] = DEFAULT_LADDER_NS


class _Slot(Unit):
    """One CPU's sampler as the parent knows it (guarded by the supervisor's lock)."""

    def __init__(self, cpu: int) -> None:
        super().__init__(cpu, f"cpu {cpu}", (cpu,))
        self.cpu = cpu
        self.fifo: bool | None = None
        self.base_samples = 0  # samples of the samplers that died
        self.samples = 0  # samples of the current one
        self.member: bool | None = None  # joined the heartbeat board (status line)
        self.hist = Histograms()


class StallProbe(Supervisor[_Slot]):
    """Per-CPU stall samplers as one probe (``name = "stall"``).

    :param cpus: the CPUs to watch, one sampler each.
    :param interval_ns: the sampling interval (tick mode's timer period).
    :param threshold_ns: a gap longer than this is a stall.
    :param mode: ``tick`` (a periodic timer, cheap) or ``spin`` (a busy loop, one whole CPU
        per sampler).
    :param fifo: ask for SCHED_FIFO in tick mode; when refused, ``notes()`` says so and the
        samplers run at SCHED_OTHER.
    :param roots: where /proc is (a fixture tree in tests); passed to the samplers.
    :param heartbeat: carry the heartbeat canary (see the module docstring), or None.
    :param python: the interpreter that runs the samplers.
    :raise ValueError: on an empty CPU list, a non-positive time or ladder, an unknown mode.
    """

    name = "stall"
    noun = "sampler"

    def __init__(
        self,
        cpus: list[int],
        interval_ns: int = 1_000_000,
        threshold_ns: int = 2_000_000,
        mode: str = "tick",
        fifo: bool = True,
        roots: Roots = DEFAULT_ROOTS,
        heartbeat: Heartbeat | None = None,
        python: str = sys.executable,
    ) -> None:
        if not cpus:
            raise ValueError("StallProbe: no CPUs to watch")
        if heartbeat is not None and heartbeat.interval_ns <= 0:
            raise ValueError("heartbeat canary: the interval must be positive")
        if heartbeat is not None and (not heartbeat.timeouts_ns or min(heartbeat.timeouts_ns) <= 0):
            raise ValueError("heartbeat canary: the timeout ladder must be positive")
        if interval_ns <= 0 or threshold_ns <= 0:
            raise ValueError("StallProbe: interval and threshold must be positive")
        if mode not in ("tick", "spin"):
            raise ValueError(f"StallProbe: mode must be tick or spin, got {mode!r}")
        self.cpus = sorted(set(cpus))
        self.interval_ns = interval_ns
        self.threshold_ns = threshold_ns
        self.mode = mode
        self.fifo = fifo
        self.roots = roots
        self.python = python
        self.heartbeat = heartbeat
        self._board_fd = -1
        self._peers: dict[int, list[int]] = {cpu: [] for cpu in self.cpus}
        for a, b in heartbeat_pairs(self.cpus):
            self._peers[a].append(b)
            if b != a:
                self._peers[b].append(a)
        super().__init__([_Slot(cpu) for cpu in self.cpus])
        if heartbeat is not None and len(self.cpus) == 1:
            self._add_note(self.cpus[0], "one CPU only: the heartbeat has no peer to watch")

    # -- the Probe protocol ------------------------------------------------------------

    def health(self) -> Mapping[str, Health]:
        """Whether every sampler runs and has shown life lately.

        :return: ``{"stall": Health}``; when down, the detail names each CPU and why.
        """
        problems = self.problems()
        health = {"stall": Health(False, "; ".join(problems)) if problems else Health(True)}
        if self.heartbeat is not None:
            with self.locked():
                out = [s.label for s in self.units().values() if s.member is False]
            if out:
                problems = [*problems, f"{', '.join(out)}: not on the heartbeat board"]
            health["heartbeat"] = Health(False, "; ".join(problems)) if problems else Health(True)
        return health

    def heartbeat_latency(self) -> LatencySnapshot | None:
        """The heartbeat canary's latency histogram over every sampler since the start, or
        None when the samplers do not carry it."""
        if self.heartbeat is None:
            return None
        with self.locked():
            return snapshot([slot.hist for slot in self.units().values()])

    # -- extra views for the agent ------------------------------------------------------

    def samples(self) -> dict[int, int]:
        """Sampler iterations per CPU (tick mode: timer expirations), monotone across restarts.

        :return: CPU -> count; updated about once a second per CPU.
        """
        with self.locked():
            return {slot.cpu: slot.base_samples + slot.samples for slot in self.units().values()}

    def sampler_pids(self) -> dict[int, int]:
        """The process id of each CPU's current sampler.

        :return: CPU -> pid, for the CPUs whose sampler process exists.
        """
        with self.locked():
            return {
                slot.cpu: slot.procs[0].pid
                for slot in self.units().values()
                if slot.procs and slot.procs[0].returncode is None
            }

    # -- the supervisor's hooks --------------------------------------------------------

    def command(self, cpu: int) -> list[str]:
        """The command line of the sampler for ``cpu``.

        :param cpu: the CPU.
        :return: the argv list.
        """
        args = [
            "--cpu",
            str(cpu),
            "--interval-ns",
            str(self.interval_ns),
            "--threshold-ns",
            str(self.threshold_ns),
            "--mode",
            self.mode,
            "--fifo" if self.fifo else "--no-fifo",
        ]
        if os.path.abspath(self.roots.proc) != "/proc":
            args += ["--procfs", os.path.abspath(self.roots.proc)]
        if self.heartbeat is not None and self._board_fd >= 0:
            slot = self.cpus.index(cpu)
            args += [
                "--board-fd", str(self._board_fd),
                "--slots", str(len(self.cpus)),
                "--slot", str(slot),
                "--peers", ",".join(f"{self.cpus.index(p)}:{p}" for p in self._peers[cpu]),
                "--beat-ns", str(self.heartbeat.interval_ns),
                "--timeouts-ns", ",".join(str(t) for t in sorted(set(self.heartbeat.timeouts_ns))),
            ]  # fmt: skip
        return worker_command("probe.stall", args, self.python)

    def launch(self, unit: _Slot) -> Launch:
        if self.heartbeat is not None and self._board_fd < 0:
            fd = os.memfd_create("tsprobe-heartbeat", os.MFD_CLOEXEC)
            os.ftruncate(fd, board_size(len(self.cpus)))
            self._board_fd = fd
        if self._board_fd >= 0:
            return Launch([self.command(unit.cpu)], pass_fds=[(self._board_fd,)])
        return Launch([self.command(unit.cpu)])

    def stop(self) -> None:
        super().stop()
        if self._board_fd >= 0:
            os.close(self._board_fd)
            self._board_fd = -1

    def on_spawn(self, unit: _Slot) -> None:
        unit.samples = 0

    def on_died(self, unit: _Slot) -> None:
        unit.base_samples += unit.samples
        unit.samples = 0
        unit.hist.retire()

    def on_message(self, unit: _Slot, msg: dict[str, Any]) -> list[RawEvent]:
        kind = msg.get("t")
        if kind == "stall":
            mono, real, gap = int(msg["mono_ns"]), int(msg["real_ns"]), int(msg["duration_ns"])
            unit.life = (mono + gap, real + gap)
            fields = {
                "cpu": unit.cpu,
                "cause": msg.get("cause"),
                "run_delay_ns": msg.get("run_delay_ns"),
                "steal_ns": msg.get("steal_ns"),
                "mode": msg.get("mode", self.mode),
            }
            return [RawEvent("stall", mono, real, gap, fields)]
        if kind == "samples":
            unit.samples = int(msg["n"])
            unit.life = (int(msg["mono_ns"]), int(msg["real_ns"]))
        elif kind == "status":
            unit.fifo = bool(msg.get("fifo"))
            unit.member = bool(msg.get("heartbeat")) if self.heartbeat is not None else None
        elif kind == "timeout" and self.heartbeat is not None:
            return [timeout_event("heartbeat", msg)]
        elif kind == "life":
            unit.hist.take(msg)
        return []

    def outage_event(
        self, unit: _Slot, outage: Outage, attempts: int, mono_ns: int
    ) -> RawEvent | None:
        life_mono, life_real = outage.life
        fields = {
            "cpu": unit.cpu,
            "reason": outage.reason,
            "detail": outage.detail,
            "attempts": attempts,
        }
        return RawEvent("sampler_outage", life_mono, life_real, mono_ns - life_mono, fields)
