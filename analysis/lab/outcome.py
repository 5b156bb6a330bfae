"""What the guest lived through in a lab run, apart from the lab's own health: its outcome.

``classify(rundir)`` is a pure function over a finished run directory (the files of
docs/run-directory.md; nothing is asked of a QEMU or a guest). It names one outcome, the
evidence for it as plain sentences that each name their source file, the kernel warnings
by kind and a few figures (``details``). The lab writes it as ``lab-outcome.json`` and
``tsprobe lab run`` exits with its code (``EXIT_CODES``).

Outcomes, the first that applies:

``lab-error`` (5)
    the lab could not carry the run out, so the guest's fate says nothing: the lab stopped
    on an error (a ``lab_error`` record in lab-steps.jsonl: QEMU died or never booted the
    guest's agent, a command failed or timed out), the run ended before the health check
    (no lab-health.json), the final QEMU exited, a migration did not complete, or the
    memory workload found pages that lost a write (QEMU corrupted the guest).
``not-recovered`` (4)
    the migration was never recovered (a ``recovery_failed`` step: the management stack's
    recovery left the destination in postcopy-paused, so the guest never ran whole again;
    the lab ended the run there, without a health check), or
    in the settle time after the disturbance (``lab-health.json`` ``settle_s``: from the
    agent's first answer) the guest did not come back: a CPU took no sample, the agent did
    not answer, a probe stayed down, the guest's clock stood still while the guest answered
    (for ``STANDSTILL_NS`` or more between /clock answers: its timers could not fire), or
    the guest panicked or booted again (console ``Kernel panic``, a second
    ``tsprobe-lab: init at`` line, a second boot id in clock-samples.jsonl or
    guest-events.jsonl).
``degraded`` (3)
    the guest came back but was hurt: a kernel warning of a kind in ``HURTING`` after the
    guest booted (the console's and the agent's, one count per record), a kernel oops on
    the console, or guest time lost: the guest clock fell behind the host's by more than
    ``LOST_TIME_NS`` beyond the time QEMU had the vCPUs stopped (a stop freezes kvm-clock
    and the HPET with the vCPUs, which is no loss; the clock lag is read as in
    ``analysis.lab.summary``).
``recovered`` (0)
    every CPU sampled again, the agent answered, no kernel warning of those kinds, no time
    lost beyond the stops.

Kernel warnings are counted per kind of ``probe.kmsg_patterns`` from the serial consoles
(``serial-src.log``, ``serial-dst.log``) and the agent's ``kernel_warning`` events and
``tsprobe_kernel_warnings_total``. One record seen by both counts once: a console line
``[  36.123456] text`` is the agent's event whose ``mono_ns`` is that timestamp in ns. The
agent's counter adds only what its events lack. Lines the lab wrote to /dev/kmsg itself
(``--kmsg``: facility 1 in the events, the text in lab-steps.jsonl) and console lines
printed before the agent was up (boot) are kept in ``details`` and change no outcome.
Kinds outside ``HURTING`` (a clocksource switch, a slow hrtimer interrupt, ...) are
counted and reported but change no outcome by themselves.

The guest's clock. A QEMU stop freezes the guest's clocks with its vCPUs (kvm-clock; the
HPET and the TSC under TCG count QEMU's virtual clock): such a freeze is not a stall, the
guest cannot see it on its own clocks and its timeouts do not expire for it; only an
outside clock shows it (the host's /clock samples here). ``details["clock_notes"]`` says
so whenever the vCPUs were stopped, and when the guest's clock stood still while QEMU ran
it (a 32-bit clocksource such as the HPET cannot bridge a gap longer than half its wrap).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis import rundir
from analysis.rundir import jsonl
from probe.durations import format_duration
from probe.kmsg_patterns import WARNING_KINDS
from probe.kmsg_patterns import classify as classify_kmsg

OUTCOME_FILE = "lab-outcome.json"
OUTCOMES = ("recovered", "degraded", "not-recovered", "lab-error")
#: ``tsprobe lab run``'s exit code per outcome (1 and 2 are the tool's own errors).
EXIT_CODES = {"recovered": 0, "degraded": 3, "not-recovered": 4, "lab-error": 5}
#: Warning kinds that make a guest ``degraded``: every kind the kmsg probe knows but those
#: that only say the kernel noticed time going oddly and coped (a clocksource switch, a
#: slow interrupt handler, a throttled real-time task).
HURTING = frozenset(WARNING_KINDS) - {
    "clocksource_switch", "sched_clock_unstable", "rt_throttling",
    "hrtimer_slow", "perf_interrupt_slow", "nmi_handler_slow",
}  # fmt: skip
#: Guest time lost beyond the vCPU-stop windows that makes a guest ``degraded``: well
#: above the clock lag's error (a /clock reply's way back, tens of ms under TCG).
LOST_TIME_NS = 1_000_000_000
#: The guest's CLOCK_MONOTONIC unchanged between /clock answers spanning this much host
#: time: its timers could not fire (``not-recovered``).
STANDSTILL_NS = 2_000_000_000
SERIAL_LOGS = ("serial-src.log", "serial-dst.log")
#: The first line of the lab guest's init (analysis/lab/init.sh): one per boot.
INIT_LINE = "tsprobe-lab: init at"
AGENT_UP_LINE = "tsprobe-lab: agent up at"
PANIC = re.compile(r"Kernel panic")
OOPS = re.compile(r"Oops|BUG: unable to handle|general protection fault|WARNING: CPU")
_STAMP = re.compile(r"^\[\s*(\d+)\.(\d{6})\]\s?(.*)$")


@dataclass(frozen=True)
class Outcome:
    """A run's guest outcome (see the module docstring)."""

    #: One of ``OUTCOMES``.
    name: str
    #: Sentences, each naming its source (a file of the run directory).
    evidence: tuple[str, ...]
    #: Kernel warnings after boot by kind, each record once (``probe.kmsg_patterns``).
    kernel_warnings: dict[str, int]
    #: The clocksource asked for (None: the kernel's choice), the one the guest used (the
    #: agent's /clock, else its init's console line) and every one /clock reported.
    clocksource: dict[str, Any] = field(default_factory=dict)
    #: Figures behind the evidence (JSON-ready).
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """``tsprobe lab run``'s exit code for this outcome."""
        return EXIT_CODES[self.name]

    def to_json(self) -> dict[str, Any]:
        """The ``lab-outcome.json`` document."""
        return {
            "outcome": self.name,
            "evidence": list(self.evidence),
            "kernel_warnings": dict(self.kernel_warnings),
            "clocksource": self.clocksource,
            "details": self.details,
        }


