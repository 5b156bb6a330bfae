"""Reports from Prometheus: per-phase stall and timeout tables from range queries.

For fleets where only metrics were kept: ``fetch_tables(url, instance, start, end)`` asks
a Prometheus server for one agent's counters over ``[start, end]`` and returns the same
kind of per-phase x per-CPU tables the event-log report has, coarser
(``analysis.prom.tables`` says exactly how; ``PromTables.note`` is the sentence for the
report). The arithmetic is pure and lives in ``analysis.prom.tables`` and
``analysis.prom.phases``; this module only does the HTTP.

The queries (``SEL`` is ``{instance="INSTANCE"}``), all ``/api/v1/query_range``:

========================  ================================================================
``scrapes``               ``timestamp(tsprobe_info SEL)``: when the agent was scraped
``count``, ``sum``        ``tsprobe_cpu_stall_seconds_count SEL``, ``..._sum SEL``
``bucket``                ``tsprobe_cpu_stall_seconds_bucket SEL``
``longest``               ``max_over_time(tsprobe_cpu_stall_longest_seconds SEL[STEP])``
``timeouts``              ``tsprobe_timeout_expirations_total SEL``
``started``               ``tsprobe_agent_start_time_seconds SEL``: counters are 0 then
``scraped``               ``timestamp(tsprobe_info SEL)`` at the step: each step's scrape
``took``                  ``scrape_duration_seconds SEL and up SEL == 1``: its duration
                          (a late answer is placed at its scrape's end, see ``tables``)
phases (no run dir)       ``tsprobe_migration_status_started_timestamp_seconds``,
                          ``..._stop_timestamp_seconds``, ``..._resume_timestamp_seconds``
                          of the host exporter (``recorder`` picks its ``instance``)
========================  ================================================================

The step. Counters are read as "the latest scrape at or before each step", so any step
gives correct totals; a finer step only places increases more finely, down to the scrape
itself. The step is therefore the agent's scrape interval, measured from the data (the
distinct ``timestamp()`` values at a 1 s step), never below 1 s, and widened so a query
returns at most 10,000 points per series (Prometheus refuses more than 11,000). The
resolution of the tables is then one scrape interval; ``step_s`` overrides. The first
point is read one step before ``start`` so the first phase has a baseline.

Phases: from ``run`` (a run directory: its timeline), else from the host exporter's
series in Prometheus, else one window for the whole range. Prometheus' timestamps are its
own clock; the phases are the recording host's. On one host (the lab) they agree; across
hosts they are as close as NTP keeps them.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from analysis.analyze.timeline_model import Timeline
from analysis.errors import PrometheusError, RunDirError
from analysis.prom.phases import timeline_from_exporter, windows_from_phases
from analysis.prom.tables import PromTables, Series, build_tables, parse_matrix
from analysis.rundir import require_rundir
from probe.durations import parse_duration
from probe.errors import DurationError

#: At most this many points per series and query (Prometheus' own limit is 11,000).
MAX_POINTS = 10_000
#: The finest step used.
MIN_STEP_S = 1.0

_STALLS = "tsprobe_cpu_stall_seconds"


def parse_time(text: str, now_s: float | None = None) -> float:
    """A ``--from`` / ``--to`` value as Unix seconds.

    :param text: Unix seconds (``1795642800.5``), RFC 3339 (``2026-11-25T21:40:00Z``,
        ``...+01:00``; without a zone: UTC), ``now``, or ``now-15m`` (any duration
        ``parse_duration`` takes).
    :param now_s: "now" (default: the current time).
    :raise PrometheusError: when the text is none of these.
    :return: Unix seconds.
    """
    value = text.strip()
    now = datetime.now(UTC).timestamp() if now_s is None else now_s
    if value == "now":
        return now
    if value.startswith("now-"):
        try:
            return now - parse_duration(value[4:]) / 1e9
        except DurationError as err:
            raise PrometheusError(f"invalid time {text!r}: {err}") from err
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as err:
        raise PrometheusError(
            f"invalid time {text!r}: use Unix seconds, RFC 3339 (2026-11-25T21:40:00Z) "
            "or now-DURATION"
        ) from err
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def promql_string(value: str) -> str:
    """A PromQL double-quoted string literal holding ``value``."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def choose_step(start_s: float, end_s: float, wanted_s: float | None) -> float:
    """The step of the range queries: ``wanted_s``, at least 1 s and 1/10,000 of the range."""
    floor = max(MIN_STEP_S, math.ceil((end_s - start_s) / MAX_POINTS))
    return max(floor, wanted_s or 0.0)


