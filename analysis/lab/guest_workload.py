"""The lab guest's memory workload (installed as /opt/tsprobe/lab/workload.py).

This file runs in the lab guest, never on the host::

    workload.py SIZE CPU GO_FILE [STOP_FILE]

It pins itself to CPU, allocates SIZE bytes (``64M``, ``1G``: powers of 1024; a plain
number is bytes) and touches every page once, then waits until GO_FILE exists (the
guest's init creates it when the agent answers) and from then on keeps every 4 KiB page
dirty: every ``PASS_PERIOD_S`` it writes one byte into each page (an extended-slice
assignment, so a pass runs at C speed) and sleeps until the next pass. This is what makes
precopy iterate and postcopy fault. It prints
``tsprobe-lab: workload: SIZE bytes dirty on CPU N`` on the console when the loop starts.

Why passes and not a busy loop: a pass over 64 MiB takes 3 to 5 ms in a TCG guest. A
loop without pauses made 200 to 300 passes a second and took a whole vCPU, which under
single-threaded TCG is half of what the guest gets, beside an agent that already keeps
the guest busy. Passed every 10 ms, it took 14 % of the guest's CPU time (ticks in
/proc/PID/stat over a steady stretch with the agent running) when the guest had time to
spare, and 37 to 40 % (``/proc/PID/schedstat``) beside the agent's samplers and canaries:
passes ran late and then back to back. Every 50 ms it takes 22 to 26 %. That changes
nothing the migration sees: each page is written again long before precopy's next
dirty-bitmap sync (a 64 MiB round takes over a second at the lab's 50 MiB/s), and a pass
reaches every page the destination still lacks within 50 ms of the switchover.

Once STOP_FILE exists (the host asks the lab hooks for ``workload stop`` when the
migration has completed) it prints ``tsprobe-lab: workload: stopped after N passes`` and
exits: its job ends with the migration. Left running on the destination, whose QEMU has
to translate the guest's code anew, it slowed the agent's first answer after a paused run
from 1.2 to 3.9 s to 2.9 to 8.7 s (4 runs each, alternated).

Why it is its own file and imports nothing beyond ``os``, ``sys`` and ``time`` (built into
the interpreter): under TCG every import is paid at emulation speed, and once the agent's
1 ms samplers run at SCHED_FIFO on every vCPU the guest has little time left. When the
workload was a subcommand of the hooks, their argparse, json and socket took 11.7 s to
import there (``-X importtime``) and the loop began 15.5 s after the process started.
This script starts, allocates and touches its pages while the agent starts, before its
samplers run, and then waits in a cheap poll, so that starting to dirty memory
costs nothing once the agent runs.
"""

from __future__ import annotations

import os
import sys
import time

PAGE = 4096
POLL_S = 0.1
#: A pass over the working set starts every PASS_PERIOD_S (at once when one is late).
PASS_PERIOD_S = 0.05
USAGE = "usage: workload.py SIZE CPU GO_FILE [STOP_FILE]"


def parse_size(text: str) -> int:
    """``64M`` -> 67108864; suffixes K, M, G (powers of 1024); a plain number is bytes.

    :raise ValueError: on a malformed or negative size.
    """
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    size = int(float(number) * scale)
    if size < 0:
        raise ValueError(f"negative size {text!r}")
    return size


def say(text: str) -> None:
    """Print one ``tsprobe-lab:`` line on the console (stdout is /dev/console)."""
    sys.stdout.write(f"tsprobe-lab: {text}\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    """Prepare, wait for GO_FILE, then dirty memory until STOP_FILE exists."""
    if len(argv) not in (3, 4):
        say(f"workload: {USAGE}")
        return 2
    try:
        size, cpu = parse_size(argv[0]), int(argv[1])
    except ValueError as err:
        say(f"workload: {err}; {USAGE}")
        return 2
    go_file = argv[2]
    stop_file = argv[3] if len(argv) == 4 else None
    os.sched_setaffinity(0, {cpu})
    buf = bytearray(size)  # zero-filled: every page is touched once here
    pages = len(range(0, size, PAGE))
    patterns = [bytes([value]) * pages for value in (0x55, 0xAA)]
    while not os.path.exists(go_file):
        time.sleep(POLL_S)
    say(f"workload: {size} bytes dirty on CPU {cpu}")
    passes = 0
    next_pass = time.monotonic()
    while stop_file is None or not os.path.exists(stop_file):
        buf[::PAGE] = patterns[passes & 1]
        passes += 1
        next_pass += PASS_PERIOD_S
        delay = next_pass - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_pass = time.monotonic()  # late (a stall): no burst of passes to catch up
    say(f"workload: stopped after {passes} passes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
