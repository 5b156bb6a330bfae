"""Record one QEMU QMP monitor: every event as it arrives, and polled migration state.

One ``QmpEndpoint`` owns one ``qemu.qmp.QMPClient`` connection and appends to one
``qmp-NAME.jsonl`` (see docs/run-directory.md for every record type). What it relies on:

- **One client per monitor.** A ``-qmp`` socket serves a single client; a second client's
  connect succeeds at the socket level but gets no greeting until the first leaves. So the
  connect (greeting plus ``qmp_capabilities``) has its own timeout, and a libvirt guest
  needs a monitor of its own for the recorder (``<qemu:commandline>``).
- **Out-of-band.** ``qemu.qmp`` enables the ``oob`` capability when the greeting offers it;
  with it the monitor's I/O runs in its own thread, so events keep arriving while QEMU's
  main loop is busy or hung (a destination while postcopy-paused, QEMU issue 1052).
- **Events need the ``events`` migration capability.** Without it there are no
  ``MIGRATION`` events. The endpoint reads ``query-migrate-capabilities`` and turns the
  capability on only when it is off (recording that it did); ``enable_events=False`` never
  changes the VM's configuration. Events are broadcast to every monitor, so turning it on
  from the recorder's monitor serves the other clients too.
- **QMP's timestamp.** Every event carries ``{"seconds", "microseconds"}`` from QEMU's host
  wall clock; it is recorded as sent, next to this host's realtime and monotonic receive
  times, taken in the connection's reader task before anything else happens.
- **Commands can hang.** ``query-migrate`` and ``query-status`` are polled every
  ``poll_ns``. A command not answered within ``command_timeout_ns`` becomes a ``timeout``
  record; the poller then keeps waiting for that one reply (QEMU answers in order, and
  piling up requests would only fill its queue: with 8 in-band requests queued QEMU stops
  reading the monitor, out-of-band commands included) and records it, marked ``late``,
  when it comes. Event capture never waits for the poller.
- **The vCPU threads.** After setup, and again after every migration status change and
  every ``RESUME`` (when thread ids can change: start, switchover, recovery), the endpoint
  asks ``query-cpus-fast`` (at most one in flight) and hands ``on_vcpus`` the QEMU's pid
  (the unix socket's peer credentials, ``SO_PEERCRED``; ``None`` over TCP) and the vCPU
  thread ids; ``on_runstate`` gets whether the VM runs from ``STOP``/``RESUME`` and from
  ``query-status`` replies not overtaken by such an event. The recorder's vCPU sampler
  (``vcpu_sampler``) feeds on both.
- **A QEMU that exits closes the socket.** That becomes a ``closed`` record with the
  reason; with ``reconnect`` the endpoint then retries until the socket answers again.

To keep files small a poll reply is recorded only when it differs from the last one
recorded for that command, when it came late, or when a second has passed since.
Skipped identical replies are counted in the next reply record's ``unchanged`` field.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import EventListener, ExecuteError, Message, QMPClient, QMPError, Runstate

from analysis.errors import RecorderError
from analysis.rundir import JsonlWriter, host_now
from probe.addresses import split_host_port
from probe.errors import AddressError

#: Commands polled every period, in this order.
POLL_COMMANDS = ("query-migrate", "query-status")
#: A poll reply identical to the last recorded one is still recorded after this long.
REPLY_REFRESH_NS = 1_000_000_000
#: Pause between reconnect attempts.
RECONNECT_PERIOD_S = 0.5

Address = str | tuple[str, int]


def parse_address(text: str) -> Address:
    """Turn a ``--qmp`` socket argument into what ``QMPClient.connect`` takes.

    :param text: a unix socket path (``/run/a.qmp``, ``unix:/run/a.qmp``) or ``HOST:PORT``
        (``127.0.0.1:4444``, ``tcp:127.0.0.1:4444``, ``[::1]:4444``).
    :raise RecorderError: when the text is empty or the port is not a number.
    :return: the path, or a (host, port) tuple.
    """
    spec = text.strip()
    if spec.startswith("unix:"):
        spec = spec[len("unix:") :]
        if not spec:
            raise RecorderError(f"invalid QMP address {text!r}: empty socket path")
        return spec
    is_tcp = spec.startswith("tcp:")
    if is_tcp:
        spec = spec[len("tcp:") :]
    if not spec:
        raise RecorderError(f"invalid QMP address {text!r}: empty")
    _host, sep, _port = spec.rpartition(":")
    if not is_tcp and ("/" in spec or not sep):
        return spec
    try:
        return split_host_port(spec, "127.0.0.1")
    except AddressError as err:
        raise RecorderError(
            f"invalid QMP address {err}; expected a socket path or HOST:PORT"
        ) from None


def format_address(address: Address) -> str:
    """The address as users write it (for records and messages)."""
    if isinstance(address, tuple):
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return address


@dataclass(frozen=True)
class StatusChange:
    """A migration status seen on an endpoint that differs from the one seen before.

    :param endpoint: the endpoint's name (``src``, ``dst``, ...).
    :param status: the new status (``setup``, ``active``, ``completed``, ...).
    :param previous: the status seen before, ``None`` for the first one.
    :param via: ``event`` (a MIGRATION event) or ``poll`` (a query-migrate reply).
    :param host_real_ns: host CLOCK_REALTIME when it was received.
    :param host_mono_ns: host CLOCK_MONOTONIC when it was received.
    """

    endpoint: str
    status: str
    previous: str | None
    via: str
    host_real_ns: int
    host_mono_ns: int


StatusCallback = Callable[[StatusChange], None]
NoteCallback = Callable[[str, str], None]
#: (endpoint name, QEMU pid or None, vCPU index -> thread id).
VcpusCallback = Callable[[str, int | None, dict[int, int]], None]
#: (endpoint name, whether the VM runs).
RunstateCallback = Callable[[str, bool], None]


def peer_pid(client: QMPClient) -> int | None:
    """The pid of the process at the other end of a unix-socket QMP connection.

    :return: the pid from ``SO_PEERCRED``, or ``None`` over TCP or when unavailable.
    """
    writer = getattr(client, "_writer", None)
    sock = writer.get_extra_info("socket") if writer is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = int(struct.unpack("3i", raw)[0])
    return pid if pid > 0 else None


def vcpu_threads(reply: Any) -> dict[int, int]:
    """vCPU index -> host thread id from a ``query-cpus-fast`` reply (bad entries skipped).

    >>> vcpu_threads([{"cpu-index": 0, "thread-id": 4337}, {"cpu-index": 1}])
    {0: 4337}
    """
    threads: dict[int, int] = {}
    for cpu in reply if isinstance(reply, list) else []:
        if not isinstance(cpu, dict):
            continue
        index, tid = cpu.get("cpu-index"), cpu.get("thread-id")
        if isinstance(index, int) and isinstance(tid, int) and 0 <= index < 4096 and tid > 0:
            threads[index] = tid
    return threads


class _Closed(Exception):
    """The connection went away while a command was outstanding."""


class _StampingListener(EventListener):
    """Hands every event to a sink with the host times of its receipt.

    ``put`` runs in the client's reader task as soon as a message is parsed, so the
    stamp is taken before any other task runs. Events are not queued (the sink writes
    them), which also keeps a long recording's memory flat.
    """

    def __init__(self, sink: Callable[[Message, int, int], None]) -> None:
        super().__init__()
        self._sink = sink

    async def put(self, event: Message) -> None:
        real, mono = host_now()
        self._sink(event, real, mono)


@dataclass
class EndpointSummary:
    """What meta.json says about one endpoint."""

    address: str
    connected: bool = False
    greeting: dict[str, Any] | None = None
    oob: bool | None = None
    version: dict[str, Any] | None = None
    events_capability: str | None = None
    statuses: list[str] = field(default_factory=list)
    first_status: str | None = None
    last_status: str | None = None
    timeouts: int = 0
    errors: int = 0
    connects: int = 0
    closed_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "connected": self.connected,
            "greeting": self.greeting,
            "oob": self.oob,
            "version": self.version,
            "events_capability": self.events_capability,
            "statuses": list(self.statuses),
            "first_status": self.first_status,
            "last_status": self.last_status,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "connects": self.connects,
            "closed_reason": self.closed_reason,
        }


class QmpEndpoint:
    """Records one QMP monitor into a JSONL file until told to stop.

    :param name: the endpoint's name (``src``, ``dst``); used in messages.
    :param address: a unix socket path or (host, port).
    :param writer: where records go (``qmp-NAME.jsonl``).
    :param poll_ns: period of the ``query-migrate`` / ``query-status`` polls.
    :param command_timeout_ns: how long a command may take before a ``timeout`` record.
    :param connect_timeout_ns: how long connecting (greeting, negotiation) may take.
    :param enable_events: turn the ``events`` migration capability on when it is off.
    :param reconnect: after the connection closes, retry until the socket answers.
    :param on_status: called with every status change (from events or polls).
    :param on_note: called with (endpoint name, message) for things worth a status line.
    :param on_vcpus: called with (name, QEMU pid, vCPU threads) after each
        ``query-cpus-fast``.
    :param on_runstate: called with (name, VM running) when QMP tells it.
    """

    def __init__(
        self,
        name: str,
        address: Address,
        writer: JsonlWriter,
        *,
        poll_ns: int = 100_000_000,
        command_timeout_ns: int = 1_000_000_000,
        connect_timeout_ns: int = 5_000_000_000,
        enable_events: bool = True,
        reconnect: bool = False,
        on_status: StatusCallback | None = None,
        on_note: NoteCallback | None = None,
        on_vcpus: VcpusCallback | None = None,
        on_runstate: RunstateCallback | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self._writer = writer
        self._poll_s = poll_ns / 1e9
        self._timeout_s = command_timeout_ns / 1e9
        self._connect_timeout_s = connect_timeout_ns / 1e9
        self._timeout_ns = command_timeout_ns
        self._enable_events = enable_events
        self._reconnect = reconnect
        self._on_status = on_status
        self._on_note = on_note
        self._on_vcpus = on_vcpus
        self._on_runstate = on_runstate
        self._vcpu_query: asyncio.Future[dict[int, int]] | None = None
        self._last_runstate_event_mono = 0
        #: The QEMU's pid from the socket's peer credentials (``None`` over TCP).
        self.pid: int | None = None
        self._client: QMPClient | None = None
        self.status: str | None = None
        self._last_migration_event_mono = 0
        self._last_reply: dict[str, Any] = {}
        self._last_reply_mono: dict[str, int] = {}
        self._unchanged: dict[str, int] = {}
        self.summary = EndpointSummary(format_address(address))
        #: Set once a connection's setup (versions, ``events`` capability) is done.
        self.ready = asyncio.Event()

    # -- records ----------------------------------------------------------------------

    def _write(self, record: dict[str, Any]) -> None:
        self._writer.write_stamped(record)

    def _note(self, note: str, message: str, **extra: Any) -> None:
        self._write({"type": "note", "note": note, "message": message, **extra})
        if self._on_note is not None:
            self._on_note(self.name, message)

    def _set_status(self, status: str, via: str, real: int, mono: int) -> None:
        if status == self.status:
            return
        previous, self.status = self.status, status
        if self.summary.first_status is None:
            self.summary.first_status = status
        self.summary.last_status = status
        if self._on_status is not None:
            change = StatusChange(self.name, status, previous, via, real, mono)
            try:
                self._on_status(change)
            except Exception as err:  # a callback's bug must not stop the recording
                self._write({"type": "error", "error": f"status callback failed: {err!r}"})

    def _on_event(self, msg: Message, real: int, mono: int) -> None:
        record: dict[str, Any] = {"type": "event", "event": msg.get("event")}
        if "data" in msg:
            record["data"] = msg["data"]
        record["timestamp"] = msg.get("timestamp")
        record["host_real_ns"] = real
        record["host_mono_ns"] = mono
        self._writer.write(record)
        data = msg.get("data")
        if msg.get("event") in ("STOP", "RESUME"):
            self._last_runstate_event_mono = mono
            self._tell_runstate(msg.get("event") == "RESUME")
            if msg.get("event") == "RESUME":
                self._query_vcpus_soon()
        if msg.get("event") == "MIGRATION" and isinstance(data, dict):
            status = str(data.get("status"))
            self._last_migration_event_mono = mono
            self.summary.statuses.append(status)
            self._set_status(status, "event", real, mono)
            self._query_vcpus_soon()

    def _tell_runstate(self, running: bool) -> None:
        if self._on_runstate is not None:
            with contextlib.suppress(Exception):  # a callback's bug must not stop the recording
                self._on_runstate(self.name, running)

    # -- vCPU threads -------------------------------------------------------------------

    def _query_vcpus_soon(self) -> None:
        """Ask ``query-cpus-fast`` in a task of its own, unless one is already in flight."""
        if self._on_vcpus is None or self._client is None:
            return
        if self._vcpu_query is not None and not self._vcpu_query.done():
            return
        self._vcpu_query = asyncio.ensure_future(self.query_vcpus())

    async def query_vcpus(self) -> dict[int, int]:
        """Ask QEMU for its vCPU threads, record the reply and hand them to ``on_vcpus``.

        :return: vCPU index -> thread id (empty when QEMU refused or went away).
        """
        try:
            value, late, latency = await self._execute("query-cpus-fast")
        except (ExecuteError, _Closed):
            return {}
        self._record_reply("query-cpus-fast", value, late, latency)
        threads = vcpu_threads(value)
        if threads and self._on_vcpus is not None:
            try:
                self._on_vcpus(self.name, self.pid, threads)
            except Exception as err:  # a callback's bug must not stop the recording
                self._write({"type": "error", "error": f"vcpus callback failed: {err!r}"})
        return threads

    # -- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and negotiate (greeting, ``qmp_capabilities`` with oob when offered).

        :raise RecorderError: when the socket cannot be reached or does not greet in time.
        """
        client = QMPClient(f"tsprobe-{self.name}")
        where = format_address(self.address)
        try:
            await asyncio.wait_for(client.connect(self.address), self._connect_timeout_s)
        except TimeoutError as err:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 1)
            raise RecorderError(
                f"QMP {self.name}={where}: no QMP greeting within "
                f"{self._connect_timeout_s:g}s (another client may hold this monitor; "
                "give the recorder its own -qmp socket)"
            ) from err
        except QMPError as err:
            cause = err.__cause__ or err
            detail = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
            raise RecorderError(f"QMP {self.name}={where}: cannot connect: {detail}") from err
        self._client = client
        self.pid = peer_pid(client)
        client.register_listener(_StampingListener(self._on_event))
        greeting = client.greeting
        capabilities = list(greeting.QMP.capabilities) if greeting is not None else []
        version = dict(greeting.QMP.version) if greeting is not None else None
        self.summary.connected = True
        self.summary.connects += 1
        self.summary.greeting = {"version": version, "capabilities": capabilities}
        self.summary.oob = "oob" in capabilities
        self._write(
            {
                "type": "connected",
                "address": where,
                "greeting": self.summary.greeting,
                "oob": self.summary.oob,
                "attempt": self.summary.connects,
            }
        )

    async def disconnect(self) -> None:
        """Close the connection (bounded in time; a hung monitor cannot block it)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2)

    async def _wait_closed(self) -> str:
        client = self._client
        assert client is not None
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        try:
            await client.disconnect()
        except EOFError:
            return "QEMU closed the connection (end of file)"
        except Exception as err:
            return f"{type(err).__name__}: {err}".rstrip(": ")
        finally:
            self._client = None
        return "connection closed"

    # -- commands -----------------------------------------------------------------------

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command, recording a ``timeout`` when slow and waiting on for the reply.

        :param command: the QMP command.
        :param arguments: its arguments.
        :raise ExecuteError: when QEMU answers with an error (recorded as ``error``).
        :raise RecorderError: when the endpoint is not connected or the connection went
            away before the reply.
        :return: the reply's ``return`` member.
        """
        try:
            value, _late, _latency = await self._execute(command, arguments)
        except _Closed as err:
            raise RecorderError(f"QMP {self.name}: not connected ({command})") from err
        return value

    async def _execute(
        self, command: str, arguments: dict[str, Any] | None = None
    ) -> tuple[Any, bool, int]:
        client = self._client
        if client is None or client.runstate != Runstate.RUNNING:
            raise _Closed(command)
        _sent_real, sent_mono = host_now()
        task = asyncio.ensure_future(client.execute(command, arguments))
        late = False
        try:
            done, _ = await asyncio.wait({task}, timeout=self._timeout_s)
            if not done:
                late = True
                self.summary.timeouts += 1
                self._write(
                    {
                        "type": "timeout",
                        "command": command,
                        "timeout_ns": self._timeout_ns,
                        "sent_mono_ns": sent_mono,
                    }
                )
                if self._on_note is not None:
                    self._on_note(
                        self.name, f"{command} unanswered after {self._timeout_s:g}s; waiting"
                    )
                await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            raise
        latency = time.monotonic_ns() - sent_mono
        try:
            value = task.result()
        except ExecuteError as err:
            self.summary.errors += 1
            self._write(
                {
                    "type": "error",
                    "command": command,
                    "error": {"class": err.error_class, "desc": str(err)},
                    "latency_ns": latency,
                }
            )
            raise
        except QMPError as err:
            raise _Closed(command) from err
        if late and self._on_note is not None:
            self._on_note(self.name, f"{command} answered after {latency / 1e9:.1f}s")
        return value, late, latency

    def _record_reply(
        self, command: str, value: Any, late: bool, latency: int, force: bool = False
    ) -> None:
        now = time.monotonic_ns()
        last = self._last_reply.get(command)
        stale = now - self._last_reply_mono.get(command, 0) >= REPLY_REFRESH_NS
        if not (force or late or stale or command not in self._last_reply or value != last):
            self._unchanged[command] = self._unchanged.get(command, 0) + 1
            return
        record: dict[str, Any] = {"type": "reply", "command": command, "return": value}
        record["latency_ns"] = latency
        if late:
            record["late"] = True
        skipped = self._unchanged.pop(command, 0)
        if skipped:
            record["unchanged"] = skipped
        self._write(record)
        self._last_reply[command] = value
        self._last_reply_mono[command] = now

    async def _setup(self) -> None:
        """Versions and the ``events`` capability, once per connection."""
        try:
            value, late, latency = await self._execute("query-version")
            self._record_reply("query-version", value, late, latency, force=True)
            if isinstance(value, dict):
                self.summary.version = value
        except ExecuteError:
            pass
        try:
            caps, late, latency = await self._execute("query-migrate-capabilities")
        except ExecuteError:
            return
        self._record_reply("query-migrate-capabilities", caps, late, latency, force=True)
        state = {c.get("capability"): c.get("state") for c in caps if isinstance(c, dict)}
        if state.get("events"):
            self.summary.events_capability = "on"
            self._note("events-on", "events capability already on")
            return
        if not self._enable_events:
            self.summary.events_capability = "off"
            self._note(
                "events-off",
                "events capability is off and left off (--no-enable-events): "
                "statuses come from polling only",
            )
            return
        arguments = {"capabilities": [{"capability": "events", "state": True}]}
        try:
            value, late, latency = await self._execute("migrate-set-capabilities", arguments)
        except ExecuteError as err:
            self.summary.events_capability = "off"
            self._note(
                "events-enable-failed",
                f"could not turn the events capability on ({err}): statuses come from polling only",
            )
            return
        self._record_reply("migrate-set-capabilities", value, late, latency, force=True)
        self.summary.events_capability = "enabled by recorder"
        self._note("events-enabled", "events capability was off: the recorder turned it on")

    async def _poll_once(self, command: str) -> None:
        _real0, sent_mono = host_now()
        try:
            value, late, latency = await self._execute(command)
        except ExecuteError:
            return
        self._record_reply(command, value, late, latency)
        # An event received after this poll was sent is newer than the reply.
        fresh = self._last_migration_event_mono < sent_mono
        if command == "query-migrate" and isinstance(value, dict) and fresh:
            real, mono = host_now()
            self._set_status(str(value.get("status", "none")), "poll", real, mono)
        running = value.get("running") if isinstance(value, dict) else None
        # Likewise a STOP or RESUME received after this poll was sent.
        newest = self._last_runstate_event_mono < sent_mono
        if command == "query-status" and isinstance(running, bool) and newest:
            self._tell_runstate(running)

    async def _poll_loop(self) -> None:
        try:
            await self._setup()
        finally:
            self.ready.set()
        if self._on_vcpus is not None:
            await self.query_vcpus()
        next_at = time.monotonic()
        while True:
            for command in POLL_COMMANDS:
                await self._poll_once(command)
            next_at += self._poll_s
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    # -- the recording --------------------------------------------------------------------

    async def _session(self, stop: asyncio.Event) -> bool:
        """Poll until the connection closes (record it, return False) or ``stop``."""
        poller = asyncio.ensure_future(self._poll_loop())
        closed = asyncio.ensure_future(self._wait_closed())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait(
                {poller, closed, stopped}, return_when=asyncio.FIRST_COMPLETED
            )
            if poller in done and not stop.is_set():
                # The poller ends early when the connection went away (or on a bug):
                # events may still be arriving, so wait for the close or the stop.
                await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (poller, stopped, self._vcpu_query):
                if task is not None:
                    task.cancel()
            with contextlib.suppress(BaseException):
                await poller
        if poller.done() and not poller.cancelled() and poller.exception() is not None:
            exc = poller.exception()
            if not isinstance(exc, _Closed):
                self._write({"type": "error", "error": f"poller failed: {exc!r}"})
        if closed.done():
            reason = closed.result()
            self._record_closed(reason)
            return False
        closed.cancel()
        with contextlib.suppress(BaseException):
            await closed
        return True

    def _record_closed(self, reason: str) -> None:
        self.summary.connected = False
        self.summary.closed_reason = reason
        self._write({"type": "closed", "reason": reason, "last_status": self.status})
        if self._on_note is not None:
            self._on_note(self.name, f"closed: {reason}")

    async def _reconnect_loop(self, stop: asyncio.Event) -> bool:
        """Retry until connected (True) or ``stop`` (False)."""
        noted = False
        while not stop.is_set():
            path_missing = isinstance(self.address, str) and not os.path.exists(self.address)
            if not path_missing:
                try:
                    await self.connect()
                    return True
                except RecorderError as err:
                    if not noted:
                        self._note("reconnecting", f"reconnecting: {err}")
                        noted = True
            elif not noted:
                self._note("reconnecting", "waiting for the socket to reappear")
                noted = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RECONNECT_PERIOD_S)
        return False

    async def run(self, stop: asyncio.Event) -> None:
        """Record until ``stop`` is set, or the connection closes (without ``reconnect``).

        Call ``connect()`` first, or pass ``reconnect=True`` to let ``run`` connect.

        :param stop: set it to end the recording; a ``note`` record says so.
        """
        while not stop.is_set():
            if self._client is None and (
                not self._reconnect or not await self._reconnect_loop(stop)
            ):
                break
            if await self._session(stop):
                break
        if self._client is not None:
            await self.disconnect()
            self.summary.connected = False
            self._write({"type": "note", "note": "stopped", "message": "recorder stopped"})
