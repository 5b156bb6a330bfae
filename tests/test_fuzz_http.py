"""The agent's HTTP server under the seeded fuzz corpus (tests/fuzz_http.py): odd methods,
malformed and huge queries, long lines, many headers, odd versions, pipelining and resets
on /metrics, /events, /clock and /healthz: no 500, no traceback on stderr, no hang."""

from __future__ import annotations

from pathlib import Path

from tests.fuzz_http import SEED, corpus, file_lines, fixed_cases, run_all, table
from tests.liveagent import live_agent

QUIET = ("--no-stall", "--no-clock", "--no-kmsg", "--canaries", "none")


def test_seeded_http_corpus_has_no_500_traceback_or_hang(tmp_path: Path) -> None:
    with live_agent(tmp_path, *QUIET) as agent:
        port = int(agent.url.rsplit(":", 1)[1])
        lines = file_lines(tmp_path / "agent.stderr")
        outcomes = run_all(port, corpus(SEED, 300), lines)
        stderr = lines()
    bad = [(o.case.name, o.klass, o.statuses) for o in outcomes if o.klass in ("traceback", "hang")]
    assert not bad, (bad, table(outcomes))
    assert not [line for line in stderr if "Traceback" in line]
    by_name = {o.case.name: o for o in outcomes}
    for case in fixed_cases():
        assert case.name in by_name
    assert by_name["since_superscript_two"].statuses == (400,)
    assert by_name["since_5000_digits"].statuses == (400,)
    assert by_name["pipelined_100"].statuses == (200,) * 100
    assert by_name["request_line_70000"].statuses == (414,)
    assert by_name["header_70000"].statuses == (431,)
