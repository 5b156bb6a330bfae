"""probe.procfs: parsers on literal text and fixture trees, and against this machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from probe.errors import ParseError
from probe.procfs import (
    TICK_NS,
    Schedstat,
    parse_cpu_list,
    parse_schedstat,
    parse_steal,
    read_online_cpus,
    read_schedstat,
    read_steal_ns,
    schedstat_path,
)
from probe.roots import DEFAULT_ROOTS, Roots

FIXTURES = Path(__file__).parent / "fixtures"
BASIC = Roots(proc=str(FIXTURES / "proc-basic"))
MALFORMED = Roots(proc=str(FIXTURES / "proc-malformed"))

STAT = """\
cpu  11207 0 5953 349376 944 0 250 8217 0 0
cpu0 2504 0 2211 176420 40 0 51 4709 0 0
cpu1 8703 0 3742 172956 904 0 199 3508 0 0
cpu10 1 0 1 1 0 0 0 77 0 0
intr 5163417 0 9 0 0
ctxt 9519212
"""


# -- schedstat -----------------------------------------------------------------------


def test_schedstat_fields_by_name_and_position() -> None:
    stat = parse_schedstat("17617593 1119064 21\n")
    assert stat == (17617593, 1119064, 21)
    assert (stat.run_ns, stat.run_delay_ns, stat.timeslices) == (17617593, 1119064, 21)
    run, delay, slices = stat
    assert (run, delay, slices) == (17617593, 1119064, 21)
    assert repr(stat) == "Schedstat(run_ns=17617593, run_delay_ns=1119064, timeslices=21)"
    assert isinstance(stat, Schedstat)


@pytest.mark.parametrize(
    "text",
    ["", "\n", "1 2", "1 2 3 4", "1 2 x", "1.5 2 3", "-1 2 3", "not a schedstat"],
)
def test_schedstat_malformed_raises_parse_error(text: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_schedstat(text)
    message = str(info.value)
    assert message.startswith("schedstat: ")
    assert "\n" not in message


def test_schedstat_error_message_is_short_for_long_garbage() -> None:
    with pytest.raises(ParseError) as info:
        parse_schedstat("x " * 500)
    assert len(str(info.value)) < 120


# -- steal -----------------------------------------------------------------------------


def test_steal_is_eighth_field_in_ticks_converted_to_ns() -> None:
    assert parse_steal(STAT, 0) == 4709 * TICK_NS
    assert parse_steal(STAT, 1) == 3508 * TICK_NS
    # "cpu1" must not match the "cpu10" line, nor "cpu10" the "cpu1" line.
    assert parse_steal(STAT, 10) == 77 * TICK_NS
    assert parse_steal(STAT, 1, tick_ns=1) == 3508


def test_tick_is_user_hz() -> None:
    assert TICK_NS * os.sysconf("SC_CLK_TCK") == 1_000_000_000


@pytest.mark.parametrize(
    ("text", "cpu", "fragment"),
    [
        (STAT, 2, "no line for cpu2"),
        ("cpu0 1 2 3 4 5 6 7\n", 0, "has 7 fields"),
        ("cpu0 1 2 3 4 5 6 7 x 0 0\n", 0, "steal of cpu0 is 'x'"),
        ("cpu0 1 2 3 4 5 6 7 -8 0 0\n", 0, "negative"),
        ("", 0, "no line for cpu0"),
    ],
)
def test_steal_malformed_raises_parse_error(text: str, cpu: int, fragment: str) -> None:
    with pytest.raises(ParseError, match=fragment) as info:
        parse_steal(text, cpu)
    assert "\n" not in str(info.value)


# -- cpu lists -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", [0]),
        ("0-3,5", [0, 1, 2, 3, 5]),
        ("0-1\n", [0, 1]),
        (" 5,0-1 ", [0, 1, 5]),
        ("2-2", [2]),
        ("0-2,1-3", [0, 1, 2, 3]),
    ],
)
def test_cpu_list(text: str, expected: list[int]) -> None:
    assert parse_cpu_list(text) == expected


@pytest.mark.parametrize("text", ["", "\n", "a", "3-1", "1-", "-1", "1-2-3", "0,,1", "0-x"])
def test_cpu_list_malformed_raises_parse_error(text: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_cpu_list(text)
    assert str(info.value).startswith("cpu list: ")


# -- readers on fixture trees --------------------------------------------------------


def test_readers_on_fixture_tree(tmp_path: Path) -> None:
    assert read_steal_ns(BASIC, 0) == 4709 * TICK_NS
    assert read_steal_ns(BASIC, 1) == 3508 * TICK_NS
    assert read_schedstat(BASIC) == (17617593, 1119064, 21)
    assert read_schedstat(BASIC, 1234).run_delay_ns == 250
    assert schedstat_path(BASIC, 1234).endswith("proc-basic/self/task/1234/schedstat")
    online = tmp_path / "devices" / "system" / "cpu" / "online"
    online.parent.mkdir(parents=True)
    online.write_text("0-1,4\n")
    assert read_online_cpus(Roots(sys=str(tmp_path))) == [0, 1, 4]


def test_readers_on_malformed_tree() -> None:
    with pytest.raises(ParseError, match="cpu0 has 7 fields"):
        read_steal_ns(MALFORMED, 0)
    with pytest.raises(ParseError, match="steal of cpu1 is 'n/a'"):
        read_steal_ns(MALFORMED, 1)
    with pytest.raises(ParseError, match="schedstat"):
        read_schedstat(MALFORMED)


def test_missing_file_is_os_error() -> None:
    with pytest.raises(OSError):
        read_schedstat(BASIC, 99999)


# -- against this machine ------------------------------------------------------------


def test_against_this_machine() -> None:
    online = read_online_cpus(DEFAULT_ROOTS)
    assert set(os.sched_getaffinity(0)) <= set(online)
    for cpu in online:
        assert read_steal_ns(DEFAULT_ROOTS, cpu) >= 0
    before = read_schedstat(DEFAULT_ROOTS, os.getpid())
    sum(range(200_000))  # run a little,
    time.sleep(0.002)  # then block: the kernel folds run time in at a schedule, not a read
    after = read_schedstat(DEFAULT_ROOTS, os.getpid())
    assert after.run_ns > before.run_ns
    assert after.run_delay_ns >= before.run_delay_ns


@pytest.mark.parametrize(
    "text",
    ["0-999999999", "0-" + "1" * 400, "8192", "²", "١", "1_0", "0 - 3", "0-8192"],
)
def test_cpu_list_is_bounded_before_it_is_expanded(text: str) -> None:
    """Issue 18: --cpus 0-999999999 grew memory to 2.3 GB, then MemoryError."""
    start = time.monotonic()
    with pytest.raises(ParseError) as info:
        parse_cpu_list(text)
    assert time.monotonic() - start < 0.1
    assert len(str(info.value)) < 200
    assert parse_cpu_list("0-8191")[-1] == 8191