def _json(path: Path) -> dict[str, Any]:
    return jsonl.read_document_quietly(path) or {}


def _jsonl(path: Path, dedupe: bool = False) -> list[dict[str, Any]]:
    return jsonl.records_quietly(path, dedupe)


def _s(ns: float) -> str:
    return format_duration(abs(int(ns)))


@dataclass
class _Console:
    """What the serial consoles said after boot."""

    #: (kind, key, "file: line") per kernel warning record after boot.
    warnings: list[tuple[str, str, str]] = field(default_factory=list)
    boot_warnings: list[str] = field(default_factory=list)
    oopses: list[str] = field(default_factory=list)
    panics: list[str] = field(default_factory=list)
    inits: list[str] = field(default_factory=list)


def read_consoles(run: Path, injected: list[str]) -> _Console:
    """Scan the serial consoles: kernel warnings (boot-time ones apart), oopses, panics and
    the init lines that mark each boot.

    :param run: the run directory.
    :param injected: lines the lab wrote to /dev/kmsg itself (never a warning).
    """
    out = _Console()
    for name in SERIAL_LOGS:
        text = jsonl.read_text_quietly(run / name)
        if text is None:
            continue
        # The source console shows the boot; the destination's starts after the migration.
        booted = name != "serial-src.log"
        for raw in text.splitlines():
            line = raw.strip()
            if AGENT_UP_LINE in line:
                booted = True
            if INIT_LINE in line:
                out.inits.append(f'{name}: "{line}"')
            found = _STAMP.match(line)
            body = found.group(3) if found else line
            if not body or any(i.strip() and i.strip() in body for i in injected):
                continue
            quoted = f'{name}: "{body}"'
            if PANIC.search(body):
                out.panics.append(quoted)
            elif OOPS.search(body) and booted:
                out.oopses.append(quoted)
            match = classify_kmsg(body)
            if match is None:
                continue
            if not booted:
                out.boot_warnings.append(quoted)
                continue
            key = f"{found.group(1)}{found.group(2)}" if found else body
            out.warnings.append((match.kind, key.lstrip("0") or "0", quoted))
    return out


