"""Is the lab guest well? The agent's answers, the sampling rates and the memory workload's verdict.

A scenario asks the guest three times: before the disturbance (``wait_agent``: the agent
answers /healthz with every probe the run needs up), after it (``check_health``: the agent
answers again within ``AGENT_ANSWER_S``, its probes recover within ``PROBE_RECOVERY_S``,
every CPU's sample count advances within ``SAMPLING_WAIT_S``, the console shows no oops),
and for the memory workload's verdict on its pages (``hooks_command``, the guest hooks'
TCP port; ``memory_problem``). A CPU that took no sample in the settle time is a guest
that did not recover (``analysis.lab.outcome``), so the waits must outlast a slow but live
guest. Every wait is bounded; nothing here raises for a sick guest: the answers are
facts for the summary.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from analysis.lab import qemu as lq
from analysis.lab.errors import QemuError, ScenarioError

#: Console patterns that make a guest unhealthy: the kernel's, a failed module load, a
#: program of init's that crashed (busybox sh prints "Segmentation fault"), and a page of
#: the memory workload that lost a write.
OOPS = re.compile(
    r"Oops|BUG:|Kernel panic|general protection fault|WARNING: CPU|soft lockup|"
    r"hard LOCKUP|blocked for more than|segfault at|Call Trace|tsprobe-lab: insmod|"
    r"Segmentation fault|tsprobe-lab: workload: bad memory"
)


#: The settle time: the health check waits up to this long (from the agent's first
#: answer after the disturbance) for every CPU's sample count to advance (the samplers
#: report it about once a second). A CPU that took no sample in it is a guest that did
#: not recover (``analysis.lab.outcome``), so it must outlast a slow but live guest.
SAMPLING_WAIT_S = 10.0


def _get(url: str, timeout_s: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body: bytes = resp.read()
        return body


def _healthz(port: int, timeout_s: float) -> dict[str, Any]:
    """The agent's /healthz on ``port``, parsed.

    :raise OSError: when it does not answer; ValueError: when the answer is not JSON.
    """
    health = json.loads(_get(f"http://127.0.0.1:{port}/healthz", timeout_s))
    if not isinstance(health, dict):
        raise ValueError("/healthz did not answer a JSON object")
    return health


def _sample_counts(health: dict[str, Any]) -> dict[str, float]:
    """Each CPU's sampler iterations from a /healthz answer (cheaper for a loaded guest
    than /metrics)."""
    return {str(cpu): float(n) for cpu, n in (health.get("samples") or {}).items()}


def _probes_down(health: dict[str, Any], probes: tuple[str, ...]) -> list[str]:
    """Those of ``probes`` that a /healthz answer does not report up."""
    states = health.get("probes", {})
    return [p for p in probes if not states.get(p, {}).get("up")]


def required_probes(canaries: tuple[str, ...]) -> tuple[str, ...]:
    """The probes the lab waits for before the disturbance and checks after it."""
    return ("stall", "clock", "kmsg", *canaries)


def wait_agent(port: int, qemu: lq.Qemu, timeout_s: float, probes: tuple[str, ...]) -> float:
    """Wait until the agent answers on ``port`` and each of ``probes`` is up (the stall
    probe is up once its sampler on every CPU reported).

    :raise QemuError: when QEMU dies or the agent is not ready in time.
    :return: seconds since QEMU was started.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, ValueError):
            if not _probes_down(_healthz(port, 1.0), probes):
                return time.monotonic() - qemu.started_mono
        if not qemu.alive():
            raise QemuError(f"{qemu.spec.name} QEMU exited: {qemu.stderr_tail() or '?'}")
        if time.monotonic() > deadline:
            tail = qemu.console().strip().splitlines()[-3:]
            raise QemuError(
                f"the guest's agent was not ready after {timeout_s:.0f} s "
                f"(console: {' | '.join(tail) or 'empty'})"
            )
        time.sleep(0.2)


#: How long the lab waits for the guest's hooks to listen (busybox nc, started by init
#: right before the agent: its port is open long before the agent's).
HOOKS_WAIT_S = 15.0


