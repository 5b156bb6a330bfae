"""The policy study's report: ``study.json``, ``study.md`` and ``study.html`` of a study DIR.

Input: the study's run directories (``DIR/runs/NAME``, written by ``analysis.lab.study``)
and ``DIR/study.json``'s ``params``. Each run is read by ``read_cell`` into one *cell*
of study.json (the contract in ../shared/DESIGN.md, "The policy study"); nothing in a run
directory is required, so a crashed run still gives a cell:

- ``outcome`` and ``evidence``: ``lab-outcome.json`` (the lab's guest outcome). Without
  it, the exit status of ``tsprobe lab run`` when it names an outcome (0 recovered,
  3 degraded, 4 not-recovered) and the lab wrote its summary; a lab from before
  lab-outcome.json exits 1 for an unhealthy guest: with its summary saying the migration
  completed and the health check failed, ``not-recovered``; otherwise ``lab-error``,
  with the evidence the runner kept (exit status, timeout, the last lines of the lab's
  output). A lab-error is about the lab, not the guest, and is left out of every figure.
- figures from ``lab-summary.json`` (clock lag at resume = ``clock_lag.growth_ns``, the
  vCPU-stop time, the clocksource, kernel warnings) and from the run's report
  ``summary.json`` (per CPU the longest stall and the stalled time, the time some CPUs
  stalled while others ran, the timeouts per ladder T from the switchover on (before it,
  a TCG guest's late wake-ups are the lab's noise): the guest's canaries, a stall count,
  and a peer outside the guest from the clock-lag steps; the phases for the
  QEMU-side recovery time: the end of the last ``postcopy-paused`` to ``completed``).
- from ``vcpu-states.jsonl`` (host truth): ``host_ran_while_blocked_ms``, the time one of
  the guest's vCPU threads ran while another was blocked (userfault or lock-wait) on the
  same QEMU. Under single-threaded TCG all vCPUs share one thread, so it is 0 by
  construction.

Aggregates (``aggregate``) group the cells by scenario x hold x clocksource x accel (as
asked; the regimes seen, QEMU version and TCG threading, are listed per group): the
outcome as k of n, and median, min and max of each figure over the runs with a guest
outcome. ``verdicts`` says per hold (x clocksource x accel) in plain words how the two
policies compared (``paused``: vCPUs kept running, QEMU's behaviour; ``paused-stop``:
vCPUs stopped, the proposed libvirt change) and what the regime lets it claim for KVM
guests. The HTML is self-contained (inline CSS, plots as base64 PNG: outcome against hold
per policy, canary and peer timeouts per T against hold per policy).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from analysis.lab.study import (
    EXIT_OUTCOMES,
    OUTCOME,
    RUNS,
    SUMMARY,
    RunRecord,
    RunSpec,
    StudyParams,
    hold_label,
    write_json_atomic,
)

SCHEMA_VERSION = 1
KIND = "tsprobe-study"
OUTCOMES = ("recovered", "degraded", "not-recovered", "lab-error")
#: What each scenario means as a policy while postcopy is paused.
POLICIES = {"paused": "vCPUs kept running", "paused-stop": "vCPUs stopped"}
OUTCOME_COLOURS = {
    "recovered": "#74c476",
    "degraded": "#fd8d3c",
    "not-recovered": "#de2d26",
    "lab-error": "#bdbdbd",
}
BLOCKED = ("userfault", "lock-wait")
#: Phases before the migration disturbed the guest: their timeouts are the lab's own noise
#: (a TCG guest wakes 1 to 20 ms late) and are left out of the study's counts.
BEFORE_DISTURBANCE = ("before migration", "setup", "precopy")
#: Guest time lost beyond QEMU's stops worth a sentence in the verdict (ms).
LOST_MS = 1000.0


# -- reading one run -------------------------------------------------------------------------


def _json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def _t_key(ms: float) -> str:
    """A ladder T as a key: ``50``, ``1000`` (ms, without a trailing .0)."""
    return f"{ms:g}"


def _cpu_key(label: str) -> str:
    return label.removeprefix("CPU ").strip()


def _run_spec(rundir: Path, record: RunRecord | None, meta: dict[str, Any]) -> dict[str, Any]:
    """The run's place in the study: from its record, else from meta.json's lab options."""
    if record is not None:
        return {
            "scenario": record.scenario,
            "hold_ms": record.hold_ns / 1e6,
            "clocksource": record.clocksource,
            "accel": record.accel,
            "repeat": record.repeat,
        }
    opts = ((meta.get("lab") or {}).get("options")) or {}
    return {
        "scenario": meta.get("scenario") or opts.get("scenario"),
        "hold_ms": (opts.get("hold_ns") or 0) / 1e6,
        "clocksource": opts.get("clocksource") or "default",
        "accel": opts.get("accel") or "auto",
        "repeat": None,
    }


def _outcome(
    rundir: Path, record: RunRecord | None, labsum: dict[str, Any] | None
) -> tuple[str, list[str], dict[str, Any] | None]:
    doc = _json(rundir / OUTCOME)
    if doc is not None and doc.get("outcome") in OUTCOMES:
        evidence = [str(e) for e in doc.get("evidence") or []]
        return str(doc["outcome"]), evidence, doc
    evidence = []
    if doc is not None:
        evidence.append(f"lab-outcome.json has no known outcome: {doc.get('outcome')!r}")
    if record is None:
        return "lab-error", [*evidence, "no study-run.json: the runner never recorded it"], None
    if record.interrupted:
        evidence.append("the run was interrupted (Ctrl-C) before it ended")
    elif record.timed_out:
        evidence.append(f"tsprobe lab run did not end within {record.timeout_s:.0f} s: killed")
    elif record.exit_code in EXIT_OUTCOMES and labsum is not None:
        code = record.exit_code
        return (
            EXIT_OUTCOMES[code],
            [f"no lab-outcome.json: outcome from tsprobe lab run's exit status {code}"],
            None,
        )
    elif record.exit_code == 1 and labsum is not None and _completed(labsum):
        # A lab from before lab-outcome.json: its summary's health is the guest's state.
        health = labsum.get("health") or {}
        problems = [str(p) for p in health.get("problems") or []] or ["health check failed"]
        return (
            "not-recovered",
            [
                "no lab-outcome.json: from lab-summary.json, the migration completed and "
                f"the guest's health check failed: {'; '.join(problems)}"
            ],
            None,
        )
    else:
        evidence.append(f"tsprobe lab run exited with status {record.exit_code}")
    if doc is None:
        evidence.append("no lab-outcome.json")
    lines = [line for line in record.tail if not line.startswith("$ ")][-3:]
    evidence += [f"lab output: {line.strip()}" for line in lines]
    return "lab-error", evidence, None


def _clocksource(outcome_doc: dict[str, Any] | None) -> str | None:
    """The clocksource the guest used: lab-outcome.json's ``clocksource`` (``used``)."""
    value = (outcome_doc or {}).get("clocksource")
    if isinstance(value, dict):
        value = value.get("used") or value.get("requested")
    return value if isinstance(value, str) else None


