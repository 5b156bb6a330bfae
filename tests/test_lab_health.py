"""The lab health check's sampling test against a stand-in agent.

The real agent in a real guest is checked by every scenario of tests/test_lab.py. The
stand-in here produces what a healthy guest does not: a sampler whose count stops moving,
a first /healthz request that hangs (as one sent when a migration completes can).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from analysis.lab import health as lab_health


class _Agent(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, step: dict[str, int], hang_first_s: float = 0.0) -> None:
        self.step = step
        self.hang_first_s = hang_first_s
        self.healthz_requests = 0
        self.counts = {cpu: 1000 for cpu in step}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Agent

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        agent = self.server
        if self.path == "/healthz":
            with agent.lock:
                agent.healthz_requests += 1
                hang = agent.hang_first_s if agent.healthz_requests == 1 else 0.0
            time.sleep(hang)
            with agent.lock:
                for cpu, step in agent.step.items():
                    agent.counts[cpu] += step
                probes = {p: {"up": True} for p in lab_health.required_probes(())}
                body = json.dumps(
                    {"status": "ok", "samples": agent.counts, "probes": probes}
                ).encode()
        elif self.path == "/metrics":
            body = b"tsprobe_up 1\n"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def _agent(step: dict[str, int], hang_first_s: float = 0.0) -> Iterator[int]:
    agent = _Agent(step, hang_first_s)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    try:
        yield int(agent.server_address[1])
    finally:
        agent.shutdown()
        agent.server_close()


def test_every_cpu_moving_ends_the_wait_at_the_first_read_that_shows_it() -> None:
    with _agent({"0": 500, "1": 480}) as port:
        first = lab_health._sample_counts(lab_health._healthz(port, 5.0))
        t0 = time.monotonic()
        rates = lab_health._sampling_rates(port, first, cpus=2)
        took = time.monotonic() - t0
    assert set(rates) == {"0", "1"}
    # one read 0.5 s after the first: 500 and 480 samples in about 0.5 s
    assert 500 / took <= rates["0"] <= 500 / 0.5
    assert 480 / took <= rates["1"] <= 480 / 0.5


def test_a_cpu_that_never_moves_reads_zero_after_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lab_health, "SAMPLING_WAIT_S", 1.2)
    with _agent({"0": 500, "1": 0}) as port:
        first = lab_health._sample_counts(lab_health._healthz(port, 5.0))
        t0 = time.monotonic()
        rates = lab_health._sampling_rates(port, first, cpus=2)
        took = time.monotonic() - t0
    assert rates["1"] == 0 and rates["0"] > 0
    assert took >= 1.2  # it waited for CPU 1 the whole time


def test_a_cpu_missing_from_the_answer_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    # A two-CPU guest whose agent reports one CPU: the other is not sampling.
    monkeypatch.setattr(lab_health, "SAMPLING_WAIT_S", 1.2)
    with _agent({"0": 500}) as port:
        first = lab_health._sample_counts(lab_health._healthz(port, 5.0))
        t0 = time.monotonic()
        rates = lab_health._sampling_rates(port, first, cpus=2)
        took = time.monotonic() - t0
    assert "1" not in rates and rates["0"] > 0
    assert took >= 1.2


def test_get_or_error_returns_the_body_or_the_error() -> None:
    with _agent({"0": 1}) as port:
        ok = lab_health._get_or_error(f"http://127.0.0.1:{port}/metrics", 5.0)
        body, error = lab_health._get_or_error(f"http://127.0.0.1:{port}/nothing", 5.0)
    assert ok == (b"tsprobe_up 1\n", None)
    assert body == b"" and isinstance(error, OSError)


def test_a_hanging_first_health_read_is_sent_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first /healthz hangs for 3 s; with 0.5 s reads the second read answers at once.
    monkeypatch.setattr(lab_health, "HEALTH_READ_S", 0.5)
    answers: list[float] = []
    with _agent({"0": 500, "1": 500}, hang_first_s=3.0) as port:
        t0 = time.monotonic()
        health, down, err, times = lab_health._poll_health(
            port, lab_health.required_probes(()), lambda: answers.append(time.monotonic() - t0)
        )
    assert health["status"] == "ok" and not down and err is None
    assert times["answer_s"] is not None and 0.5 <= times["answer_s"] < 2.0
    assert len(answers) == 1 and answers[0] < 2.0  # on_answer: once, at the first answer
