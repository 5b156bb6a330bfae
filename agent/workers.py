"""Supervised worker processes: start them, read their lines, restart them, report outages.

The stall samplers and the canaries all run as small worker processes (``probe.worker``
describes their side). This module is the agent's side, shared by every probe made of
workers (``agent.samplers.StallProbe``, ``agent.canaries``):

Units
    A probe's workers come in *units*, each a group of processes started together and
    restarted together: one sampler per CPU, one timer canary per CPU, the client and
    server of the rpc canary. ``Supervisor.launch(unit)`` says what to start (each
    process's argv and the descriptors it inherits, e.g. the heartbeat's board or the rpc
    server's listening socket) and which of the parent's descriptors to close once they run.

Forked by a fork server, never by the agent
    Every worker is described as ``python -I -S -c BOOTSTRAP MODULE ARGS...``
    (``worker_command``): ``-I`` isolates it from the environment, ``-S`` skips ``site``
    (``-m`` alone would add about 1.5 MB through runpy); the bootstrap puts the package's
    parent directory on ``sys.path`` and calls ``MODULE.main``. The agent has threads, and
    a child it forked would inherit their locks and its whole heap, so it does not fork:
    ``agent.forkserver`` runs one such interpreter that never has threads, and forks each
    worker from it (a fork costs milliseconds; an interpreter's start and imports cost
    0.5 s of a TCG guest's vCPU). A worker's ``ps`` name is its role (``stall 1``). When
    the fork server cannot be used (it does not start or answer), or for another
    interpreter than the agent's, the command runs as a fresh interpreter with
    ``subprocess`` (``MODULE`` then stands in its argv for ``ps``), and ``notes()`` says
    so. Each worker gets its own process group, so a terminal's Ctrl-C reaches the agent
    only, which then stops them.

One pipe per unit
    All processes of a unit write their stdout and stderr into one pipe (a line under
    4 KiB is written atomically), read by one supervisor thread per unit. JSON lines are
    handed to the probe (``on_message``, under the supervisor's lock); any other line (the
    end of a traceback) is kept as the unit's last diagnostic. The generic line types are
    handled here: ``status`` (a process is up; the unit runs when all its processes said
    so), ``life`` (a sign of life), ``note`` (a degraded capability, folded across CPUs by
    ``notes()``), ``error`` (why set-up failed).

Deaths and restarts
    When one process of a unit exits, the others are killed (a heartbeat side without its
    peer measures nothing), the pipe reaches end-of-file, and the unit is restarted: at
    once after a unit that ran ``HEALTHY_RUN_S``, else after a back-off from 0.5 s doubling
    to 30 s. The probe turns the gap into an outage event (``outage_event``) once the
    replacement runs: from the dead unit's last sign of life to the replacement's status.
    ``health()`` of the probe reports a unit that is not running, or silent for longer than
    ``STALE_AFTER_S``, with the reason.

How far the units have reported
    A worker holds its events until its next sign of life (about once a second) and sends
    them before it, so an event can reach the log a second or more after it ended, far more
    on a loaded guest. ``heard()`` gives each running unit's newest sign of life on
    CLOCK_MONOTONIC; /healthz serves it (``workers``), so that a recorder that stops can
    wait until every unit has reported past its end and lose nothing measured before.

If the agent dies, each worker exits at its next write (EPIPE), within about a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import probe
from agent.errors import ForkServerError
from agent.forkserver import ForkServer
from probe.base import Emit, emit_each
from probe.events import RawEvent
from probe.procfs import format_cpu_list

#: Where ``import probe`` works from (the directory that holds the package).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(probe.__file__)))

#: Bootstrap of a worker process; ``sys.argv[1]`` is the module's name (a marker for ps).
BOOTSTRAP = (
    "import sys; sys.path.insert(0, {parent!r}); "
    "from {module} import main; sys.exit(main(sys.argv[2:]))"
)

#: A unit silent for longer than this is reported down (workers send a line every ~1 s).
STALE_AFTER_S = 5.0
#: Restarts: the first after a unit that ran HEALTHY_RUN_S is immediate; each further
#: death in a row waits twice as long, from BACKOFF_FIRST_S up to BACKOFF_MAX_S.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_RUN_S = 10.0
#: How often a supervisor thread that has nothing to read checks its processes.
CHECK_S = 0.5
#: A diagnostic line is kept up to this many characters (its end).
DIAG_MAX = 300


class Process(Protocol):
    """What the supervisor uses of a worker process: a ``subprocess.Popen`` or an
    ``agent.forkserver.ForkedProcess``."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


