"""adjtimex(2): the decoder on literal struct timex bytes, and the real read-only call."""

from __future__ import annotations

import json
import struct
import time

import pytest

from probe.adjtimex import (
    STA_NANO,
    STA_UNSYNC,
    TIME_STATES,
    TIMEX_SIZE,
    decode_timex,
    read_adjtimex,
    status_flags,
)
from probe.errors import ParseError

# Field offsets of the 64-bit struct timex, as gcc's offsetof reports them for
# <sys/timex.h> on x86_64. Written out here, apart from the module's struct format, so a
# layout mistake there fails these tests.
OFFSETS = {
    "modes": (0, "i"),
    "offset": (8, "q"),
    "freq": (16, "q"),
    "maxerror": (24, "q"),
    "esterror": (32, "q"),
    "status": (40, "i"),
    "constant": (48, "q"),
    "precision": (56, "q"),
    "tolerance": (64, "q"),
    "tv_sec": (72, "q"),
    "tv_usec": (80, "q"),
    "tick": (88, "q"),
    "jitter": (104, "q"),
    "shift": (112, "i"),
    "tai": (160, "i"),
}


def timex_bytes(**values: int) -> bytes:
    buf = bytearray(208)
    for name, value in values.items():
        offset, fmt = OFFSETS[name]
        struct.pack_into("=" + fmt, buf, offset, value)
    return bytes(buf)


def test_structure_size_matches_the_c_header() -> None:
    assert TIMEX_SIZE == 208


def test_unsynchronised_clock_as_seen_on_a_guest_without_ntp() -> None:
    # What this machine's kernel returns: state TIME_ERROR, STA_UNSYNC, maxerror 16 s.
    raw = timex_bytes(
        status=0x40,
        maxerror=16_000_000,
        esterror=16_000_000,
        constant=2,
        precision=1,
        tolerance=32_768_000,
        tv_sec=1_795_637_000,
        tv_usec=250_000,
        tick=10_000,
    )
    state = decode_timex(raw, 5)
    assert state.state == 5 and state.state_name == "TIME_ERROR"
    assert state.synchronised is False
    assert state.flags == ("STA_UNSYNC",)
    assert state.maxerror_ns == 16_000_000_000
    assert state.esterror_ns == 16_000_000_000
    assert state.precision_ns == 1_000
    assert state.tolerance_ppm == 500.0
    assert state.tick_us == 10_000
    assert state.offset_ns == 0 and state.freq_ppm == 0.0
    assert state.time_ns == 1_795_637_000_250_000_000  # tv_usec is microseconds here


def test_synchronised_clock_in_nanosecond_mode() -> None:
    raw = timex_bytes(
        status=0x2001,  # STA_PLL | STA_NANO
        offset=-1_234,
        freq=-819_200,  # -12.5 ppm, scaled by 65536
        maxerror=1_500,
        esterror=40,
        tv_sec=1_700_000_000,
        tv_usec=123_456_789,
        tai=37,
    )
    state = decode_timex(raw, 0)
    assert state.state_name == "TIME_OK"
    assert state.synchronised is True
    assert state.flags == ("STA_PLL", "STA_NANO")
    assert state.offset_ns == -1_234  # STA_NANO: already nanoseconds
    assert state.freq_ppm == -12.5
    assert state.maxerror_ns == 1_500_000
    assert state.esterror_ns == 40_000
    assert state.tai_s == 37
    assert state.time_ns == 1_700_000_000_123_456_789


def test_microsecond_mode_scales_the_offset() -> None:
    state = decode_timex(timex_bytes(status=0x0001, offset=250), 0)
    assert state.offset_ns == 250_000


def test_leap_second_state_and_unknown_states_are_named() -> None:
    assert decode_timex(timex_bytes(status=0x11), 1).state_name == "TIME_INS"
    assert decode_timex(timex_bytes(), 9).state_name == "TIME_9"


def test_status_flags_names_unknown_bits() -> None:
    assert status_flags(0) == ()
    assert status_flags(STA_UNSYNC | STA_NANO) == ("STA_UNSYNC", "STA_NANO")
    assert status_flags(0x10000 | 0x1) == ("STA_PLL", "0x10000")


@pytest.mark.parametrize(("raw", "state"), [(bytes(207), 0), (bytes(208), -1)])
def test_bad_input_is_a_parse_error(raw: bytes, state: int) -> None:
    with pytest.raises(ParseError):
        decode_timex(raw, state)


def test_event_fields_are_json() -> None:
    fields = decode_timex(timex_bytes(status=0x40, maxerror=5), 5).to_fields()
    assert json.loads(json.dumps(fields)) == fields
    assert fields["state"] == "TIME_ERROR" and fields["status"] == ["STA_UNSYNC"]


def test_real_call_against_the_system_clock() -> None:
    before = time.time_ns()
    state = read_adjtimex()
    after = time.time_ns()
    assert state.state in TIME_STATES
    assert state.synchronised == (not state.status & STA_UNSYNC)
    # The kernel stamps the reading with CLOCK_REALTIME: a cross-check of the layout.
    assert before - 1_000_000 <= state.time_ns <= after + 1_000_000
    assert state.tolerance_ppm == 500.0  # MAXFREQ, fixed in the kernel
    assert 1_000 <= state.tick_us <= 20_000
    assert state.maxerror_ns >= 0 and state.esterror_ns >= 0
