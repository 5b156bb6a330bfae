"""The agent's event log: numbering, an in-memory ring for /events, and a rotated spool.

Probes report ``RawEvent`` values from any thread. ``EventLog.append`` numbers each one
(``seq`` 1, 2, 3, ... strictly increasing for this agent start), and then, under one lock
so that every consumer sees the same order:

1. keeps its JSON line in a bounded ring, from which ``since(seq, limit)`` serves the
   HTTP ``/events`` pages;
2. appends the line to the spool file (JSON Lines, one ``os.write`` per record, so a crash
   of the agent loses at most the record being written; there is no fsync per record);
3. hands the ``Event`` to every listener (the metrics count from these).

Spool rotation (like logrotate's ``rotate N``): before a record would take the file past
``max_spool_bytes``, ``events.jsonl.(N-1)`` becomes ``events.jsonl.N`` (the oldest is
overwritten), ..., ``events.jsonl`` becomes ``events.jsonl.1``, and the record goes to a
fresh ``events.jsonl``. Whole files are renamed, so no record is split or lost by a
rotation. An existing spool is appended to (an ``agent_start`` event marks where each
agent start begins; ``seq`` restarts there); a previous writer's truncated last line is
closed with a newline first so it cannot swallow the next record.

Failure policy: a spool that cannot be opened at construction is a ``ConfigError`` (one
line naming the path). A write that fails later (disk full, I/O error) is counted in
``stats().spool_errors``, the ring keeps the event, and the next record tries again; the
agent never stops because of its spool.

``tsprobe_events_dropped_total`` (``stats().dropped``) counts events that a consumer of
``/events`` can no longer get because a buffer was full:

* an event evicted from the ring (the ring holds the newest ``ring_size`` events) while its
  ``seq`` was above every ``seq`` that ``since()`` had handed out, i.e. no ``/events`` page
  had carried it yet; plus
* events that never reached the log because an intake buffer in front of it overflowed
  (sources report those with ``note_dropped``).

Events that were written to the spool before their eviction still exist in the spool
files; failed spool writes are counted separately (``spool_errors``), not as drops. A host
that reads ``/events`` sees its own losses directly: a page whose first ``seq`` is above
``since + 1`` (``Page.missed`` says how many).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError, SpoolError
from probe.events import Event, RawEvent, parse_event

Listener = Callable[[Event], None]

DEFAULT_RING_SIZE = 100_000
DEFAULT_MAX_SPOOL_BYTES = 64 * 2**20
DEFAULT_KEEP_SPOOLS = 4


@dataclass(frozen=True)
class Page:
    """One page of ``/events``: the lines and where the client stands.

    :param lines: the events' JSON lines (no newlines), ``seq`` ascending.
    :param next_since: the ``since`` for the next request: the last ``seq`` in this page,
        or ``last_seq`` when the page is empty.
    :param oldest_seq: the oldest ``seq`` still in the ring (``last_seq + 1`` when empty).
    :param last_seq: the newest ``seq`` assigned so far (0 before the first event).
    :param missed: events after the requested ``since`` that the ring no longer holds.
    """

    lines: tuple[str, ...]
    next_since: int
    oldest_seq: int
    last_seq: int
    missed: int

    def events(self) -> list[Event]:
        """The page's events, parsed back into ``Event`` objects."""
        return [parse_event(line) for line in self.lines]

    def body(self) -> bytes:
        """The page as a JSON Lines body, each line ending in a newline."""
        return "".join(line + "\n" for line in self.lines).encode()


@dataclass(frozen=True)
class LogStats:
    """A consistent snapshot of the log's counters, for /metrics and /healthz."""

    last_seq: int
    oldest_seq: int
    ring_size: int
    ring_used: int
    dropped: int
    spool_path: str | None
    spool_bytes: int
    spool_errors: int
    spool_error: str
    listener_errors: int

    @property
    def spool_ok(self) -> bool:
        """True when the spool is disabled or its last operation succeeded."""
        return not self.spool_error


def _json_default(value: Any) -> str:
    return str(value)


