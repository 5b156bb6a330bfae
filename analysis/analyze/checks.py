"""Validation: the host's own truth against what the guest measured, one ``Check`` each.

Every figure the host knows independently of the guest is compared with the guest's:

- a window in which QEMU had the vCPUs stopped (``analysis.rundir.qmp.stop_windows``)
  against the clock-lag step the guest's clock took over it (kvm-clock and the emulated
  clocks stand still while stopped); counted from the ``stop`` command where the lab
  sent one, since the clocks stop before STOP is emitted; QEMU's own downtime against the
  same step (for postcopy it leaves out most of the switchover);
- a freeze the lab injected and measured on the host against the frozen vCPU's stall,
  and against its siblings (which should run on);
- per phase x vCPU, the host's blocked time (``host_vcpu``) against the guest's stalled
  time, and QEMU's ``postcopy-vcpu-blocktime`` against the guest's stalls where that
  QEMU reports it reliably (``RELIABLE_BLOCKTIME`` and later).

A tolerance is 10 % of the reference plus 5 ms plus the error bound the alignment gives;
a check that cannot be measured (no clock sample on both sides) says so (``ok`` None).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from analysis.analyze.alignment import Alignment
from analysis.analyze.host_vcpu import BLOCKED, HostTruth
from analysis.analyze.load import Run
from analysis.analyze.spans import I64, Placed, Span, span_label
from analysis.analyze.timeline_model import POSTCOPY_STATUSES, Summary
from analysis.rundir.qmp import StopWindow
from probe.durations import format_duration

#: The first QEMU whose postcopy-vcpu-blocktime is trusted (upstream rewrote it in 10.1).
RELIABLE_BLOCKTIME = (10, 1)


@dataclass(frozen=True)
class Check:
    """One host-truth-against-guest comparison."""

    what: str
    host_ns: int | None
    guest_ns: int | None
    tolerance_ns: int | None
    ok: bool | None
    note: str = ""


def _tol(reference: int, extra: float = 0.0) -> int:
    return int(0.10 * abs(reference) + 5_000_000 + extra)


def qemu_version(run: Run) -> tuple[int, int] | None:
    """(major, minor) of the destination's QEMU from meta.json ``versions.qemu`` (an
    endpoint -> ``"7.2.22 Debian ..."`` mapping, or one string), else of any endpoint."""
    versions = run.meta.get("versions")
    qemu = versions.get("qemu") if isinstance(versions, dict) else None
    texts: list[str] = []
    if isinstance(qemu, str):
        texts = [qemu]
    elif isinstance(qemu, dict):
        dst = (
            [ep.name for ep in run.timeline.endpoints if ep.role == "destination"]
            if (run.timeline is not None)
            else []
        )
        names = dst + sorted(qemu)
        texts = [qemu[n] for n in names if isinstance(qemu.get(n), str)]
    for text in texts:
        m = re.match(r"\s*(\d+)\.(\d+)", text)
        if m:
            return int(m[1]), int(m[2])
    return None


def validate(
    run: Run,
    al: Alignment,
    placed: Placed,
    stalled: I64,
    spans: list[Span],
    host: HostTruth | None = None,
) -> list[Check]:
    """Every check of the run (the module docstring), in that order."""
    out: list[Check] = []
    summary = run.timeline.summary() if run.timeline is not None else None
    out += _stop_checks(al, summary, spans)
    out += _inject_checks(run, placed)
    if host is not None:
        out += _host_checks(host, spans)
    if summary is not None and summary.postcopy_vcpu_blocktime_ms:
        out += _blocktime_checks(run, summary.postcopy_vcpu_blocktime_ms, stalled, spans, host)
    return out


def _stop_checks(al: Alignment, summary: Summary | None, spans: list[Span]) -> list[Check]:
    """Each stop window against the guest's clock-lag step (and QEMU's downtime)."""
    out: list[Check] = []
    matched: set[StopWindow] = set()
    for step in al.steps:
        if not step.windows:
            continue
        matched.update(step.windows)
        stop, stop_max = step.stopped_ns, step.stopped_max_ns
        what = ", ".join(f"{w.stopped_by} STOP -> {w.resumed_by} RESUME" for w in step.windows)
        tol = _tol(stop, step.error_ns)
        note = f"step error bound {step.error_ns / 1e6:.1f} ms"
        if stop_max > stop:
            # The clocks stopped when `stop` began; STOP came when every vCPU had left
            # the guest (analysis.rundir.qmp.stop_request): the freeze lies between the two.
            note += (
                f"; the clocks stopped up to {(stop_max - stop) / 1e6:.1f} ms before STOP "
                "(`stop` waited for every vCPU to leave the guest)"
            )
        out.append(
            Check(
                f"vCPUs stopped ({what}) vs guest clock-lag step",
                stop,
                step.lag_ns,
                tol + (stop_max - stop),
                stop - tol <= step.lag_ns <= stop_max + tol,
                note,
            )
        )
        if summary is not None and summary.qemu_downtime_ms is not None:
            qd = summary.qemu_downtime_ms * 1_000_000
            tol = _tol(qd, step.error_ns)
            note = (
                "QEMU downtime leaves out most of the postcopy switchover"
                if any(s.name == "switchover" for s in spans)
                else ""
            )
            out.append(
                Check(
                    "QEMU downtime vs guest clock-lag step",
                    qd,
                    step.lag_ns,
                    tol,
                    abs(step.lag_ns - qd) <= tol,
                    note,
                )
            )
    for w in al.windows:
        if w not in matched and al.boots:
            out.append(
                Check(
                    f"vCPUs stopped ({w.stopped_by} STOP -> {w.resumed_by} RESUME) vs guest clock",
                    w.length_ns,
                    None,
                    None,
                    None,
                    "no clock sample on both sides of the stop: not measurable",
                )
            )
    return out


def _inject_checks(run: Run, placed: Placed) -> list[Check]:
    """Each injected freeze against the frozen vCPU's stall and its siblings'."""
    out: list[Check] = []
    lanes = run.lanes
    for inj in run.injects:
        h0, h1 = int(inj["host_start_ns"]), int(inj["host_end_ns"])
        freeze = int(inj.get("freeze_ns", h1 - h0))
        cpu = inj.get("cpu")
        what = str(inj.get("what", "freeze"))
        for li, lane in enumerate(lanes):
            e = np.nan_to_num(placed.err, nan=0.0)
            hit = (placed.lane == li) & (placed.start <= h1 + e) & (placed.end >= h0 - e)
            longest = int(placed.dur[hit].max()) if hit.any() else 0
            if cpu is None or cpu == lane.cpu:
                err = float(e[hit].max()) if hit.any() else 0.0
                tol = _tol(freeze, err)
                out.append(
                    Check(
                        f"host-measured {what} vs {lanes[li].label(False)}'s stall",
                        freeze,
                        longest or None,
                        tol,
                        abs(longest - freeze) <= tol if longest else False,
                    )
                )
            else:
                out.append(
                    Check(
                        f"host-measured {what} vs {lanes[li].label(False)} (should run on)",
                        freeze,
                        longest,
                        freeze // 2,
                        longest < freeze // 2,
                        "a sibling of the frozen vCPU",
                    )
                )
    return out


def _host_checks(host: HostTruth, spans: list[Span]) -> list[Check]:
    """Per phase x vCPU: guest stalled time vs the host's blocked time (host_vcpu)."""
    out = []
    blocked = ", ".join(BLOCKED)
    for c in host.comparisons:
        note = f"{c.runs} blocked run(s) of {format_duration(host.threshold_ns)} or more"
        if c.rest_ns:
            rest = ", ".join(f"{k} {format_duration(ns)}" for k, ns in c.rest_ns.items())
            note += f"; not counted as blocked: {rest}"
        if c.ok is None:
            note += f"; host truth covers {100 * c.coverage:.0f} % of the phase"
        out.append(
            Check(
                f"vCPU {c.vcpu} blocked on the host ({blocked}) vs CPU {c.vcpu} stalled in "
                f"{span_label(spans, c.phase)}",
                c.host_ns,
                c.guest_ns,
                c.tolerance_ns,
                c.ok,
                note,
            )
        )
    return out


