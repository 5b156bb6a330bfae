"""Which phase each stall, timeout and kernel warning belongs to, and the figures per phase.

``analyse(run)`` aligns the run (``analysis.analyze.alignment``), puts every guest event on the
host's clock and computes, with numpy, for each phase (``Span``) and each lane (one CPU
of one agent):

Placement. A stall's start and end are mapped separately (a stop inside a stall lengthens
it in host time: the guest's clock stood still). Its *phase* is the one holding most of
its host-time interval (ties: the earlier); ``near_boundary`` is set when a phase boundary
lies within the error bound of its start or end, so that the phase could be the
neighbour's. Timeouts and kernel warnings are points: their phase holds their host time.

Per phase x lane (``LaneStats``): ``count`` of stalls whose phase it is; ``stalled_ns``,
the host time of the phase covered by that lane's stalls (each stall clipped to the
phase, overlapping stalls of one lane merged, the windows in which QEMU had the vCPUs
stopped left out: a stop is not a stall, the guest's clocks did not see it), and
``fraction`` = stalled_ns / phase length; ``longest_ns``, ``p50_ns``, ``p99_ns`` of the
guest-clock lengths of the stalls counted (linear interpolation between order
statistics, as ``numpy.percentile``).
Lengths are guest-clock lengths because that is what an application measures.

Asymmetry (``Asymmetry``), per phase, by a sweep over every lane's merged stall
intervals: ``some_ns`` is the time during which at least one lane but not all were
stalled (some CPUs stalled while others ran), ``all_ns`` the time all were stalled; and
per lane, ``alone_ns`` = its stalled time minus ``all_ns``: the time it was stalled while
at least one other lane ran.

Timeout sensitivity (``Sensitivity``). Model: an application thread on a CPU waits with a
timeout T for something that, without the stall, would have arrived in time. A stall of
guest length S on that CPU makes the wait expire late when S > T (the thread cannot run
to see the answer before its deadline passes; a wait that began inside the stall is not
counted). Each stall counts once per T below its length: ``expirations(T) = #{stalls: S >
T}``, per phase (the stall's phase), summed over lanes (one such application per CPU),
with the worst lane beside it. T runs over the agent's ladder (``--timeouts``) and a fine
log grid for the plot. Beside it, where the guest has canaries, their own ``timeout``
events per phase and T; and the *peer* view: a freeze hides from the guest's clocks (its
timers do not expire) but not from a peer outside, for whom each clock-lag step of L is
one expiration for every T < L.

Validation (``Check``): host truth against guest figures, each with its tolerance, and
``ok`` False when outside it (None when not measurable):

- every clock-lag step against the stop windows between its samples (STOP to RESUME,
  QEMU's timestamps): |lag - stopped| <= 10 % of stopped + 5 ms + the step's error bound;
  QEMU's ``downtime`` against the same step, same tolerance (for postcopy QEMU's figure
  is known to leave out most of the pause);
- every freeze the lab injected (lab-steps.jsonl) against the longest stall of each
  frozen lane overlapping it: 10 % + 5 ms + the alignment's error bound; for a one-vCPU
  freeze the other lanes should not stall for half of it;
- with host truth (``vcpu-states.jsonl``, ``analysis.analyze.host_vcpu``), per phase x vCPU, the
  guest's stalled time against the time the host saw that vCPU's thread blocked
  (userfault, lock-wait, stopped): 10 % + 5 ms + the alignment error + two poll periods
  per blocked run (rules in ``analysis.analyze.host_vcpu``);
- QEMU's ``postcopy-vcpu-blocktime`` (ms per vCPU) against each lane's stalled time in the
  postcopy phases, 25 % + 100 ms (blocktime counts page-fault waits only; the guest
  counts every gap above its threshold): a cross-check of QEMU's figure, not of the
  guest's. QEMU before 10.1 (meta.json ``versions.qemu``) is known to report it wrong
  (upstream rewrote it in 10.1): there ``ok`` is None and the note says what QEMU said.
  With host truth the note adds the host's own userfault time of that vCPU.

Under single-threaded TCG (meta.json ``lab.accel`` = ``tcg``) every vCPU runs in one host
thread, so a blocked vCPU blocks all: ``labels`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from analysis.analyze.alignment import Alignment, OffsetStep, align
from analysis.analyze.checks import Check, validate
from analysis.analyze.host_vcpu import HostTruth, join
from analysis.analyze.load import Run
from analysis.analyze.spans import F64, I32, I64, Placed, Span, span_label
from analysis.rundir.guest_reader import CAUSES

DEFAULT_LADDER_NS = (10_000_000, 100_000_000, 1_000_000_000, 5_000_000_000, 30_000_000_000)
GRID_POINTS = 160
TCG_LABEL = "all vCPUs share one host thread: stalls are symmetric by construction"
UNKNOWN_PHASE = "whole run (phases unknown)"
NO_MIGRATION_PHASE = "whole run (no migration)"
BEFORE_PHASE = "before migration"


@dataclass(frozen=True)
class PointPlaced:
    """A timeout or kernel warning on the host clock."""

    kind: str
    host_ns: int
    err_ns: float | None
    lane: int
    phase: int
    near: bool
    label: str
    line: int
    #: The guest segment (``Run.segments``) whose events file holds ``line``; -1 unknown.
    seg: int = -1


@dataclass(frozen=True)
class LaneStats:
    """The figures of one lane in one phase (see the module docstring)."""

    phase: int
    lane: int
    count: int
    stalled_ns: int
    fraction: float
    longest_ns: int
    p50_ns: int
    p99_ns: int
    alone_ns: int


@dataclass(frozen=True)
class Asymmetry:
    """Per phase: time some (not all) lanes were stalled, and time all were."""

    phase: int
    some_ns: int
    all_ns: int


@dataclass
class Sensitivity:
    """Expirations per phase for each timeout T (see the module docstring).

    :param ladder: the T values of the tables; ``grid`` the plot's.
    :param stalls: phase -> expirations per ladder T (summed over lanes).
    :param worst_lane: phase -> the most any one lane saw, per ladder T.
    :param grid_counts: phase -> expirations per grid T.
    :param canary: phase -> canary -> count per ladder T (only when the guest has canaries).
    :param peer: phase -> expirations a peer outside would see from clock-lag steps.
    """

    ladder: list[int]
    grid: list[int]
    stalls: dict[int, list[int]] = field(default_factory=dict)
    worst_lane: dict[int, list[int]] = field(default_factory=dict)
    grid_counts: dict[int, list[int]] = field(default_factory=dict)
    canary: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    peer: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class Analysis:
    """Everything the findings and the report use."""

    run: Run
    alignment: Alignment
    phases_known: bool
    spans: list[Span]
    placed: Placed
    points: list[PointPlaced]
    stats: list[LaneStats]
    asymmetry: list[Asymmetry]
    sensitivity: Sensitivity
    checks: list[Check]
    labels: list[str]
    origin_ns: int
    end_ns: int
    host: HostTruth | None = None

    def phase_label(self, phase: int) -> str:
        """The phase's name, with ``#2``, ``#3`` when a name repeats (postcopy-active)."""
        return span_label(self.spans, phase)

    def lane_label(self, lane: int) -> str:
        """``CPU 1`` (or ``AGENT CPU 1`` with several agents)."""
        return self.run.lanes[lane].label(len(self.run.agents) > 1)

    def stat(self, phase: int, lane: int) -> LaneStats | None:
        """The figures of one lane in one phase."""
        for s in self.stats:
            if s.phase == phase and s.lane == lane:
                return s
        return None