def hooks_command(
    port: int, line: str, timeout_s: float = 5.0, wait_s: float = HOOKS_WAIT_S
) -> dict[str, Any]:
    """Send one line to the guest's lab hooks (port forwarded to guest 9467).

    QEMU's user network accepts the host's connection before the guest does: while the
    hooks are not listening yet, the connection ends (or is reset) without a byte. Only
    that is tried again, every 0.2 s for up to ``wait_s``: the hooks answer every line
    they read, so a line they acted on is not sent twice.

    :raise ScenarioError: when the hooks do not answer or answer an error.
    """
    import socket

    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
                sock.sendall(line.encode() + b"\n")
                reply = sock.makefile("r").readline()
        except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
            reply = ""  # not listening yet, as an empty answer
        except OSError as err:
            raise ScenarioError(f"lab hooks did not answer {line!r}: {err}") from err
        if reply:
            break
        if time.monotonic() >= deadline:
            raise ScenarioError(f"lab hooks did not answer {line!r} within {wait_s:g} s")
        time.sleep(0.2)
    try:
        result: dict[str, Any] = json.loads(reply)
    except ValueError as err:
        raise ScenarioError(f"lab hooks did not answer {line!r}: {err}") from err
    if not result.get("ok"):
        raise ScenarioError(f"lab hooks refused {line!r}: {result.get('error')}")
    return result


#: How long the agent may take to answer /healthz after the scenario.
AGENT_ANSWER_S = 15.0


#: How long a probe may stay down after the scenario before the health check reports it.
PROBE_RECOVERY_S = 10.0


#: Timeout of each /healthz read of the health check's first poll.
HEALTH_READ_S = 3.0


def memory_problem(verdict: dict[str, Any] | None) -> str:
    """The health problem in the workload's verdict on its memory (empty: none).

    A verdict with bad pages is a problem, and so is none at all: the workload ran, so a
    guest that cannot say its memory is intact is not known to be healthy.
    """
    if verdict is None:
        return "memory: the workload was not stopped (no verdict on the guest's memory)"
    if "bad_pages" not in verdict:
        why = verdict.get("verdict") or "none"
        return f"memory: the workload gave no verdict on the guest's memory ({why})"
    if int(verdict["bad_pages"]):
        return (
            f"memory: {verdict['bad_pages']} of {verdict.get('pages')} workload pages lost "
            f"a write (the guest's memory is corrupted)"
        )
    return ""


def memory_line(verdict: dict[str, Any] | None) -> str:
    """The verdict in a few words."""
    if not verdict or "bad_pages" not in verdict:
        return "no verdict"
    return (
        f"{verdict['bad_pages']} bad of {verdict.get('pages')} workload pages "
        f"({verdict.get('checks')} page checks over {verdict.get('passes')} passes)"
    )


def _poll_health(
    port: int, probes: tuple[str, ...], on_answer: Callable[[], object] | None = None
) -> tuple[dict[str, Any], list[str], Exception | None, dict[str, float | None]]:
    """Read the agent's /healthz every 0.5 s until it answers (for ``AGENT_ANSWER_S``),
    then until none of ``probes`` is down (for ``PROBE_RECOVERY_S`` more): right after a
    long stall (paused: 4 s) a worker's sign of life is late and /healthz calls its probe
    down for a moment (CI saw "stall" and "timer").

    Each read may take ``HEALTH_READ_S``: a request sent while the guest is still
    catching up after a migration can go unanswered for longer than a later one (a
    /healthz sent when the migration completed was answered 6.2 s later, while the
    recorder's requests were answered from 4.1 s on), so a slow read is sent again.
    ``on_answer`` is called once, at the first answer.

    :return: the last answer (empty without one), the probes down in it, the last error
        when there was no answer, and the seconds until the first answer and until every
        probe was up (``answer_s``, ``probes_up_s``; None when it did not happen).
    """
    health: dict[str, Any] = {}
    err: Exception | None = None
    start = time.monotonic()
    deadline = start + AGENT_ANSWER_S
    times: dict[str, float | None] = {"answer_s": None, "probes_up_s": None}
    while True:
        try:
            health = _healthz(port, HEALTH_READ_S)
        except (OSError, ValueError) as error:
            err = error
        if health and times["answer_s"] is None:
            times["answer_s"] = round(time.monotonic() - start, 2)
            deadline = time.monotonic() + PROBE_RECOVERY_S
            if on_answer is not None:
                on_answer()
        down = _probes_down(health, probes) if health else []
        if health and not down:
            times["probes_up_s"] = round(time.monotonic() - start, 2)
        if times["probes_up_s"] is not None or time.monotonic() > deadline:
            return health, down, None if health else err, times
        time.sleep(0.5)


