"""The timeline's first step: each QMP endpoint's records checked and sorted into marks.

``_parse_endpoint`` walks one endpoint's records once (the record rules are in
``analysis.analyze.timeline``'s docstring): every record must be an object with a ``type``;
events need a QMP event name and a usable time (QEMU's timestamp, else the receive time:
``analysis.rundir.qmp.event_time``'s rule, with a note when the stamp was unusable);
other records need a valid ``host_real_ns``. What survives becomes ``_Mark`` objects
(one point in time, on which clock) and ``_Report`` objects (a status reported by an
event or a polled reply), collected in a ``_Parsed``; what does not is an ``RecordIssue``
naming the record's index. ``_role_of`` tells a source from a destination.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from analysis.analyze.timeline_model import (
    Clock,
    RecordIssue,
    Role,
)
from analysis.rundir.jsonl import MAX_NS
from analysis.rundir.qmp import KNOWN_STATUSES, is_int, qemu_ns, receive_ns

_SOURCE_WORDS = frozenset({"src", "source"})


_DEST_WORDS = frozenset({"dst", "dest", "destination", "target", "incoming"})


@dataclass(frozen=True)
class _Mark:
    """One timed thing an endpoint reported."""

    t: int
    clock: Clock
    endpoint: str
    index: int
    order: int  # the endpoint's position, for stable ties


@dataclass(frozen=True)
class _Report:
    mark: _Mark
    status: str
    via: Literal["event", "poll"]


@dataclass
class _Parsed:
    name: str
    order: int
    records: int = 0
    events: list[_Report] = field(default_factory=list)
    polls: list[_Report] = field(default_factory=list)
    stops: list[_Mark] = field(default_factory=list)
    resumes: list[_Mark] = field(default_factory=list)
    passes: list[tuple[_Mark, int]] = field(default_factory=list)
    migrate_replies: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    closed: list[tuple[int, str]] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)  # (t, "timeout cmd")
    times: list[int] = field(default_factory=list)
    says_ram: bool = False
    says_socket: bool = False
    issues: list[RecordIssue] = field(default_factory=list)
    unknown: set[str] = field(default_factory=set)

    def set_order(self, order: int) -> None:
        """Re-key every mark with the endpoint's tie-break position."""
        self.order = order

        def fix(mark: _Mark) -> _Mark:
            return replace(mark, order=order)

        self.events = [replace(r, mark=fix(r.mark)) for r in self.events]
        self.polls = [replace(r, mark=fix(r.mark)) for r in self.polls]
        self.stops = [fix(m) for m in self.stops]
        self.resumes = [fix(m) for m in self.resumes]
        self.passes = [(fix(m), n) for m, n in self.passes]

    def reports(self) -> list[_Report]:
        """Status reports: events, plus polled statuses before the first event."""
        events = sorted(self.events, key=_report_key)
        polls = sorted(self.polls, key=_report_key)
        if events:
            first = events[0].mark.t
            polls = [p for p in polls if p.mark.t < first]
        merged = sorted(events + polls, key=_report_key)
        out: list[_Report] = []
        for rep in merged:
            # polled statuses repeat every poll; keep changes only
            if rep.via == "poll" and out and out[-1].status == rep.status:
                continue
            out.append(rep)
        return out


def _report_key(rep: _Report) -> tuple[int, int, int]:
    return (rep.mark.t, rep.mark.order, rep.mark.index)


def _mark_key(mark: _Mark) -> tuple[int, int, int]:
    return (mark.t, mark.order, mark.index)


#: What QEMU's event names are made of (QAPI: upper case, digits, underscores).
_EVENT_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
#: What the recorder's record types are made of (``event``, ``reply``, ``timeout``, ...).
_RECORD_TYPE = re.compile(r"[a-z][a-z0-9_-]{0,63}")


