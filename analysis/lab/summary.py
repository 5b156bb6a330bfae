"""The lab's short summary of a run directory (lab-summary.json, lab-summary.txt).

Every figure comes from the report's pipeline (``analysis.analyze.load.load_run`` and
``analysis.analyze.attribution.analyse``): the phases, each guest stall and canary timeout
and kernel warning on the host's clock with the phase it falls in (attribution's rule:
the phase holding most of a stall), and the guest clock's lag before and after the
disturbance (``analysis.analyze.clock_lag``) against the time QEMU had the vCPUs stopped
(the one STOP -> RESUME rule). This module adds what only the lab knows:

- the stalls it injected (``lab-steps.jsonl`` ``inject`` records) with the guest's matching
  stall per CPU and the canary deadlines that fell due inside each freeze;
- its marks (baseline start, disturbance start, settled), which bound the clock-lag
  windows of the scenarios that do not stop the vCPUs;
- the line it wrote to the guest's /dev/kmsg (``--kmsg``) and the agent's own counters
  from its last /metrics (``agent-metrics.prom``, kept by the health check);
- whether the agent's ``seq`` is continuous (no event lost) from one agent; the health
  checks (``lab-health.json``);
- the guest's outcome (``analysis.lab.outcome``), rendered first. Without a stall the text
  never says "none above the threshold" when the guest could not have measured one (its
  clock stood still or lost time, or its CPUs stopped sampling).

The pipeline keeps numbers; the rows here take their other fields (``seq``, ``cause``,
``peer_cpu``, ``gone_ns``, ``text``) from the event's own line, which the pipeline names.
The result is a JSON-ready dict (``lab-summary.json``) and a text rendering
(``lab-summary.txt``). ``summary.json`` is left to ``tsprobe report``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from analysis import rundir
from analysis.analyze.attribution import Analysis, analyse
from analysis.analyze.clock_lag import lag_across
from analysis.analyze.delivery import delivery
from analysis.analyze.load import Run, load_run
from analysis.errors import AnalysisError
from analysis.rundir import jsonl
from analysis.rundir.guest_reader import CAUSES
from analysis.rundir.qmp import OpenStop, StopWindow, stop_windows
from probe.durations import format_duration

STEPS = "lab-steps.jsonl"
HEALTH = "lab-health.json"
AGENT_METRICS = "agent-metrics.prom"
SUMMARY_JSON = "lab-summary.json"
SUMMARY_TXT = "lab-summary.txt"


def stopped_windows(
    closed: Sequence[StopWindow], still_open: OpenStop | None
) -> list[dict[str, Any]]:
    """Every window in which QEMU had the guest's vCPUs stopped, as JSON
    (``analysis.rundir.qmp.stop_windows``: the one STOP -> RESUME rule; the lab's ``stop``
    commands date the freezes they caused, ``requested_ns``).

    :return: ``{"start_ns", "end_ns", "stopped_by", "resumed_by", "requested_ns"}`` in time
        order; a STOP still open at the end is the last, with ``end_ns`` None.
    """
    windows: list[dict[str, Any]] = [
        {
            "start_ns": w.start_ns,
            "end_ns": w.end_ns,
            "stopped_by": w.stopped_by,
            "resumed_by": w.resumed_by,
            "requested_ns": w.requested_ns,
        }
        for w in closed
    ]
    if still_open is not None:
        windows.append(
            {
                "start_ns": still_open.start_ns,
                "end_ns": None,
                "stopped_by": still_open.stopped_by,
                "resumed_by": None,
                "requested_ns": still_open.requested_ns,
            }
        )
    return windows


def agent_counters(path: Path) -> dict[str, dict[str, float]]:
    """The agent's timeout and kernel-warning counters from a saved /metrics page.

    :return: ``{"timeout_expirations": {"CANARY T": n}, "kernel_warnings": {kind: n},
        "events": {kind: n}}``; empty dicts when the page is missing or unreadable.
    """
    out: dict[str, dict[str, float]] = {
        "timeout_expirations": {},
        "kernel_warnings": {},
        "events": {},
    }
    try:
        families = list(text_string_to_metric_families(jsonl.read_text_quietly(path) or ""))
    except (OSError, ValueError):
        return out
    for family in families:
        for sample in family.samples:
            if sample.name == "tsprobe_timeout_expirations_total":
                key = f"{sample.labels.get('canary')} {sample.labels.get('timeout')}"
                out["timeout_expirations"][key] = sample.value
            elif sample.name == "tsprobe_kernel_warnings_total":
                out["kernel_warnings"][str(sample.labels.get("kind"))] = sample.value
            elif sample.name == "tsprobe_events_total":
                out["events"][str(sample.labels.get("kind"))] = sample.value
    return out


class _Lines:
    """The guest events by (segment, line): the fields the pipeline does not keep."""

    def __init__(self, run: Run, read: dict[str, dict[int, dict[str, Any]]]) -> None:
        self._run = run
        self._files = read  # file (as segments name it) -> line -> event, read once

    def get(self, seg: int, line: int) -> dict[str, Any]:
        if not 0 <= seg < len(self._run.segments):
            return {}
        path = self._run.segments[seg].path
        if path not in self._files:
            self._files[path] = dict(rundir.read_jsonl_numbered(path))
        return self._files[path].get(line, {})


def _phase_names(a: Analysis, start: int, end: int) -> list[str]:
    return [s.name for s in a.spans if s.start_ns < end and s.end_ns > start]


def _placed_stalls(a: Analysis, lines: _Lines) -> list[dict[str, Any]]:
    """The guest's stalls on the host's clock, each with its phase (the pipeline's)."""
    st, pl = a.run.stalls, a.placed
    out = []
    for i in range(len(st)):
        event = lines.get(int(st.seg[i]), int(st.line[i]))
        start, end = int(pl.start[i]), int(pl.end[i])
        out.append(
            {
                "seq": event.get("seq"),
                "cpu": a.run.lanes[int(st.lane[i])].cpu,
                "duration_ns": int(st.dur[i]),
                "cause": CAUSES[int(st.cause[i])],
                "host_start_ns": start,
                "host_end_ns": end,
                "phase": a.spans[int(pl.phase[i])].name,
                "phases_overlapped": _phase_names(a, start, max(end, start + 1)),
            }
        )
    return sorted(out, key=lambda s: (s["host_start_ns"], str(s["cpu"])))


def _points(a: Analysis, lines: _Lines, kind: str) -> list[tuple[dict[str, Any], int, str]]:
    """(event, host ns, phase name) of each placed point of a kind, in host time order."""
    return [
        (lines.get(p.seg, p.line), p.host_ns, a.spans[p.phase].name)
        for p in sorted(a.points, key=lambda p: p.host_ns)
        if p.kind == kind
    ]


def _timeouts(a: Analysis, lines: _Lines) -> list[dict[str, Any]]:
    """The canaries' ``timeout`` events, each on the host's clock and in its phase."""
    return [
        {
            "seq": event.get("seq"),
            "canary": event.get("canary"),
            "timeout": format_duration(int(event.get("timeout_ns") or 0)),
            "timeout_ns": event.get("timeout_ns"),
            "cpu": event.get("cpu"),
            "peer_cpu": event.get("peer_cpu"),
            "late_ns": event.get("duration_ns"),
            "gone_ns": event.get("gone_ns"),
            "host_ns": host,
            "phase": phase,
        }
        for event, host, phase in _points(a, lines, "timeout")
    ]


def _per_phase(timeouts: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    """``{canary: {T: {phase: count}}}``, T in ladder order."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for t in sorted(timeouts, key=lambda t: (str(t["canary"]), int(t["timeout_ns"] or 0))):
        slot = out.setdefault(str(t["canary"]), {}).setdefault(t["timeout"], {})
        slot[t["phase"]] = slot.get(t["phase"], 0) + 1
    return out


def summarize(path: Path) -> dict[str, Any]:
    """Summarize a lab run directory.

    :param path: the run directory.
    :return: a JSON-ready dict (see the module docstring); ``error`` when the pipeline could
        not read the run (the lab-only facts are there still).
    """
    meta: dict[str, Any] = jsonl.read_document_quietly(path / rundir.META) or {}
    lab = meta.get("lab", {})
    events_path = path / rundir.GUEST_EVENTS
    events = dict(rundir.read_jsonl_numbered(events_path))  # by line: also the rows' fields
    steps = jsonl.records_quietly(path / STEPS)
    marks = {s["name"]: int(s["host_real_ns"]) for s in steps if s.get("type") == "mark"}
    counters = agent_counters(path / AGENT_METRICS)
    summary: dict[str, Any] = {
        "run": str(path),
        "scenario": meta.get("scenario"),
        "lab": lab,
        "kmsg_written": [s.get("text") for s in steps if s.get("type") == "kmsg"],
        "agent_counters": counters,
        "continuity": _continuity(list(events.values()), counters, meta),
        "health": jsonl.read_document_quietly(path / HEALTH) or {},
        "marks": marks,
    }
    try:
        a = analyse(load_run(path))
    except AnalysisError as err:
        summary["error"] = str(err)
        a = None
    read = {jsonl.printable(events_path): events}
    summary.update(_figures(a, marks, bool(lab.get("migrates")), read))
    summary["injected"] = _injected(steps, summary["stalls"], summary["timeouts"])
    return summary


def _figures(
    a: Analysis | None,
    marks: dict[str, int],
    migrates: bool,
    read: dict[str, dict[int, dict[str, Any]]],
) -> dict[str, Any]:
    """What the pipeline computed, in the lab summary's rows (``read``: the events files
    already read, by line)."""
    if a is None:
        return {
            "phases": [],
            "timeline_summary": None,
            "stalls": [],
            "stalls_per_cpu_phase": {},
            "timeouts": [],
            "timeouts_per_phase": {},
            "kernel_warnings": [],
            "clock_steps": [],
            "clock_lag": None,
            "delivery": None,
        }
    run = a.run
    timeline = run.timeline if migrates and any(run.qmp.values()) else None
    lines = _Lines(run, read)
    stalls = _placed_stalls(a, lines)
    timeouts = _timeouts(a, lines)
    closed, still_open = stop_windows(run.qmp, run.stop_requests)
    lag = lag_across(
        run.samples,
        closed,
        still_open,
        (marks.get("baseline_start"), marks.get("disturb_start")),
        marks.get("settled"),
    )
    return {
        "phases": [
            {"name": p.name, "start_ns": p.start_ns, "duration_ns": p.duration_ns}
            for p in (timeline.phases if timeline else ())
        ],
        "timeline_summary": timeline.summary().to_dict() if timeline else None,
        "stalls": stalls,
        "stalls_per_cpu_phase": _per_cpu_phase(stalls),
        "timeouts": timeouts,
        "timeouts_per_phase": _per_phase(timeouts),
        "kernel_warnings": [
            {
                "warning": e.get("warning"),
                "cpu": e.get("cpu"),
                "facility": e.get("facility"),
                "text": e.get("text"),
                "phase": phase,
            }
            for e, _, phase in _points(a, lines, "kernel_warning")
        ],
        "clock_steps": [
            {
                "clock": e.fields.get("clock"),
                "step_ns": e.fields.get("step_ns"),
                "bracket_ns": e.fields.get("bracket_ns"),
            }
            for e in run.clock_steps
        ],
        "delivery": sent.to_dict() if (sent := delivery(run, a.alignment, a.spans)) else None,
        "clock_lag": {
            **lag.to_dict(),
            "stopped_windows": stopped_windows(closed, still_open),
            "clocksource": next((s.clocksource for s in run.segments if s.clocksource), None),
        },
    }


def _continuity(
    events: list[dict[str, Any]], counters: dict[str, dict[str, float]], meta: dict[str, Any]
) -> dict[str, Any]:
    """Whether the agent's ``seq`` is continuous: no event lost, in order, one agent, and
    none after the last one that arrived.

    The tail is checked against three readings the events cannot give: the agent's own
    count of the events it appended (``tsprobe_events_total`` of its last /metrics, asked
    for before the recorder's last fetch, so every event it counts was there for that
    fetch; ``unfetched``), whether the recorder's last fetch got through (meta.json,
    ``last_fetch_failed``), and the guest's workers that had not reported past the end
    when the recording stopped (meta.json, ``workers_behind``: what they measured last
    never reached the agent's log).
    """
    seqs = [int(e["seq"]) for e in events if "seq" in e]
    agent_ids = sorted({str(e.get("agent_id")) for e in events if e.get("kind") == "agent_start"})
    missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs)) if seqs else []
    counted = sum(counters.get("events", {}).values())
    unfetched = None
    if counted and len(agent_ids) == 1:  # its count and its seq both start at its start
        unfetched = max(0, int(counted) - (seqs[-1] if seqs else 0))
    agents = meta.get("agents")
    known = [a for a in agents.values() if isinstance(a, dict)] if isinstance(agents, dict) else []
    failed = any(a.get("final_fetch") is False for a in known)
    behind = sorted(
        str(unit)
        for a in known
        if a.get("drained") is False and isinstance(a.get("workers_behind"), dict)
        for unit in a["workers_behind"]
    )
    return {
        "events": len(seqs),
        "first_seq": seqs[0] if seqs else None,
        "last_seq": seqs[-1] if seqs else None,
        "missing": missing[:50],
        "missing_count": len(missing),
        "unfetched": unfetched,
        "last_fetch_failed": failed,
        "workers_behind": behind,
        "in_order": seqs == sorted(seqs) and len(set(seqs)) == len(seqs),
        "agent_starts": len(agent_ids),
        "continuous": bool(seqs)
        and not missing
        and seqs == sorted(set(seqs))
        and not unfetched
        and not behind,
    }


def _per_cpu_phase(stalls: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per CPU and phase: the count, the longest and the total of the stalls."""
    per_cpu: dict[str, dict[str, dict[str, Any]]] = {}
    for stall in stalls:
        slot = per_cpu.setdefault(str(stall["cpu"]), {}).setdefault(
            stall["phase"], {"count": 0, "longest_ns": 0, "total_ns": 0}
        )
        slot["count"] += 1
        slot["longest_ns"] = max(slot["longest_ns"], int(stall["duration_ns"] or 0))
        slot["total_ns"] += int(stall["duration_ns"] or 0)
    return per_cpu


def _injected(
    steps: list[dict[str, Any]], stalls: list[dict[str, Any]], timeouts: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each injected freeze with the guest's matching stalls and the deadlines inside it."""
    injected = []
    for step in steps:
        if step.get("type") != "inject":
            continue
        freeze = int(step["freeze_ns"])
        t0, t1 = int(step["host_start_ns"]), int(step["host_end_ns"])
        match: dict[str, Any] = {}
        for stall in stalls:
            start = stall["host_start_ns"]
            if start is None or stall["duration_ns"] is None:
                continue
            # The guest's gap begins at its last sample before the freeze.
            if t0 - 1_000_000_000 <= start <= t1 and int(stall["duration_ns"]) >= freeze // 2:
                match.setdefault(str(stall["cpu"]), []).append(int(stall["duration_ns"]))
        expired: dict[str, dict[str, dict[str, int]]] = {}
        for t in timeouts:
            # A deadline that fell due inside the freeze (with 20 ms for the clock map's
            # error and the freeze taking hold: a heartbeat's is its peer's last beat + T).
            if t["host_ns"] is not None and t0 - 20_000_000 <= t["host_ns"] <= t1 + 20_000_000:
                by_cpu = expired.setdefault(t["canary"], {}).setdefault(str(t["cpu"]), {})
                by_cpu[t["timeout"]] = by_cpu.get(t["timeout"], 0) + 1
        injected.append({**step, "guest_stalls_ns": match, "guest_timeouts": expired})
    return injected


def _ms(ns: Any) -> str:
    return "-" if ns is None else f"{int(ns) / 1e6:.1f} ms"


def _no_stalls(outcome: dict[str, Any]) -> str:
    """What "no stall" means: nothing happened, or the guest could not measure it."""
    details = outcome.get("details") or {}
    blind = []
    if details.get("standstills"):
        blind.append("its clock stood still while it ran")
    lost = details.get("time_lost_ms")
    if lost is not None and lost > 1000:
        blind.append(f"its clock lost {lost / 1000:.1f} s that QEMU did not stop it for")
    if any(float(v) <= 0 for v in (details.get("samples_per_s") or {}).values()):
        blind.append("CPUs stopped sampling")
    if not blind:
        return "none above the threshold"
    return "none reported, and the guest could not have seen them: " + "; ".join(blind)


def render(summary: dict[str, Any]) -> str:
    """The summary as a few lines of text."""
    outcome = summary.get("guest_outcome") or {}
    lines: list[str] = []
    lines += _outcome_lines(outcome)
    lines += _run_lines(summary)
    lines += _stall_lines(summary, outcome)
    for canary, per_t in summary.get("timeouts_per_phase", {}).items():
        parts = [
            f"{t}: " + ", ".join(f"{phase} {n}" for phase, n in phases.items())
            for t, phases in per_t.items()
        ]
        lines.append(f"  {canary} expirations per phase: " + "; ".join(parts))
    for warning in summary.get("kernel_warnings", []):
        lines.append(
            f"  kernel warning {warning['warning']} (facility {warning['facility']}, "
            f"{warning['phase']}): {warning['text']}"
        )
    for step in summary["clock_steps"]:
        lines.append(f"  clock step: {step['clock']} {_ms(step['step_ns'])}")
    lag = summary["clock_lag"]
    lines.append(
        f"  guest clock lag behind host ({lag.get('clocksource')}): before "
        f"{_ms((lag['before'] or {}).get('lag_ns'))}, "
        f"after {_ms((lag['after'] or {}).get('lag_ns'))}"
        f", growth {_ms(lag['growth_ns'])}; vCPUs stopped by QEMU {_ms(lag['vcpus_stopped_ns'])}"
        + (
            f" (up to {_ms(lag['vcpus_stopped_max_ns'])} from the `stop` command: the clocks"
            " stop before every vCPU has left the guest)"
            if lag.get("vcpus_stopped_max_ns", 0) > lag["vcpus_stopped_ns"]
            else ""
        )
    )
    sent = summary.get("delivery")
    if sent:
        lines.append(
            f"  events reached the recorder: p50 {_ms(sent['p50_ns'])}, p99 {_ms(sent['p99_ns'])},"
            f" max {_ms(sent['max_ns'])} ({sent['worst_kind']}), {sent['late']} of"
            f" {sent['events']} later than 1 s"
        )
    cont = summary["continuity"]
    gaps = [f"{cont['missing_count']} missing"] if cont["missing_count"] else []
    if cont.get("unfetched"):
        gaps.append(f"{cont['unfetched']} the agent counted never arrived")
    if cont.get("workers_behind"):
        gaps.append(f"{', '.join(cont['workers_behind'])} had not reported past the end")
    state = "continuous" if cont["continuous"] else ", ".join(gaps) or "not continuous"
    if cont.get("last_fetch_failed"):
        state += " (the recorder's last fetch failed: later events unknown)"
    lines.append(
        f"  events: {cont['events']} (seq {cont['first_seq']}..{cont['last_seq']}), "
        f"{state}, agent starts {cont['agent_starts']}"
    )
    health = summary.get("health") or {}
    memory = health.get("memory")
    if isinstance(memory, dict) and "bad_pages" in memory:
        lines.append(
            f"  memory: {memory['bad_pages']} bad of {memory.get('pages')} workload pages "
            f"({memory.get('checks')} page checks over {memory.get('passes')} passes)"
        )
    lines.append(
        f"  lab health checks (the guest's outcome is above): "
        f"{'ok' if health.get('ok') else 'NOT OK'}"
        + (f" ({'; '.join(health.get('problems', []))})" if health.get("problems") else "")
    )
    return "\n".join(lines)


def _outcome_lines(outcome: dict[str, Any]) -> list[str]:
    """The guest's outcome first: its evidence, kernel warnings and clock notes."""
    lines: list[str] = []
    if not outcome:
        return lines
    cs = outcome.get("clocksource") or {}
    lines.append(
        f"guest outcome: {outcome['outcome']} (clocksource {cs.get('used') or '?'}, "
        f"{'asked for' if cs.get('requested') else 'the kernel choice'})"
    )
    lines += [f"  - {e}" for e in outcome.get("evidence", [])]
    warnings = outcome.get("kernel_warnings") or {}
    if warnings:
        lines.append("  kernel warnings: " + ", ".join(f"{k} {n}" for k, n in warnings.items()))
    lines += [f"  clock: {n}" for n in (outcome.get("details") or {}).get("clock_notes", [])]
    return lines


def _run_lines(summary: dict[str, Any]) -> list[str]:
    """The scenario, QEMU and guest, and the migration's phases and downtime."""
    lab = summary.get("lab", {})
    lines: list[str] = []
    lines.append(f"scenario {summary.get('scenario')}: {summary.get('run')}")
    if lab.get("qemu_version"):
        lines.append(
            f"  QEMU {lab['qemu_version']} ({lab.get('qemu_binary')}): {lab.get('accel_line')}"
        )
    lines.append(
        f"  guest: {lab.get('accel')}, {lab.get('vcpus')} vCPUs, {lab.get('mem_mb')} MiB, "
        f"workload {lab.get('workload') or 'none'}; boot to agent {lab.get('boot_s')} s; "
        f"wall {lab.get('wall_s')} s"
    )
    if summary["phases"]:
        lines.append(
            "  phases: "
            + ", ".join(f"{p['name']} {_ms(p['duration_ns'])}" for p in summary["phases"])
        )
        ts = summary.get("timeline_summary") or {}
        lines.append(
            f"  downtime (src STOP -> dst RESUME) {_ms(ts.get('downtime_ns'))}, QEMU downtime "
            f"{ts.get('qemu_downtime_ms')} ms, postcopy blocktime "
            f"{ts.get('postcopy_blocktime_ms')} ms per vCPU {ts.get('postcopy_vcpu_blocktime_ms')}"
        )
    return lines


def _stall_lines(summary: dict[str, Any], outcome: dict[str, Any]) -> list[str]:
    """Stalls per CPU and phase, the long ones across phases, and the injected freezes."""
    lines: list[str] = []
    for cpu, phases in sorted(summary["stalls_per_cpu_phase"].items()):
        parts = [
            f"{name} {v['count']}x longest {_ms(v['longest_ns'])}" for name, v in phases.items()
        ]
        lines.append(f"  CPU {cpu} stalls: " + "; ".join(parts))
    for stall in summary["stalls"]:
        if int(stall["duration_ns"] or 0) >= 1_000_000_000 and stall["phases_overlapped"]:
            lines.append(
                f"    CPU {stall['cpu']}: {_ms(stall['duration_ns'])} over "
                + " > ".join(stall["phases_overlapped"])
            )
    if not summary["stalls_per_cpu_phase"]:
        lines.append("  stalls: " + _no_stalls(outcome))
    for inj in summary["injected"]:
        got = ", ".join(
            f"CPU {cpu} {'/'.join(_ms(v) for v in vals)}"
            for cpu, vals in sorted(inj["guest_stalls_ns"].items())
        )
        lines.append(
            f"  injected {inj['what']} {_ms(inj['freeze_ns'])} (host-measured): guest saw "
            f"{got or 'nothing'}"
        )
        for canary, cpus in sorted(inj.get("guest_timeouts", {}).items()):
            got = "; ".join(
                f"CPU {cpu} " + ", ".join(f"{t} {n}x" for t, n in per_t.items())
                for cpu, per_t in sorted(cpus.items())
            )
            lines.append(f"    {canary} deadlines expired inside it: {got}")
    return lines


def write_summary(run: Path) -> dict[str, Any]:
    """Summarize ``run``, classify the guest's outcome (``analysis.lab.outcome``) and write
    lab-summary.json (with ``guest_outcome``), lab-summary.txt and lab-outcome.json.

    :return: the summary.
    """
    from analysis.lab.outcome import classify, write_outcome

    summary = summarize(run)
    outcome = classify(run, summary)
    write_outcome(run, outcome)
    summary["guest_outcome"] = outcome.to_json()
    rundir.write_json_atomic(run / SUMMARY_JSON, summary)
    (run / SUMMARY_TXT).write_text(render(summary) + "\n")
    return summary