# --------------------------------------------------------------------------- helpers


def _merge(start: I64, end: I64, lane: I32, n_lanes: int) -> tuple[I64, I64, I32]:
    """Merge overlapping intervals within each lane."""
    out_s, out_e, out_l = [], [], []
    order = np.lexsort((start, lane))
    s, e, ln = start[order], end[order], lane[order]
    for k in range(n_lanes):
        lo, hi = np.searchsorted(ln, k, "left"), np.searchsorted(ln, k, "right")
        if lo == hi:
            continue
        ss, ee = s[lo:hi], np.maximum.accumulate(e[lo:hi])
        new = np.ones(hi - lo, dtype=bool)
        new[1:] = ss[1:] > ee[:-1]
        idx = np.flatnonzero(new)
        ends = np.append(idx[1:] - 1, hi - lo - 1)
        out_s.append(ss[idx])
        out_e.append(ee[ends])
        out_l.append(np.full(len(idx), k, dtype=np.int32))
    if not out_s:
        z = np.zeros(0, dtype=np.int64)
        return z, z, np.zeros(0, dtype=np.int32)
    return np.concatenate(out_s), np.concatenate(out_e), np.concatenate(out_l)


def overlap_by_phase(start: I64, end: I64, group: I32, n_groups: int, bounds: I64) -> I64:
    """Sum of the intervals' overlaps with each phase, per group.

    :param start: interval starts; ``end`` their ends (host ns).
    :param group: each interval's group (a lane); ``n_groups`` how many.
    :param bounds: the phases' boundaries (P + 1 increasing values).
    :return: an (n_groups, P) array of ns.
    """
    n_ph = len(bounds) - 1
    out = np.zeros((n_groups, n_ph), dtype=np.int64)
    if len(start) == 0 or n_ph <= 0:
        return out
    for p in range(n_ph):
        ov = np.minimum(end, bounds[p + 1]) - np.maximum(start, bounds[p])
        np.maximum(ov, 0, out=ov)
        if ov.any():
            out[:, p] = np.bincount(group, weights=ov, minlength=n_groups)[:n_groups].astype(
                np.int64
            )
    return out


