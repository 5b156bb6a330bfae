"""The timeout ladder: when a canary's measurement counts as an expired application timeout.

The canaries (``probe.canary_timer``, ``probe.canary_heartbeat``, ``probe.canary_rpc``) are
small worker processes that behave like applications with deadlines: they wait with a
timeout, exchange heartbeats, send requests. Each measures one duration per operation and
asks, for every timeout ``T`` of the ladder (``--timeouts``, default 10 ms, 100 ms, 1 s,
5 s, 30 s): would an application with a timeout of ``T`` have seen it expire?

Slack
    A deadline fires a little late even on an idle machine (timer slack, wake-up latency,
    a tick of scheduling), and a heartbeat that arrives 0.2 ms after ``T`` is noise, not an
    outage. A deadline of ``T`` counts as expired late only when it is late by more than
    ``slack_ns(T) = max(1 ms, T / 10)``: 1 ms for 10 ms, 10 ms for 100 ms, 100 ms for 1 s,
    500 ms for 5 s, 3 s for 30 s. The same rule holds for every canary, so the counts of
    different canaries compare.

Heartbeats and requests: ``outlived``
    The measured duration is a silence (how long the peer was not heard) or a round trip.
    ``T`` expired when the duration exceeds ``T + slack_ns(T)``; it was "late" (the peer
    was declared dead, the caller had given up) for ``duration - T``.

Timed waits: ``timer_expirations``
    A wait starts at ``start`` (the canary's previous wake-up: the last moment it is known
    to have run), is due at ``due = start + W`` and wakes at ``actual``. A sleeper cannot see
    what happened while it slept, only that it did not run between ``due`` and ``actual``:
    the lateness ``actual - due`` is a lower bound of the stall it met. For each ``T``
    imagine an application that set a deadline of ``T`` at the wait's start and re-armed it
    every time it fired (a periodic timeout, a poll loop): its first deadline at or after
    ``due`` is ``D = start + ceil(W / T) * T``, and it fired late, by ``actual - D``, when
    ``actual > D + slack_ns(T)``. For ``T >= W`` this is the plain rule "a deadline of T set
    at the wait's start" (``D = start + T``); for ``T < W`` it is ``D = due`` when ``T``
    divides ``W``: the deadline that falls at the start of the stall the canary saw. A
    stall that begins and ends between two wake-ups is invisible to the canary; the stall
    probe (1 ms sampling) sees those.

Events: one per expired timeout
    A measurement that expired timeouts becomes one ``timeout`` line per expired ``T`` (the
    shape the metrics count and the host's analysis reads): ``mono_ns`` is when that
    deadline fell due, ``duration_ns`` how long after it the measurement ended (the late
    wake-up, the peer's return, the answer), ``timeout_ns`` is ``T``; the measurement's own
    fields (``cpu``, ``wait``, ``gone_ns``, ...) are the same on each of its lines.

Latency histogram
    Each canary worker keeps a histogram of its measurements (timer: the lateness of each
    wake-up; heartbeat: the silence between two heartbeats of the peer; rpc: each round
    trip) in ``LATENCY_BUCKETS_NS`` (1, 2, 5 per decade from 1 ms to 200 s, then 300 s; the
    stall histogram's buckets) and sends the counts with its once-a-second ``life`` line.
    The agent exports them as ``tsprobe_canary_latency_seconds{canary}``.

This module is imported by the worker processes, so it imports only ``bisect``, ``os``
and ``time`` (see ``probe.worker`` on footprint). Expirations are plain
``(timeout_ns, late_ns)`` tuples for the same reason.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left

from probe.worker import FLUSH_AFTER_NS, Lines, json_int, json_ints, json_str

#: ``typing.TYPE_CHECKING`` without importing ``typing``.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

MS = 1_000_000
S = 1_000_000_000

#: The default ladder (the agent's ``--timeouts``).
DEFAULT_LADDER_NS: tuple[int, ...] = (10 * MS, 100 * MS, S, 5 * S, 30 * S)
#: Histogram bounds: 1, 2, 5 per decade from 1 ms to 200 s, then 300 s.
LATENCY_BUCKETS_NS: tuple[int, ...] = (
    *(m * 10**e * MS for e in range(5) for m in (1, 2, 5)),
    100 * S,
    200 * S,
    300 * S,
)
#: Canary names the command line accepts (``--canaries``).
CANARY_NAMES = ("timer", "heartbeat", "rpc")
#: The canaries that run unless told otherwise (the agent's and the lab guest's).
DEFAULT_CANARIES = ("timer", "heartbeat")


def parse_canaries(text: str) -> tuple[str, ...]:
    """Parse ``--canaries``: ``none`` or a comma-separated list of ``CANARY_NAMES``.

    :param text: the option's value.
    :raise ValueError: when it names no canary or an unknown one.
    :return: the names, each once, in the order given (``()`` for ``none``).
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["none"]:
        return ()
    if not names:
        raise ValueError("expected canary names or 'none'")
    for name in names:
        if name not in CANARY_NAMES:
            allowed = ", ".join((*CANARY_NAMES, "none"))
            raise ValueError(f"unknown canary {name!r}: choose from {allowed}")
    return tuple(dict.fromkeys(names))


#: Smallest slack of any timeout, and the fraction of ``T`` above it.
MIN_SLACK_NS = MS
SLACK_DIVISOR = 10
#: How often a canary worker sends its ``life`` line (and the events waiting for it).
LIFE_NS = S
#: A worker sends its pending events earlier when this many pile up.
MAX_PENDING = 32


