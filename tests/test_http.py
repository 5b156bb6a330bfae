"""The agent's HTTP endpoint against a running Agent with fake probes and fixture roots."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.errors import ConfigError, ListenError
from agent.http import MAX_PAGE, QueryError, parse_events_query, parse_listen, read_clocks
from agent.main import Agent
from probe.base import Health
from probe.events import Event, iter_event_file, parse_event
from tests.fakeprobes import (
    FIXTURE_BOOT_ID,
    FIXTURE_ROOTS,
    BrokenHealth,
    FakeClock,
    FakeKmsg,
    FakeProbe,
    FakeStall,
)

MS = 1_000_000


def request(
    url: str, method: str = "GET", timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


def config(tmp_path: Path, **overrides: Any) -> AgentConfig:
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "events_path": str(tmp_path / "events.jsonl"),
    }
    settings.update(overrides)
    return AgentConfig(**settings)


@pytest.fixture
def stall() -> FakeStall:
    return FakeStall({0: 100, 1: 99})


@pytest.fixture
def running(tmp_path: Path, stall: FakeStall) -> Iterator[Agent]:
    lines: list[str] = []
    agent = Agent(
        config(tmp_path),
        [stall, FakeClock(host_offset_ns=-1_500), FakeKmsg()],
        FIXTURE_ROOTS,
        say=lines.append,
    )
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


def get_events(agent: Agent, since: int, limit: int) -> tuple[list[Event], dict[str, str]]:
    status, headers, body = request(f"{agent.url}/events?since={since}&limit={limit}")
    assert status == 200, body
    return [parse_event(line) for line in body.decode().splitlines()], headers


def test_events_paging_with_headers(running: Agent, stall: FakeStall) -> None:
    for n in range(30):
        stall.send("stall", (3 + n) * MS, cpu=n % 2, cause="vcpu-blocked")
    last = running.log.stats().last_seq
    events, headers = get_events(running, 0, 10)
    assert [e.seq for e in events] == list(range(1, 11))
    assert events[0].kind == "agent_start" and events[0].boot_id == FIXTURE_BOOT_ID
    assert headers["X-Tsprobe-Next-Since"] == "10"
    assert headers["X-Tsprobe-Last-Seq"] == str(last)
    assert headers["X-Tsprobe-Oldest-Seq"] == "1"
    assert headers["X-Tsprobe-Missed"] == "0"
    assert headers["X-Tsprobe-Agent-Id"] == running.agent_id
    assert headers["X-Tsprobe-Boot-Id"] == FIXTURE_BOOT_ID
    assert headers["Content-Type"].startswith("application/x-ndjson")
    seen = [e.seq for e in events]
    since = int(headers["X-Tsprobe-Next-Since"])
    while True:
        page, headers = get_events(running, since, 7)
        if not page:
            break
        seen.extend(e.seq for e in page)
        since = int(headers["X-Tsprobe-Next-Since"])
    assert seen == list(range(1, last + 1))
    assert headers["X-Tsprobe-Next-Since"] == str(last)
    spooled = [e.seq for e in iter_event_file(running.config.events_path or "")]
    assert spooled == seen


def test_events_default_and_capped_limit(running: Agent) -> None:
    status, _, body = request(f"{running.url}/events")
    assert status == 200 and body.startswith(b'{"v":1,"seq":1,')
    status, _, _ = request(f"{running.url}/events?since=0&limit={MAX_PAGE * 5}")
    assert status == 200


@pytest.mark.parametrize(
    "query",
    [
        "since=abc",
        "since=-1",
        "limit=0",
        "limit=1.5",
        "sinse=3",
        "since=1&since=2",
        "since=",
        "since=%C2%B2",  # issue 18: '²' passed isdigit() and int() refused it: a 500
        "since=" + "9" * 5000,  # issue 18: a 5,000-digit since was a 500
        "since=9223372036854775808",  # one above the largest seq
        "limit=%D9%A1",  # an Arabic-Indic 1: int() would take it
        "since=%FF",
        "since=1%00",
    ],
)
def test_bad_events_query_is_400(running: Agent, query: str) -> None:
    status, _, body = request(f"{running.url}/events?{query}")
    assert status == 400
    assert body.startswith(b"bad request: ") and body.count(b"\n") == 1


def running_port(agent: Agent) -> int:
    return int(agent.url.rsplit(":", 1)[1])


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection, read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "target",
    ["//[", "/events?since=1#x", "http://[::1/metrics", "/%", "/metrics?\xff", "*"],
)
def test_odd_request_targets_are_not_500(running: Agent, target: str) -> None:
    """Issue 18 (server): urlsplit raised on a target such as '//[' (a 500)."""
    answer = raw_exchange(
        running_port(running),
        f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    status = int(answer.split(b" ", 2)[1])
    assert status in (200, 400, 404), answer[:200]


def test_keepalive_requests_are_not_delayed(running: Agent) -> None:
    """Issue 18 (server): headers and body sent apart met Nagle and the client's delayed ACK:
    about 44 ms per request on a kept-alive connection (0.6 ms on a new one)."""
    conn = http.client.HTTPConnection("127.0.0.1", running_port(running), timeout=5)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        conn.request("GET", "/clock")
        conn.getresponse().read()
        times.append(time.perf_counter() - start)
    conn.close()
    assert sorted(times)[15] < 0.015, times


def test_pipelined_requests_are_answered_in_order(running: Agent) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    start = time.perf_counter()
    answer = raw_exchange(
        running_port(running),
        request * 99 + b"GET /clock HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 100
    assert b"realtime_ns" in answer.rsplit(b"HTTP/1.1 200", 1)[1]
    assert time.perf_counter() - start < 2.0


def test_a_burst_of_connects_waits_for_no_syn_retry(running: Agent) -> None:
    """Issue 18 (server): with a listen backlog of 5, 28 of 200 connects waited about 1 s
    (a dropped SYN is retried after 1 s)."""
    count = 200
    barrier = threading.Barrier(count)
    times: list[float] = []

    def one() -> None:
        barrier.wait()
        start = time.perf_counter()
        answer = raw_exchange(
            running_port(running), b"GET /clock HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200")
        times.append(time.perf_counter() - start)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(times) == count
    assert max(times) < 0.9, sorted(times)[-5:]


def test_a_client_reset_is_one_line_without_traceback(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Issue 18 (server): a client that reset its connection printed a ConnectionResetError
    traceback; now one line, and at most one per ERROR_LOG_INTERVAL_S."""
    lines: list[str] = []
    agent = Agent(config(tmp_path), [FakeProbe("kmsg")], FIXTURE_ROOTS, say=lines.append)
    agent.start()
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", running_port(agent)), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost")  # an unfinished request
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
        deadline = time.monotonic() + 5
        while not [x for x in lines if "tsprobe: http:" in x] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert request(f"{agent.url}/healthz")[0] == 200
    finally:
        agent.stop()
    said = [line for line in lines if "tsprobe: http:" in line]
    assert len(said) == 1 and "reset" in said[0].lower(), lines
    _, err = capfd.readouterr()
    assert "Traceback" not in err


