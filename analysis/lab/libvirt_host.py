"""libvirt on this host, for the lab: two daemons, the domain, the commands and their records.

Everything ``LibvirtScenario`` (analysis/lab/libvirt.py) needs below the scenario itself:

- ``Daemon``: one libvirtd of this machine in a mount namespace of its own (``unshare
  --mount``), its run, lib, log and etc directories bind-mounted from the run's work
  directory and its capabilities cache shared, with a host UUID of its own (libvirt 9.0
  refuses a migration between daemons with the same UUID); no systemd needed.
- ``domain_xml``: the lab guest as a ``type='qemu'`` domain, direct kernel boot, the agent's
  port forwarded and tsprobe's own QMP monitor added with ``<qemu:commandline>``;
  ``tcg_wrapper``: the emulator wrapper that makes libvirt's ``-accel tcg`` single-threaded
  on QEMU before 9.0 (multi-threaded TCG loses guest writes in migrations there).
- ``VirshResult``: one ``virsh`` command as it ran (line, exit status, output, time), as
  the run directory's ``libvirt-commands.txt`` and lab-steps.jsonl record it;
  ``parse_jobinfo``: ``virsh domjobinfo``'s ``Key: value`` lines.
- ``DomainQemu``: a QEMU libvirt started, seen as the lab's ``Qemu`` (pid from the daemon's
  pid file, stopped with ``virsh destroy``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from xml.sax.saxutils import escape, quoteattr

from analysis.lab import qemu as lq
from analysis.lab.errors import LabError, QemuError
from analysis.lab.guest import BASE_CMDLINE

DOMAIN = "tsprobe-lab"
#: libvirtd's fixed places as root, each bound to a directory of the daemon's own.
BOUND = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "etc": "/etc/libvirt",
}
#: First migration port of each daemon (64 each; only a destination listens).
PORT_MIN = {"src": 49152, "dst": 49216}
DAEMON_START_S = 30.0
VIRSH_TIMEOUT_S = 30.0
#: libvirt's wait for a domain's job before "cannot acquire state change lock".
LIBVIRT_JOB_WAIT_S = 30.0
JOBINFO_PERIOD_S = 1.0
#: From the destination's postcopy-active to ``virsh domjobabort --postcopy``. libvirt's
#: Finish phase there may still wait for its QEMU then (``_first_migrate_end``).
ABORT_AFTER_S = 0.3
#: How long the destination may stay in postcopy-paused after ``--postcopy-resume``
#: before the recovery counts as failed (a ``recovery_failed`` step: the guest's outcome);
#: also how long the first ``virsh migrate`` may take to end once paused.
RECOVERY_WAIT_S = 60.0
#: How long libvirt may take to say a paused domain is ``post-copy failed`` (at most the hold).
PAUSED_STATE_WAIT_S = 5.0
COMMANDS = "libvirt-commands.txt"
JOBINFO = "libvirt-domjobinfo.txt"
TOOLS = ("virsh", "libvirtd", "unshare", "stdbuf")

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
migration_port_min = {port_min}
migration_port_max = {port_max}
"""
LIBVIRTD_CONF = """\
host_uuid = "{host_uuid}"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
WRAPPER = """\
#!/bin/sh
# libvirt starts QEMU with "-accel tcg" (multi-threaded TCG on x86); QEMU {version}
# loses guest writes in multi-threaded TCG migrations: run it single-threaded.
prev=
for arg do
    shift
    if [ "$prev" = "-accel" ] && [ "$arg" = "tcg" ]; then arg="tcg,thread=single"; fi
    set -- "$@" "$arg"
    prev=$arg
