"""The one checked way to read a run directory's files: JSON Lines and small JSON documents.

A run directory is untrusted input: it may be cut short by a crash, copied off a guest,
edited by hand, or made hostile. Every reader of its files (the loader, ``tsprobe
timeline``, the report, the lab's outcome and summary) goes through this module, so that
they all see the same records and blame the same lines. The rules:

Opening. A file is looked at with ``stat`` before it is opened and again with ``fstat``
after (``O_NONBLOCK``, so a FIFO never blocks): anything but a regular file (a FIFO, a
directory, a device such as ``/dev/zero``) is not read, and neither is a file larger than
``MAX_FILE_BYTES`` (``MAX_DOC_BYTES`` for a JSON document). That, and a file that cannot
be opened at all (permissions, a symlink loop, a name too long), is one ``Issue`` at line
0, a skip: the rest of the run is still read.

Lines. A JSONL file is read line by line, split at ``\\n`` only; each line is decoded on its
own, so a record split by a stray newline is two bad lines, blamed on their own numbers,
and never re-joined with a neighbour. Blank lines are passed over silently. A line longer
than ``MAX_LINE_BYTES`` is skipped without being held in memory. A file without any
record is noted (``empty: no records``). A line is a skip when:

- it is not valid UTF-8 (the byte and column are named);
- it is not exactly one JSON value (``NaN`` and ``Infinity`` are not JSON; neither is an
  integer with leading zeros); a last line without its newline is a ``truncated last line``;
- it nests deeper than ``MAX_DEPTH`` arrays and objects;
- it holds an integer outside [-2**63, 2**64) (no QMP or agent field is wider), a float
  that is not finite, or a string or key with a lone surrogate (``"\\ud800"``), which no
  UTF-8 output could print;
- it is not a JSON object;
- with ``dedupe`` (files whose every record is stamped with the host's clocks: QMP records,
  clock samples, the lab's steps, the recorder's agent notes), it repeats an earlier line
  byte for byte: a record stamped twice with the same nanoseconds is a copy.

What a record then means is checked by the model of its kind
(``analysis.rundir.guest_events`` for guest events, ``analysis.rundir.vcpu_states`` for vCPU
intervals, ``analysis.rundir.qmp`` and ``analysis.analyze.timeline`` for QMP records); this
module only guarantees that what it yields is a ``dict`` of plain, bounded JSON values.

Names. File names in a run directory are bytes; ``printable`` turns a path into text that
any output can carry (undecodable bytes as ``\\xff``), used wherever a name is printed,
written into a report, or drawn on a plot.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from probe.events import Issue as Issue  # the one Issue type, re-exported for the host readers
from probe.events import Severity as Severity

#: Longest line read (longer lines are skipped unread).
MAX_LINE_BYTES = 1 << 20
#: Largest JSONL file read.
MAX_FILE_BYTES = 16 << 30
#: Largest JSON document read whole (meta.json, lab-outcome.json, ...).
MAX_DOC_BYTES = 64 << 20
#: Deepest nesting of arrays and objects in one record.
MAX_DEPTH = 64
#: Integers a record may hold: int64 and uint64 both fit (QMP sends uint64 counters).
INT_MIN = -(1 << 63)
INT_MAX = (1 << 64) - 1
#: Largest nanosecond value (time fields are int64).
MAX_NS = (1 << 63) - 1


def printable(path: str | os.PathLike[str] | bytes) -> str:
    """A path as text any output can carry: bytes that are not UTF-8 become ``\\xNN``.

    :param path: a path (a ``str`` from ``os.listdir`` may hold surrogate escapes).
    :return: the text.
    """
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")


def safe_text(text: str) -> str:
    """``text`` with any lone surrogate (from a file name) replaced by ``\\uXXXX``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def open_regular(path: Path, limit: int) -> BinaryIO | str:
    """Open a regular file for reading without blocking on FIFOs or devices.

    :param path: the file.
    :param limit: the largest size accepted.
    :return: the open file (binary, buffered), or why it is not read (one line).
    """
    try:
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            return f"{_kind(before.st_mode)}, not a regular file: not read"
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            return "file name too long: not read"
        return f"cannot read: {err.strerror or err}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return f"{_kind(st.st_mode)}, not a regular file: not read"
        if st.st_size > limit:
            os.close(fd)
            return f"{_size(st.st_size)}, larger than the {_size(limit)} read: not read"
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except OSError as err:
        os.close(fd)
        return f"cannot read: {err.strerror or err}"


