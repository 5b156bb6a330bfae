"""The host's wall clock as the guest can read it: the ptp_kvm "KVM virtual PTP" device.

With the ``ptp_kvm`` module loaded, a KVM guest has a PTP hardware clock (``/dev/ptpN``,
``/sys/class/ptp/ptpN/clock_name`` = ``KVM virtual PTP``) whose time is the *host's*
CLOCK_REALTIME, fetched by a hypercall. Comparing it with the guest's own CLOCK_REALTIME
gives the offset this module reports, always as **guest realtime minus host realtime**
(positive: the guest is ahead). After a kvm-clock guest is stopped and resumed, its
realtime falls behind the host's by about the time it was stopped; this offset shows it.

Two ioctls read the offset (struct layouts from linux/ptp_clock.h):

``PTP_SYS_OFFSET_PRECISE`` (0xc0403d08)
    one cross-timestamp: the device time and the guest realtime *of the same instant*
    (64-byte ``struct ptp_sys_offset_precise``). Error bound zero. ptp_kvm supports it on
    x86 only while the guest's clocksource is kvm-clock; otherwise it fails with
    EOPNOTSUPP and the reader falls back.
``PTP_SYS_OFFSET`` (0x43403d05)
    ``n_samples`` interleaved readings sys, phc, sys, phc, ..., sys (832-byte
    ``struct ptp_sys_offset``, ``ts[2 * 25 + 1]``). Each phc reading sits between two guest
    realtime readings; the sample with the shortest bracket is kept, the guest time taken as
    the bracket's midpoint, and the error bound is half the bracket.

Building requests and decoding answers are pure functions tested on literal bytes;
``find_kvm_ptp`` and ``PtpReader`` do the I/O, through ``probe.roots.Roots``.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import re
import struct
import time

from probe.errors import ParseError, ProbeUnavailable
from probe.roots import DEFAULT_ROOTS, Roots

KVM_PTP_CLOCK_NAME = "KVM virtual PTP"
NO_DEVICE = "no KVM virtual PTP device"

PTP_MAX_SAMPLES = 25
_PTP_CLK_MAGIC = ord("=")

#: ``struct ptp_clock_time``: s64 sec, u32 nsec, u32 reserved.
_CLOCK_TIME = struct.Struct("=qII")
#: ``struct ptp_sys_offset`` header: u32 n_samples, u32 rsv[3].
_SYS_OFFSET_HEAD = struct.Struct("=I3I")
SYS_OFFSET_SIZE = _SYS_OFFSET_HEAD.size + (2 * PTP_MAX_SAMPLES + 1) * _CLOCK_TIME.size
#: ``struct ptp_sys_offset_precise``: device, sys_realtime, sys_monoraw, u32 rsv[4].
PRECISE_SIZE = 3 * _CLOCK_TIME.size + 16


def ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """An ioctl request number as the kernel's ``_IOC`` macro builds it (asm-generic).

    :param direction: 0 none, 1 write (``_IOW``), 2 read (``_IOR``), 3 both (``_IOWR``).
    :param kind: the magic byte.
    :param nr: the command number.
    :param size: the argument's size in bytes.
    :return: the request number.
    """
    return (direction << 30) | (size << 16) | (kind << 8) | nr


PTP_SYS_OFFSET = ioc(1, _PTP_CLK_MAGIC, 5, SYS_OFFSET_SIZE)
PTP_SYS_OFFSET_PRECISE = ioc(3, _PTP_CLK_MAGIC, 8, PRECISE_SIZE)
assert PTP_SYS_OFFSET == 0x43403D05
assert PTP_SYS_OFFSET_PRECISE == 0xC0403D08


@dataclasses.dataclass(frozen=True)
class PtpDevice:
    """A PTP clock found in sysfs.

    :param name: e.g. ``ptp0``.
    :param clock_name: the content of its ``clock_name`` file.
    :param dev_path: where its character device should be (under the dev root).
    """

    name: str
    clock_name: str
    dev_path: str


@dataclasses.dataclass(frozen=True)
class PtpOffset:
    """Guest realtime minus host realtime, from one ioctl.

    :param offset_ns: guest CLOCK_REALTIME minus the host's, at the same instant.
    :param error_ns: the bound on the offset's error (0 for a cross-timestamp).
    :param guest_ns: guest CLOCK_REALTIME at the sample.
    :param host_ns: host CLOCK_REALTIME (the device time) at the sample.
    :param method: ``precise`` or ``sys_offset``.
    :param mono_ns: guest CLOCK_MONOTONIC when the reader got the answer (0 when decoded
        from bytes alone).
    """

    offset_ns: int
    error_ns: int
    guest_ns: int
    host_ns: int
    method: str
    mono_ns: int = 0


def _clock_time(buf: bytes | bytearray, offset: int) -> int:
    sec, nsec, _reserved = _CLOCK_TIME.unpack_from(buf, offset)
    if nsec >= 1_000_000_000:
        raise ParseError(f"ptp_clock_time with nsec {nsec} out of range")
    return int(sec) * 1_000_000_000 + int(nsec)


def build_precise_request() -> bytearray:
    """The zeroed argument of ``PTP_SYS_OFFSET_PRECISE`` (the kernel fills all of it).

    :return: a 64-byte mutable buffer.
    """
    return bytearray(PRECISE_SIZE)


def decode_precise(buf: bytes | bytearray) -> PtpOffset:
    """Decode the answer of ``PTP_SYS_OFFSET_PRECISE``.

    :param buf: the filled ``struct ptp_sys_offset_precise``.
    :raise ParseError: when the buffer is short or a time stamp is malformed.
    :return: the offset, with error bound 0.
    """
    if len(buf) < PRECISE_SIZE:
        raise ParseError(f"ptp_sys_offset_precise needs {PRECISE_SIZE} bytes, got {len(buf)}")
    host = _clock_time(buf, 0)
    guest = _clock_time(buf, _CLOCK_TIME.size)
    return PtpOffset(guest - host, 0, guest, host, "precise")


def build_sys_offset_request(n_samples: int = 5) -> bytearray:
    """The argument of ``PTP_SYS_OFFSET`` asking for ``n_samples`` readings.

    :param n_samples: 1 to ``PTP_MAX_SAMPLES``.
    :raise ValueError: when ``n_samples`` is out of range.
    :return: an 832-byte mutable buffer.
    """
    if not 1 <= n_samples <= PTP_MAX_SAMPLES:
        raise ValueError(f"n_samples must be 1 to {PTP_MAX_SAMPLES}, got {n_samples}")
    buf = bytearray(SYS_OFFSET_SIZE)
    _SYS_OFFSET_HEAD.pack_into(buf, 0, n_samples, 0, 0, 0)
    return buf


def decode_sys_offset(buf: bytes | bytearray) -> PtpOffset:
    """Decode the answer of ``PTP_SYS_OFFSET``, keeping the sample with the shortest bracket.

    Sample ``i`` is ``ts[2i]`` (guest realtime), ``ts[2i+1]`` (device), ``ts[2i+2]`` (guest
    realtime). The offset is the bracket's midpoint minus the device time; the error bound is
    half the bracket, rounded up.

    :param buf: the filled ``struct ptp_sys_offset``.
    :raise ParseError: when the buffer is short, ``n_samples`` is out of range, a time stamp
        is malformed or a bracket runs backwards.
    :return: the best sample's offset.
    """
    if len(buf) < SYS_OFFSET_SIZE:
        raise ParseError(f"ptp_sys_offset needs {SYS_OFFSET_SIZE} bytes, got {len(buf)}")
    n_samples = _SYS_OFFSET_HEAD.unpack_from(buf, 0)[0]
    if not 1 <= n_samples <= PTP_MAX_SAMPLES:
        raise ParseError(f"ptp_sys_offset with n_samples {n_samples}")
    base = _SYS_OFFSET_HEAD.size
    stamps = [_clock_time(buf, base + i * _CLOCK_TIME.size) for i in range(2 * n_samples + 1)]
    best: PtpOffset | None = None
    best_bracket = 0
    for i in range(n_samples):
        before, device, after = stamps[2 * i], stamps[2 * i + 1], stamps[2 * i + 2]
        bracket = after - before
        if bracket < 0:
            raise ParseError(f"ptp_sys_offset sample {i} runs backwards ({bracket} ns)")
        if best is None or bracket < best_bracket:
            guest = before + bracket // 2
            best = PtpOffset(guest - device, (bracket + 1) // 2, guest, device, "sys_offset")
            best_bracket = bracket
    assert best is not None
    return best


_PTP_NAME = re.compile(r"ptp(\d+)\Z")


def find_kvm_ptp(roots: Roots = DEFAULT_ROOTS) -> PtpDevice | None:
    """Look through ``class/ptp`` for the lowest-numbered clock named ``KVM virtual PTP``.

    :param roots: where sysfs and /dev are.
    :return: the device, or None when there is none (or sysfs has no ptp class).
    """
    try:
        entries = os.listdir(roots.sys_path("class", "ptp"))
    except OSError:
        return None
    numbered = sorted((int(m.group(1)), name) for name in entries if (m := _PTP_NAME.match(name)))
    for _num, name in numbered:
        try:
            clock_name = roots.read_text(roots.sys_path("class", "ptp", name, "clock_name"))
        except OSError:
            continue
        if clock_name.strip() == KVM_PTP_CLOCK_NAME:
            return PtpDevice(name, clock_name.strip(), roots.dev_path(name))
    return None


_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)


class PtpReader:
    """An open KVM virtual PTP device that answers offset queries.

    Tries ``PTP_SYS_OFFSET_PRECISE`` first and, once it reports itself unsupported, uses
    ``PTP_SYS_OFFSET`` from then on. Not thread-safe; one owner reads it.
    """

    def __init__(self, device: PtpDevice, n_samples: int = 5) -> None:
        """Open the device read-only.

        :param device: from ``find_kvm_ptp``.
        :param n_samples: readings per ``PTP_SYS_OFFSET`` call.
        :raise ProbeUnavailable: when the device node cannot be opened.
        """
        self.device = device
        self._n_samples = n_samples
        self._precise = True
        try:
            self._fd: int | None = os.open(device.dev_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise ProbeUnavailable(
                f"{device.name} is {KVM_PTP_CLOCK_NAME!r} but {device.dev_path} "
                f"cannot be opened: {err.strerror or err}"
            ) from err

    @classmethod
    def open(cls, roots: Roots = DEFAULT_ROOTS, n_samples: int = 5) -> PtpReader:
        """Find the KVM virtual PTP device and open it.

        :param roots: where sysfs and /dev are.
        :param n_samples: readings per ``PTP_SYS_OFFSET`` call.
        :raise ProbeUnavailable: ``no KVM virtual PTP device``, or the node cannot be opened.
        :return: the reader.
        """
        device = find_kvm_ptp(roots)
        if device is None:
            raise ProbeUnavailable(NO_DEVICE)
        return cls(device, n_samples)

    @property
    def method(self) -> str:
        """The ioctl the next read tries first: ``precise`` or ``sys_offset``."""
        return "precise" if self._precise else "sys_offset"

    def read(self) -> PtpOffset:
        """Query guest realtime minus host realtime.

        :raise ProbeUnavailable: when the reader is closed or both ioctls fail.
        :raise ParseError: when the kernel's answer does not decode.
        :return: the offset, stamped with guest CLOCK_MONOTONIC.
        """
        if self._fd is None:
            raise ProbeUnavailable(f"{self.device.name} is closed")
        if self._precise:
            buf = build_precise_request()
            try:
                fcntl.ioctl(self._fd, PTP_SYS_OFFSET_PRECISE, buf, True)
            except OSError as err:
                if err.errno not in _UNSUPPORTED:
                    raise ProbeUnavailable(
                        f"{self.device.name}: PTP_SYS_OFFSET_PRECISE failed: {err.strerror}"
                    ) from err
                self._precise = False
            else:
                result = decode_precise(buf)
                return _stamped(result)
        buf = build_sys_offset_request(self._n_samples)
        try:
            fcntl.ioctl(self._fd, PTP_SYS_OFFSET, buf, True)
        except OSError as err:
            raise ProbeUnavailable(
                f"{self.device.name}: PTP_SYS_OFFSET failed: {err.strerror}"
            ) from err
        return _stamped(decode_sys_offset(buf))

    def close(self) -> None:
        """Close the device; further reads raise ``ProbeUnavailable``."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _stamped(result: PtpOffset) -> PtpOffset:
    return dataclasses.replace(result, mono_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC))
