"""The policy study's report rendered: ``study.md`` and ``study.html`` from study.json's document.

``analysis.report.study`` makes the document (cells, aggregates, verdicts); this module only
renders it. The rows of the results table (``result_rows``: one per scenario x hold x
clocksource x accel, the outcome as k of n and the median with its spread) are shared by
the Markdown and the HTML; the HTML is self-contained (inline CSS, plots as base64 PNG:
outcome against hold per policy, canary and peer timeouts per T against hold per policy).
``write_reports`` writes all three files of a study DIR.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

from analysis.lab.study import (
    hold_label,
)
from analysis.report.study import (
    LOST_MS,
    OUTCOME_COLOURS,
    OUTCOMES,
    _count_spread,
    _median,
    _s,
    _spread,
    refresh,
)


def result_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The study's headline table: one row per aggregate."""
    header = [
        "policy",
        "hold",
        "clocksource",
        "regime",
        "outcome",
        "longest stall per CPU (median, range)",
        "clock lag at resume",
        "canary timeouts >= 1 s",
        "peer timeouts >= 1 s",
        "kernel warnings",
        "QEMU recovery",
    ]
    rows: list[list[Any]] = []
    for a in doc["aggregates"]:
        stalls = ", ".join(
            f"CPU {k} {_spread(v)}" for k, v in sorted(a["longest_stall_ms"].items())
        )
        big = [t for t in a["timeouts"] if float(t) >= 1000]
        canary = ", ".join(f"{_s(float(t))}: {_count_spread(a['timeouts'][t])}" for t in big)
        peer = ", ".join(f"{_s(float(t))}: {_count_spread(a['peer_timeouts'].get(t))}" for t in big)
        warns = ", ".join(f"{k} {v['runs']}/{a['n']}" for k, v in a["kernel_warnings"].items())
        cs = a["clocksource"] + (
            f" ({', '.join(a['clocksources_used'])})" if a["clocksources_used"] else ""
        )
        rows.append(
            [
                f"{a['policy']} ({a['scenario']})",
                hold_label(int(a["hold_ms"] * 1e6)),
                cs,
                "; ".join(a["regimes"]) or "-",
                a["outcome_text"],
                stalls or "-",
                _spread(a["clock_lag_growth_ms"])
                + (
                    f" (lost while running: {_spread(a['time_lost_ms'])})"
                    if (_median(a["time_lost_ms"]) or 0.0) >= LOST_MS
                    else ""
                ),
                canary or "-",
                peer or "-",
                warns or "none",
                _spread(a["recovery_ms"]),
            ]
        )
    return header, rows


def _detail_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = [
        "policy",
        "hold",
        "cs",
        "stalled per CPU (median)",
        "some CPUs stalled while others ran (guest)",
        "a vCPU ran while another was blocked (host)",
        "vCPUs stopped by QEMU",
        "postcopy-paused",
        "canary timeouts per T (median)",
        "stall-derived per T (median)",
    ]
    rows: list[list[Any]] = []
    for a in doc["aggregates"]:
        per_t = ", ".join(f"{_s(float(t))}: {_count_spread(v)}" for t, v in a["timeouts"].items())
        st_t = ", ".join(
            f"{_s(float(t))}: {_count_spread(v)}" for t, v in a["stall_timeouts"].items()
        )
        rows.append(
            [
                a["scenario"],
                hold_label(int(a["hold_ms"] * 1e6)),
                a["clocksource"],
                ", ".join(f"CPU {k} {_spread(v)}" for k, v in sorted(a["stalled_ms"].items()))
                or "-",
                _spread(a["some_stalled_ms"]),
                _spread(a["host_ran_while_blocked_ms"]),
                _spread(a["vcpus_stopped_ms"]),
                _spread(a["pause_ms"]),
                per_t or "-",
                st_t or "-",
            ]
        )
    return header, rows


def _run_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["run", "outcome", "evidence", "clocksource", "regime", "wall s"]
    rows = [
        [
            c["rundir"],
            c["outcome"],
            " | ".join(c["evidence"]) or "-",
            c.get("clocksource_used") or "-",
            f"QEMU {c['qemu_version']}, {c['accel_used']}" if c.get("qemu_version") else "-",
            c.get("wall_s"),
        ]
        for c in doc["cells"]
    ]
    return header, rows


