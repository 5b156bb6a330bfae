"""The kernel's NTP view of CLOCK_REALTIME, read with adjtimex(2) without changing anything.

``adjtimex(&tx)`` with ``tx.modes == 0`` only reads: it fills ``struct timex`` with the state
the kernel's NTP discipline keeps (what ntpd or chronyd last told it) and returns the clock
state (``TIME_OK``, ``TIME_INS`` ... ``TIME_ERROR``). Works unprivileged; root is not needed.

What the fields mean, and their units (linux/timex.h):

``status``    bit flags; ``STA_UNSYNC`` set means nobody disciplines the clock (no NTP
              daemon, or it gave up), so realtime may be off by anything.
              ``STA_NANO`` says ``offset``, ``jitter`` and ``time.tv_usec`` are in ns, not us.
``offset``    the phase offset the PLL is still slewing away (us, or ns under STA_NANO).
``freq``      the frequency correction in "scaled ppm": ppm times 65536.
``maxerror``  the kernel's bound on the clock's error (us); it grows by 500 us/s while no
              daemon refreshes it, and reaching 16 s sets STA_UNSYNC.
``esterror``  the estimated error (us), as last set by the daemon.
``tai``       TAI minus UTC in seconds (0 when no daemon set it).

This module keeps the decoding pure (``decode_timex`` works on the 208 bytes of a 64-bit
``struct timex``, so it is tested on literal bytes) and the system call apart
(``read_adjtimex``). Only 64-bit Linux (x86_64, aarch64, ...) is supported: 32-bit ABIs lay
the structure out differently.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass
from typing import Any

from probe.errors import ParseError, ProbeUnavailable
from probe.libc import libc

#: Clock states returned by adjtimex (linux/timex.h).
TIME_STATES = {
    0: "TIME_OK",
    1: "TIME_INS",
    2: "TIME_DEL",
    3: "TIME_OOP",
    4: "TIME_WAIT",
    5: "TIME_ERROR",
}
TIME_OK = 0
TIME_ERROR = 5

#: Status bits of ``struct timex`` (linux/timex.h), in bit order.
STATUS_FLAGS = (
    (0x0001, "STA_PLL"),
    (0x0002, "STA_PPSFREQ"),
    (0x0004, "STA_PPSTIME"),
    (0x0008, "STA_FLL"),
    (0x0010, "STA_INS"),
    (0x0020, "STA_DEL"),
    (0x0040, "STA_UNSYNC"),
    (0x0080, "STA_FREQHOLD"),
    (0x0100, "STA_PPSSIGNAL"),
    (0x0200, "STA_PPSJITTER"),
    (0x0400, "STA_PPSWANDER"),
    (0x0800, "STA_PPSERROR"),
    (0x1000, "STA_CLOCKERR"),
    (0x2000, "STA_NANO"),
    (0x4000, "STA_MODE"),
    (0x8000, "STA_CLK"),
)
STA_UNSYNC = 0x0040
STA_NANO = 0x2000

#: ``struct timex`` on 64-bit Linux: every ``long`` is 8 bytes, ``int`` fields are padded to 8.
#: modes, offset, freq, maxerror, esterror, status, constant, precision, tolerance,
#: time.tv_sec, time.tv_usec, tick, ppsfreq, jitter, shift, stabil, jitcnt, calcnt, errcnt,
#: stbcnt, tai, then 44 reserved bytes.
_TIMEX = struct.Struct("=I4x qqqq i4x qqq qq qqq i4x qqqqq i44x")
TIMEX_SIZE = _TIMEX.size
assert TIMEX_SIZE == 208

_SCALED_PPM = 65536.0


@dataclass(frozen=True)
class AdjtimexState:
    """One adjtimex(2) reading, in nanoseconds and ppm whatever the kernel's units were.

    :param state: the return value (0 ``TIME_OK`` ... 5 ``TIME_ERROR``).
    :param state_name: its name, or ``TIME_<n>`` for a value this module does not know.
    :param synchronised: ``STA_UNSYNC`` is clear (a daemon disciplines the clock).
    :param offset_ns: the phase offset still being slewed away.
    :param freq_ppm: the frequency correction in ppm.
    :param maxerror_ns: the kernel's maximum error bound.
    :param esterror_ns: the estimated error.
    :param status: the raw status bits.
    :param flags: the names of the status bits that are set.
    :param constant: the PLL time constant.
    :param precision_ns: the clock precision.
    :param tolerance_ppm: the largest frequency correction the kernel accepts.
    :param tick_us: microseconds between clock ticks (10000 at 100 Hz nominal).
    :param tai_s: TAI minus UTC, in seconds.
    :param time_ns: CLOCK_REALTIME when the kernel answered.
    """

    state: int
    state_name: str
    synchronised: bool
    offset_ns: int
    freq_ppm: float
    maxerror_ns: int
    esterror_ns: int
    status: int
    flags: tuple[str, ...]
    constant: int
    precision_ns: int
    tolerance_ppm: float
    tick_us: int
    tai_s: int
    time_ns: int

    def to_fields(self) -> dict[str, Any]:
        """The state as event fields (JSON-serialisable; ``time_ns`` left out).

        :return: a new dict.
        """
        return {
            "state": self.state_name,
            "synchronised": self.synchronised,
            "offset_ns": self.offset_ns,
            "freq_ppm": self.freq_ppm,
            "maxerror_ns": self.maxerror_ns,
            "esterror_ns": self.esterror_ns,
            "status": list(self.flags),
            "tai_s": self.tai_s,
        }


def status_flags(status: int) -> tuple[str, ...]:
    """Name the bits set in a ``struct timex`` status word.

    :param status: the status word.
    :return: the names, lowest bit first; unknown bits appear as ``0x...``.
    """
    names = [name for bit, name in STATUS_FLAGS if status & bit]
    unknown = status & ~0xFFFF
    if unknown:
        names.append(hex(unknown))
    return tuple(names)


def decode_timex(raw: bytes | bytearray, state: int) -> AdjtimexState:
    """Decode a filled 64-bit ``struct timex`` and adjtimex's return value.

    :param raw: the structure's bytes (at least ``TIMEX_SIZE``).
    :param state: what adjtimex returned (the clock state).
    :raise ParseError: when ``raw`` is too short or the state is negative.
    :return: the decoded state in ns and ppm.
    """
    if len(raw) < TIMEX_SIZE:
        raise ParseError(f"struct timex needs {TIMEX_SIZE} bytes, got {len(raw)}")
    if state < 0:
        raise ParseError(f"adjtimex returned {state}, not a clock state")
    (
        _modes,
        offset,
        freq,
        maxerror,
        esterror,
        status,
        constant,
        precision,
        tolerance,
        tv_sec,
        tv_frac,
        tick,
        _ppsfreq,
        _jitter,
        _shift,
        _stabil,
        _jitcnt,
        _calcnt,
        _errcnt,
        _stbcnt,
        tai,
    ) = _TIMEX.unpack_from(raw)
    nano = bool(status & STA_NANO)
    sub_unit = 1 if nano else 1000
    return AdjtimexState(
        state=state,
        state_name=TIME_STATES.get(state, f"TIME_{state}"),
        synchronised=not status & STA_UNSYNC,
        offset_ns=offset * sub_unit,
        freq_ppm=freq / _SCALED_PPM,
        maxerror_ns=maxerror * 1000,
        esterror_ns=esterror * 1000,
        status=status,
        flags=status_flags(status),
        constant=constant,
        precision_ns=precision * 1000,
        tolerance_ppm=tolerance / _SCALED_PPM,
        tick_us=tick,
        tai_s=tai,
        time_ns=tv_sec * 1_000_000_000 + tv_frac * sub_unit,
    )


def read_adjtimex() -> AdjtimexState:
    """Call adjtimex(2) read-only (``modes = 0``) and decode the answer.

    :raise ProbeUnavailable: on a 32-bit ABI or when libc has no adjtimex.
    :raise OSError: when the call fails.
    :return: the kernel's current NTP state.
    """
    if ctypes.sizeof(ctypes.c_long) != 8:
        raise ProbeUnavailable("adjtimex decoding supports 64-bit Linux only")
    try:
        func = libc().adjtimex
    except (OSError, AttributeError) as err:
        raise ProbeUnavailable(f"no adjtimex in libc: {err}") from err
    buf = ctypes.create_string_buffer(TIMEX_SIZE)  # zeroed: modes = 0 reads only
    state = func(buf)
    if state < 0:
        code = ctypes.get_errno() or errno.EIO
        raise OSError(code, f"adjtimex: {os.strerror(code)}")
    return decode_timex(buf.raw, state)