def _percentile_sorted(values: I64, q: float) -> int:
    if len(values) == 0:
        return 0
    pos = q * (len(values) - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(values) - 1)
    return round(float(values[lo]) + float(values[hi] - values[lo]) * (pos - lo))


# --------------------------------------------------------------------------- spans


def _spans(run: Run, times: list[int]) -> tuple[list[Span], bool]:
    """The phases (with a ``before migration`` span when events precede them), or one
    span covering everything when phases are unknown."""
    lo = min(times) if times else 0
    hi = max(times) if times else 0
    start, end = run.recording_span()
    tl = run.timeline
    if tl is None or not tl.phases:
        name = UNKNOWN_PHASE if tl is None else NO_MIGRATION_PHASE
        return [Span(0, name, lo, hi + 1)], False
    out: list[Span] = []
    first = tl.phases[0].start_ns
    early = min(lo, start if start is not None else lo)
    if early < first:
        out.append(Span(0, BEFORE_PHASE, early, first))
    last_end = max(hi + 1, end if end is not None else hi + 1)
    for ph in tl.phases:
        e = ph.end_ns if ph.end_ns is not None else max(last_end, ph.start_ns)
        out.append(Span(len(out), ph.name, ph.start_ns, e, ph.vm_stopped))
    return out, True


def _bounds(spans: list[Span]) -> I64:
    return np.array([s.start_ns for s in spans] + [spans[-1].end_ns], dtype=np.int64)


# --------------------------------------------------------------------------- analyse


def _stalls_on_host(run: Run, al: Alignment) -> tuple[I64, I64, F64]:
    """Each stall's start and end on the host's clock, and the error bound, per segment."""
    st = run.stalls
    n = len(st)
    start = np.zeros(n, dtype=np.int64)
    end = np.zeros(n, dtype=np.int64)
    err = np.zeros(n, dtype=np.float64)
    for seg in run.segments:
        ba = al.for_segment(seg.agent, seg.boot_id)
        if ba is None:
            continue
        sel = st.seg == seg.index
        if not sel.any():
            continue
        h0, e0 = ba.to_host(st.mono[sel])
        h1, e1 = ba.to_host(st.mono[sel] + st.dur[sel])
        start[sel], end[sel] = h0, np.maximum(h1, h0)
        err[sel] = np.maximum(e0, e1)

    return start, end, err


