"""The lab's short summary of a run directory (lab-summary.json, lab-summary.txt).

``summarize(rundir)`` reads what ``tsprobe lab run`` left there and answers:

- phases: ``analysis.analyze.timeline_io.read_timeline`` over ``qmp-*.jsonl`` (the one
  reader of the QMP records; none for the stall scenarios, which do not migrate);
- the guest's stalls per CPU and per phase. A stall's start is a guest CLOCK_REALTIME
  reading; it is put on the host's clock with the offset of the last ``/clock`` sample
  taken before it (in guest time), so a stall that began in ``postcopy-paused`` lands
  there even though the guest's clock fell behind the host's during the switchover;
- the guest clock's lag behind the host (host realtime minus guest realtime, from
  ``clock-samples.jsonl``) before and after the disturbance, and its growth; against it,
  the time QEMU had the guest's vCPUs stopped (every ``STOP`` to the next ``RESUME``,
  QEMU's own timestamps), which is what kvm-clock and the HPET hide from the guest. The
  lag changes only while the vCPUs are stopped, so "before" is read from every sample
  whose round trip ended before the first stop (from the baseline's start) and "after"
  from every sample sent after the last resume; without stops (the stall scenarios),
  the windows are the baseline and the time after the guest settled (``lab-steps.jsonl``
  marks). Each is the smallest upper bound of its window (``ClockMap.lag``);
- the stalls injected by the host (``lab-steps.jsonl`` ``inject`` records) and the guest's
  matching stall per CPU;
- the canaries' ``timeout`` events (each placed in the phase where its deadline fell
  due, on the host's clock like a stall's start), counted per canary, ``T`` and phase,
  and for each injected freeze the expirations whose deadline fell inside it;
- kernel warnings, the line the lab wrote to /dev/kmsg (``--kmsg``) and the agent's own
  counters from its last /metrics (``agent-metrics.prom``, kept by the health check):
  ``tsprobe_timeout_expirations_total`` and ``tsprobe_kernel_warnings_total``;
- clock steps the guest reported; whether the agent's ``seq`` is continuous (no event
  lost) from one agent; the health checks (``lab-health.json``);
- the guest's outcome (``analysis.lab.outcome``), rendered first. Without a stall the text
  never says "none above the threshold" when the guest could not have measured one (its
  clock stood still or lost time, or its CPUs stopped sampling).

The result is a JSON-ready dict (``lab-summary.json``) and a text rendering
(``lab-summary.txt``). ``summary.json`` is left to ``tsprobe report``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from analysis import rundir
from analysis.analyze.load import is_stop_command
from analysis.analyze.timeline_io import read_timeline
from analysis.analyze.timeline_model import Timeline
from analysis.rundir import jsonl
from analysis.rundir.qmp import stop_windows
from probe.durations import format_duration

STEPS = "lab-steps.jsonl"
HEALTH = "lab-health.json"
AGENT_METRICS = "agent-metrics.prom"
SUMMARY_JSON = "lab-summary.json"
SUMMARY_TXT = "lab-summary.txt"


def _records(path: Path) -> list[dict[str, Any]]:
    return jsonl.records_quietly(path)


def stopped_windows(
    qmp: dict[str, list[dict[str, Any]]], steps: Iterable[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Every window in which QEMU had the guest's vCPUs stopped, as JSON
    (``analysis.rundir.qmp.stop_windows``: the one STOP -> RESUME rule).

    :param qmp: records per endpoint.
    :param steps: ``lab-steps.jsonl``: its ``stop`` commands date the freezes they caused
        (``requested_ns``; see ``analysis.rundir.qmp.stop_request``).
    :return: ``{"start_ns", "end_ns", "stopped_by", "resumed_by", "requested_ns"}`` in time
        order; a STOP still open at the end is the last, with ``end_ns`` None.
    """
    closed, still_open = stop_windows(qmp, [s for s in steps if is_stop_command(s)])
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


