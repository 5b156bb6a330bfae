"""The seeded run-directory fuzz corpus (tests/fuzz_rundir.py) in CI: seed 18, every
mutation through ``timeline`` and ``timeline --json``, the issue's key cases and a seeded
sample through ``report`` and ``compare`` too; 0 tracebacks, hangs and silently wrong.

The held-out seeds and the full corpus (every mutation through all four commands) run
with ``bench/fuzz_rundir``.
"""

from __future__ import annotations

import pytest

from tests import fuzz_rundir

#: Mutations (of every kind) run through the two timelines; the key cases and a seeded
#: sample of the rest also through report and compare (each writes plots: ~1 s).
HEAVY = 100


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fuzz_corpus_has_no_traceback_hang_or_silently_wrong() -> None:
    outcomes = fuzz_rundir.run_parallel(fuzz_rundir.SEED, None, 30.0, 2, HEAVY)
    counts = fuzz_rundir.table(outcomes)
    assert sum(by["ok"] + by["clear error"] for by in counts.values()) == len(outcomes)
    assert len({o.mutation for o in outcomes}) >= 117
    bad = [
        (o.mutation, o.command, o.cls, o.detail)
        for o in outcomes
        if o.cls not in ("ok", "clear error")
    ]
    assert not bad, bad
