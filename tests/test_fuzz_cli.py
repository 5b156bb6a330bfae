"""Odd command lines (tests/fuzz_cli.py): one clear line and a non-zero exit, never a
traceback, never a hang. Issue 18's cases are each a named test; the seeded corpus runs as
one test that lists every traceback and hang it finds."""

from __future__ import annotations

import pytest

from tests.fuzz_cli import ISSUE_CASES, SEED, corpus, issue_case, run_all, run_case, table

#: The words each issue case's error must hold: the option it names (or the path's reason).
EXPECTED = {
    "record_duration_400_digits": "--duration",
    "record_poll_400_digits": "--poll",
    "record_qmp_timeout_400_digits": "--qmp-timeout",
    "record_vcpu_poll_400_digits": "--vcpu-poll",
    "record_grace_400_digits": "--grace",
    "record_agent_unclosed_ipv6": "--agent",
    "record_agent_unicode_port": "--agent",
    "record_listen_unicode_port": "--listen",
    "record_qmp_unicode_port": "--qmp",
    "record_out_empty": "--out",
    "agent_duration_400_digits": "--duration",
    "agent_interval_400_digits": "--interval",
    "agent_timeouts_400_digits": "--timeouts",
    "agent_listen_unicode_port": "--listen",
    "agent_events_ring_10e30": "--events-ring",
    "agent_cpus_huge_range": "--cpus",
    "agent_watch_log_deep_regex": "--watch-log",
    "agent_events_in_missing_dir": "--events",
    "timeline_long_path": "File name too long",
    "report_long_path": "File name too long",
    "report_out_empty": "--out",
    "compare_out_empty": "--out",
    "lab_run_hold_400_digits": "--hold",
    "lab_run_mem_400_digits": "--mem",
    "lab_study_repeat_10e30": "--repeat",
}


def test_every_issue_case_has_an_expectation() -> None:
    assert set(EXPECTED) == set(ISSUE_CASES)


@pytest.mark.parametrize("name", sorted(ISSUE_CASES))
def test_issue_case_is_one_clear_line(name: str) -> None:
    outcome = run_case(issue_case(name), time_limit_s=15)
    assert outcome.klass == "clear error", outcome
    assert outcome.returncode in (1, 2)
    assert EXPECTED[name] in outcome.last_line, outcome.last_line
    assert outcome.seconds < 10  # --cpus 0-999999999 is refused before it is expanded
    if name != "report_long_path":  # report's reading path prints the whole path today
        assert len(outcome.last_line) < 300


def test_seeded_corpus_has_no_traceback_and_no_hang() -> None:
    """The seeded corpus (SEED) over every command: counts by class, 0 tracebacks, 0 hangs
    (bench/fuzz_cli runs it, and held-out seeds, as JSON)."""
    cases = [case for case in corpus(SEED, 150) if case.name not in ISSUE_CASES]
    outcomes = run_all(cases, workers=4)
    bad = [
        (o.case.name, o.klass, o.last_line) for o in outcomes if o.klass in ("traceback", "hang")
    ]
    assert not bad, (bad, table(outcomes))
    assert sum(1 for o in outcomes if o.klass == "ok") >= 20  # the base lines still work
