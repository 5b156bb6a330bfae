"""The timeline's model: migration phases, pauses and what each QMP endpoint said.

``Timeline`` is what ``analysis.analyze.timeline.build_timeline`` returns (the rules that
make it are in that module's docstring): ``Phase`` objects, ordered and gap-free, each
with the ``Boundary`` that started and ended it; the ``Pause`` windows in which the guest
was stopped (the STOP -> RESUME rule of ``analysis.rundir.qmp``); per endpoint its role and
status sequence (``Endpoint``); the records passed over or noted (``RecordIssue``, by
endpoint and record index, which ``timeline_io`` maps to the file and line of the one
``Issue`` type); and ``Summary``: the outcome, downtime and QEMU's own figures. All are
frozen dataclasses with a ``to_dict`` for JSON; times are host realtime in ns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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
class RecordIssue:
    """A record the builder passed over (``skip``) or wants to point at (``note``), by its
    place in the builder's input; ``analysis.analyze.timeline_io`` maps it to the file and
    line of an ``Issue`` (``probe.events.Issue``, the one type readers report).

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
    issues: tuple[RecordIssue, ...]
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
    def skipped(self) -> tuple[RecordIssue, ...]:
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