def slack_ns(timeout_ns: int) -> int:
    """How late a deadline of ``timeout_ns`` may fire before it counts as expired late.

    :param timeout_ns: the timeout ``T``.
    :return: ``max(1 ms, T / 10)``.
    """
    return max(MIN_SLACK_NS, timeout_ns // SLACK_DIVISOR)


def outlived(
    duration_ns: int, ladder: Iterable[int], total_ns: int | None = None
) -> list[tuple[int, int]]:
    """The timeouts a silence or a round trip outlived.

    :param duration_ns: what decides: the silence an observer saw, or the round trip.
    :param ladder: the timeouts ``T``, ascending.
    :param total_ns: the whole duration, for the lateness (default ``duration_ns``); a
        heartbeat observer decides on the silence it saw while it ran and reports how long
        the peer stayed away in all.
    :return: ``(T, total - T)`` for each ``T`` with ``duration > T + slack_ns(T)``.
    """
    total = duration_ns if total_ns is None else max(duration_ns, total_ns)
    return [(t, total - t) for t in ladder if duration_ns > t + slack_ns(t)]


def timer_expirations(
    start_ns: int, due_ns: int, actual_ns: int, ladder: Iterable[int]
) -> list[tuple[int, int]]:
    """The deadlines of the ladder a timed wait saw expire late (see the module docstring).

    :param start_ns: the wait's start (the previous wake-up).
    :param due_ns: when it should have woken.
    :param actual_ns: when it woke.
    :param ladder: the timeouts ``T``, ascending.
    :return: ``(T, actual - D)`` for each ``T`` whose deadline ``D`` fired late.
    """
    wait = max(0, due_ns - start_ns)
    out: list[tuple[int, int]] = []
    for t in ladder:
        deadline = start_ns + max(1, -(-wait // t)) * t
        late = actual_ns - deadline
        if late > slack_ns(t):
            out.append((t, late))
    return out


class Latency:
    """A histogram over ``LATENCY_BUCKETS_NS``: counts per bucket (not cumulative), the
    last one for values above every bound, and the sum.
    """

    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_NS) + 1)
        self.sum_ns = 0

    def observe(self, value_ns: int) -> None:
        """Count one measurement (negative values count as 0).

        :param value_ns: the measurement.
        """
        if value_ns < 0:
            value_ns = 0
        self.counts[bisect_left(LATENCY_BUCKETS_NS, value_ns)] += 1
        self.sum_ns += value_ns


class Reporter(Lines):
    """A canary worker's lines to the agent: events wait for the next ``life`` line.

    :param write: sends complete lines to the parent (``probe.worker.write_stdout``).
    :param cpu: the worker's CPU, put into every event line.
    """

    def __init__(self, write: Callable[[str], object], cpu: int) -> None:
        super().__init__(write)
        self.cpu = cpu
        self.pid = os.getpid()
        self.latency = Latency()
        self.count = 0  # operations measured (waits, heartbeats heard, requests)
        self.next_life = time.monotonic_ns() + LIFE_NS

    def expirations(
        self,
        end_ns: int,
        now_ns: int,
        expired: Sequence[tuple[int, int]],
        **fields: int | str | None,
    ) -> None:
        """Queue one ``timeout`` line per expired timeout of a measurement.

        Each line is one deadline that expired: ``mono_ns`` is when it fell due
        (``end_ns - late``), ``duration_ns`` how long after that the measurement ended
        (``late``), ``timeout_ns`` the timeout; ``fields`` describe the measurement and are
        the same on every line of it.

        :param end_ns: CLOCK_MONOTONIC when the measurement ended (the late wake-up, the
            peer's first heartbeat after its silence, the answer).
        :param now_ns: CLOCK_MONOTONIC now: each line's ``real_ns`` is CLOCK_REALTIME now
            minus the time since its ``mono_ns``.
        :param expired: ``(timeout_ns, late_ns)`` pairs (``outlived``, ``timer_expirations``).
        :param fields: more fields (integers, strings or None).
        """
        real_now = time.time_ns()
        extra = "".join(
            f',"{name}":{json_str(value) if isinstance(value, str) else json_int(value)}'
            for name, value in fields.items()
        )
        for timeout, late in expired:
            due = end_ns - late
            self.pending.append(
                f'{{"t":"timeout","mono_ns":{due},"real_ns":{real_now - (now_ns - due)},'
                f'"duration_ns":{late},"timeout_ns":{timeout},"cpu":{self.cpu}{extra}}}\n'
            )
        self.next_life = min(self.next_life, now_ns + FLUSH_AFTER_NS)
        if len(self.pending) >= MAX_PENDING:
            self.flush()

    def note(self, message: str) -> None:
        """Queue a ``note`` line (a degraded capability noticed while running).

        :param message: one line.
        """
        self.pending.append(f'{{"t":"note","msg":{json_str(message)}}}\n')

    def life(self, now_ns: int, **fields: int) -> None:
        """Send the pending lines and a ``life`` line (sign of life, counts, histogram).

        :param now_ns: CLOCK_MONOTONIC now.
        :param fields: more integer fields (e.g. heartbeats dropped).
        """
        latency = self.latency
        extra = "".join(f',"{name}":{value}' for name, value in fields.items())
        self.pending.append(
            f'{{"t":"life","pid":{self.pid},"n":{self.count},"mono_ns":{now_ns},'
            f'"real_ns":{time.time_ns()},"h":{json_ints(latency.counts)},'
            f'"hsum":{latency.sum_ns}{extra}}}\n'
        )
        self.next_life = now_ns + LIFE_NS
        self.flush()
