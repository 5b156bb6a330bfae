"""A worker for tests/test_forkserver.py: ``main(argv)`` like the probes' workers.

``--fd N``: write one line to descriptor N (passed under that number) and say so;
``--sleep S``: then sleep S seconds; ``--exit N``: exit with status N.
It prints what it sees: its name (/proc/self/comm), whether stdin is /dev/null and whether
SIGINT has Python's default handler.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
    opts = dict(zip(argv[::2], argv[1::2], strict=False))
    with open("/proc/self/comm") as fh:
        name = fh.read().strip()
    stdin = os.readlink("/proc/self/fd/0")
    sigint = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    sys.stdout.write(f"name={name} stdin={stdin} sigint_default={sigint}\n")
    if "--fd" in opts:
        os.write(int(opts["--fd"]), b"through the passed descriptor\n")
    sys.stdout.flush()
    time.sleep(float(opts.get("--sleep", 0)))
    return int(opts.get("--exit", 0))
