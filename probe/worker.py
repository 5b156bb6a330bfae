"""What every worker process shares: its command line, its pinning, its lines to the parent.

A worker is a small process the agent starts and supervises (``agent.workers``: forked
from the agent's fork server, or a fresh ``python -I -S``): the per-CPU stall samplers
(``probe.stall``) and the application-timeout canaries (``probe.canary_timer``,
``probe.canary_heartbeat``, ``probe.canary_rpc``). A worker talks to the agent in JSON
Lines on its stdout, one object per line with a type ``t``, and every worker speaks the
same few types besides its own:

``status``  once, after set-up: ``pid``, ``cpu``, ``notes`` (one line per degraded
            capability), ``mono_ns``/``real_ns`` (a first sign of life);
``note``    a degraded capability noticed later (``msg``);
``error``   set-up failed (``msg``); the worker exits with status 1 right after.

The parent reads a line per ``read``; several lines written in one ``os.write`` arrive
together (a worker batches its lines so that the agent wakes up about once a second per
worker, not once per line). A worker exits when its stdout is closed (a write fails with
EPIPE): the agent is gone.

Footprint: a worker imports only ``os``, ``sys``, ``time`` (and what its job needs:
``select``, ``gc``, ``ctypes`` for the timerfd) and small modules of this package, never
``json``, ``argparse``, ``typing`` or ``socket``: each of those costs a worker 0.5 to 2 MB,
and there is one worker per CPU and canary. So this module parses options and writes JSON
by hand.
"""

from __future__ import annotations

import gc
import os
import sys
import time

from probe.errors import ProbeError

#: ``typing.TYPE_CHECKING`` without importing ``typing`` (see the footprint note above).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import TypeVar

    T = TypeVar("T")


#: A worker sends its lines with its once-a-second sign of life, but never holds an event
#: longer than this: the first event of a batch brings the next sign of life forward, so
#: events reach the agent within about a quarter second (and the host within a second).
FLUSH_AFTER_NS = 250_000_000


class WorkerUsageError(ProbeError):
    """A worker's command line is wrong (the worker prints it and exits with status 2)."""


def json_str(text: str) -> str:
    """Quote a string as JSON (workers write their few lines without the json module).

    :param text: any string.
    :return: the JSON string literal, quotes included.
    """
    out = text.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(ch) < 0x20 for ch in out):
        out = "".join(ch if ord(ch) >= 0x20 else f"\\u{ord(ch):04x}" for ch in out)
    return '"' + out + '"'


def json_int(value: int | None) -> str:
    """An integer or ``null`` as JSON.

    :param value: the value.
    :return: its JSON text.
    """
    return "null" if value is None else str(value)


def json_ints(values: Iterable[int]) -> str:
    """A list of integers as JSON.

    :param values: the integers.
    :return: e.g. ``[1,2,3]``.
    """
    return "[" + ",".join(str(value) for value in values) + "]"


def write_stdout(text: str) -> None:
    """Write all of ``text`` to fd 1 (the pipe to the parent), without Python's buffering.

    :param text: complete lines.
    :raise BrokenPipeError: when the parent has gone away.
    """
    data = text.encode()
    while data:
        data = data[os.write(1, data) :]


def settle() -> None:
    """Before a worker's loop: collect what set-up left, and keep the collector off the
    objects that live as long as the loop (no collection pass walks them again)."""
    gc.collect()
    gc.freeze()


def pin(cpu: int) -> None:
    """Pin the calling process to one CPU.

    :param cpu: the CPU.
    :raise OSError: when the CPU cannot be used (offline, outside the allowed set).
    """
    os.sched_setaffinity(0, {cpu})


def status_line(cpu: int, notes: Sequence[str], **fields: int | str) -> str:
    """The ``status`` line a worker sends once after its set-up.

    :param cpu: the CPU the worker is pinned to.
    :param notes: one line per degraded capability.
    :param fields: extra integer or string fields.
    :return: the line, newline included.
    """
    extra = "".join(
        f',"{name}":{value if isinstance(value, int) else json_str(value)}'
        for name, value in fields.items()
    )
    return (
        f'{{"t":"status","pid":{os.getpid()},"cpu":{cpu}{extra},'
        f'"mono_ns":{time.monotonic_ns()},"real_ns":{time.time_ns()},'
        f'"notes":[{",".join(json_str(note) for note in notes)}]}}\n'
    )