def format_step(step_s: float) -> str:
    """A step as a PromQL duration (milliseconds): ``1500ms``."""
    return f"{max(1, round(step_s * 1000))}ms"


class PromClient:
    """A Prometheus HTTP API client (``/api/v1/query_range`` and label values).

    :param url: the server's base URL, e.g. ``http://127.0.0.1:9090`` (a path prefix such
        as ``/prometheus`` is kept).
    :param timeout_s: per request.
    :param opener: how to open requests (tests); default: urllib with the environment's
        proxy settings.
    :raise PrometheusError: for a URL that is not http(s).
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        opener: Callable[..., Any] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PrometheusError(f"invalid Prometheus URL {url!r}: expected http://HOST:PORT")
        self.url = url.rstrip("/")
        self._timeout_s = timeout_s
        self._open = opener or urllib.request.urlopen

    def get(self, path: str, params: list[tuple[str, str]]) -> dict[str, Any]:
        """GET ``/api/v1/PATH``; the decoded JSON of a success.

        :raise PrometheusError: when the server cannot be reached or answers with an error.
        """
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with self._open(url, timeout=self._timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                detail = json.loads(body).get("error", "")
            except ValueError:
                detail = body[:200].decode(errors="replace")
            raise PrometheusError(
                f"Prometheus at {self.url} answered {err.code}: {detail}"
            ) from err
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: {reason}") from err
        try:
            decoded: dict[str, Any] = json.loads(body)
        except ValueError as err:
            raise PrometheusError(f"Prometheus at {self.url} answered something not JSON") from err
        if decoded.get("status") != "success":
            raise PrometheusError(f"Prometheus at {self.url}: {decoded.get('error', decoded)}")
        return decoded

    def query_range(self, expr: str, start_s: float, end_s: float, step_s: float) -> dict[str, Any]:
        """One range query; the JSON as Prometheus returns it."""
        params = [("query", expr), ("start", f"{start_s:.3f}"), ("end", f"{end_s:.3f}")]
        return self.get("query_range", [*params, ("step", f"{step_s:g}")])

    def label_values(self, label: str, match: str, start_s: float, end_s: float) -> list[str]:
        """The values of ``label`` on series matching ``match`` in the range."""
        params = [("match[]", match), ("start", f"{start_s:.3f}"), ("end", f"{end_s:.3f}")]
        data = self.get(f"label/{urllib.parse.quote(label)}/values", params).get("data")
        return sorted(str(v) for v in data) if isinstance(data, list) else []


def scrape_interval(series: list[Series]) -> float | None:
    """The median gap between distinct ``timestamp()`` values, or None with fewer than 2."""
    times = sorted({v for s in series for _, v in s.points})
    gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
    return statistics.median(gaps) if gaps else None


def _exporter_instance(
    client: PromClient, instance: str, recorder: str | None, start: float, end: float
) -> str | None:
    """The host exporter's ``instance`` for this guest, or None when there is none."""
    if recorder is not None:
        return recorder
    metric = "tsprobe_migration_status_started_timestamp_seconds"
    found = client.label_values("instance", metric, start, end)
    if len(found) <= 1:
        return found[0] if found else None
    # Several recorders: the one whose --agent URL is this instance's address.
    matching = [
        r
        for r in found
        for url in client.label_values(
            "url", f"tsprobe_migration_agent_info{{instance={promql_string(r)}}}", start, end
        )
        if urllib.parse.urlsplit(url).netloc == instance
    ]
    if len(set(matching)) == 1:
        return matching[0]
    raise PrometheusError(
        f"several host exporters in the range ({', '.join(found)}): name the one that "
        "recorded this guest's migration (recorder=...)"
    )