def test_parse_events_query() -> None:
    assert parse_events_query("") == (0, 1000)
    assert parse_events_query("since=5&limit=20") == (5, 20)
    assert parse_events_query("limit=99999") == (0, MAX_PAGE)
    with pytest.raises(QueryError, match="unknown parameter 'x'"):
        parse_events_query("x=1")


def test_clock(running: Agent) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    status, headers, body = request(f"{running.url}/clock")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    data = json.loads(body)
    assert before <= data["monotonic_ns"] <= after
    assert abs(data["realtime_ns"] - time.time_ns()) < 5_000_000_000
    assert data["boottime_ns"] >= data["monotonic_ns"] - data["bracket_ns"]
    assert 0 <= data["bracket_ns"] < after - before
    assert data["clocksource"] == "kvm-clock"
    assert data["boot_id"] == FIXTURE_BOOT_ID and data["agent_id"] == running.agent_id
    assert data["host_offset_ns"] == -1_500


def test_read_clocks_prefers_a_short_bracket() -> None:
    reading = read_clocks(max_bracket_ns=1_000_000)
    assert reading.bracket_ns <= 1_000_000 or reading.tries == 20
    assert read_clocks(max_bracket_ns=-1, tries=3).tries == 3


def test_healthz_ok_and_degraded(running: Agent) -> None:
    status, _, body = request(f"{running.url}/healthz")
    assert status == 200
    data = json.loads(body)
    assert data["status"] == "degraded"  # the fake clock has no ptp
    assert data["down"] == ["ptp"]
    assert data["probes"]["stall"] == {"up": True, "detail": "", "off": False}
    assert data["probes"]["ptp"]["detail"] == "no KVM virtual PTP device"
    # The default canaries are configured, but this agent was given no canary probe.
    assert data["probes"]["timer"] == {"up": False, "detail": "not running", "off": True}
    assert data["events"]["last_seq"] >= 4 and data["events"]["spool"]["errors"] == 0
    assert data["samples"] == {"0": 100, "1": 99}


