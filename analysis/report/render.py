"""``report.md`` and ``report.html`` from summary.json's document (``write_report``: all three).

Every table comes from the document ``analysis.report.summary.build_summary`` made
(``tables``: phases; stalls per phase x CPU; asymmetry; host states per phase x vCPU and
the longest stalls with their host cause, with host truth; timeout sensitivity; host
truth against the guest's figures; clock steps; findings; the alignment's method and
error bounds; what was skipped), so the three files never disagree. The Markdown and the
HTML show the same rows; the HTML is self-contained: inline CSS (``CSS``, shared with
compare, the study report and the Prometheus report), plots embedded as base64 PNG
(``analysis.report.plots``), no script, nothing fetched: it opens offline and can be
attached to a ticket.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from analysis import rundir
from analysis.analyze.attribution import Analysis
from analysis.analyze.host_vcpu import STATES
from analysis.report.plots import sensitivity_png, timeline_png
from analysis.report.summary import SHOW_HOST_STALLS, build_summary
from probe.durations import format_duration


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


#: A report table: (title, header, rows).
Table = tuple[str, list[str], list[list[Any]]]


def tables(doc: dict[str, Any]) -> list[Table]:
    """The report's tables: (title, header, rows), from a summary document."""
    out: list[Table] = []
    out.append(
        (
            "Phases",
            ["phase", "start (ms)", "length (ms)", "vCPUs stopped"],
            [
                [p["label"], p["start_offset_ms"], p["length_ms"], p["vm_stopped"]]
                for p in doc["phases"]
            ],
        )
    )
    out.append(_stall_table(doc))
    out.append(
        (
            "Asymmetry",
            ["phase", "some CPUs stalled, others ran (ms)", "all CPUs stalled (ms)"],
            [
                [x["phase"], x["some_ms"], x["all_ms"]]
                for x in doc["asymmetry"]
                if x["some_ms"] or x["all_ms"]
            ],
        )
    )
    if doc.get("host_truth", {}).get("available"):
        out.extend(_host_tables(doc))
    out.append(_sensitivity_table(doc["timeout_sensitivity"]))
    out.append(
        (
            "Validation: host truth against the guest",
            ["check", "host (ms)", "guest (ms)", "tolerance (ms)", "result", "note"],
            [
                [
                    c["what"],
                    c["host_ms"],
                    c["guest_ms"],
                    c["tolerance_ms"],
                    {True: "ok", False: "OUTSIDE", None: "n/a"}[c["ok"]],
                    c["note"],
                ]
                for c in doc["validation"]
            ],
        )
    )
    out.append(
        (
            "Clock steps (guest minus host offset)",
            ["clock", "at (ms)", "guest fell behind by (ms)", "± (ms)", "vCPUs stopped (ms)"],
            [
                [s["clock"], s["at_offset_ms"], s["lag_ms"], s["error_ms"], s["stopped_ms"]]
                for s in doc["clock_steps"]
            ],
        )
    )
    return out


def _stall_table(doc: dict[str, Any]) -> Table:
    """Stalls per phase and CPU, the rows with any stall."""
    rows = [
        [
            s["phase"],
            s["cpu"],
            s["count"],
            s["stalled_ms"],
            f"{100 * s['fraction']:.1f} %",
            s["longest_ms"],
            s["p50_ms"],
            s["p99_ms"],
            s["alone_ms"],
        ]
        for s in doc["stalls"]
        if s["count"] or s["stalled_ms"]
    ]
    return (
        "Stalls per phase and CPU",
        [
            "phase",
            "CPU",
            "count",
            "stalled (ms)",
            "of phase",
            "longest (ms)",
            "p50 (ms)",
            "p99 (ms)",
            "alone (ms)",
        ],
        rows,
    )


def _host_tables(doc: dict[str, Any]) -> list[Table]:
    """The host-truth tables: states per phase and vCPU, the longest stalls' host causes."""
    out: list[Table] = []
    out.append(
        (
            "Host states per phase and vCPU (ms)",
            ["phase", "endpoint", "vCPU", "ran the guest", *STATES, "unsampled"],
            [
                [
                    r["phase"],
                    r["endpoint"],
                    r["vcpu"],
                    r["ran_guest"],
                    *[r["state_ms"].get(k, 0.0) for k in STATES],
                    r["unsampled_ms"],
                ]
                for r in sorted(
                    doc["host_vcpu"],
                    key=lambda r: (
                        r["phase_index"],
                        not r["ran_guest"],
                        r["endpoint"],
                        r["vcpu"],
                    ),
                )
            ],
        )
    )
    longest = sorted(doc["host_stalls"], key=lambda x: -x["length_ms"])[:SHOW_HOST_STALLS]
    out.append(
        (
            "Stalls and what the host saw (the longest)",
            ["CPU", "phase", "at (ms)", "length (ms)", "host cause", "guest hint", "in words"],
            [
                [
                    x["cpu"],
                    x["phase"],
                    x["start_offset_ms"],
                    x["length_ms"],
                    x["host_cause"] or "-",
                    x["guest_cause"],
                    x["text"],
                ]
                for x in sorted(longest, key=lambda x: x["start_offset_ms"])
            ],
        )
    )
    return out