def _phase_of_stalls(
    start: I64, end: I64, err: F64, bounds: I64
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_]]:
    """Each stall's phase (the one holding most of it) and whether either end lies within
    its error bound of a phase boundary."""
    n = len(start)
    n_ph = len(bounds) - 1
    ps = np.clip(np.searchsorted(bounds, start, "right") - 1, 0, n_ph - 1).astype(np.int32)
    pe = np.clip(np.searchsorted(bounds, np.maximum(end - 1, start), "right") - 1, 0, n_ph - 1)
    phase = ps.copy()
    for i in np.flatnonzero(pe > ps):
        ov = [
            min(end[i], bounds[p + 1]) - max(start[i], bounds[p]) for p in range(ps[i], pe[i] + 1)
        ]
        phase[i] = ps[i] + int(np.argmax(ov))
    near = np.zeros(n, dtype=bool)
    if n and len(bounds) > 2:
        inner = bounds[1:-1]
        e = np.nan_to_num(err, nan=0.0)
        for edge in (start, end):
            j = np.clip(np.searchsorted(inner, edge), 0, len(inner) - 1)
            d = np.minimum(np.abs(inner[j] - edge), np.abs(inner[np.maximum(j - 1, 0)] - edge))
            near |= d <= e
    return phase, near


def analyse(run: Run) -> Analysis:
    """Align, place and measure everything in a run (see the module docstring).

    :param run: what ``load_run`` returned.
    :return: the analysis.
    """
    al = align(run)
    st = run.stalls
    n = len(st)
    start, end, err = _stalls_on_host(run, al)

    raw_points = _raw_points(run, al)
    times = [int(start.min()), int(end.max())] if n else []
    times += [p[1] for p in raw_points]
    times += [int(t) for b in al.boots.values() for t in b.host]
    spans, known = _spans(run, times)
    bounds = _bounds(spans)
    n_ph = len(spans)
    n_lanes = max(len(run.lanes), 1)

    phase, near = _phase_of_stalls(start, end, err, bounds)
    placed = Placed(start, end, err, st.dur, st.lane, st.cause, phase, near)

    # per phase x lane
    ms, me, ml = _merge(start, end, st.lane, n_lanes)
    stalled = overlap_by_phase(ms, me, ml, n_lanes, bounds)
    for w in al.windows:  # QEMU had the vCPUs stopped: not a stall (the guest saw nothing)
        cs, ce = np.maximum(ms, w.start_ns), np.minimum(me, w.end_ns)
        inside = ce > cs
        if inside.any():
            stalled -= overlap_by_phase(cs[inside], ce[inside], ml[inside], n_lanes, bounds)
    asym, all_ns = _asymmetry(ms, me, n_lanes, bounds, len(run.lanes))
    stats = _lane_stats(placed, stalled, all_ns, spans, len(run.lanes))

    points = [
        _place_point(kind, t, e, lane, label, (line, seg), bounds, n_ph)
        for kind, t, e, lane, label, line, seg in raw_points
    ]
    sens = _sensitivity(run, placed, points, al.steps, spans, bounds, n_lanes)
    host = join(
        run, bounds, start, end, st.lane, err, stalled, al.windows, run.timeline is not None
    )
    checks = validate(run, al, placed, stalled, spans, host)
    labels = []
    if run.accel == "tcg":
        labels.append(f"single-threaded TCG: {TCG_LABEL}")
    origin = spans[0].start_ns
    if run.timeline is not None and run.timeline.origin_ns is not None and known:
        origin = min(origin, run.timeline.origin_ns)
    return Analysis(
        run,
        al,
        known,
        spans,
        placed,
        points,
        stats,
        asym,
        sens,
        checks,
        labels,
        origin,
        spans[-1].end_ns,
        host,
    )


