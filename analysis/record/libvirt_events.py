"""Read ``virsh qemu-monitor-event`` output into the run directory's QMP record layout.

libvirt owns a libvirt guest's QMP monitor. Besides giving the recorder a monitor of its
own (``<qemu:commandline>``), its event stream can be read from::

    virsh qemu-monitor-event --domain NAME --loop --timestamp

virsh prints one line per QMP event (tools/virsh-domain.c, ``virshEventQemuPrint``)::

    2024-01-01 12:00:00.123+0000: event MIGRATION for domain 'vm1': {"status":"active"}

and, without ``--timestamp``::

    event MIGRATION at 1704110400.123456 for domain 'vm1': {"status":"active"}

Facts this parser relies on:

- With ``--timestamp`` the time is virsh's own clock when it printed the event (UTC,
  ``%Y-%m-%d %H:%M:%S.mmm+0000``, milliseconds) and QEMU's timestamp is omitted (the
  virsh manual says so). Without it, ``at SECONDS.MICROS`` is QEMU's own timestamp.
  Either way the record's ``timestamp`` is derived from the printed time, its
  ``host_real_ns`` is that time, and ``time_source`` says which clock it came from
  (``virsh`` or ``qemu``).
- The details are the event's ``data`` member as JSON, or ``(null)`` for an event
  without data (STOP, RESUME; libvirt 9.0's virsh prints ``<null>``). ``--pretty``
  spreads the JSON over several lines; those are joined until the JSON is complete.
- Older libvirt prints the domain name bare, newer quotes it (``'vm1'``); both parse.
- virsh's own lines (``event loop interrupted``, ``event loop timed out``, ``events
  received: N``) and blank lines are ignored, not counted as malformed.

A line that is none of these is skipped and reported with its line number (``Skip``);
the reader also writes a ``note`` record for it. The parser is pure (``LibvirtParser``,
``parse_transcript``); ``LibvirtEventReader`` follows a file (like ``tail -f``) or stdin.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from analysis.rundir import JsonlWriter, host_now
from probe.events import Skip

#: Longest ``--pretty`` JSON block joined before giving up on it.
MAX_PRETTY_LINES = 500

_DOMAIN = r"(?:'(?P<qdom>.*?)'|(?P<dom>\S+))"
_WITH_TIMESTAMP = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2}) (?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d{1,9}))?"
    r"(?P<tz>[+-]\d{4}|Z)?: event (?P<event>\S+) for domain " + _DOMAIN + r": (?P<details>.*)$",
    re.ASCII,
)
_WITH_QEMU_TIME = re.compile(
    r"^event (?P<event>\S+) at (?P<sec>-?\d+)\.(?P<usec>\d{1,6}) for domain "
    + _DOMAIN
    + r": (?P<details>.*)$",
    re.ASCII,
)
_VIRSH_CHATTER = re.compile(
    r"^(event loop interrupted|event loop timed out|events received: \d+)\s*$"
)


class LibvirtFormatError(ValueError):
    """A line that is not ``virsh qemu-monitor-event`` output; the message says why."""


def _time_ns(date: str, clock: str, frac: str | None, tz: str | None) -> int:
    try:
        fields = time.strptime(f"{date} {clock}", "%Y-%m-%d %H:%M:%S")
    except ValueError as err:
        raise LibvirtFormatError(f"bad timestamp {date} {clock}: {err}") from err
    seconds = calendar.timegm(fields)
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        seconds -= sign * (int(tz[1:3]) * 3600 + int(tz[3:5]) * 60)
    frac_ns = int((frac or "0").ljust(9, "0")[:9])
    return seconds * 1_000_000_000 + frac_ns


@dataclass
class _Header:
    event: str
    domain: str
    real_ns: int
    time_source: str
    line_no: int
    details: list[str] = field(default_factory=list)


def _parse_header(line: str, line_no: int) -> _Header | None:
    """Parse an event line's fixed part; None when the line is not one."""
    match = _WITH_TIMESTAMP.match(line)
    if match is not None:
        real_ns = _time_ns(match["date"], match["time"], match["frac"], match["tz"])
        source = "virsh"
    else:
        match = _WITH_QEMU_TIME.match(line)
        if match is None:
            return None
        if len(match["sec"]) > 12:
            raise LibvirtFormatError(f"QEMU time {match['sec'][:20]!r}... out of range")
        real_ns = int(match["sec"]) * 1_000_000_000 + int(match["usec"].ljust(6, "0")) * 1000
        source = "qemu"
    if not 0 <= real_ns < 1 << 63:
        raise LibvirtFormatError(f"time {real_ns // 1_000_000_000} s is not in 1970-2262")
    domain = match["qdom"] if match["qdom"] is not None else match["dom"]
    return _Header(match["event"], domain, real_ns, source, line_no, [match["details"]])


