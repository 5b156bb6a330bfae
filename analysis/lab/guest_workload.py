"""The lab guest's memory workload (installed as /opt/tsprobe/lab/workload.py).

This file runs in the lab guest, never on the host::

    workload.py SIZE CPU GO_FILE [STOP_FILE [RESULT_FILE]]

It pins itself to CPU, allocates SIZE bytes (``64M``, ``1G``: powers of 1024; a plain
number is bytes) and writes the first stamp into every page, then waits until GO_FILE
exists (the guest's init creates it when the agent answers) and from then on keeps every
4 KiB page dirty: every ``PASS_PERIOD_S`` it writes the pass's stamp into the first byte
of each page (an extended-slice assignment, so a pass runs at C speed) and sleeps until
the next pass. This is what makes precopy iterate and postcopy fault. It prints
``tsprobe-lab: workload: SIZE bytes dirty on CPU N`` on the console when the loop starts.

It also checks the guest's memory, which is how the lab knows that a migration kept it
intact: pass N writes stamp ``N % 255 + 1`` (never 0, so a page that arrived as zeros
is caught too), and before writing a chunk of ``CHUNK_PAGES`` pages it reads their
stamps back: each must hold pass N-1's. A write the migration lost (a page the
destination got an older copy of) leaves an older stamp there. Such a page is counted
once as bad (then rewritten, so one loss is not counted again on every pass) and the
first ones found are printed as ``tsprobe-lab: workload: bad memory: ...`` (the lab's
health check treats that line as a problem). A stale page is missed only when it is a
multiple of 255 passes old (12.75 s at one pass per 50 ms). Reading a chunk just before
writing it keeps the extra cost to a strided copy of pages the write touches anyway.

Why passes and not a busy loop: a loop without pauses takes a whole vCPU, which under
single-threaded TCG is half of what the guest gets, beside an agent that already keeps
the guest busy; a pass every 50 ms keeps the workload's share of the guest's CPU modest
(docs/lab-notes.md has the shares measured). That changes nothing the migration sees:
each page is written again long before precopy's next dirty-bitmap sync (a 64 MiB round
takes over a second at the lab's 50 MiB/s), and a pass reaches every page the destination
still lacks within 50 ms of the switchover.

Once STOP_FILE exists (the host asks the lab hooks for ``workload stop`` when the
migration has completed) it checks every page's stamp once more, writes its verdict to
RESULT_FILE (one JSON line, renamed into place: ``{"ok": true, "stopped": "workload",
"passes": N, "pages": P, "bad_pages": B, "checks": C}``, C the page checks made; the
hooks' shell waits for it and answers it to the host), prints ``tsprobe-lab: workload:
stopped after N passes`` and exits: its job ends with the migration (left running on the
destination, whose QEMU has to translate the guest's code anew, it slows the agent's
answers; docs/lab-notes.md).

Why it is its own file and imports nothing beyond ``os``, ``sys`` and ``time`` (built into
the interpreter): under TCG every import is paid at emulation speed, and once the agent's
1 ms samplers run at SCHED_FIFO on every vCPU the guest has little time left (the import
times measured are in docs/lab-notes.md). This script starts, allocates and touches its
pages while the agent starts, before its samplers run, and then waits in a cheap poll, so
that starting to dirty memory costs nothing once the agent runs.
"""

from __future__ import annotations

import os
import sys
import time

PAGE = 4096
POLL_S = 0.1
#: A pass over the working set starts every PASS_PERIOD_S (at once when one is late).
PASS_PERIOD_S = 0.05
#: Pages checked and written together (1 MiB).
CHUNK_PAGES = 256
#: Bad pages printed on the console (the rest are counted).
BAD_LINES = 5
USAGE = "usage: workload.py SIZE CPU GO_FILE [STOP_FILE [RESULT_FILE]]"


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


def stamp(n: int) -> int:
    """The byte pass ``n`` writes into every page (1 to 255; pass 0 is the first fill)."""
    return n % 255 + 1


def say(text: str) -> None:
    """Print one ``tsprobe-lab:`` line on the console (stdout is /dev/console)."""
    sys.stdout.write(f"tsprobe-lab: {text}\n")
    sys.stdout.flush()


