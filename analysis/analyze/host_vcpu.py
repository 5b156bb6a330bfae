"""Host truth per vCPU joined to the guest: what each vCPU thread did in each phase and
during each guest stall.

Input: the run's ``vcpu-states.jsonl`` (``loader.VcpuInterval``: run-length intervals of
each vCPU thread's host state, on the recording host's CLOCK_MONOTONIC), the phases and the
placed stalls of ``analysis.analyze.attribution`` (host CLOCK_REALTIME), and QEMU's stop windows.
``join`` is pure: it reads nothing.

Clocks. Phases, stalls and stop windows are on the host's realtime clock (QEMU's event
timestamps, and the alignment of guest times to the host); vCPU intervals are on its
monotonic clock. ``HostClock`` maps one to the other with the realtime-minus-monotonic
of the nearest pair the recording host read together: every QMP record's
``host_real_ns``/``host_mono_ns`` (not those whose monotonic time was estimated,
``host_mono_from_real``) and every interval's start and end. While realtime is not
stepped every pair agrees; after a step, each time maps with the pair nearest to it.

Which QEMU ran the guest (``runner_pieces``). The source (the endpoint whose role is
``source``, else meta.json's ``source_endpoint``) until a pause that handed the guest
over (``Timeline.pauses``, ``handover``) ended with a RESUME on another endpoint, then
that endpoint, and so on. Without phases: the only endpoint with host truth, when there
is one. The guest's CPU n is QEMU's vCPU n (x86 guests without CPU hotplug number their
CPUs in QEMU's cpu-index order). The *guest's vCPU n* is the runner's vCPU n: its
intervals within each runner piece.

Per phase x endpoint x vCPU (``PhaseStates``): the time of the phase covered by that
vCPU thread's intervals in each state, each interval clipped to the phase; every endpoint
with an interval in the phase gets rows (the destination's vCPUs exist, halted or
stopped, before the switchover), ``ran_guest`` marks the endpoint that ran the guest for
most of the phase; ``unsampled_ns`` is the phase time no interval covers.

Per stall (``StallHost``): the stall's host interval, mapped to monotonic, over the guest's
vCPU n: time per state; ``cause`` is the state other than ``running`` with the most time
(ties in the order of ``CAUSE_ORDER``: userfault, lock-wait, stopped, runnable, halted,
other), or ``running`` when the thread ran longer than it spent in any other state (the
host gave it a CPU: the stall was the guest's own doing), or None when no interval covers
the stall. ``others``: the other vCPUs' dominant states over the same stall. ``text`` says
it in plain words, the guest's own cause hint kept beside it.

Validation (``Comparison``), per phase x vCPU: the guest's stalled time (``LaneStats.
stalled_ns``: stop windows left out) against the host's *blocked* time of the guest's vCPU
(``BLOCKED``: userfault, lock-wait, stopped) in the phase, with QEMU's stop windows left
out the same way. Consecutive blocked intervals form a run (gaps up to one poll period
bridged); runs shorter than the guest's stall threshold are not counted, because the
guest cannot record them. Tolerance: 10 % of the host's figure + 5 ms + the stalls'
alignment error bound + two poll periods per run counted (each run's start and end are
each late by up to one poll period). ``ok`` is None (not measurable) when the host's
intervals cover less than ``MIN_COVERAGE`` of the phase.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from analysis import rundir
from analysis.analyze.load import Run
from analysis.analyze.timeline_model import Timeline
from analysis.rundir.guest_reader import CAUSES
from analysis.rundir.qmp import StopWindow
from analysis.rundir.vcpu_states import VcpuInterval
from probe.durations import format_duration

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]

STATES: tuple[str, ...] = tuple(rundir.VCPU_STATE_NAMES)
_CODE = {name: i for i, name in enumerate(STATES)}
#: States in which the vCPU thread could not run guest code for reasons of the host.
BLOCKED = ("userfault", "lock-wait", "stopped")
#: Tie order of a stall's cause (most telling first).
CAUSE_ORDER = ("userfault", "lock-wait", "stopped", "runnable", "halted", "other", "running")
#: Plain words for each state, after "its vCPU thread" or "vCPU 0".
STATE_WORDS = {
    "running": "was running on a host CPU",
    "runnable": "waited for a host CPU (steal)",
    "userfault": "was blocked on a missing page",
    "lock-wait": "waited on a QEMU lock",
    "halted": "was halted (idle, waiting for an interrupt)",
    "stopped": "was stopped (SIGSTOP, a freezer, or QEMU's stop)",
    "other": "was blocked in the host kernel",
}
#: Default poll period of the sampler when meta.json does not give it.
DEFAULT_POLL_NS = 10_000_000
#: Default guest stall threshold when the agent's config is unknown.
DEFAULT_THRESHOLD_NS = 2_000_000
#: A comparison needs the host's intervals to cover this much of the phase.
MIN_COVERAGE = 0.9


@dataclass(frozen=True)
class HostClock:
    """Host realtime <-> monotonic (see the module docstring).

    :param real: realtime of each pair; ``mono`` monotonic of the same pair.
    """

    real: I64
    mono: I64

    @classmethod
    def build(cls, run: Run) -> HostClock:
        """The pairs of a run: QMP records and vCPU intervals."""
        reals: list[int] = []
        monos: list[int] = []
        for records in run.qmp.values():
            for rec in records:
                real, mono = rec.get("host_real_ns"), rec.get("host_mono_ns")
                known = not rec.get("host_mono_from_real")
                if isinstance(real, int) and isinstance(mono, int) and known:
                    reals.append(real)
                    monos.append(mono)
        for iv in run.vcpu_states:
            reals += [iv.start_real_ns, iv.end_real_ns]
            monos += [iv.start_mono_ns, iv.end_mono_ns]
        return cls(np.array(reals, dtype=np.int64), np.array(monos, dtype=np.int64))

    @staticmethod
    def _nearest(keys: I64, offsets: I64, t: I64) -> I64:
        order = np.argsort(keys, kind="stable")
        keys, offsets = keys[order], offsets[order]
        j = np.clip(np.searchsorted(keys, t), 0, len(keys) - 1)
        k = np.maximum(j - 1, 0)
        nearer = np.abs(keys[k] - t) < np.abs(keys[j] - t)
        return np.asarray(np.where(nearer, offsets[k], offsets[j]), dtype=np.int64)

    def to_mono(self, real: I64) -> I64:
        """Host realtime values to host monotonic."""
        real = np.asarray(real, dtype=np.int64)
        if not len(self.real):
            return real
        return np.asarray(real - self._nearest(self.real, self.real - self.mono, real), np.int64)

    def to_real(self, mono: I64) -> I64:
        """Host monotonic values to host realtime."""
        mono = np.asarray(mono, dtype=np.int64)
        if not len(self.mono):
            return mono
        return np.asarray(mono + self._nearest(self.mono, self.real - self.mono, mono), np.int64)


@dataclass
class Track:
    """One vCPU's intervals as sorted, non-overlapping columns (monotonic ns)."""

    start: I64
    end: I64
    state: I32
    tid: I64

    @classmethod
    def of(cls, intervals: Sequence[VcpuInterval]) -> Track:
        """Columns of intervals already sorted by start (``loader.read_vcpu_states``)."""
        return cls(
            np.array([iv.start_mono_ns for iv in intervals], dtype=np.int64),
            np.array([iv.end_mono_ns for iv in intervals], dtype=np.int64),
            np.array([_CODE[iv.state] for iv in intervals], dtype=np.int32),
            np.array([iv.tid for iv in intervals], dtype=np.int64),
        )

    def clip(self, lo: int, hi: int) -> Track:
        """The intervals cut to ``[lo, hi)``."""
        keep = (self.end > lo) & (self.start < hi)
        return Track(
            np.maximum(self.start[keep], lo),
            np.minimum(self.end[keep], hi),
            self.state[keep],
            self.tid[keep],
        )

    @staticmethod
    def concat(tracks: Sequence[Track]) -> Track:
        """Tracks of disjoint, increasing time ranges, joined."""
        if not tracks:
            return Track.of([])
        return Track(
            np.concatenate([t.start for t in tracks]),
            np.concatenate([t.end for t in tracks]),
            np.concatenate([t.state for t in tracks]),
            np.concatenate([t.tid for t in tracks]),
        )

    def time_in(self, lo: I64, hi: I64) -> I64:
        """Time in each state over each window ``[lo[i], hi[i])``: an (n_states, n) array."""
        return self._before(np.asarray(hi, np.int64)) - self._before(np.asarray(lo, np.int64))

    def _before(self, t: I64) -> I64:
        """Per state, the time of the intervals before each ``t``: (n_states, len(t))."""
        n = len(self.start)
        out = np.zeros((len(STATES), len(t)), dtype=np.int64)
        if not n or not len(t):
            return out
        length = self.end - self.start
        cum = np.zeros((len(STATES), n + 1), dtype=np.int64)
        for s in range(len(STATES)):
            cum[s, 1:] = np.cumsum(np.where(self.state == s, length, 0))
        k = np.searchsorted(self.start, t, side="right") - 1  # the interval starting <= t
        inside = k >= 0
        kk = np.maximum(k, 0)
        partial = np.where(inside, np.clip(t - self.start[kk], 0, length[kk]), 0)
        for s in range(len(STATES)):
            out[s] = np.where(inside, cum[s, kk], 0) + np.where(self.state[kk] == s, partial, 0)
        return out


