"""The lab's QEMU processes: command lines, the accelerator choice, and cleanup.

A lab guest is one QEMU (``qemu-system-x86_64 -M q35``) booting the cached guest
(``-kernel`` the PVH vmlinux or the bzImage, ``-initrd``, ``-append``) with no default
devices and no display, its serial console in a file (``-serial file:serial-NAME.log``),
a virtio-net NIC on QEMU's user-mode network with two host ports forwarded on 127.0.0.1:
the agent (guest port 9466) and the lab hooks (guest port 9467), and two QMP monitors on
unix sockets (``qmp-NAME.sock`` for the recorder, ``ctl-NAME.sock`` for the scenario's
commands; each monitor serves one client). A destination gets ``-incoming defer`` and
other host ports.

The binary: ``--qemu`` names it (``resolve_qemu``): a path, a command on PATH, or a
version such as ``10.0``, which names the QEMU that ``scripts/setup`` unpacked from
Debian's bookworm-backports into ``QEMU_CACHE/qemu-VERSION/`` (an exec wrapper that
points QEMU at its own firmware and modules); by default ``qemu-system-x86_64`` on PATH.
Its version comes from ``PATH --version`` (``qemu_version``); the recorder also stores
QMP's ``query-version`` in meta.json (``versions.qemu``).

Accelerators:

- ``tcg``: ``-accel tcg,thread=single``: every vCPU in one host thread, so every vCPU
  stalls at once. Migrating scenarios use it on QEMU older than ``MTTCG_MIGRATION_MIN``:
  there multi-threaded TCG loses guest writes during a migration (the dirty-bitmap
  coherency bug fixed in QEMU 9.0, "physmem: Fix migration dirty bitmap coherency with
  TCG memory access").
- ``tcg-multi``: ``-accel tcg,thread=multi``: a host thread per vCPU. Used by the
  scenarios that do not migrate (``stall``, ``stall-vcpu``) on every QEMU and by the
  migrating ones on QEMU ``MTTCG_MIGRATION_MIN`` or newer, source and destination alike
  (``tcg_accel``, the one rule).
- ``kvm``: ``-accel kvm``. ``auto`` picks KVM only after a smoke boot reached the guest's
  init within ``KVM_SMOKE_S`` (a stock kernel fails on some hosts with emulation errors
  or hangs); the verdict is kept for the host's boot (its ``boot_id``), so only the first
  run pays for the smoke boot. Otherwise it falls back to TCG with a one-line note.

Every process started here is registered in ``PROCESSES`` and killed (SIGCONT then
SIGKILL to its process group) by ``kill_all``: called by the scenarios' ``finally``, by
``atexit``, and on SIGTERM/SIGHUP through ``handle_signals``; each QEMU also gets
``PR_SET_PDEATHSIG`` so it dies with the process that started it.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from analysis.lab.errors import QemuError
from analysis.lab.guest import BASE_CMDLINE, Guest, cache_dir

QEMU_BINARY = "qemu-system-x86_64"
AGENT_GUEST_PORT = 9466
HOOKS_GUEST_PORT = 9467
KVM_SMOKE_S = 10.0
#: ``--accel``: ``tcg`` lets the scenario and the QEMU version pick the threading
#: (``tcg_accel``); ``tcg-single`` and ``tcg-multi`` force it.
ACCELS = ("auto", "kvm", "tcg", "tcg-single", "tcg-multi")
#: The console line the guest's init prints first (the smoke boot waits for it).
INIT_MARK = "tsprobe-lab: init at"
AGENT_UP_MARK = "tsprobe-lab: agent up at"


#: The ports ``free_port`` handed out in this process.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and that this process has not
    handed out before: the kernel can give the same port to two binds in a row once the
    first socket is closed (a QEMU was once given one port for both of its forwards)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


#: Where scripts/setup unpacks other QEMU versions (``qemu-VERSION/qemu-system-x86_64``).
QEMU_CACHE = Path(os.environ.get("TSPROBE_QEMU_CACHE", "/var/cache/tsprobe"))
#: The first QEMU whose multi-threaded TCG keeps a migrating guest's memory intact.
MTTCG_MIGRATION_MIN = (9, 0)
_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")
_VERSION_ARG = re.compile(r"\d+(?:\.\d+){0,2}")


def qemu_binary() -> str:
    """The path of qemu-system-x86_64 on PATH.

    :raise QemuError: when it is not installed.
    """
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise QemuError(f"{QEMU_BINARY} is not installed (apt-get install qemu-system-x86)")
    return path


def cached_qemus(root: Path | None = None) -> dict[str, Path]:
    """The QEMUs scripts/setup unpacked: version (``10.0.2``) -> wrapper, oldest first."""
    root = QEMU_CACHE if root is None else root
    found: list[tuple[tuple[int, ...], str, Path]] = []
    with suppress(OSError):
        for entry in root.iterdir():
            wrapper = entry / QEMU_BINARY
            version = entry.name.removeprefix("qemu-")
            if entry.name.startswith("qemu-") and os.access(wrapper, os.X_OK):
                digits = tuple(int(d) for d in re.findall(r"\d+", version))
                found.append((digits, version, wrapper))
    return {version: wrapper for _, version, wrapper in sorted(found)}


def resolve_qemu(name: str | None, root: Path | None = None) -> str:
    """The QEMU binary ``--qemu`` names.

    :param name: None (``qemu-system-x86_64`` on PATH), a version (``10.0``, ``10.0.2``:
        the newest cached QEMU whose version starts with it), a path, or a command on
        PATH.
    :param root: the cache (default ``QEMU_CACHE``).
    :raise QemuError: when there is no such binary.
    """
    if name is None:
        return qemu_binary()
    if _VERSION_ARG.fullmatch(name):
        cached = cached_qemus(root)
        matching = [w for v, w in cached.items() if v == name or v.startswith(name + ".")]
        if not matching:
            have = ", ".join(cached) or "none"
            raise QemuError(
                f"--qemu {name}: no QEMU {name} in {root or QEMU_CACHE} (unpacked: {have}; "
                "scripts/setup unpacks 10.0 on Debian 12)"
            )
        return str(matching[-1])
    path = Path(name) if "/" in name else None
    if path is None:
        found = shutil.which(name)
        if found is None:
            raise QemuError(f"--qemu {name}: no such command on PATH")
        return found
    if not path.is_file():
        raise QemuError(f"--qemu {name}: no such file")
    if not os.access(path, os.X_OK):
        raise QemuError(f"--qemu {name}: not executable")
    return str(path.resolve())


@dataclass(frozen=True)
class QemuVersion:
    """What ``BINARY --version`` says: ``text`` is its first line."""

    binary: str
    major: int
    minor: int
    micro: int
    text: str

    @property
    def number(self) -> str:
        """``10.0.2``."""
        return f"{self.major}.{self.minor}.{self.micro}"

    def at_least(self, version: tuple[int, int]) -> bool:
        """Whether this QEMU is ``version`` or newer."""
        return (self.major, self.minor) >= version


def parse_version(binary: str, text: str) -> QemuVersion:
    """Parse ``qemu-system-x86_64 --version`` output.

    :raise QemuError: when it names no QEMU version.
    """
    match = _VERSION_RE.search(text)
    if match is None:
        first = (text.strip().splitlines() or ["no output"])[0]
        raise QemuError(f"{binary} is not a QEMU (--version said: {first})")
    major, minor, micro = (int(g or 0) for g in match.groups())
    return QemuVersion(binary, major, minor, micro, text.strip().splitlines()[0])


def qemu_version(binary: str) -> QemuVersion:
    """Run ``binary --version``.

    :raise QemuError: when it cannot run or is no QEMU.
    """
    try:
        proc = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise QemuError(f"cannot run {binary} --version: {err}") from err
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise QemuError(f"{binary} --version failed ({proc.returncode}): {last}")
    return parse_version(binary, proc.stdout)


def tcg_accel(migrates: bool, version: QemuVersion) -> tuple[str, str]:
    """Single- or multi-threaded TCG for a scenario: the lab's one rule.

    :param migrates: whether the scenario migrates the guest.
    :param version: the QEMU it runs on.
    :return: (``tcg`` or ``tcg-multi``, why, in a few words).
    """
    if not migrates:
        return "tcg-multi", "no migration"
    need = ".".join(map(str, MTTCG_MIGRATION_MIN))
    if version.at_least(MTTCG_MIGRATION_MIN):
        return "tcg-multi", f"QEMU {version.number} >= {need} migrates MTTCG guests intact"
    return "tcg", f"QEMU {version.number} < {need}: MTTCG loses guest writes in migrations"


def accel_args(accel: str) -> list[str]:
    """QEMU arguments for an accelerator (``kvm``, ``tcg`` or ``tcg-multi``)."""
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    if accel == "tcg-multi":
        return ["-accel", "tcg,thread=multi"]
    if accel == "tcg":
        return ["-accel", "tcg,thread=single"]
    raise QemuError(f"unknown accelerator {accel!r}: choose from {', '.join(ACCELS)}")


@dataclass
class QemuSpec:
    """What one lab QEMU runs with.

    :param name: ``src`` or ``dst`` (names the files in ``workdir``).
    :param guest: the built guest.
    :param binary: the QEMU binary (``resolve_qemu``); empty: the one on PATH.
    :param workdir: where the sockets and the serial log go.
    :param accel: ``kvm``, ``tcg`` or ``tcg-multi``.
    :param mem_mb: guest RAM in MiB.
    :param vcpus: number of vCPUs.
    :param incoming: start as a migration destination (``-incoming defer``).
    :param cmdline: words appended to the guest's kernel command line.
    """

    name: str
    guest: Guest
    workdir: Path
    binary: str = ""
    accel: str = "tcg"
    mem_mb: int = 512
    vcpus: int = 2
    incoming: bool = False
    cmdline: list[str] = field(default_factory=list)
    agent_port: int = field(default_factory=free_port)
    hooks_port: int = field(default_factory=free_port)

    @property
    def qmp_socket(self) -> Path:
        """The recorder's monitor."""
        return self.workdir / f"qmp-{self.name}.sock"

    @property
    def ctl_socket(self) -> Path:
        """The scenario's own monitor."""
        return self.workdir / f"ctl-{self.name}.sock"

    @property
    def serial_log(self) -> Path:
        """The guest's serial console."""
        return self.workdir / f"serial-{self.name}.log"

    def command(self) -> list[str]:
        """The full QEMU command line."""
        append = " ".join([BASE_CMDLINE, *self.cmdline])
        netdev = (
            f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.agent_port}-:{AGENT_GUEST_PORT},"
            f"hostfwd=tcp:127.0.0.1:{self.hooks_port}-:{HOOKS_GUEST_PORT}"
        )
        cmd = [
            self.binary or qemu_binary(), "-name", f"tsprobe-lab-{self.name}", "-M", "q35",
            *accel_args(self.accel),
            "-m", str(self.mem_mb), "-smp", str(self.vcpus),
            "-nodefaults", "-display", "none", "-no-user-config",
            "-kernel", str(self.guest.kernel), "-initrd", str(self.guest.initrd),
            "-append", append,
            "-serial", f"file:{self.serial_log}",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,romfile=",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-qmp", f"unix:{self.ctl_socket},server=on,wait=off",
        ]  # fmt: skip
        if self.incoming:
            cmd += ["-incoming", "defer"]
        return cmd


