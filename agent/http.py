"""The agent's read-only HTTP endpoint: /metrics, /events, /clock and /healthz.

A ``ThreadingHTTPServer`` with daemon threads, so a slow or stuck client never holds up a
scrape or the agent's exit. Every answer is computed from a ``Backend`` (the running
agent); the server holds no state of its own and writes no per-request log.

Endpoints (GET; HEAD answers the same headers without a body; other methods get 405):

``/metrics``
    The Prometheus text format (``Content-Type: text/plain; version=0.0.4``).
``/events?since=SEQ&limit=N``
    JSON Lines (``application/x-ndjson``), the events with ``seq > since`` in ``seq``
    order. ``since`` defaults to 0, ``limit`` to 1000 and is capped at 10000. A page
    comes with these headers:

    ``X-Tsprobe-Next-Since``  the ``since`` of the next request (last ``seq`` of the page,
                              or the newest ``seq`` when the page is empty)
    ``X-Tsprobe-Last-Seq``    the newest ``seq`` assigned so far
    ``X-Tsprobe-Oldest-Seq``  the oldest ``seq`` the agent still holds
    ``X-Tsprobe-Missed``      events after ``since`` that are gone from the ring
    ``X-Tsprobe-Agent-Id``    random per agent start: a new value means ``seq`` restarted
    ``X-Tsprobe-Boot-Id``     the guest kernel's boot id

    A malformed or unknown parameter is a 400 with a one-line reason.
``/clock``
    JSON: ``realtime_ns``, ``monotonic_ns``, ``boottime_ns`` read as close together as the
    guest allows (``read_clocks``), ``bracket_ns``, and from the backend ``clocksource``,
    ``boot_id``, ``agent_id`` and ``host_offset_ns`` when known. The clocks are read last,
    just before the response is written, so the host's send/receive bracket is tight.
``/healthz``
    JSON with per-probe health; always 200 while the agent runs (the body says which
    probe is down). ``samples`` gives each CPU's sampler iterations (as
    ``tsprobe_cpu_samples_total``), so a client can tell the samplers run without the
    cost of rendering /metrics, which a loaded TCG guest takes 1 to 4 s for. ``mono_ns``
    (the guest's CLOCK_MONOTONIC at the answer) and ``workers`` (per probe made of worker
    processes, each running unit's newest sign of life on that clock: every event it
    measured before is in the log) let a client that stops wait until nothing measured
    before its end is still on the way.

The agent id and boot id headers are on every response.

Connections: HTTP/1.1 keep-alive and pipelining. Each response leaves as one buffer and
sockets have TCP_NODELAY, so a kept-alive connection answers as fast as a new one (with
the headers sent apart from the body, Nagle's algorithm waited for the client's delayed
ACK on every request). The listen backlog (``LISTEN_BACKLOG``) holds a burst of connects.
Malformed requests get 400/414/431/405/404, never a 500; a client that resets its
connection is one rate-limited line on stderr, not a traceback. The limits and their
measurements are in docs/limits.md.
"""

from __future__ import annotations

import json
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs

from agent.errors import ListenError
from agent.eventlog import Page
from probe.addresses import split_host_port
from probe.errors import AddressError

DEFAULT_LISTEN = "0.0.0.0:9466"
DEFAULT_PAGE = 1000
MAX_PAGE = 10_000
#: The largest ``since``/``limit`` accepted (a ``seq`` is a signed 64-bit integer).
MAX_QUERY_INT = 2**63 - 1
MAX_DIGITS = len(str(MAX_QUERY_INT))
#: The listen backlog: a burst of connects (a Prometheus restart, a recorder's /clock
#: burst) waits in the kernel's queue instead of having its SYNs dropped (the client
#: retries a dropped SYN after 1 s, then 3 s).
LISTEN_BACKLOG = 1024
#: Least time between two log lines about clients that dropped their connection.
ERROR_LOG_INTERVAL_S = 10.0
#: Longest MONOTONIC..MONOTONIC bracket ``read_clocks`` accepts before retrying.
MAX_BRACKET_NS = 50_000

JSON_TYPE = "application/json"
JSONL_TYPE = "application/x-ndjson"


class Backend(Protocol):
    """What the server asks the running agent."""

    agent_id: str
    boot_id: str

    def metrics_body(self) -> tuple[bytes, str]:
        """The /metrics body and its Content-Type."""

    def event_page(self, since: int, limit: int) -> Page:
        """The /events page after ``since``."""

    def clock_info(self) -> dict[str, Any]:
        """The /clock fields other than the clock readings."""

    def health_report(self) -> dict[str, Any]:
        """The /healthz body."""


