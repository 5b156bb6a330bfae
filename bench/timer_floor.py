"""The floor of a per-CPU sampler in Python: one process per CPU, pinned, at SCHED_FIFO 1
when permitted, reading a periodic timerfd (``probe.timerfd``) and doing nothing else; the
interpreter the agent's samplers run in, with none of their work. Run by
``bench/agent_overhead`` as ``python timer_floor.py INTERVAL_NS CPU [CPU ...]``.
"""

from __future__ import annotations

import contextlib
import os
import sys


def tick(interval_ns: int, cpu: int) -> None:
    """Wake on every grid point of a ``interval_ns`` timer on ``cpu``; never returns."""
    from probe.timerfd import periodic_timer

    os.sched_setaffinity(0, {cpu})
    with contextlib.suppress(OSError):  # else SCHED_OTHER, as a sampler without the right
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    fd, _ = periodic_timer(interval_ns)
    read = os.read
    while True:
        read(fd, 8)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: timer_floor.py INTERVAL_NS CPU [CPU ...]", file=sys.stderr)
        return 2
    interval_ns, cpus = int(argv[0]), [int(c) for c in argv[1:]]
    children = []
    for cpu in cpus:
        pid = os.fork()
        if pid == 0:
            tick(interval_ns, cpu)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
