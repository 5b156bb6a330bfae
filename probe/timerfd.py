"""A periodic CLOCK_MONOTONIC timer as a file descriptor (Linux ``timerfd``), via ctypes.

Python 3.11 has no ``os.timerfd_create`` (it arrived in 3.13), so this module calls libc's
``timerfd_create(2)`` and ``timerfd_settime(2)`` through ctypes. Everything after the set-up
is plain file I/O: each ``read`` of the descriptor blocks until the timer has expired at
least once and returns the number of expirations since the previous read as an 8-byte
native-endian integer.

Why a timerfd rather than ``time.sleep`` in a loop:

- The deadlines are absolute and lie on a fixed grid (``first + k * interval``), so the
  loop never drifts, whatever it does between reads.
- The expiration count tells, without reading any clock, whether the reader was late:
  a count of 1 means it woke before the next grid point; a count of n > 1 means n - 1 grid
  points passed while it could not run. After a late read the timer simply continues on
  the grid; there is no burst of catch-up wake-ups.

>>> fd, first_ns = periodic_timer(1_000_000)
>>> read_expirations(fd) >= 1
True
>>> os.close(fd)
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

from probe.libc import libc

CLOCK_MONOTONIC = 1
#: ``timerfd_create`` flags (same values as O_CLOEXEC and O_NONBLOCK).
TFD_CLOEXEC = os.O_CLOEXEC
TFD_NONBLOCK = os.O_NONBLOCK
#: ``timerfd_settime`` flags: ``it_value`` is an absolute time on the timer's clock; and
#: (with it, on a CLOCK_REALTIME timer) reads fail with ECANCELED once the clock is set.
TFD_TIMER_ABSTIME = 1
TFD_TIMER_CANCEL_ON_SET = 2

_NS = 1_000_000_000


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _timespec(ns: int) -> _Timespec:
    return _Timespec(ns // _NS, ns % _NS)


def timerfd_create(clock_id: int = CLOCK_MONOTONIC, flags: int = TFD_CLOEXEC) -> int:
    """Create a timer file descriptor (``timerfd_create(2)``).

    :param clock_id: the clock the timer runs on (``CLOCK_MONOTONIC`` by default).
    :param flags: ``TFD_CLOEXEC`` and/or ``TFD_NONBLOCK``.
    :raise OSError: when the kernel refuses.
    :return: the new descriptor, disarmed.
    """
    fd = int(libc().timerfd_create(ctypes.c_int(clock_id), ctypes.c_int(flags)))
    if fd < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"timerfd_create: {os.strerror(errno)}")
    return fd


def timerfd_settime(
    fd: int, value_ns: int, interval_ns: int, absolute: bool = True, cancel_on_set: bool = False
) -> None:
    """Arm (or, with ``value_ns == 0``, disarm) a timer (``timerfd_settime(2)``).

    :param fd: a descriptor from ``timerfd_create``.
    :param value_ns: the first expiration: an absolute time on the timer's clock when
        ``absolute``, else a delay from now.
    :param interval_ns: the period after the first expiration; 0 for a one-shot timer.
    :param absolute: whether ``value_ns`` is absolute (``TFD_TIMER_ABSTIME``).
    :param cancel_on_set: ``TFD_TIMER_CANCEL_ON_SET`` (an absolute CLOCK_REALTIME timer).
    :raise ValueError: on a negative time.
    :raise OSError: when the kernel refuses (a bad descriptor, an invalid time).
    """
    if value_ns < 0 or interval_ns < 0:
        raise ValueError("timerfd_settime: times must not be negative")
    spec = _Itimerspec(_timespec(interval_ns), _timespec(value_ns))
    flags = (TFD_TIMER_ABSTIME if absolute else 0) | (
        TFD_TIMER_CANCEL_ON_SET if cancel_on_set else 0
    )
    if libc().timerfd_settime(ctypes.c_int(fd), ctypes.c_int(flags), ctypes.byref(spec), None):
        errno = ctypes.get_errno()
        raise OSError(errno, f"timerfd_settime: {os.strerror(errno)}")


def periodic_timer(
    interval_ns: int, first_ns: int | None = None, flags: int = TFD_CLOEXEC
) -> tuple[int, int]:
    """Create a CLOCK_MONOTONIC timer that expires every ``interval_ns`` on an absolute grid.

    :param interval_ns: the period, in nanoseconds (positive).
    :param first_ns: the first expiration (CLOCK_MONOTONIC). By default the second multiple
        of ``interval_ns`` after now, so that samplers on several CPUs share one grid.
    :param flags: flags for ``timerfd_create``.
    :raise ValueError: when ``interval_ns`` is not positive.
    :raise OSError: when the kernel refuses.
    :return: ``(fd, first_ns)``; expiration ``k`` (from 0) is at ``first_ns + k * interval_ns``.
    """
    if interval_ns <= 0:
        raise ValueError("periodic_timer: the interval must be positive")
    if first_ns is None:
        first_ns = (time.monotonic_ns() // interval_ns + 2) * interval_ns
    fd = timerfd_create(CLOCK_MONOTONIC, flags)
    try:
        timerfd_settime(fd, first_ns, interval_ns, absolute=True)
    except BaseException:
        os.close(fd)
        raise
    return fd, first_ns


def read_expirations(fd: int) -> int:
    """Block until the timer expires and return how many times it expired since the last read.

    Convenient, but it allocates; a hot loop should ``os.readv`` into a preallocated
    8-byte buffer and compare it with ``(1).to_bytes(8, sys.byteorder)`` instead.

    :param fd: a timer descriptor.
    :raise OSError: on a read error (EAGAIN for a non-blocking timer that has not expired).
    :return: the expiration count (at least 1).
    """
    return int.from_bytes(os.read(fd, 8), sys.byteorder)
