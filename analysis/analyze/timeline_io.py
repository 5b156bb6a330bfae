"""The I/O half of the timeline: a run directory's QMP records in, its ``Timeline`` out.

``read_timeline`` reads every ``qmp-NAME.jsonl`` through ``analysis.rundir.read_qmp`` (the
one reader: duplicates and bad stamps skipped by file and line) and hands the records to
the pure ``build_timeline``; the builder's own skips and notes, which name an endpoint and
a record's index, come back here as ``Issue`` objects naming the file and line of that
record. ``tsprobe timeline``, the loader behind report and compare, and the Prometheus
report all read the QMP files this way, so they agree on every line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from analysis.analyze.timeline import build_timeline
from analysis.analyze.timeline_model import Timeline
from analysis.rundir import read_qmp
from analysis.rundir.jsonl import Issue


def read_timeline(
    run: Path, on_issue: Callable[[Issue], None]
) -> tuple[dict[str, list[dict[str, Any]]], Timeline | None]:
    """Read every ``qmp-NAME.jsonl`` of a run and build the timeline from the records.

    :param run: the run directory.
    :param on_issue: called with each line skipped or noted, by file and line.
    :return: the records per endpoint and the timeline (None without QMP files).
    """
    qmp = read_qmp(run, on_issue)
    if not qmp.records:
        return qmp.records, None
    timeline = build_timeline(qmp.records)
    for it in timeline.issues:
        file, line = qmp.locate(it.endpoint, it.index)
        on_issue(Issue(file, line, it.message, it.severity))
    return qmp.records, timeline


def load_timeline(
    run: Path, on_skip: Callable[[Issue], None], on_note: Callable[[Issue], None]
) -> Timeline:
    """A run directory's timeline (``read_timeline``), its issues sorted by severity.

    :param run: a directory that ``analysis.rundir.require_rundir`` accepted.
    :param on_skip: called for each line or record passed over, with its file and line.
    :param on_note: called for records kept but worth pointing at (an unknown status).
    :return: the timeline (without QMP files, one without phases).
    """

    def issue(it: Issue) -> None:
        (on_skip if it.severity == "skip" else on_note)(it)

    _, timeline = read_timeline(run, issue)
    return timeline if timeline is not None else build_timeline({})
