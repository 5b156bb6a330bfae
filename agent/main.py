"""The agent: probes feed one event log, which feeds the metrics, the spool and HTTP.

::

    probes ──emit(RawEvent)──> EventLog ──> ring ──> GET /events
                                  │  └────> spool (events.jsonl, rotated)
                                  └──> AgentMetrics.observe ──> GET /metrics
    probes <──health(), samples(), host_offset_ns() at scrape time── AgentMetrics

Life cycle: ``Agent(config, probes, roots)`` does nothing yet. ``start()`` reads the boot
id, the online CPUs and the clocksource through ``roots``, opens the event log (an
unwritable spool is a ``ConfigError``), binds HTTP (``ListenError``), writes the
``agent_start`` event (always ``seq`` 1: version, pid, CPUs, the whole config, the
clocksource and one line per degraded capability), starts each probe (a probe that fails
to start is reported down; the agent keeps running), writes one ``probe_status`` event per
probe and prints one line per probe and per degraded capability to stderr. ``run()``
blocks until the duration elapses or SIGINT/SIGTERM arrives. ``stop()`` stops the probes,
writes ``agent_stop``, closes the spool and shuts HTTP down.

Probe health is gathered here, one probe at a time, so one probe whose ``health()`` raises
only takes its own ``tsprobe_probe_up`` series to 0. Probes disabled by a flag are reported
as off: 0 in ``tsprobe_probe_up``, but not a reason for /healthz to say "degraded".

The canaries (``--canaries``: ``timer``, ``heartbeat``, ``rpc``; ``agent.canaries``) and the
log watcher (``--watch-log``, ``probe.logwatch``) are probes like the others, named after
themselves; a canary's ``latency()`` feeds ``tsprobe_canary_latency_seconds{canary}`` at
scrape time, and the log watcher's names are the label universe of
``tsprobe_app_timeouts_total``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any, TypeVar

from agent.config import AgentConfig, resolve_cpus
from agent.errors import AgentError
from agent.eventlog import (
    EventLog,
    Page,
)
from agent.http import AgentHTTPServer
from agent.metrics import (
    CONTENT_TYPE,
    DEFAULT_CLOCKS,
    DEFAULT_PROBES,
    DEFAULT_WARNING_KINDS,
    AgentMetrics,
    ScrapeHooks,
    SyncReading,
)
from agent.registry import BY_NAME, LOGWATCH, PROBES
from agent.workers import Supervisor, stop_fork_server
from probe import __version__
from probe.base import Health, Probe, now_pair
from probe.errors import LogSpecError
from probe.events import RawEvent
from probe.logwatch import parse_log_spec
from probe.procfs import format_cpu_list
from probe.roots import Roots

#: The ``probe`` labels each built-in probe switched by flag reports in ``health()``.
PROBE_SOURCES: dict[str, tuple[str, ...]] = {
    spec.name: spec.labels for spec in PROBES if spec.switch == "flag"
}

#: How often ``run()`` looks for a signal when nothing woke it (a backstop: a signal or a
#: stop request writes to its pipe).
_POLL_S = 10.0
#: The signals that stop the agent cleanly.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _sync_reading(state: Any) -> SyncReading | None:
    """Turn the clock probe's ``sync_state()`` into a ``SyncReading``.

    Accepts a ``SyncReading``, or a mapping or object with ``synchronised`` (or
    ``synchronized``) and ``maxerror_ns`` (or ``maxerror_us``, adjtimex's own unit).
    """
    if state is None or isinstance(state, SyncReading):
        return state

    def field(*names: str) -> Any:
        for name in names:
            value = state.get(name) if isinstance(state, Mapping) else getattr(state, name, None)
            if value is not None:
                return value
        return None

    synced = field("synchronised", "synchronized")
    if not isinstance(synced, bool):
        return None
    maxerror = field("maxerror_ns")
    if not isinstance(maxerror, int):
        maxerror_us = field("maxerror_us")
        maxerror = maxerror_us * 1000 if isinstance(maxerror_us, int) else None
    return SyncReading(synced, maxerror)


_T = TypeVar("_T")


def _started(part: _T | None) -> _T:
    """A part the agent makes in ``start()``.

    :raise AgentError: before that.
    """
    if part is None:
        raise AgentError("the agent is not started")
    return part


def _say_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Agent:
    """The running agent (see the module docstring for its life cycle).

    :param config: the settings.
    :param probes: started probes' owners; each ``name`` should be unique.
    :param roots: where /proc, /sys and /dev are; defaults to ``config.roots()``.
    :param unavailable: probes that could not even be built, name -> reason.
    :param warning_kinds: the kernel warning kinds exported from the start.
    :param say: prints one line for the operator (stderr by default).
    :param agent_id: this start's id; random by default.
    :param wall_clock: Unix time in seconds (tests freeze it).
    """

    def __init__(
        self,
        config: AgentConfig,
        probes: Sequence[Probe],
        roots: Roots | None = None,
        *,
        unavailable: Mapping[str, str] | None = None,
        warning_kinds: Sequence[str] = DEFAULT_WARNING_KINDS,
        say: Callable[[str], None] = _say_stderr,
        agent_id: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.probes = list(probes)
        self.roots = roots if roots is not None else config.roots()
        self.unavailable = dict(unavailable or {})
        self.warning_kinds = tuple(warning_kinds)
        self.say = say
        self.agent_id = agent_id or os.urandom(8).hex()  # secrets would import hmac
        self.boot_id = ""
        self.cpus: list[int] = []
        self.degraded: list[str] = []
        self._wall_clock = wall_clock
        self._start_errors: dict[str, str] = {}
        self._started: list[Probe] = []
        self._sources: dict[str, tuple[str, ...]] = {
            probe.name: PROBE_SOURCES.get(probe.name, (probe.name,)) for probe in self.probes
        }
        self._log: EventLog | None = None
        self._metrics: AgentMetrics | None = None
        self._server: AgentHTTPServer | None = None
        self._state = "created"
        self._start_mono_ns = 0
        self._stop_requested = threading.Event()
        self._stop_reason = ""
        self._signalled = ""
        self._catching = False
        self._lock = threading.Lock()
        self._wake_w = -1  # run()'s self-pipe, written by request_stop and signal handlers

    # -- accessors --------------------------------------------------------------------

    @property
    def log(self) -> EventLog:
        """The event log (after ``start()``)."""
        return _started(self._log)

    @property
    def metrics(self) -> AgentMetrics:
        """The metrics collector (after ``start()``)."""
        return _started(self._metrics)

    @property
    def server(self) -> AgentHTTPServer:
        """The HTTP server (after ``start()``)."""
        return _started(self._server)

    @property
    def url(self) -> str:
        """The HTTP endpoint's base URL, as reachable from this machine."""
        return self.server.url

    def _probe(self, name: str) -> Any:
        for probe in self.probes:
            if probe.name == name:
                return probe
        return None

    # -- start --------------------------------------------------------------------------

    def start(self) -> None:
        """Open the log, bind HTTP, write ``agent_start``, start the probes, serve.

        :raise ConfigError: when the spool cannot be written, the listen address cannot be
            bound or a requested CPU is not online (nothing keeps running then).
        :raise AgentError: when called twice.
        """
        with self._lock:
            if self._state != "created":
                raise AgentError(f"start() on an agent that is {self._state}")
            self._state = "starting"
        try:
            self._start()
        except BaseException:
            self._abort()
            raise
        with self._lock:
            self._state = "running"
        self._wait_ready()
        self._report_probes()
        config = self.config
        where = config.events_path or "memory only (--events none)"
        self.say(
            f"tsprobe agent {__version__}: serving {self.server.url} (--listen {config.listen}),"
            f" cpus {format_cpu_list(self.cpus)}, events -> {where}"
        )

    def _start(self) -> None:
        config = self.config
        self.boot_id = self._read_boot_id()
        self.cpus = resolve_cpus(config.cpus, self.roots)
        clocksource = self._read_clocksource()
        self.degraded = self._capability_notes()
        self._log = log = EventLog(
            self.boot_id,
            config.events_path,
            ring_size=config.ring_size,
            max_spool_bytes=config.spool_max_bytes,
            keep_spools=config.spool_keep,
            warn=lambda line: self.say(f"tsprobe: {line}"),
        )
        self._server = server = AgentHTTPServer(config.listen, self, say=self.say)
        self._metrics = self._build_metrics()
        log.subscribe(self._metrics.observe)
        self._start_mono_ns, _ = now_pair()
        log.append(
            self._raw(
                "agent_start",
                version=__version__,
                pid=os.getpid(),
                agent_id=self.agent_id,
                cpus=self.cpus,
                config=config.to_dict(),
                clocksource=clocksource,
                degraded=self.degraded,
            )
        )
        for line in self.degraded:
            self.say(f"tsprobe: degraded: {line}")
        for probe in self.probes:
            self._started.append(probe)
            try:
                probe.start(self._emit)
            except Exception as err:
                self._start_errors[probe.name] = f"start failed: {err}"
        server.start()

    def _abort(self) -> None:
        """Undo a failed start: stop what was started, close the spool and the socket."""
        for probe in self._started:
            with contextlib.suppress(Exception):
                probe.stop()
        stop_fork_server()
        if self._server is not None:
            self._server.stop()
        if self._log is not None:
            self._log.close()
        with self._lock:
            self._state = "failed"

    def _raw(self, kind: str, duration_ns: int | None = None, **fields: Any) -> RawEvent:
        mono, real = now_pair()
        return RawEvent(kind, mono, real, duration_ns, fields)

    def _emit(self, raw: RawEvent) -> None:
        self.log.append(raw)

    def _read_boot_id(self) -> str:
        path = self.roots.proc_path("sys", "kernel", "random", "boot_id")
        try:
            boot_id = self.roots.read_text(path).strip()
        except OSError as err:
            self.degraded.append(f"boot id unreadable ({path}: {err.strerror}); using 'unknown'")
            return "unknown"
        return boot_id or "unknown"

    def _read_clocksource(self) -> str | None:
        path = self.roots.sys_path(
            "devices", "system", "clocksource", "clocksource0", "current_clocksource"
        )
        try:
            return self.roots.read_text(path).strip() or None
        except OSError:
            return None

    def _capability_notes(self) -> list[str]:
        """What this process may not do, known before any probe starts.

        Capabilities a probe tries for itself (SCHED_FIFO for the samplers, /dev/kmsg) are
        not guessed here: the probe reports what really happened, once, in its notes or
        its health.
        """
        notes = list(self.degraded)
        config = self.config
        euid = os.geteuid()
        if euid != 0:
            notes.append(f"running as uid {euid}, not root")
        if config.enabled("stall"):
            outside = sorted(set(self.cpus) - os.sched_getaffinity(0))
            if outside:
                notes.append(
                    f"CPU {format_cpu_list(outside)} outside this process's CPU affinity:"
                    " samplers cannot be pinned there"
                )
        return notes

    def _build_metrics(self) -> AgentMetrics:
        hooks = ScrapeHooks(
            health=self.probe_health,
            samples=self._samples,
            host_offset_ns=self._host_offset_ns,
            sync=self._sync,
            clocksource=self.clocksource,
            kmsg_lost=self._kmsg_lost,
            log_stats=self.log.stats,
            canary_latency=self._canary_latency,
        )
        return AgentMetrics(
            self.cpus,
            clocks=DEFAULT_CLOCKS,
            warning_kinds=self.warning_kinds,
            probes=self.probe_labels(),
            canaries=self.config.canaries,
            timeouts_ns=self.config.timeouts_ns,
            app_timeout_names=self._app_timeout_names(),
            info={"version": __version__, "boot_id": self.boot_id, "agent_id": self.agent_id},
            start_time_s=self._wall_clock(),
            hooks=hooks,
        )

    def _wait_ready(self, timeout_s: float = 5.0) -> None:
        """Give probes that start processes a moment, so the first report is not "starting"."""
        deadline = time.monotonic() + timeout_s
        for probe in self.probes:
            wait_ready = getattr(probe, "wait_ready", None)
            if callable(wait_ready):
                wait_ready(max(0.0, deadline - time.monotonic()))

    def _report_probes(self) -> None:
        health = self.probe_health()
        for label, entry in health.items():
            state = "up" if entry.up else f"down: {entry.detail}"
            self.say(f"tsprobe: probe {label}: {state}")
        for probe in self.probes:
            notes = self._notes(probe)
            for note in notes:
                self.say(f"tsprobe: {probe.name}: {note}")
            sources = self._sources[probe.name]
            self.log.append(
                self._raw(
                    "probe_status",
                    probe=probe.name,
                    health={
                        label: {"up": health[label].up, "detail": health[label].detail}
                        for label in sources
                        if label in health
                    },
                    notes=notes,
                )
            )

    @staticmethod
    def _notes(probe: Probe) -> list[str]:
        notes = getattr(probe, "notes", None)
        if not callable(notes):
            return []
        try:
            return [str(note) for note in notes()]
        except Exception as err:
            return [f"notes() failed: {err!r}"]

    # -- readings (scrape time) ---------------------------------------------------------

    def _off(self) -> dict[str, str]:
        """Labels that are off on purpose: disabled probes, probes not running."""
        off: dict[str, str] = {}
        running = {probe.name for probe in self.probes}
        running |= {s.name for s in PROBES if s.rides in running and self.config.enabled(s.name)}
        for name, sources in PROBE_SOURCES.items():
            if name not in running and name not in self.unavailable:
                reason = (
                    f"disabled (--no-{name})" if not self.config.enabled(name) else "not running"
                )
                for label in sources:
                    off[label] = reason
        for canary in self.config.canaries:
            carrier = BY_NAME[canary].rides if canary in BY_NAME else None
            if carrier and not self.config.enabled(carrier):
                off[canary] = f"disabled (rides the {carrier} probe: --no-{carrier})"
            elif canary not in running and canary not in self.unavailable:
                off[canary] = "not running"
        return off

    def probe_health(self) -> dict[str, Health]:
        """Every ``probe`` label's health; one failing probe never hides the others.

        :return: label -> health, in a stable order.
        """
        out: dict[str, Health] = {}
        for label, reason in self._off().items():
            out[label] = Health(False, reason)
        for name, reason in self.unavailable.items():
            for label in PROBE_SOURCES.get(name, (name,)):
                out[label] = Health(False, reason)
        for probe in self.probes:
            sources = self._sources[probe.name]
            error = self._start_errors.get(probe.name)
            reported: Mapping[str, Health] = {}
            if error is None:
                try:
                    reported = dict(probe.health())
                except Exception as err:
                    error = f"health() failed: {err!r}"
            if error is not None:
                for label in sources:
                    out[label] = Health(False, error)
                continue
            for label in sources:
                entry = reported.get(label)
                out[label] = entry if isinstance(entry, Health) else Health(False, "no report")
            for label, entry in reported.items():
                if label not in out and isinstance(entry, Health):
                    out[label] = entry
                    self._sources[probe.name] = (*self._sources[probe.name], label)
        order = {label: index for index, label in enumerate(self.probe_labels())}
        return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))

    def probe_labels(self) -> list[str]:
        """The ``probe`` label universe: built-in sources, the probes' own, the canaries.

        :return: labels in display order.
        """
        labels = list(DEFAULT_PROBES)
        for probe in self.probes:
            labels.extend(self._sources[probe.name])
        labels.extend(self.config.canaries)
        return list(dict.fromkeys(labels))

    def _hook(self, hook: str) -> list[tuple[str, Any]]:
        """(probe name, bound method) of each enabled probe that answers a scrape hook
        (``agent.registry.ProbeSpec.hooks``; a riding probe's method is its carrier's)."""
        out = []
        for spec in PROBES:
            if hook not in spec.hooks or not self.config.enabled(spec.name):
                continue
            method = getattr(self._probe(spec.rides or spec.name), spec.hooks[hook], None)
            if callable(method):
                out.append((spec.name, method))
        return out

    def _first(self, hook: str) -> Any:
        found = self._hook(hook)
        return found[0][1]() if found else None

    def _samples(self) -> Mapping[int, int] | None:
        result: Mapping[int, int] | None = self._first("samples")
        return result

    def _host_offset_ns(self) -> int | None:
        value = self._first("host_offset_ns")
        return value if isinstance(value, int) else None

    def _sync(self) -> SyncReading | None:
        found = self._hook("sync")
        return _sync_reading(found[0][1]()) if found else None

    def _canary_latency(self) -> Mapping[str, Any]:
        """Each running canary's latency histogram; a canary that fails is left out."""
        out: dict[str, Any] = {}
        for name, latency in self._hook("canary_latency"):
            with contextlib.suppress(Exception):
                out[name] = latency()
        return out

    def _app_timeout_names(self) -> list[str]:
        probe = self._probe(LOGWATCH)
        if probe is not None and callable(getattr(probe, "names", None)):
            return [str(name) for name in probe.names()]
        names: list[str] = []
        for text in self.config.watch_logs:
            try:
                names.append(parse_log_spec(text).name)
            except LogSpecError:
                continue
        return names

    def _kmsg_lost(self) -> int | None:
        value = self._first("kmsg_lost")
        return value if isinstance(value, int) else None

    def clocksource(self) -> str | None:
        """The current clocksource: the clock probe's view, else read from /sys.

        :return: e.g. ``kvm-clock``, or None when unknown.
        """
        try:
            value = self._first("clocksource")
        except Exception:
            value = None
        if isinstance(value, str) and value:
            return value
        return self._read_clocksource()

    # -- HTTP backend ------------------------------------------------------------------

    def metrics_body(self) -> tuple[bytes, str]:
        """The /metrics body and its Content-Type.

        :return: (exposition, content type).
        """
        return self.metrics.render(), CONTENT_TYPE

    def event_page(self, since: int, limit: int) -> Page:
        """The /events page after ``since``.

        :param since: the client's last seq.
        :param limit: the page size.
        :return: the page.
        """
        return self.log.since(since, limit)

    def clock_info(self) -> dict[str, Any]:
        """The /clock fields besides the clock readings.

        :return: clocksource, boot_id, agent_id and, when known, host_offset_ns.
        """
        info: dict[str, Any] = {
            "clocksource": self.clocksource(),
            "boot_id": self.boot_id,
            "agent_id": self.agent_id,
        }
        try:
            offset = self._host_offset_ns()
        except Exception:
            offset = None
        if offset is not None:
            info["host_offset_ns"] = offset
        return info

    def health_report(self) -> dict[str, Any]:
        """The /healthz body: per-probe health, the event log's state and notes.

        ``status`` is ``ok`` unless a probe that should run is down (``degraded``).
        ``mono_ns`` is the agent's CLOCK_MONOTONIC when it began the answer, ``workers``
        per probe made of workers how far each running unit has reported
        (``agent.workers.Supervisor.heard``) on that clock.

        :return: a JSON-ready dict.
        """
        mono = time.monotonic_ns()
        health = self.probe_health()
        off = self._off()
        stats = self.log.stats()
        down = [label for label, entry in health.items() if not entry.up and label not in off]
        notes = list(self.degraded)
        for probe in self.probes:
            notes.extend(f"{probe.name}: {note}" for note in self._notes(probe))
        return {
            "status": "degraded" if down or not stats.spool_ok else "ok",
            "version": __version__,
            "agent_id": self.agent_id,
            "boot_id": self.boot_id,
            "cpus": self.cpus,
            "probes": {
                label: {"up": entry.up, "detail": entry.detail, "off": label in off}
                for label, entry in health.items()
            },
            "down": down,
            "samples": {str(cpu): n for cpu, n in sorted((self._samples() or {}).items())},
            "mono_ns": mono,
            "workers": {
                probe.name: probe.heard() for probe in self.probes if isinstance(probe, Supervisor)
            },
            "events": {
                "last_seq": stats.last_seq,
                "oldest_seq": stats.oldest_seq,
                "ring_size": stats.ring_size,
                "dropped": stats.dropped,
                "spool": {
                    "path": stats.spool_path,
                    "bytes": stats.spool_bytes,
                    "errors": stats.spool_errors,
                    "error": stats.spool_error,
                },
            },
            "notes": notes,
        }

    # -- run and stop -------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """Make ``run()`` return (from any thread or a signal handler).

        :param reason: recorded in the ``agent_stop`` event.
        """
        if not self._stop_requested.is_set():
            self._stop_reason = reason
            self._stop_requested.set()
        self._wake()

    def _wake(self) -> None:
        """Wake ``run()`` (async-signal-safe: one write to a non-blocking pipe)."""
        with contextlib.suppress(OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"\0")

    @contextlib.contextmanager
    def stopping_on_signals(self) -> Iterator[None]:
        """Within the block, SIGINT and SIGTERM make ``run()`` return (main thread only).

        ``tsprobe agent`` wraps ``start()`` in it too: a supervisor may send SIGTERM as soon
        as the HTTP server answers, before ``run()`` is called, and the agent must still
        stop cleanly and write ``agent_stop``. A handler only records the signal (taking a
        lock inside a signal handler can deadlock) and writes a byte to ``run()``'s pipe.
        Nested use, and use from another thread, change nothing. The previous handlers come
        back on exit.
        """
        if self._catching or threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._signalled = signal.Signals(signum).name
            self._wake()

        previous = {signum: signal.signal(signum, on_signal) for signum in _STOP_SIGNALS}
        self._catching = True
        try:
            yield
        finally:
            self._catching = False
            for number, handler in previous.items():
                signal.signal(number, handler)

    def run(self, duration_ns: int | None = None) -> str:
        """Block until ``duration_ns`` elapsed, SIGINT/SIGTERM arrived or ``request_stop()``.

        Signals are caught as in ``stopping_on_signals()`` while it runs, and also when
        they arrived earlier inside that block.

        :param duration_ns: how long to run; None runs until a signal.
        :return: why it returned: ``duration``, ``SIGINT``, ``SIGTERM`` or the stop reason.
        """
        deadline = None if duration_ns is None else time.monotonic_ns() + max(0, duration_ns)
        wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with self.stopping_on_signals():
                while not self._stop_requested.is_set():
                    if self._signalled:
                        self.request_stop(self._signalled)
                        break
                    wait_s = _POLL_S  # a backstop only: signals and stops write to the pipe
                    if deadline is not None:
                        remaining = deadline - time.monotonic_ns()
                        if remaining <= 0:
                            self.request_stop("duration")
                            break
                        wait_s = min(wait_s, remaining / 1e9)
                    if select.select([wake_r], [], [], wait_s)[0]:
                        with contextlib.suppress(OSError):
                            os.read(wake_r, 64)
        finally:
            wake_w, self._wake_w = self._wake_w, -1
            os.close(wake_r)
            os.close(wake_w)
        return self._stop_reason

    def stop(self) -> None:
        """Stop the probes, write ``agent_stop``, close the spool, shut HTTP down.

        Safe to call more than once and after a failed ``start()``.
        """
        with self._lock:
            if self._state != "running":
                return
            self._state = "stopping"
        for probe in self.probes:
            try:
                probe.stop()
            except Exception as err:
                self.say(f"tsprobe: stopping probe {probe.name} failed: {err!r}")
        stop_fork_server()
        log = self.log
        stats = log.stats()
        mono, _ = now_pair()
        log.append(
            self._raw(
                "agent_stop",
                reason=self._stop_reason or "stopped",
                uptime_ns=mono - self._start_mono_ns,
                dropped=stats.dropped,
                spool_errors=stats.spool_errors,
            )
        )
        log.close()
        self.server.stop()
        with self._lock:
            self._state = "stopped"

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
