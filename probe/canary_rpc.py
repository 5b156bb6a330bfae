"""The ``rpc`` canary: request/response over loopback TCP, each request with a deadline.

What it measures
    What a client of a local service feels: the round trip of a small request over TCP
    (``127.0.0.1``, ``TCP_NODELAY``), with the client and the server pinned to different
    CPUs when there are two. A stall of the server's CPU holds the answer back; a stall of
    the client's CPU holds back the client's noticing it. Either way a caller with a
    deadline ``T`` shorter than the round trip gives up: one deadline miss per ``T``.

How
    The agent binds a listening socket to ``127.0.0.1`` on a free port and starts two
    processes: the server (``--role server --fd FD``: accepts one connection on the
    inherited listening socket, echoes every 16-byte request at once) and the client
    (``--role client --port PORT``). Every ``--interval-ns`` (default 10 ms) the client
    sends a request stamped with its CLOCK_MONOTONIC and waits for the answer (one request
    in flight at a time, as a synchronous caller does); the round trip goes into the
    latency histogram, and each ``T`` of the ladder it outlived (``probe.canary.outlived``)
    becomes one ``timeout`` line: ``mono_ns`` the deadline (send time plus ``T``),
    ``duration_ns`` how long after it the answer came, ``timeout_ns``, ``server_cpu``,
    ``round_trip_ns``. While an answer is
    outstanding the client still sends its ``life`` line every second. When either side
    closes the connection the other exits, and the agent restarts both.

    Only ``_socket`` (the C module) is imported, not ``socket``: the Python wrapper would
    add about 1 MB to each process (``probe.worker``).

Cost
    Two wake-ups of the client (timer, answer) and one of the server per request: about
    300 a second at 10 ms. This canary runs only when asked for (``--canaries ...,rpc``).

Usage (the agent passes the descriptor and the port)::

    python -m probe.canary_rpc --role server --cpu 1 --fd 3
    python -m probe.canary_rpc --role client --cpu 0 --server-cpu 1 --port 40000
"""

from __future__ import annotations

import _socket
import os
import select
import sys
import time

from probe.canary import DEFAULT_LADDER_NS, LIFE_NS, Reporter, outlived
from probe.worker import (
    WorkerUsageError,
    error_line,
    int_list_option,
    int_option,
    parse_options,
    pin,
    run_worker,
    settle,
    status_line,
    write_stdout,
)

DEFAULT_INTERVAL_NS = 10_000_000
#: Bytes of a request and of its answer: send time (8) and sequence number (8).
MESSAGE_SIZE = 16

USAGE = (
    "usage: python -m probe.canary_rpc --role server --cpu N --fd FD\n"
    "       python -m probe.canary_rpc --role client --cpu N --server-cpu N --port PORT"
    " [--interval-ns NS] [--timeouts-ns NS,NS,...]"
)


class Closed(Exception):
    """The other side closed the connection."""


def serve(conn: int, reporter: Reporter) -> None:
    """Echo every request on ``conn`` at once, forever.

    :param conn: the accepted connection.
    :param reporter: for the ``life`` lines.
    :raise Closed: when the client closed the connection.
    """
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    mono = time.monotonic_ns
    settle()
    while True:
        timeout_ms = max(0.0, (reporter.next_life - mono()) / 1e6)
        if poller.poll(timeout_ms):
            data = os.read(conn, 4096)
            if not data:
                raise Closed("the client closed the connection")
            os.write(conn, data)  # 16-byte records, echoed as they came
            reporter.count += len(data) // MESSAGE_SIZE
        now = mono()
        if now >= reporter.next_life:
            reporter.life(now)


def call(conn: int, poller: select.poll, seq: int, reporter: Reporter) -> tuple[int, int]:
    """Send one request and wait for its answer, sending ``life`` lines meanwhile.

    :param conn: the connection.
    :param poller: polls ``conn`` for input.
    :param seq: the request's sequence number.
    :param reporter: for the ``life`` lines.
    :raise Closed: when the server closed the connection.
    :return: (send time, answer time) on CLOCK_MONOTONIC.
    """
    mono = time.monotonic_ns
    sent = mono()
    os.write(conn, sent.to_bytes(8, "little") + seq.to_bytes(8, "little"))
    received = b""
    while True:
        timeout_ms = max(0.0, (reporter.next_life - mono()) / 1e6)
        if poller.poll(timeout_ms):
            data = os.read(conn, 4096)
            if not data:
                raise Closed("the server closed the connection")
            received += data
            if len(received) >= MESSAGE_SIZE:
                return sent, mono()
        now = mono()
        if now >= reporter.next_life:
            reporter.life(now)


