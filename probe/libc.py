"""The C library through ctypes, loaded once, for the few calls Python 3.11 lacks
(``timerfd_create``, ``timerfd_settime``, ``adjtimex``).

It is ``dlopen(NULL)``: the symbols already loaded into the interpreter, libc's among them.
``ctypes.util.find_library("c")`` would find the same library by running ``ldconfig -p``
in a subprocess, at every start of the agent and of every worker that needs it.
"""

from __future__ import annotations

import ctypes

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The interpreter's C library, with ``use_errno`` (read ``ctypes.get_errno()``)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc
