"""Parsers for the few /proc and /sys records the stall sampler reads, and thin readers.

Three records, all plain text:

``/proc/self/task/TID/schedstat``
    One line of three numbers (Documentation/scheduler/sched-stats.rst): time the thread
    spent on a CPU (ns), time it spent runnable but waiting for a CPU (``run_delay``, ns),
    and the number of timeslices it ran. The second field is how long the guest's own
    scheduler kept the thread off its CPU. The counts are exact nanoseconds, unlike
    getrusage() and /proc/PID/stat, which the tick samples.

``/proc/stat``
    One ``cpuN`` line per online CPU: ``cpuN user nice system idle iowait irq softirq steal
    guest guest_nice``, in USER_HZ ticks (``os.sysconf("SC_CLK_TCK")``, 100 on Linux, so
    10 ms each). ``steal`` (the 8th number) is time the hypervisor ran something else while
    this vCPU wanted to run.

``/sys/devices/system/cpu/online``
    A CPU list such as ``0-3,5``.

Parsing is separate from reading so that every parser is tested on literal text::

    >>> parse_schedstat("1200 300 4\\n")
    Schedstat(run_ns=1200, run_delay_ns=300, timeslices=4)
    >>> parse_cpu_list("0-2,5")
    [0, 1, 2, 5]

This module is imported by the sampler process (``probe.stall``), whose memory footprint is
part of the agent's budget, so it imports nothing at run time beyond ``os`` and
``probe.errors``; ``Schedstat`` is a hand-made named tuple for that reason (``typing`` alone
would add about 2 MB to each sampler).
"""

from __future__ import annotations

import os

from probe.errors import ParseError

#: ``typing.TYPE_CHECKING`` without importing ``typing`` (see the module docstring).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from probe.roots import Roots

#: Length of one USER_HZ tick in nanoseconds (the unit of /proc/stat's CPU times).
TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


class Schedstat(tuple[int, int, int]):
    """One thread's ``schedstat`` record: ``(run_ns, run_delay_ns, timeslices)``.

    A tuple (it unpacks and compares like one) with named fields.
    """

    __slots__ = ()

    def __new__(cls, run_ns: int, run_delay_ns: int, timeslices: int) -> Schedstat:
        return tuple.__new__(cls, (run_ns, run_delay_ns, timeslices))

    @property
    def run_ns(self) -> int:
        """Time the thread ran on a CPU, in nanoseconds."""
        return self[0]

    @property
    def run_delay_ns(self) -> int:
        """Time the thread was runnable but waited for a CPU, in nanoseconds."""
        return self[1]

    @property
    def timeslices(self) -> int:
        """Number of times the thread was switched onto a CPU."""
        return self[2]

    def __repr__(self) -> str:
        return f"Schedstat(run_ns={self[0]}, run_delay_ns={self[1]}, timeslices={self[2]})"


def _shorten(text: str, limit: int = 60) -> str:
    flat = text.strip().replace("\n", "\\n")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def parse_schedstat(text: str) -> Schedstat:
    """Parse a ``/proc/PID/task/TID/schedstat`` record.

    :param text: the file's content, e.g. ``"1200 300 4\\n"``.
    :raise ParseError: unless the text is exactly three non-negative integers.
    :return: the three counters.
    """
    parts = text.split()
    if len(parts) != 3:
        raise ParseError(f"schedstat: expected 3 numbers, got {_shorten(text)!r}")
    try:
        run, delay, slices = (int(part) for part in parts)
    except ValueError as err:
        raise ParseError(f"schedstat: not a number in {_shorten(text)!r}") from err
    if run < 0 or delay < 0 or slices < 0:
        raise ParseError(f"schedstat: negative counter in {_shorten(text)!r}")
    return Schedstat(run, delay, slices)


def parse_steal(text: str, cpu: int, tick_ns: int = TICK_NS) -> int:
    """Read one CPU's steal time out of ``/proc/stat``.

    :param text: the content of /proc/stat (its first lines suffice).
    :param cpu: the CPU number, as in the ``cpuN`` line.
    :param tick_ns: the length of a USER_HZ tick; the default is this system's.
    :raise ParseError: when the ``cpuN`` line is missing, too short or not numeric.
    :return: the CPU's steal time since boot, in nanoseconds (a multiple of ``tick_ns``).
    """
    prefix = f"cpu{cpu} "
    # find() rather than splitlines(): the sampler calls this on every stall.
    start = 0 if text.startswith(prefix) else text.find("\n" + prefix) + 1
    if start == 0 and not text.startswith(prefix):
        raise ParseError(f"/proc/stat: no line for cpu{cpu}")
    end = text.find("\n", start)
    parts = text[start : end if end >= 0 else len(text)].split()
    if len(parts) < 9:
        raise ParseError(
            f"/proc/stat: line {parts[0]} has {len(parts) - 1} fields, steal is the 8th"
        )
    try:
        ticks = int(parts[8])
    except ValueError as err:
        raise ParseError(f"/proc/stat: steal of {parts[0]} is {parts[8]!r}") from err
    if ticks < 0:
        raise ParseError(f"/proc/stat: steal of {parts[0]} is negative ({ticks})")
    return ticks * tick_ns


