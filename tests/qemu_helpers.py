"""Bare QEMU processes (no guest OS) that migrate on loopback, for the recorder's tests.

Two QEMUs (``-M q35 -accel tcg -nodefaults -display none -m 128``) would migrate in
milliseconds because empty RAM is all zero pages. A 48 MB random blob loaded into RAM with
``-device loader,file=BLOB,addr=0x1000000,force-raw=on`` plus ``max-bandwidth`` 20 MB/s
and ``max-postcopy-bandwidth`` 10 MB/s make precopy last about 2.5 s and postcopy about
5 s, long enough to send ``migrate-start-postcopy``, ``migrate-pause`` and
``migrate-recover`` (see DESIGN.md, "Testing the recorder without a guest OS").

Everything listens on 127.0.0.1 or on unix sockets under the test's tmp directory. The
QEMUs are killed when the ``qemu_pair`` context exits, whatever happened.

``QEMU`` is the system's qemu-system-x86_64; ``QEMU_PARAMS`` parametrizes a test over it
and the QEMU 10.0 that scripts/setup unpacks on Debian 12 (skipped, with the reason, when
absent); pass the parameter to ``qemu_pair(..., binary=...)``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from analysis.lab.qemu import QEMU_CACHE, cached_qemus

QEMU = shutil.which("qemu-system-x86_64")
_QEMU_10 = [str(w) for v, w in cached_qemus().items() if v.startswith("10.0.")]
#: The QEMUs a real-QEMU test can run on: the system's, and the unpacked 10.0.
QEMU_PARAMS = [
    pytest.param(
        QEMU,
        id="qemu-system",
        marks=pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
    ),
    pytest.param(
        _QEMU_10[-1] if _QEMU_10 else None,
        id="qemu-10.0",
        marks=pytest.mark.skipif(
            not _QEMU_10,
            reason=f"no QEMU 10.0 unpacked in {QEMU_CACHE} (scripts/setup does it on Debian 12)",
        ),
    ),
]
BLOB_SIZE = 48 * 1024 * 1024
MAX_BANDWIDTH = 20 * 1024 * 1024
MAX_POSTCOPY_BANDWIDTH = 10 * 1024 * 1024


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_blob(path: Path, size: int = BLOB_SIZE) -> Path:
    """Write ``size`` random bytes to ``path`` (once; reused when it exists)."""
    if not path.exists() or path.stat().st_size != size:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            left = size
            while left:
                chunk = min(left, 4 * 1024 * 1024)
                fh.write(os.urandom(chunk))
                left -= chunk
        tmp.replace(path)
    return path


@dataclass
class Qemu:
    """One QEMU process and its QMP socket paths (the first is the test's own)."""

    name: str
    proc: subprocess.Popen[bytes]
    sockets: list[Path]
    log: Path

    @property
    def qmp(self) -> Path:
        """The socket a test's controller connects to."""
        return self.sockets[0]

    def kill(self) -> None:
        """SIGKILL the process (resuming it first if stopped) and reap it."""
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def start_qemu(
    tmp: Path,
    name: str,
    blob: Path | None,
    incoming: bool,
    monitors: int = 1,
    binary: str | None = None,
) -> Qemu:
    """Start a bare QEMU with ``monitors`` QMP sockets; wait until they exist.

    :param tmp: directory for the sockets and the log.
    :param name: used in file names.
    :param blob: random bytes to load into RAM (the source), or ``None``.
    :param incoming: start with ``-incoming defer`` (the destination).
    :param monitors: how many ``-qmp`` sockets.
    :param binary: the QEMU (default ``QEMU``).
    :return: the running QEMU.
    """
    binary = binary or QEMU
    assert binary is not None, "qemu-system-x86_64 is not installed"
    sockets = [tmp / f"{name}{i if i else ''}.qmp" for i in range(monitors)]
    cmd = [binary, "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "128"]
    for sock in sockets:
        cmd += ["-qmp", f"unix:{sock},server=on,wait=off"]
    if blob is not None:
        cmd += ["-device", f"loader,file={blob},addr=0x1000000,force-raw=on"]
    if incoming:
        cmd += ["-incoming", "defer"]
    for sock in sockets:
        sock.unlink(missing_ok=True)
    log = tmp / f"{name}.log"
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT)
    qemu = Qemu(name, proc, sockets, log)
    deadline = time.monotonic() + 15
    while not all(s.exists() for s in sockets):
        if proc.poll() is not None or time.monotonic() > deadline:
            qemu.kill()
            raise RuntimeError(f"{name} QEMU did not start: {log.read_text(errors='replace')}")
        time.sleep(0.02)
    return qemu


@dataclass
class Pair:
    """A source and a destination QEMU, and the port the destination listens on."""

    src: Qemu
    dst: Qemu
    port: int
    extra: list[Qemu] = field(default_factory=list)

    def uri(self, port: int | None = None) -> str:
        return f"tcp:127.0.0.1:{self.port if port is None else port}"


@contextmanager
def qemu_pair(
    tmp: Path, blob: Path, monitors: int = 2, binary: str | None = None
) -> Iterator[Pair]:
    """A source (RAM from ``blob``) and a ``-incoming defer`` destination; always killed.

    :param tmp: directory for sockets and logs.
    :param blob: the random RAM content.
    :param monitors: QMP sockets on each QEMU: the first for the test's controller, the
        second for the recorder.
    :param binary: the QEMU of both (default ``QEMU``; see ``QEMU_PARAMS``).
    :return: the pair (as a context manager).
    """
    started: list[Qemu] = []
    try:
        started.append(start_qemu(tmp, "src", blob, False, monitors, binary))
        started.append(start_qemu(tmp, "dst", None, True, monitors, binary))
        yield Pair(started[0], started[1], free_port())
    finally:
        for qemu in started:
            qemu.kill()


class Controller:
    """The test's own QMP connections to both QEMUs: it drives the migration."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.src = QMPClient("ctl-src")
        self.dst = QMPClient("ctl-dst")

    async def __aenter__(self) -> Controller:
        await self.src.connect(str(self.pair.src.qmp))
        await self.dst.connect(str(self.pair.dst.qmp))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in (self.src, self.dst):
            with suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2)

    async def prepare(self, postcopy: bool = False) -> None:
        """Capabilities, bandwidth limits and ``migrate-incoming`` on the destination."""
        caps = [{"capability": "postcopy-ram", "state": True}] if postcopy else []
        for client in (self.src, self.dst):
            if caps:
                await client.execute("migrate-set-capabilities", {"capabilities": caps})
        await self.src.execute(
            "migrate-set-parameters",
            {"max-bandwidth": MAX_BANDWIDTH, "max-postcopy-bandwidth": MAX_POSTCOPY_BANDWIDTH},
        )
        await self.dst.execute("migrate-incoming", {"uri": self.pair.uri()})

    async def migrate(self) -> None:
        await self.src.execute("migrate", {"uri": self.pair.uri()})

    async def src_status(self) -> str:
        reply: Any = await self.src.execute("query-migrate")
        return str(reply.get("status", "none"))

    async def wait_src(self, *statuses: str, timeout: float = 30.0) -> str:
        """Poll the source's query-migrate until its status is one of ``statuses``."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self.src_status()
            if status in statuses:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"source stuck in {status!r}, waiting for {statuses}")
            await asyncio.sleep(0.05)


def wait_file(path: Path, predicate: Any, timeout: float = 30.0) -> None:
    """Wait until ``predicate(path.read_text())`` is true (for records to appear)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and predicate(path.read_text()):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path}: condition not met within {timeout}s")