def _completed(labsum: dict[str, Any]) -> bool:
    """The lab summary's migration completed (and the health check ran)."""
    timeline = labsum.get("timeline_summary") or {}
    return timeline.get("outcome") == "completed" and bool(labsum.get("health"))


def _warnings(outcome_doc: dict[str, Any] | None, labsum: dict[str, Any] | None) -> dict[str, int]:
    if outcome_doc is not None and isinstance(outcome_doc.get("kernel_warnings"), dict):
        return {str(k): int(v) for k, v in outcome_doc["kernel_warnings"].items() if v}
    out: dict[str, int] = {}
    for w in (labsum or {}).get("kernel_warnings") or []:
        if w.get("facility") == 1:  # the lab's own --kmsg line
            continue
        kind = str(w.get("warning") or "unknown")
        out[kind] = out.get(kind, 0) + 1
    return out


def _stalls(summary: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    longest: dict[str, float] = {}
    stalled: dict[str, float] = {}
    for row in summary.get("stalls") or []:
        cpu = _cpu_key(str(row.get("cpu")))
        longest[cpu] = max(longest.get(cpu, 0.0), float(row.get("longest_ms") or 0.0))
        stalled[cpu] = stalled.get(cpu, 0.0) + float(row.get("stalled_ms") or 0.0)
    return {k: round(v, 3) for k, v in longest.items()}, {
        k: round(v, 3) for k, v in stalled.items()
    }


def _timeouts(summary: dict[str, Any]) -> dict[str, Any]:
    """Counts per T (ms key) from the switchover on: canaries (summed and each), stalls, peer."""
    ts = summary.get("timeout_sensitivity") or {}
    ladder = [float(t) for t in ts.get("ladder_ms") or []]
    canaries: dict[str, int] = {_t_key(t): 0 for t in ladder}
    by_canary: dict[str, dict[str, int]] = {}
    stalls: dict[str, int] = {_t_key(t): 0 for t in ladder}
    peer: dict[str, int] = {_t_key(t): 0 for t in ladder}
    for phase in ts.get("phases") or []:
        if str(phase.get("phase")) in BEFORE_DISTURBANCE:
            continue
        for i, t in enumerate(ladder):
            key = _t_key(t)
            for name, counts in (phase.get("canaries") or {}).items():
                n = int(counts[i]) if i < len(counts) else 0
                canaries[key] += n
                row = by_canary.setdefault(name, {_t_key(x): 0 for x in ladder})
                row[key] += n
            for target, source in ((stalls, "stalls"), (peer, "peer")):
                counts = phase.get(source) or []
                target[key] += int(counts[i]) if i < len(counts) else 0
    return {
        "ladder_ms": ladder,
        "timeouts": canaries,
        "timeouts_by_canary": by_canary,
        "stall_timeouts": stalls,
        "peer_timeouts": peer,
    }


def _recovery_ms(summary: dict[str, Any]) -> tuple[float | None, float | None]:
    """(time postcopy-paused, QEMU recovery: end of the last pause to ``completed``)."""
    phases = summary.get("phases") or []
    paused = [p for p in phases if p.get("name") == "postcopy-paused"]
    if not paused:
        return None, None
    pause_ms = sum(float(p.get("length_ms") or 0.0) for p in paused)
    last = paused[-1]
    end = float(last["start_offset_ms"]) + float(last.get("length_ms") or 0.0)
    done = [p for p in phases if p.get("name") == "completed" and p["start_offset_ms"] >= end]
    if not done:
        return round(pause_ms, 3), None
    return round(pause_ms, 3), round(float(done[0]["start_offset_ms"]) - end, 3)


def ran_while_blocked_ms(lines: Iterable[str]) -> float | None:
    """Host time one vCPU thread ran while another of the same QEMU was blocked.

    :param lines: ``vcpu-states.jsonl`` lines.
    :return: milliseconds summed over endpoints, or None without intervals.
    """
    per_endpoint: dict[str, list[tuple[int, int, int, str]]] = {}
    for line in lines:
        try:
            rec = json.loads(line)
            item = (
                int(rec["start_mono_ns"]),
                int(rec["end_mono_ns"]),
                int(rec["vcpu"]),
                str(rec["state"]),
            )
        except (ValueError, KeyError, TypeError):
            continue
        per_endpoint.setdefault(str(rec.get("endpoint")), []).append(item)
    if not per_endpoint:
        return None
    total = 0
    for intervals in per_endpoint.values():
        # Sweep: ends before starts at the same instant; each vCPU's current state.
        events = sorted(
            [(s, 1, v, st) for s, _, v, st in intervals]
            + [(e, 0, v, st) for _, e, v, st in intervals]
        )
        current: dict[int, str] = {}
        last = None
        for t, is_start, vcpu, state in events:
            if last is not None and t > last:
                ran = {v for v, st in current.items() if st == "running"}
                blocked = {v for v, st in current.items() if st in BLOCKED}
                if ran and blocked and ran != blocked:
                    total += t - last
            last = t
            if is_start:
                current[vcpu] = state
            elif current.get(vcpu) == state:
                del current[vcpu]
    return round(total / 1e6, 3)


def read_cell(out: Path, rundir: Path) -> dict[str, Any]:
    """One run directory as a study.json cell (see the module docstring)."""
    record = RunRecord.load(rundir)
    meta = _json(rundir / "meta.json") or {}
    lab = meta.get("lab") or {}
    labsum = _json(rundir / "lab-summary.json")
    summary = _json(rundir / SUMMARY) or {}
    outcome, evidence, outcome_doc = _outcome(rundir, record, labsum)
    lag = (labsum or {}).get("clock_lag") or {}
    longest, stalled = _stalls(summary)
    pause_ms, recovery_ms = _recovery_ms(summary)
    host_ran: float | None = None
    states = rundir / "vcpu-states.jsonl"
    if states.exists():
        with open(states, errors="replace") as f:
            host_ran = ran_while_blocked_ms(f)
    accel_line = lab.get("accel_line")
    cell: dict[str, Any] = {
        **_run_spec(rundir, record, meta),
        "rundir": str(rundir.relative_to(out)) if rundir.is_relative_to(out) else str(rundir),
        "outcome": outcome,
        "evidence": evidence,
        "kernel_warnings": _warnings(outcome_doc, labsum),
        "clocksource_used": _clocksource(outcome_doc) or lag.get("clocksource"),
        "qemu_version": lab.get("qemu_version"),
        "accel_used": accel_line.split(" (")[0] if isinstance(accel_line, str) else None,
        "tcg_threads": lab.get("tcg_threads"),
        "clock_lag_growth_ms": _r((lag.get("growth_ns") or 0) / 1e6)
        if lag.get("growth_ns") is not None
        else None,
        "vcpus_stopped_ms": _r((lag.get("vcpus_stopped_ns") or 0) / 1e6) if lag else None,
        "time_lost_ms": _r(lag["growth_ns"] / 1e6 - (lag.get("vcpus_stopped_ns") or 0) / 1e6)
        if lag.get("growth_ns") is not None
        else None,
        "longest_stall_ms": longest,
        "stalled_ms": stalled,
        "some_stalled_ms": _r(sum(float(x.get("some_ms") or 0.0) for x in summary["asymmetry"]))
        if summary.get("asymmetry") is not None
        else None,
        "host_ran_while_blocked_ms": host_ran,
        "pause_ms": pause_ms,
        "recovery_ms": recovery_ms,
        "migration": (summary.get("migration") or {}).get("outcome"),
        **_timeouts(summary),
        "wall_s": record.wall_s if record else lab.get("wall_s"),
        "exit_code": record.exit_code if record else None,
        "timed_out": record.timed_out if record else False,
        "reported": bool(summary),
    }
    cell["policy"] = POLICIES.get(str(cell["scenario"]), str(cell["scenario"]))
    return cell


# -- study.json ------------------------------------------------------------------------------


def collect_cells(out: Path, plan: Sequence[RunSpec] | None = None) -> list[dict[str, Any]]:
    """A cell per run directory that has run (in plan order when a plan is given)."""
    runs = out / RUNS
    if plan is not None:
        dirs = [runs / spec.name for spec in plan]
    else:
        dirs = sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [
        read_cell(out, d)
        for d in dirs
        if (d / "study-run.json").exists() or (d / "meta.json").exists()
    ]


def write_study_json(
    out: Path, params: StudyParams, plan: Sequence[RunSpec], state: dict[str, Any]
) -> dict[str, Any]:
    """Build and write ``out/study.json`` from the runs done so far; return it."""
    cells = collect_cells(out, plan)
    aggs = aggregate(cells)
    doc: dict[str, Any] = {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "params": params.to_dict(),
        "status": state.get("status"),
        "runs_planned": len(plan),
        "runs_done": len(cells),
        "started_real_ns": state.get("started_real_ns"),
        "updated": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "lock": "per run on the lab lock (TSPROBE_LAB_LOCK, default /tmp/tsprobe-lab.lock)",
        "cells": cells,
        "aggregates": aggs,
        "verdicts": verdicts(aggs),
    }
    write_json_atomic(out / "study.json", doc, sort_keys=False)  # ladder order kept
    return doc


def refresh(out: Path) -> dict[str, Any]:
    """Re-read every run of an existing study and rewrite study.json (``--report-only``).

    :raise LabError: when ``out`` holds no study.
    """
    from analysis.lab.errors import LabError
    from analysis.lab.study import load_study_doc, plan_runs

    old = load_study_doc(out)
    if old is None:
        raise LabError(f"{out} holds no study.json: run tsprobe lab study --out {out} first")
    params = StudyParams.from_dict(old.get("params") or {})
    state = {"status": old.get("status"), "started_real_ns": old.get("started_real_ns")}
    return write_study_json(out, params, plan_runs(params), state)


# -- aggregates ------------------------------------------------------------------------------


def stats(values: Iterable[float | None]) -> dict[str, float | int] | None:
    """Median, min, max and n of the values that are not None (None when there are none)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {
        "median": round(statistics.median(xs), 3),
        "min": round(min(xs), 3),
        "max": round(max(xs), 3),
        "n": len(xs),
    }


def _group_key(cell: dict[str, Any]) -> tuple[str, float, str, str]:
    return (
        str(cell["scenario"]),
        float(cell["hold_ms"]),
        str(cell["clocksource"]),
        str(cell["accel"]),
    )


def outcome_text(counts: dict[str, int], n: int) -> str:
    """``2 of 2 recovered`` or ``1 of 2 degraded, 1 of 2 recovered``."""
    parts = [f"{counts[o]} of {n} {o}" for o in OUTCOMES if counts.get(o)]
    return ", ".join(parts) if parts else "no runs"


def _per_key(cells: list[dict[str, Any]], field: str) -> dict[str, dict[str, float | int] | None]:
    keys: list[str] = []
    for c in cells:
        for k in c.get(field) or {}:
            if k not in keys:
                keys.append(k)
    keys.sort(key=_numeric_first)
    return {k: stats((c.get(field) or {}).get(k) for c in cells) for k in keys}


def _numeric_first(key: str) -> tuple[float, str]:
    """Sort ladder Ts and CPU numbers by value (``50`` before ``1000``)."""
    try:
        return (float(key), key)
    except ValueError:
        return (float("inf"), key)


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario x hold x clocksource x accel: outcomes k of n and figures' spreads."""
    groups: dict[tuple[str, float, str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault(_group_key(cell), []).append(cell)
    out: list[dict[str, Any]] = []
    for key in sorted(groups, key=lambda k: (k[1], k[0], k[2], k[3])):
        members = groups[key]
        good = [c for c in members if c["outcome"] != "lab-error"]
        counts = {o: sum(1 for c in members if c["outcome"] == o) for o in OUTCOMES}
        warn_runs: dict[str, int] = {}
        warn_total: dict[str, int] = {}
        for c in good:
            for kind, n in (c.get("kernel_warnings") or {}).items():
                warn_runs[kind] = warn_runs.get(kind, 0) + 1
                warn_total[kind] = warn_total.get(kind, 0) + int(n)
        regimes = sorted(
            {
                f"QEMU {c['qemu_version']}, {c['accel_used']}"
                for c in members
                if c.get("qemu_version") and c.get("accel_used")
            }
        )
        out.append(
            {
                "scenario": key[0],
                "policy": POLICIES.get(key[0], key[0]),
                "hold_ms": key[1],
                "clocksource": key[2],
                "clocksources_used": sorted(
                    {str(c["clocksource_used"]) for c in good if c.get("clocksource_used")}
                ),
                "accel": key[3],
                "regimes": regimes,
                "tcg_threads": sorted(
                    {str(c["tcg_threads"]) for c in members if c.get("tcg_threads")}
                ),
                "n": len(members),
                "outcomes": counts,
                "outcome_text": outcome_text(counts, len(members)),
                "lab_errors": [c["rundir"] for c in members if c["outcome"] == "lab-error"],
                "longest_stall_ms": _per_key(good, "longest_stall_ms"),
                "stalled_ms": _per_key(good, "stalled_ms"),
                "some_stalled_ms": stats(c.get("some_stalled_ms") for c in good),
                "host_ran_while_blocked_ms": stats(
                    c.get("host_ran_while_blocked_ms") for c in good
                ),
                "timeouts": _per_key(good, "timeouts"),
                "peer_timeouts": _per_key(good, "peer_timeouts"),
                "stall_timeouts": _per_key(good, "stall_timeouts"),
                "kernel_warnings": {
                    k: {"runs": warn_runs[k], "total": warn_total[k]} for k in sorted(warn_runs)
                },
                "clock_lag_growth_ms": stats(c.get("clock_lag_growth_ms") for c in good),
                "vcpus_stopped_ms": stats(c.get("vcpus_stopped_ms") for c in good),
                "time_lost_ms": stats(c.get("time_lost_ms") for c in good),
                "pause_ms": stats(c.get("pause_ms") for c in good),
                "recovery_ms": stats(c.get("recovery_ms") for c in good),
                "evidence": {c["rundir"]: [c["outcome"], *c["evidence"]] for c in members},
            }
        )
    return out


# -- verdicts --------------------------------------------------------------------------------


def _s(ms: float) -> str:
    """Milliseconds said plainly: ``420 ms``, ``2.4 s``, ``31 s``."""
    if abs(ms) < 1000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.3g} s" if abs(ms) < 100_000 else f"{ms / 1000:.0f} s"


def _median(st: dict[str, float | int] | None) -> float | None:
    return None if st is None else float(st["median"])


def _spread(st: dict[str, float | int] | None) -> str:
    if st is None:
        return "-"
    low, high = _s(float(st["min"])), _s(float(st["max"]))
    if st["n"] == 1 or low == high:
        return _s(float(st["median"]))
    return f"{_s(float(st['median']))} ({low}-{high})"


def _count_spread(st: dict[str, float | int] | None) -> str:
    if st is None:
        return "-"
    if st["min"] == st["max"]:
        return f"{st['median']:g}"
    return f"{st['median']:g} ({st['min']:g}-{st['max']:g})"


def _worst_stall(agg: dict[str, Any]) -> float | None:
    values: list[float | None] = [_median(s) for s in agg["longest_stall_ms"].values()]
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _badness(agg: dict[str, Any]) -> float | None:
    """Share of guest-outcome runs that did not recover (None: no such run)."""
    counts: dict[str, int] = agg["outcomes"]
    n = sum(counts[o] for o in ("recovered", "degraded", "not-recovered"))
    if not n:
        return None
    return (counts["degraded"] + 2 * counts["not-recovered"]) / (2 * n)


def regime_claim(regimes: list[str], threads: list[str]) -> str:
    """What a cell's regime can and cannot say about KVM guests."""
    text = ", ".join(regimes) if regimes else "regime unknown (no run reached the lab)"
    if any("kvm" in r for r in regimes):
        return f"Regime: {text}. These runs are KVM guests: the verdict applies to them."
    if "single" in threads:
        return (
            f"Regime: {text}. Under single-threaded TCG every vCPU runs on one host thread, so "
            "a vCPU blocked on a missing page stops all of them: 'vCPUs kept running' "
            "cannot show CPUs running while others wait. What holds for KVM guests: what a "
            "whole-guest stall of the hold's length does to the kernel's watchdogs, the "
            "guest's clock and its applications' timeouts under each policy. What it cannot "
            "claim: how a KVM guest fares when only the vCPUs touching missing pages stall "
            "(KVM vCPUs run guest code without QEMU's big lock) — the uneven stall the "
            "upstream debate worries about."
        )
    return (
        f"Regime: {text}. Under multi-threaded TCG each vCPU has its own host thread, but a "
        "vCPU blocked on a missing page can hold up the others through QEMU's big lock "
        "(the host truth's time some vCPU ran while another was blocked says how much "
        "ran). KVM vCPUs run guest code without that lock, so under KVM the CPUs that touch "
        "no missing page would keep running: these runs understate how uneven a KVM "
        "guest's stalls are with the vCPUs kept running, and say nothing of KVM's "
        "asynchronous page faults."
    )


def _stop_not_applied(agg: dict[str, Any]) -> bool:
    """A paused-stop cell whose vCPUs QEMU did not stop for most of the hold (through
    libvirt 9.0, ``virsh suspend`` on the destination waits for the migration job)."""
    stopped = _median(agg["vcpus_stopped_ms"])
    return (
        agg["scenario"] == "paused-stop" and stopped is not None and (stopped < agg["hold_ms"] / 2)
    )


def _describe(agg: dict[str, Any]) -> str:
    parts = [f"{agg['policy']} ({agg['scenario']}): {agg['outcome_text']}"]
    if _stop_not_applied(agg):
        parts.append(
            "but the policy did not take effect: QEMU had the vCPUs stopped "
            f"{_s(_median(agg['vcpus_stopped_ms']) or 0.0)} in all (median), less than half "
            "the hold, so they ran through the pause (each run's lab-steps.jsonl and "
            "meta.json say why)"
        )
    worst = _worst_stall(agg)
    if worst is not None and worst > 0:
        parts.append(f"longest guest stall {_s(worst)} (median over runs, worst CPU)")
    elif worst is not None:
        parts.append("no stall seen by the guest")
    lag = _median(agg["clock_lag_growth_ms"])
    lost = _median(agg["time_lost_ms"])
    stopped = _median(agg["vcpus_stopped_ms"]) or 0.0
    if lag is not None:
        parts.append(f"guest clock fell {_s(lag)} behind the host")
    if lost is not None and lost >= LOST_MS:
        parts.append(
            f"of which {_s(lost)} while QEMU ran the vCPUs: the guest's clock stood still, "
            "so it could not see that stall on its own clocks"
        )
    elif lag is not None and stopped >= LOST_MS:
        parts.append(
            f"the vCPUs were stopped {_s(stopped)}: a freeze of the guest's clocks, "
            "invisible inside, seen by a peer outside"
        )
    big = [t for t in agg["timeouts"] if float(t) >= 1000]
    canary = {t: _median(agg["timeouts"][t]) for t in big}
    peer = {t: _median(agg["peer_timeouts"].get(t)) for t in big}
    said = [f"{_s(float(t))}: {canary[t]:g}" for t in big if canary[t]]
    if said:
        parts.append("canary timeouts " + ", ".join(said))
    said = [f"{_s(float(t))}: {peer[t]:g}" for t in big if peer[t]]
    if said:
        parts.append("a peer outside the guest would time out at " + ", ".join(said))
    if agg["kernel_warnings"]:
        parts.append(
            "kernel warnings "
            + ", ".join(f"{k} in {v['runs']} run(s)" for k, v in agg["kernel_warnings"].items())
        )
    rec = _median(agg["recovery_ms"])
    if rec is not None:
        parts.append(f"QEMU completed {_s(rec)} after the pause ended")
    if agg["lab_errors"]:
        parts.append(f"{len(agg['lab_errors'])} lab error(s) left out")
    return "; ".join(parts) + "."


def _compare(run: dict[str, Any], stop: dict[str, Any]) -> str:
    b_run, b_stop = _badness(run), _badness(stop)
    if b_run is None or b_stop is None:
        return "No comparison: one policy has no run with a guest outcome."
    if b_stop < b_run:
        lead = "Stopping the vCPUs left the guest in a better state"
    elif b_stop > b_run:
        lead = "Keeping the vCPUs running left the guest in a better state"
    else:
        lead = "Both policies left the guest in the same state"
    lead += f" ({stop['outcome_text']} stopped, against {run['outcome_text']} running)."
    stall_run, stall_stop = _worst_stall(run), _worst_stall(stop)
    lost_run = _median(run["time_lost_ms"])
    extra = ""
    if lost_run is not None and lost_run >= LOST_MS:
        extra += (
            f" With the vCPUs running the guest's clock stood still for {_s(lost_run)} "
            "while QEMU ran it: the guest could not measure that stall (it saw "
            f"{_s(stall_run or 0.0)} at most), and its timers could not fire meanwhile."
        )
        stall_run = None
    if stall_run is not None and stall_stop is not None:
        extra = (
            f" The guest's CPUs stalled {_s(stall_run)} with the vCPUs running and "
            f"{_s(stall_stop)} with them stopped"
        )
        lag_stop = _median(stop["clock_lag_growth_ms"])
        if lag_stop is not None and lag_stop > 2 * max(stall_stop, 1.0):
            extra += (
                f", where the stop froze the guest's clock instead: it fell {_s(lag_stop)} "
                "behind, which the guest cannot see but a peer outside it does"
            )
        extra += "."
    return lead + extra


def verdicts(aggs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per hold x clocksource x accel, the policies compared in plain words."""
    keyed: dict[tuple[float, str, str], dict[str, dict[str, Any]]] = {}
    for agg in aggs:
        keyed.setdefault((agg["hold_ms"], agg["clocksource"], agg["accel"]), {})[
            agg["scenario"]
        ] = agg
    out: list[dict[str, Any]] = []
    for (hold, cs, accel), by_scenario in sorted(keyed.items()):
        regimes = sorted({r for a in by_scenario.values() for r in a["regimes"]})
        threads = sorted({t for a in by_scenario.values() for t in a["tcg_threads"]})
        used = sorted({u for a in by_scenario.values() for u in a["clocksources_used"]})
        cs_text = cs if cs != "default" else "the kernel's choice"
        if used:
            cs_text += f" ({', '.join(used)})"
        sentences = [_describe(a) for a in by_scenario.values()]
        run, stop = by_scenario.get("paused"), by_scenario.get("paused-stop")
        comparison = _compare(run, stop) if run and stop else None
        if stop and _stop_not_applied(stop):
            comparison = (
                "No comparison of the policies: in the paused-stop runs the vCPUs were not "
                "stopped for the pause, so both kept them running."
            )
        out.append(
            {
                "hold_ms": hold,
                "clocksource": cs,
                "accel": accel,
                "title": (
                    f"Hold {hold_label(int(hold * 1e6))}, clocksource {cs_text}, accel {accel}"
                ),
                "policies": sentences,
                "comparison": comparison,
                "regime": regime_claim(regimes, threads),
            }
        )
    return out


# -- rendering -------------------------------------------------------------------------------


# -- plots -----------------------------------------------------------------------------------
