"""The report's figures, drawn with matplotlib's Agg backend into PNG bytes.

- ``timeline_png``: the phases as coloured bands, hatched where QEMU had the vCPUs
  stopped (every STOP to the next RESUME, on any endpoint); one lane per CPU with its stalls
  (bars), the canaries' timeouts (triangles) and kernel warnings (red crosses); with host
  truth (``analysis.analyze.host_vcpu``), under each CPU's stalls a band of its vCPU thread's host
  state (``HOST_COLOURS``, the state with the most time in each column) on the QEMU that
  ran the guest at that moment; under it all the guest clock's lag behind the host since
  the first clock sample (monotonic: the freezes; realtime: freezes and steps), with each
  sample's error bound as a bar.
- ``sensitivity_png``: expirations against the timeout T (log scale) per phase, from the
  stalls (solid) and, for a peer outside the guest, from the clock-lag steps (dashed).

Stalls are drawn on a grid of ``BINS`` columns per lane (a column is filled when any
stall touches it), so a run with a million stalls draws as fast as one with ten. The
x axis is seconds from the analysis origin (the first QMP record, or the first event).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from analysis.analyze.attribution import Analysis
from analysis.analyze.host_vcpu import STATES

BINS = 1600
PHASE_COLOURS = {
    "setup": "#e8e8e8",
    "precopy": "#dbe9f6",
    "stop-and-copy": "#f4c7c3",
    "switchover": "#f4c7c3",
    "vm-stopped": "#f4c7c3",
    "postcopy-active": "#d9ead3",
    "postcopy-paused": "#fce5cd",
    "postcopy-recover-setup": "#fff2cc",
    "postcopy-recover": "#fff2cc",
    "completed": "#f3f3f3",
}
CAUSE_COLOURS = ("#6a51a3", "#e6550d", "#cb181d", "#636363")
#: The host-state band's colour per vCPU thread state (``analysis.analyze.host_vcpu.STATES``).
HOST_COLOURS = {
    "running": "#a1d99b",
    "runnable": "#fdae6b",
    "userfault": "#ef3b2c",
    "lock-wait": "#807dba",
    "halted": "#d9d9d9",
    "stopped": "#252525",
    "other": "#969696",
}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _bands(ax: Axes, a: Analysis, label: bool) -> None:
    if not a.phases_known:
        return
    for span in a.spans:
        x0 = (span.start_ns - a.origin_ns) / 1e9
        x1 = (span.end_ns - a.origin_ns) / 1e9
        ax.axvspan(x0, x1, color=PHASE_COLOURS.get(span.name, "#eeeeee"), zorder=0, lw=0)
        ax.axvline(x0, color="#999999", lw=0.5, zorder=1)
        if label and x1 > x0:
            ax.text(
                (x0 + x1) / 2,
                1.01,
                a.phase_label(span.index),
                transform=ax.get_xaxis_transform(),
                rotation=30,
                ha="left",
                va="bottom",
                fontsize=7,
            )


def timeline_png(a: Analysis) -> bytes:
    """The timeline figure (see the module docstring)."""
    lanes = a.run.lanes
    n = max(len(lanes), 1)
    fig = plt.figure(figsize=(11, 1.6 + 0.45 * n + 2.2))
    gs = fig.add_gridspec(2, 1, height_ratios=[0.45 * n + 0.6, 2.0], hspace=0.35)
    ax = fig.add_subplot(gs[0])
    ax2 = fig.add_subplot(gs[1], sharex=ax)
    x_lo, x_hi = 0.0, max((a.end_ns - a.origin_ns) / 1e9, 1e-3)
    _bands(ax, a, True)
    _bands(ax2, a, False)
    for w in a.alignment.windows:
        x0, x1 = (w.start_ns - a.origin_ns) / 1e9, (w.end_ns - a.origin_ns) / 1e9
        for axis in (ax, ax2):
            axis.axvspan(x0, x1, facecolor="none", hatch="///", edgecolor="#555555", lw=0, zorder=2)
    edges = np.linspace(x_lo, x_hi, BINS + 1)
    banded = _host_bands(ax, a, edges)
    bar_y, bar_h = (-0.42, 0.45) if banded else (-0.35, 0.7)
    _stall_bars(ax, a, edges, (bar_y, bar_h))
    for pt in a.points:
        y = pt.lane if pt.lane >= 0 else len(lanes) - 0.5
        x = (pt.host_ns - a.origin_ns) / 1e9
        if pt.kind == "timeout":
            ax.plot([x], [y + 0.3], marker="v", color="#08519c", ms=5, zorder=4)
        else:
            ax.plot([x], [y], marker="x", color="#d62728", ms=8, mew=2, zorder=5)
    _lane_axis(ax, a, banded, (x_lo, x_hi))
    _lag_panel(ax2, a)
    right = 0.76 if banded else 0.86
    fig.subplots_adjust(left=0.11 if banded else 0.09, right=right, top=0.86, bottom=0.1)
    return _png(fig)


def _stall_bars(
    ax: Axes, a: Analysis, edges: npt.NDArray[np.float64], bar: tuple[float, float]
) -> None:
    """Each lane's stalls as bars binned on ``edges``, coloured by cause hint: a bin is
    filled when a stall of that lane and cause covers any of it (one collection per cause)."""
    p = a.placed
    n_causes = len(CAUSE_COLOURS)
    x_lo, width = edges[0], edges[1] - edges[0]
    bar_y, bar_h = bar
    s = (p.start - a.origin_ns) / 1e9
    e = (p.end - a.origin_ns) / 1e9
    b0 = np.clip(((s - x_lo) / width).astype(np.int64), 0, BINS - 1)
    b1 = np.clip(((e - x_lo) / width).astype(np.int64), 0, BINS - 1)
    key = p.lane.astype(np.int64) * n_causes + np.clip(p.cause, 0, n_causes - 1)
    diff = np.zeros((max(len(a.run.lanes), 1) * n_causes, BINS + 1), dtype=np.int64)
    np.add.at(diff, (key, b0), 1)
    np.add.at(diff, (key, b1 + 1), -1)
    filled = np.cumsum(diff[:, :-1], axis=1) > 0
    verts: list[list[list[tuple[float, float]]]] = [[] for _ in range(n_causes)]
    for k in np.flatnonzero(filled.any(axis=1)):
        lane, cause = divmod(int(k), n_causes)
        d = np.diff(np.concatenate([[0], filled[k].astype(np.int8), [0]]))
        y0, y1 = lane + bar_y, lane + bar_y + bar_h
        for i, j in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True):
            x0, x1 = float(edges[i]), float(edges[j])
            verts[cause].append([(x0, y0), (x0, y1), (x1, y1), (x1, y0)])
    for cause, rects in enumerate(verts):
        if rects:
            ax.add_collection(PolyCollection(rects, color=CAUSE_COLOURS[cause], zorder=3))


def _lane_axis(ax: Axes, a: Analysis, banded: bool, xlim: tuple[float, float]) -> None:
    """The lanes' labels (with the host vCPU rows when banded), limits and legends."""
    lanes = a.run.lanes
    n = max(len(lanes), 1)
    x_lo, x_hi = xlim
    if banded:
        ticks = [y for i in range(len(lanes)) for y in (i - 0.2, i + 0.25)]
        names = [
            t for i in range(len(lanes)) for t in (a.lane_label(i), f"host vCPU {lanes[i].cpu}")
        ]
        ax.set_yticks(ticks, names, fontsize=8)
    else:
        ax.set_yticks(range(len(lanes)), [a.lane_label(i) for i in range(len(lanes))])
    ax.set_ylim(-0.6, n - 0.4)
    ax.invert_yaxis()
    ax.set_xlim(x_lo, x_hi)
    handles = [Rectangle((0, 0), 1, 1, color=col) for col in CAUSE_COLOURS]  # one per cause hint
    causes = ax.legend(
        handles,
        ["guest-sched", "host-preempt", "vcpu-blocked", "unknown"],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
        title="stall cause",
        title_fontsize=7,
    )
    if banded:
        ax.add_artist(causes)
        ax.legend(
            [Rectangle((0, 0), 1, 1, color=HOST_COLOURS[st]) for st in STATES],
            list(STATES),
            loc="upper left",
            bbox_to_anchor=(1.155, 1.0),
            fontsize=7,
            title="host state",
            title_fontsize=7,
        )


