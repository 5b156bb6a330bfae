"""Durations as users type them."""

from __future__ import annotations

import pytest

from probe.durations import (
    format_duration,
    parse_duration,
    parse_duration_list,
    seconds_label,
)
from probe.errors import DurationError


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("500us", 500_000),
        ("2ms", 2_000_000),
        ("1.5s", 1_500_000_000),
        ("2m", 120_000_000_000),
        ("1h", 3_600_000_000_000),
        ("250ns", 250),
        (" 10ms ", 10_000_000),
        ("0", 0),
        (".5s", 500_000_000),
    ],
)
def test_parse(text: str, ns: int) -> None:
    assert parse_duration(text) == ns


@pytest.mark.parametrize("text", ["", "10", "1.5x", "ms", "-1s", "1 s s", "1e3ms"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(DurationError, match="invalid duration"):
        parse_duration(text)


def test_ladder_is_sorted_and_unique() -> None:
    assert parse_duration_list("1s,10ms,100ms,1s") == [10_000_000, 100_000_000, 1_000_000_000]
    with pytest.raises(DurationError):
        parse_duration_list(" , ")
    with pytest.raises(DurationError):
        parse_duration_list("0,1s")


def test_format_and_labels() -> None:
    assert format_duration(1_500_000_000) == "1.5s"
    assert format_duration(-2_500_000) == "-2.5ms"
    assert format_duration(800_000) == "800us"
    assert format_duration(12) == "12ns"
    assert [seconds_label(v) for v in parse_duration_list("10ms,100ms,1s,5s,30s")] == [
        "0.01",
        "0.1",
        "1.0",
        "5.0",
        "30.0",
    ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1" * 400 + "s", "more than 30 digits"),
        ("0." + "0" * 400 + "1s", "more than 30 digits"),
        ("1" * 20 + "ns", "longer than the maximum"),
        ("8785h", "longer than the maximum"),
        ("²s", "expected a number"),
        ("١٢٣ms", "expected a number"),
    ],
)
def test_parse_bounds_digits_and_length(text: str, reason: str) -> None:
    """Issue 18: a 400-digit duration raised OverflowError; Unicode digits passed \\d."""
    with pytest.raises(DurationError, match=reason) as info:
        parse_duration(text)
    assert len(str(info.value)) < 200
    assert parse_duration("8784h") == 366 * 24 * 3_600_000_000_000


def test_ladder_is_bounded() -> None:
    with pytest.raises(DurationError, match="more than 100 durations"):
        parse_duration_list(",".join(f"{n}ms" for n in range(1, 200)))
    with pytest.raises(DurationError, match="more than 30 digits"):
        parse_duration_list("1" * 400 + "s,1s")