def _phases(
    client: PromClient,
    instance: str,
    run: Path | None,
    recorder: str | None,
    window: tuple[float, float, float],
) -> tuple[Timeline | None, str]:
    start, end, step = window
    if run is not None:
        from analysis.analyze.timeline_io import load_timeline  # the run-directory reader

        try:
            timeline = load_timeline(require_rundir(run), lambda _skip: None, lambda _note: None)
        except RunDirError as err:
            raise PrometheusError(f"--run: {err}") from err
        return timeline, f"run directory {run}"
    exporter = _exporter_instance(client, instance, recorder, start, end)
    if exporter is None:
        return None, "none (no run directory, no host exporter data in the range)"
    sel = f"{{instance={promql_string(exporter)}}}"
    answers = [
        parse_matrix(client.query_range(f"tsprobe_migration_{name}{sel}", start, end, step))
        for name in (
            "status_started_timestamp_seconds",
            "stop_timestamp_seconds",
            "resume_timestamp_seconds",
        )
    ]
    return timeline_from_exporter(*answers), f"host exporter {exporter}"


def fetch_tables(
    url: str,
    instance: str,
    start_s: float,
    end_s: float,
    run: str | Path | None = None,
    *,
    recorder: str | None = None,
    step_s: float | None = None,
    client: PromClient | None = None,
) -> PromTables:
    """Query Prometheus and build the per-phase stall and timeout tables of one guest.

    :param url: Prometheus' base URL (``http://127.0.0.1:9090``).
    :param instance: the agent's ``instance`` label (``guest1:9466``).
    :param start_s: the range's start, Unix seconds (``parse_time``); ``end_s`` its end.
    :param run: a run directory whose timeline gives the phases.
    :param recorder: the host exporter's ``instance`` label, when several are in the range.
    :param step_s: the query step (default: the scrape interval; see the module docstring).
    :param client: a client to use instead of one for ``url``.
    :raise PrometheusError: unreachable server, refused query, no data for the instance,
        an empty range, or an unusable run directory.
    :return: the tables.
    """
    if not end_s > start_s:
        raise PrometheusError("the time range is empty: --from must be before --to")
    client = client or PromClient(url)
    sel = f"{{instance={promql_string(instance)}}}"
    step = choose_step(start_s, end_s, None)
    scrapes = parse_matrix(
        client.query_range(f"timestamp(tsprobe_info{sel})", start_s, end_s, step)
    )
    if not any(s.points for s in scrapes):
        known = client.label_values("instance", "tsprobe_info", start_s, end_s)
        raise PrometheusError(
            f"Prometheus at {client.url} has no tsprobe agent {instance!r} in the range"
            + (f" (agents there: {', '.join(known)})" if known else " (and no agent at all)")
        )
    interval = scrape_interval(scrapes)
    step = choose_step(start_s, end_s, step_s if step_s is not None else interval)
    start_q = start_s - step
    queries = {
        "count": f"{_STALLS}_count{sel}",
        "sum": f"{_STALLS}_sum{sel}",
        "bucket": f"{_STALLS}_bucket{sel}",
        "longest": f"max_over_time(tsprobe_cpu_stall_longest_seconds{sel}[{format_step(step)}])",
        "timeouts": f"tsprobe_timeout_expirations_total{sel}",
        "started": f"tsprobe_agent_start_time_seconds{sel}",
        "scraped": f"timestamp(tsprobe_info{sel})",
        "took": f"scrape_duration_seconds{sel} and up{sel} == 1",
    }
    results: Mapping[str, dict[str, Any]] = {
        name: client.query_range(expr, start_q, end_s, step) for name, expr in queries.items()
    }
    timeline, source = _phases(
        client, instance, Path(run) if run is not None else None, recorder, (start_q, end_s, step)
    )
    start_ns, end_ns = round(start_s * 1e9), round(end_s * 1e9)
    phases = timeline.phases if timeline is not None else ()
    notes = [w for r in results.values() for w in r.get("warnings", [])]
    if timeline is not None and not phases:
        notes.append(f"{source}: no migration phase in the range")
    return build_tables(
        windows_from_phases(phases, start_ns, end_ns),
        results,
        instance=instance,
        start_ns=start_ns,
        end_ns=end_ns,
        step_s=step,
        scrape_interval_s=interval,
        phase_source=source,
        notes=notes,
    )