_RawPoint = tuple[str, int, float | None, int, str, int, int]


def _raw_points(run: Run, al: Alignment) -> list[_RawPoint]:
    """(kind, host ns, error, lane, label, line, segment) of every timeout and kernel
    warning."""
    out: list[_RawPoint] = []
    lane_of = {(ln.agent, ln.cpu): i for i, ln in enumerate(run.lanes)}
    for ev in run.warnings:
        seg = run.segments[ev.seg]
        ba = al.for_segment(seg.agent, seg.boot_id)
        if ba is None:
            continue
        h, e = ba.to_host(np.array([ev.mono_ns], dtype=np.int64))
        cpu = ev.fields.get("cpu")
        lane = lane_of.get((seg.agent, cpu), -1) if isinstance(cpu, int) else -1
        label = str(ev.fields.get("warning", "kernel_warning"))
        err = None if np.isnan(e[0]) else float(e[0])
        out.append(("kernel_warning", int(h[0]), err, lane, label, ev.line, ev.seg))
    to = run.timeouts
    for seg in run.segments:
        sel = np.flatnonzero(to.seg == seg.index)
        ba = al.for_segment(seg.agent, seg.boot_id)
        if not len(sel) or ba is None:
            continue
        h, e = ba.to_host(to.mono[sel])
        for k, i in enumerate(sel):
            canary = run.canaries[int(to.canary[i])]
            label = f"{canary} {to.timeout_ns[i] / 1e6:g} ms"
            err = None if np.isnan(e[k]) else float(e[k])
            out.append(
                ("timeout", int(h[k]), err, int(to.lane[i]), label, int(to.line[i]), seg.index)
            )
    return out


def _place_point(
    kind: str,
    t: int,
    e: float | None,
    lane: int,
    label: str,
    where: tuple[int, int],
    bounds: I64,
    n_ph: int,
) -> PointPlaced:
    p = int(np.clip(np.searchsorted(bounds, t, "right") - 1, 0, n_ph - 1))
    inner = bounds[1:-1]
    near = bool(e is not None and len(inner) and np.min(np.abs(inner - t)) <= e)
    return PointPlaced(kind, t, e, lane, p, near, label, *where)


def _asymmetry(
    ms: I64, me: I64, n_lanes: int, bounds: I64, real_lanes: int
) -> tuple[list[Asymmetry], I64]:
    n_ph = len(bounds) - 1
    some = np.zeros(n_ph, dtype=np.int64)
    all_ = np.zeros(n_ph, dtype=np.int64)
    if len(ms) and real_lanes >= 1:
        t = np.concatenate([ms, me, bounds])
        d = np.concatenate(
            [
                np.ones(len(ms), np.int64),
                -np.ones(len(me), np.int64),
                np.zeros(len(bounds), np.int64),
            ]
        )
        order = np.argsort(t, kind="stable")
        t, d = t[order], d[order]
        k = np.cumsum(d)
        dt = np.diff(t)
        kk = k[:-1]
        ph = np.clip(np.searchsorted(bounds, t[:-1], "right") - 1, 0, n_ph - 1)
        inside = (t[:-1] >= bounds[0]) & (t[:-1] < bounds[-1])
        is_all = inside & (kk >= real_lanes)
        is_some = inside & (kk > 0) & (kk < real_lanes)
        all_ = np.bincount(ph[is_all], weights=dt[is_all], minlength=n_ph).astype(np.int64)
        some = np.bincount(ph[is_some], weights=dt[is_some], minlength=n_ph).astype(np.int64)
    return [Asymmetry(p, int(some[p]), int(all_[p])) for p in range(n_ph)], all_


