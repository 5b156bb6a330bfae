"""PromQL expressions of the dashboard and the rules, and the metric names they use.

``selectors(expr)`` is a small PromQL lexer: it finds every vector selector
(``name{label="v", ...}``) and returns its metric name and the label names its matchers
use. It knows the language's other identifiers: functions and aggregations (followed by
``(``), grouping clauses (``by``, ``without``, ``on``, ``ignoring``, ``group_left``,
``group_right`` and their label lists), ``offset``, ``bool``, the set operators, ``inf`` and
``nan``, range and subquery brackets, strings and numbers. That validity of the syntax
itself is promtool's job (``check_parse``); this only names what an expression reads.

Grafana expressions carry variables: ``grafana_to_promql`` turns ``$__rate_interval``,
``$__interval`` and ``$__range`` into a duration and every other ``$var`` / ``${var}`` into
a plain word (they are used inside label matcher strings), and ``label_values(q, label)``
into ``q``.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>0x[0-9a-fA-F]+|[0-9]*\.?[0-9][0-9a-zA-Z_.]*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@])
    """,
    re.VERBOSE,
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_WORDS = {"and", "or", "unless", "bool", "atan2", "inf", "nan", "offset"}
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}  # fmt: skip


@dataclass(frozen=True)
class Selector:
    """A vector selector: its metric name (None for ``{__name__=...}``) and label names."""

    name: str | None
    labels: frozenset[str]


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot lex {expr[pos:]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, match.group()))
        pos = match.end()
    return out


def _skip_to(tokens: list[tuple[str, str]], i: int, closing: str) -> int:
    """Index just past the token ``closing`` at or after ``i``."""
    while tokens[i][1] != closing:
        i += 1
    return i + 1


def selectors(expr: str) -> list[Selector]:
    """Every vector selector in a PromQL expression, in order.

    :param expr: plain PromQL (no Grafana variables).
    :return: one entry per selector.
    """
    tokens = [*_tokens(expr), ("end", "")]
    out: list[Selector] = []
    i = 0
    while tokens[i][0] != "end":
        kind, text = tokens[i]
        nxt = tokens[i + 1][1]
        if kind == "ident" and text in _GROUPING:
            i = _skip_to(tokens, i + 2, ")") if nxt == "(" else i + 1
        elif kind == "ident" and text.lower() in _WORDS:
            i += 2 if text == "offset" else 1
        elif kind == "ident" and (nxt == "(" or (text in _AGGREGATIONS and nxt in _GROUPING)):
            i += 1  # a function or an aggregation
        elif (kind == "ident" and nxt == "{") or text == "{":
            name = text if kind == "ident" else None
            start = i + 2 if kind == "ident" else i + 1
            end = _skip_to(tokens, start, "}")
            labels = {
                tokens[j][1]
                for j in range(start, end - 1)
                if tokens[j][0] == "ident" and tokens[j + 1][1] in ("=", "!=", "=~", "!~")
            }
            if name is None and "__name__" in labels:
                labels.discard("__name__")
            out.append(Selector(name, frozenset(labels)))
            i = end
        elif kind == "ident":
            out.append(Selector(text, frozenset()))
            i += 1
        elif text == "[":
            i = _skip_to(tokens, i, "]")
        else:
            i += 1
    return out


_GRAFANA_DURATIONS = re.compile(r"\$\{?__(rate_interval|interval|range)\}?")
_GRAFANA_VARS = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$", re.S)


def grafana_to_promql(expr: str) -> str:
    """Plain PromQL from a Grafana query (variables replaced, label_values unwrapped)."""
    match = _LABEL_VALUES.match(expr)
    if match:
        expr = match.group(1)
    expr = _GRAFANA_DURATIONS.sub("5m", expr)
    return _GRAFANA_VARS.sub("x", expr)


def dashboard_expressions(path: Path) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query of a Grafana dashboard: panels, variables, annotations."""
    dash: dict[str, Any] = json.loads(path.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dash.get("panels", [])):
        for target in panel.get("targets", []):
            if "expr" in target:
                yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            text = query["query"] if isinstance(query, dict) else query
            yield f"variable {var['name']}", text
    for note in dash.get("annotations", {}).get("list", []):
        if "expr" in note:
            yield f"annotation {note['name']!r}", note["expr"]


def check_parse(expressions: list[tuple[str, str]], tmp: Path) -> None:
    """Have promtool parse every expression (as recording rules of a throwaway file).

    The file is JSON, which is YAML too.

    :raise AssertionError: naming the expressions promtool rejects.
    """
    rules = [{"record": f"tsprobe_check_{n}", "expr": e} for n, (_, e) in enumerate(expressions)]
    path = tmp / "parse-check.yml"
    path.write_text(json.dumps({"groups": [{"name": "check", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise AssertionError(f"promtool rejects an expression:\n{result.stdout}{result.stderr}")


def exported_series(text: str) -> dict[str, set[str]]:
    """Series names in a /metrics exposition, each with the label names its samples carry.

    Families without a sample still name their series (``_total`` for counters,
    ``_bucket``/``_sum``/``_count`` for histograms).
    """
    out: dict[str, set[str]] = {}
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
    }
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            out.setdefault(family.name + suffix, set())
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out
