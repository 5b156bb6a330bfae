"""``tsprobe report RUNDIR``: write report.html, report.md and summary.json.

The run directory is read by ``analysis.analyze.load`` (every skipped line is reported as
``tsprobe: FILE:LINE: reason`` on stderr, the first ``SHOW`` of them, then the count),
analysed by ``analysis.analyze.attribution`` and written by ``analysis.report.summary``.
Exit status: 0 (even with skipped lines), 1 with ``--strict`` when anything was skipped or
the output cannot be written, 2 for a missing or empty run directory.
"""

from __future__ import annotations

from pathlib import Path

import click

from analysis.analyze.load import Run, load_run
from analysis.errors import AnalysisError, RecordFormatError, RunDirError
from analysis.options import OutDir

SHOW = 20


def report_issues(run: Run) -> None:
    """Print the run's skips and notes (the first ``SHOW``) and the count of skips."""
    for issue in run.issues[:SHOW]:
        prefix = "" if issue.severity == "skip" else "note: "
        click.echo(f"tsprobe: {prefix}{issue}", err=True)
    if len(run.issues) > SHOW:
        click.echo(f"tsprobe: ... and {len(run.issues) - SHOW} more", err=True)
    if run.skips:
        n = len(run.skips)
        click.echo(f"tsprobe: {run.path}: {n} line{'s' if n != 1 else ''} skipped", err=True)


def load_or_exit(ctx: click.Context, rundir: Path, strict: bool) -> Run:
    """Load a run for a command: user errors become one line and an exit status."""
    try:
        run = load_run(rundir)
    except RunDirError as err:
        click.echo(f"tsprobe: {err}", err=True)
        ctx.exit(2)
    except (AnalysisError, OSError) as err:
        click.echo(f"tsprobe: {err}", err=True)
        ctx.exit(1)
    report_issues(run)
    if strict and run.skips:
        failure = RecordFormatError(f"{run.skips[0]} ({len(run.skips)} skipped)")
        click.echo(f"tsprobe: failing because of --strict: {failure}", err=True)
        ctx.exit(1)
    return run


def prometheus_report(
    ctx: click.Context,
    url: str,
    instance: str | None,
    start: str | None,
    end: str | None,
    run: Path | None,
    out: Path | None,
) -> None:
    """``report --prometheus``: the per-phase tables from range queries instead of events."""
    from analysis.errors import PrometheusError
    from analysis.prom.render import write_prometheus_report
    from analysis.prom.source import fetch_tables, parse_time

    missing = [
        flag
        for flag, value in (
            ("--instance", instance),
            ("--from", start),
            ("--to", end),
            ("--out", out),
        )
        if value is None
    ]
    if missing:
        click.echo(f"tsprobe: --prometheus needs {', '.join(missing)}", err=True)
        ctx.exit(2)
    assert instance is not None and start is not None and end is not None and out is not None
    try:
        t1, t2 = parse_time(start), parse_time(end)
    except PrometheusError as err:
        click.echo(f"tsprobe: {err}", err=True)
        ctx.exit(2)
    try:
        tables = fetch_tables(url, instance, t1, t2, run=str(run) if run else None)
        paths = write_prometheus_report(tables, out)
    except PrometheusError as err:
        click.echo(f"tsprobe: {err}", err=True)
        ctx.exit(1)
    except OSError as err:
        click.echo(f"tsprobe: cannot write the report into {out}: {err.strerror or err}", err=True)
        ctx.exit(1)
    click.echo(f"tsprobe: {tables.note}", err=True)
    click.echo(f"tsprobe: wrote {paths['report.html']}, report.md, summary.json", err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("rundir", type=click.Path(path_type=Path), required=False)
@click.option(
    "--out",
    "out",
    type=OutDir(),
    default=None,
    help="Directory for the report (default: RUNDIR).",
)
@click.option("--strict", is_flag=True, help="Fail (exit 1) when any line had to be skipped.")
@click.option("--prometheus", metavar="URL", help="Build the tables from this Prometheus.")
@click.option("--instance", metavar="GUEST", help="With --prometheus: the agent's instance.")
@click.option("--from", "start", metavar="T1", help="With --prometheus: range start.")
@click.option("--to", "end", metavar="T2", help="With --prometheus: range end.")
@click.option(
    "--run",
    "run",
    type=click.Path(path_type=Path),
    default=None,
    help="With --prometheus: take the phases from this run directory.",
)
@click.pass_context
def report(
    ctx: click.Context,
    rundir: Path | None,
    out: Path | None,
    strict: bool,
    prometheus: str | None,
    instance: str | None,
    start: str | None,
    end: str | None,
    run: Path | None,
) -> None:
    """Write report.html, report.md and summary.json for a run directory.

    The report places every guest stall, timeout and kernel warning in the migration phase
    it fell in (guest clocks aligned to the host with the recorder's /clock samples),
    gives per-phase and per-CPU figures, the timeout sensitivity, the guest clock's
    offset steps, and checks the guest's figures against the host's (QMP, the lab).
    A run holding only a guest's spool gives a report on the guest's own timeline.

    \b
    Examples:
      tsprobe report run1                  # writes run1/report.html, .md, summary.json
      tsprobe report run1 --out /tmp/r1
      tsprobe report --strict run1         # exit 1 if any line was skipped
      tsprobe report --prometheus http://prom:9090 --instance guest1:9466 \\
        --from 2026-11-25T10:00:00Z --to 2026-11-25T10:05:00Z --out r1 [--run RUNDIR]

    With --prometheus the per-phase stall and timeout tables come from range queries over
    the agent's metrics (phases from --run, or from the host exporter's series), for fleets
    that kept only metrics; they are coarser than the event log and the report says so.
    """
    if prometheus is not None:
        prometheus_report(ctx, prometheus, instance, start, end, run, out)
        return
    if rundir is None:
        click.echo("tsprobe: report needs RUNDIR (or --prometheus URL ...)", err=True)
        ctx.exit(2)
    assert rundir is not None
    from analysis.analyze.attribution import analyse
    from analysis.report.render import write_report

    loaded = load_or_exit(ctx, rundir, strict)
    target = out if out is not None else loaded.path
    try:
        paths = write_report(analyse(loaded), target)
    except OSError as err:
        click.echo(
            f"tsprobe: cannot write the report into {target}: {err.strerror or err}", err=True
        )
        ctx.exit(1)
    click.echo(f"tsprobe: wrote {paths['report.html']}, report.md, summary.json", err=True)