@dataclass(frozen=True)
class PhaseStates:
    """Time per host state of one vCPU thread of one endpoint in one phase (ns)."""

    phase: int
    endpoint: str
    vcpu: int
    state_ns: Mapping[str, int]
    unsampled_ns: int
    ran_guest: bool


@dataclass(frozen=True)
class OtherVcpu:
    """Another vCPU over the same stall: its dominant state and that state's time."""

    vcpu: int
    state: str | None
    ns: int
    same_thread: bool


@dataclass(frozen=True)
class StallHost:
    """The host's truth over one guest stall (see the module docstring).

    :param row: the stall's row in ``Placed``; ``vcpu`` the guest's vCPU.
    :param endpoints: the endpoints whose vCPU ran the guest during the stall.
    :param state_ns: time per state over the stall; ``unsampled_ns`` the rest.
    :param cause: the dominant state, or None without host truth over the stall.
    :param others: the other vCPUs of the runner over the same stall.
    :param text: the plain-words sentence.
    :param lock_shared_with: for a stall whose vCPU waited on a lock, the other threads
        seen waiting on the same lock over it (``main``: QEMU's main loop; ``vcpu N``).
    """

    row: int
    vcpu: int
    endpoints: tuple[str, ...]
    state_ns: Mapping[str, int]
    unsampled_ns: int
    cause: str | None
    others: tuple[OtherVcpu, ...]
    text: str
    lock_shared_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class Comparison:
    """Guest stalled time against the host's blocked time, one phase and vCPU."""

    phase: int
    vcpu: int
    lane: int
    guest_ns: int
    host_ns: int
    tolerance_ns: int
    runs: int
    coverage: float
    ok: bool | None
    #: The vCPU's other non-running time in the phase (runnable, halted, other), by state.
    rest_ns: Mapping[str, int] = field(default_factory=dict)