def test_metrics_endpoint(running: Agent, stall: FakeStall) -> None:
    stall.send("stall", 150 * MS, cpu=1, cause="vcpu-blocked")
    status, headers, body = request(f"{running.url}/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert 'tsprobe_cpu_stall_seconds_count{cpu="1"} 1.0' in text
    assert 'tsprobe_cpu_samples_total{cpu="0"} 100.0' in text
    assert 'tsprobe_probe_up{probe="stall"} 1.0' in text
    assert 'tsprobe_probe_up{probe="ptp"} 0.0' in text


def test_unknown_path_and_method(running: Agent) -> None:
    status, _, body = request(f"{running.url}/nope")
    assert status == 404 and b"/metrics" in body
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = request(f"{running.url}/metrics", method=method)
        assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = request(f"{running.url}/healthz", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_no_log_line_per_request(running: Agent, capfd: pytest.CaptureFixture[str]) -> None:
    for path in ("/metrics", "/nope", "/events?since=x"):
        request(running.url + path)
    out, err = capfd.readouterr()
    assert "GET" not in err and "GET" not in out


def test_a_probe_whose_health_raises_is_down_and_metrics_still_work(tmp_path: Path) -> None:
    broken = BrokenHealth("stall")
    with Agent(config(tmp_path), [broken, FakeKmsg()], FIXTURE_ROOTS, say=lambda _: None) as agent:
        status, _, body = request(f"{agent.url}/metrics")
        assert status == 200
        text = body.decode()
        assert 'tsprobe_probe_up{probe="stall"} 0.0' in text
        assert 'tsprobe_probe_up{probe="kmsg"} 1.0' in text
        status, _, body = request(f"{agent.url}/healthz")
        data = json.loads(body)
        assert status == 200 and "stall" in data["down"]
        assert "health exploded" in data["probes"]["stall"]["detail"]


def test_a_probe_that_fails_to_start_is_down_and_the_agent_runs(tmp_path: Path) -> None:
    class NoStart(FakeProbe):
        def start(self, emit: Any) -> None:
            raise OSError("no samplers here")

    lines: list[str] = []
    with Agent(config(tmp_path), [NoStart("kmsg")], FIXTURE_ROOTS, say=lines.append) as agent:
        assert agent.probe_health()["kmsg"] == Health(False, "start failed: no samplers here")
        assert request(f"{agent.url}/metrics")[0] == 200
    assert "tsprobe: probe kmsg: down: start failed: no samplers here" in lines


def test_unwritable_events_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    agent = Agent(
        config(tmp_path, events_path=str(tmp_path / "file" / "events.jsonl")),
        [],
        FIXTURE_ROOTS,
        say=lambda _: None,
    )
    with pytest.raises(ConfigError, match=r"cannot write the event spool .*Not a directory"):
        agent.start()
    agent.stop()  # harmless after a failed start


def test_listen_address_in_use(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        agent = Agent(
            config(tmp_path, listen=f"127.0.0.1:{port}"), [], FIXTURE_ROOTS, say=lambda _: None
        )
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}"):
            agent.start()
    # The spool opened before the bind failed was closed again; a new agent can use it.
    assert (tmp_path / "events.jsonl").read_text() == ""


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:9466") == ("0.0.0.0", 9466)
    assert parse_listen(":80") == ("0.0.0.0", 80)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in (
        "9466",
        "host:port",
        "::1:80",
        "1.2.3.4:70000",
        "127.0.0.1:²",  # issue 18: isdigit() accepted it and int() refused it
        "127.0.0.1:١",  # int() would take it
        "127.0.0.1:" + "1" * 400,
        "[::1:80",
        "[]:80",
        "127.0.0.1:",
        "bad host:80",
    ):
        with pytest.raises(ListenError) as info:
            parse_listen(bad)
        assert len(str(info.value)) < 200


def test_run_stop_and_the_agent_stop_event(tmp_path: Path) -> None:
    probe = FakeProbe("kmsg")
    agent = Agent(config(tmp_path), [probe], FIXTURE_ROOTS, say=lambda _: None)
    agent.start()
    url = agent.url
    t0 = time.monotonic()
    assert agent.run(200 * MS) == "duration"
    assert time.monotonic() - t0 >= 0.2
    agent.stop()
    agent.stop()
    assert probe.stopped == 1
    events = list(iter_event_file(tmp_path / "events.jsonl"))
    assert [events[0].kind, events[-1].kind] == ["agent_start", "agent_stop"]
    assert events[-1].get("reason") == "duration"
    assert events[0].get("cpus") == [0, 1] and events[0].get("clocksource") == "kvm-clock"
    assert events[0].get("config")["listen"] == "127.0.0.1:0"
    with pytest.raises(OSError):
        request(url + "/healthz", timeout=1)


def test_run_returns_on_sigterm(tmp_path: Path) -> None:
    with Agent(config(tmp_path), [], FIXTURE_ROOTS, say=lambda _: None) as agent:
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        assert agent.run(None) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_request_stop_from_another_thread(tmp_path: Path) -> None:
    with Agent(config(tmp_path), [], FIXTURE_ROOTS, say=lambda _: None) as agent:
        threading.Timer(0.05, agent.request_stop, ("test",)).start()
        assert agent.run(10_000 * MS) == "test"
