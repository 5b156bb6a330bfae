"""The ``heartbeat`` canary: two processes on two CPUs that each watch the other one live.

What it models
    Cluster membership (corosync, etcd, Pacemaker, a database's replica set): each member
    sends a heartbeat every interval and declares a peer dead when it has not heard from
    it for longer than its timeout. A migration stalls vCPUs unevenly (a postcopy page
    fault blocks one vCPU; a throttle or a host preemption hits some): the member on a
    stalled CPU falls silent, and the member on a healthy CPU declares it dead. This canary
    measures that, for every timeout ``T`` of the ladder at once.

How
    The agent makes an ``AF_UNIX``/``SOCK_DGRAM`` socketpair and starts one side on each
    CPU of a pair, each with one end (``--fd``). Every ``--interval-ns`` (default 5 ms) a
    side wakes up (``time.sleep`` to an absolute schedule, no catch-up burst after a
    stall) and, in this order:

    1. sends its own heartbeat: 16 bytes, its CLOCK_MONOTONIC now and its sequence
       number. First, so a side coming back from a stall is heard again at once, not after
       it worked through the backlog below (about 140 heartbeats after a 700 ms stall,
       30-70 ms of a TCG guest's time). A full socket (the peer has not read for a long
       time) drops it, and a refused one (the peer's end is closed) ends the process: the
       agent restarts the pair.
    2. reads every heartbeat that arrived (non-blocking).
    3. judges the silence. ``last`` is the send time of the newest heartbeat heard before
       this wake-up, ``prev`` the previous wake-up. If something new arrived:
       ``seen = prev - last`` is the longest silence this side saw while it ran (at
       ``prev`` it was awake and had heard nothing newer than ``last``), and
       ``gone = first - last`` is how long the peer did not send (``first``: the send time
       of the oldest new heartbeat). Each ``T`` with ``seen > T + slack_ns(T)``
       (``probe.canary.outlived``) would have declared the peer dead; as the peer comes
       back, the side writes one ``timeout`` line per such ``T``: ``mono_ns`` = ``last + T``
       (when the peer was declared dead), ``duration_ns`` = ``gone - T`` (how long it stayed
       dead), ``timeout_ns``, ``peer_cpu``, ``gone_ns`` and ``seen_ns``.

    Reading before judging makes the asymmetry visible: a side that was itself stalled finds
    its peer's heartbeats waiting when it wakes up, so it declares nothing (it was deaf,
    the peer was not silent); its own stall is the ``timer`` canary's business. When both
    CPUs stall together neither side sees a silence while it runs, so neither declares.

    The latency histogram gets every gap between two consecutive heartbeats of the peer by
    their send times (normally the interval), except across dropped heartbeats.

Cost
    Each side wakes up once per interval and never for an arriving heartbeat (it reads them
    at its next wake-up), so a pair costs 2 wake-ups per interval: 400 a second at 5 ms,
    about 9 ms of CPU per second per side here. The price is that ``seen`` is measured in
    steps of one interval; ``gone`` comes from the send times and is exact to the peer's own
    wake-ups.

Usage (the agent passes the descriptor)::

    python -m probe.canary_heartbeat --cpu 0 --peer-cpu 1 --fd 3 --interval-ns 5000000
"""

from __future__ import annotations

import errno
import gc
import os
import sys
import time

from probe.canary import DEFAULT_LADDER_NS, Reporter, outlived
from probe.worker import (
    WorkerUsageError,
    error_line,
    int_list_option,
    int_option,
    parse_options,
    pin,
    status_line,
    usage_exit,
    write_stdout,
)

DEFAULT_INTERVAL_NS = 5_000_000
#: Bytes of one heartbeat: send time (8) and sequence number (8), little-endian.
MESSAGE_SIZE = 16

USAGE = (
    "usage: python -m probe.canary_heartbeat --cpu N --peer-cpu N --fd FD"
    " [--interval-ns NS] [--timeouts-ns NS,NS,...]"
)


class PeerGone(Exception):
    """The peer's end of the socketpair is closed."""


