"""The guest-event models, the stall fast path against the checked path, and seq order.

The property-based tests generate stall lines close to the agent's layout (numbers of
every width, leading zeros, signs, huge values, fields moved, spaces, escapes, bytes that
are not UTF-8) and require the fast path to give either nothing or exactly the checked
path's row; and ``SeqRanges`` to behave as a plain set.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from analysis.rundir import guest_events as ge
from analysis.rundir.jsonl import decode_record

BOOT = "8d52b27a-dfe8-4301-95ca-003551b13ee0"
GOOD = (
    '{"v":1,"seq":7,"boot_id":"' + BOOT + '","kind":"stall","mono_ns":16443689215,'
    '"real_ns":1795641457984058950,"duration_ns":62000000,"cpu":1,"cause":"vcpu-blocked",'
    '"run_delay_ns":0,"steal_ns":null,"mode":"tick"}\n'
)


def checked(raw: bytes) -> ge.StallRow | str:
    """The checked path: decode the line, then the stall model."""
    obj = decode_record(raw)
    if isinstance(obj, str):
        return obj
    head = ge.event_head(obj)
    if isinstance(head, str):
        return head
    if head.kind != "stall":
        return "not a stall"
    return ge.stall_row(obj)


def test_the_agents_layout_takes_the_fast_path() -> None:
    row = ge.fast_stall(GOOD.encode())
    assert row == ge.StallRow(7, BOOT, 16443689215, 62000000, 1, "vcpu-blocked")
    assert checked(GOOD.encode()) == row


def test_leading_zeros_are_not_json_and_never_fast() -> None:
    line = GOOD.replace('"duration_ns":62000000', '"duration_ns":000000099').encode()
    assert ge.fast_stall(line) is None
    assert isinstance(checked(line), str) and checked(line).startswith("not JSON")


def test_a_4301_digit_integer_is_a_skip_not_an_error() -> None:
    line = GOOD.replace('"mono_ns":16443689215', '"mono_ns":' + "9" * 4301).encode()
    assert ge.fast_stall(line) is None
    assert isinstance(checked(line), str)


def test_ns_values_past_int64_are_skips() -> None:
    for field, value in (("duration_ns", 2**63), ("mono_ns", 2**63), ("seq", 2**63)):
        line = GOOD.replace(f'"{field}":', f'"{field}":{value},"x":', 1).encode()
        assert ge.fast_stall(line) is None
        assert isinstance(checked(line), str), field
    # each alone in range, but the stall would end past 2**63
    line = GOOD.replace('"mono_ns":16443689215', f'"mono_ns":{2**63 - 10}').encode()
    assert ge.fast_stall(line) is None
    assert checked(line) == "stall with 'duration_ns' not an integer in [0, 2**63 - mono_ns)"


def test_a_cpu_past_max_cpu_is_a_skip() -> None:
    for cpu in (ge.MAX_CPU, 10**30, -1):
        line = GOOD.replace('"cpu":1', f'"cpu":{cpu}').encode()
        assert ge.fast_stall(line) is None
        assert isinstance(checked(line), str)


# --------------------------------------------------------------------------- properties

_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(min_value=0, max_value=10**20).map(lambda n: "0" + str(n)),
    st.sampled_from(["-0", "0", "1e3", "1.0", "NaN", "-", "", "00", "9" * 19, "9" * 25]),
)
_strings = st.one_of(
    st.text(max_size=12).map(lambda s: json.dumps(s)[1:-1]),
    st.sampled_from(["vcpu-blocked", "guest-sched", "", "\\ud800", "a\\u0041", "A B"]),
)
_field_names = ("v", "seq", "mono_ns", "real_ns", "duration_ns", "cpu")


@st.composite
def stall_lines(draw: st.DrawFn) -> bytes:
    """A stall line in (or near) the agent's layout, each part possibly broken."""
    parts = [
        f'"v":{draw(_numbers) if draw(st.booleans()) else "1"}',
        f'"seq":{draw(_numbers)}',
        f'"boot_id":"{draw(_strings) if draw(st.booleans()) else BOOT}"',
        '"kind":"stall"',
        f'"mono_ns":{draw(_numbers)}',
        f'"real_ns":{draw(_numbers)}',
        f'"duration_ns":{draw(_numbers)}',
        f'"cpu":{draw(_numbers)}',
        f'"cause":"{draw(_strings)}"',
    ]
    extras = draw(
        st.lists(
            st.sampled_from(['"run_delay_ns":', '"steal_ns":', '"mode":"tick"', '"cpu":']),
            max_size=3,
        )
    )
    for extra in extras:
        parts.append(extra + draw(_numbers) if extra.endswith(":") else extra)
    if draw(st.booleans()):
        parts = draw(st.permutations(parts))
    sep = draw(st.sampled_from([",", ",", ", "]))
    body = "{" + sep.join(parts) + "}" + draw(st.sampled_from(["\n", "", "\r\n", " \n"]))
    raw = body.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        at = draw(st.integers(min_value=0, max_value=len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=3)) + raw[at:]
    return raw


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stall_lines())
@example(GOOD.encode())
@example(GOOD.replace('"duration_ns":62000000', '"duration_ns":000000099').encode())
@example(GOOD.replace('"cpu":1', '"cpu":8191').encode())
@example(GOOD.replace('"real_ns":1795641457984058950', '"real_ns":-0').encode())
def test_the_fast_path_agrees_with_the_checked_path(raw: bytes) -> None:
    fast = ge.fast_stall(raw)
    if fast is not None:
        assert checked(raw) == fast


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=10**6))
def test_the_fast_path_takes_plain_numbers(seq: int, cpu_seed: int) -> None:
    cpu = cpu_seed % ge.MAX_CPU
    line = GOOD.replace('"seq":7', f'"seq":{seq}').replace('"cpu":1', f'"cpu":{cpu}')
    row = ge.fast_stall(line.encode())
    assert row is not None and row == checked(line.encode())


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=60), max_size=80))
def test_seq_ranges_behave_as_a_set(values: list[int]) -> None:
    ranges, plain = ge.SeqRanges(), set()
    for n in values:
        assert (n in ranges) == (n in plain)
        ranges.add(n)
        plain.add(n)
        assert len(ranges) == len(plain)
        assert ranges.high == max(plain)
    assume(values)
    assert all(n in ranges for n in range(62)) == all(n in plain for n in range(62))


