"""The Prometheus tables as rows for a report: ``(title, header, rows)`` triples and Markdown.

``table_rows(tables)`` gives the same shape as ``analysis.report.summary.tables`` (a title, the
column names, the rows of plain values), so a report can print them with its own table
helpers; ``render_markdown`` is a standalone rendering. Durations are milliseconds
(``None`` prints as ``-``); a longest stall known only by its bucket prints as the
bucket, e.g. ``(200, 500] ms``. The coarseness statement (``PromTables.note``) comes first
and must stay with the tables.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from analysis.prom.tables import PromTables, StallRow
from analysis.rundir import write_json_atomic

Table = tuple[str, list[str], list[list[Any]]]


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def _longest(row: StallRow) -> str | float | None:
    if row.longest_ns is not None:
        return _ms(row.longest_ns)
    if row.longest_bucket is None:
        return None
    low, high = row.longest_bucket
    upper = "inf" if math.isinf(high) else f"{high / 1e6:g}"
    return f"({low / 1e6:g}, {upper}]"


def _t_label(ns: int) -> str:
    return f"{ns / 1e9:g} s"


def table_rows(tables: PromTables) -> list[Table]:
    """Phases, stalls per phase x CPU, and timeout expirations per phase x T.

    :param tables: what ``fetch_tables`` or ``build_tables`` returned.
    :return: (title, header, rows) per table.
    """
    names = {w.index: w.name for w in tables.windows}
    origin = tables.windows[0].start_ns if tables.windows else tables.start_ns
    phases: Table = (
        f"Phases (from {tables.phase_source})",
        ["phase", "start offset (ms)", "length (ms)", "vCPUs stopped"],
        [
            [w.name, _ms(w.start_ns - origin), _ms(w.end_ns - w.start_ns), w.vm_stopped]
            for w in tables.windows
        ],
    )
    stalls: Table = (
        f"Stalls per phase and CPU (Prometheus, instance {tables.instance})",
        ["phase", "cpu", "stalls", "stalled (ms)", "longest (ms)", "p50 (ms)", "p99 (ms)"],
        [
            [
                names[r.phase],
                r.cpu,
                r.count,
                _ms(r.stalled_ns),
                _longest(r),
                _ms(r.p50_ns),
                _ms(r.p99_ns),
            ]
            for r in tables.stalls
        ],
    )
    ladder = tables.ladder_ns
    per_canary = tables.by_ladder()
    timeouts: Table = (
        "Timeout expirations per phase and T (canaries, Prometheus)",
        ["phase", "canary", *(f"T={_t_label(t)}" for t in ladder)],
        [
            [names[phase], canary, *counts]
            for phase, by_canary in sorted(per_canary.items())
            for canary, counts in sorted(by_canary.items())
        ],
    )
    return [phases, stalls, timeouts]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    return str(value)


def render_markdown(tables: PromTables) -> str:
    """The tables as Markdown, the coarseness note first.

    :param tables: what ``fetch_tables`` or ``build_tables`` returned.
    :return: the Markdown text.
    """
    lines = [f"> {tables.note}", ""]
    lines += [f"> {note}" for note in tables.notes]
    for title, header, rows in table_rows(tables):
        lines += [f"### {title}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def render_html(tables: PromTables) -> str:
    """report.html for a report from Prometheus: the coarseness note, then the tables.

    :param tables: what ``fetch_tables`` returned.
    :return: one self-contained HTML page.
    """
    from analysis.report.render import CSS, html_table

    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>tsprobe report from Prometheus: {html.escape(tables.instance)}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>tsprobe report (from Prometheus)</h1>",
        f"<div class=label>{html.escape(tables.note)}</div>",
    ]
    parts += [f"<div class=muted>{html.escape(note)}</div>" for note in tables.notes]
    for title, header, rows in table_rows(tables):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(html_table(header, [[_cell(v) for v in row] for row in rows]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_prometheus_report(tables: PromTables, out: Path) -> dict[str, Path]:
    """Write report.html, report.md and summary.json built from Prometheus into ``out``.

    :param tables: what ``fetch_tables`` returned.
    :param out: the directory (created if missing).
    :raise OSError: when the files cannot be written.
    :return: the paths written, keyed by name.
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("summary.json", "report.md", "report.html")}
    write_json_atomic(paths["summary.json"], tables.to_dict())
    paths["report.md"].write_text(render_markdown(tables), encoding="utf-8")
    paths["report.html"].write_text(render_html(tables), encoding="utf-8")
    return paths
