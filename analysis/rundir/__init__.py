"""The run directory: what ``tsprobe record`` and ``tsprobe lab`` write and analysis reads.

Layout (docs/run-directory.md is the reference)::

    RUNDIR/
      meta.json                 versions, endpoints, command line, scenario, start/end, counts
      qmp-NAME.jsonl            one per QMP endpoint (``--qmp src=...`` -> qmp-src.jsonl)
      guest-events.jsonl        the agent's events verbatim, in seq order
      guest-events-NAME.jsonl   per agent, when there are several
      clock-samples.jsonl       host send/receive times around each /clock read
      agent-NAME.jsonl          the recorder's own notes about an agent (gaps, unreachable)
      arrivals-NAME.jsonl       when each page of an agent's events reached the recorder
      vcpu-states.jsonl         host truth: each vCPU thread's state, as run-length intervals

Every JSONL line is one record; each QMP record has ``type`` (``event``, ``reply``,
``timeout``, ``error``, ``closed``, ``connected``, ``note``), ``host_real_ns`` and
``host_mono_ns``; events add ``event``, ``data`` and QEMU's ``timestamp`` as sent, replies
add ``command`` and ``return``. ``JsonlWriter`` flushes every record, so a crash loses at
most the record being written.

Reading goes through ``analysis.rundir.jsonl`` (its docstring has the rules: regular files only,
line by line, bounded, bad lines reported by file and line number and never raised).
``read_qmp`` is the one reader of the QMP records (``analysis.analyze.timeline_io`` builds
the timeline from them for ``tsprobe timeline``, the loader behind report and compare, and
the Prometheus report), so that they all see the same records. File names are bytes:
``qmp_endpoints`` gives printable endpoint names.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from analysis.errors import RunDirError
from analysis.rundir.jsonl import Issue, iter_records, printable

META = "meta.json"
GUEST_EVENTS = "guest-events.jsonl"
CLOCK_SAMPLES = "clock-samples.jsonl"
VCPU_STATES = "vcpu-states.jsonl"
#: The host states of a vCPU thread (``vcpu-states.jsonl``'s ``state``), see vcpu_threads.
VCPU_STATE_NAMES = ("running", "runnable", "userfault", "lock-wait", "halted", "stopped", "other")


def qmp_file(name: str) -> str:
    """File name of a QMP endpoint's records."""
    return f"qmp-{name}.jsonl"


def guest_events_file(name: str | None) -> str:
    """File name of an agent's events (``None``: the only agent)."""
    return GUEST_EVENTS if name is None else f"guest-events-{name}.jsonl"


def arrivals_file(name: str) -> str:
    """The file of an agent's page arrivals (``analysis.analyze.delivery`` reads it)."""
    return f"arrivals-{name}.jsonl"


def agent_notes_file(name: str) -> str:
    """File name of the recorder's notes about one agent."""
    return f"agent-{name}.jsonl"


