"""The event model: round trips, untrusted input, and the reader's skip reporting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from probe.errors import EventFormatError
from probe.events import Event, RawEvent, Skip, iter_event_file, parse_event


def make(seq: int, kind: str = "stall", **fields: object) -> Event:
    raw = RawEvent(kind, 1_000 + seq, 2_000 + seq, 5_000_000, dict(fields))
    return Event.from_raw(raw, seq, "b00t")


def test_round_trip_keeps_base_and_kind_fields() -> None:
    event = make(7, cpu=1, cause="vcpu-blocked")
    line = event.to_json()
    obj = json.loads(line)
    assert list(obj)[:7] == ["v", "seq", "boot_id", "kind", "mono_ns", "real_ns", "duration_ns"]
    assert parse_event(line) == event
    assert parse_event(line).get("cpu") == 1


def test_duration_is_omitted_when_absent() -> None:
    event = Event.from_raw(RawEvent("clock_step", 1, 2, None, {"step_ns": -5}), 1, "b")
    assert "duration_ns" not in event.to_dict()
    assert parse_event(event.to_json()).duration_ns is None


def test_unknown_kind_and_fields_are_kept() -> None:
    line = json.dumps(
        {
            "v": 9,
            "seq": 3,
            "boot_id": "x",
            "kind": "future_thing",
            "mono_ns": 1,
            "real_ns": 2,
            "new_field": [1, 2],
        }
    )
    event = parse_event(line)
    assert event.kind == "future_thing" and event.v == 9
    assert event.get("new_field") == [1, 2]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"v":1,"seq":1,"boot_id":"b","mono_ns":1,"real_ns":1}', "kind"),
        ('{"v":1,"seq":"1","boot_id":"b","kind":"stall","mono_ns":1,"real_ns":1}', "'seq'"),
        ('{"v":1,"seq":1,"boot_id":"b","kind":"stall","mono_ns":true,"real_ns":1}', "'mono_ns'"),
        ('{"v":1,"seq":1,"kind":"stall","mono_ns":1,"real_ns":1}', "boot_id"),
    ],
)
def test_malformed_lines_raise_one_line_errors(line: str, message: str) -> None:
    with pytest.raises(EventFormatError) as info:
        parse_event(line)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_reader_reports_skips_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = [make(i) for i in (1, 2, 3)]
    path.write_text(
        good[0].to_json()
        + "\n"
        + "garbage\n"
        + "\n"
        + good[1].to_json()
        + "\n"
        + good[2].to_json()
        + "\n"
        + '{"v":1,"seq":4,"boot'
    )
    skips: list[Skip] = []
    events = list(iter_event_file(path, skips.append))
    assert [e.seq for e in events] == [1, 2, 3]
    assert [(s.line_no, s.reason.split(":")[0]) for s in skips] == [
        (2, "not JSON"),
        (6, "truncated last line"),
    ]
    assert str(skips[0]).startswith(f"{path}:2: ")


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(make(1).to_json())
    assert [e.seq for e in iter_event_file(path)] == [1]
