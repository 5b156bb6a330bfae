"""Per-phase stall and timeout tables from Prometheus range-query results (pure, no I/O).

``analysis.prom.source`` asks Prometheus for the agent's counters over a time range with
``/api/v1/query_range``; ``build_tables`` turns those answers (the JSON exactly as
Prometheus returns it) and a list of phase windows into the tables a report prints. It
is the metrics-only twin of ``analysis.analyze.attribution``, for fleets where only Prometheus kept
the data, and it is coarser. What a range query gives, and what follows from it:

* A range query evaluates the expression at ``start, start + step, ...``; a plain selector
  there is the *latest scrape at or before* that instant. So a counter's increase over a
  phase ``(a, b]`` is the sum of the increases between successive points in it, from the
  point at or before ``a``; a drop is a counter reset (the agent restarted) and counts the
  new value, as PromQL's ``increase`` does (without its extrapolation).
* Every agent counter counts from 0 at the agent's start (the ladder's rungs and each
  CPU's stalls are exported at 0 from the first scrape on). When the agent started inside
  the range (``tsprobe_agent_start_time_seconds``, query ``started``), a series' first
  point is therefore an increase since that start, not a baseline: a slow guest whose first
  successful scrape came after its first stalls or timeouts still has them counted (in the
  window of that scrape). PromQL's ``increase`` would drop them; an agent that started
  before the range gives no such zero, and its first point stays the baseline.
* Prometheus stamps a scrape's samples with the time the scrape *began*, but the agent
  reads its counters when it answers. A guest that answers late (a page fault, a paused
  migration: seen 3.3 s) would put what it counted after a phase boundary before it. So a
  point is placed at the end of its scrape when that is later than the point's step
  (``scrape_ends``: the scrape's start, ``timestamp(tsprobe_info)``, plus its
  ``scrape_duration_seconds``, taken from successful scrapes only; queries ``scraped``
  and ``took``); without those answers the points stay at their steps.
* A stall therefore lands in the phase of the first scrape that showed it. The agent
  counts a stall when it ends and its samplers report within a second, so a long stall
  lands in the phase in which it *ended*, up to one scrape interval (plus the step) later.
  Phase boundaries are exact (the run directory or the host exporter's timestamps); the
  stall placement is not. The event log places each stall by its start and end instead.
* Lengths exist only as histogram buckets (1, 2, 5 per decade, 1 ms to 300 s): ``p50`` and
  ``p99`` are interpolated linearly inside the bucket that holds the rank, exactly as
  PromQL's ``histogram_quantile`` does (the first bucket starts at 0; a rank in ``+Inf``
  gives the highest finite bound), clamped to the phase's longest stall when known.
* ``tsprobe_cpu_stall_longest_seconds`` is the longest stall since the agent started, so
  it names a phase's longest stall exactly only when that stall set a new record (the
  gauge rose during the phase: its ``max_over_time`` over the phase exceeds its value at
  the phase's start). Otherwise ``longest_ns`` is None and ``longest_bucket`` bounds it.

Counts are per phase window x CPU (every CPU the agent exports, zeros included) and per
phase window x canary x timeout T. ``PromTables.note`` says all this in one paragraph for
the report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from analysis.errors import PrometheusError
from probe.durations import format_duration

#: The phase window before the first phase (as ``analysis.analyze.attribution`` names it).
BEFORE_PHASE = "before migration"
#: The window after the last phase ended (a recording that stopped mid-migration).
AFTER_PHASE = "after the last phase"
#: The only window when no phase is known.
WHOLE_RANGE = "whole range (phases unknown)"

Point = tuple[float, float]


@dataclass(frozen=True)
class Series:
    """One series of a range-query answer: its labels and its (Unix seconds, value) points."""

    labels: Mapping[str, str]
    points: tuple[Point, ...]


@dataclass(frozen=True)
class Window:
    """A phase cut to the queried range, on the host's realtime clock.

    :param index: position in the table (phase names can repeat).
    :param name: the phase name (``precopy``, ``switchover``, ...) or ``BEFORE_PHASE``...
    :param start_ns: Unix ns of the start.
    :param end_ns: Unix ns of the end.
    :param vm_stopped: the guest's vCPUs were stopped (a pause phase).
    """

    index: int
    name: str
    start_ns: int
    end_ns: int
    vm_stopped: bool = False


@dataclass(frozen=True)
class StallRow:
    """Stalls of one CPU in one phase window.

    :param phase: the window's index.
    :param cpu: the ``cpu`` label.
    :param count: stalls counted (``_count`` increase).
    :param stalled_ns: their summed length (``_sum`` increase).
    :param longest_ns: the longest, when it set a new agent-wide record; else None.
    :param longest_bucket: (lower, upper] ns of the highest bucket holding a stall, or None
        without stalls (upper is ``math.inf`` above the last bucket).
    :param p50_ns: bucket-interpolated median, None without stalls.
    :param p99_ns: bucket-interpolated 99th percentile, None without stalls.
    """

    phase: int
    cpu: str
    count: int
    stalled_ns: int
    longest_ns: int | None
    longest_bucket: tuple[float, float] | None
    p50_ns: int | None
    p99_ns: int | None


@dataclass(frozen=True)
class TimeoutRow:
    """Expirations of one canary at one ladder value T in one phase window.

    :param phase: the window's index.
    :param canary: the ``canary`` label.
    :param timeout_ns: T in ns (from the ``timeout`` label, seconds).
    :param count: waits that outlived T.
    """

    phase: int
    canary: str
    timeout_ns: int
    count: int


@dataclass(frozen=True)
class PromTables:
    """The report's tables from Prometheus, with what they are made of.

    :param instance: the agent's ``instance`` label.
    :param start_ns: start of the queried range (Unix ns); ``end_ns`` its end.
    :param step_s: the range queries' step.
    :param scrape_interval_s: the agent's scrape interval as seen in the data, or None.
    :param phase_source: where the phases come from (run directory, host exporter, none).
    :param windows: the phase windows, in order.
    :param stalls: one row per window x CPU.
    :param timeouts: one row per window x canary x T.
    :param notes: what else the reader should know (warnings from Prometheus, ...).
    """

    instance: str
    start_ns: int
    end_ns: int
    step_s: float
    scrape_interval_s: float | None
    phase_source: str
    windows: tuple[Window, ...]
    stalls: tuple[StallRow, ...]
    timeouts: tuple[TimeoutRow, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def cpus(self) -> list[str]:
        """The CPUs, in numeric order."""
        return sorted({r.cpu for r in self.stalls}, key=lambda c: (len(c), c))

    @property
    def ladder_ns(self) -> list[int]:
        """The timeout ladder values seen, ascending."""
        return sorted({r.timeout_ns for r in self.timeouts})

    @property
    def note(self) -> str:
        """The coarseness statement the report must print beside these tables."""
        interval = (
            f"{format_duration(self.scrape_interval_s * 1e9)}"
            if self.scrape_interval_s
            else "unknown"
        )
        return (
            "These tables come from Prometheus metrics, not from the guest's event log, and "
            f"are coarser: a stall is counted in the phase of the first scrape that showed "
            f"it, at the scrape's end (scrape interval {interval}, query step "
            f"{format_duration(self.step_s * 1e9)};"
            " the agent counts a stall when it ends, so a long stall lands in the phase in "
            "which it ended); lengths are known only to the histogram's bucket bounds "
            "(1, 2, 5 per decade), so p50 and p99 are interpolated within buckets, and a "
            "phase's longest stall is exact only when it was the longest since the agent "
            "started (otherwise its bucket is given)."
        )

    def by_ladder(self) -> dict[int, dict[str, list[int]]]:
        """Expirations as phase -> canary -> count per ``ladder_ns`` value."""
        ladder = self.ladder_ns
        out: dict[int, dict[str, list[int]]] = {}
        for row in self.timeouts:
            counts = out.setdefault(row.phase, {}).setdefault(row.canary, [0] * len(ladder))
            counts[ladder.index(row.timeout_ns)] += row.count
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for summary.json)."""
        return {
            "source": "prometheus",
            "instance": self.instance,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "step_s": self.step_s,
            "scrape_interval_s": self.scrape_interval_s,
            "phase_source": self.phase_source,
            "note": self.note,
            "notes": list(self.notes),
            "phases": [
                {
                    "index": w.index,
                    "name": w.name,
                    "start_ns": w.start_ns,
                    "end_ns": w.end_ns,
                    "vm_stopped": w.vm_stopped,
                }
                for w in self.windows
            ],
            "stalls": [
                {
                    "phase": r.phase,
                    "cpu": r.cpu,
                    "count": r.count,
                    "stalled_ns": r.stalled_ns,
                    "longest_ns": r.longest_ns,
                    "longest_bucket_s": (
                        None
                        if r.longest_bucket is None
                        else [r.longest_bucket[0] / 1e9, _json_float(r.longest_bucket[1] / 1e9)]
                    ),
                    "p50_ns": r.p50_ns,
                    "p99_ns": r.p99_ns,
                }
                for r in self.stalls
            ],
            "timeouts": [
                {"phase": r.phase, "canary": r.canary, "timeout_ns": r.timeout_ns, "count": r.count}
                for r in self.timeouts
            ],
        }