# -- process bookkeeping -------------------------------------------------------------------

#: Every process the lab started and has not reaped yet, by pid.
PROCESSES: dict[int, subprocess.Popen[bytes]] = {}
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # pragma: no cover - runs in the child
    with suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a process in its own process group, registered for cleanup.

    :param cmd: the command.
    :param log: where its stdout and stderr go.
    :raise QemuError: when it cannot be started.
    """
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
                preexec_fn=_child_setup,  # one prctl call, safe enough before exec
            )
        except OSError as err:
            raise QemuError(f"cannot start {cmd[0]}: {err}") from err
    PROCESSES[proc.pid] = proc
    return proc


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGCONT then SIGKILL a process's group (a stopped QEMU too) and reap it."""
    if proc.poll() is None:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    PROCESSES.pop(proc.pid, None)


def kill_all() -> None:
    """Kill every process the lab started (idempotent)."""
    for proc in list(PROCESSES.values()):
        kill(proc)


atexit.register(kill_all)


@contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit (so ``finally`` clauses clean up).

    SIGINT already raises KeyboardInterrupt. Only effective in the main thread.
    """

    def _exit(signum: int, _frame: FrameType | None) -> None:
        kill_all()
        raise SystemExit(128 + signum)

    saved: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with suppress(ValueError):
                saved[sig] = signal.signal(sig, _exit)
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        kill_all()


# -- a running QEMU --------------------------------------------------------------------------


@dataclass
class Qemu:
    """One running lab QEMU."""

    spec: QemuSpec
    proc: subprocess.Popen[bytes]
    started_mono: float

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether QEMU is still running."""
        return self.proc.poll() is None

    def console(self) -> str:
        """The serial console so far."""
        try:
            return self.spec.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    def stderr_tail(self) -> str:
        """The last line QEMU wrote on stderr (its errors)."""
        path = self.spec.workdir / f"qemu-{self.spec.name}.log"
        with suppress(OSError):
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
            if lines:
                return lines[-1]
        return ""

    def wait_console(self, mark: str, timeout_s: float) -> float:
        """Wait until the console shows ``mark``.

        :raise QemuError: when QEMU exits or the mark does not appear in time.
        :return: seconds since QEMU was started.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if mark in self.console():
                return time.monotonic() - self.started_mono
            if not self.alive():
                raise QemuError(
                    f"{self.spec.name} QEMU exited ({self.proc.returncode}): "
                    f"{self.stderr_tail() or 'no message'}"
                )
            if time.monotonic() > deadline:
                raise QemuError(
                    f"{self.spec.name}: no {mark!r} on the console after {timeout_s:.0f} s "
                    f"({self.spec.serial_log})"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Kill this QEMU."""
        kill(self.proc)


