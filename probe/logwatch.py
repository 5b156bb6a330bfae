"""Application log patterns: follow log files like ``tail -F`` and count the timeouts they report.

Applications say when their own deadlines expire, in their logs: ``context deadline
exceeded`` (Go, gRPC), ``SocketTimeoutException`` (Java), ``election timeout`` (raft),
``Token has not been received`` (corosync). ``--watch-log PATH:REGEX[:NAME]`` (repeatable)
counts every line of PATH that REGEX matches (``re.search``, anywhere in the line) as one
``app_timeout`` event named NAME, and ``tsprobe_app_timeouts_total{name}`` counts them.

The specification: ``PATH:REGEX[:NAME]`` (``parse_log_spec``, pure)
    Regexes contain colons (``(?:...)``, ``ERROR: timeout``, ``\\d+:\\d+``), so the rule is:

    1. PATH is everything before the first colon (a path with a colon in it cannot be
       watched; use a symlink).
    2. NAME is the text after the last colon (an escaped colon, ``\\:``, does not count)
       when that text is a plain name: a letter or ``_`` first, then letters, digits,
       ``_``, ``-`` and spaces (``deadline exceeded``, ``raft-election``). Otherwise there
       is no NAME, and everything after the first colon is the REGEX; NAME is then the
       REGEX itself.
    3. So ``/var/log/app.log:ERROR: deadline`` is the regex ``ERROR: deadline`` (the text
       after the last colon starts with a space: not a name), and
       ``/var/log/app.log:timeout:rpc`` is the regex ``timeout`` named ``rpc``. A regex
       that must end in a colon and a word is written with ``\\:`` (``re`` reads ``\\:``
       as a colon): ``/var/log/app.log:status\\:failed``. A trailing colon with nothing
       after it is an error, as are an empty PATH or REGEX, a REGEX longer than
       ``MAX_PATTERN`` characters and a regex ``re`` rejects (or nested too deep for it).

Following a file (``Follower``, the ``tail -F`` rules)
    - A file that exists at start is read from its end: lines written before the agent
      started are not what a migration did.
    - A file that does not exist yet is waited for (checked every poll, 0.1 s by default),
      and read from its beginning once it appears. The agent says so once at start
      (``notes()``), and ``health()`` is down, naming the path, while it waits.
    - Rotation by rename (logrotate's default, ``create``): when the path names another
      file than the one open, the old file is read to its end first (the writer may have
      written to it after the rename), a last line without a newline counts as a line, and
      the new file is read from its beginning.
    - Truncation (logrotate's ``copytruncate``, ``> file``): when the open file is shorter
      than the offset read so far, or the last bytes read (up to 64, before that offset)
      are no longer what the file holds there, reading starts again at 0. The second check
      catches a truncation followed by more writing than had been read, between two polls
      (``tail`` misses those); only a rewrite that puts the very same bytes there escapes
      it, which log lines with timestamps or counters do not.
    - Lines are cut at newlines; a partial last line waits for its end. A line longer than
      ``MAX_LINE`` bytes is cut there and the rest of it ignored; bytes that are not UTF-8
      are replaced.

Events
    One ``app_timeout`` event per matching line: ``mono_ns``/``real_ns`` when the line was
    read (within a poll of its writing; the line's own timestamp, if it has one, is in
    ``line``), fields ``name``, ``path``, ``line`` (trimmed to 512 characters), ``count``
    (1). A line matched by several specifications counts once for each. A flood is bounded:
    beyond ``max_events_per_s`` events per specification in a second, the further matches
    are counted into one event at the end of that second, whose ``count`` says how many
    lines it stands for and whose ``line`` is the last of them. Counts stay exact.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from probe.base import Emit, Health, emit_each, now_pair
from probe.errors import LogSpecError
from probe.events import RawEvent

#: A NAME after the last colon: a letter or ``_``, then letters, digits, ``_``, ``-``, spaces.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_ -]*")
#: The longest line kept; the rest of a longer line is skipped.
MAX_LINE = 64 * 1024
#: The longest REGEX a specification may hold (a regex nested thousands of groups deep
#: would exhaust re's recursive parser; one this long is not a log pattern).
MAX_PATTERN = 4096
#: Longest ``line`` field of an event.
LINE_MAX = 512
#: Bytes read from one file in one poll at most (a fast writer cannot starve the others).
READ_BUDGET = 4 * 1024 * 1024
_CHUNK = 64 * 1024
#: Bytes before the offset kept to recognise a file rewritten since the last poll.
TAIL_CHECK = 64


@dataclass(frozen=True)
class LogSpec:
    """One ``--watch-log`` specification.

    :param path: the file, as given.
    :param regex: the compiled pattern, searched in each line.
    :param name: the name events and the metric carry.
    :param text: the specification as given.
    """

    path: str
    regex: re.Pattern[str]
    name: str
    text: str


def parse_log_spec(text: str) -> LogSpec:
    """Parse ``PATH:REGEX[:NAME]`` (the rule is in the module docstring).

    :param text: the specification.
    :raise LogSpecError: on a missing part, a trailing colon, a regex longer than
        ``MAX_PATTERN`` or one ``re`` rejects (nested too deep included); the message is
        one line naming the specification.
    :return: the specification.
    """
    path, sep, rest = text.partition(":")
    if not sep:
        raise LogSpecError(f"{text!r}: expected PATH:REGEX[:NAME]")
    if not path:
        raise LogSpecError(f"{text!r}: empty PATH before the first ':'")
    pattern, name = rest, ""
    cut = _last_separator(rest)
    if cut >= 0:
        head, tail = rest[:cut], rest[cut + 1 :]
        if not tail:
            raise LogSpecError(
                f"{text!r}: empty NAME after the last ':' (write '\\:' for a colon at the"
                " end of the regex)"
            )
        if _NAME.fullmatch(tail) and not tail.endswith(" "):
            pattern, name = head, tail
    if not pattern:
        raise LogSpecError(f"{_short(text)!r}: empty REGEX")
    if len(pattern) > MAX_PATTERN:
        raise LogSpecError(
            f"{_short(text)!r}: the REGEX is {len(pattern)} characters, at most {MAX_PATTERN}"
        )
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise LogSpecError(f"{_short(text)!r}: bad regex {_short(pattern)!r}: {err}") from err
    except (RecursionError, OverflowError, MemoryError) as err:
        # re's parser recurses per nested group: a few hundred levels exhaust the stack
        raise LogSpecError(f"{_short(text)!r}: regex too complex ({type(err).__name__})") from None
    return LogSpec(path, regex, name or pattern, text)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def _last_separator(text: str) -> int:
    """The index of the last colon that is not escaped (``\\:``), or -1."""
    index = len(text)
    while True:
        index = text.rfind(":", 0, index)
        if index < 0:
            return -1
        slashes = len(text[:index]) - len(text[:index].rstrip("\\"))
        if slashes % 2 == 0:
            return index


def trim_line(line: str, limit: int = LINE_MAX) -> str:
    """Shorten a line for an event, marking the cut with an ellipsis.

    :param line: the line.
    :param limit: the longest result.
    :return: the line, at most ``limit`` characters.
    """
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass
class Poll:
    """What one ``Follower.poll`` found.

    :param lines: complete lines, in file order (without their newlines).
    :param changes: what happened to the file, e.g. ``appeared``, ``rotated``,
        ``truncated`` (for logs and tests).
    """

    lines: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)


class Follower:
    """Follows one path like ``tail -F`` (the rules are in the module docstring).

    Not thread-safe; one thread calls ``poll`` repeatedly.

    :param path: the file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._offset = 0
        self._partial = b""
        self._tail = b""  # the last bytes read, up to TAIL_CHECK, ending at _offset
        self._skipping = False  # inside an over-long line, until its newline
        self._started = False
        self.error = ""  # why the file is not open, while it is not

    def close(self) -> None:
        """Close the open file, if any."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self._ident = None

    def poll(self) -> Poll:
        """Read what is new: open the file if it appeared, follow a rotation or truncation.

        :return: the complete lines read and what happened to the file.
        """
        result = Poll()
        first = not self._started
        self._started = True
        if self.fd is None:
            # At start an existing file is read from its end; later, from its beginning.
            if not self._open(at_end=first):
                return result
            if not first:
                result.changes.append("appeared")
        self._read(result)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return result  # renamed away, the new one not created yet: keep the old one
        except OSError as err:
            self.error = f"cannot stat {self.path}: {err.strerror}"
            return result
        if (st.st_dev, st.st_ino) != self._ident:
            self._read(result)
            self._end_partial(result)
            self.close()
            result.changes.append("rotated")
            if self._open(at_end=False):
                self._read(result)
        return result

    def _open(self, at_end: bool) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            self.error = f"waiting for {self.path} to appear"
            return False
        except OSError as err:
            self.error = f"cannot open {self.path}: {err.strerror}"
            return False
        st = os.fstat(fd)
        self.fd = fd
        self._ident = (st.st_dev, st.st_ino)
        self._offset = os.lseek(fd, 0, os.SEEK_END) if at_end else 0
        start = max(0, self._offset - TAIL_CHECK)
        self._tail = os.pread(fd, self._offset - start, start) if self._offset else b""
        self._partial = b""
        self._skipping = False
        self.error = ""
        return True

    def _read(self, result: Poll) -> None:
        fd = self.fd
        if fd is None:
            return
        try:
            if self._rewritten(fd):
                self._offset = 0
                self._tail = b""
                self._partial = b""
                self._skipping = False
                result.changes.append("truncated")
            budget = READ_BUDGET
            while budget > 0:
                data = os.pread(fd, _CHUNK, self._offset)
                if not data:
                    break
                self._offset += len(data)
                self._tail = (self._tail + data)[-TAIL_CHECK:]
                budget -= len(data)
                self._take(data, result)
        except OSError as err:
            self.error = f"cannot read {self.path}: {err.strerror}"

    def _rewritten(self, fd: int) -> bool:
        """Whether the file was truncated (and maybe written again) since the last read."""
        if os.fstat(fd).st_size < self._offset:
            return True
        tail = self._tail
        return bool(tail) and os.pread(fd, len(tail), self._offset - len(tail)) != tail

    def _take(self, data: bytes, result: Poll) -> None:
        *complete, rest = (self._partial + data).split(b"\n")
        for raw in complete:
            if self._skipping:
                self._skipping = False  # the end of an over-long line
                continue
            result.lines.append(_decode(raw[:MAX_LINE]))
        if self._skipping:
            self._partial = b""
        elif len(rest) > MAX_LINE:
            result.lines.append(_decode(rest[:MAX_LINE]))
            self._partial = b""
            self._skipping = True
        else:
            self._partial = rest

    def _end_partial(self, result: Poll) -> None:
        if self._partial and not self._skipping:
            result.lines.append(_decode(self._partial))
        self._partial = b""
        self._skipping = False


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r")


class _Budget:
    """One specification's event budget for the current second."""

    __slots__ = ("line", "pending", "used", "window")

    def __init__(self) -> None:
        self.window = 0.0
        self.used = 0
        self.pending = 0  # matches beyond the budget, not yet in an event
        self.line = ""


