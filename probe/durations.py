"""Durations as users type them: ``500us``, ``2ms``, ``1.5s``, ``2m``, ``1h``.

Internally every duration is an integer number of nanoseconds, like CLOCK_MONOTONIC
readings, so arithmetic on timestamps never loses precision. A bare number is rejected
(``"10"`` is ambiguous); ``0`` alone is accepted.

Bounds, so that no typed value can overflow a timer, a sleep or a float further on: the
number is ASCII digits (``²`` and ``١`` are digits to ``str.isdigit`` but not here), at
most ``MAX_DIGITS`` of them, and the duration at most ``MAX_DURATION_NS`` (366 days; no
setting of tsprobe means more). A caller names its option in front of the message
(``--poll: invalid duration ...``).

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

#: The longest duration accepted: 366 days.
MAX_DURATION_NS = 366 * 24 * 3_600_000_000_000
#: The most distinct durations a list (the timeout ladder, lab stalls) may hold.
MAX_LIST = 100
#: The most digits (with the decimal point) a duration's number may have.
MAX_DIGITS = 30

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ns|us|µs|ms|s|m|h)\s*$")


def parse_duration(text: str) -> int:
    """Parse a duration such as ``2ms`` into nanoseconds.

    :param text: a number followed by one of ns, us, ms, s, m, h.
    :raise DurationError: when the text is not such a duration, or longer than
        ``MAX_DURATION_NS``.
    :return: the duration in nanoseconds (rounded to the nearest nanosecond).
    """
    if text.strip() == "0":
        return 0
    match = _DURATION.match(text)
    if match is None:
        raise DurationError(
            f"invalid duration {_shorten(text)!r}: expected a number with a unit,"
            " e.g. 500us, 2ms, 1.5s, 2m"
        )
    number, unit = match.groups()
    if len(number) > MAX_DIGITS:
        raise DurationError(f"invalid duration {_shorten(text)!r}: more than {MAX_DIGITS} digits")
    value = float(number) * NS_PER_UNIT[unit]
    if not value <= MAX_DURATION_NS:
        raise DurationError(
            f"invalid duration {_shorten(text)!r}: longer than the maximum, 366 days"
        )
    return round(value)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def parse_duration_list(text: str) -> list[int]:
    """Parse a comma-separated list of durations (the timeout ladder), sorted, no duplicates.

    :param text: e.g. ``"10ms,100ms,1s"``.
    :raise DurationError: when an item does not parse, the list is empty, or it holds
        more than ``MAX_LIST`` distinct durations.
    :return: the durations in nanoseconds, ascending.
    """
    items = [item for item in (part.strip() for part in text.split(",")) if item]
    if not items:
        raise DurationError(f"invalid duration list {_shorten(text)!r}: it is empty")
    values = sorted({parse_duration(item) for item in items})
    if values[0] <= 0:
        raise DurationError(f"invalid duration list {_shorten(text)!r}: durations must be positive")
    if len(values) > MAX_LIST:
        raise DurationError(
            f"invalid duration list {_shorten(text)!r}: more than {MAX_LIST} durations"
        )
    return values


def format_duration(ns: int | float) -> str:
    """Format nanoseconds with the largest unit that keeps the number >= 1.

    :param ns: a duration in nanoseconds (may be negative).
    :return: e.g. ``'1.5s'``, ``'700ms'``, ``'-2.5ms'``, ``'800us'``, ``'86400s'``; it
        parses back with ``parse_duration`` to within its fourth digit.
    """
    sign = "-" if ns < 0 else ""
    value = abs(ns)
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if value >= scale:
            number = value / scale
            # four significant digits, but never an exponent: 12345s, not 1.234e+04s
            shown = f"{number:.4g}" if number < 9999.5 else f"{number:.0f}"
            return f"{sign}{shown}{unit}"
    return f"{sign}{value:.0f}ns"


def seconds_label(ns: int) -> str:
    """Write a duration in seconds the way Prometheus writes ``le`` labels (``0.01``, ``1.0``).

    :param ns: a duration in nanoseconds.
    :return: the shortest float repr of the value in seconds.
    """
    return repr(ns / 1e9)
