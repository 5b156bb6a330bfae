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
agent's history events from before the recording; an agent whose last events never reached
the recorder, from meta.json). ``load_run(..., strict=True)`` raises
``RecordFormatError`` naming the first skip and the count, after reading everything.

"Before the recording started": when meta.json gives the recording's start and a clock
sample of the same boot exists, a ``stall`` that ended, or a point event that happened,
before the start (converted with that boot's first sample) is left out, with one note per
kind giving the count: the agent serves everything it buffered since it started, and that
history belongs to no phase.

Host truth (``vcpu-states.jsonl``) is read and checked by ``analysis.rundir.vcpu_states``,
the guest's files by ``analysis.rundir.guest_reader``; this module assembles the ``Run``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from analysis import rundir
from analysis.analyze.timeline_io import read_timeline
from analysis.analyze.timeline_model import Timeline
from analysis.errors import RecordFormatError
from analysis.rundir.guest_reader import (
    ClockSample,
    Lane,
    PointEvent,
    Segment,
    StallTable,
    TimeoutTable,
    _GuestReader,
    _ns,
    _read_samples,
    _stall_table,
    _timeout_table,
    guest_event_files,
)
from analysis.rundir.jsonl import (
    Issue,
    Severity,
    iter_records,
    printable,
    read_document,
)
from analysis.rundir.vcpu_states import VcpuInterval, read_vcpu_states

#: Event kinds whose position in time is a measurement (checked against the start).
MEASURED_KINDS = frozenset({"stall", "timeout", "kernel_warning", "clock_step"})
LAB_STEPS = "lab-steps.jsonl"
__all__ = ["Issue", "Severity"]  # re-exported: analysis.rundir.jsonl defines them


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


# --------------------------------------------------------------------------- guest events


# --------------------------------------------------------------------------- clock samples


# --------------------------------------------------------------------------- the run


def _read_meta(run: Path, issue: Callable[[Issue], None]) -> dict[str, Any]:
    """meta.json as a dict (empty without one); start/end times out of range are noted."""
    meta: dict[str, Any] = {}
    meta_path = run / rundir.META
    if os.path.lexists(meta_path):
        meta = read_document(meta_path, issue) or {}
        for when in ("start", "end"):
            part = meta.get(when)
            value = part.get("real_ns") if isinstance(part, dict) else None
            if value is not None and not _ns(value):
                issue(Issue(printable(meta_path), 0, f"{when}.real_ns not in [0, 2**63): ignored"))

    return meta


def _read_lab_steps(
    lpath: Path, issue: Callable[[Issue], None]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The lab's injected freezes (``inject``) and ``stop`` commands from lab-steps.jsonl."""
    injects: list[dict[str, Any]] = []
    stop_requests: list[dict[str, Any]] = []
    if os.path.lexists(lpath):
        for line_no, obj in iter_records(lpath, issue, dedupe=True):
            why = rundir.stamp_problem(obj)
            if why is not None:
                issue(Issue(printable(lpath), line_no, why))
            elif is_stop_command(obj):
                if _ns(obj.get("host_real_ns")):
                    stop_requests.append(obj)
                else:
                    issue(Issue(printable(lpath), line_no, "stop without host time"))
            elif obj.get("type") == "inject":
                if _ns(obj.get("host_start_ns")) and _ns(obj.get("host_end_ns")):
                    injects.append(obj)
                else:
                    issue(Issue(printable(lpath), line_no, "inject without host times"))

    return injects, stop_requests


def _lanes(reader: _GuestReader) -> tuple[list[Lane], StallTable, TimeoutTable]:
    """Every sampled CPU of every agent as a lane (stalled or not), in (agent, CPU) order,
    and the stall and timeout tables renumbered to those lanes."""
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

    return lanes, stalls, timeouts


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
    meta = _read_meta(run, issues.append)

    qmp, timeline = read_timeline(run, issues.append)

    reader = _GuestReader(issues.append)
    for agent, gpath in guest_event_files(run, meta).items():
        reader.read_file(agent, gpath)

    samples: list[ClockSample] = []
    cpath = run / rundir.CLOCK_SAMPLES
    if os.path.lexists(cpath):
        samples = _read_samples(cpath, issues.append)

    injects, stop_requests = _read_lab_steps(run / LAB_STEPS, issues.append)

    vcpu_states: list[VcpuInterval] = []
    vpath = run / rundir.VCPU_STATES
    if os.path.lexists(vpath):
        vcpu_states = read_vcpu_states(vpath, issues.append)

    lanes, stalls, timeouts = _lanes(reader)

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
    _note_unfetched(result)
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


def _note_unfetched(run: Run) -> None:
    """A note per agent whose last events never reached the recorder (meta.json's
    ``agents``: the fetch at the end failed, the agent said it had assigned a newer
    ``seq`` than the recorder wrote, or some of its workers had not reported past the end
    when the recording stopped): the run's figures miss them."""
    agents = run.meta.get("agents")
    for name, agent in (agents if isinstance(agents, dict) else {}).items():
        if not isinstance(agent, dict):
            continue
        written, said = agent.get("last_seq"), agent.get("agent_last_seq")
        where = printable(run.path / rundir.META)
        upto = f"seq {written}" if isinstance(written, int) else "the start"
        if agent.get("final_fetch") is False:
            reason = (
                f"agent {str(name)[:80]!r}: the recorder's last fetch of events failed, so "
                f"events after {upto} may be missing from this run"
            )
        elif isinstance(said, int) and isinstance(written, int) and said > written:
            reason = (
                f"agent {str(name)[:80]!r} had assigned seq up to {said}, the recording "
                f"ends at {written}: {said - written} events never reached the recorder"
            )
        elif agent.get("drained") is False:
            behind = agent.get("workers_behind")
            units = ", ".join(sorted(map(str, behind)))[:200] if isinstance(behind, dict) else ""
            reason = (
                f"agent {str(name)[:80]!r}: {units or 'some workers'} had not reported past "
                "the end of the recording, so what they measured last may be missing"
            )
        else:
            continue
        run.issues.append(Issue(where, 0, reason, "note"))


def _note_unaligned(run: Run) -> None:
    """A note per segment that no clock sample can put on the host's clock, and one per
    agent name of clock samples that no events file has (those samples are not used)."""
    if not run.samples:
        return
    known = {seg.agent for seg in run.segments}
    strangers: dict[str, int] = {}
    for sample in run.samples if run.segments else ():
        if sample.agent not in known:
            strangers.setdefault(sample.agent, sample.line)
    for agent, line in strangers.items():
        run.issues.append(
            Issue(
                printable(run.path / rundir.CLOCK_SAMPLES),
                line,
                f"clock samples of agent {agent[:80]!r}, which no events file has: not used",
                "note",
            )
        )
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
