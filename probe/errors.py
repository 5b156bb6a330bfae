"""Exceptions of the ``probe`` package.

One root, so callers can catch everything the library raises on purpose::

    ProbeError
     ├── DurationError      a duration string such as "1.5x" that does not parse
     ├── ParseError         a /proc, /sys or /dev record that does not have the expected shape
     ├── EventFormatError   an event-log line that is not a valid event
     ├── LogSpecError       a --watch-log PATH:REGEX[:NAME] that does not parse
 ├── AddressError       a HOST:PORT (--listen, a QMP or agent address) that does not parse
     └── ProbeUnavailable   a probe whose source is missing here (no /dev/kmsg, no ptp_kvm)

Errors keep their cause (``raise ParseError(...) from err``) and their message is one line
fit to print to a user.
"""

from __future__ import annotations


class ProbeError(Exception):
    """Root of every error this package raises on purpose."""


class DurationError(ProbeError, ValueError):
    """A duration string does not parse."""


class ParseError(ProbeError, ValueError):
    """A kernel-provided record does not have the expected shape."""


class EventFormatError(ProbeError, ValueError):
    """A line of an event log is not a valid event."""


class LogSpecError(ProbeError, ValueError):
    """A log-watch specification (``PATH:REGEX[:NAME]``) is malformed or its regex is bad."""


class AddressError(ProbeError, ValueError):
    """A ``HOST:PORT`` address or a port does not parse or is out of range."""


class ProbeUnavailable(ProbeError):
    """The source a probe reads does not exist or cannot be opened here."""
