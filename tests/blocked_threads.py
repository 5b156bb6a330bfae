"""Threads of this process blocked the ways a vCPU thread can be: on a page, on a futex.

``MissingPage``: a thread blocked on a missing page, through a real userfaultfd. What
postcopy does to a destination's vCPU: QEMU registers guest RAM with a userfaultfd
(``UFFDIO_REGISTER_MODE_MISSING``); a thread that touches a page not yet copied sleeps in
the kernel's ``handle_userfault`` until the page is placed. ``MissingPage`` does the same to
a thread of the test process: the thread calls libc ``memcpy`` from the registered page
(ctypes drops the GIL for the call, so the rest of the process runs on) and stays blocked
until ``release()`` places a zero page (``UFFDIO_ZEROPAGE``).

``FutexWords``: futex words at addresses the test knows (one page, words 1 KiB apart, so no
two fall in one ``pthread_cond_t``), waited on with the raw ``futex`` syscall as glibc's
locks and condition variables do, and woken by the test.

Linux x86_64 only; userfaultfd needs root, ``vm.unprivileged_userfaultfd=1``, or
``UFFD_USER_MODE_ONLY``, which is used here (the fault is in user mode).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

SYS_USERFAULTFD = 323
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_REGISTER_MODE_MISSING = 1
PAGE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcpy.restype = ctypes.c_void_p
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
SYS_FUTEX = 202
FUTEX_WAIT_PRIVATE = 128
FUTEX_WAKE_PRIVATE = 129


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]  # fmt: skip


class _Register(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]  # fmt: skip


class _Zeropage(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]  # fmt: skip


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> None:
    if _libc.ioctl(fd, request, ctypes.byref(arg)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl {request:#x}: {os.strerror(err)}")


def sigstop_for(pid: int, seconds: float) -> tuple[int, int]:
    """SIGSTOP a process for ``seconds``; return CLOCK_MONOTONIC (ns) of the stop and the CONT."""
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic_ns()
    time.sleep(seconds)
    os.kill(pid, signal.SIGCONT)
    return stopped, time.monotonic_ns()


def wait_wchan(tid: int, wchan: str, timeout_s: float = 5.0) -> int:
    """Poll a thread of this process every millisecond until it sleeps in ``wchan``.

    :return: CLOCK_MONOTONIC (ns) of the first reading that saw it.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(f"/proc/self/task/{tid}/wchan") as fh:
            if fh.read().strip() == wchan:
                return time.monotonic_ns()
        time.sleep(0.001)
    raise TimeoutError(f"thread {tid} never slept in {wchan}")


def wait_futex(tid: int, address: int, timeout_s: float = 5.0) -> int:
    """Poll a thread of this process every millisecond until it waits on futex ``address``.

    :return: CLOCK_MONOTONIC (ns) of the first reading that saw it.
    """
    want = f"{SYS_FUTEX} {address:#x} "
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(f"/proc/self/task/{tid}/syscall") as fh:
            if fh.read().startswith(want):
                return time.monotonic_ns()
        time.sleep(0.001)
    raise TimeoutError(f"thread {tid} never waited on futex {address:#x}")


class MissingPage:
    """A page registered as missing, and a thread blocked on it once ``block()`` ran."""

    def __init__(self) -> None:
        fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"userfaultfd: {os.strerror(err)}")
        self.fd = fd
        _ioctl(fd, UFFDIO_API, _Api(UFFD_API, 0, 0))
        addr = _libc.mmap(None, PAGE, 3, 0x22, -1, 0)  # PROT_READ|WRITE, PRIVATE|ANONYMOUS
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        self.addr: int = addr
        _ioctl(fd, UFFDIO_REGISTER, _Register(addr, PAGE, UFFDIO_REGISTER_MODE_MISSING, 0))
        self._sink = ctypes.create_string_buffer(8)
        self.thread: threading.Thread | None = None
        self.blocked_at_ns = 0
        self.released_at_ns = 0

    def touch(self) -> None:
        """Read the page from the calling thread: blocks until ``release()``."""
        _libc.memcpy(self._sink, self.addr, 1)

    def block(self) -> int:
        """Start a thread that reads the missing page; return its thread id once it faulted."""
        self.thread = threading.Thread(target=self.touch, daemon=True)
        self.thread.start()
        tid = self.thread.native_id
        assert tid is not None
        self.blocked_at_ns = wait_wchan(tid, "handle_userfault")
        return tid

    def release(self) -> None:
        """Place a zero page: the blocked thread goes on and ends."""
        self.released_at_ns = time.monotonic_ns()
        _ioctl(self.fd, UFFDIO_ZEROPAGE, _Zeropage(self.addr, PAGE, 0, 0))
        if self.thread is not None:
            self.thread.join(timeout=5)

    def close(self) -> None:
        """Release a blocked thread if any, unmap the page and close the userfaultfd."""
        if self.thread is not None and self.thread.is_alive():
            self.release()
        os.close(self.fd)
        _libc.munmap(self.addr, PAGE)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class FutexWords:
    """Futex words 1 KiB apart in one page; ``wait`` blocks the calling thread on one."""

    SPACING = 1024

    def __init__(self, count: int) -> None:
        self._buffer = (ctypes.c_int * (count * self.SPACING // 4))()
        self.count = count

    def address(self, index: int) -> int:
        """The address of word ``index``."""
        return ctypes.addressof(self._buffer) + index * self.SPACING

    def wait(self, index: int, timeout_s: float | None = None) -> None:
        """Wait on word ``index`` while it is 0 (GIL released), at most ``timeout_s``."""
        timeout = None
        if timeout_s is not None:
            timeout = ctypes.byref(_Timespec(int(timeout_s), int(timeout_s % 1 * 1e9)))
        word = self.index_value(index)
        while word.value == 0:
            _libc.syscall(SYS_FUTEX, ctypes.c_void_p(self.address(index)), FUTEX_WAIT_PRIVATE,
                          0, timeout)  # fmt: skip
            if timeout is not None:
                return

    def index_value(self, index: int) -> ctypes.c_int:
        """The word itself."""
        return ctypes.c_int.from_address(self.address(index))

    def wake(self, index: int) -> None:
        """Set word ``index`` to 1 and wake every waiter."""
        self.index_value(index).value = 1
        _libc.syscall(SYS_FUTEX, ctypes.c_void_p(self.address(index)), FUTEX_WAKE_PRIVATE,
                      2**31 - 1, None)  # fmt: skip