def _lag_panel(ax2: Axes, a: Analysis) -> None:
    """The lower panel: each boot's guest clock lag behind the host, with error bars."""
    for ba in a.alignment.boots.values():
        if not len(ba.host):
            continue
        host, mono_lag, real_lag, err = ba.lag_series()
        xs = (host - a.origin_ns) / 1e9
        ax2.errorbar(
            xs,
            mono_lag,
            yerr=err,
            fmt="o-",
            ms=3,
            lw=1,
            capsize=2,
            label=f"monotonic ({ba.agent})",
            color="#2171b5",
        )
        if np.any(np.abs(real_lag - mono_lag) > 1.0):
            ax2.plot(
                xs, real_lag, "s--", ms=3, lw=1, label=f"realtime ({ba.agent})", color="#cc4c02"
            )
    for step in a.alignment.steps:
        ax2.axvline((step.at_ns - a.origin_ns) / 1e9, color="#2171b5", ls=":", lw=1)
    ax2.set_ylabel("guest lag behind\nhost (ms)", fontsize=8)
    ax2.set_xlabel(
        "seconds from the first record" if a.phases_known else "seconds (guest's own clock)"
    )
    if a.alignment.boots and any(len(b.host) for b in a.alignment.boots.values()):
        ax2.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    else:
        ax2.text(
            0.5,
            0.5,
            "no clock samples: the offset against the host is unknown",
            transform=ax2.transAxes,
            ha="center",
            va="center",
            fontsize=9,
        )