_fork_server: ForkServer | None = None
_fork_server_lock = threading.Lock()


def new_fork_server(python: str = sys.executable) -> ForkServer:
    """A fork server that runs in ``python``, started like a worker (``agent.zygote``).

    :param python: the interpreter.
    :return: the server, started at its first ``spawn``.
    """
    return ForkServer(lambda fd: worker_command("agent.zygote", [str(fd)], python))


def fork_server() -> ForkServer:
    """The agent's one fork server (started at its first worker)."""
    global _fork_server
    with _fork_server_lock:
        if _fork_server is None:
            _fork_server = new_fork_server()
        return _fork_server


def stop_fork_server() -> None:
    """Stop the fork server, if one runs (the agent's last step; a later worker would
    start a new one)."""
    with _fork_server_lock:
        server = _fork_server
    if server is not None:
        server.close()


def forkable(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """The module and options of a ``worker_command`` of this interpreter, else None.

    :param argv: a command line.
    :return: (module, args) when the fork server can start it without exec.
    """
    if len(argv) < 6 or list(argv[:4]) != [sys.executable, "-I", "-S", "-c"]:
        return None
    module = argv[5]
    if argv[4] != BOOTSTRAP.format(parent=PACKAGE_PARENT, module=module):
        return None
    return module, list(argv[6:])


def worker_command(module: str, args: Sequence[str], python: str = sys.executable) -> list[str]:
    """The command line of a worker process.

    :param module: the worker's module, e.g. ``probe.stall``; it must define ``main(argv)``.
    :param args: the worker's own arguments.
    :param python: the interpreter.
    :return: the argv list.
    """
    bootstrap = BOOTSTRAP.format(parent=PACKAGE_PARENT, module=module)
    return [python, "-I", "-S", "-c", bootstrap, module, *args]


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


@dataclass(frozen=True)
class Launch:
    """What to start for one unit.

    :param argvs: one command line per process.
    :param pass_fds: per process, the parent's descriptors it inherits (same numbers).
    :param close_fds: the parent's descriptors to close once the processes started (or
        failed to): its copies of what it passed on.
    """

    argvs: Sequence[Sequence[str]]
    pass_fds: Sequence[Sequence[int]] = ()
    close_fds: Sequence[int] = ()


@dataclass(frozen=True)
class Outage:
    """A unit that died and is not yet replaced.

    :param life: (mono_ns, real_ns) of the dead unit's last sign of life.
    :param reason: how it ended (``exit_reason``).
    :param detail: its last error or diagnostic line, or "".
    """

    life: tuple[int, int]
    reason: str
    detail: str


class Unit:
    """What the parent knows about one unit (guarded by the supervisor's lock).

    :param key: the unit's key among the probe's units (a CPU, a pair of CPUs).
    :param label: how health details name it, e.g. ``cpu 1``.
    :param cpus: the CPUs its processes run on.
    """

    def __init__(self, key: Hashable, label: str, cpus: Sequence[int]) -> None:
        self.key = key
        self.label = label
        self.cpus = tuple(cpus)
        self.procs: list[Process] = []
        self.ready: set[int] = set()  # pids of this start that sent their status line
        self.running = False  # every process of this start sent its status line
        self.life: tuple[int, int] | None = None  # (mono_ns, real_ns) of the last sign
        self.life_local = 0.0  # time.monotonic() when the last line arrived
        self.diag = ""  # last line that was not JSON (a traceback's last line)
        self.error = ""  # the last "error" message
        self.down = ""  # why it is not running, while it is not
        self.outage: Outage | None = None  # open until a replacement runs
        self.killed: set[int] = set()  # pids the supervisor killed itself
        self.thread: threading.Thread | None = None


U = TypeVar("U", bound=Unit)


class Supervisor(Generic[U]):
    """Starts, reads and restarts a probe's units; subclasses say what to start and how to
    turn lines into events.

    Subclasses set ``name`` and ``noun`` (``sampler``, ``canary``) and override ``launch``,
    and usually ``on_message``, ``on_spawn``, ``on_died`` and ``outage_event``. Those hooks
    are called with the lock held and must not block.

    :param units: the units, in start order; keys must be unique.
    """

    name = "workers"
    noun = "worker"

    def __init__(self, units: Sequence[U]) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._units: dict[Hashable, U] = {unit.key: unit for unit in units}
        self._notes: dict[str, list[int]] = {}
        self._emit: Emit | None = None
        self._emit_error = ""

    # -- hooks ---------------------------------------------------------------------------

    def launch(self, unit: U) -> Launch:
        """What to start for ``unit`` (lock held).

        :param unit: the unit.
        :raise OSError: when a resource cannot be made (a socket); the unit is down.
        :return: the processes to start.
        """
        raise NotImplementedError

    def on_spawn(self, unit: U) -> None:
        """A new start of ``unit`` is about to run (lock held): reset per-start state."""

    def on_message(self, unit: U, msg: dict[str, Any]) -> list[RawEvent]:
        """Handle one JSON line (lock held); the generic types were handled already.

        :param unit: the sender's unit.
        :param msg: the decoded line.
        :raise KeyError, TypeError, ValueError: on a malformed line (kept as a diagnostic).
        :return: the events it makes.
        """
        return []

    def on_died(self, unit: U) -> None:
        """``unit``'s processes all ended (lock held): fold per-start state into totals."""

    def outage_event(self, unit: U, outage: Outage, attempts: int, mono_ns: int) -> RawEvent | None:
        """The event that closes an outage, when the replacement reported in (lock held).

        :param unit: the unit.
        :param outage: what died and when it was last seen.
        :param attempts: starts it took to end the outage.
        :param mono_ns: the replacement's status time.
        :return: the event, or None for none.
        """
        return None

    # -- life cycle ----------------------------------------------------------------------

    def start(self, emit: Emit) -> None:
        """Start every unit with a supervisor thread each; return at once.

        :param emit: called (from the supervisor threads) with each event.
        :raise RuntimeError: when already started.
        """
        if self._emit is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._emit = emit
        for unit in self._units.values():
            unit.down = "starting"
            unit.thread = threading.Thread(
                target=self._supervise,
                args=(unit,),
                name=f"{self.name}-{unit.label.replace(' ', '')}",
                daemon=True,
            )
            unit.thread.start()

    def stop(self) -> None:
        """Terminate every process (kill what does not end within 3 s), join the threads."""
        with self._lock:
            self._stopping.set()
            procs = [proc for unit in self._units.values() for proc in unit.procs]
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
        for unit in self._units.values():
            if unit.thread is not None:
                unit.thread.join(5.0)

    def problems(self) -> list[str]:
        """One line per unit that is not running or has been silent too long.

        :return: e.g. ``["cpu 1: sampler killed by SIGKILL, restarting"]``; empty when all run.
        """
        problems: list[str] = []
        now = time.monotonic()
        with self._lock:
            if self._emit is None:
                return ["not started"]
            for unit in self._units.values():
                if not unit.running:
                    problems.append(f"{unit.label}: {unit.down or 'not running'}")
                elif now - unit.life_local > STALE_AFTER_S:
                    problems.append(
                        f"{unit.label}: no sign of life for {now - unit.life_local:.1f}s"
                    )
            if self._emit_error:
                problems.append(self._emit_error)
        return problems

    def heard(self) -> dict[str, int | None]:
        """How far each running unit has reported: the CLOCK_MONOTONIC of its newest sign
        of life (None before its first).

        A worker sends what it measured before the sign of life that follows it, in the
        same pipe, and the lines are handled in order: every event a unit measured before
        that time is in the log. Units that are not running are left out (their pipe was
        read to its end).

        :return: ``{label: mono_ns}``, e.g. ``{"cpu 0": 81234000000}``.
        """
        with self._lock:
            return {
                unit.label: unit.life[0] if unit.life is not None else None
                for unit in self._units.values()
                if unit.running
            }

    def wait_ready(self, timeout_s: float = 5.0) -> bool:
        """Wait until every unit runs (a worker needs about 0.1 s on a real CPU).

        :param timeout_s: the longest wait.
        :return: whether all units run.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if all(unit.running for unit in self._units.values()):
                    return True
            if time.monotonic() >= deadline or self._stopping.is_set():
                return False
            time.sleep(0.01)

    def pids(self) -> dict[Hashable, list[int]]:
        """The process ids of each unit's live processes.

        :return: unit key -> pids, for units with live processes.
        """
        with self._lock:
            out: dict[Hashable, list[int]] = {}
            for key, unit in self._units.items():
                alive = [proc.pid for proc in unit.procs if proc.returncode is None]
                if alive:
                    out[key] = alive
            return out

    def notes(self) -> list[str]:
        """One line per degraded capability, naming the CPUs it concerns.

        Workers report the same refusal each for its CPU; the lines are folded into one:
        ``cpu 0-1: SCHED_FIFO not permitted (...)``.

        :return: the lines, in the order they were first reported.
        """
        with self._lock:
            return [f"cpu {format_cpu_list(cpus)}: {note}" for note, cpus in self._notes.items()]

    def units(self) -> Mapping[Hashable, U]:
        """The units by key (read their fields under ``locked()`` only)."""
        return self._units

    def locked(self) -> threading.Lock:
        """The lock that guards every unit's fields."""
        return self._lock

    # -- supervision ---------------------------------------------------------------------

    def _spawn(self, unit: U) -> int | None:
        """Start ``unit``'s processes; return the read end of their pipe, or None.

        The lock is not held while they start: a fork server that starts (or does not
        answer) would keep ``health()`` and /healthz waiting.
        """
        with self._lock:
            if self._stopping.is_set():
                return None
            try:
                launch = self.launch(unit)
            except OSError as err:
                unit.down = f"cannot start a {self.noun}: {err}"
                return None
        read_fd, write_fd = os.pipe()
        procs: list[Process] = []
        error: OSError | None = None
        try:
            for index, argv in enumerate(launch.argvs):
                fds = launch.pass_fds[index] if index < len(launch.pass_fds) else ()
                procs.append(self._start_process(unit, argv, write_fd, fds))
        except OSError as err:
            error = err
        finally:
            os.close(write_fd)
            for fd in launch.close_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        with self._lock:
            if error is not None or self._stopping.is_set():
                for proc in procs:  # stop() ran meanwhile, or a sibling did not start
                    proc.kill()
                    proc.wait()
                os.close(read_fd)
                if error is not None:
                    unit.down = f"cannot start a {self.noun}: {error}"
                return None
            unit.procs = procs
            unit.ready = set()
            unit.killed = set()
            unit.running = False
            unit.diag = unit.error = ""
            self.on_spawn(unit)
            return read_fd

    def _start_process(
        self, unit: U, argv: Sequence[str], write_fd: int, fds: Sequence[int]
    ) -> Process:
        """Start one process of ``unit`` (lock not held): forked by the fork server when
        it can, else a fresh interpreter.

        :raise OSError: when neither way starts it.
        """
        spec = forkable(argv)
        if spec is not None:
            try:
                return fork_server().spawn(spec[0], spec[1], write_fd, fds)
            except ForkServerError as err:
                with self._lock:
                    self._add_note(self._first_cpu(unit), f"{err}: fresh interpreters instead")
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            process_group=0,
            pass_fds=tuple(fds),
        )

    def _supervise(self, unit: U) -> None:
        quick = 0  # deaths in a row of units that did not run HEALTHY_RUN_S
        attempts = 0  # starts since the last start that ran
        while not self._stopping.is_set():
            read_fd = self._spawn(unit)
            attempts += 1
            ran = 0.0
            was_running = False
            if read_fd is not None:
                started = time.monotonic()
                try:
                    self._read(unit, read_fd, attempts)
                finally:
                    os.close(read_fd)
                codes = [proc.wait() for proc in unit.procs]
                ran = time.monotonic() - started
                if self._stopping.is_set():
                    return
                with self._lock:
                    was_running = unit.running
                    self._died(unit, self._reason(unit, codes))
            if was_running:
                attempts = 0
            quick = 1 if was_running and ran >= HEALTHY_RUN_S else quick + 1
            # The first restart is immediate; repeated quick deaths back off.
            if quick > 1:
                self._stopping.wait(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (quick - 2)))

    @staticmethod
    def _reason(unit: Unit, codes: list[int]) -> str:
        """How a unit ended: a process that ended on its own, one killed by a signal first
        (a heartbeat side whose peer was killed exits 1: the consequence, not the cause)."""
        own = [
            code
            for proc, code in zip(unit.procs, codes, strict=True)
            if proc.pid not in unit.killed
        ]
        if own:
            return exit_reason(min(own) if min(own) < 0 else own[0])
        return exit_reason(codes[0]) if codes else "not started"

    def _died(self, unit: U, reason: str) -> None:
        """Record a unit's end (lock held): let the probe keep its totals, open an outage."""
        self.on_died(unit)
        unit.running = False
        why = unit.error or unit.diag
        unit.down = f"{self.noun} {reason}" + (f": {why}" if why else "") + ", restarting"
        if unit.outage is None and unit.life is not None:
            unit.outage = Outage(unit.life, reason, why)

    def _read(self, unit: U, read_fd: int, attempts: int) -> None:
        """Read lines until every process of the unit closed the pipe."""
        poller = select.poll()
        poller.register(read_fd, select.POLLIN)
        pending = b""
        while True:
            if not poller.poll(CHECK_S * 1000):
                self._check(unit)
                continue
            data = os.read(read_fd, 65536)
            if not data:
                break
            *lines, pending = (pending + data).split(b"\n")
            for raw in lines:
                self._line(unit, raw, attempts)
            if len(unit.procs) > 1:
                self._check(unit)
        if pending.strip():
            self._line(unit, pending, attempts)

    def _check(self, unit: U) -> None:
        """When one process of a unit has ended, kill the others (they cannot go on alone)."""
        if not any(proc.poll() is not None for proc in unit.procs):
            return
        for proc in unit.procs:
            if proc.poll() is None:
                with self._lock:
                    unit.killed.add(proc.pid)
                proc.kill()

    def _line(self, unit: U, raw: bytes, attempts: int) -> None:
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            return
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if isinstance(msg, dict):
            try:
                self._handle(unit, msg, attempts)
                return
            except (KeyError, TypeError, ValueError):
                pass  # a malformed message: keep it as a diagnostic
        with self._lock:
            unit.diag = line[-DIAG_MAX:]

    def _handle(self, unit: U, msg: dict[str, Any], attempts: int) -> None:
        kind = msg.get("t")
        events: list[RawEvent] = []
        with self._lock:
            unit.life_local = time.monotonic()
            if kind == "status":
                mono, real = int(msg["mono_ns"]), int(msg["real_ns"])
                unit.ready.add(int(msg["pid"]))
                unit.life = (mono, real)
                cpu = int(msg.get("cpu", self._first_cpu(unit)))
                for note in msg.get("notes") or []:
                    self._add_note(cpu, str(note))
                if len(unit.ready) >= len(unit.procs):
                    unit.running = True
                    unit.down = ""
                    if unit.outage is not None:
                        event = self.outage_event(unit, unit.outage, attempts, mono)
                        if event is not None:
                            events.append(event)
                        unit.outage = None
            elif kind == "life":
                unit.life = (int(msg["mono_ns"]), int(msg["real_ns"]))
            elif kind == "note":
                self._add_note(
                    int(msg.get("cpu", unit.cpus[0] if unit.cpus else 0)), str(msg["msg"])
                )
            elif kind == "error":
                unit.error = str(msg.get("msg"))
                unit.down = unit.error
            events.extend(self.on_message(unit, msg))
        self._send(events)

    @staticmethod
    def _first_cpu(unit: Unit) -> int:
        return unit.cpus[0] if unit.cpus else 0

    def _send(self, events: list[RawEvent]) -> None:
        emit = self._emit
        state = emit_each(emit, events) if emit is not None else None
        if state is not None:
            with self._lock:
                self._emit_error = state

    def _add_note(self, cpu: int, note: str) -> None:
        cpus = self._notes.setdefault(note, [])
        if cpu not in cpus:
            cpus.append(cpu)
