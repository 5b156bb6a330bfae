"""deploy/: the Prometheus rules and the Grafana dashboard against promtool and the live exporters.

Every PromQL expression of the dashboard (panels, variables, annotations) and of the rules
must parse (promtool, and a throwaway Prometheus that loads the rules) and may read only
series that a live agent's or a live ``tsprobe record --listen``'s /metrics really has (or
that the rules record, or Prometheus' own ``up``), with label matchers on labels those
series carry. So neither the dashboard nor the rules can drift from the exporters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from analysis.record.exporter import STATUS_CODES
from tests.liveagent import free_port, http_get, live_agent
from tests.liveprom import PROMETHEUS, PROMTOOL, live_prometheus
from tests.promql import (
    Selector,
    check_parse,
    dashboard_expressions,
    exported_series,
    grafana_to_promql,
    selectors,
)
from tests.qemu_helpers import QEMU, start_qemu

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "tsprobe-rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "tsprobe-rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "tsprobe-dashboard.json"
#: Series Prometheus makes itself for every target.
SYNTHETIC = {"up": {"instance", "job"}}
#: Labels every scraped series gets.
TARGET_LABELS = {"instance", "job"}
#: Recording rule names: level:metric:operations.
RULE_NAME = r"^[a-z_]+:[a-z_][a-z0-9_]*:[a-z0-9_]+$"

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian) missing")
needs_all = pytest.mark.skipif(
    PROMTOOL is None or PROMETHEUS is None or QEMU is None,
    reason="needs prometheus, promtool and qemu-system-x86_64",
)


# -- pure checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", [("up", set())]),
        (
            'sum by (instance, cpu) (rate(tsprobe_cpu_stall_seconds_count{instance=~"a|b"}[5m]))',
            [("tsprobe_cpu_stall_seconds_count", {"instance"})],
        ),
        (
            "histogram_quantile(0.99, sum without (job) (rate(x_bucket[1m] offset 5m)))"
            " > bool 1e3 and on (cpu) group_left (le) y",
            [("x_bucket", set()), ("y", set())],
        ),
        (
            "a:b:rate1m - ignoring(le) b{le='1.0', cpu!~\"0|1\"} / inf",
            [("a:b:rate1m", set()), ("b", {"le", "cpu"})],
        ),
        ('{__name__="z", job="j"}', [(None, {"job"})]),
        ("max_over_time(m[5m:30s]) @ start()", [("m", set())]),
    ],
)
def test_selectors_finds_every_metric_and_label(
    expr: str, expected: list[tuple[str | None, set[str]]]
) -> None:
    assert selectors(expr) == [Selector(n, frozenset(labels)) for n, labels in expected]


def test_grafana_variables_become_plain_promql() -> None:
    assert grafana_to_promql('rate(x{instance=~"$instance"}[$__rate_interval])') == (
        'rate(x{instance=~"x"}[5m])'
    )
    assert grafana_to_promql('label_values(x{cpu=~"${cpu}"}, cpu)') == 'x{cpu=~"x"}'
    assert grafana_to_promql("increase(x[$__range])") == "increase(x[5m])"


def test_dashboard_is_importable_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 39  # Grafana 9.x to 10.x
    assert dash["uid"] and dash["title"] and dash["id"] is None
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "cpu"):
        assert variables[name]["type"] == "query"
        assert variables[name]["query"]["query"].startswith("label_values(")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    text = DASHBOARD.read_text()
    used = set(m for m in re.findall(r"\$\{?(\w+)", text) if not m.startswith("__"))
    assert used <= set(variables), used - set(variables)
    for panel in dash["panels"]:
        assert panel["gridPos"]["x"] >= 0
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    titles = {p["title"] for p in dash["panels"]}
    for wanted in (
        "Stall rate per CPU",
        "Longest stall per CPU",
        "Stall lengths (histogram buckets)",
        "Guest clock offset",
        "Clock steps",
        "Timeout expirations per T and canary",
        "Kernel warnings",
        "Probe health",
        "Migration status per endpoint",
    ):
        assert wanted in titles
    heatmap = next(p for p in dash["panels"] if p["type"] == "heatmap")
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "_bucket" in heatmap["targets"][0]["expr"]


def test_dashboard_status_mapping_follows_the_exporter() -> None:
    """The state timeline's value mappings are the exporter's STATUS_CODES."""
    dash = json.loads(DASHBOARD.read_text())
    panel = next(p for p in dash["panels"] if p["title"] == "Migration status per endpoint")
    assert "tsprobe_migration_status_code" in panel["targets"][0]["expr"]
    options = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
    shown = {int(code): entry["text"] for code, entry in options.items()}
    expected = {code: ("precopy" if s == "active" else s) for s, code in STATUS_CODES.items()}
    assert shown == {**expected, -1: "unknown"}


@needs_promtool
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    unit = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    exprs = [(where, grafana_to_promql(e)) for where, e in dashboard_expressions(DASHBOARD)]
    assert len(exprs) > 20
    check_parse(exprs, tmp_path)
    with pytest.raises(AssertionError, match="promtool rejects"):
        check_parse([("broken", "sum(rate(x[5m])")], tmp_path)


# -- against the live exporters ---------------------------------------------------------


def _record_exporter(tmp: Path) -> Iterator[str]:
    """A bare QEMU recorded by ``tsprobe record --listen``: yields its /metrics text."""
    qemu = start_qemu(tmp, "src", None, incoming=False)
    port = free_port()
    cmd = [
        sys.executable, "-m", "tsprobe.cli", "record", "--qmp", f"src={qemu.qmp}",
        "--agent", "http://127.0.0.1:9", "--listen", f"127.0.0.1:{port}",
        "--out", str(tmp / "run"), "--duration", "60s",
    ]  # fmt: skip
    log = open(tmp / "record.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                if status == 200 and b"tsprobe_migration_status_code{" in body:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp / "record.log").read_text()
            assert time.monotonic() < deadline, "the exporter did not come up"
            time.sleep(0.1)
        yield body.decode()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(20)
        log.close()
        qemu.kill()


@pytest.fixture(scope="module")
def live_series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Every series name the live agent and the live host exporter export, with labels."""
    tmp = tmp_path_factory.mktemp("live")
    with live_agent(tmp, "--no-kmsg") as agent:
        time.sleep(1.5)  # samplers up: every per-CPU series has its samples
        status, _, body = agent.get("/metrics")
        assert status == 200
        agent_text = body.decode()
    exporter_text = next(_record_exporter(tmp))
    series = exported_series(agent_text)
    migration = exported_series(exporter_text)
    assert all(name.startswith("tsprobe_migration_") for name in migration)
    assert "tsprobe_cpu_stall_seconds_bucket" in series
    assert "tsprobe_migration_status" in migration
    return {**series, **migration, **SYNTHETIC}


