"""Reports from Prometheus: the pure tables on literal query answers, and the HTTP client."""

from __future__ import annotations

import io
import json
import math
import urllib.error
import urllib.parse
from collections.abc import Sequence
from typing import Any

import pytest

from analysis.analyze.timeline_model import Boundary, Phase
from analysis.errors import PrometheusError
from analysis.prom.phases import windows_from_phases
from analysis.prom.render import render_markdown, table_rows
from analysis.prom.source import (
    PromClient,
    choose_step,
    fetch_tables,
    parse_time,
    promql_string,
    scrape_interval,
)
from analysis.prom.tables import (
    BEFORE_PHASE,
    WHOLE_RANGE,
    Series,
    Window,
    bucket_quantile,
    build_tables,
    counter_increase,
    parse_matrix,
    scrape_ends,
)
from tests.liveagent import free_port

T0 = 1_795_640_000.0
LE = ["0.001", "0.002", "0.005", "0.01", "0.2", "0.5", "1.0", "+Inf"]


def matrix(*series: tuple[dict[str, str], list[tuple[float, float]]]) -> dict[str, Any]:
    """A query_range answer exactly as Prometheus writes it (values as strings)."""
    return {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [
                {"metric": labels, "values": [[t, repr(float(v))] for t, v in points]}
                for labels, points in series
            ],
        },
    }


def steps(
    values: Sequence[float], start: float = T0, step: float = 1.0
) -> list[tuple[float, float]]:
    return [(start + i * step, v) for i, v in enumerate(values)]


# -- arithmetic -------------------------------------------------------------------------------


def test_parse_matrix_and_its_errors() -> None:
    answer = matrix(({"cpu": "0"}, [(T0 + 1, 2), (T0, 1)]))
    answer["data"]["result"][0]["values"].append([T0 + 2, "NaN"])
    [series] = parse_matrix(answer)
    assert series.labels == {"cpu": "0"} and series.points == ((T0, 1.0), (T0 + 1, 2.0))
    with pytest.raises(PrometheusError, match="refused q: bad_data"):
        parse_matrix({"status": "error", "error": "bad_data"}, "q")
    with pytest.raises(PrometheusError, match="other than a matrix"):
        parse_matrix({"status": "success", "data": {"resultType": "vector", "result": []}})


def test_counter_increase_counts_resets_and_needs_a_baseline() -> None:
    points = steps([0, 0, 3, 5, 1, 2])  # reset between 5 and 1 (the agent restarted)
    assert counter_increase(points, T0, T0 + 5) == 3 + 2 + 1 + 1
    assert counter_increase(points, T0 + 1.5, T0 + 3) == 5  # from the point at T0+1
    assert counter_increase(points, T0 + 3, T0 + 4) == 1
    assert counter_increase(points, T0 - 10, T0 + 2) == 3  # no point before: first is baseline
    assert counter_increase(points, T0 + 9, T0 + 10) == 0


def test_bucket_quantile_matches_promql() -> None:
    # The same buckets as the p99 case in deploy/prometheus/tsprobe-rules.test.yml, where
    # promtool's histogram_quantile gives 0.35.
    buckets = [(0.005, 98.0), (0.2, 98.0), (0.5, 100.0), (math.inf, 100.0)]
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.35)
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.005 * 50 / 98)
    assert bucket_quantile(0.99, [(1.0, 1.0), (math.inf, 5.0)]) == 1.0  # in +Inf
    assert bucket_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
    assert bucket_quantile(0.5, [(1.0, 3.0)]) is None  # no +Inf bucket


