"""The recorder: QMP endpoints, guest agents and libvirt event streams, into a run directory.

``Recorder`` runs one ``QmpEndpoint`` per ``--qmp NAME=SOCKET``, one ``AgentRecorder`` per
``--agent``, and one ``LibvirtEventReader`` per ``--libvirt-events``, all concurrently in
one asyncio loop, and writes the run directory described in docs/run-directory.md.

When it stops:

- the source (the endpoint named ``src``, else the first ``--qmp``, else the first libvirt
  stream) reaches ``completed``, ``failed`` or ``cancelled`` after having been seen in
  another status, plus ``grace_ns`` (so the destination's last events and the guest's
  after-events arrive). A terminal status found by the first poll is left over from an
  earlier migration and does not stop the recording; a new status within the grace period
  cancels the pending stop;
- every QMP endpoint and libvirt stream has closed (without ``reconnect``), plus grace;
- ``duration_ns`` has passed since the start;
- ``stop()`` is called or the ``stop_event`` given to ``run()`` is set (the CLI does that
  on SIGINT and SIGTERM).

Host truth per vCPU: for every QMP endpoint whose QEMU runs on this host (its pid from the
monitor socket's peer credentials, or ``qemu_pids``), a ``VcpuSampler`` reads each vCPU
thread every ``vcpu_poll_ns`` in a thread of its own and writes ``vcpu-states.jsonl``; an
endpoint without a pid, or whose vCPU threads are not in ``/proc/PID/task``, gets a note
instead (meta.json ``vcpu_sampler``). ``vcpu_poll_ns=0`` turns it off. An endpoint's threads
are handed to the sampler only once QMP has said whether its VM runs (``query-status``,
STOP, RESUME): before that the sampler would take a VM not yet started for a running one
and read its idle vCPUs as ``halted`` (a CI run read an incoming QEMU's vCPUs so for the
10 ms before its first ``query-status`` answer).

Whatever the reason, the writers are flushed and closed and ``meta.json`` is rewritten with
the versions, endpoints, agents, start and end, counts per file, the stop reason and the
notes. meta.json is also written at the start with ``"complete": false``, so a recorder
killed outright still leaves a readable (if incomplete) run.

Started while a migration is under way, the recorder takes the status of the first
``query-migrate`` reply as the starting state and records on.

Python use (the lab)::

    rec = Recorder("run1", qmp={"src": "/tmp/src.qmp", "dst": "/tmp/dst.qmp"},
                   agents={"guest": "http://127.0.0.1:9466"})
    task = asyncio.create_task(rec.run())
    await rec.started.wait()
    await rec.execute("src", "migrate", {"uri": "tcp:127.0.0.1:4444"})
    result = await task            # stops by itself after completion + grace
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import os
import platform
import re
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

from analysis import rundir
from analysis.errors import RecorderError
from analysis.record.agent_client import DRAIN_NS, AgentRecorder, check_agent_url
from analysis.record.libvirt_events import LibvirtEventReader
from analysis.record.qmp_endpoint import QmpEndpoint, StatusChange, format_address, parse_address
from analysis.record.vcpu_sampler import VcpuSampler
from analysis.rundir import JsonlWriter, host_now

#: Statuses after which a migration is over.
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
#: Names of endpoints and agents (they become file names).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: At most this many notes are kept for meta.json.
MAX_NOTES = 1000
#: How long components get to wind down after the stop (an agent's recorder gets as long
#: as its drain and last requests may take: ``AgentRecorder.end_budget_s``).
SHUTDOWN_TIMEOUT_S = 15.0


def check_name(name: str, what: str) -> str:
    """Validate an endpoint or agent name (it becomes part of a file name).

    :param name: e.g. ``src``.
    :param what: ``endpoint`` or ``agent``, for the message.
    :raise RecorderError: when it has characters other than letters, digits, ``_.-``.
    :return: the name.
    """
    if not _NAME.match(name):
        raise RecorderError(
            f"invalid {what} name {name!r}: use letters, digits, '_', '.', '-' (e.g. src, dst)"
        )
    return name


def _iso(real_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(real_ns / 1e9)) + (
        f".{real_ns % 1_000_000_000 // 1_000_000:03d}Z"
    )


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class _TappedWriter(JsonlWriter):
    """A ``JsonlWriter`` that also hands each record to a callback once it is written."""

    def __init__(self, path: Path, tap: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(path)
        self._tap = tap

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        with contextlib.suppress(Exception):  # a tap's bug must not stop the recording
            self._tap(record)


@dataclass(frozen=True)
class RecorderResult:
    """How a recording ended.

    :param out: the run directory.
    :param stop_reason: why it stopped.
    :param meta: the final meta.json content.
    """

    out: Path
    stop_reason: str
    meta: dict[str, Any]


class Recorder:
    """Records QMP endpoints, agents and libvirt streams into a run directory.

    :param out: the run directory (created; must not already hold a recording).
    :param qmp: endpoint name -> socket (a unix path or ``HOST:PORT``).
    :param agents: agent name -> base URL.
    :param libvirt_events: stream name -> path, or ``-`` for stdin.
    :param poll_ns: period of ``query-migrate`` / ``query-status``.
    :param grace_ns: how long to go on after the source's migration ended.
    :param duration_ns: stop after this long (``None``: no limit).
    :param command_timeout_ns: a QMP command slower than this becomes a ``timeout`` record.
    :param connect_timeout_ns: how long connecting to a monitor may take.
    :param reconnect: reconnect to endpoints whose socket reappears (and tolerate a
        socket missing at the start).
    :param enable_events: turn the ``events`` migration capability on where it is off.
    :param status_stream: where status lines go (``None``: nowhere).
    :param on_status: called with every migration status change.
    :param command_line: recorded in meta.json (default: ``sys.argv``).
    :param extra_meta: merged into meta.json (the lab's scenario, ...).
    :param events_poll_ns: pause between agent event fetches.
    :param clock_period_ns: pause between periodic /clock bursts.
    :param agent_timeout_ns: timeout of each agent HTTP request.
    :param burst_reads: /clock reads per burst.
    :param drain_ns: at the end, the longest wait for the agents' workers to report past
        it (``analysis.record.agent_client``).
    :param on_record: called with (endpoint name, record) for every record written to a
        ``qmp-NAME.jsonl`` (the migration exporter's feed); its errors are ignored.
    :param vcpu_poll_ns: period of the host-side vCPU thread sampler (0: no sampler).
    :param qemu_pids: endpoint name -> QEMU pid, where the monitor's peer credentials
        cannot tell it (a TCP monitor).
    :param proc_root: the procfs root the vCPU sampler reads.
    :raise RecorderError: for a bad name, address or URL, or nothing to record.
    """

    def __init__(
        self,
        out: str | Path,
        qmp: Mapping[str, str] | None = None,
        agents: Mapping[str, str] | None = None,
        *,
        libvirt_events: Mapping[str, str] | None = None,
        poll_ns: int = 100_000_000,
        grace_ns: int = 5_000_000_000,
        duration_ns: int | None = None,
        command_timeout_ns: int = 1_000_000_000,
        connect_timeout_ns: int = 5_000_000_000,
        reconnect: bool = False,
        enable_events: bool = True,
        status_stream: TextIO | None = None,
        on_status: Callable[[StatusChange], None] | None = None,
        command_line: list[str] | None = None,
        extra_meta: Mapping[str, Any] | None = None,
        events_poll_ns: int = 250_000_000,
        clock_period_ns: int = 1_000_000_000,
        agent_timeout_ns: int = 1_000_000_000,
        burst_reads: int = 5,
        drain_ns: int = DRAIN_NS,
        on_record: Callable[[str, dict[str, Any]], None] | None = None,
        vcpu_poll_ns: int = 10_000_000,
        qemu_pids: Mapping[str, int] | None = None,
        proc_root: str | Path = "/proc",
    ) -> None:
        self.out = Path(out)
        self._on_record = on_record
        self._qmp = {check_name(n, "endpoint"): parse_address(a) for n, a in (qmp or {}).items()}
        self._agents = {
            check_name(n, "agent"): check_agent_url(u) for n, u in (agents or {}).items()
        }
        self._libvirt = {check_name(n, "endpoint"): s for n, s in (libvirt_events or {}).items()}
        self._qemu_pids = dict(qemu_pids or {})
        self._check_sources(poll_ns, vcpu_poll_ns)
        self._proc_root = Path(proc_root)
        self.source = (
            "src"
            if "src" in self._qmp or "src" in self._libvirt
            else next(iter([*self._qmp, *self._libvirt]), None)
        )
        self._options = {
            "poll_ns": poll_ns,
            "grace_ns": grace_ns,
            "duration_ns": duration_ns,
            "command_timeout_ns": command_timeout_ns,
            "connect_timeout_ns": connect_timeout_ns,
            "reconnect": reconnect,
            "enable_events": enable_events,
            "events_poll_ns": events_poll_ns,
            "clock_period_ns": clock_period_ns,
            "agent_timeout_ns": agent_timeout_ns,
            "burst_reads": burst_reads,
            "drain_ns": drain_ns,
            "vcpu_poll_ns": vcpu_poll_ns,
        }
        self._status_stream = status_stream
        self._user_on_status = on_status
        self._command_line = list(sys.argv if command_line is None else command_line)
        self._extra_meta = dict(extra_meta or {})
        self.endpoints: dict[str, QmpEndpoint] = {}
        self.agents: dict[str, AgentRecorder] = {}
        self.streams: dict[str, LibvirtEventReader] = {}
        self._stream_status: dict[str, str] = {}
        self._writers: dict[str, JsonlWriter] = {}
        self.vcpu_sampler: VcpuSampler | None = None
        # Endpoints whose VM's run state QMP told, and vCPU threads waiting for it.
        self._runstate_known: set[str] = set()
        self._unwatched: dict[str, tuple[int, dict[int, int]]] = {}
        self._notes: list[str] = []
        self._stop: asyncio.Event | None = None
        self._stop_reason: str | None = None
        self._grace_handle: asyncio.TimerHandle | None = None
        self._grace_reason = ""
        self._duration_handle: asyncio.TimerHandle | None = None
        self._qmp_tasks: list[asyncio.Future[None]] = []
        self._stream_tasks: list[asyncio.Future[None]] = []
        self._source_seen_open = False
        self._start: tuple[int, int] | None = None
        #: Set once every endpoint is connected and recording has begun.
        self.started = asyncio.Event()

    def _check_sources(self, poll_ns: int, vcpu_poll_ns: int) -> None:
        """Refuse a recording with nothing to record, a name used twice, a bad period, or
        a ``--qemu-pid`` for no endpoint.

        :raise RecorderError: naming the option at fault.
        """
        clash = set(self._qmp) & set(self._libvirt)
        if clash:
            raise RecorderError(f"name {sorted(clash)[0]!r} used by --qmp and --libvirt-events")
        if not (self._qmp or self._agents or self._libvirt):
            raise RecorderError("nothing to record: give --qmp, --agent or --libvirt-events")
        if poll_ns <= 0:
            raise RecorderError("the poll period must be positive")
        if vcpu_poll_ns < 0:
            raise RecorderError("the vCPU poll period must be positive, or 0 for none")
        unknown = sorted(set(self._qemu_pids) - set(self._qmp))
        if unknown:
            raise RecorderError(f"--qemu-pid {unknown[0]}: no --qmp endpoint of that name")

    # -- public controls ----------------------------------------------------------------

    def stop(self, reason: str = "stop requested") -> None:
        """End the recording now (call from the recorder's event loop).

        :param reason: recorded in meta.json as the stop reason.
        """
        if self._stop is None or self._stop.is_set():
            return
        self._stop_reason = reason
        self._stop.set()

    def request_clock_burst(self, reason: str = "requested") -> None:
        """Take a /clock burst on every agent now (returns at once).

        :param reason: recorded with the samples.
        """
        for agent in self.agents.values():
            agent.request_burst(reason)

    @property
    def statuses(self) -> dict[str, str | None]:
        """The current migration status of every endpoint and stream."""
        out: dict[str, str | None] = {n: e.status for n, e in self.endpoints.items()}
        out.update({n: self._stream_status.get(n) for n in self.streams})
        return out

    async def execute(
        self, endpoint: str, command: str, arguments: dict[str, Any] | None = None
    ) -> Any:
        """Send a QMP command through the recorder's connection to ``endpoint``.

        Useful when the recorder holds the only monitor. The command waits its turn behind
        a hung poll and is recorded like the polls (``reply``, or ``timeout`` then a late
        ``reply``).

        :param endpoint: the endpoint's name.
        :param command: e.g. ``migrate``.
        :param arguments: the command's arguments.
        :raise RecorderError: for an unknown or disconnected endpoint.
        :raise qemu.qmp.ExecuteError: when QEMU answers with an error.
        :return: the command's return value.
        """
        if endpoint not in self.endpoints:
            raise RecorderError(f"no QMP endpoint named {endpoint!r}")
        return await self.endpoints[endpoint].execute(command, arguments)

    # -- status lines and notes -----------------------------------------------------------

    def _say(self, text: str) -> None:
        real, _mono = host_now()
        if len(self._notes) < MAX_NOTES:
            self._notes.append(f"{_iso(real)} {text}")
        if self._status_stream is not None:
            stamp = time.strftime("%H:%M:%S", time.localtime(real / 1e9))
            stamp += f".{real % 1_000_000_000 // 1_000_000:03d}"
            with contextlib.suppress(OSError, ValueError):
                print(f"{stamp} {text}", file=self._status_stream, flush=True)

    def _endpoint_note(self, name: str, message: str) -> None:
        self._say(f"{name}: {message}")

    def _agent_note(self, name: str, message: str) -> None:
        self._say(f"agent {name}: {message}")

    def _on_status(self, change: StatusChange) -> None:
        was = "found" if change.previous is None else f"{change.previous} ->"
        self._say(f"{change.endpoint}: {was} {change.status} ({change.via})")
        self.request_clock_burst(f"{change.endpoint}:{change.status}")
        if change.endpoint == self.source:
            if change.status in TERMINAL_STATUSES:
                if self._source_seen_open:
                    grace = int(self._options["grace_ns"] or 0)
                    self._stop_later(f"source {change.status}", grace)
            else:
                self._source_seen_open = True
                self._cancel_stop_later("source")
        if self._user_on_status is not None:
            try:
                self._user_on_status(change)
            except Exception as err:  # the caller's bug must not end the recording
                self._say(f"on_status callback failed: {err!r}")

    def _on_stream_record(self, name: str, record: dict[str, Any]) -> None:
        data = record.get("data")
        if record.get("event") != "MIGRATION" or not isinstance(data, dict):
            return
        status = str(data.get("status"))
        previous = self._stream_status.get(name)
        if status == previous:
            return
        self._stream_status[name] = status
        real = int(record.get("host_real_ns", 0))
        mono = int(record.get("host_mono_ns", time.monotonic_ns()))
        self._on_status(StatusChange(name, status, previous, "libvirt", real, mono))

    # -- stopping ---------------------------------------------------------------------------

    def _stop_later(self, reason: str, delay_ns: int) -> None:
        if self._stop is None or self._stop.is_set():
            return
        if self._grace_handle is not None:
            return  # an earlier deadline stands
        full = f"{reason} (+{delay_ns / 1e9:g}s grace)"
        loop = asyncio.get_running_loop()
        self._grace_handle = loop.call_later(delay_ns / 1e9, self.stop, full)
        self._grace_reason = reason

    def _cancel_stop_later(self, prefix: str) -> None:
        if self._grace_handle is not None and self._grace_reason.startswith(prefix):
            self._grace_handle.cancel()
            self._grace_handle = None

    def _component_done(self, _task: asyncio.Future[None]) -> None:
        streams = [*self._qmp_tasks, *self._stream_tasks]
        if streams and all(t.done() for t in streams):
            grace = int(self._options["grace_ns"] or 0)
            self._stop_later("every QMP endpoint closed", grace)

    # -- the run directory ------------------------------------------------------------------

    def _file_names(self) -> list[str]:
        names = [rundir.qmp_file(n) for n in [*self._qmp, *self._libvirt]]
        if self._qmp and self._options["vcpu_poll_ns"]:
            names.append(rundir.VCPU_STATES)
        if self._agents:
            names.append(rundir.CLOCK_SAMPLES)
            single = len(self._agents) == 1
            for name in self._agents:
                names.append(rundir.guest_events_file(None if single else name))
                names.append(rundir.agent_notes_file(name))
                names.append(rundir.arrivals_file(name))
        return names

    def _prepare_out(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RecorderError(
                f"cannot create run directory {self.out}: {err.strerror or err}"
            ) from err
        if not self.out.is_dir():
            raise RecorderError(f"{self.out}: not a directory")
        taken = [n for n in [rundir.META, *self._file_names()] if (self.out / n).exists()]
        if taken:
            raise RecorderError(
                f"{self.out} already holds a recording ({taken[0]}): choose a new --out"
            )
        probe = self.out / ".tsprobe-write-test"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise RecorderError(f"cannot write to {self.out}: {err.strerror or err}") from err

    def _qmp_writer(self, name: str) -> JsonlWriter:
        path = self.out / rundir.qmp_file(name)
        if self._on_record is None:
            return JsonlWriter(path)
        return _TappedWriter(path, functools.partial(self._on_record, name))

    def _on_vcpus(self, name: str, peer: int | None, threads: dict[int, int]) -> None:
        sampler = self.vcpu_sampler
        if sampler is None:
            return
        pid = self._qemu_pids.get(name, peer)
        if pid is None:
            sampler.note_unavailable(
                name, "its monitor is not a unix socket: give --qemu-pid NAME=PID"
            )
            return
        tasks = self._proc_root / str(pid) / "task"
        missing = [t for t in sorted(set(threads.values())) if not (tasks / str(t)).exists()]
        if missing:
            sampler.note_unavailable(
                name,
                f"vCPU thread {missing[0]} is not in {tasks}: "
                "its QEMU does not run on this host, or the pid is wrong",
            )
            return
        if name not in self._runstate_known:
            self._unwatched[name] = (pid, threads)
            return
        sampler.watch(name, pid, threads)

    def _on_runstate(self, name: str, running: bool) -> None:
        sampler = self.vcpu_sampler
        if sampler is None:
            return
        sampler.set_vm_running(name, running)
        self._runstate_known.add(name)
        waiting = self._unwatched.pop(name, None)
        if waiting is not None:
            sampler.watch(name, *waiting)

    def _open_writers(self) -> None:
        vcpu_poll = int(self._options["vcpu_poll_ns"] or 0)
        if self._qmp and vcpu_poll:
            states = JsonlWriter(self.out / rundir.VCPU_STATES)
            self._writers[rundir.VCPU_STATES] = states
            self.vcpu_sampler = VcpuSampler(
                states, poll_ns=vcpu_poll, proc=self._proc_root, on_note=self._say
            )
        sampling = self.vcpu_sampler is not None
        for name, address in self._qmp.items():
            writer = self._qmp_writer(name)
            self._writers[rundir.qmp_file(name)] = writer
            self.endpoints[name] = QmpEndpoint(
                name,
                address,
                writer,
                poll_ns=int(self._options["poll_ns"] or 0),
                command_timeout_ns=int(self._options["command_timeout_ns"] or 0),
                connect_timeout_ns=int(self._options["connect_timeout_ns"] or 0),
                enable_events=bool(self._options["enable_events"]),
                reconnect=bool(self._options["reconnect"]),
                on_status=self._on_status,
                on_note=self._endpoint_note,
                on_vcpus=self._on_vcpus if sampling else None,
                on_runstate=self._on_runstate if sampling else None,
            )
        for name, source in self._libvirt.items():
            writer = self._qmp_writer(name)
            self._writers[rundir.qmp_file(name)] = writer
            self.streams[name] = LibvirtEventReader(
                name,
                source,
                writer,
                on_record=functools.partial(self._on_stream_record, name),
                on_note=self._endpoint_note,
            )
        if not self._agents:
            return
        clock = JsonlWriter(self.out / rundir.CLOCK_SAMPLES)
        self._writers[rundir.CLOCK_SAMPLES] = clock
        single = len(self._agents) == 1
        for name, url in self._agents.items():
            events = JsonlWriter(self.out / rundir.guest_events_file(None if single else name))
            notes = JsonlWriter(self.out / rundir.agent_notes_file(name))
            arrivals = JsonlWriter(self.out / rundir.arrivals_file(name))
            self._writers[events.path.name] = events
            self._writers[notes.path.name] = notes
            self._writers[arrivals.path.name] = arrivals
            self.agents[name] = AgentRecorder(
                name,
                url,
                events,
                notes,
                clock,
                arrivals=arrivals,
                events_poll_ns=int(self._options["events_poll_ns"] or 0),
                clock_period_ns=int(self._options["clock_period_ns"] or 0),
                request_timeout_ns=int(self._options["agent_timeout_ns"] or 0),
                burst_reads=int(self._options["burst_reads"] or 0),
                drain_ns=int(self._options["drain_ns"] or 0),
                on_note=self._agent_note,
            )

    def _meta(self, complete: bool) -> dict[str, Any]:
        end = host_now() if complete else None
        start = self._start or host_now()
        endpoints: dict[str, Any] = {}
        for name, endpoint in self.endpoints.items():
            endpoints[name] = {
                "kind": "qmp",
                "file": rundir.qmp_file(name),
                **endpoint.summary.as_dict(),
            }
        for name, stream in self.streams.items():
            endpoints[name] = {
                "kind": "libvirt-events",
                "file": rundir.qmp_file(name),
                "input": stream.source,
                "domains": dict(stream.parser.domains),
                "skipped_lines": [str(s) for s in stream.parser.skips[:100]],
                "skipped": len(stream.parser.skips),
                "ignored_lines": stream.parser.ignored,
                "last_status": self._stream_status.get(name),
                "closed_reason": stream.closed_reason,
            }
        qemu_versions = {}
        for name, endpoint in self.endpoints.items():
            version = endpoint.summary.version
            if isinstance(version, dict) and isinstance(version.get("qemu"), dict):
                q = version["qemu"]
                text = f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
                package = str(version.get("package", "")).strip()
                qemu_versions[name] = f"{text} {package}".strip()
        meta: dict[str, Any] = {
            "kind": "tsprobe-run",
            "format_version": 1,
            "complete": complete,
            "versions": {
                "tsprobe": _version("tsprobe"),
                "python": platform.python_version(),
                "qemu.qmp": _version("qemu.qmp"),
                "qemu": qemu_versions,
            },
            "host": {"hostname": socket.gethostname(), "kernel": platform.release()},
            "command_line": self._command_line,
            "recorder": {
                **self._options,
                "pid": os.getpid(),
                **({"vcpu_sampler": self.vcpu_sampler.cost()} if self.vcpu_sampler else {}),
            },
            "source_endpoint": self.source,
            "endpoints": endpoints,
            "agents": {
                name: {"url": a.url, **a.summary.as_dict()} for name, a in self.agents.items()
            },
            "start": {"real_ns": start[0], "mono_ns": start[1], "utc": _iso(start[0])},
            "end": None,
            "stop_reason": self._stop_reason,
            "counts": {name: w.count for name, w in sorted(self._writers.items())},
            "vcpu_sampler": self.vcpu_sampler.endpoints() if self.vcpu_sampler else {},
            "notes": list(self._notes),
        }
        if end is not None:
            meta["end"] = {"real_ns": end[0], "mono_ns": end[1], "utc": _iso(end[0])}
            meta["duration_s"] = round((end[1] - start[1]) / 1e9, 3)
        meta.update(self._extra_meta)
        return meta

    def _write_meta(self, complete: bool) -> dict[str, Any]:
        meta = self._meta(complete)
        rundir.write_json_atomic(self.out / rundir.META, meta)
        return meta

    def _close_writers(self) -> None:
        for writer in self._writers.values():
            with contextlib.suppress(OSError):
                writer.close()

    # -- the run ----------------------------------------------------------------------------

    async def _connect_all(self) -> None:
        results = await asyncio.gather(
            *(e.connect() for e in self.endpoints.values()), return_exceptions=True
        )
        errors: list[BaseException] = []
        for endpoint, result in zip(self.endpoints.values(), results, strict=True):
            if isinstance(result, RecorderError) and self._options["reconnect"]:
                self._say(f"{endpoint.name}: not there yet ({result}); will retry")
            elif isinstance(result, BaseException):
                errors.append(result)
        if errors:
            for endpoint in self.endpoints.values():
                await endpoint.disconnect()
            first = errors[0]
            if isinstance(first, RecorderError):
                raise first
            raise RecorderError(f"cannot connect: {first!r}") from first

    def _open_streams(self) -> dict[str, IO[str]]:
        handles: dict[str, IO[str]] = {}
        for name, stream in self.streams.items():
            try:
                handles[name] = stream.open()
            except OSError as err:
                for fh in handles.values():
                    if fh is not sys.stdin:
                        fh.close()
                raise RecorderError(
                    f"--libvirt-events {stream.source}: {err.strerror or err}"
                ) from err
        return handles

    async def run(self, stop_event: asyncio.Event | None = None) -> RecorderResult:
        """Record until a stop condition (see the module docstring), then finish the run.

        :param stop_event: set it to stop the recording from outside.
        :raise RecorderError: when the run directory cannot be written or an endpoint
            cannot be reached at the start (meta.json then says why).
        :return: the run directory, the stop reason and the final meta.json content.
        """
        self._prepare_out()
        self._start = host_now()
        self._stop = asyncio.Event()
        self._open_writers()
        self._write_meta(False)
        try:
            await self._connect_all()
            handles = self._open_streams()
        except RecorderError as err:
            self._stop_reason = f"could not start: {err}"
            self._close_writers()
            self._write_meta(True)
            raise
        stop = self._stop
        if self.vcpu_sampler is not None:
            self.vcpu_sampler.start()
        self._qmp_tasks = [asyncio.ensure_future(e.run(stop)) for e in self.endpoints.values()]
        self._stream_tasks = [
            asyncio.ensure_future(s.run(stop, handles[n])) for n, s in self.streams.items()
        ]
        agent_tasks = [asyncio.ensure_future(a.run(stop)) for a in self.agents.values()]
        for task in [*self._qmp_tasks, *self._stream_tasks]:
            task.add_done_callback(self._component_done)
        watchers: list[asyncio.Future[Any]] = []
        if stop_event is not None:

            async def _external() -> None:
                await stop_event.wait()
                self.stop("stop requested")

            watchers.append(asyncio.ensure_future(_external()))
        duration = self._options["duration_ns"]
        if duration is not None:
            loop = asyncio.get_running_loop()
            self._duration_handle = loop.call_later(
                int(duration) / 1e9, self.stop, f"duration {int(duration) / 1e9:g}s"
            )
        await self._wait_ready()
        self._say(
            "recording "
            + ", ".join(
                [f"{n}={format_address(a)}" for n, a in self._qmp.items()]
                + [f"{n}={u}" for n, u in self._agents.items()]
                + [f"{n}=libvirt:{s}" for n, s in self._libvirt.items()]
            )
            + f" into {self.out}"
        )
        self.started.set()
        try:
            await stop.wait()
        except asyncio.CancelledError:
            self.stop("cancelled")
            raise
        finally:
            await self._finish([*self._qmp_tasks, *self._stream_tasks, *agent_tasks], watchers)
        reason = self._stop_reason or "stopped"
        meta = self._write_meta(True)
        return RecorderResult(self.out, reason, meta)

    async def _wait_ready(self) -> None:
        """Wait (bounded) until every connected endpoint has its events capability set."""
        waits = [
            asyncio.ensure_future(e.ready.wait())
            for e in self.endpoints.values()
            if e.summary.connected
        ]
        if not waits:
            return
        limit = 3 * int(self._options["command_timeout_ns"] or 0) / 1e9 + 1
        stopping = asyncio.ensure_future(self._stop.wait()) if self._stop else None
        _done, pending = await asyncio.wait(
            [asyncio.ensure_future(asyncio.wait(waits)), *([stopping] if stopping else [])],
            timeout=limit,
            return_when=asyncio.FIRST_COMPLETED,
        )
        for task in [*waits, *pending]:
            task.cancel()

    async def _finish(self, tasks: list[asyncio.Future[None]], watchers: list[Any]) -> None:
        if self._stop is not None:
            self._stop.set()
        for handle in (self._grace_handle, self._duration_handle):
            if handle is not None:
                handle.cancel()
        for watcher in watchers:
            watcher.cancel()
        pending: set[asyncio.Future[None]] = set()
        budget = max([SHUTDOWN_TIMEOUT_S, *(a.end_budget_s() for a in self.agents.values())])
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=budget)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, asyncio.InvalidStateError):
                exc = task.exception() if task.done() else None
                if exc is not None:
                    self._say(f"a recorder task failed: {exc!r}")
        for endpoint in self.endpoints.values():
            await endpoint.disconnect()
        if self.vcpu_sampler is not None:
            await asyncio.to_thread(self.vcpu_sampler.stop)
        self._close_writers()
        self._say(f"stopped: {self._stop_reason or 'stopped'}")