@dataclass(frozen=True)
class ClockReading:
    """MONOTONIC, REALTIME and BOOTTIME read together.

    :param monotonic_ns: the midpoint of the MONOTONIC bracket.
    :param realtime_ns: CLOCK_REALTIME inside the bracket.
    :param boottime_ns: CLOCK_BOOTTIME inside the bracket.
    :param bracket_ns: the bracket's length: the readings' uncertainty.
    :param tries: how many brackets were read.
    """

    monotonic_ns: int
    realtime_ns: int
    boottime_ns: int
    bracket_ns: int
    tries: int


def read_clocks(max_bracket_ns: int = MAX_BRACKET_NS, tries: int = 20) -> ClockReading:
    """Read MONOTONIC, REALTIME, BOOTTIME, MONOTONIC; retry while the bracket is long.

    A preemption between the reads (common under TCG) would otherwise skew the pairing.
    After ``tries`` attempts the shortest bracket seen is returned.

    :param max_bracket_ns: the longest acceptable bracket.
    :param tries: attempts before settling for the best.
    :return: the readings.
    """
    gettime = time.clock_gettime_ns
    mono, real, boot = time.CLOCK_MONOTONIC, time.CLOCK_REALTIME, time.CLOCK_BOOTTIME
    best: ClockReading | None = None
    for attempt in range(1, max(1, tries) + 1):
        m1 = gettime(mono)
        r = gettime(real)
        b = gettime(boot)
        m2 = gettime(mono)
        reading = ClockReading((m1 + m2) // 2, r, b, m2 - m1, attempt)
        if best is None or reading.bracket_ns < best.bracket_ns:
            best = reading
        if reading.bracket_ns <= max_bracket_ns:
            break
    assert best is not None
    return ClockReading(
        best.monotonic_ns, best.realtime_ns, best.boottime_ns, best.bracket_ns, attempt
    )


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6addr]:port`` for IPv6) into its parts.

    :param text: e.g. ``0.0.0.0:9466``, ``127.0.0.1:0``, ``[::]:9466``, ``:9466``.
    :raise ListenError: when the text is not of that form or the port is out of range
        (the rules of ``probe.addresses``).
    :return: (host, port); an empty host means every IPv4 address.
    """
    try:
        return split_host_port(text, "0.0.0.0", allow_zero=True)
    except AddressError as err:
        raise ListenError(f"invalid listen address {err} (e.g. 0.0.0.0:9466)") from None


class QueryError(ValueError):
    """A request's query string is malformed; the message is the 400 body."""


def parse_events_query(query: str) -> tuple[int, int]:
    """Validate the /events query string.

    :param query: the raw query, e.g. ``since=10&limit=100``.
    :raise QueryError: for an unknown or repeated parameter or a bad number (ASCII digits
        only, at most ``MAX_QUERY_INT``: ``since=²`` and a 5,000-digit ``since`` are 400s).
    :return: (since, limit), the limit capped at ``MAX_PAGE``.
    """
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as err:
        raise QueryError(f"malformed query string {query!r}") from err
    unknown = sorted(set(params) - {"since", "limit"})
    if unknown:
        raise QueryError(f"unknown parameter {unknown[0]!r}: /events takes since and limit")

    def number(name: str, default: int, minimum: int) -> int:
        values = params.get(name)
        if values is None:
            return default
        if len(values) > 1:
            raise QueryError(f"parameter {name!r} given more than once")
        text = values[0].strip()
        shown = text if len(text) <= 40 else f"{text[:40]}...({len(text)} characters)"
        if not (text.isascii() and text.isdigit()) or len(text) > MAX_DIGITS:
            raise QueryError(
                f"{name} must be an integer from {minimum} to {MAX_QUERY_INT}, got {shown!r}"
            )
        value = int(text)
        if not minimum <= value <= MAX_QUERY_INT:
            raise QueryError(
                f"{name} must be an integer from {minimum} to {MAX_QUERY_INT}, got {shown!r}"
            )
        return value

    since = number("since", 0, 0)
    limit = min(number("limit", DEFAULT_PAGE, 1), MAX_PAGE)
    return since, limit