@dataclass
class HostTruth:
    """Everything ``join`` found (``available`` False: the run has no host truth).

    :param note: why there is none, or what limits it; empty otherwise.
    :param endpoints: endpoints with intervals; ``vcpus`` the vCPU indices seen.
    :param poll_ns: the sampler's poll period per endpoint.
    :param pieces: (start, end, endpoint) in host realtime: who ran the guest.
    :param tracks: the guest's vCPU n as a ``Track`` (the runner's intervals), by n.
    """

    available: bool
    note: str
    clock: HostClock
    endpoints: list[str] = field(default_factory=list)
    vcpus: list[int] = field(default_factory=list)
    poll_ns: dict[str, int] = field(default_factory=dict)
    pieces: list[tuple[int, int, str]] = field(default_factory=list)
    tracks: dict[int, Track] = field(default_factory=dict)
    phases: list[PhaseStates] = field(default_factory=list)
    stalls: list[StallHost] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    threshold_ns: int = DEFAULT_THRESHOLD_NS

    def userfault_ns(self, vcpu: int, windows: Sequence[tuple[int, int]]) -> int | None:
        """The guest's vCPU ``vcpu`` blocked on missing pages over host realtime
        ``windows``, or None when the host has no intervals of it."""
        track = self.tracks.get(vcpu)
        if track is None or not len(track.start) or not windows:
            return None
        lo = self.clock.to_mono(np.array([w[0] for w in windows], dtype=np.int64))
        hi = self.clock.to_mono(np.array([w[1] for w in windows], dtype=np.int64))
        return int(track.time_in(lo, hi)[_CODE["userfault"]].sum())


