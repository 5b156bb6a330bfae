"""A seeded fuzz corpus of HTTP exchanges with the agent's server, and its runner.

Each case is raw bytes written on a new TCP connection to a running agent (``/metrics``,
``/events``, ``/clock``, ``/healthz`` and paths that do not exist; odd methods, malformed
and huge queries, long request lines and headers, many headers, odd versions, pipelined
requests, connections reset mid-request). A case is classified as:

``ok``           every answer is a status the server means (2xx, 404, 405);
``clear error``  a 4xx with a reason (400, 414, 431, ...), 501 or 505 (a method or HTTP
                 version the server does not speak), the connection closed without a
                 status line (http.server answers a request without a version, HTTP/0.9,
                 with a bare body), or, for a reset, the server answering the next client;
``traceback``    a 500, or a traceback on the agent's stderr during the case;
``hang``         the server neither answered nor closed within the case's time limit.

``corpus(seed, count)`` draws ``count`` cases with ``random.Random(seed)`` after the fixed
ones (the issue's: ``since=²``, a 5,000-digit ``since``, a reset, 100 pipelined requests).
The tests use ``SEED``; ``bench/fuzz_http`` runs held-out seeds.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

SEED = 18
CLASSES = ("ok", "clear error", "traceback", "hang")
TIME_LIMIT_S = 5.0

PATHS = ("/metrics", "/events", "/clock", "/healthz", "/nope", "/", "//[", "*", "/events/")
METHODS = ("GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE")
ODD_METHODS = ("get", "G\tT", "CONNECT", "X" * 300, "")
QUERY_VALUES = (
    "0",
    "1",
    "-1",
    "%C2%B2",
    "%D9%A1",
    "9" * 5000,
    "9223372036854775808",
    "1.5",
    "",
    "%FF",
    "1%00",
    "abc",
    "1e3",
    " 1",
    "0x10",
)
VERSIONS = ("HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9.9", "HTTP/1.1x", "")


@dataclass(frozen=True)
class Case:
    """Bytes to write; ``expect`` responses (0 for a reset); ``reset`` closes with RST."""

    name: str
    data: bytes
    expect: int
    reset: bool = False


@dataclass(frozen=True)
class Outcome:
    case: Case
    klass: str
    statuses: tuple[int, ...]
    seconds: float


def request(method: str, target: str, version: str = "HTTP/1.1", headers: str = "") -> bytes:
    line = f"{method} {target} {version}".rstrip()
    return f"{line}\r\nHost: fuzz\r\n{headers}\r\n".encode("utf-8", "surrogateescape")


def fixed_cases() -> list[Case]:
    close = "Connection: close\r\n"
    return [
        Case("since_superscript_two", request("GET", "/events?since=%C2%B2", headers=close), 1),
        Case("since_5000_digits", request("GET", "/events?since=" + "9" * 5000, headers=close), 1),
        Case("reset_mid_request", b"GET /metrics HTTP/1.1\r\nHo", 0, reset=True),
        Case("reset_after_request", request("GET", "/metrics"), 0, reset=True),
        Case(
            "pipelined_100",
            request("GET", "/clock") * 99 + request("GET", "/clock", headers=close),
            100,
        ),
        Case("request_line_70000", request("GET", "/" + "a" * 70000, headers=close), 1),
        Case("header_70000", request("GET", "/clock", headers="X: " + "a" * 70000 + "\r\n"), 1),
        Case("headers_200", request("GET", "/clock", headers="X: y\r\n" * 200 + close), 1),
        Case("unclosed_ipv6_target", request("GET", "//[", headers=close), 1),
        Case(
            "post_with_body",
            request("POST", "/metrics", headers="Content-Length: 5\r\n") + b"hello",
            1,
        ),
        Case(
            "bad_content_length",
            request("GET", "/clock", headers="Content-Length: x\r\n" + close),
            1,
        ),
        Case("http_1_0", request("GET", "/metrics", version="HTTP/1.0"), 1),
        Case("http_0_9", b"GET /metrics\r\n\r\n", 1),
    ]


def corpus(seed: int = SEED, count: int = 200) -> list[Case]:
    """The fixed cases and ``count`` seeded random ones."""
    rng = random.Random(seed)
    cases = fixed_cases()
    for index in range(count):
        roll = rng.random()
        method = rng.choice(ODD_METHODS) if roll < 0.1 else rng.choice(METHODS)
        path = rng.choice(PATHS)
        if rng.random() < 0.6:
            params = [
                f"{rng.choice(('since', 'limit', 'x', 'since', ''))}={rng.choice(QUERY_VALUES)}"
                for _ in range(rng.randint(1, 3))
            ]
            path += "?" + rng.choice(("&", ";", "&&")).join(params)
        version = rng.choice(VERSIONS)
        pipelined = rng.choice((1, 1, 1, 2, 5))
        reset = rng.random() < 0.1
        data = request(method, path, version) * (pipelined - 1)
        data += request(method, path, version, headers="Connection: close\r\n")
        if reset:
            data = data[: rng.randint(1, len(data))]
        cases.append(Case(f"seed{seed}_{index}", data, 0 if reset else pipelined, reset))
    return cases


_STATUS = re.compile(rb"(?:^|\n)HTTP/1\.[01] ([0-9]{3}) ")


def _statuses(answer: bytes) -> list[int]:
    """The status of every response in ``answer`` (a status line starts the answer or
    follows the previous body, which ends in a newline)."""
    return [int(match.group(1)) for match in _STATUS.finditer(answer)]


def run_case(port: int, case: Case, time_limit_s: float = TIME_LIMIT_S) -> Outcome:
    """Write the case on a new connection; read until the server closes it (or, for a
    reset, reset it and then check the server answers a fresh /healthz)."""
    start = time.monotonic()
    answer = b""
    timed_out = False
    with socket.create_connection(("127.0.0.1", port), timeout=time_limit_s) as sock:
        try:
            sock.sendall(case.data)
            if case.reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                while chunk := sock.recv(65536):
                    answer += chunk
        except TimeoutError:
            timed_out = True
        except OSError:
            pass  # the server closed on an oversized request while we were still writing
    statuses = tuple(_statuses(answer))
    if case.reset:
        with socket.create_connection(("127.0.0.1", port), timeout=time_limit_s) as sock:
            sock.sendall(request("GET", "/healthz", headers="Connection: close\r\n"))
            reply = b""
            try:
                while chunk := sock.recv(65536):
                    reply += chunk
            except TimeoutError:
                timed_out = True
        klass = "hang" if timed_out else ("clear error" if _statuses(reply) == [200] else "hang")
    elif timed_out:
        klass = "hang"
    elif any(s == 500 for s in statuses):
        klass = "traceback"
    elif not statuses:
        klass = "clear error"  # closed without a status line (an HTTP/0.9 error answer)
    elif all(s < 300 or s in (404, 405) for s in statuses):
        klass = "ok"
    else:
        klass = "clear error"
    return Outcome(case, klass, statuses, time.monotonic() - start)


def run_all(
    port: int, cases: Iterable[Case], stderr_lines: Callable[[], list[str]] | None = None
) -> list[Outcome]:
    """Run the cases one after another; a traceback on the agent's stderr during a case
    makes that case a traceback.

    :param port: the agent's port.
    :param cases: the cases.
    :param stderr_lines: returns the agent's stderr so far (lines), when known.
    """
    outcomes = []
    seen = len(stderr_lines()) if stderr_lines else 0
    for case in cases:
        outcome = run_case(port, case)
        if stderr_lines is not None:
            time.sleep(0.005)
            lines = stderr_lines()
            if any("Traceback" in line for line in lines[seen:]):
                outcome = Outcome(case, "traceback", outcome.statuses, outcome.seconds)
            seen = len(lines)
        outcomes.append(outcome)
    return outcomes


def file_lines(path: Path) -> Callable[[], list[str]]:
    return lambda: path.read_text(errors="replace").splitlines()


def table(outcomes: Iterable[Outcome]) -> dict[str, int]:
    counts = Counter(o.klass for o in outcomes)
    return {klass: counts[klass] for klass in CLASSES}