def _check_selectors(
    where: str, expr: str, series: dict[str, set[str]], recorded: set[str]
) -> list[str]:
    problems = []
    for sel in selectors(expr):
        if sel.name is None:
            problems.append(f"{where}: a selector without a metric name: {expr}")
        elif sel.name in recorded:
            continue
        elif sel.name not in series:
            problems.append(f"{where}: {sel.name} is not exported ({expr})")
        else:
            known = series[sel.name] | TARGET_LABELS
            unknown = sel.labels - known
            if unknown and series[sel.name]:
                problems.append(f"{where}: {sel.name} has no label {sorted(unknown)}")
    return problems


@needs_all
def test_every_expression_parses_and_reads_only_exported_series(
    tmp_path: Path, live_series: dict[str, set[str]]
) -> None:
    with live_prometheus(tmp_path, rule_files=[RULES]) as prom:
        deadline = time.monotonic() + 20
        while True:
            status, body = prom.api("rules")
            groups = body["data"]["groups"] if status == 200 else []
            if groups:
                break
            assert time.monotonic() < deadline, "rules not loaded"
            time.sleep(0.2)
        rules = [r for g in groups for r in g["rules"]]
        recorded = {r["name"] for r in rules if r["type"] == "recording"}
        alerts = {r["name"] for r in rules if r["type"] == "alerting"}
        for wanted in (
            "TsprobeCpuStalled",
            "TsprobeClockStep",
            "TsprobeTimeoutsAbove1s",
            "TsprobeAgentDown",
            "TsprobeStallProbeDown",
            "TsprobeProbeLost",
        ):
            assert wanted in alerts
        for name in recorded:
            assert re.match(RULE_NAME, name), name
        problems: list[str] = []
        for rule in rules:
            problems += _check_selectors(
                f"rule {rule['name']}", rule["query"], live_series, recorded
            )
        for where, expr in dashboard_expressions(DASHBOARD):
            plain = grafana_to_promql(expr)
            status, body = prom.api("query", query=plain)
            if status != 200:
                problems.append(f"{where}: Prometheus says {status} {body.get('error')}: {plain}")
            problems += _check_selectors(where, plain, live_series, recorded)
    assert problems == [], "\n".join(problems)


@needs_all
def test_a_drifted_name_is_caught(live_series: dict[str, set[str]]) -> None:
    """The check itself: a renamed metric or a wrong label is reported."""
    bad = 'rate(tsprobe_cpu_stalls_total[5m]) + tsprobe_probe_up{name="stall"}'
    problems = _check_selectors("test", bad, live_series, set())
    assert any("tsprobe_cpu_stalls_total is not exported" in p for p in problems)
    assert any("has no label ['name']" in p for p in problems)
