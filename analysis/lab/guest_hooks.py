"""Lab hooks inside the guest (stdlib only; installed as /opt/tsprobe/lab/hooks.py).

This file runs in the lab guest, never on the host. Started by the guest's init (the
memory workload is ``guest_workload.py``):

``serve --port 9467 --agent URL``
    A line protocol on TCP (the host reaches it through QEMU's ``hostfwd``): the host sends
    one line, the guest answers one JSON line and closes.

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

    It also polls the agent's /healthz every 5 s and prints ``tsprobe-lab: health ...`` on
    the console when the status changes (and ``agent up`` the first time it answers).

``selftest``
    Runs what ``serve`` runs once, so that the guest builder sees every module it imports.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time

HEALTH_PERIOD_S = 5.0


def say(text: str) -> None:
    """Print one ``tsprobe-lab:`` line on the console (stdout is /dev/console)."""
    sys.stdout.write(f"tsprobe-lab: {text}\n")
    sys.stdout.flush()


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


def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> bytes:
    """A minimal HTTP/1.0 GET (no urllib: fewer modules in the guest)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    return raw.partition(b"\r\n\r\n")[2]


def health_line(host: str, port: int) -> str | None:
    """One summary of the agent's /healthz, or None when it does not answer."""
    try:
        body = json.loads(http_get(host, port, "/healthz"))
    except (OSError, ValueError):
        return None
    events = body.get("events", {})
    return (
        f"status={body.get('status')} down={','.join(body.get('down', [])) or '-'} "
        f"cpus={','.join(str(c) for c in body.get('cpus', []))} "
        f"last_seq={events.get('last_seq')} dropped={events.get('dropped')}"
    )


def serve(port: int, agent: str) -> int:
    """Run the hooks server and the health watcher forever."""
    host, _, agent_port = agent.removeprefix("http://").rstrip("/").partition(":")
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(4)
    srv.settimeout(1.0)
    last_health: str | None = None
    next_health = 0.0
    while True:
        now = time.monotonic()
        if now >= next_health:
            next_health = now + HEALTH_PERIOD_S
            line = health_line(host, int(agent_port or 9466))
            if line is not None and last_health is None:
                with open("/proc/uptime") as fh:
                    say(f"agent up at {fh.read().split()[0]}s")
            if line != last_health:
                say(f"health {line or 'agent not answering'}")
                last_health = line
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(5.0)
            try:
                request = conn.makefile("r").readline()
                conn.sendall((json.dumps(handle(request)) + "\n").encode())
            except OSError as err:
                say(f"hooks: {err}")


def main(argv: list[str]) -> int:
    """Entry point: ``serve`` or ``selftest``."""
    parser = argparse.ArgumentParser(prog="hooks.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--port", type=int, default=9467)
    p_serve.add_argument("--agent", default="http://127.0.0.1:9466")
    sub.add_parser("selftest")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.port, args.agent)
    handle("ping")
    health_line("127.0.0.1", 1)
    import ctypes  # noqa: F401 - imported lazily by step_clock; the builder must see it

    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
