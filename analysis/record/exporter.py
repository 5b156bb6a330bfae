"""The host migration exporter: ``tsprobe record --listen ADDR`` serves /metrics.

Prometheus scrapes the guest's agent for what the guest felt; this exporter gives it the
host's side, QEMU's migration state per QMP endpoint, so Grafana can lay the phases over
the guest's stalls (deploy/grafana/tsprobe-dashboard.json) and ``analysis.prom.source``
can cut a Prometheus time range into phases.

How it is fed
-------------
``MigrationExporter.observe(endpoint, record)`` is the recorder's record tap
(``Recorder(on_record=...)``): it sees every record written to ``qmp-NAME.jsonl``, in
order, the moment it is written. So the exporter knows exactly what the run directory
holds, nothing more: MIGRATION events (the status, with QEMU's timestamp), STOP and RESUME,
the polled ``query-migrate`` replies (bytes, rates, downtime, blocktime) and
``query-status`` replies (running or not), ``connected``, ``closed`` and ``timeout``
records. A poll reply whose request was sent before the last MIGRATION event carries an
older status than the event and does not override it (as in ``analysis.record.qmp_endpoint``).
The recorder writes a poll reply only when it changed, so the latest reply seen is the
latest QEMU gave.

``collect()`` (client_python's custom collector protocol) builds fresh families from a
snapshot taken under a lock: the tap runs in the recorder's event loop, scrapes in the
HTTP server's threads.

The metrics (every name starts ``tsprobe_migration_``; ``endpoint`` is the ``--qmp`` name)::

    tsprobe_migration_status{endpoint,status}        gauge    1 for the current status, 0 for
                                                              every other known one
    tsprobe_migration_status_code{endpoint}          gauge    the current status as a number
                                                              (STATUS_CODES; for state timelines)
    tsprobe_migration_status_started_timestamp_seconds{endpoint,status}
                                                     gauge    when the endpoint last entered
                                                              that status (QEMU's timestamp)
    tsprobe_migration_stop_timestamp_seconds{endpoint}    gauge  the last STOP event
    tsprobe_migration_resume_timestamp_seconds{endpoint}  gauge  the last RESUME event
    tsprobe_migration_vm_running{endpoint}           gauge    1 while the guest's vCPUs run there
    tsprobe_migration_monitor_up{endpoint}           gauge    1 while the QMP connection is up
    tsprobe_migration_qmp_timeouts_total{endpoint}   counter  commands unanswered in time
    tsprobe_migration_transferred_bytes_total{endpoint}   counter  ram.transferred
    tsprobe_migration_remaining_bytes{endpoint}      gauge    ram.remaining
    tsprobe_migration_ram_bytes{endpoint}            gauge    ram.total (the guest's RAM)
    tsprobe_migration_dirty_rate_bytes_per_second{endpoint}  gauge  dirty-pages-rate x page-size
    tsprobe_migration_throughput_bytes_per_second{endpoint}  gauge  QEMU's mbps, in bytes/s
    tsprobe_migration_dirty_syncs_total{endpoint}    counter  ram.dirty-sync-count (passes)
    tsprobe_migration_postcopy_requests_total{endpoint}  counter  ram.postcopy-requests
    tsprobe_migration_downtime_seconds{endpoint}     gauge    QEMU's downtime
    tsprobe_migration_expected_downtime_seconds{endpoint}  gauge
    tsprobe_migration_setup_time_seconds{endpoint}   gauge
    tsprobe_migration_total_time_seconds{endpoint}   gauge    QEMU's total-time
    tsprobe_migration_postcopy_blocktime_seconds{endpoint}  gauge  destination, with the
                                                              postcopy-blocktime capability
    tsprobe_migration_postcopy_vcpu_blocktime_seconds{endpoint,vcpu}  gauge  per vCPU
    tsprobe_migration_endpoint_info{endpoint,address,qemu,run}  gauge  always 1
    tsprobe_migration_agent_info{agent,url}          gauge    always 1: the guests recorded
    tsprobe_migration_recorder_start_time_seconds    gauge    when the exporter started

A figure QEMU does not report (``downtime`` before completion, blocktime without the
capability) is no sample, never a made-up 0. The status series exist from the start for
every known status (``analysis.rundir.qmp.KNOWN_STATUSES``); an unknown one adds its own series.

The ``*_started_timestamp_seconds`` and STOP/RESUME gauges keep exact phase boundaries
whatever the scrape interval: a status that lasted 3 ms is still in the next scrape as
the time it began. Only a status entered twice between two scrapes loses its first entry.

Serving: ``serve("127.0.0.1:9467")`` starts client_python's HTTP server in a daemon
thread on a private registry; the returned ``ExporterServer`` is closed at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from analysis.errors import RecorderError
from analysis.rundir.qmp import KNOWN_STATUSES, event_time
from probe.addresses import split_host_port
from probe.errors import AddressError

#: ``tsprobe_migration_status_code`` values, in the order a migration goes through them.
STATUS_CODES: dict[str, int] = {
    "none": 0,
    "setup": 1,
    "active": 2,
    "pre-switchover": 3,
    "device": 4,
    "wait-unplug": 5,
    "postcopy-active": 6,
    "postcopy-paused": 7,
    "postcopy-recover-setup": 8,
    "postcopy-recover": 9,
    "completed": 10,
    "failed": 11,
    "cancelling": 12,
    "cancelled": 13,
    "colo": 14,
}
#: The code of a status this version does not know.
UNKNOWN_CODE = -1

# query-migrate figures: JSON key -> (metric suffix, help, scale to base units).
_TIMES = (
    ("downtime", "downtime_seconds", "QEMU's downtime of the finished migration."),
    ("expected-downtime", "expected_downtime_seconds", "QEMU's downtime estimate."),
    ("setup-time", "setup_time_seconds", "QEMU's setup-time of the migration."),
    ("total-time", "total_time_seconds", "QEMU's total-time of the migration so far."),
    (
        "postcopy-blocktime",
        "postcopy_blocktime_seconds",
        "Time all vCPUs were blocked on postcopy faults (destination, capability on).",
    ),
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _qemu_time(record: Mapping[str, Any]) -> float:
    """A record's time in Unix seconds (``analysis.rundir.qmp.event_time``: QEMU's
    timestamp when usable, else the receive time), or now when it has neither."""
    ns = event_time(record)
    return ns / 1e9 if ns is not None else time.time()


@dataclass
class _Endpoint:
    """What the exporter knows about one endpoint (copied under the lock per scrape)."""

    status: str | None = None
    started: dict[str, float] = field(default_factory=dict)
    last_event_mono: int | None = None
    stop_s: float | None = None
    resume_s: float | None = None
    running: bool | None = None
    up: bool = False
    address: str = ""
    qemu: str = ""
    timeouts: int = 0
    migrate: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> _Endpoint:
        return _Endpoint(
            self.status,
            dict(self.started),
            self.last_event_mono,
            self.stop_s,
            self.resume_s,
            self.running,
            self.up,
            self.address,
            self.qemu,
            self.timeouts,
            dict(self.migrate),
        )


def _version_text(greeting: Any) -> str:
    if not isinstance(greeting, Mapping):
        return ""
    version = greeting.get("version")
    qemu = version.get("qemu") if isinstance(version, Mapping) else None
    if not isinstance(qemu, Mapping):
        return ""
    return f"{qemu.get('major')}.{qemu.get('minor')}.{qemu.get('micro')}"


class MigrationExporter:
    """A custom collector over the recorder's QMP records.

    :param endpoints: endpoint names known at the start (their series exist from the
        first scrape); others are added when their first record arrives.
    :param agents: agent name -> URL, exported as ``tsprobe_migration_agent_info``.
    :param run: the run directory, as the ``run`` label of the endpoint info.
    :param start_time_s: Unix time of the start (default: now).
    """

    def __init__(
        self,
        endpoints: Iterable[str] = (),
        agents: Mapping[str, str] | None = None,
        run: str = "",
        start_time_s: float | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._endpoints: dict[str, _Endpoint] = {name: _Endpoint() for name in endpoints}
        self._agents = dict(agents or {})
        self._run = run
        self._start_s = time.time() if start_time_s is None else start_time_s
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- the tap ------------------------------------------------------------------------

    def observe(self, endpoint: str, record: Mapping[str, Any]) -> None:
        """Take one record of ``qmp-ENDPOINT.jsonl`` into account (the recorder's tap).

        :param endpoint: the endpoint's name.
        :param record: the record as written; unknown types and fields are ignored.
        """
        with self._lock:
            state = self._endpoints.setdefault(endpoint, _Endpoint())
            kind = record.get("type")
            if kind == "event":
                self._on_event(state, record)
            elif kind == "reply":
                self._on_reply(state, record)
            elif kind == "connected":
                state.up = True
                state.address = str(record.get("address", ""))
                state.qemu = _version_text(record.get("greeting"))
            elif kind == "closed":
                state.up = False
            elif kind == "timeout":
                state.timeouts += 1

    def _set_status(self, state: _Endpoint, status: str, at_s: float) -> None:
        if status != state.status:
            state.status = status
            state.started[status] = at_s

    def _on_event(self, state: _Endpoint, record: Mapping[str, Any]) -> None:
        name = record.get("event")
        data = record.get("data")
        if name == "MIGRATION" and isinstance(data, Mapping) and "status" in data:
            mono = _number(record.get("host_mono_ns"))
            state.last_event_mono = int(mono) if mono is not None else time.monotonic_ns()
            self._set_status(state, str(data["status"]), _qemu_time(record))
        elif name == "STOP":
            state.stop_s = _qemu_time(record)
            state.running = False
        elif name == "RESUME":
            state.resume_s = _qemu_time(record)
            state.running = True

    def _on_reply(self, state: _Endpoint, record: Mapping[str, Any]) -> None:
        value = record.get("return")
        command = record.get("command")
        if command == "query-status" and isinstance(value, Mapping):
            running = value.get("running")
            if isinstance(running, bool):
                state.running = running
        if command != "query-migrate" or not isinstance(value, Mapping):
            return
        state.migrate = dict(value)
        mono = _number(record.get("host_mono_ns"))
        latency = _number(record.get("latency_ns")) or 0.0
        sent = None if mono is None else mono - latency
        # An event received after the request was sent is newer than the reply.
        if sent is None or state.last_event_mono is None or state.last_event_mono < sent:
            self._set_status(state, str(value.get("status", "none")), _qemu_time(record))

    # -- the scrape -----------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Build every family from a snapshot (the collector protocol).

        :return: the families, in a fixed order.
        """
        with self._lock:
            states = {name: s.copy() for name, s in sorted(self._endpoints.items())}
        yield from self._status_families(states)
        yield from self._vm_families(states)
        yield from self._figure_families(states)
        yield from self._info_families(states)

    def _status_families(self, states: Mapping[str, _Endpoint]) -> Iterator[Metric]:
        status = GaugeMetricFamily(
            "tsprobe_migration_status",
            "1 for the endpoint's current migration status, 0 for every other known status.",
            labels=["endpoint", "status"],
        )
        code = GaugeMetricFamily(
            "tsprobe_migration_status_code",
            "The current migration status as a number: " + _codes_text(),
            labels=["endpoint"],
        )
        started = GaugeMetricFamily(
            "tsprobe_migration_status_started_timestamp_seconds",
            "When the endpoint last entered the status (QEMU's event timestamp, Unix seconds).",
            labels=["endpoint", "status"],
        )
        for name, state in states.items():
            known = sorted(KNOWN_STATUSES | set(state.started), key=_status_order)
            for value in known:
                status.add_metric([name, value], 1.0 if value == state.status else 0.0)
            if state.status is not None:
                code.add_metric([name], float(STATUS_CODES.get(state.status, UNKNOWN_CODE)))
            for value, at in sorted(state.started.items(), key=lambda item: item[1]):
                started.add_metric([name, value], at)
        yield status
        yield code
        yield started

    def _vm_families(self, states: Mapping[str, _Endpoint]) -> Iterator[Metric]:
        stop = _gauge("stop_timestamp_seconds", "The endpoint's last STOP event, Unix seconds.")
        resume = _gauge(
            "resume_timestamp_seconds", "The endpoint's last RESUME event, Unix seconds."
        )
        running = _gauge(
            "vm_running", "1 while the guest's vCPUs run on the endpoint, 0 while stopped."
        )
        up = _gauge("monitor_up", "1 while the recorder's QMP connection to the endpoint is up.")
        timeouts = CounterMetricFamily(
            "tsprobe_migration_qmp_timeouts_total",
            "QMP commands the endpoint did not answer within the recorder's timeout.",
            labels=["endpoint"],
        )
        for name, state in states.items():
            _add(stop, name, state.stop_s)
            _add(resume, name, state.resume_s)
            _add(running, name, None if state.running is None else float(state.running))
            up.add_metric([name], 1.0 if state.up else 0.0)
            timeouts.add_metric([name], state.timeouts)
        yield from (stop, resume, running, up, timeouts)

    def _figure_families(self, states: Mapping[str, _Endpoint]) -> Iterator[Metric]:
        transferred = CounterMetricFamily(
            "tsprobe_migration_transferred_bytes",
            "RAM bytes sent so far by the current migration (query-migrate ram.transferred).",
            labels=["endpoint"],
        )
        syncs = CounterMetricFamily(
            "tsprobe_migration_dirty_syncs",
            "Dirty-bitmap syncs (precopy passes) of the current migration.",
            labels=["endpoint"],
        )
        requests = CounterMetricFamily(
            "tsprobe_migration_postcopy_requests",
            "Page requests the destination sent during postcopy.",
            labels=["endpoint"],
        )
        remaining = _gauge("remaining_bytes", "RAM bytes still to send (ram.remaining).")
        ram = _gauge("ram_bytes", "The guest's RAM size as migrated (ram.total).")
        dirty = _gauge(
            "dirty_rate_bytes_per_second", "Guest dirty rate (dirty-pages-rate x page-size)."
        )
        throughput = _gauge(
            "throughput_bytes_per_second", "QEMU's migration throughput (its mbps, in bytes/s)."
        )
        times = [(key, _gauge(suffix, doc)) for key, suffix, doc in _TIMES]
        vcpu = GaugeMetricFamily(
            "tsprobe_migration_postcopy_vcpu_blocktime_seconds",
            "Time each vCPU was blocked on postcopy faults (destination, capability on).",
            labels=["endpoint", "vcpu"],
        )
        for name, state in states.items():
            reply = state.migrate
            figures = reply.get("ram")
            ram_stats: Mapping[str, Any] = figures if isinstance(figures, Mapping) else {}
            _add(transferred, name, _number(ram_stats.get("transferred")))
            _add(syncs, name, _number(ram_stats.get("dirty-sync-count")))
            _add(requests, name, _number(ram_stats.get("postcopy-requests")))
            _add(remaining, name, _number(ram_stats.get("remaining")))
            _add(ram, name, _number(ram_stats.get("total")))
            rate, size = (_number(ram_stats.get(k)) for k in ("dirty-pages-rate", "page-size"))
            _add(dirty, name, None if rate is None or size is None else rate * size)
            mbps = _number(ram_stats.get("mbps"))
            _add(throughput, name, None if mbps is None else mbps * 1e6 / 8)
            for key, family in times:
                ms = _number(reply.get(key))
                _add(family, name, None if ms is None else ms / 1e3)
            per_vcpu = reply.get("postcopy-vcpu-blocktime")
            if isinstance(per_vcpu, list):
                for index, ms in enumerate(per_vcpu):
                    value = _number(ms)
                    if value is not None:
                        vcpu.add_metric([name, str(index)], value / 1e3)
        yield from (transferred, remaining, ram, dirty, throughput, syncs, requests)
        yield from (family for _, family in times)
        yield vcpu

    def _info_families(self, states: Mapping[str, _Endpoint]) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "tsprobe_migration_endpoint_info",
            "A recorded QMP endpoint: its address, QEMU version and run directory; always 1.",
            labels=["endpoint", "address", "qemu", "run"],
        )
        for name, state in states.items():
            info.add_metric([name, state.address, state.qemu, self._run], 1.0)
        agents = GaugeMetricFamily(
            "tsprobe_migration_agent_info",
            "A guest agent the recorder reads (its name and URL); always 1.",
            labels=["agent", "url"],
        )
        for name, url in sorted(self._agents.items()):
            agents.add_metric([name, url], 1.0)
        yield info
        yield agents
        yield GaugeMetricFamily(
            "tsprobe_migration_recorder_start_time_seconds",
            "When the recorder started, Unix seconds.",
            value=self._start_s,
        )

    # -- serving ------------------------------------------------------------------------

    def serve(self, listen: str) -> ExporterServer:
        """Serve /metrics on ``listen`` from a daemon thread.

        :param listen: ``HOST:PORT`` (``[::1]:9467`` for IPv6; port 0 picks a free one).
        :raise RecorderError: when the address is malformed or cannot be bound.
        :return: the running server (``close()`` it at the end).
        """
        host, port = parse_listen(listen)
        try:
            server, thread = start_http_server(port, host, registry=self.registry)
        except OSError as err:
            raise RecorderError(f"--listen {listen}: cannot listen: {err.strerror or err}") from err
        return ExporterServer(server, thread)


