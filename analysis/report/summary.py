"""``summary.json``: every figure of an analysed run in one JSON document.

``build_summary(analysis)`` is the document (schema in docs/summary-schema.md,
``schema_version`` ``SCHEMA_VERSION``), the one source of every figure:
``analysis.report.render`` turns it into report.md and report.html, ``compare`` sets
several side by side. Nothing here formats.

A lab run's guest outcome (``lab-outcome.json``, ``analysis.lab.outcome``) leads it:
summary.json ``guest_outcome``, which the renderings put above everything else, followed
among the findings by what the guest's clock did. With host truth
(``vcpu-states.jsonl``) the document carries ``host_vcpu`` (states per phase x vCPU) and
the longest stalls with their host cause; a run without host truth says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis.analyze.attribution import CAUSES_DOC, Analysis
from analysis.analyze.findings import findings
from analysis.analyze.host_vcpu import HostTruth, state_ms
from analysis.analyze.load import Run
from analysis.rundir.jsonl import read_document_quietly

SCHEMA_VERSION = 1
#: The lab's outcome file (``analysis.lab.outcome.OUTCOME_FILE``; the lab's modules are
#: not imported by the report).
OUTCOME_FILE = "lab-outcome.json"
MAX_ISSUES = 50
#: Stalls listed with their host truth in summary.json (the longest, in time order).
MAX_HOST_STALLS = 200
#: Stalls shown in the report's host-cause table (the longest).
SHOW_HOST_STALLS = 20


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def build_summary(a: Analysis) -> dict[str, Any]:
    """The run's figures as one JSON-ready dict (docs/summary-schema.md).

    :param a: what ``analyse`` returned.
    :return: the document.
    """
    run = a.run
    tl = run.timeline
    outcome = guest_outcome(run.path)
    summary = tl.summary().to_dict() if tl is not None else None
    host_vcpu, host_truth, host_stalls = _host(a)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "tsprobe-report",
        "rundir": str(run.path),
        "scenario": run.meta.get("scenario"),
        "accel": run.accel,
        "qemu": _qemu(run.meta),
        "phases_known": a.phases_known,
        "origin_ns": a.origin_ns,
        "labels": a.labels,
        "migration": summary,
        "phases": _phase_rows(a),
        "cpus": [a.lane_label(i) for i in range(len(run.lanes))],
        "stall_cause_codes": CAUSES_DOC,
        "stalls": _stall_rows(a),
        "asymmetry": [
            {"phase": a.phase_label(x.phase), "some_ms": _ms(x.some_ns), "all_ms": _ms(x.all_ns)}
            for x in a.asymmetry
        ],
        "timeout_sensitivity": _sensitivity(a),
        "validation": [
            {
                "what": c.what,
                "host_ms": _ms(c.host_ns),
                "guest_ms": _ms(c.guest_ns),
                "tolerance_ms": _ms(c.tolerance_ns),
                "ok": c.ok,
                "note": c.note,
            }
            for c in a.checks
        ],
        "host_truth": host_truth,
        "host_vcpu": host_vcpu,
        "host_stalls": host_stalls,
        "clock_steps": _clock_steps(a),
        "kernel_warnings": [
            {
                "offset_ms": _ms(p.host_ns - a.origin_ns),
                "phase": a.phase_label(p.phase),
                "warning": p.label,
                "near_boundary": p.near,
                "line": p.line,
            }
            for p in a.points
            if p.kind == "kernel_warning"
        ],
        "alignment": _alignment(a),
        "guest_outcome": outcome,
        "findings": [
            {"category": f.category, "text": f.text, "warn": f.warn} for f in findings(a, outcome)
        ],
        "input": _input(run),
    }


def _phase_rows(a: Analysis) -> list[dict[str, Any]]:
    """``phases``: one row per phase span, offsets from the origin."""
    return [
        {
            "index": s.index,
            "name": s.name,
            "label": a.phase_label(s.index),
            "start_offset_ms": _ms(s.start_ns - a.origin_ns),
            "start_ns": s.start_ns,
            "length_ms": _ms(s.length_ns),
            "vm_stopped": s.vm_stopped,
        }
        for s in a.spans
    ]


def _stall_rows(a: Analysis) -> list[dict[str, Any]]:
    """``stalls``: per phase x CPU, the stall statistics."""
    return [
        {
            "phase": a.phase_label(s.phase),
            "phase_index": s.phase,
            "cpu": a.lane_label(s.lane),
            "count": s.count,
            "stalled_ms": _ms(s.stalled_ns),
            "fraction": round(s.fraction, 4),
            "longest_ms": _ms(s.longest_ns),
            "p50_ms": _ms(s.p50_ns),
            "p99_ms": _ms(s.p99_ns),
            "alone_ms": _ms(s.alone_ns),
        }
        for s in a.stats
    ]


def _sensitivity(a: Analysis) -> dict[str, Any]:
    """``timeout_sensitivity``: the ladder and, per phase, the expirations."""
    sens = a.sensitivity
    return {
        "ladder_ms": [_ms(t) for t in sens.ladder],
        "phases": [
            {
                "phase": a.phase_label(p),
                "stalls": sens.stalls.get(p, []),
                "worst_cpu": sens.worst_lane.get(p, []),
                "canaries": sens.canary.get(p, {}),
                "peer": sens.peer.get(p, []),
            }
            for p in range(len(a.spans))
        ],
    }


def _clock_steps(a: Analysis) -> list[dict[str, Any]]:
    """``clock_steps``: monotonic and realtime steps, with the stop windows."""
    return [
        {
            "agent": s.agent,
            "boot_id": s.boot_id,
            "clock": s.clock,
            "at_offset_ms": _ms(s.at_ns - a.origin_ns),
            "between_offset_ms": [
                _ms(s.after_host_ns - a.origin_ns),
                _ms(s.before_host_ns - a.origin_ns),
            ],
            "size_ms": _ms(s.size_ns),
            "lag_ms": _ms(s.lag_ns),
            "error_ms": _ms(s.error_ns),
            "stopped_ms": _ms(s.stopped_ns) if s.windows else None,
            "windows": [
                {
                    "stopped_by": w.stopped_by,
                    "resumed_by": w.resumed_by,
                    "length_ms": _ms(w.length_ns),
                }
                for w in s.windows
            ],
        }
        for s in a.alignment.steps + a.alignment.realtime_steps
    ]


def _alignment(a: Analysis) -> dict[str, Any]:
    """``alignment``: the method, per boot its samples and stretches, the error."""
    boots = [
        {
            "agent": b.agent,
            "boot_id": b.boot_id,
            "method": b.method,
            "samples": len(b.host),
            "stretches": [
                {"samples": st.last - st.first + 1, "error_ms": _ms(st.error)} for st in b.stretches
            ],
        }
        for b in a.alignment.boots.values()
    ]
    errs = [e for e in a.placed.err.tolist() if e == e]  # drop NaN
    return {
        "method": a.alignment.method,
        "boots": boots,
        "max_error_ms": _ms(max(errs)) if errs else None,
        "stalls_near_boundary": int(a.placed.near.sum()),
    }


def _input(run: Run) -> dict[str, Any]:
    """``input``: what was skipped or noted, the guest events read, the segments."""
    return {
        "skipped": len(run.skips),
        "notes": len(run.notes),
        "issues": [
            {"file": i.path, "line": i.line, "reason": i.reason, "severity": i.severity}
            for i in run.issues[:MAX_ISSUES]
        ],
        "guest_events": {
            "stalls": len(run.stalls),
            "timeouts": len(run.timeouts),
            "kernel_warnings": len(run.warnings),
            "clock_steps": len(run.clock_steps),
            "unknown_kinds": dict(run.unknown_kinds),
        },
        "segments": [
            {"agent": s.agent, "boot_id": s.boot_id, "file": s.path, "first_line": s.first_line}
            for s in run.segments
        ],
    }


def guest_outcome(path: Path) -> dict[str, Any] | None:
    """A lab run's ``lab-outcome.json`` (``analysis.lab.outcome``), or None without one.

    :param path: the run directory.
    """
    doc = read_document_quietly(path / OUTCOME_FILE)
    return doc if isinstance(doc, dict) and isinstance(doc.get("outcome"), str) else None


def _host(a: Analysis) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """``host_vcpu``, ``host_truth`` and ``host_stalls`` (docs/summary-schema.md)."""
    h: HostTruth | None = a.host
    if h is None or not h.available:
        note = h.note if h is not None else "no host truth"
        return [], {"available": False, "note": note}, []
    rows = [
        {
            "phase": a.phase_label(r.phase),
            "phase_index": r.phase,
            "endpoint": r.endpoint,
            "vcpu": r.vcpu,
            "ran_guest": r.ran_guest,
            "state_ms": state_ms(r.state_ns),
            "unsampled_ms": _ms(r.unsampled_ns),
        }
        for r in h.phases
    ]
    p = a.placed
    order = sorted(h.stalls, key=lambda x: -int(p.dur[x.row]))[:MAX_HOST_STALLS]
    order.sort(key=lambda x: int(p.start[x.row]))
    stalls = [
        {
            "cpu": a.lane_label(int(p.lane[x.row])),
            "phase": a.phase_label(int(p.phase[x.row])),
            "start_offset_ms": _ms(int(p.start[x.row]) - a.origin_ns),
            "length_ms": _ms(int(p.dur[x.row])),
            "guest_cause": CAUSES_DOC[int(p.cause[x.row])]
            if 0 <= int(p.cause[x.row]) < len(CAUSES_DOC)
            else "unknown",
            "host_cause": x.cause,
            "vcpu": x.vcpu,
            "endpoints": list(x.endpoints),
            "state_ms": state_ms(x.state_ns),
            "unsampled_ms": _ms(x.unsampled_ns),
            "others": [
                {"vcpu": o.vcpu, "state": o.state, "ms": _ms(o.ns), "same_thread": o.same_thread}
                for o in x.others
            ],
            "text": x.text,
            "lock_shared_with": list(x.lock_shared_with),
        }
        for x in order
    ]
    causes: dict[str, int] = {}
    for x in h.stalls:
        key = x.cause or "none"
        causes[key] = causes.get(key, 0) + 1
    truth = {
        "available": True,
        "note": h.note,
        "endpoints": h.endpoints,
        "vcpus": h.vcpus,
        "poll_ms": {ep: _ms(ns) for ep, ns in h.poll_ns.items()},
        "threshold_ms": _ms(h.threshold_ns),
        "ran_guest": [
            {
                "endpoint": ep,
                "from_offset_ms": _ms(lo - a.origin_ns),
                "to_offset_ms": _ms(hi - a.origin_ns),
            }
            for lo, hi, ep in h.pieces
        ],
        "stall_causes": causes,
        "stalls_total": len(h.stalls),
        "stalls_listed": len(stalls),
        "sampler": a.run.vcpu_sampler,
    }
    return rows, truth, stalls


def _qemu(meta: dict[str, Any]) -> dict[str, Any]:
    """Which QEMU ran the guest and how: QMP's versions per endpoint, the lab's accelerator."""
    versions = (meta.get("versions") or {}).get("qemu") or {}
    lab = meta.get("lab")
    accel = lab.get("accel_line") if isinstance(lab, dict) else None
    return {
        "versions": {str(k): str(v) for k, v in versions.items()}
        if isinstance(versions, dict)
        else {},
        "accel": accel if isinstance(accel, str) else None,
    }