def _lane_stats(
    placed: Placed, stalled: I64, all_ns: I64, spans: list[Span], n_lanes: int
) -> list[LaneStats]:
    n_ph = len(spans)
    group = placed.phase.astype(np.int64) * n_lanes + placed.lane
    order = np.lexsort((placed.dur, group))
    g_sorted, d_sorted = group[order], placed.dur[order]
    out = []
    for p in range(n_ph):
        for ln in range(n_lanes):
            g = p * n_lanes + ln
            lo, hi = np.searchsorted(g_sorted, g, "left"), np.searchsorted(g_sorted, g, "right")
            vals = d_sorted[lo:hi]
            length = spans[p].length_ns
            st_ns = int(stalled[ln, p]) if ln < stalled.shape[0] else 0
            out.append(
                LaneStats(
                    p,
                    ln,
                    int(hi - lo),
                    st_ns,
                    st_ns / length if length else 0.0,
                    int(vals[-1]) if len(vals) else 0,
                    _percentile_sorted(vals, 0.5),
                    _percentile_sorted(vals, 0.99),
                    max(0, st_ns - int(all_ns[p])),
                )
            )
    return out


def _ladder(run: Run) -> list[int]:
    ladder: set[int] = set()
    for seg in run.segments:
        ladder.update(seg.timeouts_ns)
    return sorted(ladder) if ladder else list(DEFAULT_LADDER_NS)


def _sensitivity(
    run: Run,
    placed: Placed,
    points: list[PointPlaced],
    steps: list[OffsetStep],
    spans: list[Span],
    bounds: I64,
    n_lanes: int,
) -> Sensitivity:
    ladder = _ladder(run)
    longest = int(placed.dur.max()) if len(placed.dur) else 0
    top = max(60_000_000_000, 2 * longest, max(s.lag_ns for s in steps) * 2 if steps else 0)
    grid = np.unique(np.logspace(6, np.log10(top), GRID_POINTS).astype(np.int64))
    lad = np.array(ladder, dtype=np.int64)
    sens = Sensitivity(ladder, [int(g) for g in grid])
    # Stalls longer than each ladder T, per (phase, lane): the worst lane of each phase.
    cell = placed.phase.astype(np.int64) * n_lanes + placed.lane
    per_cell = (
        np.stack(
            [
                np.bincount(cell[placed.dur > t], minlength=len(spans) * n_lanes)
                for t in lad.tolist()
            ],
            axis=1,
        )
        if len(lad)
        else np.zeros((len(spans) * n_lanes, 0), dtype=np.int64)
    )
    for p in range(len(spans)):
        sel = placed.phase == p
        d = np.sort(placed.dur[sel])
        sens.stalls[p] = [int(x) for x in len(d) - np.searchsorted(d, lad, "right")]
        sens.grid_counts[p] = [int(x) for x in len(d) - np.searchsorted(d, grid, "right")]
        block = per_cell[p * n_lanes : (p + 1) * n_lanes]
        worst = block.max(axis=0) if len(block) else np.zeros(len(lad), dtype=np.int64)
        sens.worst_lane[p] = [int(x) for x in worst]
        lags = np.array(
            [
                s.lag_ns
                for s in steps
                if s.lag_ns > 0
                and int(np.clip(np.searchsorted(bounds, s.at_ns, "right") - 1, 0, len(spans) - 1))
                == p
            ],
            dtype=np.int64,
        )
        lags.sort()
        sens.peer[p] = [int(x) for x in len(lags) - np.searchsorted(lags, lad, "right")]
    if len(run.timeouts):
        for pt in points:
            if pt.kind != "timeout":
                continue
            canary, _, t_text = pt.label.partition(" ")
            per = sens.canary.setdefault(pt.phase, {}).setdefault(canary, [0] * len(ladder))
            t_ns = round(float(t_text.split()[0]) * 1e6)
            if t_ns in ladder:
                per[ladder.index(t_ns)] += 1
    return sens


#: The cause hints, in the order of ``Placed.cause`` codes.
CAUSES_DOC = list(CAUSES)