class _Handler(BaseHTTPRequestHandler):
    """One request; the routes are the module's endpoints."""

    server: AgentHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "tsprobe"
    #: Seconds a client may take to send its request before its thread gives up.
    timeout = 30
    #: Responses are buffered and sent when complete (the handler flushes after each
    #: request): status line, headers and body leave in one send up to this size, instead
    #: of the headers alone first, which with Nagle's algorithm and the client's delayed
    #: ACK held every kept-alive answer back by about 40 ms. TCP_NODELAY (``setup``)
    #: covers larger bodies.
    wbufsize = 1 << 16

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging."""

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _not_allowed(self) -> None:
        # The request body (if any) is not read, so this connection cannot be reused.
        self.close_connection = True
        self._send(
            405,
            b"method not allowed: this endpoint is read-only (GET)\n",
            "text/plain",
            extra={"Allow": "GET, HEAD"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def setup(self) -> None:
        """Answer at once: no Nagle delay between a response and the next one."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _route(self, head: bool) -> None:
        # The request target is split by hand: urlsplit raises on targets such as
        # "//[" (an unclosed IPv6 netloc), and the routes are plain paths.
        path, _, query = self.path.partition("#")[0].partition("?")
        backend = self.server.backend
        try:
            if path == "/metrics":
                body, content_type = backend.metrics_body()
                self._send(200, body, content_type, head=head)
            elif path == "/events":
                self._events(query, head)
            elif path == "/clock":
                info = backend.clock_info()
                reading = read_clocks()
                payload = {
                    "realtime_ns": reading.realtime_ns,
                    "monotonic_ns": reading.monotonic_ns,
                    "boottime_ns": reading.boottime_ns,
                    "bracket_ns": reading.bracket_ns,
                    **info,
                }
                self._send(200, _json(payload), JSON_TYPE, head=head)
            elif path == "/healthz":
                self._send(200, _json(backend.health_report()), JSON_TYPE, head=head)
            else:
                self._send(
                    404,
                    b"not found: try /metrics, /events, /clock, /healthz\n",
                    "text/plain",
                    head=head,
                )
        except OSError as err:  # the client went away mid-answer
            self.close_connection = True
            self.server.note_client_error(self.client_address, err)
        except Exception as err:
            self.close_connection = True
            self._send(500, f"internal error: {err!r}\n".encode(), "text/plain", head=head)

    def _events(self, query: str, head: bool) -> None:
        try:
            since, limit = parse_events_query(query)
        except QueryError as err:
            self._send(400, f"bad request: {err}\n".encode(), "text/plain", head=head)
            return
        page = self.server.backend.event_page(since, limit)
        headers = {
            "X-Tsprobe-Next-Since": str(page.next_since),
            "X-Tsprobe-Last-Seq": str(page.last_seq),
            "X-Tsprobe-Oldest-Seq": str(page.oldest_seq),
            "X-Tsprobe-Missed": str(page.missed),
        }
        self._send(200, page.body(), JSONL_TYPE, head=head, extra=headers)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        head: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        if content_type in ("text/plain", JSON_TYPE, JSONL_TYPE):
            content_type += "; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.send_header("X-Tsprobe-Agent-Id", self.server.backend.agent_id)
        self.send_header("X-Tsprobe-Boot-Id", self.server.backend.boot_id)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _say_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _peer(client_address: Any) -> str:
    try:
        host, port = client_address[:2]
    except (TypeError, ValueError):
        return str(client_address)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


class AgentHTTPServer(ThreadingHTTPServer):
    """The threaded server; ``start()`` serves from a daemon thread.

    :param listen: ``host:port``; port 0 picks a free port (see ``port``).
    :param backend: the running agent.
    :raise ListenError: when the address is malformed or cannot be bound.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self, listen: str, backend: Backend, say: Callable[[str], None] | None = None
    ) -> None:
        host, port = parse_listen(listen)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.backend = backend
        self._say = say or _say_stderr
        self._error_lock = threading.Lock()
        self._last_error_log = -ERROR_LOG_INTERVAL_S
        self._errors_unsaid = 0
        self._thread: threading.Thread | None = None
        try:
            super().__init__((host, port), _Handler)
        except OSError as err:
            raise ListenError(f"cannot listen on {listen}: {err.strerror or err}") from err

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address (slow offline)."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A request that failed outside ``_route`` (the client reset the connection while
        its request was read): one line, not socketserver's traceback."""
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            self.note_client_error(client_address, err)
        else:
            self._say(f"tsprobe: http: request from {_peer(client_address)} failed: {err!r}")

    def note_client_error(self, client_address: Any, err: OSError) -> None:
        """Say that a client dropped its connection: at most one line per
        ``ERROR_LOG_INTERVAL_S``, counting the ones not said."""
        now = time.monotonic()
        with self._error_lock:
            if now - self._last_error_log < ERROR_LOG_INTERVAL_S:
                self._errors_unsaid += 1
                return
            more, self._errors_unsaid = self._errors_unsaid, 0
            self._last_error_log = now
        also = f" ({more} more since the last such line)" if more else ""
        reason = err.strerror or type(err).__name__
        self._say(f"tsprobe: http: client {_peer(client_address)}: {reason}{also}")

    @property
    def port(self) -> int:
        """The bound port (useful after asking for port 0)."""
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """A URL that reaches the server from this machine."""
        host = str(self.server_address[0])
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if self.address_family == socket.AF_INET else "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Serve requests from a daemon thread; return at once."""
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="tsprobe-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting requests and close the socket; requests in flight may finish."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server_close()