def _host_bands(ax: Axes, a: Analysis, edges: npt.NDArray[np.float64]) -> bool:
    """Draw each lane's host-state band (module docstring); False when there is none."""
    h = a.host
    if h is None or not h.available or not h.tracks:
        return False
    real = np.rint(edges * 1e9).astype(np.int64) + np.int64(a.origin_ns)
    mono = h.clock.to_mono(real)
    for li, lane in enumerate(a.run.lanes):
        track = h.tracks.get(lane.cpu)
        if track is None or not len(track.start):
            continue
        times = track.time_in(mono[:-1], mono[1:])
        dominant = np.where(times.sum(axis=0) > 0, np.argmax(times, axis=0), -1)
        change = np.flatnonzero(np.diff(dominant)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(dominant)]])
        for code, name in enumerate(STATES):
            runs = [
                (edges[i], edges[j] - edges[i])
                for i, j in zip(starts, ends, strict=True)
                if dominant[i] == code
            ]
            if runs:
                ax.broken_barh(runs, (li + 0.1, 0.3), color=HOST_COLOURS[name], zorder=3, lw=0)
    return True


def sensitivity_png(analyses: Sequence[Analysis], names: Sequence[str] | None = None) -> bytes:
    """Expirations against timeout T per phase (and per run when several are given)."""
    fig, ax = plt.subplots(figsize=(9, 4.2))
    styles = ["-", "--", "-.", ":"]
    drawn = False
    for r, a in enumerate(analyses):
        grid = np.array(a.sensitivity.grid) / 1e9
        prefix = f"{names[r]}: " if names else ""
        for span in a.spans:
            counts = a.sensitivity.grid_counts.get(span.index, [])
            if any(counts):
                ax.step(
                    grid,
                    counts,
                    where="post",
                    ls=styles[r % len(styles)],
                    label=prefix + a.phase_label(span.index),
                )
                drawn = True
        peer = [sum(1 for s in a.alignment.steps if s.lag_ns > t) for t in a.sensitivity.grid]
        if any(peer):
            ax.step(
                grid,
                peer,
                where="post",
                ls=":",
                color="black",
                lw=1.5,
                label=prefix + "peer outside (clock-lag steps)",
            )
            drawn = True
    ax.set_xscale("log")
    ax.set_xlabel("application timeout T (s)")
    ax.set_ylabel("expirations (one thread per CPU)")
    for t in analyses[0].sensitivity.ladder if analyses else []:
        ax.axvline(t / 1e9, color="#bbbbbb", lw=0.8, zorder=0)
    if drawn:
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.text(
            0.5,
            0.5,
            "no stalls: no expirations at any T",
            transform=ax.transAxes,
            ha="center",
            va="center",
        )
    fig.tight_layout()
    return _png(fig)
