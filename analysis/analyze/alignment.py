"""Put guest CLOCK_MONOTONIC times on the host's realtime clock, and find clock steps.

The recorder reads the guest's ``/clock`` in bursts and keeps the read with the shortest
round trip (clock-samples.jsonl). For one sample, with ``send`` and ``recv`` the host
realtime around the request::

    offset = guest_mono - (send + recv) / 2        error bound  e = (recv - send) / 2

because the guest read its clock somewhere between send and receive. Under TCG round
trips are 20 to 110 ms, so one sample pins the offset only to +-10..55 ms. Many samples
do better: while the offset does not change, the true value lies in *every* sample's
interval ``[offset - e, offset + e]``, so it lies in their intersection, usually far
narrower than any single one. ``align`` therefore walks the samples of each guest boot in
time order, intersecting their intervals (each widened by a drift allowance of
``DRIFT_PPM`` of the time since the stretch began, plus 0.5 ms); a sample whose interval
misses the running intersection starts a new *stretch*, and the change between the two
stretches is an ``OffsetStep`` with ``size = after - before`` and an error bound of the
two half-widths summed. Within a stretch, a guest time maps with the stretch's offset
(the intersection's midpoint) and error bound (its half-width); before the first and
after the last sample the nearest stretch extends, its error growing with the drift
allowance.

What a step means. With kvm-clock (and the emulated clocks under TCG) QEMU freezes the
guest's clocks while the VM is stopped, so after a stop of length L the guest's clocks are
L behind the host's: the monotonic offset drops by L (``lag_ns`` = -size = L). The guest
cannot see this on its own clocks; the host can. ``align`` therefore matches each step
with the windows in which QEMU had the vCPUs stopped (``analysis.rundir.qmp.stop_windows``:
the one STOP -> RESUME rule; a STOP still open at the end has no length and is left out)
that fall between the two samples: when
they are known, a guest time within the gap is mapped piece by piece (before the first
window with the old offset, after a window with the offset less that window's length, the
last piece with the new stretch's offset), and the residual (step minus windows) is added
to the error bound. A step no window explains is placed halfway, with half its size added
to the error bound.

Realtime. A guest realtime step (``settimeofday``, an NTP step) changes ``realtime -
monotonic`` in the guest, which every ``/clock`` reply shows exactly (both read together,
within ``bracket_ns``): a change above 1 ms between two samples is a ``realtime`` step,
located between them. The agent's own ``clock_step`` events say the same more precisely;
the report shows both.

ptp_kvm. When the guest reads the host's clock through ptp_kvm (``host_offset_ns`` in the
``/clock`` reply: guest realtime minus host realtime), the sample's offset comes from it,
with the guest's bracket as its error bound instead of the round trip.

Without any sample for a boot, its events are placed with the guest's realtime clock
(``method = "guest-realtime"``, error unknown, reported as None) when phases exist, and a
run without QMP records stays on the guest's own clock (``method = "guest"``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from analysis.analyze.load import Run
from analysis.rundir.guest_reader import ClockSample
from analysis.rundir.qmp import StopWindow, stop_windows

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

#: Allowed rate difference between guest and host clocks within a stretch.
DRIFT_PPM = 50.0
#: Slack added to every sample's interval (ns).
SLACK_NS = 500_000
#: Smallest change of ``realtime - monotonic`` reported as a realtime step (ns).
REALTIME_STEP_NS = 1_000_000

Method = Literal["clock-samples", "ptp", "guest-realtime", "guest"]


@dataclass(frozen=True)
class OffsetStep:
    """A change of the guest-minus-host offset between two clock samples.

    :param agent: the agent; ``boot_id`` its boot.
    :param clock: ``monotonic`` (a freeze: the guest fell behind) or ``realtime`` (the
        guest's wall clock was set or stepped against its monotonic clock).
    :param after_host_ns: host time of the last sample before the step;
        ``before_host_ns`` of the first sample after it (the step lies between).
    :param size_ns: the change of guest minus host (negative: the guest fell behind).
    :param error_ns: bound on ``size_ns``.
    :param windows: the stop windows between the two samples that explain it.
    """

    agent: str
    boot_id: str
    clock: Literal["monotonic", "realtime"]
    after_host_ns: int
    before_host_ns: int
    size_ns: int
    error_ns: int
    windows: tuple[StopWindow, ...] = ()

    @property
    def lag_ns(self) -> int:
        """How much further the guest fell behind the host (``-size_ns``)."""
        return -self.size_ns

    @property
    def stopped_ns(self) -> int:
        """Total length of the matched stop windows."""
        return sum(w.length_ns for w in self.windows)

    @property
    def stopped_max_ns(self) -> int:
        """Total length of the matched stop windows, counted from their ``stop`` commands
        where known (``StopWindow.length_max_ns``)."""
        return sum(w.length_max_ns for w in self.windows)

    @property
    def at_ns(self) -> int:
        """Best estimate of when it happened: the longest window's start, else halfway."""
        if self.windows:
            return max(self.windows, key=lambda w: w.length_ns).start_ns
        return (self.after_host_ns + self.before_host_ns) // 2


@dataclass
class _Stretch:
    first: int  # sample indices, inclusive
    last: int
    lo: float
    hi: float

    @property
    def offset(self) -> float:
        return (self.lo + self.hi) / 2

    @property
    def error(self) -> float:
        return (self.hi - self.lo) / 2


@dataclass
class BootAlignment:
    """The mapping of one (agent, boot) from guest monotonic to host realtime.

    :param method: how the offsets were obtained.
    :param host: per sample, host time; ``offset`` guest mono minus host; ``error`` bound;
        ``real_minus_mono`` the guest's realtime minus monotonic at the sample.
    :param stretches: step-free runs of samples with their intersected offsets.
    :param steps: the monotonic steps between stretches (in order).
    """

    agent: str
    boot_id: str
    method: Method
    host: I64
    guest: I64
    offset: F64
    error: F64
    real_minus_mono: I64
    stretches: list[_Stretch] = field(default_factory=list)
    steps: list[OffsetStep] = field(default_factory=list)
    ref_ns: int = 0  # offsets are relative to this (guest0 - host0)
    host0: int = 0

    def to_host(self, mono: I64) -> tuple[I64, F64]:
        """Map guest monotonic times to host realtime.

        :param mono: guest CLOCK_MONOTONIC values (ns) of this boot.
        :return: host realtime (ns) and the error bound (ns) of each.
        """
        mono = np.asarray(mono, dtype=np.int64)
        if self.method in ("guest-realtime", "guest"):
            rm = float(self.real_minus_mono[0]) if len(self.real_minus_mono) else 0.0
            return (mono + np.int64(rm)).astype(np.int64), np.full(mono.shape, np.nan)
        n = len(self.stretches)
        g_first = np.array([self.guest[s.first] for s in self.stretches], dtype=np.int64)
        g_last = np.array([self.guest[s.last] for s in self.stretches], dtype=np.int64)
        off = np.array([s.offset for s in self.stretches])
        err = np.array([s.error for s in self.stretches])
        k = np.searchsorted(g_first, mono, side="right") - 1  # last stretch starting <= g
        k = np.clip(k, 0, n - 1)
        inside = mono <= g_last[k]
        # relative to (guest0, host0) so that float64 keeps the nanoseconds
        g = (mono - (self.ref_ns + self.host0)).astype(np.float64)
        host = g - off[k]
        e = err[k].copy()
        first_stretch = mono < g_first[0]
        # drift allowance away from the samples, before the first and after the last
        drift_before = (g_first[0] - mono) * DRIFT_PPM * 1e-6
        drift_after = (mono - g_last[n - 1]) * DRIFT_PPM * 1e-6
        e = np.where(first_stretch, err[0] + drift_before, e)
        last = (k == n - 1) & ~inside
        e = np.where(last, err[n - 1] + drift_after, e)
        host = np.where(first_stretch, g - off[0], host)
        gap = ~inside & (k < n - 1) & ~first_stretch
        if gap.any():
            for idx in np.unique(k[gap]):
                sel = gap & (k == idx)
                h, er = self._across(int(idx), mono[sel])
                host[sel] = h
                e[sel] = er
        return np.rint(host).astype(np.int64) + np.int64(self.host0), e

    def _across(self, k: int, mono: I64) -> tuple[F64, F64]:
        """Guest times between stretch k's last sample and stretch k+1's first."""
        a, b = self.stretches[k], self.stretches[k + 1]
        step = self.steps[k]
        base_err = max(a.error, b.error)
        g = (mono - (self.ref_ns + self.host0)).astype(np.float64)
        if not step.windows:
            h_a, h_b = g - a.offset, g - b.offset
            return (h_a + h_b) / 2, np.abs(h_a - h_b) / 2 + base_err  # relative to host0
        offsets = [a.offset]
        bounds = []
        for w in step.windows:
            # guest time (relative, like g) when the window began
            bounds.append(w.start_ns - self.host0 + offsets[-1])
            offsets.append(offsets[-1] - w.length_ns)
        residual = abs(b.offset - offsets[-1])
        offsets[-1] = b.offset
        piece = np.searchsorted(np.array(bounds), g, side="left")
        off = np.array(offsets)[piece]
        return g - off, np.full(g.shape, base_err + residual)  # relative to host0

    def lag_series(self) -> tuple[I64, F64, F64, F64]:
        """Per sample: host time, monotonic lag and realtime lag behind the host since the
        first sample (ms), and the error bound (ms)."""
        off0 = self.offset[0] if len(self.offset) else 0.0
        mono_lag = -(self.offset - off0) / 1e6
        real_off = self.offset + (self.real_minus_mono - self.real_minus_mono[0])
        real_lag = -(real_off - off0) / 1e6
        return self.host, mono_lag, real_lag, self.error / 1e6


@dataclass
class Alignment:
    """Every boot's mapping and the steps found.

    :param boots: keyed by (agent, boot_id).
    :param steps: monotonic steps of every boot, in host time order.
    :param realtime_steps: realtime-against-monotonic steps seen in the samples.
    :param windows: the stop windows from the QMP records.
    """

    boots: dict[tuple[str, str], BootAlignment]
    steps: list[OffsetStep]
    realtime_steps: list[OffsetStep]
    windows: list[StopWindow]

    @property
    def method(self) -> Method:
        """The weakest method used by any boot (``guest`` when there are none)."""
        order: list[Method] = ["guest", "guest-realtime", "clock-samples", "ptp"]
        if not self.boots:
            return "guest"
        return min((b.method for b in self.boots.values()), key=order.index)

    def for_segment(self, agent: str, boot_id: str) -> BootAlignment | None:
        """The mapping of one segment, or None."""
        return self.boots.get((agent, boot_id))


def _greedy(host: I64, offset: F64, error: F64, first: int, stop: int) -> list[_Stretch]:
    """Step-free stretches of samples ``first..stop-1`` by interval intersection."""
    out: list[_Stretch] = []
    cur: _Stretch | None = None
    t0 = 0
    for i in range(first, stop):
        slack = SLACK_NS + (0 if cur is None else (host[i] - t0) * DRIFT_PPM * 1e-6)
        lo, hi = offset[i] - error[i] - slack, offset[i] + error[i] + slack
        if cur is not None and lo <= cur.hi and hi >= cur.lo:
            cur.lo, cur.hi, cur.last = max(cur.lo, lo), min(cur.hi, hi), i
            continue
        cur = _Stretch(i, i, offset[i] - error[i], offset[i] + error[i])
        t0 = int(host[i])
        out.append(cur)
    return out


def _stretches(
    host: I64, offset: F64, error: F64, windows: list[StopWindow]
) -> tuple[list[_Stretch], list[tuple[StopWindow, ...]]]:
    """Cut the samples at every stop window (where a freeze is expected), then find
    further steps by intersection within each piece.

    :return: the stretches and, for each gap between consecutive stretches, the stop
        windows that fall in it (empty for a step found by intersection alone).
    """
    n = len(host)
    cuts: dict[int, list[StopWindow]] = {}
    for w in windows:
        c = int(np.searchsorted(host, w.start_ns, side="left"))
        if 0 < c < n:
            cuts.setdefault(c, []).append(w)
    bounds = [0, *sorted(cuts), n]
    stretches: list[_Stretch] = []
    gaps: list[tuple[StopWindow, ...]] = []
    for lo, hi in itertools.pairwise(bounds):
        piece = _greedy(host, offset, error, lo, hi)
        if stretches and piece:
            gaps.append(tuple(cuts.get(lo, ())))
        for j, st in enumerate(piece):
            if j:
                gaps.append(())
            stretches.append(st)
    return stretches, gaps


def _align_boot(
    agent: str, boot_id: str, samples: Sequence[ClockSample], windows: list[StopWindow]
) -> BootAlignment:
    samples = sorted(samples, key=lambda s: s.host_ns)
    host = np.array([s.host_ns for s in samples], dtype=np.int64)
    guest = np.array([s.guest_mono_ns for s in samples], dtype=np.int64)
    rmm = np.array([s.guest_real_ns - s.guest_mono_ns for s in samples], dtype=np.int64)
    ptp = all(s.ptp_offset_ns is not None for s in samples)
    if ptp:
        # host realtime = guest realtime - ptp offset; guest mono - host = ptp - (real - mono)
        off_abs = np.array([s.ptp_offset_ns or 0 for s in samples], dtype=np.int64) - rmm
        error = np.array([max(s.bracket_ns, 1000) for s in samples], dtype=np.float64)
    else:
        off_abs = guest - host
        error = np.array([s.half_rtt_ns for s in samples], dtype=np.float64)
    ref = int(off_abs[0])
    offset = (off_abs - ref).astype(np.float64)  # relative: float64 keeps the nanoseconds
    ba = BootAlignment(
        agent,
        boot_id,
        "ptp" if ptp else "clock-samples",
        host,
        guest,
        offset,
        error,
        rmm,
        ref_ns=ref,
        host0=int(host[0]),
    )
    ba.stretches, gaps = _stretches(host, offset, error, windows)
    for a, b, inside in zip(ba.stretches, ba.stretches[1:], gaps, strict=False):
        ba.steps.append(
            OffsetStep(
                agent,
                boot_id,
                "monotonic",
                int(host[a.last]),
                int(host[b.first]),
                round(b.offset - a.offset),
                round(a.error + b.error),
                inside,
            )
        )
    return ba


def _realtime_steps(ba: BootAlignment) -> list[OffsetStep]:
    out = []
    for i in range(1, len(ba.host)):
        change = int(ba.real_minus_mono[i] - ba.real_minus_mono[i - 1])
        if abs(change) > REALTIME_STEP_NS:
            out.append(
                OffsetStep(
                    ba.agent,
                    ba.boot_id,
                    "realtime",
                    int(ba.host[i - 1]),
                    int(ba.host[i]),
                    change,
                    1000,
                )
            )
    return out


def align(run: Run) -> Alignment:
    """Build the guest-to-host mapping of every segment of a run.

    :param run: what ``load_run`` returned.
    :return: the alignment (see the module docstring for the method).
    """
    windows, _ = stop_windows(run.qmp, run.stop_requests)  # an open STOP has no length
    boots: dict[tuple[str, str], BootAlignment] = {}
    steps: list[OffsetStep] = []
    rsteps: list[OffsetStep] = []
    single_agent = len(run.agents) <= 1
    for seg in run.segments:
        key = (seg.agent, seg.boot_id)
        if key in boots:
            continue
        mine = [
            s
            for s in run.samples
            if s.boot_id == seg.boot_id and (s.agent == seg.agent or single_agent)
        ]
        if mine:
            ba = _align_boot(seg.agent, seg.boot_id, mine, windows)
            steps.extend(ba.steps)
            rsteps.extend(_realtime_steps(ba))
        else:
            rmm = _real_minus_mono(run, seg.index)
            method: Method = "guest-realtime" if run.timeline is not None else "guest"
            empty = np.zeros(0, dtype=np.int64)
            ba = BootAlignment(
                seg.agent,
                seg.boot_id,
                method,
                empty,
                empty,
                np.zeros(0),
                np.zeros(0),
                np.array([rmm], dtype=np.int64),
            )
        boots[key] = ba
    steps.sort(key=lambda s: s.after_host_ns)
    rsteps.sort(key=lambda s: s.after_host_ns)
    return Alignment(boots, steps, rsteps, windows)


def _real_minus_mono(run: Run, seg_index: int) -> int:
    """The guest's realtime minus monotonic from the segment's first event that has both."""
    for ev in run.lifecycle:
        if ev.seg == seg_index:
            real = ev.fields.get("real_ns")
            if isinstance(real, int):
                return real - ev.mono_ns
    for ev in run.warnings + run.clock_steps + run.other:
        if ev.seg == seg_index and isinstance(ev.fields.get("real_ns"), int):
            return int(ev.fields["real_ns"]) - ev.mono_ns
    return 0