class _Spool:
    """The spool file: appends with ``os.write``, repairs a torn tail, rotates by size."""

    def __init__(self, path: str, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.size = 0
        self._fd: int | None = None
        self._torn = False
        self._open()

    def _open(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.lexists(parent):
            os.makedirs(parent, exist_ok=True)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o644)
        self.size = os.fstat(self._fd).st_size
        self._torn = self.size > 0

    def _repair_tail(self, fd: int) -> None:
        """Close a torn last line with a newline so the next record starts on its own."""
        size = os.fstat(fd).st_size
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            os.write(fd, b"\n")
            size += 1
        self.size = size
        self._torn = False

    def rotate(self) -> None:
        """Shift the rotated files up by one and start a fresh spool file.

        :raise OSError: when a rename or the new file's open fails.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.keep <= 0:
            os.unlink(self.path)
        else:
            for index in range(self.keep - 1, 0, -1):
                older = f"{self.path}.{index}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{index + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open()

    def write(self, data: bytes) -> str:
        """Append one record.

        :param data: the record, ending in a newline.
        :raise SpoolError: when the record could not be written (nothing or part of it).
        :return: an error message when a rotation failed (the record was still written to
            the current file), else an empty string.
        """
        rotation_error = ""
        try:
            if self._fd is None:
                self._open()
            if self.size > 0 and self.size + len(data) > self.max_bytes:
                try:
                    self.rotate()
                except OSError as err:
                    rotation_error = f"rotating {self.path} failed: {err.strerror or err}"
                    if self._fd is None:
                        self._open()
            fd = self._fd
            assert fd is not None
            if self._torn:
                self._repair_tail(fd)
            view = memoryview(data)
            while view:
                try:
                    written = os.write(fd, view)
                except OSError:
                    self._torn = True
                    raise
                self.size += written
                view = view[written:]
        except OSError as err:
            raise SpoolError(f"writing {self.path} failed: {err.strerror or err}") from err
        return rotation_error

    def close(self) -> None:
        """Close the file; later writes reopen it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class EventLog:
    """Numbers events and keeps them in a ring and a spool; thread-safe.

    :param boot_id: the guest's boot id, stamped on every event.
    :param spool_path: the spool file, or None to keep events in memory only.
    :param ring_size: how many of the newest events ``/events`` can serve.
    :param max_spool_bytes: the size at which the spool file is rotated.
    :param keep_spools: rotated files kept (``events.jsonl.1`` ... ``.N``).
    :param warn: called with a one-line message when the spool starts or stops failing
        and when a listener raises for the first time.
    :raise ConfigError: when the spool file cannot be opened for appending, or a size is
        not positive.
    """

    def __init__(
        self,
        boot_id: str,
        spool_path: str | None,
        ring_size: int = DEFAULT_RING_SIZE,
        max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES,
        keep_spools: int = DEFAULT_KEEP_SPOOLS,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if ring_size < 1:
            raise ConfigError(f"the event ring needs at least one slot, got {ring_size}")
        if max_spool_bytes < 1:
            raise ConfigError(f"the spool size limit must be positive, got {max_spool_bytes}")
        self.boot_id = boot_id
        self._ring: list[str | None] = [None] * ring_size
        self._size = ring_size
        self._last_seq = 0
        self._served_upto = 0
        self._dropped = 0
        self._spool_errors = 0
        self._spool_error = ""
        self._listener_errors = 0
        self._listeners: list[Listener] = []
        self._warn = warn
        self._lock = threading.Lock()
        self._spool: _Spool | None = None
        self.spool_path = spool_path
        if spool_path is not None:
            try:
                self._spool = _Spool(spool_path, max_spool_bytes, max(0, keep_spools))
            except OSError as err:
                raise ConfigError(
                    f"cannot write the event spool {spool_path}: {err.strerror or err}"
                    " (choose another --events PATH, or --events none)"
                ) from err

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every event appended from now on.

        Listeners run inside the log's lock, in ``seq`` order; they must be quick and must
        not call back into the log. An exception in a listener is counted and swallowed.

        :param listener: the callable.
        """
        with self._lock:
            self._listeners.append(listener)

    def append(self, raw: RawEvent) -> Event:
        """Number an observation, keep it, spool it and tell the listeners.

        Never raises for spool or listener failures (they are counted in ``stats()``).

        :param raw: what a probe observed.
        :return: the numbered event.
        """
        with self._lock:
            seq = self._last_seq + 1
            event = Event.from_raw(raw, seq, self.boot_id)
            line = json.dumps(event.to_dict(), separators=(",", ":"), default=_json_default)
            slot = (seq - 1) % self._size
            evicted = seq - self._size
            if evicted > self._served_upto:
                self._dropped += 1
            self._ring[slot] = line
            self._last_seq = seq
            if self._spool is not None:
                self._write_spool(line)
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception as err:
                    self._listener_errors += 1
                    if self._listener_errors == 1 and self._warn is not None:
                        self._warn(f"an event listener failed: {err!r} (counted, not fatal)")
            return event

    def _write_spool(self, line: str) -> None:
        assert self._spool is not None
        try:
            rotation_error = self._spool.write((line + "\n").encode())
        except SpoolError as err:
            self._spool_errors += 1
            if not self._spool_error and self._warn is not None:
                self._warn(f"event spool: {err}; events are kept in memory only until it works")
            self._spool_error = str(err)
            return
        if rotation_error:
            self._spool_errors += 1
            if self._warn is not None:
                self._warn(f"event spool: {rotation_error}")
            self._spool_error = rotation_error
            return
        if self._spool_error and self._warn is not None:
            self._warn(f"event spool: writing {self._spool.path} works again")
        self._spool_error = ""

    def note_dropped(self, count: int = 1) -> None:
        """Count events lost before they reached the log (an intake buffer overflowed).

        :param count: how many were lost.
        """
        with self._lock:
            self._dropped += max(0, count)

    def _oldest(self) -> int:
        if self._last_seq == 0:
            return 1
        return max(1, self._last_seq - self._size + 1)

    def since(self, seq: int, limit: int) -> Page:
        """The events after ``seq``, at most ``limit`` of them, oldest first.

        A client that fell behind gets the oldest events still held; ``Page.missed`` says how
        many it lost. Handing out a page marks its events as fetched (see the module
        docstring for what counts as dropped).

        :param seq: the last ``seq`` the client has (0 for everything).
        :param limit: the page size, at least 1.
        :raise ValueError: when ``seq`` is negative or ``limit`` is below 1.
        :return: the page.
        """
        if seq < 0:
            raise ValueError(f"since must be >= 0, got {seq}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        with self._lock:
            last = self._last_seq
            oldest = self._oldest()
            start = max(seq + 1, oldest)
            end = min(last, start + limit - 1)
            lines: list[str] = []
            for current in range(start, end + 1):
                line = self._ring[(current - 1) % self._size]
                assert line is not None
                lines.append(line)
            missed = max(0, min(oldest, last + 1) - (seq + 1))
            if lines:
                self._served_upto = max(self._served_upto, end)
                next_since = end
            else:
                next_since = last
            return Page(tuple(lines), next_since, oldest, last, missed)

    def stats(self) -> LogStats:
        """A consistent snapshot of the counters.

        :return: the snapshot.
        """
        with self._lock:
            oldest = self._oldest()
            return LogStats(
                last_seq=self._last_seq,
                oldest_seq=oldest,
                ring_size=self._size,
                ring_used=self._last_seq - oldest + 1,
                dropped=self._dropped,
                spool_path=self.spool_path,
                spool_bytes=self._spool.size if self._spool is not None else 0,
                spool_errors=self._spool_errors,
                spool_error=self._spool_error,
                listener_errors=self._listener_errors,
            )

    def close(self) -> None:
        """Close the spool. Later appends still number events and keep them in the ring."""
        with self._lock:
            if self._spool is not None:
                self._spool.close()
                self._spool = None