# --------------------------------------------------------------------------- seq order


def test_seq_tracker_duplicates_backwards_gaps_and_restarts() -> None:
    t = ge.SeqTracker()
    assert t.see(0, "a", 1, True, 100) == ge.SeqVerdict()
    assert t.see(0, "a", 2, False, 200) == ge.SeqVerdict()
    assert t.see(0, "a", 2, False, 200).duplicate
    assert t.see(0, "a", 10, False, 300).gap == 7
    assert t.see(0, "a", 1000, False, 400).gap == 989
    assert t.see(0, "a", 5, False, 250).back_from == 1000
    assert t.see(0, "a", 5, False, 250).duplicate
    # seq 1 again, later than every event so far: a restart whose start is missing
    assert t.see(0, "a", 1, False, 500) == ge.SeqVerdict(restart_after=1000)
    assert t.see(0, "a", 2, False, 600) == ge.SeqVerdict()
    assert t.see(0, "a", 2, False, 600).duplicate
    # a new agent start counts from 1 again: not duplicates
    assert t.see(0, "b", 1, True, 700) == ge.SeqVerdict()
    assert t.see(0, "b", 2, False, 800) == ge.SeqVerdict()
    # another boot compares with nothing of the first
    assert t.see(1, "a", 2, False, 0) == ge.SeqVerdict()


def test_agent_start_announces_cpus_and_checks_them() -> None:
    obj = json.loads(GOOD.replace('"kind":"stall"', '"kind":"agent_start"'))
    obj.update(agent_id="x", cpus=[0, 1], config={"threshold_ns": 5, "timeouts_ns": [3, 1]})
    start = ge.agent_start(obj)
    assert isinstance(start, ge.AgentStart)
    assert start.cpus == frozenset({0, 1}) and start.timeouts_ns == (1, 3)
    assert isinstance(ge.agent_start({**obj, "cpus": [0, ge.MAX_CPU]}), str)
    assert isinstance(ge.agent_start({**obj, "cpus": "0-1"}), str)
