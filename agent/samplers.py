"""The stall probe: one sampler process per CPU, supervised, their lines turned into events.

``StallProbe`` starts a ``probe.stall`` sampler for each CPU as a fresh interpreter
(``subprocess``, never ``fork``: the agent has threads, and a forked child would inherit
their locks and the agent's whole heap). Each sampler pins itself to its CPU and writes JSON
lines on its stdout (the protocol is described in ``probe.stall``). One supervisor thread per
CPU reads them and:

- turns each ``stall`` line into a ``RawEvent`` of kind ``stall`` (``mono_ns``/``real_ns``
  at the gap's start, ``duration_ns`` the gap; fields ``cpu``, ``cause``, ``run_delay_ns``,
  ``steal_ns``, ``mode``) and hands it to ``emit``;
- keeps the CPU's sample count (``samples()``), monotone across restarts;
- collects the degraded capabilities the sampler reports (``notes()``), e.g. SCHED_FIFO
  not permitted;
- restarts a sampler that exits or is killed at once (repeated deaths within 10 s of a
  start back off from 0.5 s up to 30 s), and once the replacement runs, emits one
  ``sampler_outage`` event: ``mono_ns``/``real_ns`` at the dead sampler's last sign of life
  (its last line, at most about a second old), ``duration_ns`` until the replacement ran,
  fields ``cpu``, ``reason`` (``killed by SIGKILL``, ``exit 1``), ``detail`` (its last
  diagnostic line, or ""), ``attempts``. An outage is never silence: it is an event, and
  ``health()`` reports it while it lasts.

Stall events reach ``emit`` within about a second: a sampler sends its stall lines together
with its once-a-second heartbeat, because every wake-up of this process costs more than the
line it carries.

The samplers are started with ``python -I -S``: isolated from the environment and without
``site``, so that each costs about 5 MB PSS (``-m`` alone would add ~1.5 MB through runpy);
the package's parent directory is put on ``sys.path`` by a one-line bootstrap, and the
argument ``probe.stall`` names the module in the command line for ``ps``. They run in their
own process group, so a terminal's Ctrl-C reaches the agent only, which then stops them;
if the agent dies, each sampler exits at its next write (within about a second).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import IO, Any

import probe
from probe.base import Emit, Health
from probe.events import RawEvent
from probe.procfs import format_cpu_list
from probe.roots import DEFAULT_ROOTS, Roots

#: Where ``import probe`` works from (the directory that holds the package).
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(probe.__file__)))

#: Bootstrap of a sampler process; ``sys.argv[1]`` is the marker ``probe.stall``.
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, {parent!r}); "
    "from probe.stall import main; sys.exit(main(sys.argv[2:]))"
)

#: A sampler silent for longer than this is reported down (its heartbeat is ~1 s).
STALE_AFTER_S = 5.0
#: Restarts: the first after a sampler that ran HEALTHY_RUN_S is immediate; each further
#: death in a row waits twice as long, from BACKOFF_FIRST_S up to BACKOFF_MAX_S.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_RUN_S = 10.0


def exit_reason(returncode: int) -> str:
    """Describe how a process ended, as ``subprocess`` reports it.

    :param returncode: ``Popen.returncode`` (negative: killed by that signal).
    :return: e.g. ``"killed by SIGKILL"`` or ``"exit 1"``.
    """
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit {returncode}"


class _Slot:
    """What the parent knows about one CPU's sampler (guarded by ``StallProbe._lock``)."""

    def __init__(self, cpu: int) -> None:
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.running = False  # the current process sent its status line
        self.fifo: bool | None = None
        self.base_samples = 0  # samples of the samplers that died
        self.samples = 0  # samples of the current one
        self.life: tuple[int, int] | None = None  # (mono_ns, real_ns) of the last line
        self.life_local = 0.0  # time.monotonic() when the last line arrived
        self.diag = ""  # last line that was not JSON (a traceback's last line)
        self.error = ""  # the sampler's last "error" message
        self.down = ""  # why it is not running, while it is not
        self.outage: dict[str, Any] | None = None  # the open outage, until a replacement runs
        self.thread: threading.Thread | None = None