def start(spec: QemuSpec) -> Qemu:
    """Start a QEMU for ``spec`` and wait until its monitors accept connections.

    :raise QemuError: when it exits at once or its sockets do not appear within 10 s.
    """
    spec.workdir.mkdir(parents=True, exist_ok=True)
    for path in (spec.qmp_socket, spec.ctl_socket):
        with suppress(FileNotFoundError):
            path.unlink()
    proc = spawn(spec.command(), spec.workdir / f"qemu-{spec.name}.log")
    qemu = Qemu(spec, proc, time.monotonic())
    deadline = time.monotonic() + 10
    while not (spec.qmp_socket.exists() and spec.ctl_socket.exists()):
        if not qemu.alive():
            raise QemuError(
                f"{spec.name} QEMU exited ({proc.returncode}): {qemu.stderr_tail() or '?'}"
            )
        if time.monotonic() > deadline:
            qemu.stop()
            raise QemuError(f"{spec.name} QEMU opened no monitor within 10 s")
        time.sleep(0.02)
    return qemu


# -- the accelerator -----------------------------------------------------------------------


def _host_boot_id() -> str:
    with suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return "unknown"


def kvm_smoke_boot(
    guest: Guest, workdir: Path, timeout_s: float = KVM_SMOKE_S, binary: str = ""
) -> str | None:
    """Boot the guest under KVM until its init runs.

    :return: None when KVM works, else one line saying why not.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    spec = QemuSpec("kvm-smoke", guest, workdir, binary, accel="kvm", mem_mb=256, vcpus=1)
    try:
        qemu = start(spec)
    except QemuError as err:
        return str(err)
    try:
        qemu.wait_console(INIT_MARK, timeout_s)
        return None
    except QemuError as err:
        return str(err)
    finally:
        qemu.stop()


def choose_accel(
    requested: str, guest: Guest, workdir: Path, scenario_accel: str, binary: str = ""
) -> tuple[str, str]:
    """Resolve ``--accel`` into the accelerator a scenario runs with.

    :param requested: one of ``ACCELS``.
    :param guest: the guest (for the smoke boot).
    :param workdir: scratch directory for the smoke boot.
    :param scenario_accel: what the scenario uses under TCG (``tcg_accel``).
    :param binary: the QEMU binary (empty: the one on PATH).
    :raise QemuError: for an unknown value.
    :return: (``kvm``, ``tcg`` or ``tcg-multi``; a one-line note for the user, empty when
        nothing to say).
    """
    if requested not in ACCELS:
        raise QemuError(f"unknown accelerator {requested!r}: choose from {', '.join(ACCELS)}")
    if requested == "kvm":
        return "kvm", ""
    if requested == "tcg":
        return scenario_accel, ""
    if requested in ("tcg-single", "tcg-multi"):
        return ("tcg" if requested == "tcg-single" else requested), ""
    verdict_file = cache_dir() / "kvm-verdict.json"
    key = f"{_host_boot_id()} {guest.key} {binary}".rstrip()
    verdict: dict[str, str | None] = {}
    with suppress(OSError, ValueError):
        verdict = json.loads(verdict_file.read_text())
    if verdict.get("key") == key:
        why = verdict.get("why")
        cached = " (smoke boot earlier on this host boot)"
    else:
        why = kvm_smoke_boot(guest, workdir, binary=binary)
        cached = ""
        with suppress(OSError):
            verdict_file.parent.mkdir(parents=True, exist_ok=True)
            verdict_file.write_text(json.dumps({"key": key, "why": why}))
    if why is None:
        return "kvm", f"accel: KVM works{cached}"
    first = why.splitlines()[0] if why else "?"
    return (
        scenario_accel,
        f"accel: KVM unusable ({first}){cached}: using {accel_args(scenario_accel)[1]}",
    )