def _source(run: Run, endpoints: Sequence[str]) -> str | None:
    tl = run.timeline
    if tl is not None:
        for ep in tl.endpoints:
            if ep.role == "source":
                return ep.name
    src = run.meta.get("source_endpoint")
    if isinstance(src, str):
        return src
    return endpoints[0] if len(endpoints) == 1 else None


def runner_pieces(
    timeline: Timeline | None, source: str | None, lo: int, hi: int
) -> list[tuple[int, int, str]]:
    """Who ran the guest, as (start, end, endpoint) pieces of host realtime covering
    ``[lo, hi)`` (see the module docstring)."""
    if source is None:
        return []
    out: list[tuple[int, int, str]] = []
    start, current = lo, source
    for pause in timeline.pauses if timeline is not None else ():
        if not pause.handover or pause.resumed_by is None or pause.end_ns is None:
            continue
        if pause.resumed_by == current:
            continue
        if pause.end_ns > start:
            out.append((start, pause.end_ns, current))
            start = pause.end_ns
        current = pause.resumed_by
    out.append((start, max(hi, start + 1), current))
    return out


def _dominant(times: I64) -> tuple[str | None, int]:
    """The cause from a vector of time per state (see the module docstring)."""
    if not times.sum():
        return None, 0
    best: str | None = None
    for name in CAUSE_ORDER[:-1]:
        ns = int(times[_CODE[name]])
        if ns and (best is None or ns > int(times[_CODE[best]])):
            best = name
    running = int(times[_CODE["running"]])
    if best is None or running > int(times[_CODE[best]]):
        return "running", running
    return best, int(times[_CODE[best]])


def _poll(run: Run, endpoints: Sequence[str]) -> dict[str, int]:
    sampler = run.vcpu_sampler
    out: dict[str, int] = {}
    for ep in endpoints:
        poll = sampler.get(ep, {}).get("poll_ns")
        ok = isinstance(poll, int) and not isinstance(poll, bool) and poll > 0
        out[ep] = poll if isinstance(poll, int) and ok else DEFAULT_POLL_NS
    return out


def no_host_truth_note(run: Run) -> str:
    """Why a run has no host truth, in one sentence."""
    if not run.has_vcpu_states:
        notes = [
            str(v.get("note"))
            for v in run.vcpu_sampler.values()
            if isinstance(v.get("note"), str) and v.get("note")
        ]
        why = f" ({'; '.join(notes)})" if notes else ""
        return (
            "no host truth: the run has no vcpu-states.jsonl (the recorder did not sample the "
            f"vCPU threads){why}"
        )
    return "no host truth: vcpu-states.jsonl holds no usable interval"