class LogWatchProbe:
    """Counts matching lines of followed files as ``app_timeout`` events (``name = "logwatch"``).

    :param specs: the specifications; several may name the same file.
    :param poll_s: how often every file is checked.
    :param max_events_per_s: events per specification and second before matches are
        folded into one event per second.
    :raise ValueError: on no specifications or a non-positive poll.
    """

    name = "logwatch"

    def __init__(
        self, specs: Sequence[LogSpec], poll_s: float = 0.1, max_events_per_s: int = 100
    ) -> None:
        if not specs:
            raise ValueError("logwatch: nothing to watch")
        if poll_s <= 0 or max_events_per_s <= 0:
            raise ValueError("logwatch: the poll and the event budget must be positive")
        self.specs = list(specs)
        self.poll_s = poll_s
        self.max_events_per_s = max_events_per_s
        self._paths: dict[str, list[LogSpec]] = {}
        for spec in self.specs:
            self._paths.setdefault(os.path.abspath(spec.path), []).append(spec)
        self._followers = {path: Follower(path) for path in self._paths}
        self._budgets = {id(spec): _Budget() for spec in self.specs}
        self._counts = dict.fromkeys((spec.name for spec in self.specs), 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._notes: list[str] = []
        self._errors: dict[str, str] = {}
        self._emit_error = ""

    def names(self) -> list[str]:
        """The names the specifications count under, in order, without repeats."""
        return list(self._counts)

    # -- the Probe protocol ------------------------------------------------------------

    def start(self, emit: Emit) -> None:
        """Open the files that exist (at their end), note the missing ones, start the thread.

        :param emit: called from the watcher thread with each ``app_timeout`` event.
        """
        if self._thread is not None:
            return
        for path, follower in self._followers.items():
            follower.poll()
            if follower.error:
                self._notes.append(
                    f"{path} does not exist yet; waiting for it to appear"
                    if follower.error.startswith("waiting")
                    else f"{follower.error}; retrying every {self.poll_s:g}s"
                )
            self._errors[path] = follower.error
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(emit,), name="tsprobe-logwatch", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (counting what was read up to then) and close the files."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=max(2.0, 10 * self.poll_s))
        for follower in self._followers.values():
            follower.close()

    def health(self) -> Mapping[str, Health]:
        """``{"logwatch": Health}``: down while a file is missing or unreadable.

        :return: the health; the detail names each file that is not followed and why.
        """
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                return {self.name: Health(False, "not started")}
            problems = [error for error in self._errors.values() if error]
            if self._emit_error:
                problems.append(self._emit_error)
        if problems:
            return {self.name: Health(False, "; ".join(problems))}
        return {self.name: Health(True)}

    def notes(self) -> list[str]:
        """What was wrong at start, one line per file (printed once by the agent)."""
        return list(self._notes)

    def counts(self) -> dict[str, int]:
        """Matching lines so far, per name (every name from 0)."""
        with self._lock:
            return dict(self._counts)

    # -- the thread --------------------------------------------------------------------

    def check(self, emit: Emit) -> None:
        """One round: poll every file, match its new lines, flush folded matches.

        :param emit: where events go.
        """
        events: list[RawEvent] = []
        for path, follower in self._followers.items():
            result = follower.poll()
            with self._lock:
                self._errors[path] = follower.error
            if result.lines:
                self._match(self._paths[path], result.lines, events)
        self._flush(events, force=False)
        self._send(emit, events)

    def _run(self, emit: Emit) -> None:
        while not self._stop.wait(self.poll_s):
            self.check(emit)
        self.check(emit)  # what arrived since the last round
        events: list[RawEvent] = []
        self._flush(events, force=True)
        self._send(emit, events)

    def _match(self, specs: Iterable[LogSpec], lines: list[str], events: list[RawEvent]) -> None:
        now = time.monotonic()
        for line in lines:
            for spec in specs:
                if spec.regex.search(line) is None:
                    continue
                with self._lock:
                    self._counts[spec.name] = self._counts.get(spec.name, 0) + 1
                budget = self._budgets[id(spec)]
                if now - budget.window >= 1.0:
                    if budget.pending:
                        events.append(self._event(spec, budget.line, budget.pending))
                        budget.pending = 0
                    budget.window, budget.used = now, 0
                if budget.used < self.max_events_per_s:
                    budget.used += 1
                    events.append(self._event(spec, line, 1))
                else:
                    budget.pending += 1
                    budget.line = line

    def _flush(self, events: list[RawEvent], force: bool) -> None:
        now = time.monotonic()
        for spec in self.specs:
            budget = self._budgets[id(spec)]
            if budget.pending and (force or now - budget.window >= 1.0):
                events.append(self._event(spec, budget.line, budget.pending))
                budget.pending = 0
                budget.window, budget.used = now, 0

    def _event(self, spec: LogSpec, line: str, count: int) -> RawEvent:
        mono, real = now_pair()
        fields = {
            "name": spec.name,
            "path": os.path.abspath(spec.path),
            "line": trim_line(line),
            "count": count,
        }
        return RawEvent("app_timeout", mono, real, None, fields)

    def _send(self, emit: Emit, events: list[RawEvent]) -> None:
        state = emit_each(emit, events)
        if state is not None:
            with self._lock:
                self._emit_error = state