class ExporterServer:
    """A running /metrics server.

    :param server: client_python's WSGI server.
    :param thread: the thread running it.
    """

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def address(self) -> str:
        """``HOST:PORT`` actually bound (useful with port 0)."""
        host, port = self._server.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def parse_listen(text: str) -> tuple[str, int]:
    """Split a ``--listen`` value.

    :param text: ``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (all addresses).
    :raise RecorderError: when the port is missing or out of range (``probe.addresses``).
    :return: (host, port).
    """
    try:
        return split_host_port(text.strip(), "0.0.0.0", allow_zero=True)
    except AddressError as err:
        raise RecorderError(f"--listen {err}; expected HOST:PORT, e.g. 127.0.0.1:9467") from None


def _status_order(status: str) -> tuple[int, str]:
    return (STATUS_CODES.get(status, len(STATUS_CODES)), status)


def _codes_text() -> str:
    return ", ".join(f"{code} {name}" for name, code in STATUS_CODES.items()) + ", -1 unknown."


def _gauge(suffix: str, doc: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"tsprobe_migration_{suffix}", doc, labels=["endpoint"])


def _add(
    family: GaugeMetricFamily | CounterMetricFamily, endpoint: str, value: float | None
) -> None:
    if value is not None:
        family.add_metric([endpoint], value)