#: The largest CPU number a list may name: Linux's NR_CPUS is at most 8192 on x86-64
#: (CONFIG_MAXSMP). A list is checked against this before it is expanded, so
#: ``0-999999999`` is one clear error, not a billion-element set.
MAX_CPU = 8191


def parse_cpu_list(text: str) -> list[int]:
    """Parse a kernel CPU list such as ``0-3,5`` (``/sys/devices/system/cpu/online``).

    :param text: the list; surrounding whitespace and a trailing newline are allowed.
    :raise ParseError: on an empty list, a non-number (ASCII digits only), a range that
        runs backwards, or a CPU above ``MAX_CPU``.
    :return: the CPU numbers, ascending, without duplicates.
    """
    body = text.strip()
    if not body:
        raise ParseError("cpu list: empty")
    cpus: set[int] = set()
    for item in body.split(","):
        low_text, dash, high_text = item.strip().partition("-")
        if not _is_number(low_text) or (dash and not _is_number(high_text)):
            raise ParseError(f"cpu list: bad item {_shorten(item, 20)!r} in {_shorten(text)!r}")
        low = int(low_text)
        high = int(high_text) if dash else low
        if high < low:
            raise ParseError(f"cpu list: bad range {_shorten(item, 20)!r} in {_shorten(text)!r}")
        if high > MAX_CPU:
            raise ParseError(
                f"cpu list: CPU {_shorten(str(high), 20)} in {_shorten(text)!r} is above"
                f" the largest possible, {MAX_CPU}"
            )
        cpus.update(range(low, high + 1))
    return sorted(cpus)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 10


def format_cpu_list(cpus: list[int] | tuple[int, ...] | set[int]) -> str:
    """Write CPUs the kernel's way: ``[0, 1, 2, 5]`` -> ``0-2,5``.

    :param cpus: CPU numbers.
    :return: the compact list.
    """
    parts: list[str] = []
    ordered = sorted(set(cpus))
    start = 0
    for index in range(1, len(ordered) + 1):
        if index == len(ordered) or ordered[index] != ordered[index - 1] + 1:
            low, high = ordered[start], ordered[index - 1]
            parts.append(str(low) if low == high else f"{low}-{high}")
            start = index
    return ",".join(parts)


def schedstat_path(roots: Roots, tid: int | str = "self") -> str:
    """Where a thread's schedstat is: ``PROC/self/task/TID/schedstat`` (``PROC/self/schedstat``
    for ``tid="self"``, the calling process's main thread).

    :param roots: the filesystem roots.
    :param tid: a thread id, or ``"self"``.
    :return: the path.
    """
    if tid == "self":
        return roots.proc_path("self", "schedstat")
    return roots.proc_path("self", "task", str(tid), "schedstat")


def read_schedstat(roots: Roots, tid: int | str = "self") -> Schedstat:
    """Read and parse a thread of this process's schedstat.

    :param roots: the filesystem roots.
    :param tid: a thread id of this process, or ``"self"`` for its main thread.
    :raise OSError: when the file cannot be read (no CONFIG_SCHED_INFO, a fixture without it).
    :raise ParseError: when its content is malformed.
    :return: the counters.
    """
    return parse_schedstat(roots.read_text(schedstat_path(roots, tid)))


def read_steal_ns(roots: Roots, cpu: int) -> int:
    """Read one CPU's steal time from ``PROC/stat``.

    :param roots: the filesystem roots.
    :param cpu: the CPU number.
    :raise OSError: when the file cannot be read.
    :raise ParseError: when the CPU's line is missing or malformed.
    :return: steal since boot in nanoseconds.
    """
    return parse_steal(roots.read_text(roots.proc_path("stat")), cpu)


def read_online_cpus(roots: Roots) -> list[int]:
    """Read the online CPUs from ``SYS/devices/system/cpu/online``.

    :param roots: the filesystem roots.
    :raise OSError: when the file cannot be read.
    :raise ParseError: when the list is malformed.
    :return: the CPU numbers, ascending.
    """
    return parse_cpu_list(roots.read_text(roots.sys_path("devices", "system", "cpu", "online")))
