"""The analysis in plain words: one sentence per thing a migration engineer should know.

``findings(analysis, outcome)`` returns ``Finding`` objects, most important first:

- ``outcome``: with a lab run's ``lab-outcome.json`` (``analysis.lab.outcome``), the
  guest's outcome, then its evidence, then what the guest's clock did (a freeze is not a
  stall: what the guest could and could not see of it), before anything else;
- ``label``: how to read the run (single-threaded TCG: symmetric stalls by construction;
  phases unknown for a spool-only run);
- ``stall``: the longest stall of each phase, with its CPU, and asymmetric stalls ("CPU 1
  stalled 4.2 s in postcopy-paused while CPU 0 ran") when a lane was stalled while
  another ran for at least ``ASYM_MIN_NS`` and a tenth of the phase; with host truth,
  the cause of each CPU's longest stall per phase (at least ``ASYM_MIN_NS``) from its vCPU
  thread's host states ("CPU 1 stalled 5.44s: its vCPU thread waited on a QEMU lock while
  vCPU 0 was blocked on a missing page (guest hint: vcpu-blocked)", see
  ``analysis.analyze.host_vcpu``);
- ``clock``: each clock-lag step with its size and error bound, and what explains it
  (the stop windows between its samples); each realtime step (the guest's own
  ``clock_step`` events and the samples);
- ``timeout``: for each phase, the expirations of the largest ladder T that still saw one;
- ``check``: each validation outside its tolerance;
- ``input``: reboots, skipped lines, unknown kinds.

Sizes are written with ``probe.durations.format_duration`` (``4.2s``, ``101ms``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from analysis.analyze.attribution import Analysis
from probe.durations import format_duration

ASYM_MIN_NS = 50_000_000
#: A clock-lag step longer than its stop windows by more than this (and three error
#: bounds) says so: the stop explains only part of it.
UNEXPLAINED_LAG_NS = 100_000_000

Category = Literal["outcome", "label", "stall", "clock", "timeout", "check", "input"]


@dataclass(frozen=True)
class Finding:
    """One sentence, its category and whether it signals a problem (``warn``)."""

    category: Category
    text: str
    warn: bool = False


def _d(ns: float) -> str:
    return format_duration(abs(int(ns)))


def _at(a: Analysis, t: int) -> str:
    return f"+{format_duration(max(0, t - a.origin_ns))}"


def outcome_findings(outcome: Mapping[str, Any]) -> list[Finding]:
    """The guest's outcome, its evidence and the clock notes of a ``lab-outcome.json``.

    :param outcome: the document (``analysis.lab.outcome.Outcome.to_json``).
    :return: the findings (``warn`` unless the guest recovered).
    """
    name = str(outcome.get("outcome"))
    warn = name != "recovered"
    cs = outcome.get("clocksource") or {}
    head = f"guest outcome: {name}"
    if cs.get("used"):
        head += f" (clocksource {cs['used']}{', asked for' if cs.get('requested') else ''})"
    out = [Finding("outcome", head, warn)]
    out += [Finding("outcome", str(e), warn) for e in outcome.get("evidence") or []]
    warnings = outcome.get("kernel_warnings") or {}
    if warnings:
        text = ", ".join(f"{kind} {n}" for kind, n in warnings.items())
        out.append(Finding("outcome", f"kernel warnings after boot: {text}", warn))
    notes = (outcome.get("details") or {}).get("clock_notes") or []
    out += [Finding("clock", str(n)) for n in notes]
    return out


def findings(a: Analysis, outcome: Mapping[str, Any] | None = None) -> list[Finding]:
    """The plain-word findings of an analysis (see the module docstring).

    :param a: what ``analyse`` returned.
    :param outcome: the run's ``lab-outcome.json``, when it has one.
    :return: the findings, the outcome first, then labels.
    """
    out: list[Finding] = outcome_findings(outcome) if outcome else []
    out += [Finding("label", text) for text in a.labels]
    run = a.run
    if not a.phases_known:
        if run.timeline is None:
            out.append(
                Finding(
                    "label",
                    "no QMP records: migration phases are unknown; times are the guest's own clock",
                )
            )
        else:
            out.append(Finding("label", "the QMP records hold no migration: no phases"))
    if not run.has_guest:
        out.append(Finding("label", "no guest events: what the guest felt is unknown"))
    out += _stall_findings(a)
    out += _host_findings(a)
    out += _clock_findings(a)
    out += _timeout_findings(a)
    for c in a.checks:
        if c.ok is False:
            host = "-" if c.host_ns is None else _d(c.host_ns)
            guest = "-" if c.guest_ns is None else _d(c.guest_ns)
            tol = "" if c.tolerance_ns is None else f" (tolerance {_d(c.tolerance_ns)})"
            note = f"; {c.note}" if c.note else ""
            out.append(Finding("check", f"{c.what}: host {host}, guest {guest}{tol}{note}", True))
    for issue in run.notes:
        if "rebooted" in issue.reason:
            out.append(Finding("input", f"{issue.path}:{issue.line}: {issue.reason}", True))
    for kind, count in sorted(run.unknown_kinds.items()):
        out.append(
            Finding("input", f"{count} event(s) of unknown kind {kind!r} kept, not analysed")
        )
    if run.skips:
        out.append(
            Finding("input", f"{len(run.skips)} line(s) skipped (first: {run.skips[0]})", True)
        )
    return out


def _stall_findings(a: Analysis) -> list[Finding]:
    out: list[Finding] = []
    n_lanes = len(a.run.lanes)
    for span in a.spans:
        rows = [s for s in a.stats if s.phase == span.index and s.count]
        if not rows:
            continue
        worst = max(rows, key=lambda s: s.longest_ns)
        total = sum(s.count for s in rows)
        out.append(
            Finding(
                "stall",
                f"{a.phase_label(span.index)}: {total} stall(s); longest "
                f"{_d(worst.longest_ns)} on {a.lane_label(worst.lane)}",
                worst.longest_ns >= 1_000_000_000,
            )
        )
    for s in a.stats:
        span = a.spans[s.phase]
        if n_lanes < 2 or s.alone_ns < ASYM_MIN_NS or s.alone_ns < 0.1 * max(span.length_ns, 1):
            continue
        others = [a.lane_label(i) for i in range(n_lanes) if i != s.lane]
        running = others[0] if len(others) == 1 else "other CPUs"
        out.append(
            Finding(
                "stall",
                f"{a.lane_label(s.lane)} stalled {_d(s.alone_ns)} in {a.phase_label(s.phase)} "
                f"while {running} ran",
                True,
            )
        )
    return out


def _host_findings(a: Analysis) -> list[Finding]:
    """The host's cause of each CPU's longest stall per phase (module docstring)."""
    h = a.host
    if h is None or not h.available:
        return []
    out: list[Finding] = []
    if h.note:
        out.append(Finding("label", h.note))
    p = a.placed
    longest: dict[tuple[int, int], int] = {}
    for k, x in enumerate(h.stalls):
        if x.cause is None or int(p.dur[x.row]) < ASYM_MIN_NS:
            continue
        key = (int(p.phase[x.row]), int(p.lane[x.row]))
        if key not in longest or p.dur[x.row] > p.dur[h.stalls[longest[key]].row]:
            longest[key] = k
    for (phase, _), k in sorted(longest.items()):
        x = h.stalls[k]
        text = f"{a.phase_label(phase)}: {x.text}"
        out.append(Finding("stall", text, int(p.dur[x.row]) >= 1_000_000_000))
    return out


def _clock_findings(a: Analysis) -> list[Finding]:
    out: list[Finding] = []
    for step in a.alignment.steps:
        if step.lag_ns >= 0:
            head = f"the guest clock fell {_d(step.lag_ns)} behind the host"
        else:
            head = f"the guest clock moved {_d(step.lag_ns)} ahead of the host"
        where = f"between {_at(a, step.after_host_ns)} and {_at(a, step.before_host_ns)}"
        text = f"{head} (±{_d(step.error_ns)}) {where}"
        if step.windows:
            what = ", ".join(
                f"{w.stopped_by} STOP -> {w.resumed_by} RESUME {_d(w.length_ns)}"
                for w in step.windows
            )
            stopped = sum(w.length_ns for w in step.windows)
            unexplained = step.lag_ns - stopped
            if unexplained > max(3 * step.error_ns, UNEXPLAINED_LAG_NS):
                text += (
                    f": the vCPUs were stopped only {_d(stopped)} ({what}); the other "
                    f"{_d(unexplained)} the guest's clock lost while QEMU ran the guest"
                )
            else:
                text += f": the vCPUs were stopped ({what}); the guest's clocks did not advance"
        else:
            text += ": no vCPU stop explains it"
        out.append(Finding("clock", text, step.error_ns < abs(step.size_ns)))
    for ev in a.run.clock_steps:
        size = ev.fields.get("step_ns")
        clock = ev.fields.get("clock", "realtime")
        if isinstance(size, int):
            direction = "forward" if size > 0 else "back"
            out.append(
                Finding(
                    "clock",
                    f"the guest's {clock} clock was stepped {direction} by "
                    f"{_d(size)} (guest event, line {ev.line})",
                    True,
                )
            )
    if not a.run.clock_steps:
        for step in a.alignment.realtime_steps:
            direction = "forward" if step.size_ns > 0 else "back"
            out.append(
                Finding(
                    "clock",
                    f"the guest's realtime clock was stepped {direction} by "
                    f"{_d(step.size_ns)} between {_at(a, step.after_host_ns)} and "
                    f"{_at(a, step.before_host_ns)} (clock samples)",
                    True,
                )
            )
    return out


def _timeout_findings(a: Analysis) -> list[Finding]:
    out: list[Finding] = []
    sens = a.sensitivity
    for span in a.spans:
        label = a.phase_label(span.index)
        hit = _longest_hit(sens.ladder, sens.stalls.get(span.index, []))
        if hit:
            t, c = hit
            out.append(
                Finding(
                    "timeout",
                    f"{label}: an application with a {_d(t)} timeout would "
                    f"have seen {c} expiration(s) (one thread per CPU)",
                    t >= 1_000_000_000,
                )
            )
        hit = _longest_hit(sens.ladder, sens.peer.get(span.index, []))
        if hit:
            t, c = hit
            out.append(
                Finding(
                    "timeout",
                    f"{label}: a peer outside the guest with a {_d(t)} timeout would "
                    f"have seen {c} expiration(s) (the guest's clock stood still)",
                )
            )
    return out


def _longest_hit(ladder: list[int], counts: list[int]) -> tuple[int, int] | None:
    """The longest timeout of the ladder with expirations, and how many, or None."""
    hits = [(t, c) for t, c in zip(ladder, counts, strict=False) if c]
    return hits[-1] if hits else None
