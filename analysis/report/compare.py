"""Several runs side by side: ``comparison.html``, ``comparison.md``, ``comparison.json``.

``compare(analyses, names)`` builds one document from each run's ``build_summary``: per
run the outcome, the downtime, the longest stall and the total stalled time per phase
name, the time some CPUs were stalled while others ran, the clock-lag steps, and the
expirations per ladder T (from stalls, and for a peer outside from the clock-lag steps).
Phases are matched by *name* (repeated names such as two ``postcopy-active`` are summed),
so ``paused`` and ``paused-stop`` line up on ``postcopy-paused``.

Differences are highlighted: a cell differs when its value is not the same in every run
and the spread is more than ``REL_DIFF`` of the largest and more than ``ABS_DIFF_MS``
(zero against non-zero always differs). In HTML such cells have class ``diff``; in
Markdown they are bold. The HTML shows each run's timeline one under the other and the
timeout-sensitivity curves of all runs on one plot.

This is the measured answer to the upstream question (../shared/context: keep vCPUs
running or stop them during postcopy-paused): with the vCPUs running, the guest feels
stalls as long as the pause on the CPUs that touch missing pages; with them stopped, it
feels none, but its clock falls behind the host's by the stop, which a peer sees.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analysis import rundir
from analysis.analyze.attribution import Analysis
from analysis.report.plots import sensitivity_png, timeline_png
from analysis.report.render import CSS, html_table, img
from analysis.report.summary import build_summary

SCHEMA_VERSION = 1
REL_DIFF = 0.2
ABS_DIFF_MS = 5.0


def _by_phase(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    lengths: dict[str, float] = {}
    for p in doc["phases"]:
        lengths[p["name"]] = lengths.get(p["name"], 0.0) + (p["length_ms"] or 0.0)
    label_to_name = {p["label"]: p["name"] for p in doc["phases"]}
    for s in doc["stalls"]:
        name = label_to_name.get(s["phase"], s["phase"])
        row = out.setdefault(name, {"count": 0, "stalled_ms": 0.0, "longest_ms": 0.0})
        row["count"] += s["count"]
        row["stalled_ms"] += s["stalled_ms"] or 0.0
        row["longest_ms"] = max(row["longest_ms"], s["longest_ms"] or 0.0)
    for x in doc["asymmetry"]:
        name = label_to_name.get(x["phase"], x["phase"])
        row = out.setdefault(name, {"count": 0, "stalled_ms": 0.0, "longest_ms": 0.0})
        row["some_ms"] = row.get("some_ms", 0.0) + (x["some_ms"] or 0.0)
        row["all_ms"] = row.get("all_ms", 0.0) + (x["all_ms"] or 0.0)
    for name, length in lengths.items():
        out.setdefault(name, {"count": 0, "stalled_ms": 0.0, "longest_ms": 0.0})["length_ms"] = (
            length
        )
    return out


def compare(analyses: Sequence[Analysis], names: Sequence[str]) -> dict[str, Any]:
    """The comparison document (rows of metrics, one value per run, with ``differs``).

    :param analyses: the runs' analyses; ``names`` a short name for each.
    :return: ``{"schema_version", "runs", "rows", "summaries"}``.
    """
    docs = [build_summary(a) for a in analyses]
    phases_by_run = [_by_phase(d) for d in docs]
    order: list[str] = []
    for d in docs:
        for p in d["phases"]:
            if p["name"] not in order:
                order.append(p["name"])
    rows: list[dict[str, Any]] = []

    def add(group: str, metric: str, values: list[Any]) -> None:
        rows.append(
            {"group": group, "metric": metric, "values": values, "differs": differs(values)}
        )

    add("run", "outcome", [(d["migration"] or {}).get("outcome") for d in docs])
    add("run", "accel", [d["accel"] for d in docs])
    add(
        "run",
        "downtime STOP->RESUME (ms)",
        [_ms((d["migration"] or {}).get("downtime_ns")) for d in docs],
    )
    add("run", "QEMU downtime (ms)", [(d["migration"] or {}).get("qemu_downtime_ms") for d in docs])
    add(
        "clock",
        "guest clock lag steps (ms)",
        [
            round(sum(s["lag_ms"] or 0 for s in d["clock_steps"] if s["clock"] == "monotonic"), 3)
            for d in docs
        ],
    )
    for name in order:
        for metric, key in (
            ("length (ms)", "length_ms"),
            ("stalls", "count"),
            ("longest stall (ms)", "longest_ms"),
            ("CPU-time stalled (ms)", "stalled_ms"),
            ("some CPUs stalled, others ran (ms)", "some_ms"),
            ("all CPUs stalled (ms)", "all_ms"),
        ):
            add(name, metric, [round(p.get(name, {}).get(key, 0.0), 3) for p in phases_by_run])
    ladder = docs[0]["timeout_sensitivity"]["ladder_ms"] if docs else []
    for i, t in enumerate(ladder):
        totals, peers = [], []
        for d in docs:
            phs = d["timeout_sensitivity"]["phases"]
            totals.append(sum(ph["stalls"][i] for ph in phs if i < len(ph["stalls"])))
            peers.append(sum(ph["peer"][i] for ph in phs if i < len(ph["peer"])))
        add("timeouts", f"expirations T={t:g} ms (guest, all CPUs)", totals)
        add("timeouts", f"expirations T={t:g} ms (peer outside)", peers)
    add(
        "validation",
        "checks outside tolerance",
        [sum(1 for c in d["validation"] if c["ok"] is False) for d in docs],
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "tsprobe-comparison",
        "runs": [
            {"name": n, "rundir": d["rundir"], "scenario": d["scenario"]}
            for n, d in zip(names, docs, strict=True)
        ],
        "rows": rows,
        "summaries": docs,
    }


def _ms(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def differs(values: Sequence[Any]) -> bool:
    """Whether values of one metric differ enough to highlight (see the module docstring)."""
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(nums) != len(values):
        return len({str(v) for v in values}) > 1
    if not nums:
        return False
    lo, hi = min(nums), max(nums)
    if (lo == 0) != (hi == 0):
        return True
    return hi - lo > ABS_DIFF_MS and hi - lo > REL_DIFF * max(abs(lo), abs(hi))


def render_markdown(doc: dict[str, Any]) -> str:
    """comparison.md: one table, differing rows in bold."""
    names = [r["name"] for r in doc["runs"]]
    out = ["# tsprobe comparison", ""]
    out += [f"- {r['name']}: {r['rundir']} ({r['scenario'] or 'no scenario'})" for r in doc["runs"]]
    out += ["", "| group | metric | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
    for row in doc["rows"]:
        cells = ["-" if v is None else str(v) for v in row["values"]]
        if row["differs"]:
            cells = [f"**{c}**" for c in cells]
        out.append(f"| {row['group']} | {row['metric']} | " + " | ".join(cells) + " |")
    out += ["", "Bold: the runs differ (spread > 20 % and > 5, or zero against non-zero).", ""]
    for r, d in zip(doc["runs"], doc["summaries"], strict=True):
        out += [f"## Findings: {r['name']}", ""]
        out += [f"- {f['text']}" for f in d["findings"]] + [""]
    return "\n".join(out)


def render_html(doc: dict[str, Any], analyses: Sequence[Analysis]) -> str:
    """comparison.html: the table with differences highlighted, the plots side by side."""
    names = [r["name"] for r in doc["runs"]]
    header = ["group", "metric", *names]
    rows = [[r["group"], r["metric"], *r["values"]] for r in doc["rows"]]
    flags = [
        ["", ""] + (["diff"] * len(names) if r["differs"] else [""] * len(names))
        for r in doc["rows"]
    ]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<title>tsprobe comparison</title>",
        f"<style>{CSS}</style></head><body><h1>tsprobe comparison</h1>",
    ]
    parts += [
        f"<div class=muted>{html.escape(r['name'])}: {html.escape(r['rundir'])}</div>"
        for r in doc["runs"]
    ]
    parts.append("<h2>Side by side</h2>")
    parts.append(html_table(header, rows, flags))
    parts.append(
        "<p class=muted>Highlighted: the runs differ (spread over 20 % and over 5, "
        "or zero against non-zero).</p>"
    )
    parts.append("<h2>Timeout sensitivity</h2>")
    parts.append(img(sensitivity_png(list(analyses), names), "timeout sensitivity of every run"))
    parts.append("<h2>Timelines</h2>")
    for name, a in zip(names, analyses, strict=True):
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(img(timeline_png(a), f"timeline of {name}"))
    for r, d in zip(doc["runs"], doc["summaries"], strict=True):
        parts.append(f"<h2>Findings: {html.escape(r['name'])}</h2><ul>")
        parts += [f"<li>{html.escape(f['text'])}</li>" for f in d["findings"]]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_comparison(
    analyses: Sequence[Analysis], names: Sequence[str], out: Path
) -> dict[str, Path]:
    """Write comparison.html, .md and .json into ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    doc = compare(analyses, names)
    paths = {n: out / n for n in ("comparison.json", "comparison.md", "comparison.html")}
    rundir.write_json_atomic(paths["comparison.json"], doc)
    paths["comparison.md"].write_text(render_markdown(doc), encoding="utf-8")
    paths["comparison.html"].write_text(render_html(doc, analyses), encoding="utf-8")
    return paths