def host_now() -> tuple[int, int]:
    """(host CLOCK_REALTIME, host CLOCK_MONOTONIC) in ns, for stamping records."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME), time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class JsonlWriter:
    """Append JSON objects to a file, one per line, flushed per record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to the kernel."""
        self.write_line(json.dumps(record, separators=(",", ":")))

    def write_line(self, line: str) -> None:
        """Append one line verbatim (e.g. a guest event as the agent sent it) and flush it."""
        self._fh.write(line.rstrip("\n") + "\n")
        self._fh.flush()
        self.count += 1

    def write_stamped(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append a record after adding ``host_real_ns`` and ``host_mono_ns`` (now)."""
        real, mono = host_now()
        stamped = {**record, "host_real_ns": real, "host_mono_ns": mono}
        self.write(stamped)
        return stamped

    def close(self) -> None:
        """Flush and close; further writes are an error."""
        if not self._fh.closed:
            self._fh.flush()
            with contextlib.suppress(OSError):
                os.fsync(self._fh.fileno())
            self._fh.close()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write a JSON file through a temporary file and a rename, so readers never see half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644)  # mkstemp makes it 0600; a run directory is for others to read
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def read_jsonl_numbered(
    path: str | Path, on_skip: Callable[[Issue], None] | None = None, dedupe: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each valid record of a JSONL file, reporting bad
    lines (``analysis.rundir.jsonl.iter_records``; a file that cannot be read is one
    ``Issue`` at line 0).

    :param path: the file.
    :param on_skip: called with each line passed over.
    :param dedupe: pass over lines repeating an earlier one byte for byte.
    :return: the objects in file order with their 1-based line numbers.
    """
    yield from iter_records(Path(path), on_skip or (lambda _issue: None), dedupe)


def read_jsonl(
    path: str | Path, on_skip: Callable[[Issue], None] | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file (``read_jsonl_numbered`` without the numbers).

    :param path: the file.
    :param on_skip: called with each line passed over.
    :raise OSError: when the file cannot be opened.
    :return: the objects in file order.
    """
    for _, obj in read_jsonl_numbered(path, on_skip):
        yield obj


def require_rundir(path: str | Path) -> Path:
    """Check that ``path`` is a run directory with at least one file analysis can read.

    :raise RunDirError: when it does not exist, is not a directory or holds nothing known.
    :return: the path.
    """
    run = Path(path)
    name = printable(run)
    if len(name) > 200:
        name = name[:120] + f"...({len(name)} characters)"
    try:
        if not run.exists():
            raise RunDirError(f"{name}: no such run directory")
        if not run.is_dir():
            raise RunDirError(f"{name}: not a directory")
        known = [p for p in run.iterdir() if p.name == META or p.name.endswith(".jsonl")]
    except OSError as err:
        raise RunDirError(f"{name}: cannot read the run directory: {err.strerror or err}") from err
    if not known:
        raise RunDirError(f"{name}: empty run directory (no meta.json and no .jsonl records)")
    return run


def qmp_endpoints(run: Path) -> dict[str, Path]:
    """The QMP record files of a run, keyed by endpoint name (printable text)."""
    return {
        printable(p.name[len("qmp-") : -len(".jsonl")]): p for p in sorted(run.glob("qmp-*.jsonl"))
    }


#: The host stamps every recorder record carries (nanoseconds, int64).
STAMPS = ("host_real_ns", "host_mono_ns")


def stamp_problem(record: dict[str, Any]) -> str | None:
    """Why a record's host stamps are unusable (present but not an integer in
    [0, 2**63)), or None. A record without them is left to its reader to judge."""
    for key in STAMPS:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
            return f"'{key}' {str(value)[:24]!r} not an integer in [0, 2**63)"
    return None


@dataclass
class QmpRecords:
    """The QMP records of a run, per endpoint, with where each came from.

    :param records: the records kept, per endpoint (printable name), in file order.
    :param where: per endpoint, its file (printable) and each kept record's line number.
    """

    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    where: dict[str, tuple[str, list[int]]] = field(default_factory=dict)

    def locate(self, endpoint: str, index: int) -> tuple[str, int]:
        """The file and line of record ``index`` of ``endpoint`` (line 0 when unknown)."""
        file, lines = self.where[endpoint]
        return file, lines[index] if 0 <= index < len(lines) else 0


def read_qmp(run: Path, on_issue: Callable[[Issue], None]) -> QmpRecords:
    """Read every ``qmp-NAME.jsonl`` of a run.

    Records repeating an earlier line byte for byte are duplicates (every record carries
    the recorder's host times) and are skipped, and so are records whose host stamps are
    not int64 nanoseconds (``stamp_problem``).

    :param run: the run directory.
    :param on_issue: called with each line skipped, by file and line.
    :return: the records per endpoint, with their lines (empty without QMP files).
    """
    out = QmpRecords()
    for name, path in qmp_endpoints(run).items():
        got = []
        for line, obj in iter_records(path, on_issue, dedupe=True):
            why = stamp_problem(obj)
            if why is None:
                got.append((line, obj))
            else:
                on_issue(Issue(printable(path), line, why))
        out.records[name] = [obj for _, obj in got]
        out.where[name] = (printable(path), [line for line, _ in got])
    return out
