"""Lab hooks inside the guest (stdlib only; installed as /opt/tsprobe/lab/hooks.py).

This file runs in the lab guest, never on the host. The guest's init serves it on TCP port
9467 with busybox ``nc -ll -p 9467 -e python3 hooks.py once``: nc accepts each connection
and runs one ``hooks.py once`` on it, which reads one line, answers one JSON line and exits
(the host reaches the port through QEMU's ``hostfwd``). A resident server would cost the
guest a Python start and its imports at boot, when the TCG guest's one host thread is
busiest starting the agent; the hooks are only asked a few times per run (the memory
workload is ``guest_workload.py``; init polls the agent's /healthz for the console itself).

``once``
    ``ping``      ``{"ok": true, "uptime_s": ...}``
    ``step NS``   step CLOCK_REALTIME by NS nanoseconds (signed) with
                  ``adjtimex(ADJ_SETOFFSET)`` (exact: the kernel adds NS), falling back to
                  ``time.clock_settime_ns``; busybox ``date`` only has 1 s resolution. Answers
                  ``{"ok": true, "step_ns": NS, "real_before_ns": ..., "mono_ns": ...}``.
    ``procs``     CPU time (utime + stime, clock ticks) and command line of every process,
                  and the guest's /proc/stat cpu lines: who uses the guest's CPUs.
    ``kmsg TEXT`` write TEXT to /dev/kmsg at level 4 (warning), as a kernel warning would
                  read; the kernel files it under facility 1 (user), never 0 (kernel).
                  Answers ``{"ok": true, "text": TEXT, "mono_ns": ...}``.

``workload stop`` never reaches this file: init's shell in front of it answers that one
itself (a Python start is slow on a destination right after a migration).

``selftest``
    Runs what ``once`` runs, so that the guest builder sees every module it imports.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time


def say(text: str) -> None:
    """Print one ``tsprobe-lab:`` line on the console: stderr, which nc hands down from
    init (/dev/console); stdout is the connection."""
    sys.stderr.write(f"tsprobe-lab: {text}\n")
    sys.stderr.flush()


#: struct timex (x86-64): modes at 0, time.tv_sec at 72, time.tv_usec at 80; 208 bytes.
TIMEX_SIZE = 208
ADJ_SETOFFSET = 0x0100
ADJ_NANO = 0x2000


def step_clock(step_ns: int) -> dict[str, int | bool | str]:
    """Step CLOCK_REALTIME by exactly ``step_ns``.

    ``adjtimex`` with ``ADJ_SETOFFSET | ADJ_NANO`` adds the offset inside the kernel, so a
    preemption between reading the clock and setting it (the FIFO samplers, TCG) cannot
    shorten the step; ``time.clock_settime_ns`` (read, add, set) is the fallback.
    """
    mono0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    real0 = time.clock_gettime_ns(time.CLOCK_REALTIME)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        buf = ctypes.create_string_buffer(TIMEX_SIZE)
        sec, nsec = divmod(step_ns, 1_000_000_000)  # nsec in [0, 1e9) as the kernel wants
        struct.pack_into("<i", buf, 0, ADJ_SETOFFSET | ADJ_NANO)
        struct.pack_into("<qq", buf, 72, sec, nsec)
        if libc.adjtimex(buf) < 0:
            raise OSError(ctypes.get_errno(), "adjtimex(ADJ_SETOFFSET)")
        how = "adjtimex ADJ_SETOFFSET"
    except (OSError, ImportError, AttributeError):
        target = real0 + step_ns + (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - mono0)
        time.clock_settime_ns(time.CLOCK_REALTIME, target)
        how = "clock_settime"
    return {"ok": True, "step_ns": step_ns, "real_before_ns": real0, "mono_ns": mono0, "how": how}


def processes() -> list[dict[str, object]]:
    """Every process's CPU ticks (user + system), state and command line (80 chars)."""
    out: list[dict[str, object]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out.append(
            {
                "pid": int(name),
                "ticks": int(fields[11]) + int(fields[12]),
                "policy": int(fields[38]),
                "cmd": cmd[:80],
            }
        )
    return out


def stat_lines() -> list[str]:
    """The ``cpu`` lines of /proc/stat."""
    with open("/proc/stat") as fh:
        return [line.strip() for line in fh if line.startswith("cpu")]


def handle(line: str) -> dict[str, object]:
    """Answer one command line of the hooks protocol."""
    words = line.split()
    if not words:
        return {"ok": False, "error": "empty command"}
    if words[0] == "ping":
        with open("/proc/uptime") as fh:
            return {"ok": True, "uptime_s": float(fh.read().split()[0])}
    if words[0] == "step" and len(words) == 2:
        try:
            step_ns = int(words[1])
        except ValueError:
            return {"ok": False, "error": f"not an integer: {words[1]!r}"}
        result = step_clock(step_ns)
        say(f"clock stepped by {step_ns} ns")
        return dict(result)
    if words[0] == "procs":
        return {"ok": True, "procs": processes(), "stat": stat_lines()}
    if words[0] == "kmsg" and len(words) > 1:
        text = line.strip().partition(" ")[2].strip()
        mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        try:
            with open("/dev/kmsg", "w") as fh:
                fh.write(f"<4>{text}\n")
        except OSError as err:
            return {"ok": False, "error": f"/dev/kmsg: {err.strerror or err}"}
        return {"ok": True, "text": text, "mono_ns": mono}
    return {"ok": False, "error": f"unknown command {line.strip()!r}"}


def once() -> int:
    """Answer the one command line on stdin (the connection nc hands over) on stdout."""
    line = sys.stdin.readline()
    sys.stdout.write(json.dumps(handle(line)) + "\n")
    sys.stdout.flush()
    return 0


def main(argv: list[str]) -> int:
    """Entry point: ``once`` or ``selftest``."""
    if argv == ["once"]:
        return once()
    if argv == ["selftest"]:
        handle("ping")
        import ctypes  # noqa: F401 - imported lazily by step_clock; the builder must see it

        return 0
    sys.stderr.write("usage: hooks.py once|selftest\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
