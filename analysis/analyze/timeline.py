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
name (upper case, digits, underscores: an event named anything else is not QEMU's), a
record whose ``type`` is not a record type's name (lower case, digits, ``_`` and ``-``,
at most 64: the recorder's types and any later one), a record without a usable time
(QEMU's ``timestamp`` or ``host_real_ns`` in (0, 2**63) ns), a ``MIGRATION`` event
without ``data.status``, a ``MIGRATION_PASS`` whose ``data.pass`` is not a QAPI ``int``
in [0, 2**63). Unknown statuses, events and record types are kept.

``Timeline.phase_at(t)`` finds the phase holding a host realtime ``t`` (half-open
intervals; an open phase holds everything after its start). ``Timeline.summary()`` gives
the outcome, total time, downtime (the handover pauses), QEMU's own numbers, and each
endpoint's status sequence and final status.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from analysis.analyze.timeline_model import (
    POSTCOPY_STATUSES,
    QEMU_FIGURES,
    RECOVERY_ORDER,
    SOURCE_LED_STATUSES,
    STOP_AND_COPY,
    SWITCHOVER,
    TERMINAL_STATUSES,
    VM_STOPPED,
    Boundary,
    Endpoint,
    Pause,
    Phase,
    Timeline,
    phase_name,
)
from analysis.analyze.timeline_parse import (
    _Mark,
    _mark_key,
    _parse_endpoint,
    _Parsed,
    _Report,
    _report_key,
    _role_of,
)
from analysis.rundir.qmp import is_int, pair_stops
from probe.durations import format_duration

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
