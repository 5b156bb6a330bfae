"""Phase windows for reports from Prometheus: from a run directory, or from the host exporter.

Two sources, one set of rules. With a run directory the phases are its timeline
(``analysis.analyze.timeline.build_timeline`` over the QMP records). Without one, the host
exporter (``tsprobe record --listen``, ``analysis.record.exporter``) has kept in Prometheus the
time each endpoint last entered each status
(``tsprobe_migration_status_started_timestamp_seconds{endpoint,status}``) and the times
of its last STOP and RESUME (``tsprobe_migration_stop_timestamp_seconds``,
``..._resume_...``). Over a range query each distinct value of those gauges is one event
at an exact time, whatever the scrape interval. ``timeline_from_exporter`` turns them back
into MIGRATION, STOP and RESUME records with QEMU-style timestamps and hands them to the
same ``build_timeline``, so both sources cut phases by the same rules (pauses become
``stop-and-copy`` or ``switchover``, postcopy statuses start at the first endpoint to
report them, and so on). What the exporter path cannot see: a status (or a STOP) entered
twice between two scrapes keeps only its last entry.

``windows_from_phases`` cuts the phases to the queried range: a ``before migration``
window from the range's start to the first phase, the open last phase (an outcome) up to
the range's end, an ``after the last phase`` window when the last phase ended before the
range did, and one ``whole range (phases unknown)`` window without any phase.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from analysis.analyze.timeline import build_timeline
from analysis.analyze.timeline_model import Phase, Timeline
from analysis.prom.tables import AFTER_PHASE, BEFORE_PHASE, WHOLE_RANGE, Series, Window


def _record(event: str, t_s: float, status: str | None = None) -> dict[str, Any]:
    ns = round(t_s * 1e9)
    record: dict[str, Any] = {
        "type": "event",
        "event": event,
        "timestamp": {"seconds": ns // 1_000_000_000, "microseconds": ns % 1_000_000_000 // 1000},
        "host_real_ns": ns,
        "host_mono_ns": ns,
    }
    if status is not None:
        record["data"] = {"status": status}
    return record


def _distinct(series: Series) -> list[float]:
    return sorted({v for _, v in series.points if v > 0})


def timeline_from_exporter(
    started: Iterable[Series], stops: Iterable[Series] = (), resumes: Iterable[Series] = ()
) -> Timeline:
    """Rebuild a migration's timeline from the host exporter's timestamp gauges (pure).

    :param started: ``tsprobe_migration_status_started_timestamp_seconds`` series (labels
        ``endpoint``, ``status``), as a range query returns them.
    :param stops: ``tsprobe_migration_stop_timestamp_seconds`` series (label ``endpoint``).
    :param resumes: ``tsprobe_migration_resume_timestamp_seconds`` series.
    :return: the timeline (no phases when no migration status was exported).
    """
    records: dict[str, list[dict[str, Any]]] = {}
    for s in started:
        status = s.labels.get("status", "")
        if status in ("", "none"):
            continue
        endpoint = records.setdefault(s.labels.get("endpoint", ""), [])
        endpoint.extend(_record("MIGRATION", t, status) for t in _distinct(s))
    for event, group in (("STOP", stops), ("RESUME", resumes)):
        for s in group:
            endpoint = records.setdefault(s.labels.get("endpoint", ""), [])
            endpoint.extend(_record(event, t) for t in _distinct(s))
    ordered = {
        name: sorted(recs, key=lambda r: int(r["host_mono_ns"]))
        for name, recs in sorted(records.items(), key=lambda item: _source_first(item[0]))
    }
    return build_timeline(ordered)


def _source_first(name: str) -> tuple[int, str]:
    return (0 if name in ("src", "source") else 1, name)


def windows_from_phases(phases: Sequence[Phase], start_ns: int, end_ns: int) -> list[Window]:
    """Cut phases to ``[start_ns, end_ns)`` and fill the range before and after them.

    :param phases: a timeline's phases, in order (host realtime ns).
    :param start_ns: the range's start; ``end_ns`` its end.
    :return: the windows, in order, none empty.
    """
    out: list[Window] = []

    def add(name: str, a: int, b: int, stopped: bool = False) -> None:
        a, b = max(a, start_ns), min(b, end_ns)
        if b > a:
            out.append(Window(len(out), name, a, b, stopped))

    if not phases:
        add(WHOLE_RANGE, start_ns, end_ns)
        return out
    add(BEFORE_PHASE, start_ns, phases[0].start_ns)
    for phase in phases:
        end = end_ns if phase.end_ns is None else phase.end_ns
        add(phase.name, phase.start_ns, end, phase.vm_stopped)
    last_end = phases[-1].end_ns
    if last_end is not None:
        add(AFTER_PHASE, last_end, end_ns)
    return out