def test_scrape_interval_from_timestamps() -> None:
    stamps = Series({}, tuple((T0 + i, T0 + 15 * (i // 15)) for i in range(60)))
    assert scrape_interval([stamps]) == 15
    assert scrape_interval([Series({}, ((T0, T0),))]) is None


# -- windows ---------------------------------------------------------------------------------


def phase(name: str, start: float, end: float | None, stopped: bool = False) -> Phase:
    by = Boundary("MIGRATION", ("src",), "qemu")
    return Phase(
        name,
        round(start * 1e9),
        None if end is None else round(end * 1e9),
        by,
        None if end is None else by,
        name,
        stopped,
    )


def ns(t: float) -> int:
    return round(t * 1e9)


def test_windows_cut_phases_to_the_range() -> None:
    phases = [
        phase("setup", T0 + 10, T0 + 11),
        phase("precopy", T0 + 11, T0 + 20),
        phase("stop-and-copy", T0 + 20, T0 + 20.05, stopped=True),
        phase("completed", T0 + 20.05, None),
    ]
    windows = windows_from_phases(phases, ns(T0), ns(T0 + 60))
    names = [BEFORE_PHASE, "setup", "precopy", "stop-and-copy", "completed"]
    assert [w.name for w in windows] == names
    assert [w.index for w in windows] == list(range(5))
    assert windows[0].end_ns == ns(T0 + 10) and windows[-1].end_ns == ns(T0 + 60)
    assert windows[3].vm_stopped
    cut = windows_from_phases(phases, ns(T0 + 15), ns(T0 + 30))
    assert [(w.name, w.start_ns) for w in cut][:2] == [
        ("precopy", ns(T0 + 15)),
        ("stop-and-copy", ns(T0 + 20)),
    ]
    closed = windows_from_phases(phases[:2], ns(T0), ns(T0 + 60))
    assert closed[-1].name == "after the last phase" and closed[-1].start_ns == ns(T0 + 20)
    assert [w.name for w in windows_from_phases([], ns(T0), ns(T0 + 1))] == [WHOLE_RANGE]


# -- the tables ------------------------------------------------------------------------------


def hist(
    cpu: str, cumulative: Sequence[Sequence[float]]
) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
    """Bucket series of one CPU; ``cumulative[i]`` is every bucket's value at step i."""
    return [
        ({"cpu": cpu, "le": le, "instance": "g1:9466"}, steps([row[j] for row in cumulative]))
        for j, le in enumerate(LE)
    ]


def agent_answers() -> dict[str, dict[str, Any]]:
    """Ten 1 s steps of a 2-CPU agent: CPU 0 has 4 ms stalls throughout; CPU 1 one 400 ms
    stall, scraped at step 5 (a new agent-wide record); timer T=1.0 expires twice at 8."""
    cpu0_counts = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    cpu0_b = [[0, 0, c, c, c, c, c, c] for c in cpu0_counts]
    cpu1_counts = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    cpu1_b = [[0, 0, 0, 0, 0, c, c, c] for c in cpu1_counts]
    return {
        "count": matrix(
            ({"cpu": "0"}, steps(cpu0_counts)),
            ({"cpu": "1"}, steps(cpu1_counts)),
        ),
        "sum": matrix(
            ({"cpu": "0"}, steps([c * 0.004 for c in cpu0_counts])),
            ({"cpu": "1"}, steps([c * 0.4 for c in cpu1_counts])),
        ),
        "bucket": matrix(*hist("0", cpu0_b), *hist("1", cpu1_b)),
        "longest": matrix(
            ({"cpu": "0"}, steps([0.0] + [0.004] * 9)),
            ({"cpu": "1"}, steps([0.0] * 5 + [0.4] * 5)),
        ),
        "timeouts": matrix(
            ({"canary": "timer", "timeout": "0.1"}, steps([0] * 8 + [3, 3])),
            ({"canary": "timer", "timeout": "1.0"}, steps([0] * 8 + [2, 2])),
            ({"canary": "heartbeat", "timeout": "1.0"}, steps([0] * 10)),
        ),
    }


WINDOWS = [
    Window(0, BEFORE_PHASE, ns(T0), ns(T0 + 3.5)),
    Window(1, "precopy", ns(T0 + 3.5), ns(T0 + 6.5)),
    Window(2, "completed", ns(T0 + 6.5), ns(T0 + 9)),
]


def test_tables_from_literal_answers() -> None:
    tables = build_tables(
        WINDOWS,
        agent_answers(),
        instance="g1:9466",
        start_ns=ns(T0),
        end_ns=ns(T0 + 9),
        step_s=1.0,
        scrape_interval_s=1.0,
        phase_source="run directory r1",
    )
    rows = {(r.phase, r.cpu): r for r in tables.stalls}
    assert tables.cpus == ["0", "1"] and len(rows) == 6
    # CPU 0: stalls scraped at steps 1..3, 4..6, 7..9 (baselines at the step before).
    assert [rows[(p, "0")].count for p in range(3)] == [3, 3, 3]
    assert rows[(1, "0")].stalled_ns == 12_000_000
    assert rows[(0, "0")].longest_ns == 4_000_000  # the record was set in this window
    assert rows[(1, "0")].longest_ns is None  # no new record: only its bucket is known
    assert rows[(1, "0")].longest_bucket == (2e6, 5e6)
    assert rows[(1, "0")].p50_ns == pytest.approx(3_500_000, abs=1)  # 2 ms + 3 ms x 1/2
    # CPU 1: the 400 ms stall, scraped at step 5, is in precopy; exact longest, p99 clamped.
    one = rows[(1, "1")]
    assert (one.count, one.stalled_ns, one.longest_ns) == (1, 400_000_000, 400_000_000)
    assert one.longest_bucket == (2e8, 5e8)
    assert one.p99_ns == 400_000_000  # interpolation says 497 ms; the longest is 400
    assert rows[(0, "1")].count == 0 and rows[(0, "1")].p99_ns is None
    assert rows[(2, "1")].count == 0
    # Timeouts per phase x canary x T.
    assert tables.ladder_ns == [100_000_000, 1_000_000_000]
    assert tables.by_ladder()[2] == {"heartbeat": [0, 0], "timer": [3, 2]}
    assert tables.by_ladder()[1] == {"heartbeat": [0, 0], "timer": [0, 0]}
    doc = json.loads(json.dumps(tables.to_dict()))
    assert doc["source"] == "prometheus" and "coarser" in doc["note"]
    assert doc["stalls"][0]["longest_bucket_s"] == [0.002, 0.005]
    markdown = render_markdown(tables)
    assert "scrape interval 1s" in markdown and "| precopy | 1 | 1 | 400.0 | 400.0 |" in markdown
    titles = [title for title, _, _ in table_rows(tables)]
    assert titles[0] == "Phases (from run directory r1)"
    stall_rows = table_rows(tables)[1][2]
    assert stall_rows[2] == ["precopy", "0", 3, 12.0, "(2, 5]", 3.5, 4.97]


def test_counters_start_from_zero_at_an_agent_start_inside_the_range() -> None:
    """A slow guest's first successful scrape came at T0+7, after two 1 s expirations."""
    late = {
        "timeouts": matrix(({"canary": "timer", "timeout": "1.0"}, steps([2, 2, 3], T0 + 7))),
        "count": matrix(({"cpu": "0"}, steps([1, 1, 1], T0 + 7))),
    }

    def counted(started_at: float | None) -> tuple[list[int], list[int]]:
        answers = dict(late)
        if started_at is not None:
            answers["started"] = matrix(({}, steps([started_at] * 3, T0 + 7)))
        tables = build_tables(
            WINDOWS, answers, instance="g", start_ns=ns(T0), end_ns=ns(T0 + 9), step_s=1.0
        )
        return [r.count for r in tables.timeouts], [r.count for r in tables.stalls]

    # Started at T0+1 (inside the range): every counter was 0 then, so the first points
    # are increases, in the window of the scrape that showed them.
    assert counted(T0 + 1) == ([0, 0, 3], [0, 0, 1])
    # Started before the range, or not known: the first point is only a baseline.
    assert counted(T0 - 30) == ([0, 0, 1], [0, 0, 0])
    assert counted(None) == ([0, 0, 1], [0, 0, 0])


def test_a_late_answer_counts_where_its_scrape_ended() -> None:
    """Known case (a lab run, read from its Prometheus): a scrape began 2.2 s into a pause,
    took 3.30 s and carried a timeout counted after the pause. Here, with ``WINDOWS`` (the
    middle one the pause, T0+3.5 to T0+6.5): a scrape each second at T0+k+0.2 taking 1 ms,
    except the one begun at T0+4.2 that took 3.3 s (ended T0+7.5) and shows the counter
    going from 0 to 1; those begun at T0+5.2 to T0+7.2 failed (no duration), so the steps
    T0+5 to T0+8 all show the one begun at T0+4.2."""
    begun = [T0 - 0.8, T0 + 0.2, T0 + 1.2, T0 + 2.2, T0 + 3.2, *[T0 + 4.2] * 4, T0 + 8.2]
    took = [(T0 + k, 0.001) for k in range(5)] + [(T0 + 5, 3.3), (T0 + 9, 0.001)]
    counter = matrix(({"canary": "timer", "timeout": "1.0"}, steps([0] * 5 + [1] * 5)))
    scraped = matrix(({}, steps(begun)))
    answers = {"timeouts": counter, "scraped": scraped, "took": matrix(({}, took))}

    def per_window(results: dict[str, Any]) -> list[int]:
        tables = build_tables(
            WINDOWS, results, instance="g", start_ns=ns(T0), end_ns=ns(T0 + 9), step_s=1.0
        )
        return [r.count for r in tables.timeouts]

    # Placed at its scrape's end (T0+7.5), after the pause; at its step (T0+5), as
    # Prometheus stamps it, it would be inside the pause.
    assert per_window(answers) == [0, 0, 1]
    assert per_window({"timeouts": counter}) == [0, 1, 0]
    ends = scrape_ends(parse_matrix(scraped), parse_matrix(answers["took"]))
    assert ends[T0 + 1] == pytest.approx(T0 + 0.201) and ends[T0 + 8] == pytest.approx(T0 + 7.5)
    # Quick scrapes move nothing: a point stays at its step when its scrape ended before it.
    quick = {**answers, "took": matrix(({}, [(T0 + k, 0.001) for k in range(10)]))}
    assert per_window(quick) == [0, 1, 0]


def test_tables_without_any_data() -> None:
    window = Window(0, WHOLE_RANGE, ns(T0), ns(T0 + 9))
    tables = build_tables([window], {}, instance="g", start_ns=0, end_ns=1, step_s=1.0)
    assert tables.stalls == () and tables.timeouts == () and "unknown" in tables.note


# -- times, steps, the client ------------------------------------------------------------


def test_parse_time_forms() -> None:
    assert parse_time("1795642800.5") == 1795642800.5
    assert parse_time("2026-11-25T21:40:00Z") == parse_time("2026-11-25T22:40:00+01:00")
    assert parse_time("2026-11-25T21:40:00") == parse_time("2026-11-25T21:40:00Z")
    assert parse_time("now", now_s=1000.0) == 1000.0
    assert parse_time("now-15m", now_s=1000.0) == 100.0
    for bad in ("yesterday", "now-15x", ""):
        with pytest.raises(PrometheusError, match="invalid time"):
            parse_time(bad)


def test_choose_step_and_strings() -> None:
    assert choose_step(0, 600, None) == 1.0
    assert choose_step(0, 600, 15.0) == 15.0
    assert choose_step(0, 86_400, 1.0) == 9.0  # at most 10,000 points
    assert promql_string('a"b\\c') == '"a\\"b\\\\c"'


class FakeProm:
    """Answers query_range and label values from canned data; records the queries."""

    def __init__(self, answers: dict[str, dict[str, Any]], instances: list[str]) -> None:
        self.answers = answers
        self.instances = instances
        self.queries: list[dict[str, list[str]]] = []

    def __call__(self, url: str, timeout: float) -> io.BytesIO:
        parts = urllib.parse.urlsplit(url)
        params = urllib.parse.parse_qs(parts.query)
        self.queries.append({"path": [parts.path], **params})
        if parts.path.endswith("/values"):
            return io.BytesIO(json.dumps({"status": "success", "data": self.instances}).encode())
        expr = params["query"][0]
        for key, answer in self.answers.items():
            if expr.startswith(key):
                return io.BytesIO(json.dumps(answer).encode())
        return io.BytesIO(json.dumps(matrix()).encode())


def exporter_answers() -> dict[str, dict[str, Any]]:
    started = "tsprobe_migration_status_started_timestamp_seconds"
    return {
        started: matrix(
            ({"endpoint": "src", "status": "setup"}, steps([T0 + 3.2] * 10)),
            ({"endpoint": "src", "status": "active"}, steps([0] * 3 + [T0 + 3.5] * 7)),
            ({"endpoint": "src", "status": "completed"}, steps([0] * 6 + [T0 + 6.5] * 4)),
            ({"endpoint": "src", "status": "none"}, steps([T0 - 100] * 10)),
        ),
        "tsprobe_migration_stop_timestamp_seconds": matrix(
            ({"endpoint": "src"}, steps([0] * 6 + [T0 + 6.4] * 4))
        ),
        "tsprobe_migration_resume_timestamp_seconds": matrix(
            ({"endpoint": "dst"}, steps([0] * 6 + [T0 + 6.45] * 4))
        ),
    }


def test_fetch_tables_with_phases_from_the_exporter() -> None:
    answers = {
        "timestamp(tsprobe_info": matrix(({}, steps([T0 + i for i in range(10)]))),
        "tsprobe_cpu_stall_seconds_count": agent_answers()["count"],
        "tsprobe_cpu_stall_seconds_bucket": agent_answers()["bucket"],
        "tsprobe_cpu_stall_seconds_sum": agent_answers()["sum"],
        "max_over_time(tsprobe_cpu_stall_longest": agent_answers()["longest"],
        "tsprobe_timeout_expirations_total": agent_answers()["timeouts"],
        **exporter_answers(),
    }
    fake = FakeProm(answers, ["host1:9467"])
    client = PromClient("http://127.0.0.1:9090/prom/", opener=fake)
    tables = fetch_tables("", "g1:9466", T0, T0 + 9, client=client)
    assert tables.phase_source == "host exporter host1:9467"
    names = [BEFORE_PHASE, "setup", "precopy", "stop-and-copy", "completed"]
    assert [w.name for w in tables.windows] == names
    assert tables.step_s == 1.0 and tables.scrape_interval_s == 1.0
    by = {(tables.windows[r.phase].name, r.cpu): r.count for r in tables.stalls}
    assert by[("precopy", "1")] == 1 and by[("stop-and-copy", "1")] == 0
    exprs = [q["query"][0] for q in fake.queries if "query" in q]
    assert 'tsprobe_cpu_stall_seconds_count{instance="g1:9466"}' in exprs
    assert 'max_over_time(tsprobe_cpu_stall_longest_seconds{instance="g1:9466"}[1000ms])' in exprs
    assert all(q["path"][0].startswith("/prom/api/v1/") for q in fake.queries)
    assert float(fake.queries[1]["start"][0]) == T0 - 1  # one step before for the baseline


def test_fetch_tables_errors() -> None:
    fake = FakeProm({}, ["other:9466"])
    with pytest.raises(PrometheusError, match=r"no tsprobe agent 'g1:9466'.*other:9466"):
        fetch_tables("", "g1:9466", T0, T0 + 9, client=PromClient("http://p:9090", opener=fake))
    with pytest.raises(PrometheusError, match="empty"):
        fetch_tables("http://p:9090", "g1", T0, T0)
    with pytest.raises(PrometheusError, match="invalid Prometheus URL"):
        PromClient("127.0.0.1:9090")
    with pytest.raises(PrometheusError, match="cannot reach Prometheus"):
        PromClient(f"http://127.0.0.1:{free_port()}", timeout_s=2).query_range("up", 0, 1, 1)

    def refuse(url: str, timeout: float) -> Any:
        body = io.BytesIO(b'{"status":"error","errorType":"bad_data","error":"parse error"}')
        raise urllib.error.HTTPError(url, 400, "Bad Request", {}, body)  # type: ignore[arg-type]

    with pytest.raises(PrometheusError, match="answered 400: parse error"):
        PromClient("http://p:9090", opener=refuse).query_range("sum(", 0, 1, 1)
    several = FakeProm(
        {"timestamp(tsprobe_info": matrix(({}, steps([T0, T0 + 1])))}, ["h1:9467", "h2:9467"]
    )
    with pytest.raises(PrometheusError, match="several host exporters"):
        fetch_tables("", "g1:9466", T0, T0 + 9, client=PromClient("http://p", opener=several))