def _get_or_error(url: str, timeout_s: float) -> tuple[bytes, Exception | None]:
    """``_get``, with the error that ended the request returned instead of raised."""
    try:
        return _get(url, timeout_s), None
    except (OSError, ValueError) as err:
        return b"", err


def _sampling_rates(
    port: int, first: dict[str, float], cpus: int, with_window: bool = False
) -> dict[str, float]:
    """Read /healthz every 0.5 s until every CPU's sample count moved past ``first`` (or
    for ``SAMPLING_WAIT_S``); return each CPU's samples per second since ``first``.

    A count that has not moved reads 0; ``with_window`` adds ``window_s``, the seconds
    read. The rates are rough: a sampler reports its count
    about once a second, so a count sent before a stall and filed after it lands inside
    the window (above 1000/s at a 1 ms interval).

    :raise OSError: when /healthz does not answer; ValueError: when it answers no JSON.
    """
    t0 = time.monotonic()
    wanted = [str(c) for c in range(cpus)]
    while True:
        time.sleep(0.5)
        counts = _sample_counts(_healthz(port, 10.0))
        span = time.monotonic() - t0
        rates = {c: (n - first.get(c, 0)) / span for c, n in counts.items()}
        if all(rates.get(c, 0) > 0 for c in wanted) or span > SAMPLING_WAIT_S:
            return {**rates, "window_s": span} if with_window else rates


def check_health(
    final: lq.Qemu,
    qemus: list[lq.Qemu],
    cpus: int,
    canaries: tuple[str, ...] = (),
    injected: str | None = None,
    on_answer: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Check the guest after the scenario: consoles, agent, every CPU sampling.

    :param final: the QEMU the guest runs in now.
    :param qemus: every QEMU of the scenario (their consoles are scanned).
    :param cpus: the number of vCPUs.
    :param canaries: the canaries the agent runs (each must be up).
    :param injected: the line the lab wrote to /dev/kmsg itself (``--kmsg``), not an oops.
    :param on_answer: called once when the agent first answers.
    :return: ``{"ok", "problems", ...}`` (also written as lab-health.json).
    """
    problems: list[str] = []
    oopses = []
    for q in qemus:
        for line in q.console().splitlines():
            if OOPS.search(line) and not (injected and injected.strip() in line):
                oopses.append(f"{q.spec.name}: {line.strip()}")
    if oopses:
        problems.append(f"console: {oopses[0]}")
    if not final.alive():
        problems.append(f"{final.spec.name} QEMU exited")
    port = final.spec.agent_port
    health, down, err, times = _poll_health(port, required_probes(canaries), on_answer)
    if not health:
        problems.append(f"agent on {final.spec.name} does not answer: {err}")
    if health and down:
        problems.append(f"probes down: {', '.join(down)}")
    rates: dict[str, float] = {}
    window: float | None = None
    if health:
        # The poll's last answer is the first read: _poll_health returns right after it.
        try:
            rates = _sampling_rates(port, _sample_counts(health), cpus, with_window=True)
        except (OSError, ValueError) as err:
            problems.append(f"/healthz failed: {err}")
        window = rates.pop("window_s", None)
        idle = [c for c in map(str, range(cpus)) if rates.get(c, 0) <= 0]
        if idle:
            problems.append(f"CPU {','.join(idle)} not sampling")
    return {
        "ok": not problems,
        "problems": problems,
        "final": final.spec.name,
        "oopses": oopses[:20],
        "agent_status": health.get("status"),
        "probes_down": health.get("down"),
        "samples_per_s": {c: round(v, 1) for c, v in rates.items()},
        "sampling_window_s": None if window is None else round(window, 2),
        "settle_s": SAMPLING_WAIT_S,
        **times,
    }
