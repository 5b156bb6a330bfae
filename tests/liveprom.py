"""A throwaway Prometheus (the Debian package) on 127.0.0.1 for a test, and its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.liveagent import free_port, http_get, wait_answering

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


@dataclass
class LiveProm:
    url: str
    log: Path

    def api(self, path: str, **params: str) -> tuple[int, Any]:
        """GET /api/v1/PATH with query parameters: (HTTP status, decoded JSON body)."""
        query = urllib.parse.urlencode(params)
        status, _, body = http_get(f"{self.url}/api/v1/{path}?{query}", timeout=10)
        return status, json.loads(body) if body else None

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, body = self.api("query", query=expr)
        assert status == 200, (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, expr: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll an instant query until it returns at least ``count`` series."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if len(result) >= count:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr}: {len(result)} series after {timeout}s")
            time.sleep(0.25)


@contextmanager
def live_prometheus(
    tmp: Path,
    targets: dict[str, list[str]] | None = None,
    rule_files: list[Path] | None = None,
    scrape_interval: str = "1s",
    job_intervals: dict[str, str] | None = None,
) -> Iterator[LiveProm]:
    """Run Prometheus with an empty TSDB under ``tmp``, scraping ``targets`` (job -> host:port).

    ``job_intervals`` gives a job its own scrape interval (its scrape timeout the same) in
    place of ``scrape_interval``. The config is JSON (which is YAML too).
    """
    assert PROMETHEUS is not None, "prometheus (Debian package) is not installed"
    intervals = job_intervals or {}
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": hosts}]}
            | (
                {"scrape_interval": intervals[job], "scrape_timeout": intervals[job]}
                if job in intervals
                else {}
            )
            for job, hosts in (targets or {}).items()
        ],
        "rule_files": [str(p) for p in rule_files or []],
    }
    config_path = tmp / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=1))
    port = free_port()
    log = tmp / "prometheus.log"
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_fh,
        )
    prom = LiveProm(f"http://127.0.0.1:{port}", log)
    try:
        wait_answering(
            proc,
            lambda: http_get(f"{prom.url}/-/ready", timeout=1)[0] == 200,
            30,
            lambda: f"prometheus exited: {log.read_text()[-2000:]}",
            "prometheus not ready after 30 s",
        )
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