# --------------------------------------------------------------------------- one line


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check(value: Any, depth: int) -> str | None:
    """Why a decoded value is out of bounds (see the module docstring), or None."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "a string with a lone surrogate (not printable UTF-8)"
        return None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            return f"an integer of {len(str(abs(value)))} digits, outside [-2**63, 2**64)"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "a number too large for a float"
    if depth >= MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH}"
    if isinstance(value, dict):
        for key, item in value.items():
            why = _check(key, depth + 1) or _check(item, depth + 1)
            if why:
                return why
        return None
    if isinstance(value, list):
        for item in value:
            why = _check(item, depth + 1)
            if why:
                return why
    return None


def decode_line(raw: bytes) -> dict[str, Any] | str:
    """Decode one line (without or with its newline) into a checked JSON object.

    :param raw: the line's bytes.
    :return: the object, or the reason the line is skipped (one line, without location).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
    if text.endswith("\n"):
        text = text[:-1]  # so that positions in JSON errors read "line 1 column N"
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        return f"nested deeper than {MAX_DEPTH}"
    except ValueError as err:
        return f"not JSON: {err}"
    why = _check(value, 0)
    if why is not None:
        return why
    if not isinstance(value, dict):
        return f"expected a JSON object, got {type(value).__name__}"
    return value


def decode_record(raw: bytes) -> dict[str, Any] | str:
    """``decode_line`` for a line read from a JSONL file: a last line without its newline
    that is not JSON is a ``truncated last line``."""
    got = decode_line(raw)
    if isinstance(got, str) and not raw.endswith(b"\n") and got.startswith("not JSON"):
        return "truncated last line"
    return got


# --------------------------------------------------------------------------- files


#: Bytes read at once by ``read_chunks``.
CHUNK_BYTES = 4 << 20


def read_chunks(
    path: Path, on_issue: Callable[[Issue], None], limit: int = MAX_FILE_BYTES
) -> Iterator[tuple[int, bytes]]:
    """Yield (number of its first line, block) for a file read in blocks of whole lines.

    Every line of a block ends with its newline, but the file's last line when it has none
    (it was cut short). A line longer than ``MAX_LINE_BYTES`` is never in a block: it is a
    skip (in line order: the blocks before it come first). A file that cannot be read
    (``open_regular``) is one skip at line 0; a file with nothing but blank lines, one note.

    :param path: the file.
    :param on_issue: called with each line or file passed over.
    :param limit: the largest file read.
    """
    name = printable(path)
    fh = open_regular(path, limit)
    if isinstance(fh, str):
        on_issue(Issue(name, 0, fh))
        return
    with fh:
        line_no = 1  # the number of the next line
        text = False
        pending = b""
        while True:
            data = fh.read(CHUNK_BYTES)
            buf = pending + data if pending else data
            cut = len(buf) if not data else buf.rfind(b"\n") + 1
            if not data and not buf:
                break
            if cut == 0 and len(buf) <= MAX_LINE_BYTES:
                pending = buf  # one line still going on
                continue
            if cut == 0:  # a line longer than the limit: skip to its end
                pending = _skip_line(fh)
                on_issue(Issue(name, line_no, f"line longer than {_size(MAX_LINE_BYTES)}"))
                line_no += 1
                continue
            block, pending = buf[:cut], buf[cut:]
            ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            for first, piece in _pieces(block, ends, line_no, name, on_issue):
                text = text or not piece.isspace()
                yield first, piece
            line_no += len(ends) + (0 if block.endswith(b"\n") else 1)
            if not data:
                break
        if not text:
            on_issue(Issue(name, 0, "empty: no records", "note"))


def _skip_line(fh: BinaryIO) -> bytes:
    """Read past the end of the line being read; return what follows it."""
    while True:
        data = fh.read(CHUNK_BYTES)
        if not data:
            return b""
        end = data.find(b"\n")
        if end >= 0:
            return data[end + 1 :]