def _json_float(value: float) -> float | str:
    return "+Inf" if math.isinf(value) else value


# -- parsing Prometheus answers --------------------------------------------------------------


def parse_matrix(response: Mapping[str, Any], what: str = "query") -> list[Series]:
    """The series of a ``/api/v1/query_range`` answer.

    :param response: the decoded JSON body (``{"status": "success", "data": {"resultType":
        "matrix", "result": [...]}}``).
    :param what: the query, for messages.
    :raise PrometheusError: for an error answer or one that is not a matrix.
    :return: the series, points sorted by time; values that are not numbers are left out.
    """
    if response.get("status") != "success":
        raise PrometheusError(f"Prometheus refused {what}: {response.get('error', response)}")
    data = response.get("data")
    if not isinstance(data, Mapping) or data.get("resultType") != "matrix":
        raise PrometheusError(f"Prometheus answered {what} with something other than a matrix")
    out: list[Series] = []
    for item in data.get("result", []):
        labels = item.get("metric", {}) if isinstance(item, Mapping) else {}
        points: list[Point] = []
        for pair in item.get("values", []) if isinstance(item, Mapping) else []:
            try:
                t, v = float(pair[0]), float(pair[1])
            except (TypeError, ValueError, IndexError):
                continue
            if not math.isnan(v):
                points.append((t, v))
        points.sort()
        out.append(Series({str(k): str(v) for k, v in labels.items()}, tuple(points)))
    return out