class LibvirtParser:
    """Turns virsh lines into event records, one line at a time.

    :param name: the input's name for skip reports (a path or ``<stdin>``).
    :param mono_offset_ns: host (realtime - monotonic); when given, records get a
        ``host_mono_ns`` estimated from their printed time (``host_mono_from_real``).
    """

    def __init__(self, name: str = "<stdin>", mono_offset_ns: int | None = None) -> None:
        self.name = name
        self._mono_offset_ns = mono_offset_ns
        self._pending: _Header | None = None
        self.skips: list[Skip] = []
        self.ignored = 0
        self.domains: dict[str, int] = {}

    def _skip(self, line_no: int, reason: str) -> None:
        self.skips.append(Skip(self.name, line_no, reason))

    def _record(self, header: _Header, data: Any, has_data: bool) -> dict[str, Any]:
        seconds, rest = divmod(header.real_ns, 1_000_000_000)
        record: dict[str, Any] = {"type": "event", "event": header.event}
        if has_data:
            record["data"] = data
        record["timestamp"] = {"seconds": seconds, "microseconds": rest // 1000}
        record["host_real_ns"] = header.real_ns
        if self._mono_offset_ns is not None:
            record["host_mono_ns"] = header.real_ns - self._mono_offset_ns
            record["host_mono_from_real"] = True
        record["source"] = "libvirt"
        record["time_source"] = header.time_source
        record["domain"] = header.domain
        record["line_no"] = header.line_no
        self.domains[header.domain] = self.domains.get(header.domain, 0) + 1
        return record

    def _complete(self, header: _Header) -> dict[str, Any] | None:
        """The record if the header's details are complete JSON (or ``(null)``)."""
        text = "\n".join(header.details).strip()
        if text in ("(null)", "<null>"):
            return self._record(header, None, False)
        try:
            data = json.loads(text)
        except ValueError:
            return None
        return self._record(header, data, True)

    def feed(self, line: str, line_no: int) -> list[dict[str, Any]]:
        """Parse one line.

        :param line: the line with its newline (a line without one is taken to be a
            truncated last line when it does not parse).
        :param line_no: its 1-based number in the input (for skip reports).
        :return: the records completed by this line (zero, one, or two when a pending
            ``--pretty`` block is abandoned).
        """
        truncated = not line.endswith("\n")
        line = line.rstrip("\r\n")
        out: list[dict[str, Any]] = []
        try:
            header = _parse_header(line, line_no)
        except LibvirtFormatError as err:
            self._abandon_pending()
            self._skip(line_no, str(err))
            return out
        if self._pending is not None:
            if header is None and not _VIRSH_CHATTER.match(line):
                pending = self._pending
                pending.details.append(line)
                record = self._complete(pending)
                if record is not None:
                    self._pending = None
                    out.append(record)
                elif len(pending.details) > MAX_PRETTY_LINES:
                    self._pending = None
                    self._skip(pending.line_no, "event details: unterminated JSON")
                return out
            self._abandon_pending()
        if header is None:
            if not line.strip() or _VIRSH_CHATTER.match(line):
                self.ignored += 1
            else:
                self._skip(line_no, f"not a qemu-monitor-event line: {line[:80]!r}")
            return out
        record = self._complete(header)
        if record is not None:
            out.append(record)
        elif header.details[0].lstrip().startswith(("{", "[")):
            self._pending = header  # --pretty: the JSON goes on over the next lines
        else:
            reason = f"event details are not JSON: {header.details[0][:80]!r}"
            self._skip(line_no, reason + (" (truncated last line?)" if truncated else ""))
        return out

    def _abandon_pending(self) -> None:
        if self._pending is not None:
            self._skip(self._pending.line_no, "event details: unterminated JSON")
            self._pending = None

    def finish(self) -> list[dict[str, Any]]:
        """End of input: report a pending, unterminated ``--pretty`` block.

        :return: no records (kept for symmetry with ``feed``).
        """
        if self._pending is not None:
            self._skip(self._pending.line_no, "event details: unterminated JSON at end of input")
            self._pending = None
        return []


@dataclass
class ParseResult:
    """What ``parse_transcript`` found."""

    records: list[dict[str, Any]]
    skips: list[Skip]
    ignored: int
    domains: dict[str, int]


def parse_transcript(
    lines: Iterable[str], name: str = "<transcript>", mono_offset_ns: int | None = None
) -> ParseResult:
    """Parse a whole ``virsh qemu-monitor-event`` transcript.

    :param lines: the lines (e.g. an open file).
    :param name: the input's name for skip reports.
    :param mono_offset_ns: see ``LibvirtParser``.
    :return: records in input order, skipped lines, the count of ignored virsh lines.
    """
    parser = LibvirtParser(name, mono_offset_ns)
    records: list[dict[str, Any]] = []
    for line_no, line in enumerate(lines, start=1):
        records.extend(parser.feed(line, line_no))
    records.extend(parser.finish())
    return ParseResult(records, parser.skips, parser.ignored, parser.domains)


_EOF = object()


class LibvirtEventReader:
    """Follows a virsh transcript (a file, like ``tail -f``, or ``-`` for stdin).

    :param name: the stream's endpoint name (its records go to ``qmp-NAME.jsonl``).
    :param source: a path, or ``-`` for stdin.
    :param writer: where records go.
    :param on_record: called with each event record (the recorder derives statuses).
    :param on_note: called with (name, message) for a skipped line or the end of input.
    :param follow_period_s: how often a file at its end is checked for more.
    """

    def __init__(
        self,
        name: str,
        source: str,
        writer: JsonlWriter,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        on_note: Callable[[str, str], None] | None = None,
        follow_period_s: float = 0.1,
    ) -> None:
        self.name = name
        self.source = source
        self._writer = writer
        self._on_record = on_record
        self._on_note = on_note
        self._follow_s = follow_period_s
        real, mono = host_now()
        self.parser = LibvirtParser("<stdin>" if source == "-" else source, real - mono)
        self.closed_reason: str | None = None
        self._halt = threading.Event()

    def open(self) -> IO[str]:
        """Open the input now (so a missing file is an error at start).

        :raise OSError: when the file cannot be opened.
        :return: the text stream.
        """
        if self.source == "-":
            return sys.stdin
        return open(self.source, encoding="utf-8", errors="replace")

    def _pump(self, fh: IO[str], loop: asyncio.AbstractEventLoop, queue: Any) -> None:
        follow = self.source != "-"
        try:
            while True:
                line = fh.readline()
                if line:
                    loop.call_soon_threadsafe(queue.put_nowait, line)
                    continue
                if not follow or self._halt.is_set():
                    break
                time.sleep(self._follow_s)
        except (OSError, ValueError) as err:
            loop.call_soon_threadsafe(queue.put_nowait, err)
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, _EOF)
            if follow:
                fh.close()

    def _write_skips(self, since: int) -> None:
        for skip in self.parser.skips[since:]:
            self._writer.write_stamped(
                {
                    "type": "note",
                    "note": "skipped-line",
                    "line_no": skip.line_no,
                    "message": skip.reason,
                }
            )
            if self._on_note is not None:
                self._on_note(self.name, f"skipped {skip}")

    def _take(self, line: str, line_no: int) -> None:
        skipped = len(self.parser.skips)
        for record in self.parser.feed(line, line_no):
            self._writer.write(record)
            if self._on_record is not None:
                self._on_record(record)
        self._write_skips(skipped)

    async def run(self, stop: asyncio.Event, fh: IO[str] | None = None) -> None:
        """Read until ``stop`` (a file is then read to its current end) or end of stdin.

        :param stop: set it to end the reading.
        :param fh: the stream from ``open()``; opened here when omitted.
        """
        stream = fh if fh is not None else self.open()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        thread = threading.Thread(
            target=self._pump, args=(stream, loop, queue), name="tsprobe-libvirt", daemon=True
        )
        thread.start()
        line_no = 0
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                if stop.is_set():
                    self._halt.set()  # a file: read what is there, then end
                    if self.source == "-":
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), 5)
                    except TimeoutError:
                        break
                else:
                    getter = asyncio.ensure_future(queue.get())
                    await asyncio.wait({getter, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    item = getter.result()
                if item is _EOF:
                    if self.source == "-":
                        self.closed_reason = "end of input"
                    break
                if isinstance(item, Exception):
                    self.closed_reason = f"read error: {item}"
                    break
                line_no += 1
                self._take(str(item), line_no)
        finally:
            stopping.cancel()
            self._halt.set()
        skipped = len(self.parser.skips)
        self.parser.finish()
        self._write_skips(skipped)
        if self.closed_reason is not None:
            self._writer.write_stamped({"type": "closed", "reason": self.closed_reason})
            if self._on_note is not None:
                self._on_note(self.name, f"closed: {self.closed_reason}")
