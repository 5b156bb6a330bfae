"""Kernel watchdog warnings, read from /dev/kmsg as they are logged.

What /dev/kmsg gives (Documentation/ABI/testing/dev-kmsg): every ``read()`` returns exactly
one record of the kernel's log ring, never a partial one::

    6,339,5140900,-;NET: Registered protocol family 10
    7,160,424069,-,caller=T1;pci_root PNP0A03:00: host bridge window [io  0x0000-0x0cf7]
     SUBSYSTEM=acpi
     DEVICE=+acpi:PNP0A03:00

The header before ``;`` is ``prio,seq,usec,flags`` and possibly more comma-separated fields
(``caller=T1`` with CONFIG_PRINTK_CALLER; unknown ones are kept and otherwise ignored).
``prio`` is ``facility << 3 | level``: facility 0 is the kernel itself, and the kernel
never lets userspace write facility 0 (a ``<4>`` written to /dev/kmsg comes back as
facility 1, user), so ``facility`` tells a real kernel warning from an injected one.
``seq`` numbers records with no gaps, ``usec`` is the kernel's timestamp, ``flags`` is
``-`` or ``c`` (a fragment of a line continued in the next record). Non-printable bytes
and ``\\`` in the text are escaped as ``\\xNN``; ``parse_record`` undoes that. Lines that
start with a space carry ``KEY=VALUE`` context (the "dictionary").

The reader (``KmsgProbe``) opens the device non-blocking, seeks to the end (the past is
not what a migration did), and waits in ``poll()`` with a short timeout so that ``stop()``
is prompt. When the ring overwrites records the reader has not read yet, ``read()`` fails
with EPIPE once and then continues at the oldest record still there; the records in
between are lost. The probe counts lost records from the jump in ``seq`` (which also
catches gaps without an EPIPE) and goes on.

Timestamps: the kernel stamps records with ``local_clock()`` (sched_clock), which starts
at boot like CLOCK_MONOTONIC and is used here as CLOCK_MONOTONIC (``mono_ns = usec * 1000``).
They are not the same clock: on the machine this was written on the two differed by about
7 ms, and NTP slewing moves only CLOCK_MONOTONIC. That is far below the seconds that
lockup and stall warnings report. ``real_ns`` adds the current CLOCK_REALTIME minus
CLOCK_MONOTONIC offset, read when the record arrives.

Only root (or CAP_SYSLOG, with ``kernel.dmesg_restrict=1``) may read /dev/kmsg; a missing
or unreadable device is reported by ``health()``, never raised.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from probe.base import Emit, Health, now_pair
from probe.errors import ParseError
from probe.events import RawEvent
from probe.kmsg_patterns import WARNING_KINDS, classify
from probe.roots import DEFAULT_ROOTS, Roots

log = logging.getLogger(__name__)

#: Longest ``text`` kept in an event; the kernel's own limit is about 1 KiB.
TEXT_MAX = 512

#: read() size. The kernel fails a read with EINVAL when the record does not fit, and
#: one record (text up to ~1 KiB, escaped up to 4x, plus its dictionary) is far smaller.
READ_SIZE = 64 * 1024

_ESCAPE = b"\\x"


@dataclass(frozen=True)
class KmsgRecord:
    """One /dev/kmsg record.

    :param facility: syslog facility; 0 is the kernel, anything else was written by userspace.
    :param level: syslog level, 0 (emerg) to 7 (debug).
    :param seq: the record's 64-bit sequence number.
    :param usec: the kernel's timestamp in microseconds (local_clock, see module docstring).
    :param flags: ``-``, or ``c`` for a fragment of a continued line.
    :param text: the message with ``\\xNN`` escapes decoded.
    :param dict: the ``KEY=VALUE`` context lines (SUBSYSTEM, DEVICE, ...).
    :param extra: header fields after ``flags`` that this parser does not interpret.
    """

    facility: int
    level: int
    seq: int
    usec: int
    flags: str
    text: str
    dict: Mapping[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()

    @property
    def mono_ns(self) -> int:
        """The record's timestamp in nanoseconds."""
        return self.usec * 1000

    @property
    def caller(self) -> str | None:
        """The ``caller=`` header field (``T<pid>`` or ``C<cpu>``) when the kernel adds it."""
        for item in self.extra:
            if item.startswith("caller="):
                return item[len("caller=") :]
        return None


