"""Which kernel log lines are warnings that matter to a migrating guest, kept as data.

The kernel has no machine-readable "a CPU was stuck" channel; its lockup detectors, RCU,
the hung-task checker and the clocksource watchdog say so in the kernel log, in English,
through ``printk`` format strings. This module is the table that turns such a line into a
warning kind (the ``kind`` label of ``tsprobe_kernel_warnings_total``) and a few typed
fields. Each row names the kernel source file and the format string it follows, so a row
can be checked against the kernel, and tests/test_kmsg.py feeds every row a line made from
that format string.

How to read a row: ``kind`` is the warning kind, ``regex`` is searched (not anchored)
anywhere in the record's text, so the subsystem prefix the kernel adds with ``pr_fmt``
("watchdog: ", "rcu: ", "clocksource: ", "tsc: "), an older kernel's prefix ("NMI watchdog: ")
or a syslog-style prefix of a userspace writer does not matter; ``fields`` names the
regex groups to keep and how to convert them (a group that did not take part is left
out, and so is a number too long to convert: the kernel prints 64-bit values, a line of
5,000 digits is someone else's); regexes are ASCII (a digit is 0-9 only); ``const``
adds fixed fields (which RCU report it was). The first row that matches wins, so rows
that could overlap are ordered most specific first.

Kinds (``WARNING_KINDS``):

======================== ====================================================================
soft_lockup              a CPU ran kernel code without scheduling for watchdog_thresh*2 s
hard_lockup              a CPU did not take timer interrupts for watchdog_thresh s (NMI based)
rcu_stall                an RCU grace period (normal, expedited or tasks) did not end in time
hung_task                a task sat in uninterruptible sleep for hung_task_timeout_secs
workqueue_lockup         a workqueue pool made no progress for wq_watchdog_thresh s
clocksource_unstable     the clocksource watchdog found a clocksource skewed or unreadable
clocksource_switch       timekeeping moved to another clocksource
tsc_unstable             the TSC clocksource was demoted (the reason is kept)
sched_clock_unstable     sched_clock (which also stamps kernel log records) left stable mode
rt_throttling            realtime tasks hit sched_rt_runtime_us and were throttled
hrtimer_slow             one hrtimer interrupt ran for a long time (printed once per boot)
perf_interrupt_slow      perf sampling interrupts took too long (ratelimited)
nmi_handler_slow         an NMI handler ran for a long time (ratelimited)
======================== ====================================================================

A migration pause can look like several of these at once (the guest's clocks jump, every
detector finds its deadline long past), but KVM guests tell the lockup and RCU detectors
about a host stop (PVCLOCK_GUEST_STOPPED) and they stay silent, so an absence proves
nothing. Only ``classify`` is needed by the reader; the table is public for tests and docs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

#: A field's value as extracted: a number or a name.
FieldValue = int | str

#: Every warning kind a ``Match`` can carry, in a stable order (metrics export each with 0).
WARNING_KINDS: tuple[str, ...] = (
    "soft_lockup",
    "hard_lockup",
    "rcu_stall",
    "hung_task",
    "workqueue_lockup",
    "clocksource_unstable",
    "clocksource_switch",
    "tsc_unstable",
    "sched_clock_unstable",
    "rt_throttling",
    "hrtimer_slow",
    "perf_interrupt_slow",
    "nmi_handler_slow",
)


def _msecs_to_ns(text: str) -> int:
    """Convert the kernel's "%lld.%03d" milliseconds to integer nanoseconds."""
    whole, _, frac = text.partition(".")
    return int(whole) * 1_000_000 + int((frac + "000")[:3]) * 1_000


@dataclass(frozen=True)
class Pattern:
    """One row of the table: a kernel message shape and what to keep from it.

    :param kind: the warning kind, one of ``WARNING_KINDS``.
    :param regex: searched anywhere in the record's text.
    :param fields: (group name, converter) for each field to keep.
    :param const: fixed fields added to every match of this row.
    :param source: the kernel file and format string this row follows.
    """

    kind: str
    regex: re.Pattern[str]
    fields: tuple[tuple[str, Callable[[str], FieldValue]], ...] = ()
    const: tuple[tuple[str, FieldValue], ...] = ()
    source: str = ""


