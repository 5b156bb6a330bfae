"""The guest clock's lag behind the host's, read from /clock samples over a host window.

While QEMU has the vCPUs stopped the guest's clocks stand still (kvm-clock, and the HPET
under TCG, count QEMU's virtual clock), so after a stop the guest's realtime is behind the
host's by the stop's length until NTP steps it. The lag is ``host realtime - guest
realtime`` at one instant; a /clock sample bounds it.

The rule. The guest read its clocks at some host time between the request's send and the
reply's receipt, so each sample gives ``send - guest_real <= lag <= recv - guest_real``.
The agent reads its clocks last, just before it writes the reply (agent/http.py), so the
upper bound is the close one: it exceeds the lag only by the reply's way out (a few ms
under TCG, where a round trip is 15 to 100 ms and the midpoint would be off by half of
it). Over a window in which the lag does not change, the estimate is the smallest upper
bound of every sample whose round trip lies in the window (sent at or after its start,
received before its end), and the largest lower bound is reported beside it.

``lag_across`` reads it before and after the disturbance: with QEMU's stops (the one
STOP -> RESUME rule, ``analysis.rundir.qmp.stop_windows``) before the first stop and after
the last resume; without stops, between the caller's marks. Its growth is what the guest
lost, to compare with the time QEMU had the vCPUs stopped.

``alignment`` answers a different question with the same samples (where a guest instant
lies on the host's clock, within stretches of constant offset); this module only bounds
the realtime lag in a window, which NTP steps change and alignment's monotonic offset
does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from analysis.rundir.guest_reader import ClockSample
from analysis.rundir.qmp import OpenStop, StopWindow


@dataclass(frozen=True)
class LagReading:
    """The lag over one window: the estimate, its lower bound, how many samples, and the
    round trip of the sample that gave the estimate (all ns)."""

    lag_ns: int
    lower_bound_ns: int
    samples: int
    best_rtt_ns: int

    def to_dict(self) -> dict[str, int]:
        """As JSON."""
        return asdict(self)


def lag_in_window(
    samples: Sequence[ClockSample], start_ns: int | None, end_ns: int | None
) -> LagReading | None:
    """The lag from the samples whose round trip lies in ``[start_ns, end_ns)`` (None: open).

    :return: the reading, or None without samples in the window.
    """
    upper: list[int] = []
    lower: list[int] = []
    rtts: list[int] = []
    for s in samples:
        send, recv = s.host_ns - s.half_rtt_ns, s.host_ns + s.half_rtt_ns
        if (start_ns is None or send >= start_ns) and (end_ns is None or recv < end_ns):
            upper.append(recv - s.guest_real_ns)
            lower.append(send - s.guest_real_ns)
            rtts.append(recv - send)
    if not upper:
        return None
    best = min(range(len(upper)), key=upper.__getitem__)
    return LagReading(upper[best], max(lower), len(upper), rtts[best])


@dataclass(frozen=True)
class LagAcross:
    """The lag before and after the disturbance, against the time the vCPUs were stopped.

    :param before: ``after``: the readings (None without samples in the window).
    :param vcpus_stopped_ns: every closed stop window summed (STOP -> RESUME).
    :param vcpus_stopped_max_ns: the same from each window's ``stop`` command when the lab
        sent one: the clocks stop before every vCPU has left the guest and STOP is sent.
    """

    before: LagReading | None
    after: LagReading | None
    vcpus_stopped_ns: int
    vcpus_stopped_max_ns: int

    @property
    def growth_ns(self) -> int | None:
        """How much the lag grew (None without a reading on either side)."""
        if self.before is None or self.after is None:
            return None
        return self.after.lag_ns - self.before.lag_ns

    def to_dict(self) -> dict[str, Any]:
        """As JSON: ``before``, ``after``, ``growth_ns``, ``vcpus_stopped_ns``, ``..._max_ns``."""
        return {
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
            "growth_ns": self.growth_ns,
            "vcpus_stopped_ns": self.vcpus_stopped_ns,
            "vcpus_stopped_max_ns": self.vcpus_stopped_max_ns,
        }


def lag_across(
    samples: Sequence[ClockSample],
    windows: Sequence[StopWindow],
    still_open: OpenStop | None,
    before: tuple[int | None, int | None],
    after_start_ns: int | None,
) -> LagAcross:
    """The lag before the first stop and after the last resume (see the module docstring).

    :param windows: the closed stop windows; ``still_open`` a STOP never resumed.
    :param before: the baseline window, used with stops for its start only.
    :param after_start_ns: where "after" begins when there are no stops.
    """
    if windows and still_open is None:
        lag_before = lag_in_window(samples, before[0], windows[0].start_ns)
        lag_after = lag_in_window(samples, windows[-1].end_ns, None)
    else:
        lag_before = lag_in_window(samples, *before)
        lag_after = lag_in_window(samples, after_start_ns, None)
    return LagAcross(
        lag_before,
        lag_after,
        sum(w.end_ns - w.start_ns for w in windows),
        sum(w.end_ns - (w.requested_ns or w.start_ns) for w in windows),
    )