done
exec {binary} "$@"
"""


def check_host() -> None:
    """Say in one line what keeps ``--via libvirt`` from running here.

    :raise LabError: not root (mount namespaces, libvirtd as root), or a tool missing.
    """
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise LabError(
            f"--via libvirt needs {', '.join(missing)} (scripts/setup installs libvirt: "
            "libvirt-daemon-system, libvirt-clients)"
        )
    if os.geteuid() != 0:
        raise LabError("--via libvirt needs root: it runs two libvirtd in mount namespaces")


def domain_xml(
    spec: lq.QemuSpec, emulator: str, domain_uuid: str, domain_type: str = "qemu"
) -> str:
    """The lab guest as a libvirt domain (see the module docstring).

    :param spec: the lab QEMU it stands for (guest, memory, vCPUs, ports, monitor, console).
    :param emulator: the QEMU binary (or ``tcg_wrapper``'s wrapper).
    :param domain_uuid: the domain's UUID, the same on both sides of a migration.
    :param domain_type: ``qemu`` (TCG) or ``kvm``.
    :return: the XML text.
    """
    netdev = (
        f"user,id=tsnet0,hostfwd=tcp:127.0.0.1:{spec.agent_port}-:{lq.AGENT_GUEST_PORT},"
        f"hostfwd=tcp:127.0.0.1:{spec.hooks_port}-:{lq.HOOKS_GUEST_PORT}"
    )
    args = [
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=tsnet0,romfile=",
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
    ]  # fmt: skip
    cmdline = " ".join([BASE_CMDLINE, *spec.cmdline])
    qemu_args = "\n".join(f"    <qemu:arg value={quoteattr(a)}/>" for a in args)
    return f"""\
<domain type='{domain_type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{DOMAIN}</name>
  <uuid>{domain_uuid}</uuid>
  <memory unit='MiB'>{spec.mem_mb}</memory>
  <vcpu>{spec.vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(spec.guest.kernel))}</kernel>
    <initrd>{escape(str(spec.guest.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(emulator)}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <serial type='file'>
      <source path={quoteattr(str(spec.serial_log))}/>
      <target port='0'/>
    </serial>
  </devices>
  <qemu:commandline>
{qemu_args}
  </qemu:commandline>
</domain>
"""


def tcg_wrapper(directory: Path, binary: str, version: str) -> Path:
    """Write the emulator wrapper that runs libvirt's ``-accel tcg`` single-threaded.

    :return: its path.
    """
    path = directory / "qemu-tcg-single"
    path.write_text(WRAPPER.format(version=version, binary=shlex.quote(binary)))
    path.chmod(0o755)
    return path


def parse_jobinfo(text: str) -> dict[str, str]:
    """``virsh domjobinfo`` output as ``{field: value with its unit}``."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and value.strip():
            out[key.strip()] = re.sub(r"\s+", " ", value.strip())
    return out


@dataclass
class VirshResult:
    """One virsh command as it ran."""

    side: str
    args: list[str]
    rc: int | None  # None: killed at its timeout
    stdout: str
    stderr: str
    host_real_ns: int
    elapsed_s: float

    def line(self) -> str:
        """``virsh -c "$SRC" ARGS``, as the transcript shows it."""
        return f'virsh -c "${self.side.upper()}" ' + shlex.join(self.args)

    def record(self) -> dict[str, Any]:
        """The lab-steps.jsonl record."""
        return {
            "type": "virsh",
            "side": self.side,
            "args": self.args,
            "rc": self.rc,
            "stdout": self.stdout[-2000:],
            "stderr": self.stderr[-2000:],
            "host_real_ns": self.host_real_ns,
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def error(self) -> str:
        """The last error line (or why there is none)."""
        if self.rc is None:
            return f"no answer within {self.elapsed_s:.0f} s"
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit status {self.rc}"


class Daemon:
    """One libvirtd in a mount namespace of its own (see the module docstring)."""

    def __init__(
        self, name: str, directory: Path, port_min: int, caps_cache: Path | None = None
    ) -> None:
        self.name = name
        self.directory = directory
        self.port_min = port_min
        #: Bound over /var/cache/libvirt instead of DIR/cache: libvirt keeps each QEMU
        #: binary's probed capabilities there (checked against the binary's times and
        #: libvirt's version), and probing takes seconds.
        self.caps_cache = caps_cache
        self.host_uuid = str(uuid.uuid4())
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        """Its read-write socket, as seen from the host."""
        return self.directory / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The URI virsh connects to."""
        return f"qemu:///system?socket={self.socket}"

    def command(self) -> list[str]:
        """``unshare`` + the bind mounts + ``libvirtd``."""
        mounts = " && ".join(
            f"mount --bind {shlex.quote(str(self._bound(d)))} {target}"
            for d, target in BOUND.items()
        )
        script = (
            f"{mounts} && exec libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid"
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def _bound(self, name: str) -> Path:
        if name == "cache" and self.caps_cache is not None:
            return self.caps_cache
        return self.directory / name

    def start(self) -> None:
        """Write its configuration, start it, wait until virsh gets an answer.

        :raise QemuError: when it exits or does not answer within ``DAEMON_START_S``.
        """
        for d, target in BOUND.items():
            self._bound(d).mkdir(parents=True, exist_ok=True)
            Path(target).mkdir(parents=True, exist_ok=True)
        etc = self.directory / "etc"
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(host_uuid=self.host_uuid))
        (etc / "qemu.conf").write_text(
            QEMU_CONF.format(port_min=self.port_min, port_max=self.port_min + 63)
        )
        self.proc = lq.spawn(self.command(), self.directory / "daemon.log")
        deadline = time.monotonic() + DAEMON_START_S
        while True:
            if self.socket.exists():
                probe = subprocess.run(
                    ["virsh", "-c", self.uri, "version"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=False,
                )
                if probe.returncode == 0:
                    return
            if self.proc.poll() is not None:
                raise QemuError(f"libvirtd ({self.name}) exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise QemuError(
                    f"libvirtd ({self.name}) did not answer within {DAEMON_START_S:g} s"
                )
            time.sleep(0.2)

    def log_tail(self) -> str:
        """The last error line of its logs."""
        for path in (self.directory / "log" / "libvirtd.log", self.directory / "daemon.log"):
            with contextlib.suppress(OSError):
                lines = [
                    ln for ln in path.read_text(errors="replace").splitlines() if "error" in ln
                ]
                if lines:
                    return lines[-1].split(": ", 2)[-1]
        return "no message"

    def qemu_pid(self) -> int | None:
        """The pid of the domain's QEMU under this daemon (its pid file), or None."""
        with contextlib.suppress(OSError, ValueError):
            return int((self.directory / "run" / "qemu" / f"{DOMAIN}.pid").read_text().strip())
        return None

    def stop(self) -> None:
        """Kill the daemon and whatever QEMU it left."""
        pid = self.qemu_pid()
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            lq.kill(self.proc)


class DomainQemu(lq.Qemu):
    """A lab QEMU that a libvirt daemon started (its pid from the daemon's pid file)."""

    def __init__(self, spec: lq.QemuSpec, daemon: Daemon, started_mono: float) -> None:
        super().__init__(spec, cast(Any, None), started_mono)
        self.daemon = daemon
        self.destroyed = False

    @property
    def pid(self) -> int:
        """QEMU's process id (0 while libvirt has not started it)."""
        return self.daemon.qemu_pid() or 0

    def alive(self) -> bool:
        """Whether the domain's QEMU runs (not a zombie)."""
        pid = self.daemon.qemu_pid()
        if pid is None:
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def stop(self) -> None:
        """``virsh destroy`` the domain (once)."""
        if self.destroyed:
            return
        self.destroyed = True
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                ["virsh", "-c", self.daemon.uri, "destroy", DOMAIN],
                capture_output=True,
                timeout=15,
                check=False,
            )
