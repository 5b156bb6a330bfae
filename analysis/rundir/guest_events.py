"""Checked models of the agent's events as a run directory holds them, and their seq order.

``analysis.rundir.jsonl`` decodes a line into a bounded JSON object; this module says what that
object must hold to count as a guest event (docs/events.md), one small model per kind the
analysis uses, and checks the order of ``seq``. Each check returns the model or the reason
(one line) the line is skipped.

Every event: ``kind`` a non-empty string of at most 64 characters; ``boot_id`` a
non-empty string of at most 128; ``seq`` and ``mono_ns`` integers in [0, 2**63);
``real_ns`` an integer in (-2**63, 2**63); ``v``, when present, an integer in [0, 2**31).
``stall``: ``cpu`` in [0, ``MAX_CPU``), ``duration_ns`` in [0, 2**63) and ending before
2**63 (``mono_ns + duration_ns``); ``cause`` a string (an unknown cause is kept as
``unknown`` by the loader). ``timeout``: ``timeout_ns`` in (0, 2**63); ``cpu``, when
given, as for a stall; ``canary`` a string of at most 64 characters (else ``unknown``).
``agent_start``: ``agent_id`` a string of at most 128 characters (or none); ``cpus``, when
given, a list of at most ``MAX_CPU`` CPU indexes; the config's ``threshold_ns``,
``interval_ns`` and ``timeouts_ns`` kept only when they are in range.

The fast path. ``fast_stall`` matches a stall line written in the agent's own layout with
one regular expression and builds the same ``StallRow`` that ``stall_row`` builds from the
decoded line; it returns None for anything it is not sure of (more digits than always fit,
other fields, other spacing), and the caller then takes the checked path. It never accepts
a line the checked path refuses, nor gives another row (tests/test_guest_events.py checks
that on generated lines with hypothesis).

Seq order (``SeqTracker``). ``seq`` rises by one per event from each agent start (the
``agent_start`` event). Within one boot and one agent start (its ``agent_id``):

- a ``seq`` seen before is a duplicate: skipped, so that a copied line, or a whole file
  appended twice, never counts twice; unless the event is later in guest time than every
  event of its count: then the agent restarted without its ``agent_start`` in the file
  (noted), and a new count begins;
- a ``seq`` lower than the highest seen, without an ``agent_start`` in between, is out of
  order or an agent restart whose start is missing: kept, and noted;
- a ``seq`` more than one above the highest is a gap (events missing): kept, and noted.

CPU indexes: a stall or timeout on a CPU that the current agent start did not announce
(its ``cpus``) is skipped, so a stray CPU number never becomes a lane of its own.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

#: CPU indexes accepted when the agent did not announce its CPUs (Linux's largest NR_CPUS).
MAX_CPU = 1 << 13
MAX_NS = (1 << 63) - 1
MAX_KIND = 64
MAX_BOOT_ID = 128
MAX_LADDER = 64


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def _in(value: object, lo: int, hi: int) -> TypeGuard[int]:
    return is_int(value) and lo <= value <= hi


@dataclass(frozen=True)
class EventHead:
    """The fields every event carries."""

    kind: str
    seq: int
    boot_id: str
    mono_ns: int
    real_ns: int


@dataclass(frozen=True)
class StallRow:
    """A checked ``stall`` event: what the loader keeps of it."""

    seq: int
    boot_id: str
    mono_ns: int
    duration_ns: int
    cpu: int
    cause: str


@dataclass(frozen=True)
class TimeoutRow:
    """A checked ``timeout`` event; ``cpu`` None when it names no CPU."""

    mono_ns: int
    timeout_ns: int
    canary: str
    cpu: int | None


@dataclass(frozen=True)
class AgentStart:
    """A checked ``agent_start`` event: who started and what it announced."""

    agent_id: str
    cpus: frozenset[int] | None
    threshold_ns: int | None
    interval_ns: int | None
    timeouts_ns: tuple[int, ...]
    clocksource: str | None


def event_head(obj: Mapping[str, Any]) -> EventHead | str:
    """Check the fields every event carries.

    :param obj: a decoded line.
    :return: the head, or why the line is skipped.
    """
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        return "missing or empty field 'kind'"
    if len(kind) > MAX_KIND:
        return f"'kind' longer than {MAX_KIND} characters"
    boot = obj.get("boot_id")
    if not isinstance(boot, str) or not boot or len(boot) > MAX_BOOT_ID:
        return f"{kind}: 'boot_id' not a string of 1 to {MAX_BOOT_ID} characters"
    mono, seq, real = obj.get("mono_ns"), obj.get("seq"), obj.get("real_ns")
    if not _in(mono, 0, MAX_NS):
        return f"{kind}: 'mono_ns' not an integer in [0, 2**63)"
    if not _in(seq, 0, MAX_NS):
        return f"{kind}: 'seq' not an integer in [0, 2**63)"
    if not _in(real, -MAX_NS, MAX_NS):
        return f"{kind}: 'real_ns' not an integer in (-2**63, 2**63)"
    if "v" in obj and not _in(obj["v"], 0, (1 << 31) - 1):
        return f"{kind}: 'v' not an integer in [0, 2**31)"
    return EventHead(kind, seq, boot, mono, real)


def _cpu(value: object) -> TypeGuard[int]:
    return _in(value, 0, MAX_CPU - 1)


def stall_row(obj: Mapping[str, Any]) -> StallRow | str:
    """Check a ``stall`` event (head included).

    :param obj: a decoded line whose ``kind`` is ``stall``.
    :return: the row, or why the line is skipped.
    """
    head = event_head(obj)
    if isinstance(head, str):
        return head
    cpu, dur = obj.get("cpu"), obj.get("duration_ns")
    if not _cpu(cpu):
        return f"stall with 'cpu' {_short(cpu)} not a CPU index in [0, {MAX_CPU})"
    if not _in(dur, 0, MAX_NS - head.mono_ns):
        return "stall with 'duration_ns' not an integer in [0, 2**63 - mono_ns)"
    cause = obj.get("cause")
    return StallRow(
        head.seq, head.boot_id, head.mono_ns, dur, cpu, cause if isinstance(cause, str) else ""
    )


def timeout_row(obj: Mapping[str, Any], head: EventHead) -> TimeoutRow | str:
    """Check a ``timeout`` event whose head is already checked."""
    t = obj.get("timeout_ns")
    if not _in(t, 1, MAX_NS):
        return "timeout without a 'timeout_ns' in (0, 2**63)"
    cpu = obj.get("cpu")
    if cpu is not None and not _cpu(cpu):
        return f"timeout with 'cpu' {_short(cpu)} not a CPU index in [0, {MAX_CPU})"
    canary = obj.get("canary", "unknown")
    if not isinstance(canary, str) or not canary or len(canary) > MAX_KIND:
        canary = "unknown"
    return TimeoutRow(head.mono_ns, t, canary, cpu)


def agent_start(obj: Mapping[str, Any]) -> AgentStart | str:
    """Check an ``agent_start`` event whose head is already checked."""
    agent_id = obj.get("agent_id", "")
    if not isinstance(agent_id, str) or len(agent_id) > MAX_BOOT_ID:
        return "agent_start with an 'agent_id' that is not a short string"
    cpus = obj.get("cpus")
    announced: frozenset[int] | None = None
    if cpus is not None:
        if not (isinstance(cpus, list) and len(cpus) <= MAX_CPU and all(_cpu(c) for c in cpus)):
            return f"agent_start with 'cpus' not a list of CPU indexes in [0, {MAX_CPU})"
        announced = frozenset(cpus)
    config = obj.get("config")
    config = config if isinstance(config, Mapping) else {}
    threshold, interval = config.get("threshold_ns"), config.get("interval_ns")
    ladder = config.get("timeouts_ns")
    good_ladder = (
        isinstance(ladder, list)
        and len(ladder) <= MAX_LADDER
        and all(_in(t, 1, MAX_NS) for t in ladder)
    )
    clocksource = obj.get("clocksource")
    return AgentStart(
        agent_id=agent_id,
        cpus=announced,
        threshold_ns=threshold if _in(threshold, 0, MAX_NS) else None,
        interval_ns=interval if _in(interval, 1, MAX_NS) else None,
        timeouts_ns=tuple(sorted(ladder)) if good_ladder and isinstance(ladder, list) else (),
        clocksource=clocksource if isinstance(clocksource, str) else None,
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "..."


# --------------------------------------------------------------------------- fast path

#: The agent's own layout of a ``stall`` line (docs/events.md), matched whole. Numbers
#: are JSON numbers (no leading zeros) of at most 19 digits, a 19-digit one starting with
#: 1 to 8, so always below 2**63; anything else goes the checked way.
_D = rb"(?>0|[1-9][0-9]{0,17}+(?![0-9])|[1-8][0-9]{18})"  # atomic: no backtracking into it
_N = b"(" + _D + b")"
_OPT = rb'(?:,"(?:run_delay_ns|steal_ns)":(?:-?' + _D + rb"|null))?"
_STALL_BODY = (
    rb'\{"v":(?:0|[1-9][0-9]{0,8}),"seq":' + _N + rb',"boot_id":"([0-9A-Za-z_-]{1,128})",'
    rb'"kind":"stall","mono_ns":'
    + _N
    + rb',"real_ns":-?'
    + _D
    + rb',"duration_ns":'
    + _N
    + rb',"cpu":(0|[1-9][0-9]{0,3}),"cause":"([a-z-]{0,32})"'
    + _OPT
    + _OPT
    + rb'(?:,"mode":"[a-z]{0,16}")?\}'
)
STALL_LINE = re.compile(_STALL_BODY + rb"\n?")
#: Every line of a block of whole lines, one match each (``findall``): a line in the stall
#: layout gives its six groups (seq, boot, mono, duration, CPU, cause) and an empty seventh,
#: any other line six empty ones and itself (without its newline) as the seventh. A block
#: that ends with its newline gives one empty match more, at its end.
LINES = re.compile(rb"^(?:" + _STALL_BODY + rb"|(.*))$", re.M)


def fast_stall(raw: bytes) -> StallRow | None:
    """The ``StallRow`` of a line in the agent's stall layout, or None (take the checked
    path): never a row the checked path would not give."""
    m = STALL_LINE.fullmatch(raw)
    if m is None:
        return None
    seq, mono, dur, cpu = int(m[1]), int(m[3]), int(m[4]), int(m[5])
    if cpu >= MAX_CPU or mono + dur > MAX_NS:
        return None
    return StallRow(seq, m[2].decode("ascii"), mono, dur, cpu, m[6].decode("ascii"))


# --------------------------------------------------------------------------- seq order


class SeqRanges:
    """A set of integers kept as sorted, disjoint ``[lo, hi]`` ranges: O(1) memory for a
    sequence that rises by one."""

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __contains__(self, n: int) -> bool:
        i = bisect.bisect_right(self._lo, n) - 1
        return i >= 0 and n <= self._hi[i]

    def __len__(self) -> int:
        return sum(h - lo + 1 for lo, h in zip(self._lo, self._hi, strict=True))

    @property
    def high(self) -> int | None:
        """The largest member, None when empty."""
        return self._hi[-1] if self._hi else None

    def add_range(self, lo: int, hi: int) -> None:
        """Add ``lo..hi``, which must lie above every member."""
        if self._hi and lo == self._hi[-1] + 1:
            self._hi[-1] = hi
        else:
            self._lo.append(lo)
            self._hi.append(hi)

    def add(self, n: int) -> None:
        """Add ``n`` (merging neighbouring ranges)."""
        if self._hi and n == self._hi[-1] + 1:  # the common case: the next seq
            self._hi[-1] = n
            return
        if n in self:
            return
        i = bisect.bisect_right(self._lo, n)
        joins_left = i > 0 and self._hi[i - 1] == n - 1
        joins_right = i < len(self._lo) and self._lo[i] == n + 1
        if joins_left and joins_right:
            self._hi[i - 1] = self._hi[i]
            del self._lo[i], self._hi[i]
        elif joins_left:
            self._hi[i - 1] = n
        elif joins_right:
            self._lo[i] = n
        else:
            self._lo.insert(i, n)
            self._hi.insert(i, n)


@dataclass(frozen=True)
class SeqVerdict:
    """What ``SeqTracker.see`` decided: ``duplicate`` (skip the line), else kept with
    ``back_from`` (below the highest seen: that highest), ``restart_after`` (a seq seen
    before but later in guest time: the highest of the count before) or ``gap`` (events
    missing)."""

    duplicate: bool = False
    back_from: int | None = None
    restart_after: int | None = None
    gap: int = 0


@dataclass
class _Count:
    """The seqs of one agent start (or of one restart found without its start)."""

    seqs: SeqRanges
    last_mono_ns: int = -1


class SeqTracker:
    """The seqs seen per (segment, agent start); see the module docstring.

    A seq seen before is a duplicate when the event is not later in guest time than every
    event of its count (a copied line carries its original ``mono_ns``); an event later
    than all of them is an agent that restarted without its ``agent_start`` in the file
    (its monotonic clock went on), and starts a count of its own.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[int, str], list[_Count]] = {}

    def see(
        self, segment: int, agent_id: str, seq: int, is_start: bool, mono_ns: int
    ) -> SeqVerdict:
        """Record one event's seq and say whether it is a duplicate, late, after a gap or
        the first of an unannounced restart.

        :param segment: the boot's segment index (seqs of two boots never compare).
        :param agent_id: the agent start the event belongs to (its own, for a start).
        :param seq: the event's seq.
        :param is_start: the event is an ``agent_start`` (a new count may begin).
        :param mono_ns: the event's guest monotonic time.
        """
        counts = self._counts.setdefault((segment, agent_id), [])
        if not counts:
            counts.append(_Count(SeqRanges()))
        count = counts[-1]
        if seq in count.seqs:
            if is_start or mono_ns <= count.last_mono_ns:
                return SeqVerdict(duplicate=True)
            high = count.seqs.high
            count = _Count(SeqRanges())
            counts.append(count)
            count.seqs.add(seq)
            count.last_mono_ns = mono_ns
            return SeqVerdict(restart_after=high)
        high = count.seqs.high
        count.seqs.add(seq)
        count.last_mono_ns = max(count.last_mono_ns, mono_ns)
        if high is None or is_start:
            return SeqVerdict()
        if seq < high:
            return SeqVerdict(back_from=high)
        return SeqVerdict(gap=seq - high - 1)

    def see_run(self, segment: int, agent_id: str, first: int, last: int, mono_ns: int) -> bool:
        """Record the consecutive seqs ``first..last`` of events that are no agent start, in
        one step, when each would get a plain verdict from ``see`` (the first follows the
        highest seq of the current count, or the count is empty); else record nothing.

        :param mono_ns: the latest guest monotonic time among them.
        :return: whether they were recorded (else the caller sees them one by one).
        """
        counts = self._counts.setdefault((segment, agent_id), [])
        if not counts:
            counts.append(_Count(SeqRanges()))
        count = counts[-1]
        high = count.seqs.high
        if high is not None and first != high + 1:
            return False
        count.seqs.add_range(first, last)
        count.last_mono_ns = max(count.last_mono_ns, mono_ns)
        return True
