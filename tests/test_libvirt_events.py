"""``--libvirt-events``: virsh qemu-monitor-event transcripts into QMP records.

The transcripts under tests/fixtures/libvirt follow the formats virsh prints
(tools/virsh-domain.c, virshEventQemuPrint): ``TIME: event NAME for domain 'DOM': DATA``
with ``--timestamp`` (virsh's UTC clock, milliseconds), ``event NAME at SEC.USEC for
domain DOM: DATA`` without it (QEMU's timestamp; older libvirt prints the domain bare),
JSON spread over lines with ``--pretty``, ``(null)`` for events without data. The event
sequence is the source side of a QEMU 7.2 postcopy migration paused and recovered.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from analysis.record.libvirt_events import LibvirtParser, parse_transcript
from analysis.record.recorder import Recorder

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "libvirt"
REPO = Path(__file__).resolve().parent.parent


def parse(name: str, **kwargs: Any) -> Any:
    with open(FIXTURES / name, encoding="utf-8") as fh:
        return parse_transcript(fh, name, **kwargs)


def statuses(records: list[dict[str, Any]]) -> list[str]:
    return [r["data"]["status"] for r in records if r["event"] == "MIGRATION"]


def test_timestamp_transcript() -> None:
    result = parse("migration-timestamp.txt")
    assert result.skips == []
    assert result.ignored == 2  # "event loop interrupted", "events received: 10"
    assert result.domains == {"vm1": 10}
    assert statuses(result.records) == [
        "setup", "active", "postcopy-active", "postcopy-paused",
        "postcopy-recover", "postcopy-active", "completed",
    ]  # fmt: skip
    first = result.records[0]
    assert first == {
        "type": "event",
        "event": "MIGRATION",
        "data": {"status": "setup"},
        "timestamp": {"seconds": 1715679000, "microseconds": 101000},
        "host_real_ns": 1715679000_101_000_000,
        "source": "libvirt",
        "time_source": "virsh",
        "domain": "vm1",
        "line_no": 1,
    }
    stop = next(r for r in result.records if r["event"] == "STOP")
    assert "data" not in stop  # "(null)": QEMU sent no data
    assert [r["line_no"] for r in result.records] == list(range(1, 11))


def test_qemu_time_transcript() -> None:
    result = parse("migration-qemu-time.txt")
    assert result.skips == [] and result.ignored == 1
    assert statuses(result.records) == ["setup", "active", "completed"]
    completed = result.records[-1]
    assert completed["timestamp"] == {"seconds": 1715679002, "microseconds": 523560}
    assert completed["host_real_ns"] == 1715679002_523_560_000
    assert completed["time_source"] == "qemu"
    assert completed["domain"] == "vm1"  # printed bare by older libvirt
    assert [r["event"] for r in result.records].count("MIGRATION_PASS") == 3


def test_pretty_transcript() -> None:
    result = parse("migration-pretty.txt")
    assert result.skips == []
    assert statuses(result.records) == ["setup", "active", "completed"]
    assert [r["line_no"] for r in result.records] == [1, 4, 7, 8]


def test_malformed_lines_are_counted_skips_with_line_numbers() -> None:
    result = parse("malformed.txt")
    assert statuses(result.records) == ["setup", "completed"]
    assert [(s.line_no, s.path) for s in result.skips] == [
        (2, "malformed.txt"),
        (3, "malformed.txt"),
        (4, "malformed.txt"),
        (6, "malformed.txt"),
        (8, "malformed.txt"),
    ]
    reasons = [s.reason for s in result.skips]
    assert reasons[0].startswith("not a qemu-monitor-event line")
    assert "unterminated JSON" in reasons[1]
    assert "bad timestamp" in reasons[2]
    assert "not JSON" in reasons[3]
    assert "truncated last line" in reasons[4]
    assert str(result.skips[0]).startswith("malformed.txt:2: ")
    assert result.ignored == 1  # the blank line


def test_timezone_offset_and_mono_estimate() -> None:
    parser = LibvirtParser("x", mono_offset_ns=1_000)
    [record] = parser.feed(
        "2024-05-14 11:30:00.500+0200: event RESUME for domain 'a b': (null)\n", 1
    )
    assert record["host_real_ns"] == 1715679000_500_000_000
    assert record["host_mono_ns"] == record["host_real_ns"] - 1_000
    assert record["host_mono_from_real"] is True
    assert record["domain"] == "a b"


def test_recorder_follows_a_growing_transcript(tmp_path: Path) -> None:
    transcript = tmp_path / "events.txt"
    lines = (FIXTURES / "migration-timestamp.txt").read_text().splitlines(keepends=True)
    transcript.write_text("".join(lines[:4]))
    out = tmp_path / "run"

    async def main() -> Any:
        recorder = Recorder(
            out, libvirt_events={"src": str(transcript)}, grace_ns=300_000_000,
            duration_ns=30_000_000_000,
        )  # fmt: skip
        task = asyncio.ensure_future(recorder.run())
        await asyncio.wait_for(recorder.started.wait(), 5)
        await asyncio.sleep(0.5)
        assert recorder.statuses == {"src": "postcopy-active"}
        with open(transcript, "a") as fh:  # virsh goes on printing
            fh.write("".join(lines[4:]))
        return await asyncio.wait_for(task, 20)

    result = asyncio.run(main())
    assert result.stop_reason == "source completed (+0.3s grace)"
    recorded = [json.loads(x) for x in (out / "qmp-src.jsonl").read_text().splitlines()]
    assert [r["line_no"] for r in recorded] == list(range(1, 11))
    assert all(r["source"] == "libvirt" and "host_mono_ns" in r for r in recorded)
    meta = result.meta
    assert meta["complete"] and meta["source_endpoint"] == "src"
    assert meta["endpoints"]["src"]["kind"] == "libvirt-events"
    assert meta["endpoints"]["src"]["last_status"] == "completed"
    assert meta["endpoints"]["src"]["ignored_lines"] == 2
    assert meta["counts"] == {"qmp-src.jsonl": 10}


def test_cli_reads_stdin_and_reports_skips(tmp_path: Path) -> None:
    out = tmp_path / "run"
    text = (FIXTURES / "malformed.txt").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "tsprobe.cli", "record", "--libvirt-events", "-",
         "--out", str(out), "--grace", "0.2s", "--duration", "30s"],
        input=text, cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "libvirt: skipped <stdin>:2: not a qemu-monitor-event line" in proc.stdout
    recorded = [json.loads(x) for x in (out / "qmp-libvirt.jsonl").read_text().splitlines()]
    skipped = [r["line_no"] for r in recorded if r.get("note") == "skipped-line"]
    assert skipped == [2, 3, 4, 6, 8]
    assert [r["data"]["status"] for r in recorded if r.get("event") == "MIGRATION"] == [
        "setup",
        "completed",
    ]
    assert recorded[-1] == {**recorded[-1], "type": "closed", "reason": "end of input"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["endpoints"]["libvirt"]["skipped"] == 5
    assert meta["endpoints"]["libvirt"]["skipped_lines"][0].startswith("<stdin>:2:")
    assert meta["stop_reason"].startswith("source completed")


@pytest.mark.skipif(
    subprocess.run(["which", "virsh"], capture_output=True).returncode != 0,
    reason="libvirt (virsh) is not installed",
)
def test_live_virsh_is_available() -> None:  # pragma: no cover - needs libvirt
    proc = subprocess.run(["virsh", "help", "qemu-monitor-event"], capture_output=True, text=True)
    assert "--timestamp" in proc.stdout