# -- series arithmetic ---------------------------------------------------------------------


def value_at(points: Sequence[Point], t: float) -> float | None:
    """The value of the last point at or before ``t`` (None before the first)."""
    found = None
    for when, value in points:
        if when > t:
            break
        found = value
    return found


def counter_increase(points: Sequence[Point], start: float, end: float) -> float:
    """How much a counter grew in ``(start, end]``, resets counted as PromQL does.

    Without a point at or before ``start``, the first point inside is the baseline (what
    came before the first scrape is not counted).
    """
    previous = value_at(points, start)
    total = 0.0
    for when, value in points:
        if when <= start:
            continue
        if when > end:
            break
        if previous is not None:
            total += value - previous if value >= previous else value
        previous = value
    return total


def max_in(points: Sequence[Point], start: float, end: float) -> float | None:
    """The largest value of the points in ``(start, end]``, or None."""
    values = [v for t, v in points if start < t <= end]
    return max(values) if values else None


def _le(text: str) -> float:
    return math.inf if text in ("+Inf", "Inf", "inf") else float(text)


def bucket_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """PromQL's ``histogram_quantile`` on cumulative (upper bound, count) pairs.

    :param q: the quantile, 0 to 1.
    :param buckets: (le, cumulative count), any order, ``+Inf`` included.
    :return: the estimate in the buckets' unit, or None without observations.
    """
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        return None
    counts: list[float] = []
    for _, count in ordered:  # cumulative counts never fall (guards rounding)
        counts.append(max(count, counts[-1]) if counts else count)
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    index = next(i for i, c in enumerate(counts) if c >= rank)
    upper = ordered[index][0]
    if math.isinf(upper):
        return ordered[-2][0] if len(ordered) > 1 else None
    lower = ordered[index - 1][0] if index > 0 else 0.0
    below = counts[index - 1] if index > 0 else 0.0
    if upper <= 0 or counts[index] == below:
        return upper
    return lower + (upper - lower) * (rank - below) / (counts[index] - below)


