"""The guest's files of a run directory read into columns: events per lane, clock samples.

``_GuestReader`` reads each agent's event file once, line by line through
``analysis.rundir.jsonl``, every event checked by its model in ``analysis.rundir.guest_events``
(most lines are stalls in the agent's own layout: ``guest_events.fast_stall`` reads them
without ``json.loads`` and gives exactly what the checked path gives). Duplicated ``seq``
values are skipped, seqs that go back or jump are noted, and a stall on a CPU the agent did
not announce is skipped, never a lane.

Guest events become numpy columns, not objects, because a long run holds millions of them:
``StallTable`` (lane, start, length, cause, segment, line) and ``TimeoutTable``; the rare
kinds (``kernel_warning``, ``clock_step``, ``agent_start``, unknown kinds) stay dicts
(``PointEvent``). A *lane* is one sampled CPU of one agent (``Lane``). Guest ``mono_ns``
values compare only within one boot, so each agent's events are split into ``Segment``
objects, one per ``(agent, boot_id)``. ``_read_samples`` reads ``clock-samples.jsonl``
into ``ClockSample`` objects. ``analysis.analyze.load`` assembles all of it into a ``Run``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from analysis import rundir
from analysis.rundir import guest_events as ge
from analysis.rundir.jsonl import (
    MAX_NS,
    Issue,
    decode_record,
    iter_records,
    printable,
    read_chunks,
)
from analysis.rundir.qmp import is_int
from probe.events import KNOWN_KINDS, STALL_CAUSES

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]

#: Cause hints, coded as small integers in ``StallTable.cause``.
CAUSES = STALL_CAUSES


_CAUSE_CODE = {name: i for i, name in enumerate(CAUSES)}
#: The stall columns kept while reading (``StallTable`` without ``line``).
_STALL_COLUMNS = ("lane", "mono", "dur", "cause", "seg")


#: Kinds the loader understands (others are kept in ``Run.other`` with a note).
HANDLED_KINDS = KNOWN_KINDS


@dataclass(frozen=True)
class Lane:
    """One sampled CPU of one agent: a row of the timeline plot."""

    agent: str
    cpu: int

    def label(self, several_agents: bool) -> str:
        """``CPU 1``, or ``guest2 CPU 1`` when the run followed several agents."""
        return f"{self.agent} CPU {self.cpu}" if several_agents else f"CPU {self.cpu}"


@dataclass
class Segment:
    """The events of one agent within one guest boot (their ``mono_ns`` compare).

    :param agent: the agent's name.
    :param boot_id: the guest boot.
    :param index: position in ``Run.segments``.
    :param path: the events file; ``first_line`` its first line in this segment.
    :param agent_ids: the agent starts seen (``agent_start``'s ``agent_id``).
    :param cpus: the CPUs the agent sampled (from ``agent_start``, else from stalls).
    :param threshold_ns: the stall threshold (from the agent's config), None when unknown.
    :param interval_ns: the sampling interval, None when unknown.
    :param timeouts_ns: the agent's timeout ladder, empty when unknown.
    :param clocksource: the clocksource at agent start.
    :param first_mono_ns: earliest ``mono_ns`` seen; ``last_mono_ns`` the latest end.
    :param announced: the CPUs the current agent start announced (None: not announced).
    :param agent_id: the current agent start's id (events carry none of their own).
    """

    agent: str
    boot_id: str
    index: int
    path: str
    first_line: int
    agent_ids: list[str] = field(default_factory=list)
    cpus: set[int] = field(default_factory=set)
    threshold_ns: int | None = None
    interval_ns: int | None = None
    timeouts_ns: tuple[int, ...] = ()
    clocksource: str | None = None
    first_mono_ns: int | None = None
    last_mono_ns: int | None = None
    announced: frozenset[int] | None = None
    agent_id: str = ""

    def see(self, mono: int, end: int) -> None:
        """Widen the segment's guest-time span."""
        if self.first_mono_ns is None or mono < self.first_mono_ns:
            self.first_mono_ns = mono
        if self.last_mono_ns is None or end > self.last_mono_ns:
            self.last_mono_ns = end


@dataclass
class StallTable:
    """Every stall as numpy columns (one row per stall, in file order).

    ``lane`` indexes ``Run.lanes``; ``mono`` is the guest start, ``dur`` the guest length
    (ns); ``cause`` indexes ``CAUSES``; ``seg`` indexes ``Run.segments``; ``line`` is the
    line number in the segment's file.
    """

    lane: I32
    mono: I64
    dur: I64
    cause: I32
    seg: I32
    line: I32

    def __len__(self) -> int:
        return int(self.lane.shape[0])


@dataclass
class TimeoutTable:
    """The canaries' ``timeout`` events: an application wait that outlived ``timeout_ns``.

    ``canary`` indexes ``Run.canaries``; ``lane`` is -1 when the event names no CPU.
    """

    lane: I32
    mono: I64
    timeout_ns: I64
    canary: I32
    seg: I32
    line: I32

    def __len__(self) -> int:
        return int(self.lane.shape[0])


@dataclass(frozen=True)
class PointEvent:
    """A rare guest event kept whole: a kernel warning, a clock step, an unknown kind."""

    kind: str
    mono_ns: int
    seg: int
    line: int
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class ClockSample:
    """One kept ``/clock`` read with the host times around it (clock-samples.jsonl).

    :param host_ns: host realtime midpoint of send and receive (best estimate of the read).
    :param half_rtt_ns: half the round trip: the bound on the read's host time.
    :param guest_mono_ns: guest CLOCK_MONOTONIC of the read; ``guest_real_ns`` REALTIME.
    :param bracket_ns: the guest's own MONOTONIC bracket around its REALTIME read.
    :param ptp_offset_ns: guest realtime minus host realtime from ptp_kvm, when given.
    """

    agent: str
    reason: str
    host_ns: int
    half_rtt_ns: int
    guest_mono_ns: int
    guest_real_ns: int
    bracket_ns: int
    boot_id: str
    agent_id: str
    ptp_offset_ns: int | None
    line: int


def _ns(value: object, signed: bool = False) -> TypeGuard[int]:
    """An integer nanosecond value that fits int64 (non-negative unless ``signed``)."""
    return is_int(value) and (-MAX_NS if signed else 0) <= value <= MAX_NS


class _GuestReader:
    """Accumulates the guest events of every agent into columns."""

    def __init__(self, issue: Callable[[Issue], None]) -> None:
        self.issue = issue
        self.segments: list[Segment] = []
        self.seg_by_key: dict[tuple[str, str], int] = {}
        self.lane_keys: dict[tuple[str, int], int] = {}
        self.st: dict[str, list[int]] = {k: [] for k in _STALL_COLUMNS}
        self.st_line: list[int] = []
        #: Earlier stall rows as arrays, in order before ``st``'s: (column -> array).
        self.st_parts: list[dict[str, npt.NDArray[np.int64]]] = []
        self.to: dict[str, list[int]] = {k: [] for k in ("lane", "mono", "t", "canary", "seg")}
        self.to_line: list[int] = []
        self.canaries: dict[str, int] = {}
        self.warnings: list[PointEvent] = []
        self.clock_steps: list[PointEvent] = []
        self.lifecycle: list[PointEvent] = []
        self.other: list[PointEvent] = []
        self.unknown: Counter[str] = Counter()
        self.seqs = ge.SeqTracker()

    def lane(self, agent: str, cpu: int) -> int:
        key = (agent, cpu)
        idx = self.lane_keys.get(key)
        if idx is None:
            idx = self.lane_keys[key] = len(self.lane_keys)
        return idx

    def segment(self, agent: str, boot_id: str, path: str, line: int) -> Segment:
        key = (agent, boot_id)
        idx = self.seg_by_key.get(key)
        if idx is None:
            idx = self.seg_by_key[key] = len(self.segments)
            self.segments.append(Segment(agent, boot_id, idx, path, line))
        return self.segments[idx]

    def read_file(self, agent: str, path: Path) -> None:
        """Read one agent's events file (see the module docstring for what is skipped).

        The file comes in blocks of whole lines (``jsonl.read_chunks``); ``guest_events.LINES``
        finds the stall lines in the agent's layout of a block in one pass, and each run of
        them between other lines is taken at once (``_FileReading.take``); every other line
        is taken on its own, in line order.
        """
        reading = _FileReading(self, agent, printable(path))
        for first, block in read_chunks(path, self.issue):
            found = ge.LINES.findall(block)
            source = _Block(first, block)
            ended = block.endswith(b"\n")
            if ended:
                found.pop()  # the empty match after the last newline
            start = 0
            for k in [i for i, groups in enumerate(found) if not groups[0]] + [len(found)]:
                if k > start:
                    reading.take(_StallRun(source, first + start, found[start:k]))
                if k < len(found):
                    raw = found[k][6] + b"\n" if ended or k + 1 < len(found) else found[k][6]
                    if not raw.isspace():
                        reading.line(first + k, raw)
                start = k + 1
        reading.finish()

    def seq_notes(
        self, name: str, back: list[tuple[int, int, int]], gaps: list[tuple[int, int, int]]
    ) -> None:
        if back:
            line, high, seq = back[0]
            n = len(back)
            self.issue(
                Issue(
                    name,
                    line,
                    f"seq went back {n} time{'s' if n != 1 else ''} without an agent_start "
                    f"(first {high} -> {seq}): events out of order, or an agent restart "
                    "whose start is missing",
                    "note",
                )
            )
        if gaps:
            line, missing, seq = gaps[0]
            total = sum(g[1] for g in gaps)
            self.issue(
                Issue(
                    name,
                    line,
                    f"seq jumped {len(gaps)} time{'s' if len(gaps) != 1 else ''} "
                    f"(first to {seq}, {missing} missing): {total} events missing in all",
                    "note",
                )
            )

    def _unannounced(self, seg: Segment, cpu: int, kind: str, line: int, name: str) -> bool:
        """Whether ``cpu`` is not one the agent announced (reported as a skip)."""
        if seg.announced is None or cpu in seg.announced:
            return False
        cpus = ", ".join(str(c) for c in sorted(seg.announced)) or "none"
        self.issue(
            Issue(name, line, f"{kind} on CPU {cpu}, which the agent did not announce ({cpus})")
        )
        return True

    def stalls_in_bulk(self, seg: Segment, run: _StallRun) -> bool:
        """Take a run of stall lines at once when each would be taken plainly one by one:
        seqs that follow on from the count's highest, CPUs below ``MAX_CPU`` and announced,
        each stall ending within int64. Otherwise take nothing and say so.

        :return: whether the run was taken.
        """
        seq, _boot, mono, dur, cpu, cause, _other = zip(*run.groups, strict=True)
        seqs = np.array(seq, dtype="S20").astype(np.int64)
        monos = np.array(mono, dtype="S20").astype(np.int64)
        durs = np.array(dur, dtype="S20").astype(np.int64)
        cpus = np.array(cpu, dtype="S8").astype(np.int64)
        cpu_set = set(np.unique(cpus).tolist())
        if (
            (len(seqs) > 1 and not bool(np.all(np.diff(seqs) == 1)))
            or max(cpu_set) >= ge.MAX_CPU
            or bool(np.any(durs > MAX_NS - monos))
            or (seg.announced is not None and not cpu_set <= seg.announced)
        ):
            return False
        ends = monos + durs
        if not self.seqs.see_run(
            seg.index, seg.agent_id, int(seqs[0]), int(seqs[-1]), int(monos.max())
        ):
            return False
        lut = np.zeros(max(cpu_set) + 1, dtype=np.int64)
        for c in sorted(cpu_set):
            lut[c] = self.lane(seg.agent, c)
        names, which = np.unique(np.array(cause, dtype="S32"), return_inverse=True)
        codes = np.array([_CAUSE_CODE.get(n.decode("ascii"), 3) for n in names.tolist()])
        self.flush_stalls()  # the rows taken one by one before these come first
        self.st_parts.append(
            {
                "lane": lut[cpus],
                "mono": monos,
                "dur": durs,
                "cause": codes[which].astype(np.int64),
                "seg": np.full(len(seqs), seg.index, dtype=np.int64),
                "line": np.arange(run.first, run.first + len(seqs), dtype=np.int64),
            }
        )
        seg.cpus.update(cpu_set)
        seg.see(int(monos.min()), int(ends.max()))
        return True

    def flush_stalls(self) -> None:
        """Move the rows taken one by one so far into ``st_parts`` (keeping their order)."""
        if self.st_line:
            part = {k: np.asarray(v, dtype=np.int64) for k, v in self.st.items()}
            part["line"] = np.asarray(self.st_line, dtype=np.int64)
            self.st_parts.append(part)
            self.st = {k: [] for k in _STALL_COLUMNS}
            self.st_line = []

    def stall(self, seg: Segment, row: ge.StallRow, line: int, name: str) -> None:
        if self._unannounced(seg, row.cpu, "stall", line, name):
            return
        self.st["lane"].append(self.lane(seg.agent, row.cpu))
        self.st["mono"].append(row.mono_ns)
        self.st["dur"].append(row.duration_ns)
        self.st["cause"].append(_CAUSE_CODE.get(row.cause, 3))
        self.st["seg"].append(seg.index)
        self.st_line.append(line)
        seg.cpus.add(row.cpu)
        seg.see(row.mono_ns, row.mono_ns + row.duration_ns)

    def event(
        self, seg: Segment, kind: str, obj: dict[str, Any], mono: int, line: int, name: str
    ) -> None:
        if kind == "timeout":
            head = ge.EventHead(kind, 0, seg.boot_id, mono, 0)
            row = ge.timeout_row(obj, head)
            if isinstance(row, str):
                self.issue(Issue(name, line, row))
                return
            if row.cpu is not None and self._unannounced(seg, row.cpu, kind, line, name):
                return
            canary = row.canary
            self.to["lane"].append(self.lane(seg.agent, row.cpu) if row.cpu is not None else -1)
            self.to["mono"].append(mono)
            self.to["t"].append(row.timeout_ns)
            self.to["canary"].append(self.canaries.setdefault(canary, len(self.canaries)))
            self.to["seg"].append(seg.index)
            self.to_line.append(line)
            seg.see(mono, mono)
            return
        point = PointEvent(kind, mono, seg.index, line, obj)
        if kind == "kernel_warning":
            self.warnings.append(point)
        elif kind == "clock_step":
            self.clock_steps.append(point)
        elif kind in HANDLED_KINDS:
            self.lifecycle.append(point)
        else:
            if not self.unknown[kind]:
                self.issue(
                    Issue(name, line, f"unknown event kind {kind!r}: kept, not analysed", "note")
                )
            self.unknown[kind] += 1
            self.other.append(point)
            return
        seg.see(mono, mono)

    @staticmethod
    def agent_started(seg: Segment, start: ge.AgentStart) -> None:
        if start.agent_id:
            seg.agent_ids.append(start.agent_id)
        if start.cpus is not None:
            seg.announced = start.cpus
            seg.cpus.update(start.cpus)
        if start.clocksource is not None:
            seg.clocksource = start.clocksource
        if start.threshold_ns is not None:
            seg.threshold_ns = start.threshold_ns
        if start.interval_ns is not None:
            seg.interval_ns = start.interval_ns
        if start.timeouts_ns:
            seg.timeouts_ns = start.timeouts_ns


class _Block:
    """A block of whole lines (``jsonl.read_chunks``), split into lines only when asked."""

    def __init__(self, first: int, data: bytes) -> None:
        self.first = first
        self.data = data
        self._lines: list[bytes] | None = None

    def line(self, number: int) -> bytes:
        """Line ``number`` of the file (it is in this block), without its newline."""
        if self._lines is None:
            self._lines = self.data.split(b"\n")
        return self._lines[number - self.first]


class _StallRun:
    """Consecutive lines in the stall layout (``guest_events.LINES``) of one block: the
    number of the first and each one's groups."""

    def __init__(self, block: _Block, first: int, groups: list[tuple[bytes, ...]]) -> None:
        self.block = block
        self.first = first
        self.groups = groups

    @property
    def lines(self) -> range:
        """Their line numbers."""
        return range(self.first, self.first + len(self.groups))


class _FileReading:
    """One events file read in line order: the current segment and the seq notes.

    ``line`` takes one line the checked way (or by ``guest_events.fast_stall``); ``take``
    takes a ``_StallRun`` in bulk when every line of it would get a plain verdict one by
    one (seqs that follow on, CPUs announced, times in range), else line by line: the
    result is the same either way.
    """

    def __init__(self, reader: _GuestReader, agent: str, name: str) -> None:
        self.reader = reader
        self.agent = agent
        self.name = name
        self.current: Segment | None = None
        self.back: list[tuple[int, int, int]] = []  # (line, from, to)
        self.gaps: list[tuple[int, int, int]] = []  # (line, missing, seq)
        self.restarts: list[tuple[int, int, int]] = []  # (line, highest before, seq)

    def take(self, run: _StallRun) -> None:
        """Take a run of stall lines: at once when they belong to the current segment and
        ``stalls_in_bulk`` takes them, else one by one."""
        seg = self.current
        boot = seg.boot_id.encode() if seg is not None else b""
        boots = [groups[1] for groups in run.groups]
        if (
            seg is None
            or boots.count(boot) != len(boots)
            or not self.reader.stalls_in_bulk(seg, run)
        ):
            for line_no in run.lines:  # valid JSON in the stall layout: the newline changes nothing
                self.line(line_no, run.block.line(line_no) + b"\n")

    def line(self, line_no: int, raw: bytes) -> None:
        """Take one line."""
        reader, name = self.reader, self.name
        issue = reader.issue
        row = ge.fast_stall(raw)
        obj: dict[str, Any] | None = None
        start: ge.AgentStart | None = None
        if row is not None:
            kind, boot, seq = "stall", row.boot_id, row.seq
        else:
            decoded = decode_record(raw)
            if isinstance(decoded, str):
                issue(Issue(name, line_no, decoded))
                return
            obj = decoded
            head = ge.event_head(obj)
            if isinstance(head, str):
                issue(Issue(name, line_no, head))
                return
            kind, boot, seq = head.kind, head.boot_id, head.seq
            if kind == "stall":
                checked = ge.stall_row(obj)
                if isinstance(checked, str):
                    issue(Issue(name, line_no, checked))
                    return
                row = checked
            elif kind == "agent_start":
                got = ge.agent_start(obj)
                if isinstance(got, str):
                    issue(Issue(name, line_no, got))
                    return
                start = got
        current = self._segment(boot, line_no)
        agent_id = start.agent_id if start is not None else current.agent_id
        mono = row.mono_ns if row is not None else row_mono(obj or {})
        verdict = reader.seqs.see(current.index, agent_id, seq, start is not None, mono)
        if verdict.duplicate:
            issue(Issue(name, line_no, f"{kind}: seq {seq} seen before: left out"))
            return
        if verdict.restart_after is not None:
            self.restarts.append((line_no, verdict.restart_after, seq))
        elif verdict.back_from is not None:
            self.back.append((line_no, verdict.back_from, seq))
        elif verdict.gap:
            self.gaps.append((line_no, verdict.gap, seq))
        if start is not None:
            current.agent_id = start.agent_id
            reader.agent_started(current, start)
        if row is not None:
            reader.stall(current, row, line_no, name)
        else:
            assert obj is not None
            reader.event(current, kind, obj, row_mono(obj), line_no, name)

    def _segment(self, boot: str, line_no: int) -> Segment:
        current = self.current
        if current is None or current.boot_id != boot:
            if current is not None:
                self.reader.issue(
                    Issue(
                        self.name,
                        line_no,
                        f"guest rebooted: boot_id {current.boot_id} -> {boot}; "
                        "times of the new boot are aligned separately",
                        "note",
                    )
                )
            current = self.current = self.reader.segment(self.agent, boot, self.name, line_no)
        return current

    def finish(self) -> None:
        """The notes on seqs that restarted, went back or jumped."""
        for line, high, seq in self.restarts:
            self.reader.issue(
                Issue(
                    self.name,
                    line,
                    f"seq restarted ({high} -> {seq}) later in guest time without an "
                    "agent_start: an agent restart whose start is missing; counted anew",
                    "note",
                )
            )
        self.reader.seq_notes(self.name, self.back, self.gaps)


def row_mono(obj: Mapping[str, Any]) -> int:
    """The ``mono_ns`` of an event whose head ``event_head`` accepted."""
    mono = obj["mono_ns"]
    assert isinstance(mono, int)
    return mono


def _stall_table(r: _GuestReader) -> StallTable:
    r.flush_stalls()
    parts = r.st_parts

    def column(name: str, dtype: type) -> Any:
        if not parts:
            return np.zeros(0, dtype=dtype)
        return np.concatenate([p[name] for p in parts]).astype(dtype)

    return StallTable(
        lane=column("lane", np.int32),
        mono=column("mono", np.int64),
        dur=column("dur", np.int64),
        cause=column("cause", np.int32),
        seg=column("seg", np.int32),
        line=column("line", np.int32),
    )


def _timeout_table(r: _GuestReader) -> TimeoutTable:
    return TimeoutTable(
        lane=np.asarray(r.to["lane"], dtype=np.int32),
        mono=np.asarray(r.to["mono"], dtype=np.int64),
        timeout_ns=np.asarray(r.to["t"], dtype=np.int64),
        canary=np.asarray(r.to["canary"], dtype=np.int32),
        seg=np.asarray(r.to["seg"], dtype=np.int32),
        line=np.asarray(r.to_line, dtype=np.int32),
    )


def _read_samples(path: Path, issue: Callable[[Issue], None]) -> list[ClockSample]:
    out: list[ClockSample] = []
    name = printable(path)
    for line_no, obj in iter_records(path, issue, dedupe=True):
        clock = obj.get("clock")
        send, recv = obj.get("host_send_real_ns"), obj.get("host_recv_real_ns")
        if not isinstance(clock, dict) or not (_ns(send) and _ns(recv)):
            issue(Issue(name, line_no, "clock sample without 'clock' and host send/receive times"))
            continue
        mono, real = clock.get("monotonic_ns"), clock.get("realtime_ns")
        if not (_ns(mono) and _ns(real, signed=True)) or recv < send:
            issue(Issue(name, line_no, "clock sample without guest clocks in range (int64 ns)"))
            continue
        ptp = clock.get("host_offset_ns")
        bracket = clock.get("bracket_ns")
        out.append(
            ClockSample(
                agent=str(obj.get("agent", "guest")),
                reason=str(obj.get("reason", "")),
                host_ns=(send + recv) // 2,
                half_rtt_ns=(recv - send + 1) // 2,
                guest_mono_ns=mono,
                guest_real_ns=real,
                bracket_ns=bracket if _ns(bracket) else 0,
                boot_id=str(clock.get("boot_id", "unknown")),
                agent_id=str(clock.get("agent_id", "")),
                ptp_offset_ns=ptp if _ns(ptp, signed=True) else None,
                line=line_no,
            )
        )
    return out


def guest_event_files(run: Path, meta: Mapping[str, Any]) -> dict[str, Path]:
    """The guest event files of a run, keyed by agent name.

    ``guest-events.jsonl`` belongs to the only agent meta.json names (else ``guest``);
    ``guest-events-NAME.jsonl`` to agent NAME. A directory without any of those but with
    exactly one other ``*.jsonl`` that is not a known run file (a copied spool such as
    ``events.jsonl``) is read as the spool of an agent called ``guest``.
    """
    files: dict[str, Path] = {}
    agents = meta.get("agents")
    names = sorted(agents) if isinstance(agents, dict) else []
    single = run / rundir.GUEST_EVENTS
    if os.path.lexists(single):
        files[names[0] if len(names) == 1 else "guest"] = single
    for p in sorted(run.glob("guest-events-*.jsonl")):
        files[printable(p.name[len("guest-events-") : -len(".jsonl")])] = p
    if files:
        return files
    known = ("qmp-", "agent-", "arrivals-", "clock-samples", "lab-", "vcpu-states")
    spools = [p for p in sorted(run.glob("*.jsonl")) if not p.name.startswith(known)]
    if len(spools) == 1:
        files["guest"] = spools[0]
    return files