def join(
    run: Run,
    bounds: I64,
    stall_start: I64,
    stall_end: I64,
    stall_lane: I32,
    stall_err: F64,
    stalled: I64,
    windows: Sequence[StopWindow],
    phases_on_host: bool,
) -> HostTruth:
    """Join the run's host truth to its phases and stalls (see the module docstring).

    :param run: the run (``vcpu_states``, ``timeline``, ``lanes``, ``meta``).
    :param bounds: the phases' boundaries, host realtime (P + 1 values).
    :param stall_start: the placed stalls' host realtime starts; ``stall_end`` their ends,
        ``stall_lane`` their lanes, ``stall_err`` their alignment error bounds (NaN: unknown).
    :param stalled: the guest's stalled time per lane and phase (``LaneStats.stalled_ns``).
    :param windows: QEMU's stop windows (host realtime).
    :param phases_on_host: False when the phases are on the guest's own clock (no QMP):
        then nothing can be joined.
    :return: the host truth, ``available`` False when there is none.
    """
    clock = HostClock.build(run)
    if not run.vcpu_states:
        return HostTruth(False, no_host_truth_note(run), clock)
    if not phases_on_host:
        return HostTruth(
            False, "host truth not joined: no QMP records put the guest on the host's clock", clock
        )
    by_key: dict[tuple[str, int], list[VcpuInterval]] = {}
    for iv in run.vcpu_states:
        by_key.setdefault((iv.endpoint, iv.vcpu), []).append(iv)
    endpoints = sorted({k[0] for k in by_key})
    vcpus = sorted({k[1] for k in by_key})
    raw = {k: Track.of(v) for k, v in by_key.items()}
    truth = HostTruth(True, "", clock, endpoints, vcpus, _poll(run, endpoints))
    thresholds = [s.threshold_ns for s in run.segments if s.threshold_ns]
    truth.threshold_ns = max(thresholds) if thresholds else DEFAULT_THRESHOLD_NS
    lo, hi = int(bounds[0]), int(bounds[-1])
    truth.pieces = runner_pieces(run.timeline, _source(run, endpoints), lo, hi)
    mono_pieces = [
        (int(a), int(b), ep)
        for (a, b), ep in zip(
            clock.to_mono(np.array([[p[0], p[1]] for p in truth.pieces], dtype=np.int64))
            if truth.pieces
            else [],
            [p[2] for p in truth.pieces],
            strict=True,
        )
    ]
    for v in vcpus:
        parts = [raw[(ep, v)].clip(a, b) for a, b, ep in mono_pieces if (ep, v) in raw]
        truth.tracks[v] = Track.concat(parts)
    mb = clock.to_mono(bounds)
    n_ph = len(bounds) - 1
    _phase_rows(truth, raw, mb, mono_pieces, n_ph)
    if len(run.agents) > 1:
        truth.note = "several agents: which guest CPU is which vCPU is unknown; stalls not joined"
        return truth
    _stall_rows(truth, run, stall_start, stall_end, stall_lane)
    _compare(truth, run, mb, stalled, stall_lane, stall_err, stall_start, windows)
    return truth


def _phase_rows(
    truth: HostTruth,
    raw: Mapping[tuple[str, int], Track],
    mb: I64,
    pieces: Sequence[tuple[int, int, str]],
    n_ph: int,
) -> None:
    ran: list[str | None] = []
    for p in range(n_ph):
        share: dict[str, int] = {}
        for a, b, ep in pieces:
            share[ep] = share.get(ep, 0) + max(0, min(b, int(mb[p + 1])) - max(a, int(mb[p])))
        ran.append(max(share, key=lambda e: share[e]) if any(share.values()) else None)
    for (ep, v), track in sorted(raw.items()):
        times = track.time_in(mb[:-1], mb[1:])
        for p in range(n_ph):
            col = times[:, p]
            if not col.sum():
                continue
            length = int(mb[p + 1] - mb[p])
            truth.phases.append(
                PhaseStates(
                    p,
                    ep,
                    v,
                    {STATES[s]: int(col[s]) for s in range(len(STATES)) if col[s]},
                    max(0, length - int(col.sum())),
                    ran[p] == ep,
                )
            )


