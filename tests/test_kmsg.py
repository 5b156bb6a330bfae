"""The kernel-log probe: record parser, warning patterns, and the reader.

Parser and pattern tests run on literal text: records shaped as Documentation/ABI/testing/
dev-kmsg shows them, and warning lines made by filling in the kernel's own printk format
strings (quoted next to each case). Reader tests use the real /dev/kmsg (as root) except
for the faults the real device cannot be made to produce here (an overwritten ring,
sequence gaps, read errors); those use ``ScriptedKmsg``, a FAKE device injected through
``KmsgProbe(opener=...)``.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from probe.errors import ParseError
from probe.events import RawEvent
from probe.kmsg import (
    TEXT_MAX,
    KmsgProbe,
    KmsgRecord,
    KmsgSource,
    iter_records,
    parse_record,
    trim_text,
    unescape,
)
from probe.kmsg_patterns import PATTERNS, WARNING_KINDS, classify
from probe.roots import Roots

FIXTURES = Path(__file__).parent / "fixtures" / "kmsg"
REPO = Path(__file__).resolve().parent.parent


# ============================================================================ parser


def test_parse_plain_record_from_the_abi_document() -> None:
    rec = parse_record(b"6,339,5140900,-;NET: Registered protocol family 10\n")
    assert rec == KmsgRecord(0, 6, 339, 5140900, "-", "NET: Registered protocol family 10")
    assert rec.mono_ns == 5_140_900_000
    assert rec.caller is None


def test_parse_splits_prio_into_facility_and_level() -> None:
    rec = parse_record(b"30,340,5690716,-;udevd[80]: starting version 181\n")
    assert (rec.facility, rec.level) == (3, 6)  # 30 = daemon (3) << 3 | info (6)
    assert rec.text == "udevd[80]: starting version 181"


def test_parse_continuation_lines_into_the_dictionary() -> None:
    rec = parse_record(
        b"7,160,424069,-;pci_root PNP0A03:00: host bridge window [io  0x0000-0x0cf7] (ignored)\n"
        b" SUBSYSTEM=acpi\n"
        b" DEVICE=+acpi:PNP0A03:00\n"
    )
    assert rec.seq == 160 and rec.level == 7
    assert rec.text == "pci_root PNP0A03:00: host bridge window [io  0x0000-0x0cf7] (ignored)"
    assert rec.dict == {"SUBSYSTEM": "acpi", "DEVICE": "+acpi:PNP0A03:00"}


def test_parse_keeps_extra_header_fields() -> None:
    rec = parse_record(
        b"0,1234,5678901,c,caller=T42;watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [a:1]\n"
    )
    assert rec.flags == "c"
    assert rec.extra == ("caller=T42",)
    assert rec.caller == "T42"
    assert rec.text.startswith("watchdog: BUG: soft lockup")


def test_parse_undoes_the_kernels_hex_escapes() -> None:
    rec = parse_record(
        b"6,1,2,-;back\\x5cslash \\xc3\\xa9t\\xc3\\xa9 tab\\x09end\n DEVICE=n\\x32\n"
    )
    assert rec.text == "back\\slash été tab\tend"
    assert rec.dict == {"DEVICE": "n2"}


def test_unescape_leaves_broken_escapes_alone() -> None:
    assert unescape(b"a\\xzz b\\x4") == "a\\xzz b\\x4"
    assert unescape(b"\\xff") == "\ufffd"


def test_parse_accepts_str() -> None:
    assert parse_record("12,7,100,-;hello").facility == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no ';'"),
        (b"just some text\n", "no ';'"),
        (b"6,1,2;no flags field", "prio,seq,usec,flags"),
        (b"x,1,2,-;bad prio", "prio is not a number"),
        (b"6,1,2.5,-;bad usec", "usec is not a number"),
        (b"6,-1,2,-;negative seq", "negative seq"),
        (b"6,1,2,-;text\nnot indented\n", "continuation line"),
    ],
)
def test_malformed_records_raise_one_line_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_record(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_iter_records_reads_a_saved_stream() -> None:
    records = list(iter_records((FIXTURES / "migration.txt").read_text()))
    assert [r.seq for r in records] == list(range(1201, 1214))
    assert records[0].dict == {"SUBSYSTEM": "virtio", "DEVICE": "+virtio:virtio0"}
    assert records[4].text.startswith("rcu: \t1-....")
    kinds = [m.kind for r in records if (m := classify(r.text)) is not None]
    assert kinds == [
        "soft_lockup",
        "rcu_stall",
        "clocksource_unstable",
        "tsc_unstable",
        "sched_clock_unstable",
        "clocksource_switch",
        "hung_task",
    ]


def test_trim_text() -> None:
    assert trim_text("short") == "short"
    long = "x" * (TEXT_MAX + 50)
    assert len(trim_text(long)) == TEXT_MAX
    assert trim_text(long).endswith("...")


# ============================================================================ patterns

# (kernel format string it was made from, literal line, kind, expected fields)
CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    (
        'kernel/watchdog.c "BUG: soft lockup - CPU#%d stuck for %us! [%s:%d]"',
        "watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [tsprobe-test:1234]",
        "soft_lockup",
        {"cpu": 1, "seconds": 23, "task": "tsprobe-test", "pid": 1234},
    ),
    (
        'older kernel/watchdog.c, "NMI watchdog: " prefix, a comm with a colon',
        "NMI watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [kworker/u8:2:123]",
        "soft_lockup",
        {"cpu": 0, "seconds": 22, "task": "kworker/u8:2", "pid": 123},
    ),
    (
        'kernel/watchdog.c "CPU%u: Watchdog detected hard LOCKUP on cpu %u"',
        "watchdog: CPU2: Watchdog detected hard LOCKUP on cpu 3",
        "hard_lockup",
        {"reporter_cpu": 2, "cpu": 3},
    ),
    (
        'older kernel/watchdog_hld.c "Watchdog detected hard LOCKUP on cpu %d"',
        "NMI watchdog: Watchdog detected hard LOCKUP on cpu 1",
        "hard_lockup",
        {"cpu": 1},
    ),
    (
        'kernel/rcu/tree_stall.h "INFO: %s detected stalls on CPUs/tasks:"',
        "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
        "rcu_stall",
        {"flavor": "rcu_preempt", "scope": "others"},
    ),
    (
        'kernel/rcu/tree_stall.h "INFO: %s self-detected stall on CPU"',
        "rcu: INFO: rcu_sched self-detected stall on CPU",
        "rcu_stall",
        {"flavor": "rcu_sched", "scope": "self"},
    ),
    (
        'kernel/rcu/tree_exp.h "INFO: %s detected expedited stalls on CPUs/tasks: {"'
        ' " %d-%c%c%c%c" " } %lu jiffies s: %lu root: %#lx/%c"',
        "rcu: INFO: rcu_preempt detected expedited stalls on CPUs/tasks: { 1-.... }"
        " 5443 jiffies s: 49 root: 0x2/.",
        "rcu_stall",
        {"flavor": "rcu_preempt", "scope": "expedited", "jiffies": 5443},
    ),
    (
        'kernel/rcu/tree_exp.h, first fragment only ("c" flag)',
        "rcu: INFO: rcu_sched detected expedited stalls on CPUs/tasks: {",
        "rcu_stall",
        {"flavor": "rcu_sched", "scope": "expedited"},
    ),
    (
        'kernel/rcu/tasks.h "INFO: rcu_tasks detected stalls on tasks:"',
        "INFO: rcu_tasks detected stalls on tasks:",
        "rcu_stall",
        {"flavor": "rcu_tasks", "scope": "tasks"},
    ),
    (
        'kernel/hung_task.c "INFO: task %s:%d blocked for more than %ld seconds."',
        "INFO: task kworker/0:1:15 blocked for more than 122 seconds.",
        "hung_task",
        {"task": "kworker/0:1", "pid": 15, "seconds": 122},
    ),
    (
        'kernel/workqueue.c "BUG: workqueue lockup - pool" " cpus=%*pbl node=%d flags=0x%x'
        ' nice=%d" " stuck for %us!"',
        "BUG: workqueue lockup - pool cpus=0 node=0 flags=0x0 nice=0 stuck for 59s!",
        "workqueue_lockup",
        {"cpus": "0", "seconds": 59},
    ),
    (
        'kernel/time/clocksource.c "timekeeping watchdog on CPU%d: Marking clocksource'
        " '%s' as unstable because the skew is too large:\"",
        "clocksource: timekeeping watchdog on CPU6: Marking clocksource 'tsc' as unstable"
        " because the skew is too large:",
        "clocksource_unstable",
        {"cpu": 6, "clocksource": "tsc"},
    ),
    (
        'kernel/time/clocksource.c "timekeeping watchdog on CPU%d: wd-%s-wd excessive read-back'
        " delay of %lldns vs. limit of %ldns, wd-wd read-back delay only %lldns, attempt %d,"
        ' marking %s unstable"',
        "clocksource: timekeeping watchdog on CPU227: wd-tsc-wd excessive read-back delay of"
        " 153560ns vs. limit of 125000ns, wd-wd read-back delay only 11440ns, attempt 3,"
        " marking tsc unstable",
        "clocksource_unstable",
        {"cpu": 227, "clocksource": "tsc", "delay_ns": 153560},
    ),
    (
        'older kernel/time/clocksource.c "timekeeping watchdog on CPU%d: %s read-back delay of'
        ' %lldns, attempt %d, marking unstable"',
        "clocksource: timekeeping watchdog on CPU339: hpet read-back delay of 150280ns,"
        " attempt 3, marking unstable",
        "clocksource_unstable",
        {"cpu": 339, "watchdog": "hpet", "delay_ns": 150280},
    ),
    (
        'older kernel/time/clocksource.c "Clocksource %s unstable (delta = %Ld ns)"',
        "Clocksource tsc unstable (delta = -123456 ns)",
        "clocksource_unstable",
        {"clocksource": "tsc", "delta_ns": -123456},
    ),
    (
        'kernel/time/clocksource.c "Switched to clocksource %s"',
        "clocksource: Switched to clocksource kvm-clock",
        "clocksource_switch",
        {"clocksource": "kvm-clock"},
    ),
    (
        'arch/x86/kernel/tsc.c "Marking TSC unstable due to %s"',
        "tsc: Marking TSC unstable due to clocksource watchdog",
        "tsc_unstable",
        {"reason": "clocksource watchdog"},
    ),
    (
        'kernel/sched/clock.c "TSC found unstable after boot, most likely due to broken BIOS.'
        " Use 'tsc=unstable'.\"",
        "TSC found unstable after boot, most likely due to broken BIOS. Use 'tsc=unstable'.",
        "sched_clock_unstable",
        {},
    ),
    (
        'kernel/sched/rt.c "sched: RT throttling activated"',
        "sched: RT throttling activated",
        "rt_throttling",
        {},
    ),
    (
        'kernel/time/hrtimer.c "hrtimer: interrupt took %llu ns"',
        "hrtimer: interrupt took 10902600 ns",
        "hrtimer_slow",
        {"took_ns": 10902600},
    ),
    (
        'kernel/events/core.c "perf: interrupt took too long (%lld > %lld), lowering'
        ' kernel.perf_event_max_sample_rate to %d"',
        "perf: interrupt took too long (2505 > 2500), lowering"
        " kernel.perf_event_max_sample_rate to 79750",
        "perf_interrupt_slow",
        {"took_ns": 2505, "allowed_ns": 2500, "sample_rate": 79750},
    ),
    (
        'arch/x86/kernel/nmi.c "INFO: NMI handler (%ps) took too long to run: %lld.%03d msecs"',
        "INFO: NMI handler (perf_event_nmi_handler) took too long to run: 1.234 msecs",
        "nmi_handler_slow",
        {"handler": "perf_event_nmi_handler", "took_ns": 1_234_000},
    ),
]

NON_WARNINGS = [
    "NET: Registered protocol family 10",
    "clocksource: wd-hpet-wd read-back delay of 150280ns, clock-skew test skipped!",
    "clocksource: timekeeping watchdog on CPU3: hpet wd-wd read-back delay of 337240ns",
    "clocksource: timekeeping watchdog on CPU3: hpet retried 2 times before success",
    "clocksource: Override clocksource tsc is not currently HRT compatible - deferring",
    "sched_clock: Marking stable (1234, 0)->(1234, 0)",
    "tsc: Refined TSC clocksource calibration: 2095.077 MHz",
    "rcu: Hierarchical RCU implementation.",
    "watchdog: soft lockup detector is disabled",
    "",
]


@pytest.mark.parametrize(
    ("source", "line", "kind", "fields"), CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)]
)
def test_pattern_on_a_line_from_the_kernel_format_string(
    source: str, line: str, kind: str, fields: dict[str, Any]
) -> None:
    match = classify(line)
    assert match is not None, f"no pattern matched a line made from {source}"
    assert match.kind == kind
    assert dict(match.fields) == fields


@pytest.mark.parametrize("line", NON_WARNINGS)
def test_ordinary_lines_are_not_warnings(line: str) -> None:
    assert classify(line) is None


def test_every_kind_and_every_pattern_row_is_exercised() -> None:
    assert {case[2] for case in CASES} == set(WARNING_KINDS)
    for pattern in PATTERNS:
        assert any(pattern.regex.search(case[1]) for case in CASES if case[2] == pattern.kind), (
            f"pattern {pattern.regex.pattern!r} has no test line"
        )


def test_pattern_table_is_consistent() -> None:
    required = {"soft_lockup", "rcu_stall", "hung_task", "clocksource_unstable"}
    assert required | {"clocksource_switch"} <= set(WARNING_KINDS)
    assert len(set(WARNING_KINDS)) == len(WARNING_KINDS)
    assert {p.kind for p in PATTERNS} == set(WARNING_KINDS)
    reserved = {"v", "seq", "boot_id", "kind", "mono_ns", "real_ns", "duration_ns"}
    reserved |= {"warning", "text", "kmsg_seq", "level", "facility"}
    for pattern in PATTERNS:
        assert pattern.source, pattern.kind
        for name, _ in pattern.fields:
            assert name in pattern.regex.groupindex, (pattern.kind, name)
            assert name not in reserved, (pattern.kind, name)
        for name, _ in pattern.const:
            assert name not in reserved, (pattern.kind, name)


# ============================================================================ reader, fakes


def rec(seq: int, text: str, prio: int = 4) -> bytes:
    return f"{prio},{seq},{seq * 1000},-;{text}\n".encode()


SOFT = "watchdog: BUG: soft lockup - CPU#0 stuck for 21s! [migration/0:16]"
HUNG = "INFO: task sshd:301 blocked for more than 120 seconds."
RCU = "rcu: INFO: rcu_sched detected stalls on CPUs/tasks:"

Script = Sequence[bytes | BaseException]


class ScriptedKmsg:
    """FAKE /dev/kmsg: replays a script of records and errors, then reports no data.

    Only for faults the real device cannot be made to produce here (EPIPE after an
    overwritten ring, sequence gaps, read errors).
    """

    def __init__(self, script: Script) -> None:
        self.script = list(script)
        self.drained = threading.Event()
        self.closed = False

    def read_record(self, timeout_s: float) -> bytes | None:
        if not self.script:
            self.drained.set()
            time.sleep(min(timeout_s, 0.005))
            return None
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.closed = True


def fake_opener(fake: ScriptedKmsg) -> Callable[[str, bool], KmsgSource]:
    def opener(path: str, from_start: bool) -> KmsgSource:
        return fake

    return opener


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def run_fake(script: Script) -> tuple[KmsgProbe, ScriptedKmsg, list[RawEvent]]:
    fake = ScriptedKmsg(script)
    probe = KmsgProbe(opener=fake_opener(fake), poll_s=0.01)
    events: list[RawEvent] = []
    probe.start(events.append)
    assert wait_for(lambda: fake.drained.is_set() or not probe.health()["kmsg"].up)
    return probe, fake, events


def test_fake_epipe_and_gaps_count_lost_records_and_reading_goes_on() -> None:
    probe, fake, events = run_fake(
        [
            rec(10, SOFT),
            BrokenPipeError(errno.EPIPE, "Broken pipe"),  # 11..14 overwritten
            rec(15, HUNG),
            rec(16, "ordinary line"),
            rec(20, RCU),  # 17..19 missing without an EPIPE
        ]
    )
    try:
        assert probe.health()["kmsg"].up
        assert probe.lost() == 4 + 3
        assert probe.overruns() == 1
        assert probe.records() == 4
        assert [e.fields["kmsg_seq"] for e in events] == [10, 15, 20]
        counts = probe.counts()
        assert set(counts) == set(WARNING_KINDS)
        assert (counts["soft_lockup"], counts["hung_task"], counts["rcu_stall"]) == (1, 1, 1)
        assert sum(counts.values()) == 3
    finally:
        probe.stop()
    assert fake.closed


def test_fake_epipe_before_any_record_counts_at_least_one_lost() -> None:
    probe, _, events = run_fake([BrokenPipeError(errno.EPIPE, "Broken pipe"), rec(5, SOFT)])
    probe.stop()
    assert probe.lost() == 1
    assert len(events) == 1


def test_fake_event_fields_and_timestamps() -> None:
    probe, _, events = run_fake([rec(7, SOFT, prio=0)])
    probe.stop()
    (event,) = events
    assert event.kind == "kernel_warning"
    assert event.duration_ns is None
    assert event.mono_ns == 7000 * 1000
    offset = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(
        time.CLOCK_MONOTONIC
    )
    assert abs((event.real_ns - event.mono_ns) - offset) < 50_000_000
    assert dict(event.fields) == {
        "warning": "soft_lockup",
        "text": SOFT,
        "kmsg_seq": 7,
        "level": 0,
        "facility": 0,
        "cpu": 0,
        "seconds": 21,
        "task": "migration/0",
        "pid": 16,
    }


def test_fake_long_text_is_trimmed() -> None:
    probe, _, events = run_fake([rec(1, SOFT + " " + "x" * 2000)])
    probe.stop()
    assert len(events[0].fields["text"]) == TEXT_MAX


def test_fake_malformed_record_is_skipped() -> None:
    probe, _, events = run_fake([b"garbage without header\n", rec(2, SOFT)])
    probe.stop()
    assert probe.malformed() == 1
    assert len(events) == 1 and probe.health()["kmsg"].detail == "stopped"


def test_fake_read_error_marks_health_down_without_raising() -> None:
    probe, _, events = run_fake([rec(1, SOFT), OSError(errno.EIO, "Input/output error")])
    assert wait_for(lambda: not probe.health()["kmsg"].up)
    health = probe.health()["kmsg"]
    assert "read failed" in health.detail and "Input/output error" in health.detail
    assert "\n" not in health.detail
    assert len(events) == 1
    probe.stop()


def test_fake_unexpected_exception_stops_the_reader_quietly() -> None:
    probe, _, _ = run_fake([ValueError("surprise")])
    assert wait_for(lambda: not probe.health()["kmsg"].up)
    assert "surprise" in probe.health()["kmsg"].detail
    probe.stop()


def test_fake_failing_emit_does_not_stop_the_reader() -> None:
    fake = ScriptedKmsg([rec(1, SOFT), rec(2, HUNG)])
    probe = KmsgProbe(opener=fake_opener(fake), poll_s=0.01)
    seen: list[RawEvent] = []

    def emit(event: RawEvent) -> None:
        seen.append(event)
        raise RuntimeError("event log full")

    probe.start(emit)
    assert fake.drained.wait(5.0)
    probe.stop()
    assert len(seen) == 2
    assert probe.counts()["hung_task"] == 1


def test_fake_permission_denied_is_reported() -> None:
    def opener(path: str, from_start: bool) -> KmsgSource:
        raise PermissionError(errno.EPERM, "Operation not permitted", path)

    probe = KmsgProbe(opener=opener)
    probe.start(lambda event: None)
    health = probe.health()["kmsg"]
    assert not health.up
    assert "permission denied" in health.detail and "CAP_SYSLOG" in health.detail
    probe.stop()


# ============================================================================ reader, real device


def test_missing_device_is_health_down_not_an_exception(tmp_path: Path) -> None:
    probe = KmsgProbe(Roots(dev=str(tmp_path)))
    assert probe.health()["kmsg"].detail == "not started"
    probe.start(lambda event: None)
    health = probe.health()["kmsg"]
    assert not health.up
    assert health.detail == f"{tmp_path}/kmsg: not found (no kernel log device here)"
    assert probe.counts() == dict.fromkeys(WARNING_KINDS, 0)
    probe.stop()


def _real_kmsg_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "reading and writing /dev/kmsg needs root"
    if not os.path.exists("/dev/kmsg"):
        return "no /dev/kmsg on this machine"
    if not os.access("/dev/kmsg", os.R_OK | os.W_OK):
        return "/dev/kmsg is not readable and writable here"
    try:
        mode = Path("/proc/sys/kernel/printk_devkmsg").read_text().strip()
    except OSError:
        mode = ""
    if mode == "off":
        return "kernel.printk_devkmsg=off drops records written to /dev/kmsg"
    return None


needs_real_kmsg = pytest.mark.skipif(
    _real_kmsg_skip_reason() is not None, reason=_real_kmsg_skip_reason() or ""
)


def write_kmsg(*lines: str) -> None:
    """Log lines through the real device (each open has its own ratelimit budget of 10)."""
    fd = os.open("/dev/kmsg", os.O_WRONLY)
    try:
        for line in lines:
            os.write(fd, line.encode())
    finally:
        os.close(fd)


def mine(events: list[RawEvent], token: str) -> list[RawEvent]:
    return [e for e in events if e.fields.get("task") == token]


@pytest.mark.needs_root
@needs_real_kmsg
def test_real_kmsg_soft_lockup_line_gives_exactly_one_event() -> None:
    token = f"tsprobe-{uuid.uuid4().hex[:8]}"
    line = f"watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [{token}:1234]"
    events: list[RawEvent] = []
    probe = KmsgProbe()
    probe.start(events.append)
    try:
        assert probe.health()["kmsg"].up, probe.health()["kmsg"].detail
        records_before = probe.records()
        mono_before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        real_before = time.time_ns()
        write_kmsg(f"<6>tsprobe test {token}: an ordinary line\n", f"<4>{line}\n")
        assert wait_for(lambda: len(mine(events, token)) >= 1), "the warning never arrived"
        time.sleep(0.2)  # a duplicate would have arrived by now
        (event,) = mine(events, token)
        # The kernel strips "<4>" and adds no prefix of its own; a userspace writer cannot
        # use facility 0, so the record comes back as facility 1 (user), level 4.
        assert event.fields["text"] == line
        assert event.fields["warning"] == "soft_lockup"
        assert (event.fields["facility"], event.fields["level"]) == (1, 4)
        assert (event.fields["cpu"], event.fields["seconds"], event.fields["pid"]) == (1, 23, 1234)
        assert isinstance(event.fields["kmsg_seq"], int)
        # local_clock() and CLOCK_MONOTONIC differ a little; far less than a second.
        assert abs(event.mono_ns - mono_before) < 1_000_000_000
        assert abs(event.real_ns - real_before) < 1_000_000_000
        assert probe.records() - records_before >= 2  # the ordinary line was read too
        soft = [e for e in events if e.fields["warning"] == "soft_lockup"]
        assert probe.counts()["soft_lockup"] == len(soft) >= 1
        assert probe.lost() == 0
    finally:
        started = time.monotonic()
        probe.stop()
        assert time.monotonic() - started < 1.0, "stop() was not prompt"
    assert not probe.health()["kmsg"].up


@pytest.mark.needs_root
@needs_real_kmsg
def test_real_kmsg_starts_at_the_end_unless_from_start() -> None:
    token = f"tsprobe-{uuid.uuid4().hex[:8]}"
    write_kmsg(f"<4>watchdog: BUG: soft lockup - CPU#0 stuck for 30s! [{token}:1]\n")
    late: list[RawEvent] = []
    whole: list[RawEvent] = []
    tail_probe = KmsgProbe()
    full_probe = KmsgProbe(from_start=True)
    tail_probe.start(late.append)
    full_probe.start(whole.append)
    try:
        assert wait_for(lambda: len(mine(whole, token)) == 1), "from_start missed the record"
        time.sleep(0.2)
        assert mine(late, token) == []
    finally:
        tail_probe.stop()
        full_probe.stop()


@pytest.mark.needs_root
@needs_real_kmsg
def test_real_kmsg_unreadable_for_an_unprivileged_user() -> None:
    restrict = Path("/proc/sys/kernel/dmesg_restrict").read_text().strip()
    if restrict != "1":
        pytest.skip("kernel.dmesg_restrict=0: unprivileged users may read /dev/kmsg here")
    code = (
        "from probe.kmsg import KmsgProbe\n"
        "p = KmsgProbe()\n"
        "p.start(print)\n"
        "h = p.health()['kmsg']\n"
        "print(h.up, h.detail)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            user=65534,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot run a process as nobody here: {err}")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"False /dev/kmsg: permission denied \(.*\)\n", done.stdout), done.stdout