def run_client(
    conn: int, interval_ns: int, ladder: list[int], server_cpu: int, reporter: Reporter
) -> None:
    """Call the server every ``interval_ns``, forever.

    :param conn: the connection.
    :param interval_ns: the time between two requests' starts.
    :param ladder: the timeouts, ascending.
    :param server_cpu: for the events.
    :param reporter: where lines go.
    :raise Closed: when the server closed the connection.
    """
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    mono = time.monotonic_ns
    latency = reporter.latency
    seq = 0
    settle()
    next_call = mono()
    while True:
        now = mono()
        if next_call > now:
            time.sleep((next_call - now) / 1e9)
        seq += 1
        sent, answered = call(conn, poller, seq, reporter)
        round_trip = answered - sent
        latency.observe(round_trip)
        reporter.count += 1
        expired = outlived(round_trip, ladder)
        if expired:
            reporter.expirations(
                answered, answered, expired, server_cpu=server_cpu, round_trip_ns=round_trip
            )
        next_call += interval_ns
        if next_call <= answered:
            next_call = answered + interval_ns
        if answered >= reporter.next_life:
            reporter.life(answered)


def connect(port: int) -> int:
    """Connect to the server on loopback, with TCP_NODELAY.

    :param port: the server's port.
    :raise OSError: when the connection fails.
    :return: the connected descriptor (owned by the caller).
    """
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return int(sock.detach())


def accept(listen_fd: int) -> int:
    """Accept one connection on the inherited listening socket, then close it.

    :param listen_fd: the listening socket.
    :raise OSError: when accepting fails.
    :return: the connection's descriptor (owned by the caller).
    """
    listener = _socket.socket(fileno=listen_fd)
    try:
        conn, _address = listener._accept()  # type: ignore[attr-defined]  # no stub for it
    finally:
        listener.close()
    sock = _socket.socket(fileno=int(conn))
    try:
        sock.setblocking(True)
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return int(sock.detach())


class _Options:
    """The command line: the role, the CPUs, the descriptor or port, the interval, the ladder."""

    def __init__(self, argv: list[str]) -> None:
        values = parse_options(
            argv,
            ("--role", "--cpu", "--server-cpu", "--fd", "--port", "--interval-ns", "--timeouts-ns"),
        )
        self.role = values.get("--role", "")
        if self.role not in ("server", "client"):
            raise WorkerUsageError("--role must be server or client")
        self.cpu = int_option(values, "--cpu")
        client = self.role == "client"
        self.listen_fd = 0 if client else int_option(values, "--fd")
        self.port = int_option(values, "--port") if client else 0
        self.server_cpu = int_option(values, "--server-cpu") if client else 0
        self.interval_ns = int_option(values, "--interval-ns", DEFAULT_INTERVAL_NS) if client else 0
        self.ladder = int_list_option(values, "--timeouts-ns", DEFAULT_LADDER_NS)
        if self.cpu < 0 or (client and (self.interval_ns <= 0 or not 0 < self.port < 65536)):
            raise WorkerUsageError("bad --cpu, --port or --interval-ns")


def _side(opts: _Options) -> int:
    cpu, role = opts.cpu, opts.role
    reporter = Reporter(write_stdout, cpu)
    try:
        pin(cpu)
        if role == "server":
            write_stdout(status_line(cpu, [], role=role))
            conn = accept(opts.listen_fd)
        else:
            conn = connect(opts.port)
            write_stdout(status_line(cpu, [], role=role, server_cpu=opts.server_cpu))
    except OSError as err:
        write_stdout(error_line(f"{role} on cpu {cpu}: {err.strerror or err}"))
        return 1
    reporter.next_life = time.monotonic_ns() + LIFE_NS
    try:
        if role == "server":
            serve(conn, reporter)
        else:
            run_client(conn, opts.interval_ns, opts.ladder, opts.server_cpu, reporter)
    except (Closed, ConnectionError) as err:
        reporter.flush()
        write_stdout(error_line(str(err)))
        return 1
    return 0  # pragma: no cover - the loops never return


def main(argv: list[str] | None = None) -> int:
    """Run the server or the client side.

    :param argv: the arguments (default ``sys.argv[1:]``).
    :return: 2 on a usage error, 1 when set-up fails or the other side went away, 0 when
        the agent went away.
    """
    args = sys.argv[1:] if argv is None else argv
    return run_worker("probe.canary_rpc", USAGE, lambda: _Options(args), _side)


if __name__ == "__main__":
    sys.exit(main())