def _top_bucket(buckets: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    ordered = sorted(buckets)
    for i in range(len(ordered) - 1, -1, -1):
        below = ordered[i - 1][1] if i > 0 else 0.0
        if ordered[i][1] - below >= 0.5:
            return (ordered[i - 1][0] if i > 0 else 0.0, ordered[i][0])
    return None


# -- the tables ------------------------------------------------------------------------------


def agent_start(started: Iterable[Series], range_start_s: float) -> float | None:
    """The agent's first start inside the range, from ``tsprobe_agent_start_time_seconds``.

    :param started: the gauge's series (values are Unix seconds).
    :param range_start_s: the first instant the queries saw.
    :return: the earliest start time seen, or None when none is known or it lies before
        ``range_start_s`` (then what the counters held at the range's start is unknown).
    """
    values = [value for s in started for _, value in s.points]
    if not values or min(values) < range_start_s:
        return None
    return min(values)


def from_zero(series: Iterable[Series], born_s: float | None) -> list[Series]:
    """Give each counter series a point of 0 at the agent's start, before its first point.

    :param series: counter series of one agent.
    :param born_s: ``agent_start``'s answer; None leaves the series as they are.
    :return: the series, each starting from 0 at ``born_s`` when it began after it.
    """
    if born_s is None:
        return list(series)
    return [
        Series(s.labels, ((born_s, 0.0), *s.points)) if s.points and s.points[0][0] > born_s else s
        for s in series
    ]


def scrape_ends(scraped: Iterable[Series], took: Iterable[Series]) -> dict[float, float]:
    """When the scrape each step shows ended, by step time (Unix seconds).

    :param scraped: ``timestamp(tsprobe_info)``: per step, the start of the latest
        successful scrape at or before it.
    :param took: ``scrape_duration_seconds and up == 1``: per step, the duration of the
        latest scrape when it succeeded (then it is the one ``scraped`` names).
    :return: step -> scrape start + duration, for the steps whose scrape's duration is known.
    """
    starts = {t: start for s in scraped for t, start in s.points}
    durations: dict[float, float] = {}
    for s in took:
        for t, seconds in s.points:
            start = starts.get(t)
            if start is not None:
                durations[start] = seconds
    return {t: start + durations[start] for t, start in starts.items() if start in durations}


def at_scrape_end(series: Iterable[Series], ends: Mapping[float, float]) -> list[Series]:
    """Move each point whose scrape ended after its step to that end (``scrape_ends``).

    A point whose scrape's duration is unknown stays at its step, and that is already after
    its scrape ended: its duration is unknown only when a later scrape (a failed one) was
    the latest at that step, and Prometheus begins a target's scrape only after the one
    before it has ended.

    :param series: series of one agent, at the query's steps.
    :param ends: ``scrape_ends``' answer (empty: nothing moves).
    :return: the series, each point at ``max(step, end of its scrape)``.
    """
    if not ends:
        return list(series)
    return [
        Series(s.labels, tuple((max(t, ends.get(t, t)), v) for t, v in s.points)) for s in series
    ]


def _by(series: Iterable[Series], *keys: str) -> dict[tuple[str, ...], Series]:
    out: dict[tuple[str, ...], Series] = {}
    for s in series:
        key = tuple(s.labels.get(k, "") for k in keys)
        if key in out:  # the same key twice (a job label change): merge the points
            out[key] = Series(s.labels, tuple(sorted(out[key].points + s.points)))
        else:
            out[key] = s
    return out


def _ns(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1e9)


def build_tables(
    windows: Sequence[Window],
    results: Mapping[str, Mapping[str, Any]],
    *,
    instance: str,
    start_ns: int,
    end_ns: int,
    step_s: float,
    scrape_interval_s: float | None = None,
    phase_source: str = "none",
    notes: Sequence[str] = (),
) -> PromTables:
    """The per-phase tables from range-query answers (pure).

    :param windows: the phase windows (``windows_from_phases``).
    :param results: answers by name, each the JSON Prometheus returned for
        ``count``: ``tsprobe_cpu_stall_seconds_count``, ``sum``: ``..._sum``,
        ``bucket``: ``..._bucket``, ``longest``:
        ``max_over_time(tsprobe_cpu_stall_longest_seconds[STEP])``, ``timeouts``:
        ``tsprobe_timeout_expirations_total``, ``started``:
        ``tsprobe_agent_start_time_seconds``, ``scraped`` and ``took`` (``scrape_ends``;
        all for one instance). A missing name is an empty answer.
    :param instance: the agent's ``instance`` label.
    :param start_ns: start of the range (Unix ns); ``end_ns`` its end.
    :param step_s: the step the queries used.
    :param scrape_interval_s: the scrape interval seen, or None.
    :param phase_source: where the windows come from, for the report.
    :param notes: carried into the tables.
    :raise PrometheusError: for an answer that is an error or not a matrix.
    :return: the tables.
    """

    def parse(name: str) -> list[Series]:
        answer = results.get(name)
        return [] if answer is None else parse_matrix(answer, name)

    ends = scrape_ends(parse("scraped"), parse("took"))

    def matrix(name: str) -> list[Series]:
        return at_scrape_end(parse(name), ends)

    born = agent_start(parse("started"), start_ns / 1e9 - step_s)
    counts = _by(from_zero(matrix("count"), born), "cpu")
    sums = _by(from_zero(matrix("sum"), born), "cpu")
    longest = _by(matrix("longest"), "cpu")
    buckets = _by(from_zero(matrix("bucket"), born), "cpu", "le")
    expirations = _by(from_zero(matrix("timeouts"), born), "canary", "timeout")
    cpus = sorted({k[0] for k in [*counts, *buckets]}, key=lambda c: (len(c), c))
    stall_rows: list[StallRow] = []
    timeout_rows: list[TimeoutRow] = []
    for window in windows:
        a, b = window.start_ns / 1e9, window.end_ns / 1e9
        for cpu in cpus:
            stall_rows.append(_stall_row(window.index, cpu, a, b, counts, sums, longest, buckets))
        for (canary, timeout), s in sorted(
            expirations.items(), key=lambda i: (i[0][0], _le(i[0][1]))
        ):
            n = round(counter_increase(s.points, a, b))
            timeout_rows.append(TimeoutRow(window.index, canary, round(_le(timeout) * 1e9), n))
    return PromTables(
        instance=instance,
        start_ns=start_ns,
        end_ns=end_ns,
        step_s=step_s,
        scrape_interval_s=scrape_interval_s,
        phase_source=phase_source,
        windows=tuple(windows),
        stalls=tuple(stall_rows),
        timeouts=tuple(timeout_rows),
        notes=tuple(notes),
    )


def _stall_row(
    phase: int,
    cpu: str,
    a: float,
    b: float,
    counts: Mapping[tuple[str, ...], Series],
    sums: Mapping[tuple[str, ...], Series],
    longest: Mapping[tuple[str, ...], Series],
    buckets: Mapping[tuple[str, ...], Series],
) -> StallRow:
    count_series = counts.get((cpu,))
    count = round(counter_increase(count_series.points, a, b)) if count_series else 0
    sum_series = sums.get((cpu,))
    stalled = counter_increase(sum_series.points, a, b) if sum_series else 0.0
    hist = [
        (_le(le), counter_increase(s.points, a, b)) for (c, le), s in buckets.items() if c == cpu
    ]
    exact = None
    gauge = longest.get((cpu,))
    if gauge is not None and count > 0:
        before, peak = value_at(gauge.points, a), max_in(gauge.points, a, b)
        if peak is not None and peak > (before or 0.0):
            exact = peak
    p50 = bucket_quantile(0.5, hist) if count > 0 else None
    p99 = bucket_quantile(0.99, hist) if count > 0 else None
    if exact is not None:
        p50 = None if p50 is None else min(p50, exact)
        p99 = None if p99 is None else min(p99, exact)
    top = _top_bucket(hist) if count > 0 else None
    return StallRow(
        phase=phase,
        cpu=cpu,
        count=count,
        stalled_ns=round(stalled * 1e9),
        longest_ns=_ns(exact),
        longest_bucket=None if top is None else (top[0] * 1e9, top[1] * 1e9),
        p50_ns=_ns(p50),
        p99_ns=_ns(p99),
    )