def error_line(message: str) -> str:
    """The ``error`` line a worker sends before it exits with status 1.

    :param message: one line saying what failed.
    :return: the line, newline included.
    """
    return f'{{"t":"error","msg":{json_str(message)}}}\n'


def parse_options(
    argv: Sequence[str], names: Sequence[str], flags: Sequence[str] = ()
) -> dict[str, str]:
    """Parse ``--name value`` / ``--name=value`` options and bare ``--flag`` switches.

    :param argv: the arguments, without the program name.
    :param names: the options that take a value, e.g. ``("--cpu", "--fd")``.
    :param flags: the switches; a given switch maps to ``""``.
    :raise WorkerUsageError: on an unknown option or a missing value.
    :return: option name -> value (the last one given wins).
    """
    values: dict[str, str] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in flags:
            values[arg] = ""
            continue
        name, eq, value = arg.partition("=")
        if name not in names:
            raise WorkerUsageError(f"unknown option {arg!r}")
        if not eq:
            if not args:
                raise WorkerUsageError(f"option {name} needs a value")
            value = args.pop(0)
        values[name] = value
    return values


def int_option(values: dict[str, str], name: str, default: int | None = None) -> int:
    """An integer option from ``parse_options``' result.

    :param values: the parsed options.
    :param name: the option, e.g. ``--cpu``.
    :param default: its value when absent; None makes it required.
    :raise WorkerUsageError: when it is missing (and required) or not an integer.
    :return: the value.
    """
    if name not in values:
        if default is None:
            raise WorkerUsageError(f"{name} is required")
        return default
    try:
        return int(values[name])
    except ValueError:
        raise WorkerUsageError(f"{name} needs an integer, got {values[name]!r}") from None


def int_list_option(values: dict[str, str], name: str, default: Sequence[int]) -> list[int]:
    """A comma-separated list of positive integers (e.g. the timeout ladder in ns).

    :param values: the parsed options.
    :param name: the option.
    :param default: its value when absent.
    :raise WorkerUsageError: when an item is not a positive integer.
    :return: the values, ascending, without duplicates.
    """
    if name not in values:
        return sorted(set(default))
    out: set[int] = set()
    for item in values[name].split(","):
        try:
            number = int(item)
        except ValueError:
            raise WorkerUsageError(f"{name}: not an integer: {item!r}") from None
        if number <= 0:
            raise WorkerUsageError(f"{name}: must be positive, got {number}")
        out.add(number)
    return sorted(out)


def usage_exit(program: str, err: WorkerUsageError, usage: str) -> int:
    """Print a usage error to stderr (the parent keeps it as the worker's last words).

    :param program: the worker's module name.
    :param err: the error.
    :param usage: the usage line.
    :return: the exit status, 2.
    """
    sys.stderr.write(f"{program}: {err}\n{usage}\n")
    return 2


class Lines:
    """Lines waiting to go to the parent together: each write wakes the parent, which costs
    more than the line it carries.

    :param write: sends complete lines (``write_stdout``).
    """

    def __init__(self, write: Callable[[str], object]) -> None:
        self.write = write
        self.pending: list[str] = []

    def flush(self) -> None:
        """Write the pending lines in one call."""
        if self.pending:
            text = "".join(self.pending)
            self.pending.clear()
            self.write(text)


def run_worker(program: str, usage: str, parse: Callable[[], T], body: Callable[[T], int]) -> int:
    """A worker's ``main``: its command line (``parse``; a usage error is printed, exit 2),
    then ``body`` until it returns; the parent going away (a write fails with EPIPE) is
    exit 0, SIGINT 130.

    :param program: the worker's module name, for the usage error.
    :param usage: its usage line.
    :return: the exit status.
    """
    try:
        args = parse()
    except WorkerUsageError as err:
        return usage_exit(program, err, usage)
    try:
        return body(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