class StallProbe:
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
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._slots = {cpu: _Slot(cpu) for cpu in self.cpus}
        self._notes: dict[str, list[int]] = {}
        self._emit: Emit | None = None
        self._emit_error = ""

    # -- the Probe protocol ------------------------------------------------------------

    def start(self, emit: Emit) -> None:
        """Start one sampler per CPU and a supervisor thread for each; return at once.

        :param emit: called (from the supervisor threads) with each event.
        :raise RuntimeError: when the probe was already started.
        """
        if self._emit is not None:
            raise RuntimeError("StallProbe already started")
        self._emit = emit
        for slot in self._slots.values():
            slot.down = "starting"
            slot.thread = threading.Thread(
                target=self._supervise, args=(slot,), name=f"stall-cpu{slot.cpu}", daemon=True
            )
            slot.thread.start()

    def stop(self) -> None:
        """Terminate every sampler, reap it and join the supervisor threads."""
        with self._lock:
            self._stopping.set()
            procs = [slot.proc for slot in self._slots.values() if slot.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 3.0
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for slot in self._slots.values():
            if slot.thread is not None:
                slot.thread.join(5.0)

    def health(self) -> Mapping[str, Health]:
        """Whether every sampler runs and has shown life lately.

        :return: ``{"stall": Health}``; when down, the detail names each CPU and why.
        """
        problems: list[str] = []
        now = time.monotonic()
        with self._lock:
            if self._emit is None:
                return {"stall": Health(False, "not started")}
            for slot in self._slots.values():
                if not slot.running:
                    problems.append(f"cpu {slot.cpu}: {slot.down or 'not running'}")
                elif now - slot.life_local > STALE_AFTER_S:
                    problems.append(
                        f"cpu {slot.cpu}: no sign of life for {now - slot.life_local:.1f}s"
                    )
            if self._emit_error:
                problems.append(self._emit_error)
        if problems:
            return {"stall": Health(False, "; ".join(problems))}
        return {"stall": Health(True)}

    # -- extra views for the agent ------------------------------------------------------

    def wait_ready(self, timeout_s: float = 5.0) -> bool:
        """Wait until every sampler has sent its status line (a fresh interpreter needs about
        0.1 s), so that ``health()`` and ``notes()`` describe running samplers.

        :param timeout_s: the longest wait.
        :return: whether all samplers run.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if all(slot.running for slot in self._slots.values()):
                    return True
            if time.monotonic() >= deadline or self._stopping.is_set():
                return False
            time.sleep(0.01)

    def samples(self) -> dict[int, int]:
        """Sampler iterations per CPU (tick mode: timer expirations), monotone across restarts.

        :return: CPU -> count; updated about once a second per CPU.
        """
        with self._lock:
            return {cpu: slot.base_samples + slot.samples for cpu, slot in self._slots.items()}

    def sampler_pids(self) -> dict[int, int]:
        """The process id of each CPU's current sampler.

        :return: CPU -> pid, for the CPUs whose sampler process exists.
        """
        with self._lock:
            return {
                cpu: slot.proc.pid
                for cpu, slot in self._slots.items()
                if slot.proc is not None and slot.proc.returncode is None
            }

    def notes(self) -> list[str]:
        """One line per degraded capability, naming the CPUs it concerns.

        The samplers report the same refusal (e.g. SCHED_FIFO) each for its CPU; the lines
        are folded into one: ``cpu 0-1: SCHED_FIFO not permitted (...)``.

        :return: the lines, in the order they were first reported.
        """
        with self._lock:
            return [f"cpu {format_cpu_list(cpus)}: {note}" for note, cpus in self._notes.items()]

    # -- supervision -------------------------------------------------------------------

    def command(self, cpu: int) -> list[str]:
        """The command line of the sampler for ``cpu``.

        :param cpu: the CPU.
        :return: the argv list.
        """
        cmd = [
            self.python,
            "-I",
            "-S",
            "-c",
            _BOOTSTRAP.format(parent=_PACKAGE_PARENT),
            "probe.stall",
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
            cmd += ["--procfs", os.path.abspath(self.roots.proc)]
        return cmd

    def _spawn(self, slot: _Slot) -> subprocess.Popen[bytes] | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            try:
                proc = subprocess.Popen(
                    self.command(slot.cpu),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    process_group=0,
                )
            except OSError as err:
                slot.down = f"cannot start a sampler: {err}"
                return None
            slot.proc = proc
            slot.running = False
            slot.samples = 0
            slot.diag = slot.error = ""
            return proc

    def _supervise(self, slot: _Slot) -> None:
        quick = 0  # deaths in a row of samplers that did not run HEALTHY_RUN_S
        attempts = 0  # spawns since the last sampler that ran
        while not self._stopping.is_set():
            proc = self._spawn(slot)
            attempts += 1
            ran = 0.0
            was_running = False
            if proc is not None:
                started = time.monotonic()
                assert proc.stdout is not None
                self._read(slot, proc.stdout, attempts)
                proc.stdout.close()
                returncode = proc.wait()
                ran = time.monotonic() - started
                if self._stopping.is_set():
                    return
                with self._lock:
                    was_running = slot.running
                    self._sampler_died(slot, exit_reason(returncode))
            if was_running:
                attempts = 0
            quick = 1 if was_running and ran >= HEALTHY_RUN_S else quick + 1
            # The first restart is immediate; repeated quick deaths back off.
            if quick > 1:
                self._stopping.wait(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (quick - 2)))

    def _sampler_died(self, slot: _Slot, reason: str) -> None:
        """Record a sampler's end (lock held): keep its samples, open an outage."""
        slot.base_samples += slot.samples
        slot.samples = 0
        slot.running = False
        why = slot.error or slot.diag
        slot.down = f"sampler {reason}" + (f": {why}" if why else "") + ", restarting"
        if slot.outage is None and slot.life is not None:
            slot.outage = {"life": slot.life, "reason": reason, "detail": why}

    def _read(self, slot: _Slot, stream: IO[bytes], attempts: int) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                msg = None
            if isinstance(msg, dict):
                try:
                    self._handle(slot, msg, attempts)
                    continue
                except (KeyError, TypeError, ValueError):
                    pass  # a malformed message: keep it as a diagnostic
            with self._lock:
                slot.diag = line[-300:]

    def _handle(self, slot: _Slot, msg: dict[str, Any], attempts: int) -> None:
        kind = msg.get("t")
        events: list[RawEvent] = []
        with self._lock:
            slot.life_local = time.monotonic()
            if kind == "stall":
                mono, real, gap = int(msg["mono_ns"]), int(msg["real_ns"]), int(msg["duration_ns"])
                slot.life = (mono + gap, real + gap)
                fields = {
                    "cpu": slot.cpu,
                    "cause": msg.get("cause"),
                    "run_delay_ns": msg.get("run_delay_ns"),
                    "steal_ns": msg.get("steal_ns"),
                    "mode": msg.get("mode", self.mode),
                }
                events.append(RawEvent("stall", mono, real, gap, fields))
            elif kind == "samples":
                slot.samples = int(msg["n"])
                slot.life = (int(msg["mono_ns"]), int(msg["real_ns"]))
            elif kind == "status":
                slot.running = True
                slot.down = ""
                slot.fifo = bool(msg.get("fifo"))
                mono, real = int(msg["mono_ns"]), int(msg["real_ns"])
                slot.life = (mono, real)
                for note in msg.get("notes") or []:
                    self._add_note(slot.cpu, str(note))
                if slot.outage is not None:
                    (life_mono, life_real) = slot.outage["life"]
                    fields = {
                        "cpu": slot.cpu,
                        "reason": slot.outage["reason"],
                        "detail": slot.outage["detail"],
                        "attempts": attempts,
                    }
                    events.append(
                        RawEvent("sampler_outage", life_mono, life_real, mono - life_mono, fields)
                    )
                    slot.outage = None
            elif kind == "note":
                self._add_note(slot.cpu, str(msg.get("msg")))
            elif kind == "error":
                slot.error = str(msg.get("msg"))
                slot.down = slot.error
        emit = self._emit
        for event in events:
            if emit is not None:
                try:
                    emit(event)
                    self._emit_error = ""
                except Exception as err:  # the agent's problem, but never the end of sampling
                    with self._lock:
                        self._emit_error = f"emit failed: {err!r}"[:200]

    def _add_note(self, cpu: int, note: str) -> None:
        cpus = self._notes.setdefault(note, [])
        if cpu not in cpus:
            cpus.append(cpu)
