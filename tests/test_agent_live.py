"""The real agent on this machine: a known stall recovered, promtool and Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.liveagent import free_port, http_get, live_agent

INTERVAL_NS = 1_000_000
CPUS = sorted(os.sched_getaffinity(0))


def wait_for_samples(agent_url_get, cpus: list[int], timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, _, body = agent_url_get("/metrics")
        text = body.decode()
        if all(
            any(
                line.startswith(f'tsprobe_cpu_samples_total{{cpu="{cpu}"}}')
                and float(line.split()[-1]) > 100
                for line in text.splitlines()
            )
            for cpu in cpus
        ):
            return
        time.sleep(0.2)
    raise AssertionError("samplers did not start sampling")


@pytest.mark.slow
@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to freeze one and watch the other")
def test_frozen_sampler_is_reported_once_with_its_length(tmp_path: Path) -> None:
    """SIGSTOP one sampler for 150 ms and 700 ms: one stall each, that long, on that CPU."""
    with live_agent(tmp_path, "--no-kmsg") as agent:
        wait_for_samples(agent.get, CPUS)
        time.sleep(1.0)
        victim = CPUS[-1]
        pid = agent.sampler_pid(victim)
        start_seq = agent.events()[-1].seq
        frozen: list[tuple[int, int]] = []
        for hold in (0.150, 0.700):
            t0 = time.monotonic_ns()
            os.kill(pid, signal.SIGSTOP)
            time.sleep(hold)
            t1 = time.monotonic_ns()
            os.kill(pid, signal.SIGCONT)
            frozen.append((t0, t1 - t0))
            time.sleep(1.0)
        time.sleep(1.5)
        stalls = [e for e in agent.events(start_seq) if e.kind == "stall"]
    window_start = frozen[0][0] - 50_000_000
    window_end = frozen[-1][0] + frozen[-1][1] + 50_000_000

    def overlaps(event_start: int, length: int, t0: int, held: int) -> bool:
        return event_start < t0 + held and event_start + length > t0

    for t0, held in frozen:
        mine = [
            e
            for e in stalls
            if e.get("cpu") == victim and overlaps(e.mono_ns, e.duration_ns or 0, t0, held)
        ]
        # One event for the whole freeze, as long as the freeze within 1 interval + 5 ms.
        assert len(mine) == 1, ([e.to_dict() for e in mine], t0, held)
        length = mine[0].duration_ns or 0
        assert held - 1_000 <= length <= held + INTERVAL_NS + 5_000_000, (length, held)
        assert abs(mine[0].mono_ns - t0) <= INTERVAL_NS + 5_000_000
    others = [
        e
        for e in stalls
        if e.get("cpu") != victim
        and (e.duration_ns or 0) >= 100_000_000
        and window_start <= e.mono_ns <= window_end
    ]
    assert others == [], [e.to_dict() for e in others]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) missing")
def test_promtool_accepts_live_metrics(tmp_path: Path) -> None:
    with live_agent(tmp_path) as agent:
        wait_for_samples(agent.get, CPUS)
        status, headers, body = agent.get("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    for name in (
        "tsprobe_cpu_stall_seconds_bucket",
        "tsprobe_cpu_stall_longest_seconds",
        "tsprobe_clock_steps_total",
        "tsprobe_probe_up",
        "tsprobe_events_dropped_total",
    ):
        assert name in text
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus (Debian) missing")
def test_real_prometheus_scrapes_every_cpu(tmp_path: Path) -> None:
    with live_agent(tmp_path) as agent:
        target = agent.url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: tsprobe\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        port = free_port()
        prom = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "prometheus.log", "wb"),  # noqa: SIM115
        )
        try:
            query = urllib.parse.quote("tsprobe_cpu_samples_total")
            deadline = time.monotonic() + 60
            series: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                try:
                    status, _, body = http_get(
                        f"http://127.0.0.1:{port}/api/v1/query?query={query}"
                    )
                except OSError:
                    status = 0
                if status == 200:
                    series = json.loads(body)["data"]["result"]
                    if len(series) == len(CPUS):
                        break
                time.sleep(0.5)
        finally:
            prom.terminate()
            prom.wait(20)
    cpus = sorted(int(s["metric"]["cpu"]) for s in series)  # type: ignore[index]
    assert cpus == CPUS, series
    assert all(float(s["value"][1]) > 0 for s in series)  # type: ignore[index]
