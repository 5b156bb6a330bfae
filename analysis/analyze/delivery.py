"""How late the guest's events reached the recorder: the delay from an event to its arrival.

An event can be reported only once it has ended: a stall at its end, a canary's timeout
when its measurement ended (both ``mono_ns + duration_ns``), a point event (a clock step, a
kernel warning) at ``mono_ns``. That end, put on the host's clock by the report's guest ->
host mapping (``analysis.analyze.alignment``), is when it happened; it arrived when the
recorder received the page that carried it: each page is followed in
``arrivals-NAME.jsonl`` by an ``arrival`` record with its receive time and the events
file's line count with it
(``analysis.record.agent_client``), so the event on line L came with the first arrival
whose ``lines`` is at least L.

The delay sums everything between the two: the worker's batching (a sampler sends its lines
once a second), the agent's log, the recorder's polling (every 250 ms) and a slow or paused
guest answering late. Events that ended before the recording began (the agent's backlog at
the first fetch) are left out, and so are events whose boot has no alignment. A mapping's
error bound is reported beside the figures (the largest among the events counted).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from analysis import rundir
from analysis.analyze.alignment import Alignment
from analysis.analyze.load import Run
from analysis.analyze.spans import Span, span_label
from analysis.rundir import jsonl
from analysis.rundir.guest_reader import guest_event_files

#: The delay every event is held to: it reaches the recorder within a second of its end.
LATE_NS = 1_000_000_000


@dataclass(frozen=True)
class Delivery:
    """The delays of one run's guest events (ns).

    :param events: events measured; ``late`` those that took longer than ``LATE_NS``.
    :param worst_seq: ``worst_kind``: the latest event.
    :param error_ns: the largest guest -> host error bound among them (None: unknown).
    :param by_phase: per phase the event ended in (attribution's spans; one span without
        phases): events, late, the largest delay.
    :param request_max_ns: the longest request of a page that brought events (send to
        receipt): the share of a delay the agent's answer itself took.
    """

    events: int
    late: int
    p50_ns: int
    p99_ns: int
    max_ns: int
    worst_seq: int | None
    worst_kind: str | None
    error_ns: int | None
    by_phase: dict[str, dict[str, int]] = field(default_factory=dict)
    request_max_ns: int | None = None

    def to_dict(self) -> dict[str, int | str | None]:
        """As JSON."""
        return asdict(self)


def _arrivals(path: Path) -> tuple[list[int], list[int], list[int]]:
    """(line counts, receive times, request times) of the ``arrival`` records, in order."""
    lines: list[int] = []
    times: list[int] = []
    requests: list[int] = []
    for _, rec in jsonl.iter_records(path, lambda _issue: None):
        count, recv, sent = rec.get("lines"), rec.get("host_real_ns"), rec.get("host_send_real_ns")
        if rec.get("type") == "arrival" and isinstance(count, int) and isinstance(recv, int):
            lines.append(count)
            times.append(recv)
            if isinstance(sent, int):
                requests.append(recv - sent)
    return lines, times, requests


def delivery(run: Run, al: Alignment, spans: Sequence[Span] = ()) -> Delivery | None:
    """Measure every guest event's delay (see the module docstring).

    :return: the figures, or None when no event could be measured (no ``arrival`` records:
        a run recorded before they existed, or no guest).
    """
    # Per (agent, boot): the events' ends (guest monotonic), arrival times, seq and kind.
    groups: dict[tuple[str, str], list[tuple[int, int, int, str]]] = {}
    requests: list[int] = []
    for agent, events_path in guest_event_files(run.path, run.meta).items():
        lines, times, took = _arrivals(run.path / rundir.arrivals_file(agent))
        requests += took
        for line_no, ev in jsonl.iter_records(events_path, lambda _issue: None) if lines else ():
            k = bisect.bisect_left(lines, line_no)
            mono, boot, dur = ev.get("mono_ns"), ev.get("boot_id"), ev.get("duration_ns")
            if k == len(lines) or not isinstance(mono, int) or not isinstance(boot, str):
                continue
            end = mono + (dur if isinstance(dur, int) and dur > 0 else 0)
            seq = ev.get("seq")
            row = (end, times[k], seq if isinstance(seq, int) else -1, str(ev.get("kind")))
            groups.setdefault((agent, boot), []).append(row)
    start, _ = run.recording_span()
    delays: list[tuple[int, int, str]] = []
    ends: list[int] = []
    errors: list[float] = []
    for (agent, boot), rows in groups.items():
        ba = al.for_segment(agent, boot)
        if ba is None:
            continue
        host, err = ba.to_host(np.array([r[0] for r in rows], dtype=np.int64))
        for (_, arrived, seq, kind), ended, e in zip(
            rows, host.tolist(), err.tolist(), strict=True
        ):
            if start is not None and ended < start:
                continue
            delays.append((arrived - int(ended), seq, kind))
            ends.append(int(ended))
            errors.append(e)
    if not delays:
        return None
    ordered = sorted(d for d, _, _ in delays)
    worst = max(delays)
    known = not any(np.isnan(errors))
    return Delivery(
        events=len(ordered),
        late=sum(1 for d in ordered if d > LATE_NS),
        p50_ns=ordered[len(ordered) // 2],
        p99_ns=ordered[min(len(ordered) - 1, (99 * len(ordered)) // 100)],
        max_ns=worst[0],
        worst_seq=worst[1] if worst[1] >= 0 else None,
        worst_kind=worst[2],
        error_ns=round(max(errors)) if known else None,
        by_phase=_by_phase(spans, ends, [d for d, _, _ in delays]),
        request_max_ns=max(requests) if requests else None,
    )


def _by_phase(
    spans: Sequence[Span], ends: list[int], delays: list[int]
) -> dict[str, dict[str, int]]:
    """Events, late ones and the largest delay per phase an event ended in (the phase's
    label: ``postcopy-active #2`` when a name repeats)."""
    out: dict[str, dict[str, int]] = {}
    starts = [s.start_ns for s in spans]
    for end, delay in zip(ends, delays, strict=True):
        k = max(0, bisect.bisect_right(starts, end) - 1)
        label = span_label(list(spans), k) if spans else "all"
        row = out.setdefault(label, {"events": 0, "late": 0, "max_ns": 0})
        row["events"] += 1
        row["late"] += delay > LATE_NS
        row["max_ns"] = max(row["max_ns"], delay)
    return out