def _parse_endpoint(name: str, order: int, records: Iterable[Any]) -> _Parsed:
    ep = _Parsed(name, order)
    for index, rec in enumerate(records):
        ep.records += 1

        def skip(message: str, index: int = index) -> None:
            ep.issues.append(RecordIssue(name, index, message))

        if not isinstance(rec, Mapping):
            skip(f"expected a JSON object, got {type(rec).__name__}")
            continue
        kind = rec.get("type")
        if not isinstance(kind, str) or not kind:
            skip("record without a 'type'")
            continue
        if not _RECORD_TYPE.fullmatch(kind):
            skip("record whose 'type' is not a record type name (a-z, 0-9, _, -)")
            continue
        host_ns = receive_ns(rec.get("host_real_ns"))
        if kind == "event":
            _parse_event(ep, rec, index, host_ns, skip)
            continue
        if host_ns is None:
            skip(f"{kind} record without a valid 'host_real_ns'")
            continue
        ep.times.append(host_ns)
        if kind == "reply":
            _parse_reply(ep, rec, index, host_ns, skip)
        elif kind == "closed":
            reason = rec.get("reason")
            ep.closed.append((host_ns, str(reason) if reason is not None else "closed"))
        elif kind in ("timeout", "error"):
            command = rec.get("command")
            ep.failures.append((host_ns, f"{kind} {command}" if command else kind))
        # connected, note and types this version does not know: kept in the file, not here
    return ep


def _parse_event(
    ep: _Parsed,
    rec: Mapping[str, Any],
    index: int,
    host_ns: int | None,
    skip: Callable[[str], None],
) -> None:
    name = rec.get("event")
    if not isinstance(name, str) or not name:
        skip("event record without an 'event' name")
        return
    if not _EVENT_NAME.fullmatch(name):
        skip("event record whose 'event' is not a QMP event name (A-Z, 0-9, _)")
        return
    stamp = qemu_ns(rec.get("timestamp"))
    clock: Clock
    if stamp is not None:
        t, clock = stamp, "qemu"
    elif host_ns is not None:
        t, clock = host_ns, "host"
        if rec.get("timestamp") is not None:
            ep.issues.append(
                RecordIssue(
                    ep.name, index, f"{name}: unusable QEMU timestamp, using the host's", "note"
                )
            )
    else:
        skip(f"{name} event without a usable 'timestamp' or 'host_real_ns'")
        return
    ep.times.append(t)
    mark = _Mark(t, clock, ep.name, index, ep.order)
    data = rec.get("data")
    if name == "MIGRATION":
        status = data.get("status") if isinstance(data, Mapping) else None
        if not isinstance(status, str) or not status:
            skip("MIGRATION event without data.status")
            return
        _note_unknown(ep, index, status)
        ep.events.append(_Report(mark, status, "event"))
    elif name == "MIGRATION_PASS":
        number = data.get("pass") if isinstance(data, Mapping) else None
        if not is_int(number) or not 0 <= number <= MAX_NS:
            skip("MIGRATION_PASS event whose data.pass is not an integer in [0, 2**63)")
            return
        ep.passes.append((mark, int(number)))
    elif name == "STOP":
        ep.stops.append(mark)
    elif name == "RESUME":
        ep.resumes.append(mark)


def _parse_reply(
    ep: _Parsed,
    rec: Mapping[str, Any],
    index: int,
    host_ns: int,
    skip: Callable[[str], None],
) -> None:
    if rec.get("command") != "query-migrate":
        return
    ret = rec.get("return")
    if not isinstance(ret, Mapping):
        skip("query-migrate reply without a 'return' object")
        return
    status = ret.get("status")
    if status is not None and (not isinstance(status, str) or not status):
        skip(f"query-migrate reply with a bad status {status!r}")
        return
    ep.migrate_replies.append((host_ns, dict(ret)))
    if "ram" in ret:
        ep.says_ram = True
    if "socket-address" in ret:
        ep.says_socket = True
    if isinstance(status, str) and status != "none":
        _note_unknown(ep, index, status)
        mark = _Mark(host_ns, "poll", ep.name, index, ep.order)
        ep.polls.append(_Report(mark, status, "poll"))


def _note_unknown(ep: _Parsed, index: int, status: str) -> None:
    """Point at the first record of each status this version does not know."""
    if status in KNOWN_STATUSES or status in ep.unknown:
        return
    ep.unknown.add(status)
    message = f"unknown migration status {status!r} (kept as a phase of that name)"
    ep.issues.append(RecordIssue(ep.name, index, message, "note"))


def _role_of(ep: _Parsed) -> Role | None:
    words = set(re.split(r"[^a-z0-9]+", ep.name.lower()))
    if words & _SOURCE_WORDS:
        return "source"
    if words & _DEST_WORDS:
        return "destination"
    if ep.passes or ep.says_ram:
        return "source"
    if ep.says_socket:
        return "destination"
    return None