def count_warnings(
    console: _Console, events: list[dict[str, Any]], counters: dict[str, float]
) -> tuple[dict[str, int], dict[str, list[str]], int]:
    """Kernel warnings per kind, each record once (see the module docstring).

    :return: the counts, one example line per kind, and the injected lines seen by the agent.
    """
    keys: dict[str, set[str]] = {}
    examples: dict[str, list[str]] = {}
    for kind, key, quoted in console.warnings:
        keys.setdefault(kind, set()).add(key)
        examples.setdefault(kind, []).append(quoted)
    seen_by_agent: Counter[str] = Counter()
    injected = 0
    for event in events:
        if event.get("kind") != "kernel_warning":
            continue
        kind = str(event.get("warning"))
        seen_by_agent[kind] += 1
        if event.get("facility", 0) != 0:
            injected += 1
            continue
        key = str(int(event.get("mono_ns") or 0) // 1000)
        keys.setdefault(kind, set()).add(key)
        examples.setdefault(kind, []).append(f'guest-events.jsonl: "{event.get("text")}"')
    counts = {kind: len(k) for kind, k in keys.items()}
    for kind, total in counters.items():
        extra = int(total) - seen_by_agent[kind]
        if extra > 0:
            counts[kind] = counts.get(kind, 0) + extra
            examples.setdefault(kind, []).append(
                f"agent-metrics.prom: tsprobe_kernel_warnings_total{{kind={kind!r}}} {total:g}"
            )
    return {k: v for k, v in sorted(counts.items()) if v}, examples, injected


def standstills(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stretches where the guest answered /clock but its CLOCK_MONOTONIC did not advance.

    :param samples: clock-samples.jsonl records.
    :return: ``{"start_host_ns", "end_host_ns", "span_ns", "monotonic_ns", "answers"}`` for
        each stretch of two or more answers with the same reading.
    """
    answered = sorted(
        (
            (int(s["host_recv_real_ns"]), int(s["clock"]["monotonic_ns"]))
            for s in samples
            if isinstance(s.get("clock"), dict)
            and "monotonic_ns" in s["clock"]
            and "host_recv_real_ns" in s
        ),
    )
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(answered):
        j = i
        while j + 1 < len(answered) and answered[j + 1][1] == answered[i][1]:
            j += 1
        if j > i:
            out.append(
                {
                    "start_host_ns": answered[i][0],
                    "end_host_ns": answered[j][0],
                    "span_ns": answered[j][0] - answered[i][0],
                    "monotonic_ns": answered[i][1],
                    "answers": j - i + 1,
                }
            )
        i = j + 1
    return out


def _boot_ids(samples: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[str]:
    ids: list[str] = []
    for value in [(s.get("clock") or {}).get("boot_id") for s in samples] + [
        e.get("boot_id") for e in events
    ]:
        if isinstance(value, str) and value and value not in ids:
            ids.append(value)
    return ids


def _clocksource(lab: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    seen: list[str] = []
    for s in samples:
        name = (s.get("clock") or {}).get("clocksource")
        if isinstance(name, str) and name not in seen:
            seen.append(name)
    options = lab.get("options") or {}
    used = seen[0] if seen else lab.get("clocksource_used")
    return {
        "requested": lab.get("clocksource_requested", options.get("clocksource")),
        "used": used,
        "seen": seen,
    }


def _lab_errors(
    run: Path, meta: dict[str, Any], steps: list[dict[str, Any]], health: dict[str, Any],
    summary: dict[str, Any],
) -> list[str]:  # fmt: skip
    lab = meta.get("lab") or {}
    if any(s.get("type") == "recovery_failed" for s in steps):
        return []  # the run ended on the guest's fate, not the lab's (recovery_evidence)
    out = [
        f"lab-steps.jsonl: the lab stopped: {s.get('error')}"
        for s in steps
        if s.get("type") == "lab_error"
    ]
    if not meta:
        out.append("meta.json is missing: the recording never started")
    if not health and not out:
        out.append("lab-health.json is missing: the run ended before the health check")
    for problem in health.get("problems") or []:
        if str(problem).endswith("QEMU exited"):
            out.append(f"lab-health.json: {problem} (QEMU died)")
    if lab.get("migrates") and health:
        outcome = (summary.get("timeline_summary") or {}).get("outcome")
        if outcome != "completed":
            names = ", ".join(sorted(p.name for p in rundir.qmp_endpoints(run).values()))
            out.append(f"{names or 'qmp-*.jsonl'}: the migration {outcome or 'never completed'}")
    memory = health.get("memory")
    if isinstance(memory, dict) and int(memory.get("bad_pages") or 0):
        out.append(
            f"lab-health.json: {memory['bad_pages']} of {memory.get('pages')} workload pages "
            "lost a write (QEMU corrupted the guest's memory)"
        )
    return out


def recovery_evidence(run: Path, steps: list[dict[str, Any]]) -> list[str]:
    """Why a migration paused in postcopy was never recovered, from a ``recovery_failed``
    step (the management stack's recovery did not take the destination out of
    postcopy-paused) and the destination monitor's unanswered commands; [] when none."""
    failed = next((s for s in steps if s.get("type") == "recovery_failed"), None)
    if failed is None:
        return []
    out = [
        f"lab-steps.jsonl: the migration was never recovered: {failed.get('command')} did not "
        f"take the destination out of postcopy-paused in {failed.get('waited_s')} s "
        f"({failed.get('error')}); the guest stayed on a destination missing pages"
    ]
    if failed.get("first_migrate_returned") is False:
        out.append(
            "lab-steps.jsonl: the first virsh migrate never returned after the pause: libvirt "
            "still held the migration job, waiting for the destination (its Finish phase)"
        )
    dst = rundir.qmp_endpoints(run).get("dst")
    # QMP records are stamped: a repeated line is a copy, not another timeout
    late = [r for r in _jsonl(dst, dedupe=True) if r.get("type") == "timeout"] if dst else []
    if late:
        commands = Counter(str(r.get("command")) for r in late)
        out.append(
            f"{dst.name if dst else 'qmp-dst.jsonl'}: the destination's monitor left "
            f"{len(late)} command{'s' if len(late) != 1 else ''} unanswered past the "
            f"recorder's timeout ({', '.join(f'{c} {n}' for c, n in commands.most_common())})"
        )
    return out


def classify(run: Path, summary: dict[str, Any] | None = None) -> Outcome:
    """The guest's outcome of a finished lab run (rules in the module docstring).

    :param run: the run directory.
    :param summary: ``analysis.lab.summary.summarize(run)`` when the caller has it.
    :return: the outcome with its evidence.
    """
    meta = _json(run / rundir.META)
    health = _json(run / "lab-health.json")
    steps = _jsonl(run / "lab-steps.jsonl")
    events = _jsonl(run / rundir.GUEST_EVENTS)
    samples = _jsonl(run / rundir.CLOCK_SAMPLES)
    if summary is None:
        from analysis.lab.summary import summarize

        try:
            summary = summarize(run)
        except (OSError, ValueError, KeyError, TypeError) as err:
            summary = {"error": str(err)}
    lab = meta.get("lab") or {}
    injected = [str(s.get("text")) for s in steps if s.get("type") == "kmsg" and s.get("text")]
    console = read_consoles(run, injected)
    counters = (summary.get("agent_counters") or {}).get("kernel_warnings") or {}
    warnings, examples, injected_seen = count_warnings(console, events, counters)
    clocksource = _clocksource(lab, samples)
    lag = summary.get("clock_lag") or {}
    growth = lag.get("growth_ns")
    stopped_max = int(lag.get("vcpus_stopped_max_ns") or 0)
    stopped = int(lag.get("vcpus_stopped_ns") or 0)
    lost = None if growth is None else int(growth) - stopped_max
    stills = [s for s in standstills(samples) if s["span_ns"] >= STANDSTILL_NS]
    ids = _boot_ids(samples, events)
    rates = {str(c): float(v) for c, v in (health.get("samples_per_s") or {}).items()}
    details: dict[str, Any] = {
        "settle_s": health.get("settle_s"),
        "sampling_window_s": health.get("sampling_window_s"),
        "samples_per_s": rates,
        "agent_answer_s": health.get("answer_s"),
        "migration": (summary.get("timeline_summary") or {}).get("outcome"),
        "clock_lag_growth_ms": None if growth is None else round(int(growth) / 1e6, 1),
        "vcpus_stopped_ms": round(stopped / 1e6, 1),
        "vcpus_stopped_max_ms": round(stopped_max / 1e6, 1),
        "time_lost_ms": None if lost is None else round(lost / 1e6, 1),
        "standstills": stills,
        "boot_ids": len(ids),
        "boot_warnings": console.boot_warnings[:10],
        "injected_warnings": injected_seen,
        "warning_examples": {k: v[:3] for k, v in examples.items()},
        "clock_notes": clock_notes(lag, stills, clocksource.get("used"), lost),
    }
    if summary.get("error"):
        details["summary_error"] = summary["error"]

    errors = _lab_errors(run, meta, steps, health, summary)
    if errors:
        return Outcome("lab-error", tuple(errors), warnings, clocksource, details)

    broken = recovery_evidence(run, steps)
    if health or not broken:  # without a health check the recovery's evidence says it all
        broken += _health_evidence(health, int(lab.get("vcpus") or len(rates) or 0), rates)
    for still in stills:
        broken.append(
            f"clock-samples.jsonl: the guest's clock stood still: CLOCK_MONOTONIC read "
            f"{still['monotonic_ns'] / 1e9:.3f} s in {still['answers']} /clock answers over "
            f"{_s(still['span_ns'])} of host time (its timers could not fire)"
        )
    broken += [f"{p}: the guest panicked" for p in console.panics[:2]]
    if len(console.inits) > 1:
        broken.append(f"{console.inits[1]}: the guest booted again")
    if len(ids) > 1:
        broken.append(
            f"clock-samples.jsonl/guest-events.jsonl: {len(ids)} boot ids: the guest rebooted"
        )
    hurt = _hurt_evidence(warnings, examples, console, lag, lost, stopped_max)
    if broken:  # what hurt it too, after what kept it from recovering
        return Outcome("not-recovered", tuple(broken + hurt), warnings, clocksource, details)
    if hurt:
        return Outcome("degraded", tuple(hurt), warnings, clocksource, details)
    fine = _fine_evidence(health, rates, growth, stopped_max, warnings)
    return Outcome("recovered", tuple(fine), warnings, clocksource, details)


def _health_evidence(health: dict[str, Any], vcpus: int, rates: dict[str, float]) -> list[str]:
    """What lab-health.json says kept the guest from coming back: the agent silent, a CPU
    without samples in the settle time, probes still down."""
    out: list[str] = []
    idle = [c for c in map(str, range(vcpus)) if rates.get(c, 0.0) <= 0.0]
    settle = health.get("sampling_window_s") or health.get("settle_s")
    if health.get("answer_s") is None:
        problem = next(
            (p for p in health.get("problems") or [] if "does not answer" in str(p)),
            "the agent did not answer",
        )
        out.append(f"lab-health.json: {problem}")
    elif idle:
        window = f"{float(settle):.1f} s" if settle else "settle time"
        rates_text = ", ".join(f"{c}: {rates.get(c, 0.0):g}/s" for c in sorted(rates) or idle)
        who = "CPU " + " and ".join(idle) if len(idle) <= 2 else "CPUs " + ", ".join(idle)
        out.append(
            f"{who} took no sample in the {window} after the agent first answered "
            f"(lab-health.json samplers {rates_text})"
        )
    down = health.get("probes_down") or []
    required = [p for p in down if p not in ("ptp", "adjtimex")]
    if required and health.get("answer_s") is not None:
        out.append(f"lab-health.json: probes still down after the settle time: "
                   f"{', '.join(map(str, required))}")  # fmt: skip
    return out


def _hurt_evidence(
    warnings: dict[str, int], examples: dict[str, list[str]], console: _Console,
    lag: dict[str, Any], lost: int | None, stopped_max: int,
) -> list[str]:  # fmt: skip
    """What hurt a guest that came back: kernel warnings of the kinds in ``HURTING``, an
    oops, guest time lost beyond the stops."""
    hurt: list[str] = []
    for kind, n in warnings.items():
        if kind in HURTING:
            example = examples.get(kind, ["?"])[0]
            hurt.append(f"{example} ({kind}: {n} record{'s' if n != 1 else ''})")
    hurt += [f"{o} (kernel oops)" for o in console.oopses[:2]]
    if lost is not None and lost > LOST_TIME_NS:
        hurt.append(
            f"the guest clock lost {lost / 1e9:.1f} s beyond the {stopped_max / 1e9:.1f} s the "
            f"vCPUs were stopped (clock-samples.jsonl: lag behind the host "
            f"{int(lag['before']['lag_ns']) / 1e9:.2f} s before, "
            f"{int(lag['after']['lag_ns']) / 1e9:.2f} s after)"
        )
    return hurt


def _fine_evidence(
    health: dict[str, Any], rates: dict[str, float], growth: Any, stopped_max: int,
    warnings: dict[str, int],
) -> list[str]:  # fmt: skip
    """Why a guest counts as recovered: sampling, answering, no time lost, no warning."""
    fine = [
        "lab-health.json: every CPU sampled again ("
        + ", ".join(f"{c}: {v:g}/s" for c, v in sorted(rates.items()))
        + f") and the agent answered after {health.get('answer_s')} s"
    ]
    if growth is not None:
        fine.append(
            f"clock-samples.jsonl: the guest clock's lag behind the host grew "
            f"{int(growth) / 1e6:.0f} ms for {stopped_max / 1e6:.0f} ms of vCPU stop "
            f"(no time lost beyond it)"
        )
    others = ", ".join(f"{k} {n}" for k, n in warnings.items())
    fine.append(f"no kernel warning that hurts{f' (others: {others})' if others else ''}")
    return fine


def clock_notes(
    lag: dict[str, Any], stills: list[dict[str, Any]], clocksource: str | None, lost: int | None
) -> list[str]:
    """What the guest's clock did, in plain words: a freeze is not a stall.

    :param lag: the summary's ``clock_lag``.
    :param stills: the standstills of at least ``STANDSTILL_NS``.
    :param clocksource: the guest's clocksource.
    :param lost: guest time lost beyond the stop windows (ns), if measured.
    """
    notes = []
    windows = [w for w in lag.get("stopped_windows") or [] if w.get("end_ns") is not None]
    stopped = int(lag.get("vcpus_stopped_ns") or 0)
    growth = lag.get("growth_ns")
    cs = clocksource or "its clocksource"
    if windows and stopped >= 1_000_000:
        notes.append(
            f"QEMU had the vCPUs stopped for {_s(stopped)} in {len(windows)} window"
            f"{'s' if len(windows) != 1 else ''} (STOP to RESUME): the guest's clocks ({cs}) "
            "stood still with them, so this freeze is not a stall: no CPU could see it as a "
            "gap and no timeout inside the guest expired for it; the guest could find it only "
            "as its clock behind an outside one (here the host's /clock samples; NTP or "
            "ptp_kvm on a real host), while a peer outside the guest saw it gone throughout"
        )
    for still in stills:
        notes.append(
            f"the guest's clock ({cs}) stood still for {_s(still['span_ns'])} while the guest "
            "ran and answered: its timers could not fire and its samplers could not measure "
            "that time as a stall"
        )
    if lost is not None and lost > LOST_TIME_NS:
        notes.append(
            f"the guest clock ({cs}) fell {_s(int(growth or 0))} behind the host's, "
            f"{_s(lost)} more than QEMU stopped the vCPUs for: time the guest never saw "
            "pass, so no stall and no timeout covers it"
        )
    return notes


def write_outcome(run: Path, outcome: Outcome) -> Path:
    """Write ``lab-outcome.json`` into ``run``.

    :return: its path.
    """
    path = run / OUTCOME_FILE
    rundir.write_json_atomic(path, outcome.to_json())
    return path
