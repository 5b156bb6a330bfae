"""The event log: numbering, the /events ring, the spool and its failures, drop counting."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.eventlog import EventLog
from probe.events import Event, RawEvent, Skip, iter_event_file

BOOT = "b00t-1d"


def raw(kind: str = "stall", duration_ns: int | None = 5_000_000, **fields: object) -> RawEvent:
    return RawEvent(kind, 100, 200, duration_ns, dict(fields) or {"cpu": 0})


def spool_seqs(*paths: Path) -> list[int]:
    seqs: list[int] = []
    for path in paths:
        seqs.extend(event.seq for event in iter_event_file(path))
    return seqs


def test_append_numbers_from_one_and_stamps_the_boot_id(tmp_path: Path) -> None:
    log = EventLog(BOOT, str(tmp_path / "events.jsonl"))
    events = [log.append(raw(cpu=cpu)) for cpu in range(3)]
    assert [e.seq for e in events] == [1, 2, 3]
    assert all(e.boot_id == BOOT and e.kind == "stall" for e in events)
    assert events[2].get("cpu") == 2


def test_each_record_is_on_disk_before_append_returns(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(BOOT, str(path))
    for n in range(1, 4):
        log.append(raw())
        lines = path.read_text().splitlines()
        assert len(lines) == n
        assert json.loads(lines[-1])["seq"] == n
    assert log.stats().spool_bytes == path.stat().st_size


def test_concurrent_appends_get_unique_seqs_in_spool_order(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(BOOT, str(path))
    seen: list[int] = []
    log.subscribe(lambda event: seen.append(event.seq))

    def worker(cpu: int) -> None:
        for _ in range(500):
            log.append(raw(cpu=cpu))

    threads = [threading.Thread(target=worker, args=(cpu,)) for cpu in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = list(range(1, 4001))
    assert spool_seqs(path) == expected
    assert seen == expected
    assert [e.seq for e in log.since(0, 10_000).events()] == expected


def test_paging_with_next_since(tmp_path: Path) -> None:
    log = EventLog(BOOT, None)
    for _ in range(25):
        log.append(raw())
    page = log.since(0, 10)
    assert [e.seq for e in page.events()] == list(range(1, 11))
    assert (page.next_since, page.last_seq, page.oldest_seq, page.missed) == (10, 25, 1, 0)
    page = log.since(page.next_since, 10)
    assert page.events()[0].seq == 11
    page = log.since(20, 10)
    assert [e.seq for e in page.events()] == [21, 22, 23, 24, 25]
    assert page.next_since == 25
    empty = log.since(25, 10)
    assert empty.lines == () and empty.next_since == 25
    # A client ahead of the log (the agent restarted, seq began again) is told the last seq.
    ahead = log.since(400, 10)
    assert ahead.lines == () and ahead.next_since == 25 and ahead.missed == 0


def test_page_body_is_json_lines(tmp_path: Path) -> None:
    log = EventLog(BOOT, None)
    log.append(raw())
    log.append(raw("clock_step", None, clock="realtime", step_ns=-5))
    body = log.since(0, 10).body().decode()
    assert body.endswith("\n") and body.count("\n") == 2
    assert [json.loads(line)["kind"] for line in body.splitlines()] == ["stall", "clock_step"]


def test_empty_log_page(tmp_path: Path) -> None:
    page = EventLog(BOOT, None).since(0, 10)
    assert (page.lines, page.next_since, page.oldest_seq, page.last_seq) == ((), 0, 1, 0)


def test_bad_since_or_limit_raises() -> None:
    log = EventLog(BOOT, None)
    with pytest.raises(ValueError, match="since"):
        log.since(-1, 10)
    with pytest.raises(ValueError, match="limit"):
        log.since(0, 0)


def test_unfetched_events_evicted_from_the_ring_count_as_dropped() -> None:
    log = EventLog(BOOT, None, ring_size=5)
    for _ in range(8):
        log.append(raw())
    stats = log.stats()
    assert stats.dropped == 3
    assert (stats.oldest_seq, stats.last_seq, stats.ring_used) == (4, 8, 5)
    page = log.since(0, 100)
    assert [e.seq for e in page.events()] == [4, 5, 6, 7, 8]
    assert page.missed == 3
    # Everything up to 8 has been fetched now: evicting it is not a drop.
    for _ in range(5):
        log.append(raw())
    assert log.stats().dropped == 3
    # 9..13 were never fetched; 3 more appends evict 9, 10, 11.
    for _ in range(3):
        log.append(raw())
    assert log.stats().dropped == 6


def test_partially_fetched_ring() -> None:
    log = EventLog(BOOT, None, ring_size=4)
    for _ in range(4):
        log.append(raw())
    log.since(0, 2)  # a client took 1 and 2
    for _ in range(4):
        log.append(raw())  # evicts 1, 2 (fetched) and 3, 4 (not)
    assert log.stats().dropped == 2


def test_intake_overflow_counts_as_dropped() -> None:
    log = EventLog(BOOT, None)
    log.note_dropped(7)
    log.note_dropped(-3)
    assert log.stats().dropped == 7


def test_rotation_keeps_every_record_and_bounds_each_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(BOOT, str(path), max_spool_bytes=2_000, keep_spools=50)
    for _ in range(200):
        log.append(raw())
    rotated = sorted(tmp_path.glob("events.jsonl.*"), key=lambda p: -int(p.suffix[1:]))
    assert len(rotated) >= 5
    files = [*rotated, path]
    assert spool_seqs(*files) == list(range(1, 201))
    assert all(p.stat().st_size <= 2_000 for p in files)
    assert log.stats().spool_errors == 0


def test_rotation_keeps_only_n_files(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(BOOT, str(path), max_spool_bytes=1_000, keep_spools=2)
    for _ in range(100):
        log.append(raw())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    seqs = spool_seqs(tmp_path / "events.jsonl.2", tmp_path / "events.jsonl.1", path)
    assert seqs == list(range(seqs[0], 101))


def test_keep_zero_truncates_instead_of_rotating(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(BOOT, str(path), max_spool_bytes=1_000, keep_spools=0)
    for _ in range(50):
        log.append(raw())
    assert [p.name for p in tmp_path.iterdir()] == ["events.jsonl"]
    assert spool_seqs(path)[-1] == 50


def test_existing_spool_is_appended_and_a_torn_tail_closed(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"v":1,"seq":1,"boot_id":"old","kind":"stall","mono_ns":1,"real_ns":2}\n{"v":1,"se'
    )
    log = EventLog(BOOT, str(path))
    log.append(raw())
    skips: list[Skip] = []
    events = list(iter_event_file(path, skips.append))
    assert [(e.boot_id, e.seq) for e in events] == [("old", 1), (BOOT, 1)]
    assert [s.line_no for s in skips] == [2]


@pytest.mark.parametrize("make_path", ["under_a_file", "a_directory"])
def test_unwritable_spool_is_a_config_error(tmp_path: Path, make_path: str) -> None:
    if make_path == "under_a_file":
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "events.jsonl"
    else:
        path = tmp_path / "dir"
        path.mkdir()
    with pytest.raises(ConfigError, match=str(path)) as info:
        EventLog(BOOT, str(path))
    assert "\n" not in str(info.value)


def test_missing_parent_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "state" / "tsprobe" / "events.jsonl"
    EventLog(BOOT, str(path)).append(raw())
    assert spool_seqs(path) == [1]


def test_disk_full_keeps_serving_from_the_ring(tmp_path: Path) -> None:
    warnings: list[str] = []
    log = EventLog(BOOT, "/dev/full", warn=warnings.append)
    for _ in range(3):
        event = log.append(raw())
    assert event.seq == 3
    stats = log.stats()
    assert stats.spool_errors == 3 and not stats.spool_ok
    assert "No space left" in stats.spool_error
    assert len(warnings) == 1 and "kept in memory" in warnings[0]
    assert [e.seq for e in log.since(0, 10).events()] == [1, 2, 3]


def test_a_torn_write_is_not_glued_to_the_next_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events.jsonl"
    warnings: list[str] = []
    log = EventLog(BOOT, str(path), warn=warnings.append)
    log.append(raw())
    real_write = os.write

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    log.append(raw())
    monkeypatch.setattr(os, "write", real_write)
    log.append(raw())
    skips: list[Skip] = []
    assert [e.seq for e in iter_event_file(path, skips.append)] == [1, 3]
    assert len(skips) == 1
    stats = log.stats()
    assert stats.spool_errors == 1 and stats.spool_ok
    assert any("works again" in w for w in warnings)


def test_listeners_see_every_event_and_a_failing_one_is_contained() -> None:
    log = EventLog(BOOT, None)
    got: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    log.subscribe(broken)
    log.subscribe(got.append)
    log.append(raw())
    log.append(raw())
    assert [e.seq for e in got] == [1, 2]
    assert log.stats().listener_errors == 2


def test_after_close_events_stay_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(BOOT, str(path))
    log.append(raw())
    log.close()
    log.append(raw())
    assert spool_seqs(path) == [1]
    assert log.stats().spool_errors == 0
    assert log.since(0, 10).last_seq == 2


def test_unserialisable_field_does_not_break_append() -> None:
    log = EventLog(BOOT, None)
    log.append(RawEvent("odd", 1, 2, None, {"thing": object()}))
    assert log.since(0, 1).events()[0].get("thing").startswith("<object")
