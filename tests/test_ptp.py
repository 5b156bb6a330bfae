"""ptp_kvm: request building and answer decoding on literal bytes, discovery on fixtures."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from probe.errors import ParseError, ProbeUnavailable
from probe.ptp import (
    NO_DEVICE,
    PRECISE_SIZE,
    PTP_SYS_OFFSET,
    PTP_SYS_OFFSET_PRECISE,
    SYS_OFFSET_SIZE,
    PtpReader,
    build_precise_request,
    build_sys_offset_request,
    decode_precise,
    decode_sys_offset,
    find_kvm_ptp,
)
from probe.roots import Roots

FIXTURES = Path(__file__).parent / "fixtures"
little_endian = pytest.mark.skipif(sys.byteorder != "little", reason="literal bytes are LE")


def clock_time(ns: int) -> bytes:
    """A struct ptp_clock_time: s64 sec, u32 nsec, u32 reserved (little-endian)."""
    return struct.pack("<qII", ns // 1_000_000_000, ns % 1_000_000_000, 0)


def sys_offset_answer(stamps: list[int], n_samples: int | None = None) -> bytes:
    n = (len(stamps) - 1) // 2 if n_samples is None else n_samples
    body = struct.pack("<4I", n, 0, 0, 0) + b"".join(clock_time(t) for t in stamps)
    return body + bytes(SYS_OFFSET_SIZE - len(body))


def test_ioctl_numbers_and_sizes_match_linux_ptp_clock_h() -> None:
    assert PTP_SYS_OFFSET == 0x43403D05
    assert PTP_SYS_OFFSET_PRECISE == 0xC0403D08
    assert SYS_OFFSET_SIZE == 832
    assert PRECISE_SIZE == 64


@little_endian
def test_sys_offset_request_bytes() -> None:
    buf = build_sys_offset_request(3)
    assert len(buf) == 832
    assert bytes(buf[:16]) == b"\x03\x00\x00\x00" + bytes(12)
    assert not any(buf[16:])
    assert build_precise_request() == bytearray(64)


@pytest.mark.parametrize("n", [0, 26, -1])
def test_sys_offset_request_rejects_bad_sample_counts(n: int) -> None:
    with pytest.raises(ValueError):
        build_sys_offset_request(n)


@little_endian
def test_precise_answer_from_literal_bytes() -> None:
    # device (host realtime) 1700000000.500000000, sys_realtime 1700000000.400000000,
    # sys_monoraw 12.000000001, reserved: the guest is 100 ms behind the host.
    raw = bytes.fromhex(
        "00f1536500000000"
        "0065cd1d"
        "00000000"
        "00f1536500000000"
        "0084d717"
        "00000000"
        "0c00000000000000"
        "01000000"
        "00000000"
        "00000000000000000000000000000000"
    )
    result = decode_precise(raw)
    assert result.host_ns == 1_700_000_000_500_000_000
    assert result.guest_ns == 1_700_000_000_400_000_000
    assert result.offset_ns == -100_000_000
    assert result.error_ns == 0
    assert result.method == "precise"


@little_endian
def test_sys_offset_keeps_the_sample_with_the_shortest_bracket() -> None:
    base = 1_700_000_000_000_000_000
    host_behind = 2_500_000  # guest ahead of the host by 2.5 ms
    stamps = [
        base,  # sys
        base + 5_000 - host_behind,  # phc, bracket 10 us
        base + 10_000,  # sys
        base + 11_000 - host_behind,  # phc, bracket 2 us (the best)
        base + 12_000,  # sys
        base + 15_000 - host_behind + 700,  # phc, bracket 6 us, off by 700 ns
        base + 18_000,  # sys
    ]
    result = decode_sys_offset(sys_offset_answer(stamps))
    assert result.method == "sys_offset"
    assert result.offset_ns == host_behind
    assert result.error_ns == 1_000
    assert result.guest_ns == base + 11_000
    assert result.host_ns == base + 11_000 - host_behind


@little_endian
def test_sys_offset_error_bound_rounds_up() -> None:
    stamps = [1_000_000_000, 1_000_000_001, 1_000_000_003]
    result = decode_sys_offset(sys_offset_answer(stamps))
    assert result.error_ns == 2  # bracket 3 ns
    assert result.offset_ns == 0


@little_endian
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (bytes(100), "needs 832 bytes"),
        (sys_offset_answer([0], n_samples=0), "n_samples 0"),
        (sys_offset_answer([0, 1, 2], n_samples=26), "n_samples 26"),
        (sys_offset_answer([2_000, 1_500, 1_000]), "runs backwards"),
        (
            struct.pack("<4I", 1, 0, 0, 0) + struct.pack("<qII", 1, 1_000_000_000, 0) + bytes(800),
            "nsec",
        ),
    ],
)
def test_malformed_sys_offset_answers(raw: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        decode_sys_offset(raw)


def test_short_precise_answer() -> None:
    with pytest.raises(ParseError):
        decode_precise(bytes(63))


def test_discovery_picks_the_kvm_clock_among_others(tmp_path: Path) -> None:
    device = find_kvm_ptp(Roots(sys=str(FIXTURES / "sys-kvm"), dev=str(tmp_path)))
    assert device is not None
    assert device.name == "ptp1"  # ptp0 is a NIC's clock
    assert device.clock_name == "KVM virtual PTP"
    assert device.dev_path == str(tmp_path / "ptp1")


def test_no_device_at_all(tmp_path: Path) -> None:
    assert find_kvm_ptp(Roots(sys=str(FIXTURES / "sys-tsc"))) is None
    assert find_kvm_ptp(Roots(sys=str(tmp_path / "missing"))) is None
    with pytest.raises(ProbeUnavailable, match=f"^{NO_DEVICE}$"):
        PtpReader.open(Roots(sys=str(FIXTURES / "sys-tsc"), dev=str(tmp_path)))


def test_device_in_sysfs_without_a_dev_node(tmp_path: Path) -> None:
    roots = Roots(sys=str(FIXTURES / "sys-kvm"), dev=str(tmp_path))
    with pytest.raises(ProbeUnavailable) as info:
        PtpReader.open(roots)
    message = str(info.value)
    assert "ptp1" in message and "cannot be opened" in message
    assert "No such file" in message and "\n" not in message


def test_dev_node_that_is_not_a_ptp_clock_falls_back_then_fails(tmp_path: Path) -> None:
    (tmp_path / "ptp1").write_bytes(b"")  # opens, but every ioctl fails with ENOTTY
    reader = PtpReader.open(Roots(sys=str(FIXTURES / "sys-kvm"), dev=str(tmp_path)))
    try:
        assert reader.method == "precise"
        with pytest.raises(ProbeUnavailable, match="PTP_SYS_OFFSET failed"):
            reader.read()
        assert reader.method == "sys_offset"  # precise was unsupported: not tried again
    finally:
        reader.close()
    with pytest.raises(ProbeUnavailable, match="closed"):
        reader.read()


def test_this_machine() -> None:
    device = find_kvm_ptp()
    if device is None:
        with pytest.raises(ProbeUnavailable, match=NO_DEVICE):
            PtpReader.open()
        return
    reader = PtpReader.open()
    try:
        result = reader.read()
    finally:
        reader.close()
    assert abs(result.offset_ns) < 3600 * 1_000_000_000
    assert result.error_ns >= 0
