"""The host migration exporter on literal and recorded QMP records (no QEMU needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest

from analysis.analyze.timeline import build_timeline
from analysis.errors import RecorderError
from analysis.prom.phases import timeline_from_exporter
from analysis.prom.tables import Series
from analysis.record.exporter import STATUS_CODES, MigrationExporter, parse_listen
from analysis.record.recorder import _TappedWriter
from analysis.rundir.qmp import KNOWN_STATUSES
from tests.liveagent import http_get

FIXTURE_RUN = Path(__file__).parent / "fixtures" / "runs" / "postcopy-pause-recover"
T0 = 1_795_640_000


def event(name: str, seconds: float, mono: int, status: str | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "type": "event",
        "event": name,
        "timestamp": {"seconds": int(seconds), "microseconds": round(seconds % 1 * 1e6)},
        "host_real_ns": round(seconds * 1e9) + 300_000,
        "host_mono_ns": mono,
    }
    if status is not None:
        rec["data"] = {"status": status}
    return rec


def reply(
    command: str, value: dict[str, Any], mono: int, latency: int = 1_000_000
) -> dict[str, Any]:
    return {
        "type": "reply",
        "command": command,
        "return": value,
        "latency_ns": latency,
        "host_real_ns": T0 * 10**9 + mono,
        "host_mono_ns": mono,
    }


def sample(exp: MigrationExporter, name: str, **labels: str) -> float | None:
    value: float | None = exp.registry.get_sample_value(name, labels)
    return value


def status_of(exp: MigrationExporter, endpoint: str) -> list[str]:
    return [
        s
        for s in sorted(KNOWN_STATUSES)
        if sample(exp, "tsprobe_migration_status", endpoint=endpoint, status=s) == 1
    ]


RAM = {
    "total": 134750208,
    "transferred": 50394795,
    "remaining": 67887104,
    "dirty-pages-rate": 10,
    "page-size": 4096,
    "mbps": 84.0,
    "dirty-sync-count": 2,
    "postcopy-requests": 3,
}


def test_every_series_exists_from_the_start() -> None:
    exp = MigrationExporter(["src", "dst"], {"guest": "http://g1:9466"}, run="runs/m1")
    for endpoint in ("src", "dst"):
        for status in KNOWN_STATUSES:
            assert sample(exp, "tsprobe_migration_status", endpoint=endpoint, status=status) == 0
        assert sample(exp, "tsprobe_migration_monitor_up", endpoint=endpoint) == 0
        assert sample(exp, "tsprobe_migration_qmp_timeouts_total", endpoint=endpoint) == 0
        # Unknown is no sample, never a made-up 0.
        assert sample(exp, "tsprobe_migration_status_code", endpoint=endpoint) is None
        assert sample(exp, "tsprobe_migration_downtime_seconds", endpoint=endpoint) is None
    assert sample(exp, "tsprobe_migration_agent_info", agent="guest", url="http://g1:9466") == 1


def test_status_flips_with_events_and_figures_follow_the_replies() -> None:
    exp = MigrationExporter(["src"])
    greeting = {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}}}
    exp.observe("src", {"type": "connected", "address": "/run/src.qmp", "greeting": greeting})
    exp.observe("src", reply("query-migrate", {}, 1_000))
    assert status_of(exp, "src") == ["none"]
    assert sample(exp, "tsprobe_migration_status_code", endpoint="src") == 0
    exp.observe("src", event("MIGRATION", T0 + 1.25, 2_000, "setup"))
    exp.observe("src", event("MIGRATION", T0 + 1.5, 3_000, "active"))
    assert status_of(exp, "src") == ["active"]
    assert sample(exp, "tsprobe_migration_status_code", endpoint="src") == STATUS_CODES["active"]
    started = "tsprobe_migration_status_started_timestamp_seconds"
    assert sample(exp, started, endpoint="src", status="setup") == pytest.approx(T0 + 1.25)
    assert sample(exp, started, endpoint="src", status="active") == pytest.approx(T0 + 1.5)
    exp.observe("src", reply("query-migrate", {"status": "active", "ram": RAM}, 4_000_000))
    assert sample(exp, "tsprobe_migration_transferred_bytes_total", endpoint="src") == 50394795
    assert sample(exp, "tsprobe_migration_remaining_bytes", endpoint="src") == 67887104
    assert sample(exp, "tsprobe_migration_ram_bytes", endpoint="src") == 134750208
    dirty = sample(exp, "tsprobe_migration_dirty_rate_bytes_per_second", endpoint="src")
    assert dirty == 40960
    assert sample(exp, "tsprobe_migration_throughput_bytes_per_second", endpoint="src") == 10.5e6
    assert sample(exp, "tsprobe_migration_dirty_syncs_total", endpoint="src") == 2
    assert sample(exp, "tsprobe_migration_postcopy_requests_total", endpoint="src") == 3
    exp.observe("src", event("STOP", T0 + 2.0, 5_000_000))
    assert sample(exp, "tsprobe_migration_vm_running", endpoint="src") == 0
    assert sample(exp, "tsprobe_migration_stop_timestamp_seconds", endpoint="src") == T0 + 2.0
    exp.observe("src", event("MIGRATION", T0 + 2.05, 6_000_000, "completed"))
    # A poll sent before the completed event came back after it: its status is older.
    exp.observe(
        "src",
        reply("query-migrate", {"status": "active", "downtime": 30}, 6_500_000, 1_000_000),
    )
    assert status_of(exp, "src") == ["completed"]
    assert sample(exp, "tsprobe_migration_downtime_seconds", endpoint="src") == 0.03
    # Figures QEMU no longer reports disappear.
    assert sample(exp, "tsprobe_migration_remaining_bytes", endpoint="src") is None
    info = {"endpoint": "src", "address": "/run/src.qmp", "qemu": "7.2.22", "run": ""}
    assert sample(exp, "tsprobe_migration_endpoint_info", **info) == 1
    assert sample(exp, "tsprobe_migration_monitor_up", endpoint="src") == 1
    exp.observe("src", {"type": "timeout", "command": "query-migrate"})
    exp.observe("src", {"type": "closed", "reason": "end of file"})
    assert sample(exp, "tsprobe_migration_monitor_up", endpoint="src") == 0
    assert sample(exp, "tsprobe_migration_qmp_timeouts_total", endpoint="src") == 1


def test_unknown_status_blocktime_and_query_status() -> None:
    exp = MigrationExporter()
    exp.observe("dst", event("MIGRATION", T0 + 1, 1, "brand-new"))
    assert sample(exp, "tsprobe_migration_status", endpoint="dst", status="brand-new") == 1
    assert sample(exp, "tsprobe_migration_status_code", endpoint="dst") == -1
    value = {
        "status": "completed",
        "postcopy-blocktime": 1500,
        "postcopy-vcpu-blocktime": [700, 800],
    }
    exp.observe("dst", reply("query-migrate", value, 10**9))
    exp.observe("dst", reply("query-status", {"running": False, "status": "paused"}, 10**9))
    assert sample(exp, "tsprobe_migration_postcopy_blocktime_seconds", endpoint="dst") == 1.5
    per_vcpu = "tsprobe_migration_postcopy_vcpu_blocktime_seconds"
    assert sample(exp, per_vcpu, endpoint="dst", vcpu="1") == 0.8
    assert sample(exp, "tsprobe_migration_vm_running", endpoint="dst") == 0
    exp.observe("dst", {"type": "event", "event": "MIGRATION", "data": "garbage"})
    exp.observe("dst", {"no": "type"})
    assert sample(exp, "tsprobe_migration_status_code", endpoint="dst") == STATUS_CODES["completed"]


def _records(name: str) -> list[dict[str, Any]]:
    path = FIXTURE_RUN / f"qmp-{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_recorded_run_round_trips_to_the_same_phases() -> None:
    """A real run fed record by record, scraped after each: the phases come back exact.

    The exporter's timestamp series, read as a range query would (one point per scrape),
    rebuild the run directory's own timeline: same phase names, same boundaries.
    """
    streams = {name: _records(name) for name in ("src", "dst")}
    merged = sorted(
        ((r["host_mono_ns"], name, r) for name, recs in streams.items() for r in recs),
        key=lambda item: item[0],
    )
    exp = MigrationExporter(list(streams))
    points: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]] = {}
    for mono, name, record in merged:
        exp.observe(name, record)
        for family in exp.registry.collect():
            for s in family.samples:
                if s.name.endswith("_timestamp_seconds"):
                    key = (s.name, tuple(sorted(s.labels.items())))
                    points.setdefault(key, []).append((mono / 1e9, s.value))

    def series(metric: str) -> list[Series]:
        found = [(labels, pts) for (name, labels), pts in points.items() if name == metric]
        return [Series(dict(labels), tuple(pts)) for labels, pts in found]

    rebuilt = timeline_from_exporter(
        series("tsprobe_migration_status_started_timestamp_seconds"),
        series("tsprobe_migration_stop_timestamp_seconds"),
        series("tsprobe_migration_resume_timestamp_seconds"),
    )
    truth = build_timeline(streams)
    assert rebuilt.names() == truth.names()
    assert rebuilt.names()[:4] == ["setup", "precopy", "switchover", "postcopy-active"]
    for ours, theirs in zip(rebuilt.phases, truth.phases, strict=True):
        assert abs(ours.start_ns - theirs.start_ns) <= 1_000, (ours.name, theirs.start_by)
        assert ours.vm_stopped == theirs.vm_stopped
    assert status_of(exp, "src") == ["completed"] and status_of(exp, "dst") == ["completed"]
    assert sample(exp, "tsprobe_migration_downtime_seconds", endpoint="src") == 0.003


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian) missing")
def test_promtool_accepts_the_exposition() -> None:
    exp = MigrationExporter(["src", "dst"], {"guest": "http://g1:9466"})
    for name in ("src", "dst"):
        for record in _records(name):
            exp.observe(name, record)
    body = generate_latest(exp.registry)
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr
    names = {line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")}
    assert all(n.startswith("tsprobe_migration_") for n in names)


def test_serve_and_listen_errors(tmp_path: Path) -> None:
    assert parse_listen("127.0.0.1:9467") == ("127.0.0.1", 9467)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9467") == ("0.0.0.0", 9467)
    for bad in ("9467", "host:", "host:http", "h:70000"):
        with pytest.raises(RecorderError, match="expected HOST:PORT"):
            parse_listen(bad)
    exp = MigrationExporter(["src"])
    server = exp.serve("127.0.0.1:0")
    try:
        status, _headers, body = http_get(f"http://{server.address}/metrics")
        assert status == 200 and b"tsprobe_migration_status{" in body
        with pytest.raises(RecorderError, match="cannot listen"):
            exp.serve(server.address)
    finally:
        server.close()


def test_a_failing_tap_never_stops_the_writer(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def tap(record: dict[str, Any]) -> None:
        seen.append(record)
        raise ValueError("a bug in the exporter")

    writer = _TappedWriter(tmp_path / "qmp-src.jsonl", tap)
    writer.write_stamped({"type": "note"})
    writer.write({"type": "event", "event": "STOP"})
    writer.close()
    assert len(seen) == 2 and "host_mono_ns" in seen[0]
    assert len((tmp_path / "qmp-src.jsonl").read_text().splitlines()) == 2
