"""QMP records as recorded: when an event happened, and when QEMU had the vCPUs stopped.

Every module that needs a QMP event's time or the windows in which the guest was stopped
asks here, so the timeline, the clock alignment, the host exporter and the lab agree.

When. QEMU stamps every event with ``{"seconds": S, "microseconds": US}``: the host's
wall clock when QEMU emitted it. ``qemu_ns`` decodes it: both integers (not booleans),
``0 <= S`` with ``S * 10**9`` within int64 nanoseconds, ``0 <= US < 10**6``; anything else
is unusable (None), never a guess. ``event_time`` is QEMU's stamp, else the recorder's
receive time ``host_real_ns`` when that is a time (an integer in ``(0, 2**63)``), else
None.

The STOP -> RESUME rule (``pair_stops``). QEMU sends ``STOP`` when it has stopped the
guest's vCPUs and ``RESUME`` when they run again; with two QEMUs (source and
destination) the guest's pause runs from one side's STOP to the other side's RESUME.
Over the events of every endpoint, in time order:

1. a STOP opens a window, unless one is open at that instant (a second STOP inside a
   pause, from another monitor of the same VM, is part of it). A STOP at the very
   nanosecond the previous window's RESUME closed it opens a new one;
2. the window closes at the first RESUME at or after its STOP that no earlier window
   took (a RESUME with the same time as the STOP closes it);
3. a RESUME that closes no window is an orphan (QEMU resumed a guest it had not stopped
   in the records: the recorder started mid-pause);
4. a STOP that no RESUME follows leaves its window open (``resume`` None): the guest
   was still stopped when the records end. What that means is the caller's: the
   timeline keeps an open pause phase, the clock alignment needs both ends and leaves
   it out, the lab's summary reports it with ``end_ns`` None.

``stop_windows`` applies the rule to the records of a run and dates each window's
freeze from the lab's ``stop`` command where there is one (``stop_request``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

from analysis.rundir.jsonl import MAX_NS

#: Largest seconds a QEMU timestamp may hold so that its nanoseconds fit int64.
MAX_SECONDS = MAX_NS // 1_000_000_000 - 1

T = TypeVar("T")

#: Migration statuses QEMU's QAPI schema defines (up to 10.0).
KNOWN_STATUSES = frozenset(
    {
        "none",
        "setup",
        "cancelling",
        "cancelled",
        "active",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover-setup",
        "postcopy-recover",
        "completed",
        "failed",
        "colo",
        "pre-switchover",
        "device",
        "wait-unplug",
    }
)


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool`` (JSON ``true`` is not a number here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def qemu_ns(stamp: Any) -> int | None:
    """QEMU's ``{"seconds": S, "microseconds": US}`` in ns, or None when unusable (not
    integers, negative, or past what int64 nanoseconds hold).

    :param stamp: an event's ``timestamp`` as recorded.
    :return: host realtime in ns, or None.
    """
    if not isinstance(stamp, Mapping):
        return None
    sec, usec = stamp.get("seconds"), stamp.get("microseconds")
    if not (is_int(sec) and is_int(usec)) or not 0 <= sec <= MAX_SECONDS:
        return None
    if not 0 <= usec < 1_000_000:
        return None
    return int(sec) * 1_000_000_000 + int(usec) * 1_000


def receive_ns(value: Any) -> int | None:
    """A record's ``host_real_ns`` when it is a usable time (in (0, 2**63)), else None."""
    return int(value) if is_int(value) and 0 < value <= MAX_NS else None


def event_time(rec: Mapping[str, Any]) -> int | None:
    """When a QMP event happened: QEMU's timestamp, else the recorder's receive time.

    :param rec: a QMP record of type ``event``.
    :return: host realtime in ns, None when neither time is usable.
    """
    stamp = qemu_ns(rec.get("timestamp"))
    return stamp if stamp is not None else receive_ns(rec.get("host_real_ns"))