def _sensitivity_table(sens: dict[str, Any]) -> Table:
    """Expirations per phase and ladder T: stalls (all CPUs, worst CPU), canaries, peer."""
    head = ["phase", "source"] + [f"T={_fmt(t)} ms" for t in sens["ladder_ms"]]
    srows: list[list[Any]] = []
    for ph in sens["phases"]:
        if any(ph["stalls"]):
            srows.append([ph["phase"], "stalls (all CPUs)", *ph["stalls"]])
            srows.append([ph["phase"], "stalls (worst CPU)", *ph["worst_cpu"]])
        for canary, counts in ph["canaries"].items():
            srows.append([ph["phase"], f"canary {canary}", *counts])
        if any(ph["peer"]):
            srows.append([ph["phase"], "peer outside (clock lag)", *ph["peer"]])
    return ("Timeout sensitivity: expirations per phase", head, srows)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "(none)\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _intro(doc: dict[str, Any]) -> list[str]:
    lines = [f"run: {doc['rundir']}"]
    if doc.get("scenario"):
        lines.append(f"scenario: {doc['scenario']}")
    qemu = doc.get("qemu") or {}
    named = sorted(set((qemu.get("versions") or {}).values()))
    if named or qemu.get("accel"):
        text = "QEMU " + (" / ".join(named) if named else "version unknown")
        lines.append(text + (f"; {qemu['accel']}" if qemu.get("accel") else ""))
    m = doc.get("migration")
    if m:
        parts = [f"outcome: {m['outcome'] or 'not finished'}"]
        if m.get("downtime_ns") is not None:
            parts.append(f"downtime (STOP -> RESUME): {format_duration(m['downtime_ns'])}")
        if m.get("qemu_downtime_ms") is not None:
            parts.append(f"QEMU downtime: {m['qemu_downtime_ms']} ms")
        lines.append("; ".join(parts))
    if not doc["phases_known"]:
        lines.append("phases: unknown (no migration in the QMP records, or no QMP records)")
    al = doc["alignment"]
    err = al["max_error_ms"]
    lines.append(
        f"alignment: {al['method']}; largest error bound of a placed stall: "
        f"{'-' if err is None else f'{err:.1f} ms'}; stalls near a phase boundary: "
        f"{al['stalls_near_boundary']}"
    )
    ht = doc.get("host_truth") or {}
    if ht.get("available"):
        polls = ", ".join(f"{ep} {ms:g} ms" for ep, ms in ht["poll_ms"].items())
        text = (
            f"host truth: vcpu-states.jsonl, endpoints {', '.join(ht['endpoints'])}, "
            f"vCPUs {', '.join(str(v) for v in ht['vcpus'])}, polled every {polls}"
        )
        lines.append(text + (f"; {ht['note']}" if ht.get("note") else ""))
    else:
        lines.append(str(ht.get("note") or "no host truth"))
    lines.append(
        f"input: {doc['input']['skipped']} line(s) skipped, {doc['input']['notes']} note(s)"
    )
    return lines


def render_markdown(doc: dict[str, Any]) -> str:
    """report.md: the same tables as the HTML, for terminals and tickets."""
    out = ["# tsprobe report", ""]
    lead = [f for f in doc["findings"] if f["category"] == "outcome"]
    if lead:
        out += [f"## {lead[0]['text'][0].upper()}{lead[0]['text'][1:]}", ""]
        out += [f"- {f['text']}" for f in lead[1:]] + [""]
    out += [f"- {line}" for line in _intro(doc)]
    out += ["", "## Findings", ""]
    out += [
        f"- {'**' if f['warn'] else ''}{f['text']}{'**' if f['warn'] else ''}"
        for f in doc["findings"]
        if f["category"] != "outcome"
    ]
    for title, header, rows in tables(doc):
        out += ["", f"## {title}", "", _md_table(header, rows).rstrip()]
    if doc["input"]["issues"]:
        out += ["", "## Input issues", ""]
        out += [f"- {i['severity']}: {_where(i)}: {i['reason']}" for i in doc["input"]["issues"]]
    return "\n".join(out) + "\n"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;