class ClockMap:
    """Guest realtime -> host realtime, from the /clock samples and QEMU's stops.

    While QEMU has the vCPUs stopped the guest's clocks stand still (kvm-clock, and the
    HPET under TCG, count QEMU's virtual clock), so a guest time maps to the host through
    the last sample before it plus every stopped window in between.
    """

    def __init__(
        self,
        samples: Iterable[dict[str, Any]],
        stopped: Iterable[dict[str, Any]] = (),
    ) -> None:
        self.stopped = [w for w in stopped if w.get("end_ns") is not None]
        self.samples = sorted(
            (
                s
                for s in samples
                if isinstance(s.get("clock"), dict) and "realtime_ns" in s["clock"]
            ),
            key=lambda s: int(s["host_real_ns"]),
        )

    @staticmethod
    def offset(sample: dict[str, Any]) -> int:
        """Guest realtime minus host realtime of a sample (at the reply's receipt: the
        agent reads its clocks just before it answers; see ``lag``)."""
        return int(sample["clock"]["realtime_ns"]) - int(sample["host_recv_real_ns"])

    def to_host(self, guest_real_ns: int) -> int | None:
        """The host time of a guest realtime reading.

        :return: host realtime in ns, or None without samples.
        """
        best = None
        for sample in self.samples:
            if int(sample["clock"]["realtime_ns"]) <= guest_real_ns:
                best = sample
        if best is None:
            best = self.samples[0] if self.samples else None
        if best is None:
            return None
        host = guest_real_ns - self.offset(best)
        since = int(best["host_recv_real_ns"])
        for window in self.stopped:
            if since <= window["start_ns"] < host:
                host += window["end_ns"] - window["start_ns"]
        return host

    def lag(self, start_ns: int | None, end_ns: int | None) -> dict[str, Any] | None:
        """Host minus guest realtime from the samples whose round trip lies in a host time
        window (sent at or after ``start_ns``, received before ``end_ns``).

        The guest read its clocks at some host time between the request's send and the
        reply's receipt, so each sample bounds the lag: ``send - guest <= lag <= recv -
        guest``. The agent reads its clocks last, just before it writes the reply
        (agent/http.py), so the upper bound is the close one: it exceeds the lag only by
        the reply's way out (a few ms under TCG, where a round trip takes 15 to 100 ms
        and the midpoint would be off by half of it). The estimate is the smallest upper
        bound in the window; the largest lower bound is reported beside it.

        :return: ``{"lag_ns", "lower_bound_ns", "samples", "best_rtt_ns"}`` or None
            without samples.
        """
        window = [
            s
            for s in self.samples
            if (start_ns is None or int(s["host_send_real_ns"]) >= start_ns)
            and (end_ns is None or int(s["host_recv_real_ns"]) < end_ns)
        ]
        if not window:
            return None
        upper = [int(s["host_recv_real_ns"]) - int(s["clock"]["realtime_ns"]) for s in window]
        lower = [int(s["host_send_real_ns"]) - int(s["clock"]["realtime_ns"]) for s in window]
        best = min(range(len(window)), key=lambda i: upper[i])
        return {
            "lag_ns": upper[best],
            "lower_bound_ns": max(lower),
            "samples": len(window),
            "best_rtt_ns": int(window[best]["rtt_ns"]),
        }


def _phase_name(timeline: Timeline | None, host_ns: int | None) -> str:
    if timeline is None or host_ns is None:
        return "-"
    phase = timeline.phase_at(host_ns)
    if phase is None:
        return "before" if timeline.phases and host_ns < timeline.phases[0].start_ns else "-"
    return phase.name


def _overlapped(timeline: Timeline | None, start: int | None, end: int | None) -> list[str]:
    if timeline is None or start is None or end is None:
        return []
    return [
        p.name
        for p in timeline.phases
        if p.start_ns < end and (p.end_ns is None or p.end_ns > start)
    ]


def _timeouts(
    events: list[dict[str, Any]], clock: ClockMap, timeline: Timeline | None
) -> list[dict[str, Any]]:
    """The canaries' ``timeout`` events, each on the host's clock and in its phase."""
    out = []
    for event in events:
        if event.get("kind") != "timeout" or "real_ns" not in event:
            continue
        host = clock.to_host(int(event["real_ns"]))
        out.append(
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
                "phase": _phase_name(timeline, host),
            }
        )
    return out


