"""Runs of stall lines taken in bulk give exactly what they give line by line.

``analysis.rundir.guest_reader`` takes consecutive stall lines in the agent's layout at once
when each would get a plain verdict one by one; otherwise it takes them one by one. Every
generated events file (stall runs with seqs that follow on, jump, repeat and go back, CPUs
the agent did not announce, a second boot, timeouts and agent starts between them, a
broken line) is read both ways: the columns, the segments and the issues must be equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.rundir.guest_reader import _GuestReader, _stall_table
from analysis.rundir.jsonl import Issue

BOOTS = ("b-one", "b-two")


def _stall(seq: int, boot: str, mono: int, dur: int, cpu: int) -> str:
    return (
        f'{{"v":1,"seq":{seq},"boot_id":"{boot}","kind":"stall","mono_ns":{mono},'
        f'"real_ns":{mono},"duration_ns":{dur},"cpu":{cpu},"cause":"vcpu-blocked",'
        f'"run_delay_ns":0,"steal_ns":null,"mode":"tick"}}'
    )


def _other(kind: str, seq: int, boot: str, mono: int) -> str:
    event: dict[str, Any] = {"v": 1, "seq": seq, "boot_id": boot, "kind": kind, "mono_ns": mono}
    event["real_ns"] = mono
    if kind == "agent_start":
        event.update(agent_id=f"a{seq}", cpus=[0, 1], config={})
    if kind == "timeout":
        event.update(canary="timer", timeout_ns=10_000_000, cpu=0, duration_ns=1)
    return json.dumps(event)


step = st.tuples(
    st.sampled_from(["stall"] * 6 + ["timeout", "agent_start", "broken", "boot"]),
    st.integers(-2, 3),  # the seq step: back, repeat, next, jump
    st.integers(0, 3),  # the CPU (2 and 3 are not announced)
    st.integers(0, 5_000_000),  # the time step
)


def _file(steps: list[tuple[str, int, int, int]]) -> str:
    lines = [_other("agent_start", 1, BOOTS[0], 1_000)]
    seq, mono, boot = 1, 1_000, BOOTS[0]
    for kind, dseq, cpu, dt in steps:
        seq, mono = max(0, seq + dseq), mono + dt
        if kind == "boot":
            boot = BOOTS[1] if boot == BOOTS[0] else BOOTS[0]
        elif kind == "broken":
            lines.append('{"v":1,"seq":')
        elif kind == "stall":
            lines.append(_stall(seq, boot, mono, 2_000_000 + dt, cpu))
        else:
            lines.append(_other(kind, seq, boot, mono))
    return "\n".join(lines) + "\n"


def _read(path: Path, bulk: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    with monkeypatch.context() as m:
        if not bulk:
            m.setattr(_GuestReader, "stalls_in_bulk", lambda self, seg, run: False)
        issues: list[Issue] = []
        reader = _GuestReader(issues.append)
        reader.read_file("guest", path)
    table = _stall_table(reader)
    segments = [
        (s.boot_id, s.first_mono_ns, s.last_mono_ns, sorted(s.cpus)) for s in reader.segments
    ]
    columns = {k: getattr(table, k).tolist() for k in ("lane", "mono", "dur", "cause", "seg")}
    lanes = sorted(reader.lane_keys)
    return columns, table.line.tolist(), segments, lanes, issues, reader.to_line


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(step, max_size=60))
def test_bulk_and_line_by_line_agree(
    steps: list[tuple[str, int, int, int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "guest-events.jsonl"
    path.write_text(_file(steps))
    assert _read(path, True, monkeypatch) == _read(path, False, monkeypatch)


def test_a_long_plain_run_is_taken_in_bulk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "guest-events.jsonl"
    lines = [_other("agent_start", 1, BOOTS[0], 1_000)]
    lines += [
        _stall(seq, BOOTS[0], seq * 10_000_000, 3_000_000, seq % 2) for seq in range(2, 2_000)
    ]
    path.write_text("\n".join(lines) + "\n")
    taken: list[int] = []
    original = _GuestReader.stalls_in_bulk

    def counting(self: _GuestReader, seg: Any, run: Any) -> bool:
        taken.append(len(run.lines))
        return original(self, seg, run)

    monkeypatch.setattr(_GuestReader, "stalls_in_bulk", counting)
    issues: list[Issue] = []
    reader = _GuestReader(issues.append)
    reader.read_file("guest", path)
    assert taken == [1_998] and issues == []
    table = _stall_table(reader)
    assert len(table) == 1_998 and np.all(np.diff(table.line) == 1)