def unescape(raw: bytes) -> str:
    """Decode the kernel's ``\\xNN`` escaping of one record's text or value.

    :param raw: the escaped bytes as read from /dev/kmsg.
    :return: the text, UTF-8 decoded with invalid bytes replaced.
    """
    if _ESCAPE not in raw:
        return raw.decode("utf-8", errors="replace")
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        j = raw.find(_ESCAPE, i)
        if j < 0 or j + 4 > n:
            out += raw[i:]
            break
        out += raw[i:j]
        try:
            out.append(int(raw[j + 2 : j + 4], 16))
            i = j + 4
        except ValueError:
            out += _ESCAPE
            i = j + 2
    return out.decode("utf-8", errors="replace")


def _short(raw: bytes | str, limit: int = 60) -> str:
    text = raw if isinstance(raw, str) else raw.decode("ascii", errors="replace")
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _header_int(value: bytes, name: str, header: bytes) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ParseError(f"kmsg record: {name} is not a number in {_short(header)}") from None
    if number < 0:
        raise ParseError(f"kmsg record: negative {name} in {_short(header)}")
    return number


def parse_record(data: bytes | str) -> KmsgRecord:
    """Parse one record as one ``read()`` of /dev/kmsg returns it.

    :param data: ``prio,seq,usec,flags[,...];text\\n`` followed by optional `` KEY=VALUE``
        lines; a ``str`` is encoded as UTF-8 first.
    :raise ParseError: when the header is missing or malformed, or a line after the first
        does not start with a space.
    :return: the record.
    """
    raw = data.encode("utf-8", errors="surrogateescape") if isinstance(data, str) else data
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    first, *rest = raw.split(b"\n")
    header, sep, body = first.partition(b";")
    if not sep:
        raise ParseError(f"kmsg record: no ';' after the header in {_short(first)}")
    parts = header.split(b",")
    if len(parts) < 4:
        raise ParseError(f"kmsg record: header needs prio,seq,usec,flags, got {_short(header)}")
    prio = _header_int(parts[0], "prio", header)
    seq = _header_int(parts[1], "seq", header)
    usec = _header_int(parts[2], "usec", header)
    flags = parts[3].decode("ascii", errors="replace")
    extra = tuple(p.decode("ascii", errors="replace") for p in parts[4:])
    context: dict[str, str] = {}
    for line in rest:
        if not line:
            continue
        if not line.startswith(b" "):
            raise ParseError(
                f"kmsg record {seq}: continuation line does not start with a space: {_short(line)}"
            )
        key, eq, value = line[1:].partition(b"=")
        if eq and key:
            context[key.decode("ascii", errors="replace")] = unescape(value)
    return KmsgRecord(prio >> 3, prio & 7, seq, usec, flags, unescape(body), context, extra)


def iter_records(dump: str) -> Iterator[KmsgRecord]:
    """Parse a saved stream of records (e.g. ``cat /dev/kmsg > file``), one after another.

    :param dump: the concatenated records; a record starts at each line that does not
        start with a space.
    :raise ParseError: at the first malformed record.
    :return: the records in order.
    """
    chunk: list[str] = []
    for line in dump.splitlines():
        if line.startswith(" ") and chunk:
            chunk.append(line)
            continue
        if chunk:
            yield parse_record("\n".join(chunk))
        chunk = [line] if line else []
    if chunk:
        yield parse_record("\n".join(chunk))


def trim_text(text: str, limit: int = TEXT_MAX) -> str:
    """Cut a log line to at most ``limit`` characters, marking the cut with ``...``.

    :param text: the line.
    :param limit: the longest result (at least 4).
    :return: the line, or its start followed by ``...``.
    """
    if len(text) <= limit:
        return text
    return text[: max(limit - 3, 1)] + "..."


# --------------------------------------------------------------------------- I/O