class Watcher:
    """One side's view of its peer (pure: fed with heartbeats and wake-up times).

    :param ladder: the timeouts, ascending.
    :param reporter: where events and histogram observations go.
    :param peer_cpu: the peer's CPU, for the events.
    """

    def __init__(self, ladder: list[int], reporter: Reporter, peer_cpu: int) -> None:
        self.ladder = ladder
        self.reporter = reporter
        self.peer_cpu = peer_cpu
        self.last_ns: int | None = None  # send time of the newest heartbeat heard
        self.last_seq = -2  # sequence number of the newest heartbeat heard
        self.prev_wake_ns: int | None = None

    def wake(self, now_ns: int, heartbeats: list[tuple[int, int]]) -> None:
        """Process one wake-up: the heartbeats read (send time, sequence), oldest first.

        :param now_ns: CLOCK_MONOTONIC at this wake-up.
        :param heartbeats: what arrived since the previous wake-up.
        """
        reporter = self.reporter
        if heartbeats:
            first = heartbeats[0][0]
            last = self.last_ns
            prev = self.prev_wake_ns
            if last is not None and prev is not None:
                seen = prev - last
                gone = first - last
                expired = outlived(seen, self.ladder, gone)
                if expired:
                    reporter.expirations(
                        last + max(gone, seen),
                        now_ns,
                        expired,
                        peer_cpu=self.peer_cpu,
                        gone_ns=gone,
                        seen_ns=seen,
                    )
            latency = reporter.latency
            for sent, seq in heartbeats:
                previous = self.last_ns
                if previous is not None and seq == self.last_seq + 1:
                    latency.observe(sent - previous)
                if previous is None or sent >= previous:
                    self.last_ns = sent
                self.last_seq = seq
                reporter.count += 1
        self.prev_wake_ns = now_ns


def read_heartbeats(fd: int) -> list[tuple[int, int]]:
    """Read every heartbeat waiting on the non-blocking socket.

    :param fd: this side's end.
    :return: (send time, sequence) pairs, in arrival order.
    """
    out: list[tuple[int, int]] = []
    while True:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return out
        if len(data) >= MESSAGE_SIZE:
            out.append((int.from_bytes(data[0:8], "little"), int.from_bytes(data[8:16], "little")))


def send(fd: int, seq: int) -> bool:
    """Send one heartbeat stamped now.

    :param fd: this side's end.
    :param seq: its sequence number.
    :raise PeerGone: when the peer's end is closed.
    :return: False when the socket was full and the heartbeat was dropped.
    """
    message = time.monotonic_ns().to_bytes(8, "little") + seq.to_bytes(8, "little")
    try:
        os.write(fd, message)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ECONNREFUSED, errno.EPIPE, errno.ENOTCONN):
            raise PeerGone(f"the peer's end is closed ({err.strerror})") from err
        raise
    return True


def run(fd: int, interval_ns: int, watcher: Watcher) -> None:
    """Wake, send, read, judge, forever.

    :param fd: this side's end (non-blocking).
    :param interval_ns: the heartbeat interval.
    :param watcher: the judge.
    :raise PeerGone: when the peer's end is closed.
    """
    reporter = watcher.reporter
    mono = time.monotonic_ns
    sleep = time.sleep
    seq = 0
    dropped = 0
    gc.collect()
    gc.freeze()
    next_wake = mono()
    while True:
        now = mono()
        if next_wake > now:
            sleep((next_wake - now) / 1e9)
            now = mono()
        seq += 1
        if not send(fd, seq):
            dropped += 1
        watcher.wake(now, read_heartbeats(fd))
        next_wake += interval_ns
        if next_wake <= now:
            next_wake = now + interval_ns  # after a stall: carry on, no burst
        if now >= reporter.next_life:
            reporter.life(now, dropped=dropped)


def main(argv: list[str] | None = None) -> int:
    """Run one side: pin, send the status line, exchange heartbeats until killed.

    :param argv: the arguments (default ``sys.argv[1:]``).
    :return: 2 on a usage error, 1 when the CPU cannot be used or the peer is gone, 0 when
        the agent went away.
    """
    try:
        values = parse_options(
            sys.argv[1:] if argv is None else argv,
            ("--cpu", "--peer-cpu", "--fd", "--interval-ns", "--timeouts-ns"),
        )
        cpu = int_option(values, "--cpu")
        peer_cpu = int_option(values, "--peer-cpu")
        fd = int_option(values, "--fd")
        interval_ns = int_option(values, "--interval-ns", DEFAULT_INTERVAL_NS)
        ladder = int_list_option(values, "--timeouts-ns", DEFAULT_LADDER_NS)
        if cpu < 0 or peer_cpu < 0 or fd < 0 or interval_ns <= 0:
            raise WorkerUsageError("CPUs and --fd must not be negative, --interval-ns positive")
    except WorkerUsageError as err:
        return usage_exit("probe.canary_heartbeat", err, USAGE)
    try:
        try:
            pin(cpu)
            os.set_blocking(fd, False)
        except OSError as err:
            write_stdout(error_line(f"cannot run on cpu {cpu} with fd {fd}: {err.strerror}"))
            return 1
        write_stdout(status_line(cpu, [], peer_cpu=peer_cpu, interval_ns=interval_ns))
        reporter = Reporter(write_stdout, cpu)
        try:
            run(fd, interval_ns, Watcher(ladder, reporter, peer_cpu))
        except PeerGone as err:
            reporter.flush()
            write_stdout(error_line(str(err)))
            return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    return 0  # pragma: no cover - run() never returns


if __name__ == "__main__":
    sys.exit(main())
