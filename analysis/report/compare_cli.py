"""``tsprobe compare RUNDIR RUNDIR... --out DIR``: runs side by side.

Each run is loaded and analysed as ``tsprobe report`` does (skipped lines are reported
per run); ``analysis.report.compare`` writes ``comparison.html``, ``comparison.md`` and
``comparison.json`` into ``--out``. Runs are named after their directories (``--name``
overrides, once per run, in order).
"""

from __future__ import annotations

from pathlib import Path

import click

from analysis.options import OutDir
from analysis.report.cli import load_or_exit


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("rundirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out",
    required=True,
    type=OutDir(),
    help="Directory for comparison.html, .md and .json.",
)
@click.option("--name", "names", multiple=True, help="A short name per run, in order.")
@click.option("--strict", is_flag=True, help="Fail (exit 1) when any line had to be skipped.")
@click.pass_context
def compare(
    ctx: click.Context, rundirs: tuple[Path, ...], out: Path, names: tuple[str, ...], strict: bool
) -> None:
    """Compare runs: the same figures side by side, differences highlighted.

    \b
    Examples:
      tsprobe compare runs/paused runs/paused-stop --out cmp
      tsprobe compare a b c --name precopy --name postcopy --name paused --out cmp
    """
    from analysis.analyze.attribution import analyse
    from analysis.report.compare import write_comparison

    if names and len(names) != len(rundirs):
        click.echo(f"tsprobe: {len(names)} --name for {len(rundirs)} runs", err=True)
        ctx.exit(2)
    labels = list(names) or [p.name or str(p) for p in rundirs]
    analyses = [analyse(load_or_exit(ctx, p, strict)) for p in rundirs]
    try:
        paths = write_comparison(analyses, labels, out)
    except OSError as err:
        click.echo(f"tsprobe: cannot write into {out}: {err.strerror or err}", err=True)
        ctx.exit(1)
    click.echo(
        f"tsprobe: wrote {paths['comparison.html']}, comparison.md, comparison.json", err=True
    )
