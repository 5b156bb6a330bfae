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

from probe.events import Event
from tests.liveagent import free_port, http_get, live_agent, stop_process

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


TOLERANCE_NS = INTERVAL_NS + 5_000_000
ATTEMPTS = 3


def overlapping(stalls: list[Event], cpu: int, t0: int, held: int) -> list[Event]:
    """The stall events on ``cpu`` whose gap overlaps the freeze [t0, t0 + held)."""
    return [
        e
        for e in stalls
        if e.get("cpu") == cpu and e.mono_ns < t0 + held and e.mono_ns + (e.duration_ns or 0) > t0
    ]


@pytest.mark.slow
@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to freeze one and watch the other")
@pytest.mark.parametrize("hold_s", [0.150, 0.700])
def test_frozen_sampler_is_reported_once_with_its_length(tmp_path: Path, hold_s: float) -> None:
    """SIGSTOP one sampler for 150 ms and 700 ms: one stall, that long, on that CPU only.

    Every freeze must give exactly one event on the frozen CPU, never shorter than the
    freeze, and no stall >= 100 ms on the other CPUs. This machine is itself a VM whose
    vCPUs the host preempts for 2 to 40 ms at times; when that happens right next to the
    freeze the sampler sees one longer gap (correctly: it did not run). So the length
    tolerance (1 interval + 5 ms) must hold in at least one of ``ATTEMPTS`` freezes, as
    psutil does for timing tests on noisy machines; every miss is printed with its cause.
    """
    victim = CPUS[-1]
    with live_agent(tmp_path, "--no-kmsg") as agent:
        wait_for_samples(agent.get, CPUS)
        time.sleep(1.0)
        pid = agent.sampler_pid(victim)
        exact = 0
        for attempt in range(1, ATTEMPTS + 1):
            since = agent.events()[-1].seq
            t0 = stop_process(pid)
            time.sleep(hold_s)
            held = time.monotonic_ns() - t0
            os.kill(pid, signal.SIGCONT)
            time.sleep(2.0)  # samplers report stalls with their once-a-second heartbeat
            stalls = [e for e in agent.events(since) if e.kind == "stall"]
            mine = overlapping(stalls, victim, t0, held)
            assert len(mine) == 1, ([e.to_dict() for e in mine], t0, held)
            event = mine[0]
            length = event.duration_ns or 0
            assert length >= held - 1_000, (length, held)
            # A gap the probe itself charges to the host (steal covering it: CI once had a
            # 107 ms one on CPU 0 with 110 ms of steal) is this VM's host, not the freeze.
            others = [
                e.to_dict()
                for e in stalls
                if e.get("cpu") != victim
                and e.get("cause") != "host-preempt"
                and (e.duration_ns or 0) >= 100_000_000
                and e.mono_ns < t0 + held + 50_000_000
                and e.mono_ns + (e.duration_ns or 0) > t0 - 50_000_000
            ]
            assert others == []
            within = length - held <= TOLERANCE_NS and abs(event.mono_ns - t0) <= TOLERANCE_NS
            causes = {k: event.get(k) for k in ("cause", "run_delay_ns", "steal_ns")}
            print(
                f"attempt {attempt}: froze cpu {victim} for {held / 1e6:.2f} ms, agent reported"
                f" {length / 1e6:.2f} ms starting {(event.mono_ns - t0) / 1e6:+.2f} ms"
                f" {'ok' if within else 'OUTSIDE tolerance'} {causes}"
            )
            if within:
                exact += 1
                break
    assert exact == 1, f"no freeze of {hold_s}s came back within {TOLERANCE_NS / 1e6} ms"


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