def _stall_rows(truth: HostTruth, run: Run, s_real: I64, e_real: I64, lane: I32) -> None:
    if not len(s_real):
        return
    s = truth.clock.to_mono(s_real)
    e = np.maximum(truth.clock.to_mono(e_real), s)
    cpu_of = np.array([ln.cpu for ln in run.lanes] or [0], dtype=np.int64)
    vcpu = cpu_of[lane] if len(lane) else np.zeros(0, dtype=np.int64)
    per_vcpu = {v: t.time_in(s, e) for v, t in truth.tracks.items()}
    tids = {v: set(t.tid.tolist()) for v, t in truth.tracks.items()}
    several = len(run.lanes) > 1
    for i in range(len(s)):
        v = int(vcpu[i])
        track = per_vcpu.get(v)
        times = track[:, i] if track is not None else np.zeros(len(STATES), dtype=np.int64)
        cause, _ = _dominant(times)
        others = []
        for w, t in sorted(per_vcpu.items()):
            if w == v:
                continue
            state, ns = _dominant(t[:, i])
            same = bool(tids.get(v)) and tids.get(v) == tids.get(w)
            others.append(OtherVcpu(w, state, ns, same))
        s0, e0 = int(s_real[i]), max(int(e_real[i]), int(s_real[i]) + 1)
        eps = tuple(ep for a, b, ep in truth.pieces if min(b, e0) > max(a, s0))
        length = int(e[i] - s[i])
        hint_code = int(run.stalls.cause[i]) if i < len(run.stalls) else -1
        hint = _hint(hint_code)
        label = run.lanes[int(lane[i])].label(several and len(run.agents) > 1)
        sharers = _lock_sharers(run, v, eps, int(s[i]), int(e[i]))
        truth.stalls.append(
            StallHost(
                i,
                v,
                tuple(dict.fromkeys(eps)),
                {STATES[k]: int(times[k]) for k in range(len(STATES)) if times[k]},
                max(0, length - int(times.sum())),
                cause,
                tuple(others),
                stall_text(label, int(run.stalls.dur[i]), cause, others, hint, sharers),
                sharers,
            )
        )


def _lock_sharers(
    run: Run, vcpu: int, endpoints: Sequence[str], start: int, end: int
) -> tuple[str, ...]:
    """Who else waited on the locks ``vcpu`` waited on over [start, end) (host monotonic)."""
    names: set[str] = set()
    for iv in run.vcpu_states:
        if (
            iv.vcpu == vcpu
            and iv.state == "lock-wait"
            and iv.endpoint in endpoints
            and iv.start_mono_ns < end
            and iv.end_mono_ns > start
        ):
            names.update(iv.also_waiting)
    return tuple(sorted(names))


def _hint(code: int) -> str:
    return CAUSES[code] if 0 <= code < len(CAUSES) else "unknown"


def stall_text(
    label: str,
    dur_ns: int,
    cause: str | None,
    others: Sequence[OtherVcpu],
    hint: str,
    lock_shared_with: Sequence[str] = (),
) -> str:
    """``CPU 1 stalled 5.44s: its vCPU thread waited on a QEMU lock while vCPU 0 was
    blocked on a missing page (guest hint: vcpu-blocked)``.

    The other vCPUs are named when any vCPU (this one or another) was blocked on a missing
    page over the stall: that is when one vCPU's fault can hold up the others. When every
    vCPU shares this vCPU's host thread (single-threaded TCG) the sentence says so instead:
    the others' states are the same thread's, and ``running`` then means the thread ran
    some vCPU, not necessarily this one. A lock that QEMU's main loop waited on too is said
    so (``lock_shared_with``: the main loop takes the big QEMU lock).
    """
    head = f"{label} stalled {format_duration(dur_ns)}: "
    if cause is None:
        return head + f"no host truth over it (guest hint: {hint})"
    if others and all(o.same_thread for o in others):
        text = head + (
            f"its host thread (shared by every vCPU: single-threaded TCG) {STATE_WORDS[cause]}"
        )
        return text + f" (guest hint: {hint})"
    text = head + f"its vCPU thread {STATE_WORDS[cause]}"
    if cause == "lock-wait" and "main" in lock_shared_with:
        text += " that QEMU's main loop waited for too"
    if cause == "userfault" or any(o.state == "userfault" for o in others):
        named = [o for o in others if o.state is not None]
        parts = [
            f"vCPU {o.vcpu}{' (the same host thread)' if o.same_thread else ''} "
            f"{STATE_WORDS[o.state or 'other']}"
            for o in named
        ]
        if parts:
            text += " while " + ", ".join(parts)
    return text + f" (guest hint: {hint})"


