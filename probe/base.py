"""The small protocol every probe follows, and the clock helpers they share.

A probe is started with an ``emit`` callback, runs on its own (a thread, or processes it
owns), reports what it observes as ``RawEvent`` values through ``emit``, and answers
``health()`` at any time with one ``Health`` per source it reads (the clock probe reports
``clock``, ``adjtimex`` and ``ptp`` separately). ``health()`` never raises: a failed or
missing source is ``Health(False, "why")``, which the agent exports as
``tsprobe_probe_up{probe="NAME"} 0``, and /metrics keeps working.

``emit`` may be called from any thread; the agent's event log is thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from probe.events import RawEvent

Emit = Callable[[RawEvent], None]


def emit_each(emit: Emit, events: Iterable[RawEvent]) -> str | None:
    """Hand each event to ``emit``; a failing emitter is the agent's problem, never the end
    of the probe that observed them.

    :return: ``""`` when the last event went through, the last failure as one line
        (``emit failed: ...``) when it did not, None without events.
    """
    state = None
    for event in events:
        try:
            emit(event)
            state = ""
        except Exception as err:
            state = f"emit failed: {err!r}"[:200]
    return state


@dataclass(frozen=True)
class Health:
    """Whether a probe's source works right now, and a one-line reason when it does not."""

    up: bool
    detail: str = ""


class Probe(Protocol):
    """What the agent needs from a probe."""

    name: str

    def start(self, emit: Emit) -> None:
        """Begin observing; return at once. Unavailable sources show in ``health()``."""

    def stop(self) -> None:
        """Stop observing and release every process, thread and file the probe holds."""

    def health(self) -> Mapping[str, Health]:
        """One entry per source the probe reads, keyed by the ``probe`` label value."""


@dataclass(frozen=True)
class ClockPair:
    """CLOCK_MONOTONIC and another clock read "at once" (see ``read_pair``)."""

    mono_ns: int
    other_ns: int
    bracket_ns: int


def read_pair(clock_id: int, max_bracket_ns: int = 50_000, tries: int = 20) -> ClockPair:
    """Read MONOTONIC, the other clock, MONOTONIC; keep the reading when the bracket is short.

    A preemption between two reads would otherwise look like a clock step. After ``tries``
    attempts the shortest bracket seen is returned (its ``bracket_ns`` tells the error).

    :param clock_id: e.g. ``time.CLOCK_REALTIME`` or ``time.CLOCK_BOOTTIME``.
    :param max_bracket_ns: the longest acceptable bracket.
    :param tries: attempts before settling for the best one.
    :return: the other clock's reading with the monotonic midpoint of the bracket.
    """
    gettime = time.clock_gettime_ns
    mono = time.CLOCK_MONOTONIC
    best: ClockPair | None = None
    for _ in range(tries):
        m1 = gettime(mono)
        other = gettime(clock_id)
        m2 = gettime(mono)
        pair = ClockPair((m1 + m2) // 2, other, m2 - m1)
        if pair.bracket_ns <= max_bracket_ns:
            return pair
        if best is None or pair.bracket_ns < best.bracket_ns:
            best = pair
    assert best is not None
    return best


def now_pair() -> tuple[int, int]:
    """(CLOCK_MONOTONIC, CLOCK_REALTIME) now, bracketed; for stamping events."""
    pair = read_pair(time.CLOCK_REALTIME)
    return pair.mono_ns, pair.other_ns