class Memory:
    """The working set: one stamp byte per page, checked before it is written again."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.pages = len(range(0, size, PAGE))
        self.fills = [bytes([stamp(n)]) * CHUNK_PAGES for n in range(255)]
        self.passes = 0  # passes done; the pages hold stamp(passes)
        self.bad = bytearray(self.pages)  # 1: page found bad once
        self.bad_pages = 0
        self.checks = 0
        self.buf[::PAGE] = bytes([stamp(0)]) * self.pages  # touches every page

    def _check(self, first: int, got: bytes, want: int) -> None:
        """Count the pages of a chunk that do not hold ``want`` (the slow path)."""
        for i, value in enumerate(got):
            page = first + i
            if value != want and not self.bad[page]:
                self.bad[page] = 1
                self.bad_pages += 1
                if self.bad_pages <= BAD_LINES:
                    say(
                        f"workload: bad memory: page {page} held {value:#04x} at pass "
                        f"{self.passes + 1}, not {want:#04x} (pass {self.passes}'s)"
                    )

    def dirty(self) -> None:
        """One pass: check each chunk's stamps, then write the next stamp into it."""
        want = stamp(self.passes)
        expect, fill = self.fills[self.passes % 255], self.fills[(self.passes + 1) % 255]
        buf, step = self.buf, PAGE * CHUNK_PAGES
        for first in range(0, self.pages, CHUNK_PAGES):
            start = first * PAGE
            end = min(start + step, len(buf))
            got = buf[start:end:PAGE]
            n = len(got)
            if got != expect[:n]:
                self._check(first, bytes(got), want)
            buf[start:end:PAGE] = fill[:n]
        self.checks += self.pages
        self.passes += 1

    def verify(self) -> None:
        """Check every page once more (after the last pass)."""
        got = bytes(self.buf[::PAGE])
        want = stamp(self.passes)
        if got != bytes([want]) * self.pages:
            self._check(0, got, want)
        self.checks += self.pages

    def verdict(self) -> dict[str, object]:
        """What ``RESULT_FILE`` gets."""
        return {
            "ok": True,
            "stopped": "workload",
            "passes": self.passes,
            "pages": self.pages,
            "bad_pages": self.bad_pages,
            "checks": self.checks,
        }


def write_result(path: str, verdict: dict[str, object]) -> None:
    """Write the verdict as one JSON line, renamed into place (read by init's shell).

    Written by hand: ``json`` is not imported (see above); the values are ints, bools
    and plain words.
    """
    parts = []
    for key, value in verdict.items():
        text = ("true" if value else "false") if isinstance(value, bool) else value
        parts.append(f'"{key}": ' + (f'"{text}"' if isinstance(value, str) else str(text)))
    tmp = path + ".tmp"
    with open(tmp, "w") as out:
        out.write("{" + ", ".join(parts) + "}\n")
    os.rename(tmp, path)


def main(argv: list[str]) -> int:
    """Prepare, wait for GO_FILE, then dirty and check memory until STOP_FILE exists."""
    if not 3 <= len(argv) <= 5:
        say(f"workload: {USAGE}")
        return 2
    try:
        size, cpu = parse_size(argv[0]), int(argv[1])
    except ValueError as err:
        say(f"workload: {err}; {USAGE}")
        return 2
    go_file = argv[2]
    stop_file = argv[3] if len(argv) >= 4 else None
    result_file = argv[4] if len(argv) == 5 else None
    os.sched_setaffinity(0, {cpu})
    memory = Memory(size)
    while not os.path.exists(go_file):
        time.sleep(POLL_S)
    say(f"workload: {size} bytes dirty on CPU {cpu}")
    next_pass = time.monotonic()
    while stop_file is None or not os.path.exists(stop_file):
        memory.dirty()
        next_pass += PASS_PERIOD_S
        delay = next_pass - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_pass = time.monotonic()  # late (a stall): no burst of passes to catch up
    memory.verify()
    if result_file is not None:
        write_result(result_file, memory.verdict())
    say(f"workload: stopped after {memory.passes} passes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