def _blocked_runs(track: Track, poll_ns: int, min_ns: int) -> tuple[I64, I64]:
    """Runs of blocked intervals (gaps up to ``poll_ns`` bridged) at least ``min_ns`` long."""
    blocked = np.isin(track.state, [_CODE[b] for b in BLOCKED])
    s, e = track.start[blocked], track.end[blocked]
    if not len(s):
        z = np.zeros(0, dtype=np.int64)
        return z, z
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > e[:-1] + poll_ns
    idx = np.flatnonzero(new)
    rs, re_ = s[idx], np.maximum.reduceat(e, idx)
    keep = (re_ - rs) >= min_ns
    return rs[keep], re_[keep]


def _overlap(start: I64, end: I64, lo: int, hi: int) -> int:
    return int(np.maximum(np.minimum(end, hi) - np.maximum(start, lo), 0).sum())


def _runs_minus_windows(
    rs: I64, re_: I64, wins: Sequence[tuple[int, int]], lo: int, hi: int
) -> int:
    total = _overlap(rs, re_, lo, hi)
    for a, b in wins:
        cs, ce = np.maximum(rs, a), np.minimum(re_, b)
        inside = ce > cs
        total -= _overlap(cs[inside], ce[inside], lo, hi)
    return total


def _compare(
    truth: HostTruth,
    run: Run,
    mb: I64,
    stalled: I64,
    stall_lane: I32,
    stall_err: F64,
    stall_start: I64,
    windows: Sequence[StopWindow],
) -> None:
    lane_of = {ln.cpu: i for i, ln in enumerate(run.lanes)}
    poll = max(truth.poll_ns.values()) if truth.poll_ns else DEFAULT_POLL_NS
    wins = [
        (int(a), int(b))
        for a, b in truth.clock.to_mono(
            np.array([[w.start_ns, w.end_ns] for w in windows], dtype=np.int64).reshape(-1, 2)
        )
    ]
    err = np.nan_to_num(stall_err, nan=0.0)
    s_mono = truth.clock.to_mono(stall_start) if len(stall_start) else stall_start
    for v, track in sorted(truth.tracks.items()):
        li = lane_of.get(v)
        if li is None:
            continue
        rs, re_ = _blocked_runs(track, poll, truth.threshold_ns)
        for p in range(len(mb) - 1):
            lo, hi = int(mb[p]), int(mb[p + 1])
            host = _runs_minus_windows(rs, re_, wins, lo, hi)
            guest = int(stalled[li, p]) if li < stalled.shape[0] else 0
            if not host and not guest:
                continue
            covered = _overlap(track.start, track.end, lo, hi)
            coverage = covered / (hi - lo) if hi > lo else 0.0
            runs = int(((re_ > lo) & (rs < hi)).sum())
            mine = (stall_lane == li) & (s_mono >= lo) & (s_mono < hi)
            e = float(err[mine].max()) if mine.any() else 0.0
            tol = int(0.10 * host + 5_000_000 + e + 2 * poll * max(runs, 1))
            ok = abs(guest - host) <= tol if coverage >= MIN_COVERAGE else None
            times = track.time_in(np.array([lo]), np.array([hi]))[:, 0]
            rest = {
                name: int(times[_CODE[name]])
                for name in ("runnable", "halted", "other")
                if times[_CODE[name]]
            }
            truth.comparisons.append(
                Comparison(p, v, li, guest, host, tol, runs, coverage, ok, rest)
            )


def state_ms(times: Mapping[str, int]) -> dict[str, float]:
    """A state -> ns mapping as state -> ms (microsecond rounding), in state order."""
    return {k: round(times[k] / 1e6, 3) for k in STATES if k in times}