@dataclass(frozen=True)
class Match:
    """What ``classify`` found: the warning kind and the fields taken from the line."""

    kind: str
    fields: Mapping[str, FieldValue] = field(default_factory=dict)


def _p(
    kind: str,
    regex: str,
    fields: tuple[tuple[str, Callable[[str], FieldValue]], ...] = (),
    const: tuple[tuple[str, FieldValue], ...] = (),
    source: str = "",
) -> Pattern:
    return Pattern(kind, re.compile(regex, re.ASCII), fields, const, source)


_RCU_FLAVOR = r"(?P<flavor>\S+)"

#: The table, most specific rows first within a kind.
PATTERNS: tuple[Pattern, ...] = (
    _p(
        "soft_lockup",
        r"BUG: soft lockup - CPU#(?P<cpu>\d+) stuck for (?P<seconds>\d+)s!"
        r"(?: \[(?P<task>.*):(?P<pid>\d+)\])?",
        (("cpu", int), ("seconds", int), ("task", str), ("pid", int)),
        source='kernel/watchdog.c: "BUG: soft lockup - CPU#%d stuck for %us! [%s:%d]\\n"',
    ),
    _p(
        "hard_lockup",
        r"(?:CPU(?P<reporter_cpu>\d+): )?Watchdog detected hard LOCKUP on cpu (?P<cpu>\d+)",
        (("reporter_cpu", int), ("cpu", int)),
        source='kernel/watchdog.c: "CPU%u: Watchdog detected hard LOCKUP on cpu %u\\n" '
        '(older: "Watchdog detected hard LOCKUP on cpu %d\\n")',
    ),
    _p(
        "rcu_stall",
        r"INFO: " + _RCU_FLAVOR + r" detected expedited stalls"
        r"(?: on CPUs/tasks: \{[^}]*\} (?P<jiffies>\d+) jiffies)?",
        (("flavor", str), ("jiffies", int)),
        (("scope", "expedited"),),
        source='kernel/rcu/tree_exp.h: "INFO: %s detected expedited stalls on CPUs/tasks: {"'
        ' ... " } %lu jiffies s: %lu root: %#lx/%c\\n"',
    ),
    _p(
        "rcu_stall",
        r"INFO: " + _RCU_FLAVOR + r" self-detected stall on CPU",
        (("flavor", str),),
        (("scope", "self"),),
        source='kernel/rcu/tree_stall.h: "INFO: %s self-detected stall on CPU\\n"',
    ),
    _p(
        "rcu_stall",
        r"INFO: " + _RCU_FLAVOR + r" detected stalls on CPUs/tasks",
        (("flavor", str),),
        (("scope", "others"),),
        source='kernel/rcu/tree_stall.h: "INFO: %s detected stalls on CPUs/tasks:\\n"',
    ),
    _p(
        "rcu_stall",
        r"INFO: " + _RCU_FLAVOR + r" detected stalls on tasks",
        (("flavor", str),),
        (("scope", "tasks"),),
        source='kernel/rcu/tasks.h: "INFO: rcu_tasks detected stalls on tasks:\\n"',
    ),
    _p(
        "hung_task",
        r"INFO: task (?P<task>.+):(?P<pid>\d+) blocked for more than (?P<seconds>\d+) seconds",
        (("task", str), ("pid", int), ("seconds", int)),
        source='kernel/hung_task.c: "INFO: task %s:%d blocked for more than %ld seconds.\\n"',
    ),
    _p(
        "workqueue_lockup",
        r"BUG: workqueue lockup - pool(?: cpus=(?P<cpus>\S+))?"
        r"(?:.*? stuck for (?P<seconds>\d+)s!)?",
        (("cpus", str), ("seconds", int)),
        source='kernel/workqueue.c: "BUG: workqueue lockup - pool" + " cpus=%*pbl node=%d'
        ' flags=0x%x nice=%d" + " stuck for %us!\\n"',
    ),
    _p(
        "clocksource_unstable",
        r"timekeeping watchdog(?: on CPU(?P<cpu>\d+))?: Marking clocksource"
        r" '(?P<clocksource>[^']*)' as unstable",
        (("cpu", int), ("clocksource", str)),
        source='kernel/time/clocksource.c: "timekeeping watchdog on CPU%d: Marking clocksource'
        " '%s' as unstable because the skew is too large:\\n\"",
    ),
    _p(
        "clocksource_unstable",
        r"timekeeping watchdog on CPU(?P<cpu>\d+): "
        r"(?:wd-(?P<clocksource>\S+)-wd |(?P<watchdog>\S+) )"
        r"(?:excessive )?read-back delay of (?P<delay_ns>\d+)ns.*marking (?:\S+ )?unstable",
        (("cpu", int), ("clocksource", str), ("watchdog", str), ("delay_ns", int)),
        source='kernel/time/clocksource.c: "timekeeping watchdog on CPU%d: wd-%s-wd excessive'
        " read-back delay of %lldns vs. limit of %ldns, wd-wd read-back delay only %lldns,"
        ' attempt %d, marking %s unstable\\n" (older: "... %s read-back delay of %lldns,'
        ' attempt %d, marking unstable\\n")',
    ),
    _p(
        "clocksource_unstable",
        r"Clocksource (?P<clocksource>\S+) unstable \(delta = (?P<delta_ns>-?\d+) ns\)",
        (("clocksource", str), ("delta_ns", int)),
        source='kernel/time/clocksource.c (older kernels): "Clocksource %s unstable'
        ' (delta = %Ld ns)\\n"',
    ),
    _p(
        "clocksource_switch",
        r"Switch(?:ed|ing) to clocksource (?P<clocksource>\S+)",
        (("clocksource", str),),
        source='kernel/time/clocksource.c: "Switched to clocksource %s\\n"',
    ),
    _p(
        "tsc_unstable",
        r"Marking TSC unstable due to (?P<reason>.+)",
        (("reason", str),),
        source='arch/x86/kernel/tsc.c: "Marking TSC unstable due to %s\\n"',
    ),
    _p(
        "sched_clock_unstable",
        r"TSC found unstable after boot",
        source='kernel/sched/clock.c: "TSC found unstable after boot, most likely due to broken'
        " BIOS. Use 'tsc=unstable'.\\n\"",
    ),
    _p(
        "rt_throttling",
        r"sched: RT throttling activated"
        r"(?: \(curr: pid (?P<pid>\d+), comm (?P<task>[^)]*)\))?",
        (("pid", int), ("task", str)),
        source='kernel/sched/rt.c: "sched: RT throttling activated\\n"',
    ),
    _p(
        "hrtimer_slow",
        r"hrtimer: interrupt took (?P<took_ns>\d+) ns",
        (("took_ns", int),),
        source='kernel/time/hrtimer.c: "hrtimer: interrupt took %llu ns\\n"',
    ),
    _p(
        "perf_interrupt_slow",
        r"perf: interrupt took too long \((?P<took_ns>\d+) > (?P<allowed_ns>\d+)\)"
        r"(?:, lowering kernel\.perf_event_max_sample_rate to (?P<sample_rate>\d+))?",
        (("took_ns", int), ("allowed_ns", int), ("sample_rate", int)),
        source='kernel/events/core.c: "perf: interrupt took too long (%lld > %lld), lowering'
        ' kernel.perf_event_max_sample_rate to %d\\n"',
    ),
    _p(
        "nmi_handler_slow",
        r"INFO: NMI handler \((?P<handler>[^)]*)\) took too long to run:"
        r" (?P<took_ns>\d+\.\d+) msecs",
        (("handler", str), ("took_ns", _msecs_to_ns)),
        source='arch/x86/kernel/nmi.c: "INFO: NMI handler (%ps) took too long to run:'
        ' %lld.%03d msecs\\n"',
    ),
)


def classify(text: str) -> Match | None:
    """Find the first row of ``PATTERNS`` whose regex occurs in a kernel log line.

    :param text: the text of one kernel log record (without the /dev/kmsg header).
    :return: the warning kind and the extracted fields, or None for an ordinary line.
    """
    for pattern in PATTERNS:
        found = pattern.regex.search(text)
        if found is None:
            continue
        fields: dict[str, FieldValue] = dict(pattern.const)
        for name, convert in pattern.fields:
            value = found.group(name)
            if value is None:
                continue
            try:
                fields[name] = convert(value)
            except ValueError:  # more digits than int() converts
                continue
        return Match(pattern.kind, fields)
    return None