def _intro(doc: dict[str, Any]) -> list[str]:
    p = doc["params"]
    holds = ", ".join(hold_label(int(h)) for h in p["holds_ns"])
    return [
        f"Study of {', '.join(p['scenarios'])} at holds {holds}, clocksource "
        f"{', '.join(p['clocksources'])}, accel {', '.join(p['accels'])}, "
        f"{p['repeat']} repeat(s): {doc['runs_done']} of {doc['runs_planned']} runs done "
        f"({doc['status']}).",
        "paused keeps the vCPUs running while postcopy is paused (QEMU's behaviour); "
        "paused-stop stops them for the pause (the proposed libvirt change). Outcomes: "
        "recovered, degraded (kernel warnings or guest time lost beyond the stops), "
        "not-recovered, lab-error (the lab failed, not the guest: left out of the figures).",
    ]


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return ("-" if v is None else str(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(doc: dict[str, Any]) -> str:
    """study.md."""
    parts = ["# Policy study", "", *_intro(doc), "", "## Results", ""]
    parts += [_md_table(*result_rows(doc)), "", "## Verdict per hold", ""]
    for v in doc["verdicts"]:
        parts += [f"### {v['title']}", ""]
        parts += [f"- {s}" for s in v["policies"]]
        if v["comparison"]:
            parts += ["", v["comparison"]]
        parts += ["", v["regime"], ""]
    parts += ["## Stalls, asymmetry and timeouts", "", _md_table(*_detail_rows(doc)), ""]
    parts += ["## Runs", "", _md_table(*_run_rows(doc)), ""]
    return "\n".join(parts)


def render_html(doc: dict[str, Any]) -> str:
    """study.html: one self-contained page."""
    from analysis.report.render import CSS, html_table, img

    parts = [
        "<!doctype html><html><head><meta charset=utf-8><title>tsprobe policy study</title>",
        f"<style>{CSS}</style></head><body><h1>Policy study</h1>",
    ]
    parts += [f"<p>{html.escape(p)}</p>" for p in _intro(doc)]
    parts += ["<h2>Results</h2>", html_table(*result_rows(doc))]
    parts.append("<h2>Verdict per hold</h2>")
    for v in doc["verdicts"]:
        parts.append(f"<h3>{html.escape(v['title'])}</h3><ul>")
        parts += [f"<li>{html.escape(s)}</li>" for s in v["policies"]]
        parts.append("</ul>")
        if v["comparison"]:
            parts.append(f"<p><b>{html.escape(v['comparison'])}</b></p>")
        parts.append(f"<p class=label>{html.escape(v['regime'])}</p>")
    if doc["aggregates"]:
        parts.append("<h2>Plots</h2>")
        parts.append(img(outcome_png(doc), "outcome against hold per policy"))
        parts.append(img(timeouts_png(doc), "timeouts per T against hold per policy"))
    parts += ["<h2>Stalls, asymmetry and timeouts</h2>", html_table(*_detail_rows(doc))]
    parts += ["<h2>Runs</h2>", html_table(*_run_rows(doc))]
    parts.append("</body></html>")
    return "\n".join(parts)


def _series(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Aggregates per series (scenario, and clocksource/accel when several), by hold."""
    p = doc["params"]
    out: dict[str, list[dict[str, Any]]] = {}
    for a in doc["aggregates"]:
        name = a["scenario"]
        if len(p["clocksources"]) > 1:
            name += f" cs={a['clocksource']}"
        if len(p["accels"]) > 1:
            name += f" {a['accel']}"
        out.setdefault(name, []).append(a)
    for rows in out.values():
        rows.sort(key=lambda a: a["hold_ms"])
    return out


def outcome_png(doc: dict[str, Any]) -> bytes:
    """Stacked bars per hold and policy: the share of runs per outcome, k/n on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(doc)
    holds = sorted({a["hold_ms"] for a in doc["aggregates"]})
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    width = 0.8 / max(len(series), 1)
    for s, (name, rows) in enumerate(series.items()):
        for a in rows:
            x = holds.index(a["hold_ms"]) + (s - (len(series) - 1) / 2) * width
            bottom = 0.0
            for o in OUTCOMES:
                share = a["outcomes"][o] / a["n"]
                if share:
                    ax.bar(x, share, width * 0.9, bottom=bottom, color=OUTCOME_COLOURS[o])
                bottom += share
            ok = a["outcomes"]["recovered"]
            ax.text(x, 1.02, f"{name}\n{ok}/{a['n']} ok", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(holds)), [hold_label(int(h * 1e6)) for h in holds])
    ax.set_xlabel("hold (postcopy-paused)")
    ax.set_ylabel("share of runs")
    ax.set_ylim(0, 1.35)
    from matplotlib.patches import Rectangle

    handles = [Rectangle((0, 0), 1, 1, color=OUTCOME_COLOURS[o]) for o in OUTCOMES]
    ax.legend(handles, OUTCOMES, fontsize=8, loc="upper right", ncol=4)
    ax.set_title("Guest outcome against hold, per policy", fontsize=10)
    return _png(fig)


def timeouts_png(doc: dict[str, Any]) -> bytes:
    """Per policy, median timeouts per ladder T against hold (canaries solid, peer dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(doc)
    fig, axes = plt.subplots(1, max(len(series), 1), figsize=(12, 3.4), dpi=100, squeeze=False)
    ladder: list[str] = []
    for a in doc["aggregates"]:
        for t in a["timeouts"]:
            if t not in ladder:
                ladder.append(t)
    colours = plt.get_cmap("viridis")
    for ax, (name, rows) in zip(axes[0], series.items(), strict=False):
        xs = [a["hold_ms"] / 1000 for a in rows]
        for i, t in enumerate(ladder):
            colour = colours(i / max(len(ladder) - 1, 1))
            for field, style in (("timeouts", "-"), ("peer_timeouts", "--")):
                med = [_median(a[field].get(t)) for a in rows]
                if not any(med):
                    continue
                ys = [m if m is not None else float("nan") for m in med]
                label = f"T={_s(float(t))}" + (" peer" if field == "peer_timeouts" else "")
                # shrinking markers keep lines of equal counts visible under each other
                size = max(9.0 - 1.5 * i, 3.0)
                ax.plot(xs, ys, style, marker="o", ms=size, color=colour, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("hold (s)")
        ax.set_xticks(xs)
        ax.set_ylabel("timeouts (median per run)")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(bottom=0)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Timeouts per T: guest canaries (solid), a peer outside (dashed)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_reports(out: Path, doc: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write study.md and study.html (and study.json when ``doc`` is None: refreshed)."""
    doc = doc if doc is not None else refresh(out)
    paths = {"md": out / "study.md", "html": out / "study.html"}
    paths["md"].write_text(render_markdown(doc))
    paths["html"].write_text(render_html(doc))
    return paths
