"""``tsprobe timeline RUNDIR``: print the phases of a recorded migration.

It reads every ``qmp-NAME.jsonl`` of a run directory through
``analysis.analyze.timeline_io`` (the pure ``build_timeline`` over the records) and prints
the result as a table (or, with ``--json``, as one JSON document)::

    $ tsprobe timeline run1
    phase            start      duration  boundaries                 details
    setup            +17.07ms   5.496ms   src MIGRATION setup        QEMU setup-time 3ms
    precopy          +22.57ms   2.411s    src MIGRATION active       passes 1-2
    stop-and-copy    +2.434s    28.71ms   src STOP -> dst RESUME     pass 3; QEMU downtime 30ms
    completed        +2.463s    -         dst RESUME                 dst reported completed ...

Offsets count from the run's first record. Bad input never ends in a traceback:

- a missing run directory, or one with nothing to read (or a path the system refuses,
  such as one too long): one line, exit status 2;
- a line that is not JSON (a garbage line, a last line cut short by a crash), not an
  object, out of bounds, a copy of an earlier line, or a record missing what its type
  needs, and a QMP file that is not a regular file: one line on stderr,
  ``tsprobe: FILE:LINE: reason``, then the count of skipped lines; the timeline is built
  from the rest and the exit status is 0, or 1 with ``--strict``. The records are read by
  ``analysis.rundir.read_qmp``, the reader of report and compare too, so the commands
  agree on every line;
- a migration status this version does not know: a note naming file and line; the status
  is kept as a phase of its own name (not a skip).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from analysis.analyze.timeline_io import load_timeline
from analysis.analyze.timeline_model import Phase, Timeline
from analysis.errors import RunDirError
from analysis.rundir import qmp_endpoints, require_rundir
from analysis.rundir.jsonl import Issue, printable
from probe.durations import format_duration


def _offset(t: int, origin: int | None) -> str:
    delta = t - (origin if origin is not None else t)
    return ("+" if delta >= 0 else "-") + format_duration(abs(delta))


def _passes(numbers: tuple[int, ...]) -> str:
    if not numbers:
        return ""
    if len(numbers) == 1:
        return f"pass {numbers[0]}"
    if list(numbers) == list(range(numbers[0], numbers[-1] + 1)):
        return f"passes {numbers[0]}-{numbers[-1]}"
    return "passes " + ",".join(str(n) for n in numbers)


def _details(phase: Phase) -> str:
    parts = []
    if phase.passes:
        parts.append(_passes(phase.passes))
    labels = {
        "qemu_setup_time_ms": "QEMU setup-time",
        "qemu_downtime_ms": "QEMU downtime",
    }
    for key, value in phase.details.items():
        if key in labels and isinstance(value, int):
            parts.append(f"{labels[key]} {format_duration(value * 1_000_000)}")
        elif key == "qemu_error" and isinstance(value, dict):
            parts.extend(f"{ep}: {desc}" for ep, desc in value.items())
        else:
            parts.append(f"{key} {value}")
    parts.extend(phase.notes)
    return "; ".join(parts)


def _boundaries(phase: Phase) -> str:
    """The start's label, and the end's for a pause (``src STOP -> dst RESUME``)."""
    start = phase.start_by.label()
    if phase.start_by.clock != "qemu":
        start += f" ({phase.start_by.clock} time)"
    if phase.vm_stopped and phase.end_by is not None:
        end = phase.end_by.label()
        if phase.end_by.clock != "qemu":
            end += f" ({phase.end_by.clock} time)"
        return f"{start} -> {end}"
    return start


def render_table(timeline: Timeline) -> str:
    """The timeline as a text table with a summary underneath.

    :param timeline: what ``build_timeline`` returned.
    :return: lines joined with newlines, ending in a newline.
    """
    if not timeline.phases:
        return "no migration phases: the QMP records hold no migration status\n"
    header = ("phase", "start", "duration", "boundaries", "details")
    rows = [header]
    for ph in timeline.phases:
        duration = "-" if ph.duration_ns is None else format_duration(ph.duration_ns)
        rows.append(
            (
                ph.name,
                _offset(ph.start_ns, timeline.origin_ns),
                duration,
                _boundaries(ph),
                _details(ph),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:4])) + "  " + r[4] for r in rows
    ]
    lines = [line.rstrip() for line in lines]
    s = timeline.summary()
    lines.append("")
    facts = [f"outcome: {s.outcome or 'not finished'}"]
    if s.total_ns is not None:
        facts.append(f"total: {format_duration(s.total_ns)}")
    if s.downtime_ns is not None:
        facts.append(f"downtime (STOP -> RESUME): {format_duration(s.downtime_ns)}")
    if s.qemu_downtime_ms is not None:
        facts.append(f"QEMU downtime: {format_duration(s.qemu_downtime_ms * 1_000_000)}")
    if s.qemu_total_time_ms is not None:
        facts.append(f"QEMU total-time: {format_duration(s.qemu_total_time_ms * 1_000_000)}")
    if s.postcopy_blocktime_ms is not None:
        facts.append(f"postcopy-blocktime: {s.postcopy_blocktime_ms}ms")
    lines.append("   ".join(facts))
    rank = {"source": 0, "destination": 1, None: 2}
    for ep in sorted(timeline.endpoints, key=lambda e: rank[e.role]):
        role = f" ({ep.role})" if ep.role else ""
        seq = " -> ".join(ep.statuses) if ep.statuses else "no status"
        lines.append(f"{ep.name}{role}: {seq}")
    return "\n".join(lines) + "\n"


def _issue_dict(it: Issue) -> dict[str, Any]:
    return {"file": it.path, "line": it.line, "reason": it.reason, "severity": it.severity}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("rundir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
@click.option("--strict", is_flag=True, help="Fail (exit 1) when any line had to be skipped.")
@click.pass_context
def timeline(ctx: click.Context, rundir: Path, as_json: bool, strict: bool) -> None:
    """Print the migration phases of a run directory.

    Phases come from the QMP records of every endpoint (qmp-NAME.jsonl): setup, precopy,
    stop-and-copy or switchover (source STOP to destination RESUME: the pause the guest
    feels), postcopy-active, postcopy-paused, postcopy-recover(-setup), and the outcome.
    Start times are offsets from the run's first record.

    Lines that cannot be used are reported as FILE:LINE on stderr and skipped.

    \b
    Examples:
      tsprobe timeline run1
      tsprobe timeline --json run1 | jq '.summary.downtime_ns'
      tsprobe timeline --strict run1    # exit 1 if any line was skipped

    \b
    Exit status: 0 ok (even with skipped lines), 1 lines skipped under --strict,
    2 a missing or empty run directory.
    """
    skips: list[Issue] = []
    notes: list[Issue] = []

    def on_skip(skip: Issue) -> None:
        skips.append(skip)
        click.echo(f"tsprobe: {skip}", err=True)

    def on_note(note: Issue) -> None:
        notes.append(note)
        click.echo(f"tsprobe: {note}", err=True)

    try:
        run = require_rundir(rundir)
        result = load_timeline(run, on_skip, on_note)
    except RunDirError as err:
        click.echo(f"tsprobe: {err}", err=True)
        ctx.exit(2)
    if not qmp_endpoints(run):
        click.echo(f"tsprobe: {printable(run)}: no qmp-*.jsonl files: no phases to show", err=True)
    if skips:
        plural = "line" if len(skips) == 1 else "lines"
        click.echo(f"tsprobe: {len(skips)} {plural} skipped", err=True)
        if strict:
            click.echo("tsprobe: failing because of --strict", err=True)
            ctx.exit(1)
    if as_json:
        doc = result.to_dict()
        doc["rundir"] = printable(run)
        doc["skipped"] = len(skips)
        doc["issues"] = [_issue_dict(s) for s in skips] + [_issue_dict(n) for n in notes]
        click.echo(json.dumps(doc, indent=2, sort_keys=False))
    else:
        click.echo(render_table(result), nl=False)