max-width:1200px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child,td.text{text-align:left}th{background:#f4f4f4}
.bad{background:#fde0dc;font-weight:600}.good{color:#2e7d32}.diff{background:#fff3bf}
.warn{color:#b71c1c}.label{background:#e3f2fd;padding:6px 10px;border-radius:4px;margin:4px 0}
img{max-width:100%;border:1px solid #eee}.muted{color:#777;font-size:12px}
"""


def html_table(
    header: list[str], rows: list[list[Any]], flags: list[list[str]] | None = None
) -> str:
    """An HTML table; ``flags`` gives a CSS class per cell (``bad``, ``diff``, ``''``)."""
    if not rows:
        return "<p class=muted>(none)</p>"
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for c, v in enumerate(row):
            cls = flags[r][c] if flags else ""
            if not cls and isinstance(v, str) and v == "OUTSIDE":
                cls = "bad"
            if isinstance(v, str) and c > 0 and not cls and not v.replace(".", "").isdigit():
                cls = "text"
            attr = f' class="{cls}"' if cls else ""
            cells.append(f"<td{attr}>{html.escape(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


def img(png: bytes, alt: str) -> str:
    """An <img> with the PNG embedded as base64."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(doc: dict[str, Any], a: Analysis) -> str:
    """report.html: one self-contained page (inline CSS, embedded PNG plots)."""
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>tsprobe report: {html.escape(Path(doc['rundir']).name)}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>tsprobe report</h1>",
    ]
    lead = [f for f in doc["findings"] if f["category"] == "outcome"]
    if lead:
        cls = "warn" if lead[0]["warn"] else "good"
        parts.append(f"<h2 class={cls}>{html.escape(lead[0]['text'])}</h2><ul>")
        parts += [f"<li>{html.escape(f['text'])}</li>" for f in lead[1:]]
        parts.append("</ul>")
    parts += [f"<div class=muted>{html.escape(line)}</div>" for line in _intro(doc)]
    parts += [f"<div class=label>{html.escape(label)}</div>" for label in doc["labels"]]
    if not doc["phases_known"]:
        parts.append(
            "<div class=label>Phases are unknown: the figures below use the "
            "guest's own timeline.</div>"
        )
    parts.append("<h2>Findings</h2><ul>")
    for f in doc["findings"]:
        if f["category"] == "outcome":
            continue
        cls = ' class="warn"' if f["warn"] else ""
        parts.append(f"<li{cls}>{html.escape(f['text'])}</li>")
    parts.append("</ul><h2>Timeline</h2>")
    parts.append(img(timeline_png(a), "timeline: phases, stalls per CPU, clock offset"))
    parts.append(
        "<p class=muted>Bars: stalls per CPU (colour: cause hint); hatched: QEMU had the "
        "vCPUs stopped (the guest's clocks stood still); triangles: canary "
        "timeouts; red crosses: kernel warnings. Lower panel: how far the guest's clock fell "
        "behind the host's since the first clock sample, with each sample's error bound "
        "(half its round trip); dotted lines: detected steps.</p>"
    )
    if doc.get("host_truth", {}).get("available"):
        parts.append(
            "<p class=muted>Under each CPU's stalls: its vCPU thread's state on the host "
            "(vcpu-states.jsonl), on the QEMU that ran the guest at that moment; each column "
            "shows the state with the most time in it.</p>"
        )
    for title, header, rows in tables(doc):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(html_table(header, rows))
        if title.startswith("Timeout sensitivity"):
            parts.append(img(sensitivity_png([a]), "timeout sensitivity curve"))
            parts.append(
                "<p class=muted>A stall of guest length S on a CPU makes one wait with "
                "timeout T &lt; S expire late, per stall and per T; a peer outside the guest "
                "sees each clock-lag step L as one expiration for every T &lt; L.</p>"
            )
    if doc["input"]["issues"]:
        parts.append("<h2>Input issues</h2><ul>")
        parts += [
            f"<li>{html.escape(i['severity'])}: {html.escape(_where(i))}: "
            f"{html.escape(i['reason'])}</li>"
            for i in doc["input"]["issues"]
        ]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(a: Analysis, out: Path) -> dict[str, Path]:
    """Write report.html, report.md and summary.json into ``out`` (created if missing).

    :param a: the analysis.
    :param out: the directory.
    :return: the paths written, keyed by name.
    """
    out.mkdir(parents=True, exist_ok=True)
    doc = build_summary(a)
    paths = {
        "summary.json": out / "summary.json",
        "report.md": out / "report.md",
        "report.html": out / "report.html",
    }
    rundir.write_json_atomic(paths["summary.json"], doc)
    paths["report.md"].write_text(render_markdown(doc), encoding="utf-8")
    paths["report.html"].write_text(render_html(doc, a), encoding="utf-8")
    return paths


def dumps(doc: dict[str, Any]) -> str:
    """The summary as compact JSON (for tests and pipes)."""
    return json.dumps(doc, separators=(",", ":"))


def _where(issue: dict[str, Any]) -> str:
    """``FILE:LINE``, or ``FILE`` for an issue about the file as a whole (line 0)."""
    return f"{issue['file']}:{issue['line']}" if issue["line"] else str(issue["file"])
