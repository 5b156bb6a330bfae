"""Load a whole run directory into typed data for alignment, attribution and the report.

``load_run(RUNDIR)`` reads every file analysis uses (docs/run-directory.md is the layout):

=========================  ==============================================================
``meta.json``              kept as a dict (``Run.meta``); optional
``qmp-NAME.jsonl``         records per endpoint, and the ``Timeline`` built from them
``guest-events.jsonl``     the agent's events; ``guest-events-NAME.jsonl`` per agent
``clock-samples.jsonl``    one ``ClockSample`` per ``/clock`` burst
``lab-steps.jsonl``        the lab's injected freezes (``inject`` records), when present
``vcpu-states.jsonl``      host truth: one ``VcpuInterval`` per line, when present
=========================  ==============================================================

A run directory holding only a guest's spool (``guest-events.jsonl``, or any
``*.jsonl`` of agent events copied off a guest) is valid: it has no phases.

Guest events become numpy columns, not objects, because a long run holds millions of them:
``StallTable`` (lane, start, length, cause, segment, line) and ``TimeoutTable``; the rare
kinds (``kernel_warning``, ``clock_step``, ``agent_start``, unknown kinds) stay dicts.
A *lane* is one sampled CPU of one agent (``Lane``): with one agent, lane ``i`` is simply
``CPU n``.

Every file is read through ``analysis.rundir.jsonl`` (one line at a time, bounded, never blocking
on a FIFO; its docstring has the rules) and every guest event is checked by its model in
``analysis.rundir.guest_events``: duplicated ``seq`` values are skipped, seqs that go back or jump
are noted, and a stall on a CPU the agent did not announce is skipped, never a lane. Most
lines of a long run are stalls in the agent's own layout: ``guest_events.fast_stall``
reads them without ``json.loads``, giving exactly what the checked path gives.

Segments. Guest ``mono_ns`` values compare only within one boot: the loader splits each
agent's events into ``Segment`` objects, one per ``(agent, boot_id)``; a new ``boot_id``
in the middle of a file is a guest that rebooted, reported as a note (and a finding
later). Clock samples carry the boot id of the clock they read, so each segment is aligned
with its own samples (``analysis.analyze.alignment``).

What is passed over is an ``Issue`` with file and line: ``skip`` (a line that is not
JSON, a truncated last line, an event missing a required field) or ``note`` (an unknown
kind, kept in ``Run.other``; a reboot; a segment without clock samples; the count of the
agent's history events from before the recording). ``load_run(..., strict=True)`` raises
``RecordFormatError`` naming the first skip and the count, after reading everything.

"Before the recording started": when meta.json gives the recording's start and a clock
sample of the same boot exists, a ``stall`` that ended, or a point event that happened,
before the start (converted with that boot's first sample) is left out, with one note per
kind giving the count: the agent serves everything it buffered since it started, and that
history belongs to no phase.

Host truth (``vcpu-states.jsonl``, written by the recorder's vCPU sampler): each line is a
run-length interval of one vCPU thread's host state, checked by ``vcpu_interval``: the
endpoint a non-empty string, ``vcpu`` in [0, ``MAX_VCPU``), ``tid`` in [1, ``MAX_TID``],
the four times ints in [0, 2**63), each end not before its start, ``state`` one of
``rundir.VCPU_STATE_NAMES``; ``samples`` and the optional ``wchan``, ``futex``,
``holder_hint``, ``syscall`` are kept when of the right type and dropped alone otherwise
(``end_real_ns``, when missing, is the start plus the monotonic length). A line that fails
a check is a skip with its reason. The file is written in the order intervals end, so the
loader sorts them by (endpoint, vCPU, start); an interval that starts before the previous
one of the same vCPU ended is cut to start at that end (one note per file), so that no
host time is counted twice.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

import numpy as np
import numpy.typing as npt

from analysis import rundir
from analysis.analyze.timeline_io import read_timeline
from analysis.analyze.timeline_model import Timeline
from analysis.errors import RecordFormatError
from analysis.rundir import guest_events as ge
from analysis.rundir.jsonl import (
    MAX_NS,
    Issue,
    Severity,
    decode_record,
    iter_records,
    printable,
    read_document,
    read_lines,
)
from probe.events import KNOWN_KINDS, STALL_CAUSES

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]

#: Cause hints, coded as small integers in ``StallTable.cause``.
CAUSES = STALL_CAUSES
_CAUSE_CODE = {name: i for i, name in enumerate(CAUSES)}
#: Event kinds whose position in time is a measurement (checked against the start).
MEASURED_KINDS = frozenset({"stall", "timeout", "kernel_warning", "clock_step"})
#: Kinds the loader understands (others are kept in ``Run.other`` with a note).
HANDLED_KINDS = KNOWN_KINDS
LAB_STEPS = "lab-steps.jsonl"
__all__ = ["Issue", "Severity"]  # re-exported: analysis.rundir.jsonl defines them


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
class VcpuInterval:
    """One vCPU thread in one host state from ``start`` to ``end`` (exclusive): a line of
    ``vcpu-states.jsonl``, on the recording host's CLOCK_MONOTONIC and CLOCK_REALTIME.

    :param endpoint: the QMP endpoint whose QEMU runs the thread (``src``, ``dst``).
    :param vcpu: QEMU's vCPU index; ``tid`` the host thread (shared by every vCPU under
        single-threaded TCG).
    :param state: one of ``rundir.VCPU_STATE_NAMES``.
    :param wchan: the last wchan seen, None when not given.
    :param samples: readings that saw the state, None when not given.
    :param futex: the futex word's address (hex) of a futex wait; ``holder_hint`` a
        text about who holds it; ``syscall`` the system call number, when given.
    :param also_waiting: for a lock wait, the other threads seen waiting on the same
        futex object (``main``: QEMU's main loop; ``vcpu N``).
    :param line: the line in vcpu-states.jsonl.
    """

    endpoint: str
    vcpu: int
    tid: int
    state: str
    start_mono_ns: int
    end_mono_ns: int
    start_real_ns: int
    end_real_ns: int
    wchan: str | None = None
    samples: int | None = None
    futex: str | None = None
    holder_hint: str | None = None
    syscall: int | None = None
    also_waiting: tuple[str, ...] = ()
    line: int = 0

    @property
    def length_ns(self) -> int:
        """The interval's monotonic length."""
        return self.end_mono_ns - self.start_mono_ns


#: Bounds of ``vcpu-states.jsonl`` fields (QEMU's vCPU index; Linux's PID_MAX_LIMIT).
MAX_VCPU = 1 << 16
MAX_TID = 1 << 22
#: At most this many names in ``also_waiting`` (more: the field is dropped).
MAX_WAITERS = 256
_MAX_NS = MAX_NS


def vcpu_interval(obj: Mapping[str, Any], line: int = 0) -> VcpuInterval | str:
    """Check one ``vcpu-states.jsonl`` record (see the module docstring).

    :param obj: the decoded line.
    :param line: its line number, kept in the result.
    :return: the interval, or the reason it was rejected (one line).
    """
    endpoint = obj.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        return "vCPU state without an 'endpoint' name"
    vcpu, tid, state = obj.get("vcpu"), obj.get("tid"), obj.get("state")
    if not _is_int(vcpu) or not 0 <= vcpu < MAX_VCPU:
        return f"vCPU state with 'vcpu' {vcpu!r} not an integer in [0, {MAX_VCPU})"
    if not _is_int(tid) or not 1 <= tid <= MAX_TID:
        return f"vCPU state with 'tid' {tid!r} not an integer in [1, {MAX_TID}]"
    if state not in rundir.VCPU_STATE_NAMES:
        return f"vCPU state {state!r} unknown (known: {', '.join(rundir.VCPU_STATE_NAMES)})"
    times: dict[str, int] = {}
    for key in ("start_mono_ns", "end_mono_ns", "start_real_ns", "end_real_ns"):
        value = obj.get(key)
        if value is None and key == "end_real_ns":
            continue
        if not _is_int(value) or not 0 <= value <= _MAX_NS:
            return f"vCPU state with '{key}' {value!r} not an integer in [0, 2**63)"
        times[key] = value
    if times["end_mono_ns"] < times["start_mono_ns"]:
        return "vCPU state ending (monotonic) before it starts"
    length = times["end_mono_ns"] - times["start_mono_ns"]
    end_real = times.get("end_real_ns", times["start_real_ns"] + length)
    if end_real < times["start_real_ns"]:
        return "vCPU state ending (realtime) before it starts"
    wchan, samples = obj.get("wchan"), obj.get("samples")
    futex, hint, syscall = obj.get("futex"), obj.get("holder_hint"), obj.get("syscall")
    waiting = obj.get("also_waiting")
    if not (
        isinstance(waiting, list)
        and len(waiting) <= MAX_WAITERS
        and all(isinstance(w, str) and 0 < len(w) <= 32 for w in waiting)
    ):
        waiting = []
    return VcpuInterval(
        endpoint=endpoint,
        vcpu=vcpu,
        tid=tid,
        state=str(state),
        start_mono_ns=times["start_mono_ns"],
        end_mono_ns=times["end_mono_ns"],
        start_real_ns=times["start_real_ns"],
        end_real_ns=end_real,
        wchan=wchan if isinstance(wchan, str) else None,
        samples=samples if _is_int(samples) and samples >= 0 else None,
        futex=futex if isinstance(futex, str) else None,
        holder_hint=hint if isinstance(hint, str) else None,
        syscall=syscall if _is_int(syscall) else None,
        also_waiting=tuple(waiting),
        line=line,
    )


def read_vcpu_states(path: Path, issue: Callable[[Issue], None]) -> list[VcpuInterval]:
    """Read ``vcpu-states.jsonl``: checked intervals sorted by (endpoint, vCPU, start).

    :param path: the file.
    :param issue: called with each line passed over, and with a note when intervals of
        one vCPU overlapped (the later one is cut to start where the earlier ended).
    :raise RunDirError: when the file cannot be read.
    :return: the intervals (empty ones, after a cut, are left out).
    """
    name = printable(path)
    got: list[VcpuInterval] = []
    for line_no, obj in iter_records(path, issue, dedupe=True):
        checked = vcpu_interval(obj, line_no)
        if isinstance(checked, str):
            issue(Issue(name, line_no, checked))
        else:
            got.append(checked)
    got.sort(key=lambda v: (v.endpoint, v.vcpu, v.start_mono_ns, v.end_mono_ns))
    out: list[VcpuInterval] = []
    cut: list[int] = []
    for iv in got:
        prev = out[-1] if out else None
        same = prev is not None and (prev.endpoint, prev.vcpu) == (iv.endpoint, iv.vcpu)
        if prev is not None and same and iv.start_mono_ns < prev.end_mono_ns:
            cut.append(iv.line)
            if iv.end_mono_ns <= prev.end_mono_ns:
                continue
            shift = prev.end_mono_ns - iv.start_mono_ns
            iv = replace(
                iv,
                start_mono_ns=prev.end_mono_ns,
                start_real_ns=min(iv.start_real_ns + shift, iv.end_real_ns),
            )
        out.append(iv)
    if cut:
        n = len(cut)
        issue(
            Issue(
                name,
                min(cut),
                f"{n} vCPU state interval{'s' if n != 1 else ''} overlapped an earlier one of "
                "the same vCPU: cut to start where that one ended",
                "note",
            )
        )
    return out


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


def is_stop_command(record: dict[str, Any]) -> bool:
    """Whether a ``lab-steps.jsonl`` record is a ``stop`` command that may have stopped
    the vCPUs (answered, or timed out; not refused)."""
    return (
        record.get("type") == "command"
        and record.get("command") == "stop"
        and record.get("outcome") != "error"
    )


@dataclass
class Run:
    """Everything read from one run directory.

    :param path: the run directory.
    :param meta: meta.json (empty without it).
    :param qmp: QMP records per endpoint; ``timeline`` built from them (None without QMP).
    :param lanes: the (agent, CPU) lanes, sorted; ``segments`` the guest boots per agent.
    :param stalls: ``timeouts``: the numpy tables; ``warnings``, ``clock_steps``,
        ``lifecycle`` (agent_start/stop, probe_status, sampler_outage, clocksource and
        sync changes) and ``other`` (unknown kinds): point events.
    :param samples: the clock samples, in file order.
    :param injects: the lab's ``inject`` records (host-measured freezes).
    :param stop_requests: the lab's ``stop`` commands (``command`` records), which date
        the freezes they caused (``analysis.analyze.alignment.stop_request``).
    :param issues: every skip and note.
    :param vcpu_states: host truth, per vCPU thread (``read_vcpu_states``), empty without
        ``vcpu-states.jsonl``; ``has_vcpu_states`` whether that file exists.
    """

    path: Path
    meta: dict[str, Any]
    qmp: dict[str, list[dict[str, Any]]]
    timeline: Timeline | None
    lanes: list[Lane]
    segments: list[Segment]
    stalls: StallTable
    timeouts: TimeoutTable
    canaries: list[str]
    warnings: list[PointEvent]
    clock_steps: list[PointEvent]
    lifecycle: list[PointEvent]
    other: list[PointEvent]
    samples: list[ClockSample]
    injects: list[dict[str, Any]]
    issues: list[Issue]
    unknown_kinds: Counter[str]
    stop_requests: list[dict[str, Any]] = field(default_factory=list)
    vcpu_states: list[VcpuInterval] = field(default_factory=list)
    has_vcpu_states: bool = False

    @property
    def vcpu_sampler(self) -> dict[str, dict[str, Any]]:
        """meta.json ``vcpu_sampler``: per endpoint ``pid``, ``threads``, ``poll_ns``,
        ``samples``, ``note`` (empty when absent: a run from before the sampler)."""
        part = self.meta.get("vcpu_sampler")
        if not isinstance(part, dict):
            return {}
        return {str(k): v for k, v in part.items() if isinstance(v, dict)}

    @property
    def skips(self) -> list[Issue]:
        """The issues that are skipped lines or records."""
        return [i for i in self.issues if i.severity == "skip"]

    @property
    def notes(self) -> list[Issue]:
        """The issues that are notes."""
        return [i for i in self.issues if i.severity == "note"]

    @property
    def agents(self) -> list[str]:
        """The agents' names, in lane order."""
        return sorted({seg.agent for seg in self.segments})

    @property
    def has_guest(self) -> bool:
        """True when any guest event was read."""
        return bool(self.segments)

    @property
    def accel(self) -> str | None:
        """The accelerator the lab used (meta.json ``lab.accel``), or None."""
        lab = self.meta.get("lab")
        accel = lab.get("accel") if isinstance(lab, dict) else None
        return str(accel) if isinstance(accel, str) else None

    def recording_span(self) -> tuple[int | None, int | None]:
        """The recording's start and end in host realtime from meta.json (None if absent)."""
        return _meta_time(self.meta, "start"), _meta_time(self.meta, "end")


def _meta_time(meta: Mapping[str, Any], key: str) -> int | None:
    part = meta.get(key)
    if isinstance(part, dict):
        value = part.get("real_ns")
        if _ns(value):
            return value
    return None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _ns(value: object, signed: bool = False) -> TypeGuard[int]:
    """An integer nanosecond value that fits int64 (non-negative unless ``signed``)."""
    return _is_int(value) and (-MAX_NS if signed else 0) <= value <= MAX_NS


# --------------------------------------------------------------------------- guest events


class _GuestReader:
    """Accumulates the guest events of every agent into columns."""

    def __init__(self, issue: Callable[[Issue], None]) -> None:
        self.issue = issue
        self.segments: list[Segment] = []
        self.seg_by_key: dict[tuple[str, str], int] = {}
        self.lane_keys: dict[tuple[str, int], int] = {}
        self.st: dict[str, list[int]] = {k: [] for k in ("lane", "mono", "dur", "cause", "seg")}
        self.st_line: list[int] = []
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
        """Read one agent's events file (see the module docstring for what is skipped)."""
        name = printable(path)
        current: Segment | None = None
        back: list[tuple[int, int, int]] = []  # (line, from, to)
        gaps: list[tuple[int, int, int]] = []  # (line, missing, seq)
        restarts: list[tuple[int, int, int]] = []  # (line, highest before, seq)
        for line_no, raw in read_lines(path, self.issue):
            row = ge.fast_stall(raw)
            obj: dict[str, Any] | None = None
            start: ge.AgentStart | None = None
            if row is not None:
                kind, boot, seq = "stall", row.boot_id, row.seq
            else:
                decoded = decode_record(raw)
                if isinstance(decoded, str):
                    self.issue(Issue(name, line_no, decoded))
                    continue
                obj = decoded
                head = ge.event_head(obj)
                if isinstance(head, str):
                    self.issue(Issue(name, line_no, head))
                    continue
                kind, boot, seq = head.kind, head.boot_id, head.seq
                if kind == "stall":
                    checked = ge.stall_row(obj)
                    if isinstance(checked, str):
                        self.issue(Issue(name, line_no, checked))
                        continue
                    row = checked
                elif kind == "agent_start":
                    got = ge.agent_start(obj)
                    if isinstance(got, str):
                        self.issue(Issue(name, line_no, got))
                        continue
                    start = got
            if current is None or current.boot_id != boot:
                if current is not None:
                    self.issue(
                        Issue(
                            name,
                            line_no,
                            f"guest rebooted: boot_id {current.boot_id} -> {boot}; "
                            "times of the new boot are aligned separately",
                            "note",
                        )
                    )
                current = self.segment(agent, boot, name, line_no)
            agent_id = start.agent_id if start is not None else current.agent_id
            mono = row.mono_ns if row is not None else row_mono(obj or {})
            verdict = self.seqs.see(current.index, agent_id, seq, start is not None, mono)
            if verdict.duplicate:
                self.issue(Issue(name, line_no, f"{kind}: seq {seq} seen before: left out"))
                continue
            if verdict.restart_after is not None:
                restarts.append((line_no, verdict.restart_after, seq))
            elif verdict.back_from is not None:
                back.append((line_no, verdict.back_from, seq))
            elif verdict.gap:
                gaps.append((line_no, verdict.gap, seq))
            if start is not None:
                current.agent_id = start.agent_id
                self._agent_start(current, start)
            if row is not None:
                self.stall(current, row, line_no, name)
            else:
                assert obj is not None
                self.event(current, kind, obj, row_mono(obj), line_no, name)
        for line, high, seq in restarts:
            self.issue(
                Issue(
                    name,
                    line,
                    f"seq restarted ({high} -> {seq}) later in guest time without an "
                    "agent_start: an agent restart whose start is missing; counted anew",
                    "note",
                )
            )
        self._seq_notes(name, back, gaps)

    def _seq_notes(
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
    def _agent_start(seg: Segment, start: ge.AgentStart) -> None:
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


def row_mono(obj: Mapping[str, Any]) -> int:
    """The ``mono_ns`` of an event whose head ``event_head`` accepted."""
    mono = obj["mono_ns"]
    assert isinstance(mono, int)
    return mono


def _stall_table(r: _GuestReader) -> StallTable:
    return StallTable(
        lane=np.asarray(r.st["lane"], dtype=np.int32),
        mono=np.asarray(r.st["mono"], dtype=np.int64),
        dur=np.asarray(r.st["dur"], dtype=np.int64),
        cause=np.asarray(r.st["cause"], dtype=np.int32),
        seg=np.asarray(r.st["seg"], dtype=np.int32),
        line=np.asarray(r.st_line, dtype=np.int32),
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


# --------------------------------------------------------------------------- clock samples


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


# --------------------------------------------------------------------------- the run


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
    known = ("qmp-", "agent-", "clock-samples", "lab-", "vcpu-states")
    spools = [p for p in sorted(run.glob("*.jsonl")) if not p.name.startswith(known)]
    if len(spools) == 1:
        files["guest"] = spools[0]
    return files


def load_run(path: str | Path, strict: bool = False) -> Run:
    """Read a run directory.

    :param path: the run directory.
    :param strict: raise after reading when any line or record was skipped.
    :raise RunDirError: when the directory is missing, empty, or a file cannot be read.
    :raise RecordFormatError: with ``strict``, when anything was skipped (the message
        names the first skip and the count).
    :return: the run; ``Run.issues`` lists what was skipped or noted.
    """
    run = rundir.require_rundir(path)
    issues: list[Issue] = []
    meta: dict[str, Any] = {}
    meta_path = run / rundir.META
    if os.path.lexists(meta_path):
        meta = read_document(meta_path, issues.append) or {}
        for when in ("start", "end"):
            part = meta.get(when)
            value = part.get("real_ns") if isinstance(part, dict) else None
            if value is not None and not _ns(value):
                issues.append(
                    Issue(printable(meta_path), 0, f"{when}.real_ns not in [0, 2**63): ignored")
                )

    qmp, timeline = read_timeline(run, issues.append)

    reader = _GuestReader(issues.append)
    for agent, gpath in guest_event_files(run, meta).items():
        reader.read_file(agent, gpath)

    samples: list[ClockSample] = []
    cpath = run / rundir.CLOCK_SAMPLES
    if os.path.lexists(cpath):
        samples = _read_samples(cpath, issues.append)

    injects: list[dict[str, Any]] = []
    stop_requests: list[dict[str, Any]] = []
    lpath = run / LAB_STEPS
    if os.path.lexists(lpath):
        for line_no, obj in iter_records(lpath, issues.append, dedupe=True):
            why = rundir.stamp_problem(obj)
            if why is not None:
                issues.append(Issue(printable(lpath), line_no, why))
            elif is_stop_command(obj):
                if _ns(obj.get("host_real_ns")):
                    stop_requests.append(obj)
                else:
                    issues.append(Issue(printable(lpath), line_no, "stop without host time"))
            elif obj.get("type") == "inject":
                if _ns(obj.get("host_start_ns")) and _ns(obj.get("host_end_ns")):
                    injects.append(obj)
                else:
                    issues.append(Issue(printable(lpath), line_no, "inject without host times"))

    vcpu_states: list[VcpuInterval] = []
    vpath = run / rundir.VCPU_STATES
    if os.path.lexists(vpath):
        vcpu_states = read_vcpu_states(vpath, issues.append)

    keys = set(reader.lane_keys)
    for seg in reader.segments:  # every sampled CPU gets a lane, stalled or not
        keys.update((seg.agent, cpu) for cpu in seg.cpus)
    order = sorted(keys)
    index = {k: i for i, k in enumerate(order)}
    remap = np.zeros(max(len(reader.lane_keys), 1), dtype=np.int32)
    for key, raw in reader.lane_keys.items():
        remap[raw] = index[key]
    stalls = _stall_table(reader)
    timeouts = _timeout_table(reader)
    if len(stalls):
        stalls.lane = remap[stalls.lane]
    if len(timeouts):
        has = timeouts.lane >= 0
        timeouts.lane = np.where(has, remap[np.maximum(timeouts.lane, 0)], -1).astype(np.int32)
    lanes = [Lane(a, c) for a, c in order]

    result = Run(
        path=run,
        meta=meta,
        qmp=qmp,
        timeline=timeline,
        lanes=lanes,
        segments=reader.segments,
        stalls=stalls,
        timeouts=timeouts,
        canaries=list(reader.canaries),
        warnings=reader.warnings,
        clock_steps=reader.clock_steps,
        lifecycle=reader.lifecycle,
        other=reader.other,
        samples=samples,
        injects=injects,
        issues=issues,
        unknown_kinds=reader.unknown,
        stop_requests=stop_requests,
        vcpu_states=vcpu_states,
        has_vcpu_states=os.path.lexists(vpath),
    )
    _drop_before_start(result)
    _note_unaligned(result)
    if strict and result.skips:
        first = result.skips[0]
        n = len(result.skips)
        raise RecordFormatError(f"{first} ({n} line{'s' if n != 1 else ''} skipped; --strict)")
    return result


def _first_sample(run: Run, seg: Segment) -> ClockSample | None:
    for s in run.samples:
        if s.boot_id == seg.boot_id and (s.agent == seg.agent or len(run.agents) == 1):
            return s
    return None


_Table = TypeVar("_Table", StallTable, TimeoutTable)


def _rows(table: _Table, keep: npt.NDArray[np.bool_]) -> _Table:
    """The rows of a column table where ``keep`` is true (every column filtered alike)."""
    return type(table)(**{f.name: getattr(table, f.name)[keep] for f in fields(table)})


def _drop_before_start(run: Run) -> None:
    """Leave out measurement events that ended before the recording started.

    They are the agent's history (it serves everything since it started), not bad lines:
    one note per kind and segment gives their count and first line.
    """
    start, _ = run.recording_span()
    if start is None:
        return
    limits = np.full(max(len(run.segments), 1), np.iinfo(np.int64).min, dtype=np.int64)
    for seg in run.segments:
        s = _first_sample(run, seg)
        if s is not None:
            limits[seg.index] = s.guest_mono_ns - (s.host_ns - start) - s.half_rtt_ns
    early_lines: dict[tuple[int, str], list[int]] = {}
    st = run.stalls
    if len(st):
        early = (st.mono + st.dur) < limits[st.seg]
        for i in np.flatnonzero(early):
            early_lines.setdefault((int(st.seg[i]), "stall"), []).append(int(st.line[i]))
        run.stalls = _rows(st, ~early)
    to = run.timeouts
    if len(to):
        early = to.mono < limits[to.seg]
        for i in np.flatnonzero(early):
            early_lines.setdefault((int(to.seg[i]), "timeout"), []).append(int(to.line[i]))
        run.timeouts = _rows(to, ~early)
    for attr in ("warnings", "clock_steps"):
        kept = []
        for ev in getattr(run, attr):
            if ev.mono_ns < limits[ev.seg]:
                early_lines.setdefault((ev.seg, ev.kind), []).append(ev.line)
            else:
                kept.append(ev)
        setattr(run, attr, kept)
    for (seg_index, kind), lines in sorted(early_lines.items()):
        n = len(lines)
        run.issues.append(
            Issue(
                run.segments[seg_index].path,
                min(lines),
                f"{n} {kind} event{'s' if n != 1 else ''} from before the recording started "
                "(the agent's history) left out",
                "note",
            )
        )


def _note_unaligned(run: Run) -> None:
    """A note per segment that no clock sample can put on the host's clock."""
    if not run.samples:
        return
    for seg in run.segments:
        if _first_sample(run, seg) is None:
            run.issues.append(
                Issue(
                    seg.path,
                    seg.first_line,
                    f"no clock sample for boot {seg.boot_id} of agent {seg.agent}: its events "
                    "are placed with the guest's realtime clock (error unknown)",
                    "note",
                )
            )
