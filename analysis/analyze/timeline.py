"""Migration phases rebuilt from the QMP records of both ends of a live migration.

``build_timeline`` is a pure function: it takes the records of every QMP endpoint of a run
(``qmp-src.jsonl``, ``qmp-dst.jsonl``, ... already decoded, see ``analysis.rundir``) and
returns a ``Timeline``: an ordered, gap-free list of ``Phase`` objects with host realtime
start and end, the endpoints and events that mark each boundary, precopy pass numbers,
QEMU's own downtime, and notes. It does no I/O; ``analysis.analyze.cli`` reads the files.

What QEMU says, and when
------------------------
QEMU reports a migration's state as ``MIGRATION`` events (``data.status``), only when the
``events`` migration capability is on, and as the ``status`` of ``query-migrate`` replies
(the recorder polls them). It also sends ``STOP`` and ``RESUME`` when the guest's vCPUs
stop and start, and ``MIGRATION_PASS`` (source only) at each dirty-bitmap sync. Every
event carries QEMU's ``timestamp``: the host's wall clock when QEMU emitted it. Each
boundary therefore prefers that timestamp and falls back to the recorder's receive time
``host_real_ns``; ``Boundary.clock`` says which (``qemu``, ``host``, or ``poll`` for a
status only seen in a ``query-migrate`` reply, which is an upper bound).

QEMU 7.2 on loopback, two bare machines (tests/fixtures/qmp), event order per endpoint,
with offsets from the source's ``setup`` for the postcopy run::

    postcopy   src: setup 0, PASS 1 +3.2ms, active +3.3ms, postcopy-active +907.6ms,
                    STOP +907.8ms, PASS 2 +907.9ms, completed +3.970s
               dst: setup -1.7ms (at migrate-incoming), active +2.2ms,
                    postcopy-active +911.2ms, RESUME +918.0ms, completed +3.968s
    precopy    src: setup, PASS 1, active, PASS 2, STOP, PASS 3, completed
               dst: setup, active, RESUME, completed (120us after RESUME)
    paused     src: ..., postcopy-active, STOP, PASS 2, postcopy-paused, postcopy-recover,
                    postcopy-active, completed
               dst: ..., postcopy-active, RESUME, postcopy-paused (95ms before the
                    source's), setup (at migrate-recover), postcopy-recover,
                    postcopy-active, completed
    cancelled  src: setup, PASS 1, active, cancelling, cancelled;  dst: setup, active, failed
    failed     src: setup, PASS 1, active, failed;  dst: setup, active (then it was killed)

How the endpoints' statuses combine
-----------------------------------
Each endpoint gets a role: ``source`` or ``destination`` from its name (``src``,
``source``; ``dst``, ``dest``, ``destination``, ``target``, ``incoming``), otherwise from
what it did (only a source sends ``MIGRATION_PASS`` or reports ``ram`` in
``query-migrate``; a destination reports ``socket-address``). Then, merging every status
report of every endpoint in time order:

1. The source leads what only it decides: ``setup``, ``active`` (precopy),
   ``pre-switchover``, ``device``, ``wait-unplug``, ``colo``, ``cancelling`` and
   ``cancelled``. The destination's own ``setup`` and ``active`` (it reports both as soon
   as ``migrate-incoming`` runs and the stream starts) are agreement, not boundaries.
2. The postcopy statuses (``postcopy-active``, ``-paused``, ``-recover-setup``,
   ``-recover``) start when the *first* endpoint reports them: a broken stream is often
   seen by the destination first, and the guest feels it from then on. QEMU before 9.1
   has no ``postcopy-recover-setup``: a destination reporting ``setup`` while paused (after
   ``migrate-recover``) is taken as ``postcopy-recover-setup``. A recovery goes
   ``postcopy-paused``, ``postcopy-recover-setup``, ``postcopy-recover``: an endpoint
   that reports one of them after the other endpoint has already moved past it in the
   same recovery (QEMU 9.1 and later report ``postcopy-recover-setup`` on either side)
   is agreement, never a step back.
3. ``completed`` and ``failed`` start at the first report that agrees with the source's own
   outcome; a destination outcome that differs (its ``failed`` while the source is
   ``cancelling`` then ``cancelled``) is a note, not a phase. Without a source, the
   destination's outcome stands.
4. A status no one knows yet is a phase of its own, named after the status, and noted.
5. Without any ``MIGRATION`` event from an endpoint (capability off, or the recorder
   started mid-migration), its ``query-migrate`` replies stand in: their statuses count
   until its first event.

The pause the guest feels is not a QEMU status: it runs from the source's ``STOP`` to the
first ``RESUME`` after it on any endpoint (the destination's when the guest moved; the
source's when the migration failed or was cancelled after the stop). It is a phase of its
own, named ``stop-and-copy`` in precopy and ``switchover`` when postcopy starts; its
length is the downtime. QEMU's ``downtime`` from ``query-migrate`` is kept in the phase's
details, but for postcopy it is not the pause the guest feels (2 ms against 10.25 ms
from STOP to RESUME in the run above). Around the pause:

6. QEMU sets ``postcopy-active`` on the source just before it stops the guest; that status
   takes effect at the ``RESUME``, so the guest is in precopy until the ``STOP``.
7. Statuses reported while the guest is stopped: ``postcopy-active`` renames the pause to
   ``switchover``; an outcome (``completed``, ``failed``, ``cancelled``) takes effect at the
   ``RESUME`` (or ends the pause when no ``RESUME`` was recorded at all); ``device`` as
   the first status of the pause is QEMU's own name for the stop-and-copy (QEMU 9.0 and
   later report it right after the ``STOP``, in precopy and at the postcopy switchover):
   the pause stays one phase, named as usual, whose details keep ``qemu_status`` and
   ``qemu_status_after_ns`` (its offset from the STOP); any other status
   (``pre-switchover``, ``device`` after it, ``cancelling``, unknown) splits the pause
   into phases named after it, each with ``vm_stopped`` set.
8. After a pause that handed the guest over (``RESUME`` on another endpoint than the
   ``STOP``), the source's ``active`` does not resume: the next status (``completed``)
   starts at the ``RESUME`` and a note says when it was reported. A ``STOP`` and a
   ``RESUME`` on the source alone, with no outcome between, is ``vm-stopped``: a pause,
   not a switchover.

``MIGRATION_PASS`` numbers go to the phase they fall in; pass 1 comes at the end of setup
and goes to the precopy phase that follows.

Worked example: the postcopy run above. Rules 1 and 6 make the source's ``active`` the
start of precopy and its ``STOP`` the end (its ``postcopy-active`` 211us earlier does not
count yet); the pause ends at the destination's ``RESUME``; rules 2 and 3 let both sides'
``completed`` agree, the destination's (1.2ms earlier) first. Offsets are from the first
record of either file::

    phase            start     duration  boundaries
    setup            +11.17ms  3.287ms   src MIGRATION setup
    precopy          +14.46ms  904.5ms   src MIGRATION active        pass 1
    switchover       +918.9ms  10.25ms   src STOP -> dst RESUME      pass 2, QEMU downtime 2ms
    postcopy-active  +929.2ms  3.05s     dst RESUME
    completed        +3.98s    -         dst+src MIGRATION completed

Records the builder cannot use are skips naming the record: an event without a QMP event
name (upper case, digits, underscores: an event named anything else is not QEMU's),
a record without a usable time (QEMU's ``timestamp`` or ``host_real_ns`` in (0, 2**63)
ns), a ``MIGRATION`` event without ``data.status``. Unknown statuses and events are kept.

``Timeline.phase_at(t)`` finds the phase holding a host realtime ``t`` (half-open
intervals; an open phase holds everything after its start). ``Timeline.summary()`` gives
the outcome, total time, downtime (the handover pauses), QEMU's own numbers, and each
endpoint's status sequence and final status.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from analysis.rundir.qmp import KNOWN_STATUSES, is_int, pair_stops, qemu_ns, receive_ns
from probe.durations import format_duration

#: Statuses that end a migration.
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

#: Statuses only the source decides; a destination reporting them is agreement.
SOURCE_LED_STATUSES = frozenset(
    {
        "setup",
        "active",
        "pre-switchover",
        "device",
        "wait-unplug",
        "colo",
        "cancelling",
        "cancelled",
    }
)

#: The postcopy statuses: the guest runs on the destination and faults pages in.
POSTCOPY_STATUSES = frozenset(
    {"postcopy-active", "postcopy-paused", "postcopy-recover-setup", "postcopy-recover"}
)

#: The statuses of a postcopy recovery, in order (rule 2).
RECOVERY_ORDER = ("postcopy-paused", "postcopy-recover-setup", "postcopy-recover")

#: ``query-migrate`` figures the summary reports.
QEMU_FIGURES = ("downtime", "total-time", "setup-time", "postcopy-blocktime", "error-desc")

#: Phase names that differ from the QEMU status they come from.
PHASE_NAMES = {"active": "precopy"}

#: Names of the pause phases.
STOP_AND_COPY = "stop-and-copy"
SWITCHOVER = "switchover"
VM_STOPPED = "vm-stopped"

Clock = Literal["qemu", "host", "poll"]
Role = Literal["source", "destination"]

_SOURCE_WORDS = frozenset({"src", "source"})
_DEST_WORDS = frozenset({"dst", "dest", "destination", "target", "incoming"})


def phase_name(status: str) -> str:
    """The phase name of a QEMU migration status (``active`` is ``precopy``)."""
    return PHASE_NAMES.get(status, status)


@dataclass(frozen=True)
class Boundary:
    """What marks the start or the end of a phase.

    :param what: the record behind it: ``MIGRATION completed``, ``STOP``, ``RESUME``,
        ``query-migrate active`` (a polled status).
    :param endpoints: the endpoints that reported it, earliest first (the first one's
        time is the boundary's).
    :param clock: ``qemu`` (QEMU's event timestamp), ``host`` (the recorder's receive
        time; the event had no usable timestamp) or ``poll`` (a ``query-migrate`` reply's
        receive time: the status began at or before it).
    """

    what: str
    endpoints: tuple[str, ...]
    clock: Clock

    def label(self) -> str:
        """E.g. ``src STOP`` or ``dst+src MIGRATION completed``."""
        return f"{'+'.join(self.endpoints)} {self.what}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"what": self.what, "endpoints": list(self.endpoints), "clock": self.clock}


@dataclass(frozen=True)
class Phase:
    """One phase of a migration, on the host's realtime clock.

    :param name: ``setup``, ``precopy``, ``stop-and-copy``, ``switchover``,
        ``postcopy-active``, ``postcopy-paused``, ``postcopy-recover-setup``,
        ``postcopy-recover``, ``completed``, ``failed``, ``cancelled``, ``vm-stopped``, or
        the name of any other status QEMU reported.
    :param start_ns: host CLOCK_REALTIME of the start.
    :param end_ns: host CLOCK_REALTIME of the end; None while the phase is open (an
        outcome, or the last phase of a recording that stopped mid-migration).
    :param start_by: what marks the start.
    :param end_by: what marks the end; None while open.
    :param status: the migration status the phase belongs to (for a pause: the status
        when the guest stopped).
    :param vm_stopped: the guest's vCPUs were stopped (a pause phase).
    :param passes: ``MIGRATION_PASS`` numbers that fell in the phase.
    :param details: numbers from QEMU (``qemu_downtime_ms``, ``qemu_setup_time_ms``, ...).
    :param notes: what else happened: other endpoints' reports, disagreements, monitors
        that closed or timed out.
    """

    name: str
    start_ns: int
    end_ns: int | None
    start_by: Boundary
    end_by: Boundary | None
    status: str | None
    vm_stopped: bool = False
    passes: tuple[int, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict, hash=False)
    notes: tuple[str, ...] = ()

    @property
    def duration_ns(self) -> int | None:
        """Length in ns, or None while open."""
        return None if self.end_ns is None else self.end_ns - self.start_ns

    @property
    def is_open(self) -> bool:
        """True when the phase has no end yet."""
        return self.end_ns is None

    def contains(self, t_ns: int) -> bool:
        """Whether host realtime ``t_ns`` falls in ``[start_ns, end_ns)``."""
        return self.start_ns <= t_ns and (self.end_ns is None or t_ns < self.end_ns)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "duration_ns": self.duration_ns,
            "start_by": self.start_by.to_dict(),
            "end_by": None if self.end_by is None else self.end_by.to_dict(),
            "status": self.status,
            "vm_stopped": self.vm_stopped,
            "passes": list(self.passes),
            "details": dict(self.details),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Pause:
    """A window in which the guest's vCPUs were stopped: source STOP to the next RESUME.

    :param name: ``stop-and-copy``, ``switchover`` or ``vm-stopped``.
    :param start_ns: the STOP's time.
    :param end_ns: the RESUME's time (or the outcome's, when no RESUME was recorded);
        None while open.
    :param stopped_by: the endpoint that sent STOP.
    :param resumed_by: the endpoint that sent RESUME, or None.
    :param handover: the guest resumed on another endpoint than the one that stopped it.
    """

    name: str
    start_ns: int
    end_ns: int | None
    stopped_by: str
    resumed_by: str | None
    handover: bool

    @property
    def duration_ns(self) -> int | None:
        """Length in ns, or None while open."""
        return None if self.end_ns is None else self.end_ns - self.start_ns

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "duration_ns": self.duration_ns,
            "stopped_by": self.stopped_by,
            "resumed_by": self.resumed_by,
            "handover": self.handover,
        }


@dataclass(frozen=True)
class Issue:
    """A record the builder passed over (``skip``) or wants to point at (``note``).

    :param endpoint: the endpoint whose records hold it.
    :param index: the record's position (0-based) in that endpoint's input; the reader
        maps it back to a file line.
    :param message: one line, e.g. ``MIGRATION event without data.status``.
    :param severity: ``skip`` (the record was not used) or ``note`` (used, but unusual,
        such as an unknown status).
    """

    endpoint: str
    index: int
    message: str
    severity: Literal["skip", "note"] = "skip"


@dataclass(frozen=True)
class Endpoint:
    """What one QMP endpoint contributed.

    :param name: the endpoint's name (``src`` for ``qmp-src.jsonl``).
    :param role: ``source``, ``destination`` or None when it could not be told.
    :param statuses: the migration statuses it reported, in time order, as reported
        (events, or polled replies before its first event), consecutive repeats removed.
    :param records: how many records it had (including skipped ones).
    :param closed: reasons of its ``closed`` records, in order.
    :param last_query_migrate: the last ``query-migrate`` reply's ``return``, or None.
    :param last_with: for each of ``QEMU_FIGURES``, the last ``query-migrate`` reply
        holding it (QEMU drops ``setup-time`` after a cancel, and ``downtime`` is only
        there once completed).
    """

    name: str
    role: Role | None
    statuses: tuple[str, ...]
    records: int
    closed: tuple[str, ...] = ()
    last_query_migrate: Mapping[str, Any] | None = field(default=None, hash=False)
    last_with: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)

    @property
    def final_status(self) -> str | None:
        """The last status it reported, or None."""
        return self.statuses[-1] if self.statuses else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "role": self.role,
            "statuses": list(self.statuses),
            "final_status": self.final_status,
            "records": self.records,
            "closed": list(self.closed),
            "last_query_migrate": (
                None if self.last_query_migrate is None else dict(self.last_query_migrate)
            ),
        }


@dataclass(frozen=True)
class Summary:
    """The migration at a glance.

    :param outcome: ``completed``, ``failed`` or ``cancelled`` when the last phase is an
        outcome, else None.
    :param total_ns: from the start of the first phase to the start of the outcome; None
        without an outcome.
    :param downtime_ns: the total of the pauses that handed the guest over (source STOP to
        destination RESUME); None when there was none.
    :param paused_ns: the total of every closed pause, handover or not; None without any.
    :param qemu_downtime_ms: ``downtime`` from the source's last ``query-migrate`` reply.
    :param qemu_total_time_ms: ``total-time`` from the same reply.
    :param qemu_setup_time_ms: ``setup-time`` from the same reply.
    :param postcopy_blocktime_ms: ``postcopy-blocktime`` from the destination's last reply.
    :param postcopy_vcpu_blocktime_ms: ``postcopy-vcpu-blocktime`` from the same reply.
    :param final_status: each endpoint's last reported status.
    :param statuses: each endpoint's status sequence.
    """

    outcome: str | None
    total_ns: int | None
    downtime_ns: int | None
    paused_ns: int | None
    qemu_downtime_ms: int | None
    qemu_total_time_ms: int | None
    qemu_setup_time_ms: int | None
    postcopy_blocktime_ms: int | None
    postcopy_vcpu_blocktime_ms: tuple[int, ...] | None
    final_status: Mapping[str, str | None] = field(hash=False)
    statuses: Mapping[str, tuple[str, ...]] = field(hash=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "outcome": self.outcome,
            "total_ns": self.total_ns,
            "downtime_ns": self.downtime_ns,
            "paused_ns": self.paused_ns,
            "qemu_downtime_ms": self.qemu_downtime_ms,
            "qemu_total_time_ms": self.qemu_total_time_ms,
            "qemu_setup_time_ms": self.qemu_setup_time_ms,
            "postcopy_blocktime_ms": self.postcopy_blocktime_ms,
            "postcopy_vcpu_blocktime_ms": (
                None
                if self.postcopy_vcpu_blocktime_ms is None
                else list(self.postcopy_vcpu_blocktime_ms)
            ),
            "final_status": dict(self.final_status),
            "statuses": {name: list(seq) for name, seq in self.statuses.items()},
        }


@dataclass(frozen=True)
class Timeline:
    """The phases of a run's migration(s) and what each endpoint said.

    :param phases: ordered, contiguous (each ends where the next starts), non-overlapping.
    :param pauses: the windows in which the guest was stopped, in order.
    :param endpoints: per endpoint, in input order.
    :param issues: records passed over or worth pointing at.
    :param origin_ns: the earliest time of any record (for offsets), or None without any.
    """

    phases: tuple[Phase, ...]
    pauses: tuple[Pause, ...]
    endpoints: tuple[Endpoint, ...]
    issues: tuple[Issue, ...]
    origin_ns: int | None

    def phase_at(self, t_ns: int) -> Phase | None:
        """The phase holding host realtime ``t_ns``.

        :param t_ns: a host CLOCK_REALTIME reading in ns.
        :return: the phase with ``start_ns <= t_ns < end_ns`` (an open phase holds every
            later time), or None before the first phase or without phases.
        """
        for phase in self.phases:
            if phase.contains(t_ns):
                return phase
        return None

    def endpoint(self, name: str) -> Endpoint:
        """The endpoint called ``name``.

        :raise KeyError: when there is none.
        """
        for ep in self.endpoints:
            if ep.name == name:
                return ep
        raise KeyError(name)

    def statuses(self, endpoint: str) -> list[str]:
        """The status sequence an endpoint reported (``[]`` for an unknown endpoint)."""
        for ep in self.endpoints:
            if ep.name == endpoint:
                return list(ep.statuses)
        return []

    def final_status(self, endpoint: str) -> str | None:
        """The last status an endpoint reported, or None."""
        seq = self.statuses(endpoint)
        return seq[-1] if seq else None

    def names(self) -> list[str]:
        """The phase names in order (handy in tests and logs)."""
        return [p.name for p in self.phases]

    @property
    def skipped(self) -> tuple[Issue, ...]:
        """The issues that are skipped records."""
        return tuple(i for i in self.issues if i.severity == "skip")

    def summary(self) -> Summary:
        """The outcome, total time, downtime and QEMU's own figures."""
        outcome = None
        total = None
        if self.phases and self.phases[-1].name in TERMINAL_STATUSES:
            outcome = self.phases[-1].name
            total = self.phases[-1].start_ns - self.phases[0].start_ns
        handovers = [p.duration_ns for p in self.pauses if p.handover and p.duration_ns is not None]
        closed = [p.duration_ns for p in self.pauses if p.duration_ns is not None]
        src = _last_reply_with(self.endpoints, "source", "downtime")
        setup = _last_reply_with(self.endpoints, "source", "setup-time")
        dst = _last_reply_with(self.endpoints, "destination", "postcopy-blocktime")
        vcpu = None if dst is None else dst.get("postcopy-vcpu-blocktime")
        return Summary(
            outcome=outcome,
            total_ns=total,
            downtime_ns=sum(handovers) if handovers else None,
            paused_ns=sum(closed) if closed else None,
            qemu_downtime_ms=_int_or_none(src, "downtime"),
            qemu_total_time_ms=_int_or_none(src, "total-time"),
            qemu_setup_time_ms=_int_or_none(setup, "setup-time"),
            postcopy_blocktime_ms=_int_or_none(dst, "postcopy-blocktime"),
            postcopy_vcpu_blocktime_ms=(
                tuple(v for v in vcpu if isinstance(v, int)) if isinstance(vcpu, list) else None
            ),
            final_status={ep.name: ep.final_status for ep in self.endpoints},
            statuses={ep.name: ep.statuses for ep in self.endpoints},
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (phases, pauses, summary, endpoints)."""
        return {
            "origin_ns": self.origin_ns,
            "phases": [p.to_dict() for p in self.phases],
            "pauses": [p.to_dict() for p in self.pauses],
            "summary": self.summary().to_dict(),
            "endpoints": [ep.to_dict() for ep in self.endpoints],
        }


def _int_or_none(obj: Mapping[str, Any] | None, key: str) -> int | None:
    if obj is None:
        return None
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _last_reply_with(
    endpoints: Iterable[Endpoint], role: Role, key: str
) -> Mapping[str, Any] | None:
    """The last ``query-migrate`` reply holding ``key`` among endpoints of ``role``."""
    found = None
    for ep in endpoints:
        if ep.role == role and key in ep.last_with:
            found = ep.last_with[key]
    return found


# --------------------------------------------------------------------------- parsing


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
    issues: list[Issue] = field(default_factory=list)
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


def _parse_endpoint(name: str, order: int, records: Iterable[Any]) -> _Parsed:
    ep = _Parsed(name, order)
    for index, rec in enumerate(records):
        ep.records += 1

        def skip(message: str, index: int = index) -> None:
            ep.issues.append(Issue(name, index, message))

        if not isinstance(rec, Mapping):
            skip(f"expected a JSON object, got {type(rec).__name__}")
            continue
        kind = rec.get("type")
        if not isinstance(kind, str) or not kind:
            skip("record without a 'type'")
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
                Issue(ep.name, index, f"{name}: unusable QEMU timestamp, using the host's", "note")
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
        if not is_int(number):
            skip("MIGRATION_PASS event without an integer data.pass")
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
    ep.issues.append(Issue(ep.name, index, message, "note"))


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


# --------------------------------------------------------------------------- combining


@dataclass(frozen=True)
class _Transition:
    """The combined status changes to ``status`` at ``mark``."""

    mark: _Mark
    status: str
    reported: str  # as the endpoint reported it (``setup`` for recover-setup before 9.1)
    via: Literal["event", "poll"]
    seq: int
    also: list[str] = field(default_factory=list, compare=False)  # agreeing endpoints


def _combine(
    reports: list[_Report], sources: frozenset[str]
) -> tuple[list[_Transition], list[tuple[int, str]]]:
    """Rules 1 to 5 of the module docstring: the combined status changes and notes."""
    reports = sorted(reports, key=_report_key)
    source_outcomes = [
        r for r in reports if r.mark.endpoint in sources and r.status in TERMINAL_STATUSES
    ]
    out: list[_Transition] = []
    notes: list[tuple[int, str]] = []
    cur: str | None = None
    for rep in reports:
        status = rep.status
        ep = rep.mark.endpoint
        leads = ep in sources
        if status == "none":
            continue
        if not leads and status == "setup" and cur == "postcopy-paused":
            status = "postcopy-recover-setup"
        if status == cur:
            last = out[-1]
            if ep != last.mark.endpoint and ep not in last.also:
                last.also.append(ep)
            continue
        if (
            status in RECOVERY_ORDER
            and cur in RECOVERY_ORDER
            and RECOVERY_ORDER.index(status) < RECOVERY_ORDER.index(cur)
        ):
            # an endpoint catching up with a recovery the other one moved on in
            agreed = next((t for t in reversed(out) if t.status == status), None)
            if agreed is not None and ep != agreed.mark.endpoint and ep not in agreed.also:
                agreed.also.append(ep)
            continue
        if cur in TERMINAL_STATUSES and not leads:
            if status in TERMINAL_STATUSES:
                notes.append((rep.mark.t, f"{ep} reported {status} after the migration {cur}"))
            continue
        if status in SOURCE_LED_STATUSES and not leads:
            continue
        if status in TERMINAL_STATUSES and not leads:
            later = next((o for o in source_outcomes if o.mark.t >= rep.mark.t), None)
            if later is not None and later.status != status:
                notes.append(
                    (rep.mark.t, f"{ep} reported {status}; the source went on to {later.status}")
                )
                continue
        out.append(_Transition(rep.mark, status, rep.status, rep.via, len(out)))
        cur = status
    return out, notes


@dataclass
class _PauseWindow:
    stop: _Mark
    resume: _Mark | None


def _status_at(transitions: list[_Transition], t: int) -> str | None:
    cur = None
    for tr in transitions:
        if tr.mark.t > t:
            break
        cur = tr.status
    return cur


def _pauses(
    stops: list[_Mark],
    resumes: list[_Mark],
    transitions: list[_Transition],
) -> tuple[list[_PauseWindow], list[_Mark]]:
    """Pair each source STOP during a migration with its RESUME (the STOP -> RESUME rule
    of ``analysis.rundir.qmp.pair_stops``); orphan RESUMEs from the migration's start on."""
    during = [
        stop
        for stop in sorted(stops, key=_mark_key)
        # postcopy-active is set just before the STOP: look at the status before it too
        if _status_at(transitions, stop.t) not in (None, *TERMINAL_STATUSES)
    ]
    pairs, unused = pair_stops(during, sorted(resumes, key=_mark_key), lambda m: m.t)
    windows = [_PauseWindow(stop, resume) for stop, resume in pairs]
    first = transitions[0].mark.t if transitions else None
    orphans = [r for r in unused if first is not None and r.t >= first]
    return windows, orphans


@dataclass
class _PhaseBuilder:
    name: str
    start: int
    start_by: Boundary
    status: str | None
    vm_stopped: bool = False
    end: int | None = None
    end_by: Boundary | None = None
    passes: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pause: int | None = None  # index into the pause list when this is a pause phase

    def freeze(self) -> Phase:
        return Phase(
            name=self.name,
            start_ns=self.start,
            end_ns=self.end,
            start_by=self.start_by,
            end_by=self.end_by,
            status=self.status,
            vm_stopped=self.vm_stopped,
            passes=tuple(self.passes),
            details=dict(self.details),
            notes=tuple(self.notes),
        )


def _boundary_of(tr: _Transition) -> Boundary:
    what = f"MIGRATION {tr.reported}" if tr.via == "event" else f"query-migrate {tr.reported}"
    return Boundary(what, (tr.mark.endpoint, *tr.also), tr.mark.clock)


def _mark_boundary(mark: _Mark, what: str) -> Boundary:
    return Boundary(what, (mark.endpoint,), mark.clock)


def _ago(delta_ns: int) -> str:
    """``1.2ms before`` / ``120us after`` for a signed offset."""
    if delta_ns < 0:
        return f"{format_duration(-delta_ns)} before"
    return f"{format_duration(delta_ns)} after"


class _Walker:
    """Rules 6 to 8: lay the pauses over the combined status changes."""

    def __init__(
        self,
        transitions: list[_Transition],
        windows: list[_PauseWindow],
        sources: frozenset[str],
    ) -> None:
        self.transitions = transitions
        self.windows = windows
        self.sources = sources
        self.phases: list[_PhaseBuilder] = []
        self.pauses: list[Pause] = []
        self.cur: str | None = None
        self.pause: int | None = None  # index into windows
        self.pending: list[_Transition] = []
        self.consumed: set[int] = set()
        self.switchover_ahead = False
        # (time, kind order, seq, kind, index): status changes before STOPs before RESUMEs
        self.items: list[tuple[int, int, int, str, int]] = []

    def run(self) -> None:
        """Walk the status changes and pauses in time order, building the phases."""
        items = self.items
        for i, tr in enumerate(self.transitions):
            items.append((tr.mark.t, 0, i, "T", i))
        for i, win in enumerate(self.windows):
            items.append((win.stop.t, 1, i, "S", i))
            if win.resume is not None:
                items.append((win.resume.t, 2, i, "R", i))
        items.sort()
        for pos, (_, _, _, kind, idx) in enumerate(items):
            if kind == "T":
                self._transition(pos, self.transitions[idx])
            elif kind == "S":
                self._stop(idx)
            else:
                self._resume(idx)

    # -- helpers
    def _close(self, t: int, by: Boundary) -> None:
        if self.phases and self.phases[-1].end is None:
            self.phases[-1].end = t
            self.phases[-1].end_by = by

    def _open(
        self,
        name: str,
        t: int,
        by: Boundary,
        status: str | None,
        vm_stopped: bool = False,
        pause: int | None = None,
    ) -> _PhaseBuilder:
        self._close(t, by)
        ph = _PhaseBuilder(name, t, by, status, vm_stopped, pause=pause)
        self.phases.append(ph)
        return ph

    def _next_stop_before_transition(self, pos: int) -> bool:
        for _, _, _, kind, _ in self.items[pos + 1 :]:
            if kind == "S":
                return True
            if kind == "T":
                return False
        return False

    def _pause_name(self, idx: int) -> str:
        """The name of the first phase of pause ``idx`` (later ones are splits)."""
        return next((ph.name for ph in self.phases if ph.pause == idx), STOP_AND_COPY)

    def _end_pause(self, t: int | None, resumed_by: str | None, handover: bool) -> None:
        assert self.pause is not None
        win = self.windows[self.pause]
        name = self._pause_name(self.pause)
        self.pauses.append(Pause(name, win.stop.t, t, win.stop.endpoint, resumed_by, handover))
        self.pause = None

    # -- the three kinds of items
    def _transition(self, pos: int, tr: _Transition) -> None:
        if tr.seq in self.consumed:
            return
        by = _boundary_of(tr)
        if self.pause is not None:
            current = self.phases[-1]
            win = self.windows[self.pause]
            if tr.status in TERMINAL_STATUSES:
                if win.resume is None:
                    current.notes.append(
                        f"no RESUME recorded: the pause ends at {tr.mark.endpoint}'s {tr.status}"
                    )
                    self._end_pause(tr.mark.t, None, False)
                    self._open(phase_name(tr.status), tr.mark.t, by, tr.status)
                    self.cur = tr.status
                else:
                    self.pending.append(tr)
                    current.notes.append(
                        f"{tr.mark.endpoint} reported {tr.status} "
                        f"{_ago(tr.mark.t - current.start)} the phase start, guest still stopped"
                    )
                return
            if tr.status in POSTCOPY_STATUSES:
                self.pending.append(tr)
                if current.name == STOP_AND_COPY:
                    current.name = SWITCHOVER
                current.notes.append(
                    f"{tr.mark.endpoint} reported {tr.status} "
                    f"{_ago(tr.mark.t - current.start)} the phase start"
                )
                return
            if tr.status == "device" and current.name in (STOP_AND_COPY, SWITCHOVER):
                # QEMU 9.0+: the stop-and-copy itself, reported right after the STOP
                current.details["qemu_status"] = tr.status
                current.details["qemu_status_after_ns"] = tr.mark.t - current.start
                current.notes.append(
                    f"{tr.mark.endpoint} reported device {_ago(tr.mark.t - current.start)} "
                    "the phase start (QEMU's stop-and-copy)"
                )
                return
            # pre-switchover, device after it, cancelling, unknown: split the pause
            self._open(phase_name(tr.status), tr.mark.t, by, tr.status, True, self.pause)
            self.cur = tr.status
            return
        if (
            tr.status == "postcopy-active"
            and self.cur not in POSTCOPY_STATUSES
            and tr.mark.endpoint in self.sources
            and self._next_stop_before_transition(pos)
        ):
            # rule 6: QEMU sets postcopy-active, then stops the guest
            self.pending.append(tr)
            self.switchover_ahead = True
            return
        self._open(phase_name(tr.status), tr.mark.t, by, tr.status)
        self.cur = tr.status

    def _stop(self, idx: int) -> None:
        if self.pause is not None:
            return
        win = self.windows[idx]
        postcopy = self.switchover_ahead or self.cur in POSTCOPY_STATUSES
        name = SWITCHOVER if postcopy else STOP_AND_COPY
        ph = self._open(name, win.stop.t, _mark_boundary(win.stop, "STOP"), self.cur, True, idx)
        self.pause = idx
        self.switchover_ahead = False
        for tr in self.pending:
            ph.notes.append(
                f"{tr.mark.endpoint} reported {tr.status} {_ago(tr.mark.t - win.stop.t)} STOP"
            )

    def _resume(self, idx: int) -> None:
        if self.pause != idx:
            return
        win = self.windows[idx]
        resume = win.resume
        assert resume is not None
        by = _mark_boundary(resume, "RESUME")
        handover = resume.endpoint != win.stop.endpoint and resume.endpoint not in self.sources
        pending, self.pending = self.pending, []
        pause_phase = self.phases[-1]
        outcome = next((tr for tr in reversed(pending) if tr.status in TERMINAL_STATUSES), None)
        if not handover and outcome is None and not pending:
            # a stop and a cont on the source: not a switchover
            for ph in self.phases:
                if ph.pause == idx and ph.name in (STOP_AND_COPY, SWITCHOVER):
                    ph.name = VM_STOPPED
                    ph.notes.append(f"stopped and resumed on {resume.endpoint}: not a switchover")
        if not handover and outcome is not None:
            pause_phase.notes.append(f"guest resumed on {resume.endpoint}")
        self._end_pause(resume.t, resume.endpoint, handover)
        if pending:
            eff = outcome or pending[-1]
            ph = self._open(phase_name(eff.status), resume.t, by, eff.status)
            ph.notes.append(
                f"{eff.mark.endpoint} reported {eff.status} {_ago(eff.mark.t - resume.t)} RESUME"
            )
            self.cur = eff.status
            return
        if handover and self.cur not in POSTCOPY_STATUSES:
            # rule 8: the precopy does not resume after the guest moved
            nxt = next(
                (
                    tr
                    for tr in self.transitions
                    if tr.mark.t >= resume.t and tr.seq not in self.consumed
                ),
                None,
            )
            if nxt is not None:
                self.consumed.add(nxt.seq)
                ph = self._open(phase_name(nxt.status), resume.t, by, nxt.status)
                ago = _ago(nxt.mark.t - resume.t)
                ph.notes.append(f"{nxt.mark.endpoint} reported {nxt.status} {ago} RESUME")
                self.cur = nxt.status
                return
            ph = self._open(phase_name(self.cur or "active"), resume.t, by, self.cur)
            ph.notes.append(
                f"guest running on {resume.endpoint}; no status reported since the RESUME"
            )
            return
        self._open(phase_name(self.cur or "active"), resume.t, by, self.cur)


# --------------------------------------------------------------------------- assembly


def build_timeline(records_by_endpoint: Mapping[str, Iterable[Any]]) -> Timeline:
    """Rebuild a migration's phases from the QMP records of all its endpoints.

    Pure: no I/O, no clock. The rules are in the module docstring. Records may come in
    any order, within and across endpoints; they are ordered by their times.

    :param records_by_endpoint: endpoint name -> its decoded records (``qmp-NAME.jsonl``
        in file order). Records that are not objects, lack ``type``, or lack what their
        type needs are skipped and reported in ``Timeline.issues`` with their position;
        unknown record types and events are ignored.
    :return: the timeline (empty phases when no migration status was recorded).
    """
    parsed = [
        _parse_endpoint(name, order, records)
        for order, (name, records) in enumerate(records_by_endpoint.items())
    ]
    roles = {ep.name: _role_of(ep) for ep in parsed}
    sources = frozenset(n for n, r in roles.items() if r == "source") or frozenset(roles)
    for ep in parsed:  # at equal times, a source's record comes first
        ep.set_order(ep.order + (0 if ep.name in sources else len(parsed)))
    per_ep_reports = {ep.name: ep.reports() for ep in parsed}
    reports = [r for ep in parsed for r in per_ep_reports[ep.name]]
    transitions, notes = _combine(reports, sources)

    stops = [m for ep in parsed if ep.name in sources for m in ep.stops]
    resumes = [m for ep in parsed for m in ep.resumes]
    windows, orphans = _pauses(stops, resumes, transitions)

    walker = _Walker(transitions, windows, sources)
    walker.run()
    if walker.pause is not None:  # the recording ended with the guest stopped
        walker._end_pause(None, None, False)
    builders = walker.phases

    _attach_passes(builders, [p for ep in parsed if ep.name in sources for p in ep.passes])
    _attach_qemu(builders, parsed, sources)
    for resume in orphans:
        notes.append((resume.t, f"{resume.endpoint}: RESUME without a recorded STOP"))
    for ep in parsed:
        for t, reason in ep.closed:
            notes.append((t, f"{ep.name}: monitor closed ({reason})"))
        counts: dict[tuple[int, str], int] = {}
        for t, what in ep.failures:
            ph = _index_at(builders, t)
            counts[(ph, what)] = counts.get((ph, what), 0) + 1
        for (ph_idx, what), n in sorted(counts.items()):
            if ph_idx >= 0:
                builders[ph_idx].notes.append(f"{ep.name}: {n} x {what}")
    for t, text in sorted(notes):
        idx = _index_at(builders, t)
        if idx >= 0:
            builders[idx].notes.append(text)

    endpoints = tuple(
        Endpoint(
            name=ep.name,
            role=roles[ep.name],
            statuses=tuple(_dedupe(r.status for r in per_ep_reports[ep.name])),
            records=ep.records,
            closed=tuple(reason for _, reason in sorted(ep.closed)),
            last_query_migrate=(
                max(ep.migrate_replies, key=lambda x: x[0])[1] if ep.migrate_replies else None
            ),
            last_with=_last_with(ep.migrate_replies),
        )
        for ep in parsed
    )
    all_times = [t for ep in parsed for t in ep.times]
    issues = tuple(i for ep in parsed for i in ep.issues)
    return Timeline(
        phases=tuple(b.freeze() for b in builders),
        pauses=tuple(walker.pauses),
        endpoints=endpoints,
        issues=issues,
        origin_ns=min(all_times) if all_times else None,
    )


def _last_with(replies: list[tuple[int, dict[str, Any]]]) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for _, ret in sorted(replies, key=lambda x: x[0]):
        for key in QEMU_FIGURES:
            if key in ret:
                out[key] = ret
    return out


def _dedupe(seq: Iterable[str]) -> list[str]:
    out: list[str] = []
    for item in seq:
        if not out or out[-1] != item:
            out.append(item)
    return out


def _index_at(builders: list[_PhaseBuilder], t: int) -> int:
    """The phase holding ``t``; the first phase for earlier times; -1 without phases."""
    if not builders:
        return -1
    for i, ph in enumerate(builders):
        if ph.start <= t and (ph.end is None or t < ph.end):
            return i
    return 0 if t < builders[0].start else len(builders) - 1


def _attach_passes(builders: list[_PhaseBuilder], passes: list[tuple[_Mark, int]]) -> None:
    for mark, number in sorted(passes, key=lambda p: _mark_key(p[0])):
        idx = _index_at(builders, mark.t)
        if idx < 0:
            continue
        if builders[idx].name == "setup" and idx + 1 < len(builders):
            idx += 1  # pass 1 is the bitmap sync at the end of setup
        if number not in builders[idx].passes:  # not again from a second source monitor
            builders[idx].passes.append(number)


def _attach_qemu(
    builders: list[_PhaseBuilder],
    parsed: list[_Parsed],
    sources: frozenset[str],
) -> None:
    """QEMU's own figures: setup-time on the setup phase, downtime on the last handover
    pause, each endpoint's error-desc on a failed phase."""
    figures: dict[str, Mapping[str, Any]] = {}
    errors: dict[str, str] = {}
    for ep in parsed:
        last = _last_with(ep.migrate_replies)
        if ep.name in sources:
            figures.update(last)
        if "error-desc" in last and last["error-desc"].get("status") == "failed":
            errors[ep.name] = str(last["error-desc"]["error-desc"])
    setups = [ph for ph in builders if ph.name == "setup"]
    setup_time = figures.get("setup-time", {}).get("setup-time")
    if is_int(setup_time) and setups:
        setups[-1].details["qemu_setup_time_ms"] = setup_time
    downtime = figures.get("downtime", {}).get("downtime")
    handover = [
        ph for ph in builders if ph.name in (STOP_AND_COPY, SWITCHOVER) and ph.pause is not None
    ]
    if is_int(downtime) and handover:
        target = handover[-1]
        target.details["qemu_downtime_ms"] = downtime
        if target.name == SWITCHOVER:
            target.notes.append(
                "QEMU's downtime for postcopy is not the pause the guest feels "
                "(source STOP to destination RESUME)"
            )
    failed = [ph for ph in builders if ph.name == "failed"]
    if errors and failed:
        failed[-1].details["qemu_error"] = errors
