"""The ``timer`` canary: timed waits on one CPU, and the deadlines they saw expire late.

What it measures
    What an application's timeouts feel on CPU n. Applications wait with a deadline all the
    time (``poll``/``select``/``epoll_wait`` with a timeout, ``nanosleep``, a condition
    variable with a timeout); when the vCPU is stalled (a postcopy page fault, a paused or
    throttled VM, a host that preempts the vCPU) the deadline fires late, and an
    application whose timeout was shorter than the stall sees it expire although nothing it
    waited for was slow.

How
    One process pinned to the CPU (SCHED_OTHER, like the applications it stands for) waits
    ``--wait-ns`` (default 50 ms) again and again, cycling through three kinds of wait:
    ``poll`` on a pipe that never becomes readable, ``select`` on the same pipe, and
    ``time.sleep`` (``clock_nanosleep`` on CLOCK_MONOTONIC). A wait starts at the previous
    wake-up's clock reading, so a stall between two waits is charged to the next one. On
    every wake-up it reads CLOCK_MONOTONIC once and computes the lateness
    ``actual - due``: it goes into the latency histogram, and the ladder rule
    (``probe.canary.timer_expirations``) says which deadlines of the ladder expired late.
    Each deadline that expired becomes one ``timeout`` line (``probe.canary``): ``mono_ns``
    the deadline ``D``, ``duration_ns`` how late it fired, ``timeout_ns``, and the wait's
    ``wait`` (``poll``, ``select``, ``sleep``), ``wait_ns`` and ``wake_late_ns`` (how late
    the wait woke). The lines go to the agent with the once-a-second ``life`` line.

Why 50 ms waits
    Every wake-up of a sleeping vCPU costs about 40 us here (mostly the halt and the
    wake-up themselves), and the stall samplers already wake 1000 times a second per CPU.
    50 ms waits cost 20 wake-ups a second, about 1 ms of CPU per second per CPU. The price
    is resolution: the canary sees every stall that covers one of its wake-up times, so it
    sees every stall longer than 50 ms and a stall of S < 50 ms with probability S / 50 ms.
    Those short stalls can expire only the 10 ms deadlines (a 100 ms deadline needs a stall
    above 110 ms), so counts for ``T >= 100 ms`` are complete and counts for 10 ms are a
    sample; the stall probe gives every gap above 2 ms exactly.

Usage::

    python -m probe.canary_timer --cpu 1 --wait-ns 50000000 \
        --timeouts-ns 10000000,100000000,1000000000,5000000000,30000000000
"""

from __future__ import annotations

import os
import select
import sys
import time

from probe import worker
from probe.canary import DEFAULT_LADDER_NS, MIN_SLACK_NS, Reporter, timer_expirations

#: ``typing.TYPE_CHECKING`` without importing ``typing``.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_WAIT_NS = 50_000_000
#: The kinds of wait, in the order they are cycled through.
WAIT_KINDS = ("poll", "select", "sleep")

USAGE = "usage: python -m probe.canary_timer --cpu N [--wait-ns NS] [--timeouts-ns NS,NS,...]"


def waiters(wait_ns: int) -> list[Callable[[], object]]:
    """One callable per kind of wait in ``WAIT_KINDS``, each waiting about ``wait_ns``.

    :param wait_ns: the length of each wait.
    :return: the callables (poll, select, sleep); the pipe they watch stays open.
    """
    read_fd, _write_fd = os.pipe()  # never written to: poll and select always time out
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    wait_ms = wait_ns / 1e6
    wait_s = wait_ns / 1e9
    fds = [read_fd]
    empty: list[int] = []

    def do_poll() -> object:
        return poller.poll(wait_ms)

    def do_select() -> object:
        return select.select(fds, empty, empty, wait_s)

    def do_sleep() -> object:
        time.sleep(wait_s)
        return None

    return [do_poll, do_select, do_sleep]


def run(cpu: int, wait_ns: int, ladder: list[int], reporter: Reporter) -> None:
    """Wait, measure, report, forever.

    :param cpu: the CPU (for the lines).
    :param wait_ns: the length of each wait.
    :param ladder: the timeouts, ascending.
    :param reporter: where lines go.
    """
    calls = waiters(wait_ns)
    kinds = len(calls)
    mono = time.monotonic_ns
    latency = reporter.latency
    index = 0
    worker.settle()
    start = mono()
    while True:
        due = start + wait_ns
        calls[index]()
        now = mono()
        late = now - due
        latency.observe(late)
        reporter.count += 1
        if late > MIN_SLACK_NS:
            expired = timer_expirations(start, due, now, ladder)
            if expired:
                reporter.expirations(
                    now, now, expired, wait=WAIT_KINDS[index], wait_ns=wait_ns, wake_late_ns=late
                )
        if now >= reporter.next_life:
            reporter.life(now)
        index = index + 1 if index + 1 < kinds else 0
        start = now


def _options(argv: list[str]) -> tuple[int, int, list[int]]:
    values = worker.parse_options(argv, ("--cpu", "--wait-ns", "--timeouts-ns"))
    cpu = worker.int_option(values, "--cpu")
    wait_ns = worker.int_option(values, "--wait-ns", DEFAULT_WAIT_NS)
    ladder = worker.int_list_option(values, "--timeouts-ns", DEFAULT_LADDER_NS)
    if cpu < 0 or wait_ns <= 0:
        raise worker.WorkerUsageError("--cpu must not be negative and --wait-ns must be positive")
    return cpu, wait_ns, ladder


def _timer(options: tuple[int, int, list[int]]) -> int:
    cpu, wait_ns, ladder = options
    try:
        worker.pin(cpu)
    except OSError as err:
        worker.write_stdout(worker.error_line(f"cannot run on cpu {cpu}: {err.strerror}"))
        return 1
    worker.write_stdout(worker.status_line(cpu, [], wait_ns=wait_ns))
    run(cpu, wait_ns, ladder, Reporter(worker.write_stdout, cpu))
    return 0  # pragma: no cover - run() never returns


def main(argv: list[str] | None = None) -> int:
    """Run the timer canary: pin, send the status line, wait until killed.

    :param argv: the arguments (default ``sys.argv[1:]``).
    :return: 2 on a usage error, 1 when the CPU cannot be used, 0 when the agent went away.
    """
    args = sys.argv[1:] if argv is None else argv
    return worker.run_worker("probe.canary_timer", USAGE, lambda: _options(args), _timer)


if __name__ == "__main__":
    sys.exit(main())