def pair_stops(
    stops: Sequence[T], resumes: Sequence[T], time: Callable[[T], int]
) -> tuple[list[tuple[T, T | None]], list[T]]:
    """The STOP -> RESUME rule (the module's docstring): pair each STOP with its RESUME.

    :param stops: STOP events, in time order (ties in the caller's order).
    :param resumes: RESUME events, in time order (ties in the caller's order).
    :param time: an event's host realtime in ns.
    :return: the windows as (stop, resume or None while open) in time order, and the
        orphan RESUMEs.
    """
    windows: list[tuple[T, T | None]] = []
    taken = 0  # resumes[:taken] are spoken for: taken by a window or passed over
    used: set[int] = set()
    for stop in stops:
        if windows:
            last = windows[-1][1]
            if last is None or time(last) > time(stop):
                continue  # a second STOP inside a pause
        t = time(stop)
        while taken < len(resumes) and (taken in used or time(resumes[taken]) < t):
            taken += 1
        if taken < len(resumes):
            used.add(taken)
            windows.append((stop, resumes[taken]))
        else:
            windows.append((stop, None))
    orphans = [r for i, r in enumerate(resumes) if i not in used]
    return windows, orphans


def stop_request(endpoint: str, stop_ns: int, requests: Sequence[Mapping[str, Any]]) -> int | None:
    """When the ``stop`` command that a STOP event answered was sent, or None.

    QEMU's ``do_vm_stop()`` stops the guest's clocks first (``cpu_disable_ticks``), then
    waits until every vCPU has left the guest (``pause_all_vcpus``) and only then emits
    STOP. A vCPU blocked on a missing postcopy page leaves only when the page arrives, so
    STOP can come long after the clocks stopped (docs/lab-notes.md has the delays seen).
    The command's sending bounds the freeze's start from the other side.

    :param endpoint: the endpoint that sent STOP; ``stop_ns`` its QEMU timestamp.
    :param requests: ``stop`` commands of ``lab-steps.jsonl``
        (``analysis.analyze.load.is_stop_command``): ``endpoint``, ``host_real_ns``
        (sent) and ``elapsed_ns`` (until the reply).
    """
    for req in requests:
        sent, elapsed = req.get("host_real_ns"), req.get("elapsed_ns")
        if (
            req.get("endpoint") == endpoint
            and isinstance(sent, int)
            and isinstance(elapsed, int)
            and sent <= stop_ns <= sent + elapsed + 1_000_000  # QEMU stamps whole us
        ):
            return sent
    return None


@dataclass(frozen=True)
class StopWindow:
    """QEMU had the guest's vCPUs stopped from ``start_ns`` to ``end_ns`` (host realtime)."""

    start_ns: int
    end_ns: int
    stopped_by: str
    resumed_by: str
    #: When the ``stop`` command that this STOP answered was sent, where known (the lab's
    #: commands): the guest's clocks may have stopped as early as that (``stop_request``).
    requested_ns: int | None = None

    @property
    def length_ns(self) -> int:
        """The window's length."""
        return self.end_ns - self.start_ns

    @property
    def length_max_ns(self) -> int:
        """The window's length counted from the ``stop`` command's sending, where known."""
        return self.end_ns - (self.start_ns if self.requested_ns is None else self.requested_ns)


@dataclass(frozen=True)
class OpenStop:
    """A STOP that no RESUME followed: the guest was still stopped when the records end."""

    start_ns: int
    stopped_by: str
    requested_ns: int | None = None


def stop_windows(
    qmp: Mapping[str, Iterable[Mapping[str, Any]]],
    requests: Sequence[Mapping[str, Any]] = (),
) -> tuple[list[StopWindow], OpenStop | None]:
    """Every window in which QEMU had the vCPUs stopped, by the STOP -> RESUME rule.

    STOP and RESUME of every endpoint are merged in time (``event_time``; ties by
    endpoint name); events without a usable time are left out.

    :param qmp: records per endpoint.
    :param requests: ``stop`` commands, to date the freezes they caused (``stop_request``).
    :return: the closed windows in time order, and the last STOP when it stayed open.
    """
    stops: list[tuple[int, str]] = []
    resumes: list[tuple[int, str]] = []
    for name, records in qmp.items():
        for rec in records:
            if rec.get("type") != "event" or rec.get("event") not in ("STOP", "RESUME"):
                continue
            t = event_time(rec)
            if t is not None:
                (stops if rec["event"] == "STOP" else resumes).append((t, name))
    pairs, _ = pair_stops(sorted(stops), sorted(resumes), lambda mark: mark[0])
    closed: list[StopWindow] = []
    still_open: OpenStop | None = None
    for (start, by), resume in pairs:
        requested = stop_request(by, start, requests)
        if resume is None:
            still_open = OpenStop(start, by, requested)
        else:
            closed.append(StopWindow(start, resume[0], by, resume[1], requested))
    return closed, still_open