class KmsgSource(Protocol):
    """An open /dev/kmsg: one record per call. The real one is ``DevKmsg``."""

    def read_record(self, timeout_s: float) -> bytes | None:
        """Wait up to ``timeout_s`` for the next record.

        :raise BrokenPipeError: when records were overwritten before they were read.
        :raise OSError: on any other read failure.
        :return: the record's bytes, or None when none arrived in time.
        """

    def close(self) -> None:
        """Release the file descriptor."""


#: Opens a source: (path, from_start) -> source. Raises OSError when it cannot.
Opener = Callable[[str, bool], KmsgSource]


class DevKmsg:
    """The real device: a non-blocking descriptor and ``poll()``."""

    def __init__(self, path: str, from_start: bool = False) -> None:
        """Open ``path`` read-only and non-blocking.

        :param path: usually ``/dev/kmsg``.
        :param from_start: read from the oldest record in the ring instead of from now.
        :raise OSError: when the device is missing (FileNotFoundError), not readable
            (PermissionError) or cannot be positioned.
        """
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.lseek(self._fd, 0, os.SEEK_SET if from_start else os.SEEK_END)
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN)
        except OSError:
            os.close(self._fd)
            raise

    def read_record(self, timeout_s: float) -> bytes | None:
        """Wait up to ``timeout_s`` for the next record.

        :param timeout_s: the longest wait in ``poll()``.
        :raise BrokenPipeError: when the ring overwrote records not yet read (EPIPE); the
            next read continues at the oldest record still there.
        :raise OSError: on any other read failure.
        :return: one whole record, or None when none arrived in time.
        """
        if not self._poll.poll(int(timeout_s * 1000)):
            return None
        try:
            return os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return None

    def close(self) -> None:
        """Close the descriptor; safe to call twice."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open_dev_kmsg(path: str, from_start: bool) -> KmsgSource:
    return DevKmsg(path, from_start)


def _open_error_detail(path: str, err: OSError) -> str:
    if isinstance(err, FileNotFoundError):
        return f"{path}: not found (no kernel log device here)"
    if isinstance(err, PermissionError):
        return (
            f"{path}: permission denied (needs root or CAP_SYSLOG; "
            "kernel.dmesg_restrict may forbid other users)"
        )
    return f"{path}: cannot open: {err.strerror or err}"


class KmsgProbe:
    """Turns kernel watchdog warnings into ``kernel_warning`` events.

    Each record whose text ``probe.kmsg_patterns.classify`` recognises becomes one
    ``RawEvent("kernel_warning", ...)`` with fields ``warning`` (the kind), ``text``
    (trimmed to ``TEXT_MAX``), ``kmsg_seq``, ``level``, ``facility`` and the pattern's
    own fields (``cpu``, ``seconds``, ``task``, ``clocksource``, ...).

    :param roots: where /dev is (``roots.dev_path("kmsg")`` is opened).
    :param from_start: read the whole ring instead of only what is logged after start()
        (for tests and for collecting a guest's history).
    :param opener: how the device is opened; tests inject fakes for faults the real
        device cannot be made to produce (EPIPE, sequence gaps, read errors).
    :param poll_s: the longest wait inside ``read_record``; bounds how long stop() takes.
    """

    name = "kmsg"

    def __init__(
        self,
        roots: Roots = DEFAULT_ROOTS,
        from_start: bool = False,
        *,
        opener: Opener = _open_dev_kmsg,
        poll_s: float = 0.1,
    ) -> None:
        self.path = roots.dev_path("kmsg")
        self._from_start = from_start
        self._opener = opener
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._source: KmsgSource | None = None
        self._health = Health(False, "not started")
        self._counts = dict.fromkeys(WARNING_KINDS, 0)
        self._lost = 0
        self._overruns = 0
        self._records = 0
        self._malformed = 0
        self._last_seq: int | None = None
        self._overrun_pending = False

    # ----------------------------------------------------------------- protocol

    def start(self, emit: Emit) -> None:
        """Open the device and start the reader thread; return at once.

        A missing or unreadable device is not an error here: ``health()`` says why.

        :param emit: called from the reader thread with each ``kernel_warning`` event.
        """
        if self._thread is not None:
            return
        self._stop.clear()
        try:
            source = self._opener(self.path, self._from_start)
        except OSError as err:
            self._set_health(False, _open_error_detail(self.path, err))
            log.debug("kmsg probe: %s", self._health.detail)  # health() says it to the user
            return
        self._source = source
        self._set_health(True, "")
        self._thread = threading.Thread(
            target=self._run, args=(source, emit), name="tsprobe-kmsg", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the reader thread and close the device; safe to call more than once."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=max(2.0, 10 * self._poll_s))
        source, self._source = self._source, None
        if source is not None:
            try:
                source.close()
            except OSError as err:  # pragma: no cover - closing an fd we own
                log.debug("kmsg probe: close failed: %s", err)
        with self._lock:
            if self._health.up:
                self._health = Health(False, "stopped")

    def health(self) -> Mapping[str, Health]:
        """``{"kmsg": Health}``: up while the reader runs, else a one-line reason."""
        with self._lock:
            return {"kmsg": self._health}

    # ----------------------------------------------------------------- counters

    def lost(self) -> int:
        """Records lost to ring overwrites or sequence gaps since the probe was made."""
        with self._lock:
            return self._lost

    def counts(self) -> dict[str, int]:
        """Warnings seen per kind; every kind of ``WARNING_KINDS`` is present, from 0."""
        with self._lock:
            return dict(self._counts)

    def records(self) -> int:
        """Records read, warnings or not (the reader's liveness)."""
        with self._lock:
            return self._records

    def overruns(self) -> int:
        """How many times the device reported overwritten records (EPIPE)."""
        with self._lock:
            return self._overruns

    def malformed(self) -> int:
        """Records that did not parse and were skipped."""
        with self._lock:
            return self._malformed

    # ----------------------------------------------------------------- thread

    def _set_health(self, up: bool, detail: str) -> None:
        with self._lock:
            self._health = Health(up, detail)

    def _run(self, source: KmsgSource, emit: Emit) -> None:
        try:
            while not self._stop.is_set():
                try:
                    raw = source.read_record(self._poll_s)
                except BrokenPipeError:
                    with self._lock:
                        self._overruns += 1
                        self._overrun_pending = True
                    continue
                except OSError as err:
                    if err.errno == errno.EINTR:  # pragma: no cover - retried by Python
                        continue
                    self._set_health(False, f"{self.path}: read failed: {err.strerror or err}")
                    log.error("kmsg probe: %s", self._health.detail)
                    return
                if raw is not None:
                    self._handle(raw, emit)
        except Exception as err:  # the thread must never die with a traceback
            self._set_health(False, f"{self.path}: reader stopped: {type(err).__name__}: {err}")
            log.error("kmsg probe: %s", self._health.detail)
            log.debug("kmsg probe: reader failure", exc_info=True)

    def _handle(self, raw: bytes, emit: Emit) -> None:
        try:
            record = parse_record(raw)
        except ParseError as err:
            with self._lock:
                self._records += 1
                self._malformed += 1
            log.debug("kmsg probe: %s", err)
            return
        match = classify(record.text)
        with self._lock:
            self._records += 1
            self._account_seq(record.seq)
            if match is not None:
                self._counts[match.kind] = self._counts.get(match.kind, 0) + 1
        if match is None:
            return
        fields: dict[str, Any] = {
            "warning": match.kind,
            "text": trim_text(record.text),
            "kmsg_seq": record.seq,
            "level": record.level,
            "facility": record.facility,
        }
        for key, value in match.fields.items():
            fields.setdefault(key, value)
        mono_ns = record.mono_ns
        now_mono, now_real = now_pair()
        real_ns = mono_ns + (now_real - now_mono)
        try:
            emit(RawEvent("kernel_warning", mono_ns, real_ns, None, fields))
        except Exception:
            log.exception("kmsg probe: emit failed for record %d", record.seq)

    def _account_seq(self, seq: int) -> None:
        """Count records skipped between the last one read and ``seq`` (lock held)."""
        last, self._last_seq = self._last_seq, seq
        pending, self._overrun_pending = self._overrun_pending, False
        gap = 0 if last is None or seq <= last else seq - last - 1
        if gap == 0 and pending:
            gap = 1  # overwritten, but how many is unknown: at least one
        self._lost += gap