def _blocktime_checks(
    run: Run,
    blocktime_ms: tuple[int, ...],
    stalled: I64,
    spans: list[Span],
    host: HostTruth | None,
) -> list[Check]:
    """QEMU's postcopy-vcpu-blocktime as a cross-check of QEMU's own figure.

    QEMU before 10.1 is known to report it wrong (upstream rewrote it in 10.1): there the
    check only says what QEMU's figure was (``ok`` None), it judges nothing.
    """
    out = []
    lanes = run.lanes
    post = [s.index for s in spans if s.name in POSTCOPY_STATUSES or s.name == "switchover"]
    version = qemu_version(run)
    unreliable = version is not None and version < RELIABLE_BLOCKTIME
    for cpu, ms_value in enumerate(blocktime_ms):
        found = next((i for i, ln in enumerate(lanes) if ln.cpu == cpu), None)
        qemu_ns = ms_value * 1_000_000
        tol = int(0.25 * qemu_ns + 100_000_000)
        what = f"QEMU cross-check: postcopy-vcpu-blocktime vCPU {cpu}"
        if unreliable and version is not None:
            note = (
                f"QEMU's blocktime ({version[0]}.{version[1]}, known unreliable before "
                f"{RELIABLE_BLOCKTIME[0]}.{RELIABLE_BLOCKTIME[1]}) says {ms_value} ms"
            )
        else:
            note = "blocktime counts page-fault waits only"
        if host is not None and host.available:
            fault = host.userfault_ns(cpu, [(spans[p].start_ns, spans[p].end_ns) for p in post])
            if fault is not None:
                note += f"; host truth: vCPU {cpu} blocked on missing pages {fault / 1e6:.0f} ms"
        if found is None:
            out.append(Check(what, qemu_ns, None, tol, None, note))
            continue
        guest = int(stalled[found, post].sum()) if post else 0
        ok = None if unreliable else abs(guest - qemu_ns) <= tol
        out.append(Check(f"{what} vs CPU {cpu} stalled in postcopy", qemu_ns, guest, tol, ok, note))
    return out