def _pieces(
    block: bytes,
    ends: npt.NDArray[np.intp],
    first: int,
    name: str,
    on_issue: Callable[[Issue], None],
) -> Iterator[tuple[int, bytes]]:
    """``block`` (its newlines at ``ends``) without its lines longer than
    ``MAX_LINE_BYTES`` (each a skip), as (first line number, piece)."""
    starts = np.concatenate(([0], ends[:-1] + 1)) if len(ends) else np.zeros(0, dtype=np.int64)
    lengths = ends - starts  # without the newline
    tail = len(block) - (int(ends[-1]) + 1 if len(ends) else 0)  # an unterminated last line
    if (not len(lengths) or int(lengths.max()) <= MAX_LINE_BYTES) and tail <= MAX_LINE_BYTES:
        yield first, block
        return
    bounds = [(int(a), int(e) + 1) for a, e in zip(starts, ends, strict=True)]
    if tail:
        bounds.append((len(block) - tail, len(block)))
    start = None  # where the current piece of short lines began (its line number: piece_line)
    piece_line = first
    for k, (a, e) in enumerate(bounds):
        if e - a - (1 if block[e - 1 : e] == b"\n" else 0) > MAX_LINE_BYTES:
            if start is not None:
                yield piece_line, block[start:a]
                start = None
            on_issue(Issue(name, first + k, f"line longer than {_size(MAX_LINE_BYTES)}"))
        elif start is None:
            start, piece_line = a, first + k
    if start is not None:
        yield piece_line, block[start:]


def read_lines(
    path: Path, on_issue: Callable[[Issue], None], limit: int = MAX_FILE_BYTES
) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, bytes) for each non-blank line of a file, newline kept (a last
    line without one was cut short): ``read_chunks``, line by line.

    :param path: the file.
    :param on_issue: called with each line or file passed over.
    :param limit: the largest file read.
    """
    for first, block in read_chunks(path, on_issue, limit):
        lines = block.split(b"\n")
        last = lines.pop()  # b"" after a final newline, else the line cut short
        for k, line in enumerate(lines):
            raw = line + b"\n"
            if not raw.isspace():
                yield first + k, raw
        if last and not last.isspace():
            yield first + len(lines), last


def iter_records(
    path: Path, on_issue: Callable[[Issue], None], dedupe: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for every valid record of a JSONL file.

    :param path: the file.
    :param on_issue: called with each line (or the file) passed over, by line number.
    :param dedupe: skip a line that repeats an earlier one byte for byte (files whose
        records are stamped with the host's clocks).
    :return: the records in file order with their 1-based line numbers.
    """
    name = printable(path)
    seen: dict[bytes, int] = {}
    for line_no, raw in read_lines(path, on_issue):
        got = decode_record(raw)
        if isinstance(got, str):
            on_issue(Issue(name, line_no, got))
            continue
        if dedupe:
            key = raw.rstrip(b"\r\n")
            first = seen.setdefault(key, line_no)
            if first != line_no:
                on_issue(Issue(name, line_no, f"repeats line {first}: left out"))
                continue
        yield line_no, got


def read_document(path: Path, on_issue: Callable[[Issue], None]) -> dict[str, Any] | None:
    """Read a JSON document (meta.json, lab-outcome.json) with the rules of one line.

    :param path: the file.
    :param on_issue: called once when the file is not read or not a valid object.
    :return: the object, or None (reported) when it could not be used.
    """
    name = printable(path)
    fh = open_regular(path, MAX_DOC_BYTES)
    if isinstance(fh, str):
        on_issue(Issue(name, 0, fh))
        return None
    with fh:
        try:
            data = fh.read(MAX_DOC_BYTES + 1)
        except OSError as err:
            on_issue(Issue(name, 0, f"cannot read: {err.strerror or err}"))
            return None
    got = decode_line(data)
    if isinstance(got, str):
        on_issue(Issue(name, 0, got))
        return None
    return got


def read_document_quietly(path: Path) -> dict[str, Any] | None:
    """``read_document`` for optional files whose problems are not worth a word."""
    return read_document(path, lambda _: None) if os.path.lexists(path) else None


def records_quietly(path: Path, dedupe: bool = False) -> list[dict[str, Any]]:
    """Every valid record of an optional JSONL file, problems passed over silently.

    For the lab's own summaries, which read files the lab itself just wrote; the report
    reads the same files through ``iter_records`` and reports each problem.

    :param dedupe: as for ``iter_records`` (files stamped with the host's clocks).
    """
    if not os.path.lexists(path):
        return []
    return [obj for _, obj in iter_records(path, lambda _: None, dedupe)]


def read_text_quietly(path: Path, limit: int = MAX_DOC_BYTES) -> str | None:
    """An optional text file (a serial console, a metrics page) when it is a regular file
    of at most ``limit`` bytes, undecodable bytes replaced; None otherwise."""
    if not os.path.lexists(path):
        return None
    fh = open_regular(path, limit)
    if isinstance(fh, str):
        return None
    with fh:
        try:
            return fh.read(limit).decode("utf-8", "replace")
        except OSError:
            return None
