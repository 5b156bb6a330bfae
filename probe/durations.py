"""Durations as users type them: ``500us``, ``2ms``, ``1.5s``, ``2m``, ``1h``.

Internally every duration is an integer number of nanoseconds, like CLOCK_MONOTONIC
readings, so arithmetic on timestamps never loses precision. A bare number is rejected
(``"10"`` is ambiguous); ``0`` alone is accepted.

>>> parse_duration("1.5s")
1500000000
>>> format_duration(2_500_000)
'2.5ms'
>>> seconds_label(10_000_000)
'0.01'
"""

from __future__ import annotations

import re

from probe.errors import DurationError

NS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s|m|h)\s*$")


def parse_duration(text: str) -> int:
    """Parse a duration such as ``2ms`` into nanoseconds.

    :param text: a number followed by one of ns, us, ms, s, m, h.
    :raise DurationError: when the text is not such a duration.
    :return: the duration in nanoseconds (rounded to the nearest nanosecond).
    """
    if text.strip() == "0":
        return 0
    match = _DURATION.match(text)
    if match is None:
        raise DurationError(
            f"invalid duration {text!r}: expected a number with a unit, e.g. 500us, 2ms, 1.5s, 2m"
        )
    number, unit = match.groups()
    return round(float(number) * NS_PER_UNIT[unit])


def parse_duration_list(text: str) -> list[int]:
    """Parse a comma-separated list of durations (the timeout ladder), sorted, no duplicates.

    :param text: e.g. ``"10ms,100ms,1s"``.
    :raise DurationError: when an item does not parse or the list is empty.
    :return: the durations in nanoseconds, ascending.
    """
    items = [item for item in (part.strip() for part in text.split(",")) if item]
    if not items:
        raise DurationError(f"invalid duration list {text!r}: it is empty")
    values = sorted({parse_duration(item) for item in items})
    if values[0] <= 0:
        raise DurationError(f"invalid duration list {text!r}: durations must be positive")
    return values


def format_duration(ns: int | float) -> str:
    """Format nanoseconds with the largest unit that keeps the number >= 1.

    :param ns: a duration in nanoseconds (may be negative).
    :return: e.g. ``'1.5s'``, ``'700ms'``, ``'-2.5ms'``, ``'800us'``.
    """
    sign = "-" if ns < 0 else ""
    value = abs(ns)
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if value >= scale:
            return f"{sign}{value / scale:.4g}{unit}"
    return f"{sign}{value:.0f}ns"


def seconds_label(ns: int) -> str:
    """Write a duration in seconds the way Prometheus writes ``le`` labels (``0.01``, ``1.0``).

    :param ns: a duration in nanoseconds.
    :return: the shortest float repr of the value in seconds.
    """
    return repr(ns / 1e9)
