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
from collections.abc import Mapping
from typing import Any

from agent.workers import Launch, Outage, Supervisor, Unit, exit_reason, worker_command
from probe.base import Health
from probe.events import RawEvent
from probe.roots import DEFAULT_ROOTS, Roots

__all__ = ["StallProbe", "exit_reason"]


class _Slot(Unit):
    """One CPU's sampler as the parent knows it (guarded by the supervisor's lock)."""

    def __init__(self, cpu: int) -> None:
        super().__init__(cpu, f"cpu {cpu}", (cpu,))
        self.cpu = cpu
        self.fifo: bool | None = None
        self.base_samples = 0  # samples of the samplers that died
        self.samples = 0  # samples of the current one


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
    :param python: the interpreter that runs the samplers.
    :raise ValueError: on an empty CPU list, a non-positive time or an unknown mode.
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
        python: str = sys.executable,
    ) -> None:
        if not cpus:
            raise ValueError("StallProbe: no CPUs to watch")
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
        super().__init__([_Slot(cpu) for cpu in self.cpus])

    # -- the Probe protocol ------------------------------------------------------------

    def health(self) -> Mapping[str, Health]:
        """Whether every sampler runs and has shown life lately.

        :return: ``{"stall": Health}``; when down, the detail names each CPU and why.
        """
        problems = self.problems()
        if problems:
            return {"stall": Health(False, "; ".join(problems))}
        return {"stall": Health(True)}

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
        return worker_command("probe.stall", args, self.python)

    def launch(self, unit: _Slot) -> Launch:
        return Launch([self.command(unit.cpu)])

    def on_spawn(self, unit: _Slot) -> None:
        unit.samples = 0

    def on_died(self, unit: _Slot) -> None:
        unit.base_samples += unit.samples
        unit.samples = 0

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
