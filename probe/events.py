"""The event model shared by the guest agent and the host-side analysis.

An event is one JSON object on one line (JSON Lines). Every event carries:

``v``            schema version (``SCHEMA_VERSION``); readers accept newer minor additions
``seq``          strictly increasing per agent start (the agent assigns it)
``boot_id``      the guest kernel's boot id (/proc/sys/kernel/random/boot_id)
``kind``         what happened: ``stall``, ``clock_step``, ``timeout``, ...
``mono_ns``      guest CLOCK_MONOTONIC at the event's start
``real_ns``      guest CLOCK_REALTIME at the event's start
``duration_ns``  how long it lasted, for events that have a length

and any number of kind-specific fields (``cpu``, ``cause``, ``clock``, ...). Readers keep
unknown kinds and unknown fields (forward compatibility) and report malformed lines by file
and line number instead of failing. docs/events.md documents each kind.

Probes produce ``RawEvent`` (no ``seq``/``boot_id`` yet); the agent's event log completes
them into ``Event`` objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from probe.errors import EventFormatError

SCHEMA_VERSION = 1

#: Kinds this version writes. Readers must accept others too.
KNOWN_KINDS = frozenset(
    {
        "agent_start",
        "agent_stop",
        "stall",
        "sampler_outage",
        "clock_step",
        "clocksource_change",
        "clock_sync",
        "timeout",
        "canary_outage",
        "app_timeout",
        "kernel_warning",
        "probe_status",
    }
)

#: Cause hints a ``stall`` event can carry (see probe.stall).
STALL_CAUSES = ("guest-sched", "host-preempt", "vcpu-blocked", "unknown")

_BASE_FIELDS = ("v", "seq", "boot_id", "kind", "mono_ns", "real_ns", "duration_ns")


@dataclass(frozen=True)
class RawEvent:
    """What a probe observed, before the agent numbers it.

    :param kind: the event kind, e.g. ``stall``.
    :param mono_ns: guest CLOCK_MONOTONIC at the event's start.
    :param real_ns: guest CLOCK_REALTIME at the event's start.
    :param duration_ns: the event's length, or None when it has none.
    :param fields: kind-specific fields (JSON-serialisable values).
    """

    kind: str
    mono_ns: int
    real_ns: int
    duration_ns: int | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    """One numbered event as written to the event log and served over HTTP."""

    seq: int
    boot_id: str
    kind: str
    mono_ns: int
    real_ns: int
    duration_ns: int | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    v: int = SCHEMA_VERSION

    @classmethod
    def from_raw(cls, raw: RawEvent, seq: int, boot_id: str) -> Event:
        """Number a probe's observation.

        :param raw: the observation.
        :param seq: its sequence number.
        :param boot_id: the guest's boot id.
        :return: the complete event.
        """
        return cls(seq, boot_id, raw.kind, raw.mono_ns, raw.real_ns, raw.duration_ns, raw.fields)

    def to_dict(self) -> dict[str, Any]:
        """The event as the JSON object of the event log (base fields first)."""
        out: dict[str, Any] = {
            "v": self.v,
            "seq": self.seq,
            "boot_id": self.boot_id,
            "kind": self.kind,
            "mono_ns": self.mono_ns,
            "real_ns": self.real_ns,
        }
        if self.duration_ns is not None:
            out["duration_ns"] = self.duration_ns
        for key, value in self.fields.items():
            if key not in out:
                out[key] = value
        return out

    def to_json(self) -> str:
        """One line of JSON, without the newline."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def get(self, name: str, default: Any = None) -> Any:
        """A kind-specific field, or ``default``."""
        return self.fields.get(name, default)


def _int_field(obj: Mapping[str, Any], name: str, optional: bool = False) -> int | None:
    value = obj.get(name)
    if value is None:
        if optional:
            return None
        raise EventFormatError(f"missing field {name!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventFormatError(f"field {name!r} must be an integer, got {value!r}")
    return value


def event_from_dict(obj: Any) -> Event:
    """Check an untrusted decoded JSON value and build an ``Event`` from it.

    :param obj: the decoded line.
    :raise EventFormatError: when a required field is missing or has the wrong type.
    :return: the event; unknown fields are kept in ``fields``.
    """
    if not isinstance(obj, dict):
        raise EventFormatError(f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise EventFormatError("missing or empty field 'kind'")
    boot_id = obj.get("boot_id")
    if not isinstance(boot_id, str):
        raise EventFormatError("missing field 'boot_id'")
    v = _int_field(obj, "v")
    seq = _int_field(obj, "seq")
    mono = _int_field(obj, "mono_ns")
    real = _int_field(obj, "real_ns")
    duration = _int_field(obj, "duration_ns", optional=True)
    assert v is not None and seq is not None and mono is not None and real is not None
    extra = {k: val for k, val in obj.items() if k not in _BASE_FIELDS}
    return Event(seq, boot_id, kind, mono, real, duration, extra, v)


def parse_event(line: str) -> Event:
    """Parse one event-log line.

    :param line: the text of the line (trailing newline allowed).
    :raise EventFormatError: when the line is not JSON or not a valid event.
    :return: the event.
    """
    try:
        obj = json.loads(line)
    except ValueError as err:
        raise EventFormatError(f"not JSON: {err}") from err
    return event_from_dict(obj)


#: What an ``Issue`` is: a line passed over (``skip``), or kept but worth pointing at (``note``).
Severity = Literal["skip", "note"]


@dataclass(frozen=True)
class Issue:
    """A line a reader passed over (``skip``) or worth pointing at (``note``), by file and line.

    The one type of every reader of JSON Lines and transcripts: this module's event reader,
    the host's run-directory readers (``analysis.rundir.jsonl``) and the libvirt transcript
    parser. ``path`` is printable text; line 0 means the file as a whole.
    """

    path: str
    line: int
    reason: str
    severity: Severity = "skip"

    @property
    def line_no(self) -> int:
        """The 1-based line number (0: the file as a whole)."""
        return self.line

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line > 0 else self.path
        return f"{where}: {self.reason}"


#: A line a reader passed over: an ``Issue`` of severity ``skip`` (the readers' name for it).
Skip = Issue


def iter_event_file(
    path: str | Path, on_skip: Callable[[Skip], None] | None = None
) -> Iterator[Event]:
    """Read an event log, yielding valid events and reporting the rest.

    A last line without its newline (a writer that crashed mid-record) is reported as
    truncated; a blank line is ignored.

    :param path: a JSON Lines file.
    :param on_skip: called for each line passed over; when None, skips are silent.
    :raise OSError: when the file cannot be opened.
    :return: an iterator of events in file order.
    """
    name = str(path)
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if not line.endswith("\n"):
                try:
                    event = parse_event(line)
                except EventFormatError:
                    if on_skip is not None:
                        on_skip(Skip(name, line_no, "truncated last line"))
                    continue
                yield event
                continue
            try:
                yield parse_event(line)
            except EventFormatError as err:
                if on_skip is not None:
                    on_skip(Skip(name, line_no, str(err)))