def _per_phase(timeouts: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    """``{canary: {T: {phase: count}}}``, T in ladder order."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for t in sorted(timeouts, key=lambda t: (str(t["canary"]), int(t["timeout_ns"] or 0))):
        slot = out.setdefault(str(t["canary"]), {}).setdefault(t["timeout"], {})
        slot[t["phase"]] = slot.get(t["phase"], 0) + 1
    return out


def agent_counters(path: Path) -> dict[str, dict[str, float]]:
    """The agent's timeout and kernel-warning counters from a saved /metrics page.

    :return: ``{"timeout_expirations": {"CANARY T": n}, "kernel_warnings": {kind: n}}``;
        empty dicts when the page is missing or unreadable.
    """
    out: dict[str, dict[str, float]] = {"timeout_expirations": {}, "kernel_warnings": {}}
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
    return out


def summarize(run: Path) -> dict[str, Any]:
    """Summarize a lab run directory.

    :param run: the run directory.
    :return: a JSON-ready dict (see the module docstring).
    """
    meta: dict[str, Any] = jsonl.read_document_quietly(run / rundir.META) or {}
    lab = meta.get("lab", {})
    qmp, built = read_timeline(run, lambda _issue: None)  # the one QMP reader, quietly
    timeline = built if any(qmp.values()) and lab.get("migrates") else None
    events = _records(run / rundir.GUEST_EVENTS)
    steps = _records(run / STEPS)
    windows = stopped_windows(qmp, steps)
    clock = ClockMap(_records(run / rundir.CLOCK_SAMPLES), windows)
    health = jsonl.read_document_quietly(run / HEALTH) or {}
    marks = {s["name"]: int(s["host_real_ns"]) for s in steps if s.get("type") == "mark"}

    continuity = _continuity(events)

    stalls = _placed_stalls(events, clock, timeline)
    per_cpu = _per_cpu_phase(stalls)

    steps_seen = [
        {"clock": e.get("clock"), "step_ns": e.get("step_ns"), "bracket_ns": e.get("bracket_ns")}
        for e in events
        if e.get("kind") == "clock_step"
    ]
    lag = _clock_lag(windows, clock, marks)

    timeouts = _timeouts(events, clock, timeline)
    injected = _injected(steps, stalls, timeouts)

    summary: dict[str, Any] = {
        "run": str(run),
        "scenario": meta.get("scenario"),
        "lab": lab,
        "phases": [
            {"name": p.name, "start_ns": p.start_ns, "duration_ns": p.duration_ns}
            for p in (timeline.phases if timeline else ())
        ],
        "timeline_summary": timeline.summary().to_dict() if timeline else None,
        "stalls": stalls,
        "stalls_per_cpu_phase": per_cpu,
        "timeouts": timeouts,
        "timeouts_per_phase": _per_phase(timeouts),
        "kernel_warnings": [
            {
                "warning": e.get("warning"),
                "cpu": e.get("cpu"),
                "facility": e.get("facility"),
                "text": e.get("text"),
                "phase": _phase_name(timeline, clock.to_host(int(e["real_ns"]))),
            }
            for e in events
            if e.get("kind") == "kernel_warning" and "real_ns" in e
        ],
        "kmsg_written": [s.get("text") for s in steps if s.get("type") == "kmsg"],
        "agent_counters": agent_counters(run / AGENT_METRICS),
        "clock_steps": steps_seen,
        "clock_lag": lag,
        "injected": injected,
        "continuity": continuity,
        "health": health,
        "marks": marks,
    }
    return summary


def _continuity(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the agent's ``seq`` is continuous: no event lost, in order, one agent."""
    seqs = [int(e["seq"]) for e in events if "seq" in e]
    agent_ids = sorted({str(e.get("agent_id")) for e in events if e.get("kind") == "agent_start"})
    missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs)) if seqs else []
    return {
        "events": len(seqs),
        "first_seq": seqs[0] if seqs else None,
        "last_seq": seqs[-1] if seqs else None,
        "missing": missing[:50],
        "missing_count": len(missing),
        "in_order": seqs == sorted(seqs) and len(set(seqs)) == len(seqs),
        "agent_starts": len(agent_ids),
        "continuous": bool(seqs) and not missing and seqs == sorted(set(seqs)),
    }


def _placed_stalls(
    events: list[dict[str, Any]], clock: ClockMap, timeline: Timeline | None
) -> list[dict[str, Any]]:
    """The guest's stalls on the host's clock, each with the phase it began in."""
    stalls: list[dict[str, Any]] = []
    for event in events:
        if event.get("kind") != "stall":
            continue
        start_host = clock.to_host(int(event["real_ns"]))
        end_host = clock.to_host(int(event["real_ns"]) + int(event.get("duration_ns") or 0))
        stalls.append(
            {
                "seq": event.get("seq"),
                "cpu": event.get("cpu"),
                "duration_ns": event.get("duration_ns"),
                "cause": event.get("cause"),
                "host_start_ns": start_host,
                "host_end_ns": end_host,
                "phase": _phase_name(timeline, start_host),
                "phases_overlapped": _overlapped(timeline, start_host, end_host),
            }
        )
    return stalls


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


def _clock_lag(
    windows: list[dict[str, Any]], clock: ClockMap, marks: dict[str, int]
) -> dict[str, Any]:
    """The guest clock's lag before and after the disturbance, against the vCPU stops."""
    if windows and windows[-1]["end_ns"] is not None:
        before = clock.lag(marks.get("baseline_start"), windows[0]["start_ns"])
        after = clock.lag(windows[-1]["end_ns"], None)
    else:
        before = clock.lag(marks.get("baseline_start"), marks.get("disturb_start"))
        after = clock.lag(marks.get("settled"), None)
    ended = [w for w in windows if w["end_ns"] is not None]
    stopped_ns = sum(w["end_ns"] - w["start_ns"] for w in ended)
    stopped_max_ns = sum(w["end_ns"] - (w["requested_ns"] or w["start_ns"]) for w in ended)
    return {
        "before": before,
        "after": after,
        "growth_ns": (after["lag_ns"] - before["lag_ns"]) if before and after else None,
        "vcpus_stopped_ns": stopped_ns,
        "vcpus_stopped_max_ns": stopped_max_ns,
        "stopped_windows": windows,
        "clocksource": next(
            (s["clock"].get("clocksource") for s in clock.samples if "clocksource" in s["clock"]),
            None,
        ),
    }


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
    cont = summary["continuity"]
    state = "continuous" if cont["continuous"] else f"{cont['missing_count']} missing"
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
