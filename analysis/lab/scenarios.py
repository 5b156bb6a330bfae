"""The lab's scenarios: boot the guest, disturb it in a known way, record, check, summarize.

Every scenario boots the cached guest in a source QEMU (and, when it migrates, starts a
destination with ``-incoming defer``), waits until the agent's probes are up, then
records with ``analysis.record.recorder.Recorder`` (QMP of both QEMUs on their own monitors, the
agent through ``analysis.lab.proxy.Forwarder``, which follows the guest to the
destination) while it drives QEMU over a second monitor per QEMU (``Control``: every
command with a timeout, out-of-band where the main loop may be stuck). Then it checks the
guest's health, stops the recorder and writes ``lab-summary.txt``/``.json``.

==============  =================================================================
``precopy``     ``migrate`` with ``max-bandwidth`` (``--bandwidth``) until completed.
``postcopy``    precopy for ~1 s, then ``migrate-start-postcopy`` (postcopy-ram on
                both sides, ``postcopy-blocktime`` on the destination,
                ``max-postcopy-bandwidth`` = ``--bandwidth``); a memory workload
                (``--workload``, default 64M) makes the guest fault on missing pages.
``paused``      postcopy, then ``migrate-pause`` (OOB, source) for ``--hold``, then
                ``migrate-recover`` (OOB, destination, a new port) and ``migrate``
                with ``resume: true``. The vCPUs keep running on the destination: the
                behaviour libvirt merged; a vCPU touching a missing page blocks. The
                bandwidth limit only keeps the migration from completing before the
                pause: during the pause ``max-postcopy-bandwidth`` goes to 0 (no
                limit), so the recovered migration completes in a few hundred ms (it
                took 2.1 to 2.2 s at 50 MiB/s, a tenth of a scenario's wall time).
``paused-stop`` the same, with the destination's vCPUs stopped while the migration is
                paused, as the upstream patch proposed. QEMU's monitor hangs on ``stop``
                while postcopy-paused (the symptom of QEMU issue 1052: the main loop
                waits for a vCPU stuck on a missing page; seen here in 4 of 4 tries),
                so the lab sends ``stop`` to the destination *before* the pause, while
                postcopy-active (it returns once the faulting vCPUs have their pages),
                and ``cont`` once the recovered migration is postcopy-active again. It
                also sends ``query-status`` (1 s timeout) during the pause and records
                whether the monitor answered.
``stall``       SIGSTOP / SIGCONT of the whole source QEMU for each ``--stall`` (all
                vCPUs at once); the host measures each freeze between the two kill()
                calls. ``--clock-step`` first steps the guest's realtime through the
                lab hooks.
``stall-vcpu``  freeze ONE vCPU's host thread (``query-cpus-fast`` ``thread-id`` of
                ``--cpu``) with the cgroup v1 freezer for ``--stall`` while the others
                run. Needs a host thread per vCPU: KVM, or ``-accel tcg,thread=multi``
                (fine without migration). Each freeze is checked and retried (below).
==============  =================================================================

Freezing one vCPU without stalling the others (``stall-vcpu``). The freezer stops the
thread wherever it is, and under multi-threaded TCG a vCPU thread takes QEMU's big lock
(BQL, a glibc mutex in QEMU's .bss) on every exit from translated code, device access and
interrupt. Of 130 freezes of vCPU 1 (300 ms, 2 vCPUs, clocksource=tsc) 14 also stopped
CPU 0: 8 on the BQL, 6 in the guest. The three ways, told apart by
/proc/QEMU/task/*/{stat,wchan,syscall} and the mutex read from /proc/QEMU/mem (futex
word; owner thread id 8 bytes on):

- vCPU 1 frozen in user space holding the BQL: the main loop and vCPU 0 asleep in
  ``futex(BQL, FUTEX_WAIT_PRIVATE, 2)``, the mutex's owner vCPU 1's thread id (or
  word 2 and owner 0: frozen between the lock and the owner store).
- vCPU 1 frozen just after the BQL's holder woke it: it was queued on the BQL, the
  unlock's ``futex_wake`` picked it, and the freezer caught it on its way back to user
  space (stack ``__refrigerator`` < ``get_signal`` < ``exit_to_user_mode_loop``, last
  syscall still that futex wait). The BQL is free (word 0, owner 0), yet the main loop
  sleeps on it: glibc relies on the woken waiter to take the lock and pass the wake-up
  on, so nothing wakes it until vCPU 1 thaws. The main loop runs the guest's timers, so
  vCPU 0 then sleeps in its halt wait with nothing to wake it.
- Not QEMU's: vCPU 0's thread spinning (240 of 250 ms on CPU) while the main loop idles,
  both guest CPUs with RFLAGS.IF=0 (``info registers -a``): the guest's CPU 1 was frozen
  inside an interrupts-off section and CPU 0 spins on what it holds (lock-holder
  preemption, which KVM guests meet too).

In all three, vCPU 0's thread went to sleep at most once in the first 25 ms of the
freeze (6 of 6 measured), against 7 to 52 times in the 54 other freezes (the guest's 1 ms
sampler makes an idle vCPU halt and wake about every ms). With the canaries running, the
block can also come later (seen 47 to 461 ms into a 700 ms freeze, in about 1 of 3
freezes): CPU 0 then waits for CPU 1 in the guest's kernel, and its thread can still
sleep a few times a window while it spins (seen twice in 16 runs: on CPU 687 of 701 ms
and 631 of 703 ms, CPU 0 stalled 705 and 518 ms; 382 to 474 ms in the kept freezes that
left CPU 0 alone). So ``_freeze_thread`` watches the whole freeze in windows of
``FREEZE_CHECK_NS`` and keeps it only when every other vCPU thread slept at least
``FREEZE_MIN_SLEEPS`` times in each and none was on CPU for ``FREEZE_SPIN_SHARE`` of
``FREEZE_SPIN_WINDOWS`` windows in a row; otherwise it thaws
at once and freezes again (0.1 to 0.3 s later after a block in the first window, whose
loss stays under the 50 ms threshold; ``FREEZE_LATE_RETRY_S`` after a later one), up to
``FREEZE_ATTEMPTS`` times. A window can also fail when CPU 0 is merely busy for 20 ms
(a false alarm costs an attempt, never a wrong result). Each attempt is a
``freeze_attempt`` record in lab-steps.jsonl (a blocked one with the threads' states as
above and ``blocked_at_ns``); the ``inject`` record measures the kept freeze alone and
counts the attempts.

Besides the recorder's files, the run directory gets ``lab-steps.jsonl`` (each command
with its reply or timeout, each injected freeze with host times, and marks: baseline
start, disturbance start, settled), ``lab-health.json``, the serial consoles
(``serial-src.log``, ``serial-dst.log``), QEMU's own output (``qemu-*.log``) and meta.json
gains ``scenario`` and ``lab`` (parameters, accelerator, boot time, wall time,
``agent_url``: the forwarder the agent was recorded through, and with ``--listen``
``exporter_url``).

For Prometheus (docs/prometheus.md): ``--agent-listen HOST:PORT`` puts the forwarder on a
fixed address, so one scrape target reaches the guest's agent for the whole run (on the
source, then on the destination), and ``--listen HOST:PORT`` serves the host migration
exporter of ``tsprobe record --listen``, fed by the same recorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO, cast

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from analysis import rundir
from analysis.errors import RecorderError
from analysis.lab import qemu as lq
from analysis.lab.errors import LabError, QemuError, ScenarioError
from analysis.lab.guest import Guest, build_guest
from analysis.lab.proxy import Forwarder
from analysis.lab.summary import AGENT_METRICS, HEALTH, STEPS, render, write_summary
from analysis.record.exporter import ExporterServer, MigrationExporter, parse_listen
from analysis.record.qmp_endpoint import StatusChange
from analysis.record.recorder import Recorder
from analysis.rundir import JsonlWriter, host_now
from probe.canary import DEFAULT_CANARIES

#: The clocksources an x86_64 Linux kernel registers (``clocksource=`` takes one of them;
#: the kernel ignores any other name). Which are available depends on the machine:
#: ``kvm-clock`` only under KVM; the lab's TCG guest has tsc, hpet and acpi_pm.
CLOCKSOURCES = ("tsc", "hpet", "acpi_pm", "kvm-clock", "refined-jiffies", "jiffies")
#: The console line of the guest's init that names the clocksource it booted with.
CLOCKSOURCE_MARK = re.compile(r"tsprobe-lab: clocksource (\S+)")

SCENARIOS: dict[str, str] = {
    "precopy": "precopy migration with a bandwidth limit",
    "postcopy": "precopy, then postcopy with a memory workload",
    "paused": "postcopy, migrate-pause for --hold, recover; vCPUs keep running",
    "paused-stop": "as paused, with the destination's vCPUs stopped while paused",
    "stall": "SIGSTOP/SIGCONT the whole QEMU for each --stall",
    "stall-vcpu": "freeze one vCPU thread (--cpu) for --stall with the cgroup freezer",
}
MIGRATING = frozenset({"precopy", "postcopy", "paused", "paused-stop"})
#: ``--via``: who drives the migration.
VIAS = ("qemu", "libvirt")
POSTCOPY = frozenset({"postcopy", "paused", "paused-stop"})
DEFAULT_WORKLOAD = {"postcopy": "64M", "paused": "64M", "paused-stop": "64M"}
FREEZER = Path("/sys/fs/cgroup/freezer")
#: Console patterns that make a guest unhealthy: the kernel's, a failed module load, a
#: program of init's that crashed (busybox sh prints "Segmentation fault"), and a page of
#: the memory workload that lost a write.
OOPS = re.compile(
    r"Oops|BUG:|Kernel panic|general protection fault|WARNING: CPU|soft lockup|"
    r"hard LOCKUP|blocked for more than|segfault at|Call Trace|tsprobe-lab: insmod|"
    r"Segmentation fault|tsprobe-lab: workload: bad memory"
)
BOOT_TIMEOUT_S = 120.0
#: How long the guest's hooks may take to answer ``workload stop``: they wait up to 30 s
#: for the workload's verdict on its memory.
WORKLOAD_VERDICT_S = 40.0
#: stall-vcpu keeps a freeze only if every other vCPU thread slept (went idle and was
#: woken again) at least FREEZE_MIN_SLEEPS times in its first FREEZE_CHECK_NS: the
#: guest's 1 ms samplers make an unhindered vCPU do so about once per ms (seen: 7 to 52
#: times in 25 ms; at most once when blocked). Else it thaws and tries again.
FREEZE_CHECK_NS = 20_000_000
FREEZE_MIN_SLEEPS = 3
FREEZE_ATTEMPTS = 20
#: ... and is not on CPU for FREEZE_SPIN_SHARE of FREEZE_SPIN_WINDOWS windows in a row.
FREEZE_SPIN_SHARE = 0.95
FREEZE_SPIN_WINDOWS = 2
#: The settle time: the health check waits up to this long (from the agent's first
#: answer after the disturbance) for every CPU's sample count to advance (the samplers
#: report it about once a second). A CPU that took no sample in it is a guest that did
#: not recover (``analysis.lab.outcome``), so it must outlast a slow but live guest.
SAMPLING_WAIT_S = 10.0
#: The baseline goes on for up to this long past --baseline until a /clock sample came.
BASELINE_WAIT_S = 5.0
#: Seconds the recorder goes on after the guest settled, for the canaries' last events.
CANARY_DRAIN_S = 5.0
#: Seconds before freezing again after a freeze that blocked another vCPU past its start.
FREEZE_LATE_RETRY_S = 1.5
MIGRATION_TIMEOUT_S = 120.0
#: Threading of TCG (``analysis.lab.qemu.tcg_accel``, the one rule): the scenarios that
#: do not migrate run multi-threaded TCG (a host thread per vCPU) on every QEMU; the
#: migrating ones on QEMU 9.0 and newer, source and destination alike, and
#: single-threaded on older QEMU, whose multi-threaded TCG loses guest writes during a
#: migration. ``stall`` SIGSTOPs every thread at once, so it measures the same freeze
#: either way; multi-threaded, its guest gets both host CPUs. The memory workload checks
#: its pages on every pass and at its end (``guest_workload.py``); a bad page makes the
#: run unhealthy.

Say = Callable[[str], None]


@dataclass
class LabOptions:
    """What ``tsprobe lab run`` was asked for (durations in ns, sizes as typed)."""

    scenario: str
    out: Path
    vcpus: int = 2
    mem_mb: int = 512
    hold_ns: int = 3_000_000_000
    stalls_ns: tuple[int, ...] = (300_000_000,)
    cpu: int = 1
    workload: str | None = None
    workload_cpu: int = 0
    bandwidth: int = 50 * 1024 * 1024
    accel: str = "auto"
    #: ``--qemu``: a path, a command, or a version of a QEMU scripts/setup unpacked
    #: (``analysis.lab.qemu.resolve_qemu``); None: qemu-system-x86_64 on PATH.
    qemu: str | None = None
    clock_step_ns: int | None = None
    #: ``HOST:PORT`` for the host migration exporter (``tsprobe record --listen``), or None.
    listen: str | None = None
    #: ``HOST:PORT`` for the agent's forwarder (default: 127.0.0.1 and a free port).
    agent_listen: str | None = None
    #: The guest agent's ``--canaries`` (empty: none).
    canaries: tuple[str, ...] = DEFAULT_CANARIES
    #: A line written to the guest's /dev/kmsg before the disturbance, or None.
    kmsg: str | None = None
    #: Seconds of the undisturbed guest recorded first. The recorder's first /clock burst
    #: falls in them; the lag "before" also takes the samples up to the first stop (the
    #: precopy phase of a migration).
    baseline_s: float = 1.0
    #: Seconds to keep recording (and serving) after the guest settled.
    linger_s: float = 0.0
    postcopy_after_s: float = 1.0
    #: ``--clocksource``: the guest kernel's ``clocksource=`` (``tsc`` also gets
    #: ``tsc=reliable``); None: the kernel's own choice.
    clocksource: str | None = None
    #: ``--via``: ``qemu`` (the lab drives QEMU's monitors) or ``libvirt`` (two libvirt
    #: daemons and virsh: ``analysis.lab.libvirt``).
    via: str = "qemu"
    verbose: bool = True

    def check(self) -> None:
        """Reject impossible combinations with one line.

        :raise LabError: on a bad value.
        """
        if self.scenario not in SCENARIOS:
            raise LabError(
                f"unknown scenario {self.scenario!r}: choose from {', '.join(SCENARIOS)}"
            )
        if self.vcpus < 1:
            raise LabError("--vcpus must be at least 1")
        if self.mem_mb < 256:
            raise LabError("--mem must be at least 256M (the guest's initramfs needs it)")
        if self.scenario == "stall-vcpu" and not 0 <= self.cpu < self.vcpus:
            raise LabError(f"--cpu {self.cpu} is not a vCPU of a {self.vcpus}-vCPU guest")
        if self.scenario == "stall-vcpu" and self.vcpus < 2:
            raise LabError("stall-vcpu needs at least 2 vCPUs (one frozen, one running)")
        if not 0 <= self.workload_cpu < self.vcpus:
            raise LabError(f"--workload-cpu {self.workload_cpu} is not a vCPU of the guest")
        if self.bandwidth <= 0:
            raise LabError("--bandwidth must be positive")
        if self.baseline_s <= 0 or self.linger_s < 0:
            raise LabError("--baseline must be positive and --linger not negative")
        if any(s <= 0 for s in self.stalls_ns) or self.hold_ns <= 0:
            raise LabError("--stall and --hold must be positive")
        for flag, value in (("--listen", self.listen), ("--agent-listen", self.agent_listen)):
            if value is not None:
                try:
                    parse_listen(value)
                except RecorderError as err:
                    raise LabError(str(err).replace("--listen", flag, 1)) from None
        if self.clocksource is not None and self.clocksource not in CLOCKSOURCES:
            raise LabError(
                f"--clocksource {self.clocksource}: not a clocksource of the lab's x86 "
                f"kernel (the kernel would ignore it and keep its own): choose from "
                f"{', '.join(CLOCKSOURCES)}"
            )
        if self.via not in VIAS:
            raise LabError(f"--via {self.via}: choose from {', '.join(VIAS)}")
        if self.via == "libvirt":
            if self.scenario not in MIGRATING:
                raise LabError(
                    f"--via libvirt migrates: choose from {', '.join(sorted(MIGRATING))}"
                )
            from analysis.lab.libvirt import check_host

            check_host()
        if self.kmsg is not None and (not self.kmsg.strip() or "\n" in self.kmsg):
            raise LabError("--kmsg must be one non-empty line")
        if (self.out / rundir.META).exists():
            raise LabError(f"{self.out} already holds a recording: choose a new --out")
        lq.qemu_version(lq.resolve_qemu(self.qemu))  # a QEMU that runs, before booting

    def kernel_args(self) -> list[str]:
        """The words the lab appends to the guest's kernel command line (after
        ``analysis.lab.guest.BASE_CMDLINE``): the agent's canaries, the clocksource, the
        memory workload."""
        words = [f"tsprobe.canaries={','.join(self.canaries) or 'none'}"]
        if self.clocksource is not None:
            words += clocksource_args(self.clocksource)
        elif self.scenario == "stall-vcpu":
            # Under multi-threaded TCG every HPET read (the default clocksource) is MMIO
            # emulated under QEMU's big lock, which a frozen vCPU thread can keep from
            # the others (see the module docstring; seen: CPU 0 stalled 250-700 ms in 3
            # of 6 freezes of CPU 1 with the HPET). The TSC is read without leaving the
            # translated code, so fewer freezes need a retry.
            words += clocksource_args("tsc")
        if self.workload_size not in ("0", ""):
            words += [f"tsprobe.wss={self.workload_size}", f"tsprobe.wcpu={self.workload_cpu}"]
        return words

    @property
    def workload_size(self) -> str:
        """The workload's working set (``0``: none)."""
        if self.workload is not None:
            return self.workload
        return DEFAULT_WORKLOAD.get(self.scenario, "0")


class Control:
    """The scenario's own QMP monitor of one QEMU: commands with timeouts, logged."""

    def __init__(self, name: str, socket_path: Path, steps: JsonlWriter, say: Say) -> None:
        self.name = name
        self.socket_path = socket_path
        self.steps = steps
        self.say = say
        self.client = QMPClient(f"lab-{name}")

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and negotiate (OOB is enabled when QEMU offers it).

        :raise QemuError: when the monitor does not answer in time.
        """
        try:
            await asyncio.wait_for(self.client.connect(str(self.socket_path)), timeout_s)
        except (OSError, QMPError, TimeoutError) as err:
            raise QemuError(f"{self.name}: cannot connect to {self.socket_path}: {err}") from err

    async def cmd(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout_s: float = 10.0,
        oob: bool = False,
        check: bool = True,
    ) -> Any:
        """Run a command; log it (reply, error or timeout) to lab-steps.jsonl.

        :raise ScenarioError: on an error reply or a timeout (when ``check``).
        :return: the command's return value, or None after a tolerated failure.
        """
        real0, mono0 = host_now()
        record: dict[str, Any] = {
            "type": "command",
            "endpoint": self.name,
            "command": command,
            "arguments": arguments or {},
            "oob": oob,
            "host_real_ns": real0,
            "host_mono_ns": mono0,
        }
        try:
            result = await asyncio.wait_for(
                self.client.execute(command, arguments, oob=oob), timeout_s
            )
        except TimeoutError as err:
            record.update(outcome="timeout", timeout_s=timeout_s)
            self._log(record, mono0)
            if check:
                raise ScenarioError(
                    f"{self.name}: {command} got no answer within {timeout_s:g} s"
                ) from err
            return None
        except QMPError as err:
            record.update(outcome="error", error=str(err))
            self._log(record, mono0)
            if check:
                raise ScenarioError(f"{self.name}: {command} failed: {err}") from err
            return None
        record.update(outcome="reply", **{"return": result})
        self._log(record, mono0)
        return result

    def _log(self, record: dict[str, Any], mono0: int) -> None:
        record["elapsed_ns"] = time.monotonic_ns() - mono0
        self.steps.write(record)

    async def close(self) -> None:
        """Disconnect (never raises)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.disconnect(), 2.0)


def _get(url: str, timeout_s: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body: bytes = resp.read()
        return body


def _healthz(port: int, timeout_s: float) -> dict[str, Any]:
    """The agent's /healthz on ``port``, parsed.

    :raise OSError: when it does not answer; ValueError: when the answer is not JSON.
    """
    health = json.loads(_get(f"http://127.0.0.1:{port}/healthz", timeout_s))
    if not isinstance(health, dict):
        raise ValueError("/healthz did not answer a JSON object")
    return health


def _sample_counts(health: dict[str, Any]) -> dict[str, float]:
    """Each CPU's sampler iterations from a /healthz answer (cheaper for a loaded guest
    than /metrics)."""
    return {str(cpu): float(n) for cpu, n in (health.get("samples") or {}).items()}


def _probes_down(health: dict[str, Any], probes: tuple[str, ...]) -> list[str]:
    """Those of ``probes`` that a /healthz answer does not report up."""
    states = health.get("probes", {})
    return [p for p in probes if not states.get(p, {}).get("up")]


def required_probes(canaries: tuple[str, ...]) -> tuple[str, ...]:
    """The probes the lab waits for before the disturbance and checks after it."""
    return ("stall", "clock", "kmsg", *canaries)


def wait_agent(port: int, qemu: lq.Qemu, timeout_s: float, probes: tuple[str, ...]) -> float:
    """Wait until the agent answers on ``port`` and each of ``probes`` is up (the stall
    probe is up once its sampler on every CPU reported).

    :raise QemuError: when QEMU dies or the agent is not ready in time.
    :return: seconds since QEMU was started.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, ValueError):
            if not _probes_down(_healthz(port, 1.0), probes):
                return time.monotonic() - qemu.started_mono
        if not qemu.alive():
            raise QemuError(f"{qemu.spec.name} QEMU exited: {qemu.stderr_tail() or '?'}")
        if time.monotonic() > deadline:
            tail = qemu.console().strip().splitlines()[-3:]
            raise QemuError(
                f"the guest's agent was not ready after {timeout_s:.0f} s "
                f"(console: {' | '.join(tail) or 'empty'})"
            )
        time.sleep(0.2)


#: How long the lab waits for the guest's hooks to listen (busybox nc, started by init
#: right before the agent: its port is open long before the agent's).
HOOKS_WAIT_S = 15.0


def hooks_command(
    port: int, line: str, timeout_s: float = 5.0, wait_s: float = HOOKS_WAIT_S
) -> dict[str, Any]:
    """Send one line to the guest's lab hooks (port forwarded to guest 9467).

    QEMU's user network accepts the host's connection before the guest does: while the
    hooks are not listening yet, the connection ends (or is reset) without a byte. Only
    that is tried again, every 0.2 s for up to ``wait_s``: the hooks answer every line
    they read, so a line they acted on is not sent twice.

    :raise ScenarioError: when the hooks do not answer or answer an error.
    """
    import socket

    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
                sock.sendall(line.encode() + b"\n")
                reply = sock.makefile("r").readline()
        except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
            reply = ""  # not listening yet, as an empty answer
        except OSError as err:
            raise ScenarioError(f"lab hooks did not answer {line!r}: {err}") from err
        if reply:
            break
        if time.monotonic() >= deadline:
            raise ScenarioError(f"lab hooks did not answer {line!r} within {wait_s:g} s")
        time.sleep(0.2)
    try:
        result: dict[str, Any] = json.loads(reply)
    except ValueError as err:
        raise ScenarioError(f"lab hooks did not answer {line!r}: {err}") from err
    if not result.get("ok"):
        raise ScenarioError(f"lab hooks refused {line!r}: {result.get('error')}")
    return result


#: How long the agent may take to answer /healthz after the scenario.
AGENT_ANSWER_S = 15.0
#: How long a probe may stay down after the scenario before the health check reports it.
PROBE_RECOVERY_S = 10.0
#: Timeout of each /healthz read of the health check's first poll.
HEALTH_READ_S = 3.0


def memory_problem(verdict: dict[str, Any] | None) -> str:
    """The health problem in the workload's verdict on its memory (empty: none).

    A verdict with bad pages is a problem, and so is none at all: the workload ran, so a
    guest that cannot say its memory is intact is not known to be healthy.
    """
    if verdict is None:
        return "memory: the workload was not stopped (no verdict on the guest's memory)"
    if "bad_pages" not in verdict:
        why = verdict.get("verdict") or "none"
        return f"memory: the workload gave no verdict on the guest's memory ({why})"
    if int(verdict["bad_pages"]):
        return (
            f"memory: {verdict['bad_pages']} of {verdict.get('pages')} workload pages lost "
            f"a write (the guest's memory is corrupted)"
        )
    return ""


def memory_line(verdict: dict[str, Any] | None) -> str:
    """The verdict in a few words."""
    if not verdict or "bad_pages" not in verdict:
        return "no verdict"
    return (
        f"{verdict['bad_pages']} bad of {verdict.get('pages')} workload pages "
        f"({verdict.get('checks')} page checks over {verdict.get('passes')} passes)"
    )


def _poll_health(
    port: int, probes: tuple[str, ...], on_answer: Callable[[], object] | None = None
) -> tuple[dict[str, Any], list[str], Exception | None, dict[str, float | None]]:
    """Read the agent's /healthz every 0.5 s until it answers (for ``AGENT_ANSWER_S``),
    then until none of ``probes`` is down (for ``PROBE_RECOVERY_S`` more): right after a
    long stall (paused: 4 s) a worker's sign of life is late and /healthz calls its probe
    down for a moment (CI saw "stall" and "timer").

    Each read may take ``HEALTH_READ_S``: a request sent while the guest is still
    catching up after a migration can go unanswered for longer than a later one (a
    /healthz sent when the migration completed was answered 6.2 s later, while the
    recorder's requests were answered from 4.1 s on), so a slow read is sent again.
    ``on_answer`` is called once, at the first answer.

    :return: the last answer (empty without one), the probes down in it, the last error
        when there was no answer, and the seconds until the first answer and until every
        probe was up (``answer_s``, ``probes_up_s``; None when it did not happen).
    """
    health: dict[str, Any] = {}
    err: Exception | None = None
    start = time.monotonic()
    deadline = start + AGENT_ANSWER_S
    times: dict[str, float | None] = {"answer_s": None, "probes_up_s": None}
    while True:
        try:
            health = _healthz(port, HEALTH_READ_S)
        except (OSError, ValueError) as error:
            err = error
        if health and times["answer_s"] is None:
            times["answer_s"] = round(time.monotonic() - start, 2)
            deadline = time.monotonic() + PROBE_RECOVERY_S
            if on_answer is not None:
                on_answer()
        down = _probes_down(health, probes) if health else []
        if health and not down:
            times["probes_up_s"] = round(time.monotonic() - start, 2)
        if times["probes_up_s"] is not None or time.monotonic() > deadline:
            return health, down, None if health else err, times
        time.sleep(0.5)


def _get_or_error(url: str, timeout_s: float) -> tuple[bytes, Exception | None]:
    """``_get``, with the error that ended the request returned instead of raised."""
    try:
        return _get(url, timeout_s), None
    except (OSError, ValueError) as err:
        return b"", err


def _sampling_rates(
    port: int, first: dict[str, float], cpus: int, with_window: bool = False
) -> dict[str, float]:
    """Read /healthz every 0.5 s until every CPU's sample count moved past ``first`` (or
    for ``SAMPLING_WAIT_S``); return each CPU's samples per second since ``first``.

    A count that has not moved reads 0; ``with_window`` adds ``window_s``, the seconds
    read. The rates are rough: a sampler reports its count
    about once a second, so a count sent before a stall and filed after it lands inside
    the window (above 1000/s at a 1 ms interval).

    :raise OSError: when /healthz does not answer; ValueError: when it answers no JSON.
    """
    t0 = time.monotonic()
    wanted = [str(c) for c in range(cpus)]
    while True:
        time.sleep(0.5)
        counts = _sample_counts(_healthz(port, 10.0))
        span = time.monotonic() - t0
        rates = {c: (n - first.get(c, 0)) / span for c, n in counts.items()}
        if all(rates.get(c, 0) > 0 for c in wanted) or span > SAMPLING_WAIT_S:
            return {**rates, "window_s": span} if with_window else rates


def check_health(
    final: lq.Qemu,
    qemus: list[lq.Qemu],
    cpus: int,
    canaries: tuple[str, ...] = (),
    injected: str | None = None,
    on_answer: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Check the guest after the scenario: consoles, agent, every CPU sampling.

    :param final: the QEMU the guest runs in now.
    :param qemus: every QEMU of the scenario (their consoles are scanned).
    :param cpus: the number of vCPUs.
    :param canaries: the canaries the agent runs (each must be up).
    :param injected: the line the lab wrote to /dev/kmsg itself (``--kmsg``), not an oops.
    :param on_answer: called once when the agent first answers.
    :return: ``{"ok", "problems", ...}`` (also written as lab-health.json).
    """
    problems: list[str] = []
    oopses = []
    for q in qemus:
        for line in q.console().splitlines():
            if OOPS.search(line) and not (injected and injected.strip() in line):
                oopses.append(f"{q.spec.name}: {line.strip()}")
    if oopses:
        problems.append(f"console: {oopses[0]}")
    if not final.alive():
        problems.append(f"{final.spec.name} QEMU exited")
    port = final.spec.agent_port
    health, down, err, times = _poll_health(port, required_probes(canaries), on_answer)
    if not health:
        problems.append(f"agent on {final.spec.name} does not answer: {err}")
    if health and down:
        problems.append(f"probes down: {', '.join(down)}")
    rates: dict[str, float] = {}
    window: float | None = None
    if health:
        # The poll's last answer is the first read: _poll_health returns right after it.
        try:
            rates = _sampling_rates(port, _sample_counts(health), cpus, with_window=True)
        except (OSError, ValueError) as err:
            problems.append(f"/healthz failed: {err}")
        window = rates.pop("window_s", None)
        idle = [c for c in map(str, range(cpus)) if rates.get(c, 0) <= 0]
        if idle:
            problems.append(f"CPU {','.join(idle)} not sampling")
    return {
        "ok": not problems,
        "problems": problems,
        "final": final.spec.name,
        "oopses": oopses[:20],
        "agent_status": health.get("status"),
        "probes_down": health.get("down"),
        "samples_per_s": {c: round(v, 1) for c, v in rates.items()},
        "sampling_window_s": None if window is None else round(window, 2),
        "settle_s": SAMPLING_WAIT_S,
        **times,
    }


class _Freezer:
    """A cgroup v1 freezer group holding one thread."""

    def __init__(self, tid: int) -> None:
        if not (FREEZER / "tasks").exists():
            raise ScenarioError(f"no cgroup v1 freezer at {FREEZER}: stall-vcpu needs one")
        self.tid = tid
        self.group = FREEZER / f"tsprobe-lab-{os.getpid()}-{tid}"
        self.group.mkdir(exist_ok=True)
        (self.group / "tasks").write_text(str(tid))

    def set(self, state: str, timeout_s: float = 2.0) -> None:
        (self.group / "freezer.state").write_text(state)
        deadline = time.monotonic() + timeout_s
        while (self.group / "freezer.state").read_text().strip() != state:
            if time.monotonic() > deadline:
                raise ScenarioError(f"the freezer did not reach {state} in {timeout_s} s")
            time.sleep(0.0005)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            (self.group / "freezer.state").write_text("THAWED")
        with contextlib.suppress(OSError):
            (FREEZER / "tasks").write_text(str(self.tid))
        with contextlib.suppress(OSError):
            self.group.rmdir()


class Scenario:
    """One run of a scenario (use ``run_scenario``)."""

    #: Let the recorder wait for monitors that appear later (libvirt starts the
    #: destination's QEMU only when the migration begins).
    reconnect_monitors = False

    def __init__(self, opts: LabOptions, guest: Guest, say: Say) -> None:
        self.opts = opts
        self.guest = guest
        self.say = say
        self.out = opts.out
        self.migrates = opts.scenario in MIGRATING
        self.qemus: list[lq.Qemu] = []
        self.controls: dict[str, Control] = {}
        self.status_events: dict[tuple[str, str], asyncio.Event] = {}
        self.forwarder: Forwarder | None = None
        self.recorder: Recorder | None = None
        self.exporter_server: ExporterServer | None = None
        self.accel = "tcg"
        self.accel_note = ""
        self.accel_why = ""
        self.binary = ""
        self.version: lq.QemuVersion | None = None
        self.boot_s: float | None = None
        #: The memory workload's verdict (its answer to ``workload stop``), when it ran.
        self.memory: dict[str, Any] | None = None
        self.steps: JsonlWriter | None = None
        self.sockdir = Path(tempfile.mkdtemp(prefix="tsprobe-lab-"))
        self.info: dict[str, Any] = {}

    # -- helpers ---------------------------------------------------------------------------

    def mark(self, name: str) -> None:
        """Record a named host time (the summary's windows)."""
        assert self.steps is not None
        self.steps.write_stamped({"type": "mark", "name": name})

    def _on_status(self, change: StatusChange) -> None:
        self.status_events.setdefault((change.endpoint, change.status), asyncio.Event()).set()
        if (
            self.forwarder is not None
            and len(self.qemus) > 1
            and change.status in ("postcopy-active", "completed")
        ):
            self.forwarder.target = self.qemus[1].spec.agent_port

    async def wait_status(self, endpoint: str, statuses: tuple[str, ...], timeout_s: float) -> str:
        """Wait until ``endpoint`` reports one of ``statuses``.

        :raise ScenarioError: on ``failed``/``cancelled`` or a timeout.
        :return: the status reached.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            for status in statuses:
                event = self.status_events.get((endpoint, status))
                if event is not None and event.is_set():
                    return status
            for bad in ("failed", "cancelled"):
                if bad not in statuses and (endpoint, bad) in self.status_events:
                    raise ScenarioError(f"{endpoint}: migration {bad}")
            if time.monotonic() > deadline:
                raise ScenarioError(
                    f"{endpoint} did not reach {'/'.join(statuses)} within {timeout_s:g} s"
                )
            await asyncio.sleep(0.02)

    # -- boot ------------------------------------------------------------------------------

    def boot(self) -> None:
        """Choose the accelerator, start the QEMUs, wait for the agent."""
        self.binary = lq.resolve_qemu(self.opts.qemu)
        self.version = version = lq.qemu_version(self.binary)
        scenario_accel, self.accel_why = lq.tcg_accel(self.migrates, version)
        self.accel, self.accel_note = lq.choose_accel(
            self.opts.accel, self.guest, self.sockdir, scenario_accel, self.binary
        )
        if self.accel_note:
            self.say(self.accel_note)
        self.say(f"QEMU {version.number} ({self.binary}): {self.accel_line()}")
        if self.migrates and self.accel == "tcg-multi" and scenario_accel != "tcg-multi":
            self.say(f"note: multi-threaded TCG forced ({self.accel_why})")
        cmdline = self.opts.kernel_args()
        common = {
            "guest": self.guest,
            "workdir": self.sockdir,
            "binary": self.binary,
            "accel": self.accel,
            "mem_mb": self.opts.mem_mb,
            "vcpus": self.opts.vcpus,
            "cmdline": cmdline,
        }
        src_spec = lq.QemuSpec(name="src", **common)  # type: ignore[arg-type]
        self.say(
            f"booting the guest ({self.guest.boot}, {self.accel}, {self.opts.vcpus} vCPUs, "
            f"{self.opts.mem_mb} MiB, workload {self.opts.workload_size})"
        )
        self.qemus.append(lq.start(src_spec))
        if self.migrates:
            dst_spec = lq.QemuSpec(name="dst", incoming=True, **common)  # type: ignore[arg-type]
            self.qemus.append(lq.start(dst_spec))
        # Every probe the health check wants, not the samplers alone: a canary or the
        # clock probe that comes up during the disturbance misses it (seen on a 18 s boot:
        # the canaries came up after the pause, and no /clock burst fell in the baseline).
        self.boot_s = round(
            wait_agent(
                src_spec.agent_port,
                self.qemus[0],
                BOOT_TIMEOUT_S,
                required_probes(self.opts.canaries),
            ),
            2,
        )
        if self.opts.workload_size not in ("0", ""):
            self.qemus[0].wait_console("tsprobe-lab: workload:", 30)
        self.say(f"guest agent up, sampling every CPU {self.boot_s} s after QEMU started")
        self._note_clocksource()

    def _note_clocksource(self) -> None:
        """Record the clocksource asked for and the one the guest uses (its agent's /clock
        says, else the line its init printed at boot), and say so in one line when the
        kernel did not keep the one asked for."""
        used = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            clock = json.loads(_get(f"http://127.0.0.1:{self.qemus[0].spec.agent_port}/clock"))
            used = clock.get("clocksource")
        if not isinstance(used, str):
            found = CLOCKSOURCE_MARK.search(self.qemus[0].console())
            used = found.group(1) if found else None
        asked = self.opts.clocksource
        self.info["clocksource_requested"] = asked
        self.info["clocksource_used"] = used
        if asked is not None and used != asked:
            self.say(
                f"--clocksource {asked}: the guest's kernel did not keep it; "
                f"the guest uses {used or 'an unknown clocksource'}"
            )
        else:
            self.say(f"clocksource {used} ({'asked for' if asked else 'the kernel choice'})")

    # -- the drivers -------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Drive a precopy/postcopy/paused/paused-stop migration to completion."""
        src, dst = self.controls["src"], self.controls["dst"]
        scenario = self.opts.scenario
        postcopy = scenario in POSTCOPY
        if postcopy:
            caps = [{"capability": "postcopy-ram", "state": True}]
            await src.cmd("migrate-set-capabilities", {"capabilities": caps})
            await dst.cmd(
                "migrate-set-capabilities",
                {"capabilities": [*caps, {"capability": "postcopy-blocktime", "state": True}]},
            )
        params: dict[str, Any] = {"max-bandwidth": self.opts.bandwidth}
        if postcopy:
            params["max-postcopy-bandwidth"] = self.opts.bandwidth
        await src.cmd("migrate-set-parameters", params)
        port = lq.free_port()
        uri = f"tcp:127.0.0.1:{port}"
        await dst.cmd("migrate-incoming", {"uri": uri})
        self.mark("disturb_start")
        self.say(f"migrate to {uri} ({scenario}, max-bandwidth {self.opts.bandwidth >> 20} MiB/s)")
        await src.cmd("migrate", {"uri": uri})
        await self.wait_status("src", ("active", "completed"), 30)
        if postcopy:
            await asyncio.sleep(self.opts.postcopy_after_s)
            self.say("migrate-start-postcopy")
            await src.cmd("migrate-start-postcopy")
            await self.wait_status("dst", ("postcopy-active", "completed"), 30)
        if scenario in ("paused", "paused-stop"):
            await self._pause_and_recover(src, dst)
        await self.wait_status("src", ("completed",), MIGRATION_TIMEOUT_S)
        await self.wait_status("dst", ("completed",), 30)
        self.say("migration completed")

    async def _pause_and_recover(self, src: Control, dst: Control) -> None:
        stop_policy = self.opts.scenario == "paused-stop"
        await asyncio.sleep(0.3)
        if self.status_events.get(("src", "completed")):
            raise ScenarioError(
                "postcopy completed before migrate-pause could be sent: lower --bandwidth "
                "or raise --workload"
            )
        if stop_policy:
            self.say("stop on the destination (before the pause: it hangs while paused)")
            await dst.cmd("stop", timeout_s=30)
        self.say(f"migrate-pause (OOB) on the source; holding {self.opts.hold_ns / 1e9:g} s")
        await src.cmd("migrate-pause", oob=True, timeout_s=5)
        await self.wait_status("src", ("postcopy-paused",), 15)
        await self.wait_status("dst", ("postcopy-paused",), 15)
        t_paused = time.monotonic()
        if stop_policy:
            answered = await dst.cmd("query-status", timeout_s=1.0, check=False)
            self.info["dst_monitor_answered_while_paused"] = answered is not None
            self.say(
                "destination monitor "
                + ("answered query-status" if answered is not None else "did not answer")
                + " while postcopy-paused"
            )
        # The recovered channel takes max-postcopy-bandwidth when it connects.
        await src.cmd("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
        await asyncio.sleep(max(0.0, self.opts.hold_ns / 1e9 - (time.monotonic() - t_paused)))
        port = lq.free_port()
        uri = f"tcp:127.0.0.1:{port}"
        event = self.status_events.get(("dst", "postcopy-active"))
        if event is not None:
            event.clear()  # wait for the recovered migration's postcopy-active below
        self.say(f"migrate-recover (OOB) on the destination at {uri}, resume the source")
        await dst.cmd("migrate-recover", {"uri": uri}, oob=True, timeout_s=10)
        await src.cmd("migrate", {"uri": uri, "resume": True}, timeout_s=10)
        if stop_policy:
            await self.wait_status("dst", ("postcopy-active", "completed"), 60)
            self.say("cont on the destination")
            await dst.cmd("cont", timeout_s=30)

    async def stall(self) -> None:
        """SIGSTOP/SIGCONT the source QEMU for each --stall (and a clock step first)."""
        await self._clock_step()
        pid = self.qemus[0].pid
        self.mark("disturb_start")
        for index, stall_ns in enumerate(self.opts.stalls_ns):
            if index:
                await asyncio.sleep(2.5)
            self.say(f"SIGSTOP QEMU (pid {pid}) for {stall_ns / 1e6:g} ms")
            record = await asyncio.to_thread(_freeze_process, pid, stall_ns)
            self._inject(record, "SIGSTOP QEMU")

    async def stall_vcpu(self) -> None:
        """Freeze one vCPU thread with the cgroup freezer for each --stall."""
        await self._clock_step()
        cpus = await self.controls["src"].cmd("query-cpus-fast")
        threads = {int(c["cpu-index"]): int(c["thread-id"]) for c in cpus}
        if len(set(threads.values())) < len(threads):
            raise ScenarioError(
                f"the vCPUs share host threads ({self.accel}): stall-vcpu needs KVM or "
                "multi-threaded TCG"
            )
        tid = threads[self.opts.cpu]
        steps = self.steps
        assert steps is not None

        def note(attempt: dict[str, Any]) -> None:  # from the freezing thread
            steps.write(attempt)
            if attempt["outcome"] == "blocked":
                why = (
                    f"on CPU {FREEZE_SPIN_WINDOWS} windows of {attempt['check_ns'] / 1e6:.0f} ms"
                    if attempt["blocked_by"] == "spin"
                    else f"too few sleeps in {attempt['check_ns'] / 1e6:.0f} ms"
                )
                self.say(
                    f"  attempt {attempt['attempt']} blocked another vCPU "
                    f"{attempt['blocked_at_ns'] / 1e6:.0f} ms into the freeze ({why}): "
                    "thawed, freezing again"
                )

        self.mark("disturb_start")
        for index, stall_ns in enumerate(self.opts.stalls_ns):
            if index:
                await asyncio.sleep(2.5)
            self.say(f"freezing vCPU {self.opts.cpu} (thread {tid}) for {stall_ns / 1e6:g} ms")
            record = await asyncio.to_thread(
                _freeze_thread, self.opts.cpu, threads, stall_ns, self.qemus[0].pid, note
            )
            self._inject(record, f"cgroup-freeze vCPU {self.opts.cpu}", cpu=self.opts.cpu)

    def _inject(self, record: dict[str, Any], what: str, **extra: Any) -> None:
        assert self.steps is not None
        self.steps.write({"type": "inject", "what": what, **record, **extra})
        self.say(f"  host-measured freeze {record['freeze_ns'] / 1e6:.1f} ms")

    async def _clock_step(self) -> None:
        if self.opts.clock_step_ns is None:
            return
        self.say(f"stepping the guest's realtime by {self.opts.clock_step_ns / 1e9:+g} s")
        await self._hooks(self.qemus[0], f"step {self.opts.clock_step_ns}", "clock_step")
        await asyncio.sleep(1.5)
        await self._baseline()  # a new one, after the step

    async def _baseline(self) -> None:
        """Mark the baseline's start and record the undisturbed guest for ``baseline_s``,
        and on until the recorder has a /clock sample taken in it (for the lag before; at
        most BASELINE_WAIT_S more): the busy guest's agent sometimes answered no burst in
        1 s."""
        recorder = self.recorder
        assert recorder is not None

        def samples() -> int:
            return sum(a.summary.clock_samples for a in recorder.agents.values())

        self.mark("baseline_start")
        before = samples()
        await asyncio.sleep(self.opts.baseline_s)
        deadline = time.monotonic() + BASELINE_WAIT_S
        while time.monotonic() < deadline and samples() == before:
            await asyncio.sleep(0.1)

    def _stop_workload(self) -> asyncio.Future[None] | None:
        """Ask the final guest's hooks to stop the memory workload, in the background;
        its answer is the workload's verdict on the guest's memory (``self.memory``).

        Its job ends with the migration, and on the destination (whose QEMU translates the
        guest's code anew) it delays the agent's answers to the health check: the first
        came after 2.9 to 8.7 s with it and 1.2 to 3.9 s without (paused, 4 runs each).
        """
        if not self.migrates or self.opts.workload_size in ("0", ""):
            return None
        steps = self.steps
        assert steps is not None

        async def stop() -> None:
            try:
                self.memory = await self._hooks(
                    self.qemus[-1], "workload stop", "workload_stop", WORKLOAD_VERDICT_S
                )
            except ScenarioError as err:
                self.say(f"the memory workload was not stopped: {err}")
                steps.write_stamped({"type": "workload_stop", "ok": False, "error": str(err)})

        return asyncio.ensure_future(stop())

    async def _write_kmsg(self) -> None:
        if self.opts.kmsg is None:
            return
        self.say(f"writing to the guest's /dev/kmsg: {self.opts.kmsg}")
        await self._hooks(self.qemus[0], f"kmsg {self.opts.kmsg}", "kmsg")

    async def _hooks(
        self, qemu: lq.Qemu, line: str, kind: str, timeout_s: float = 5.0
    ) -> dict[str, Any]:
        """Send ``line`` to ``qemu``'s guest hooks; record the answer as a ``kind`` step.

        :param timeout_s: how long the answer may take once the line was sent.
        :raise ScenarioError: when the hooks do not answer or refuse.
        :return: the answer.
        """
        reply = await asyncio.to_thread(hooks_command, qemu.spec.hooks_port, line, timeout_s)
        assert self.steps is not None
        self.steps.write_stamped({"type": kind, **reply})
        return reply

    # -- the whole run ---------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Boot, record, drive, check; return the lab info for meta.json."""
        started = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        # In this (the main) thread: each QEMU gets PR_SET_PDEATHSIG, which fires when the
        # thread that started it ends, so a worker thread would take QEMU down with it.
        self.boot()
        self.steps = JsonlWriter(self.out / STEPS)
        await self.connect_controls()
        await self._start_forwarder()
        assert self.forwarder is not None
        exporter = None
        if self.opts.listen is not None:
            exporter = MigrationExporter(
                [q.spec.name for q in self.qemus], {"guest": self.forwarder.url}, run=str(self.out)
            )
            try:
                self.exporter_server = exporter.serve(self.opts.listen)
            except RecorderError as err:
                raise ScenarioError(str(err)) from err
            self.info["exporter_url"] = f"http://{self.exporter_server.address}/metrics"
            self.say(f"serving the migration state on {self.info['exporter_url']}")
        lab_meta = self.lab_meta(started)
        recorder = Recorder(
            self.out,
            qmp={q.spec.name: str(q.spec.qmp_socket) for q in self.qemus},
            agents={"guest": self.forwarder.url},
            grace_ns=600_000_000_000,
            on_status=self._on_status,
            command_timeout_ns=1_000_000_000,
            clock_period_ns=250_000_000,
            events_poll_ns=250_000_000,
            status_stream=cast(TextIO, _Prefixed(self.say)) if self.opts.verbose else None,
            command_line=["tsprobe", "lab", "run", "--scenario", self.opts.scenario]
            + (["--via", self.opts.via] if self.opts.via != "qemu" else []),
            reconnect=self.reconnect_monitors,
            extra_meta={"scenario": self.opts.scenario, "lab": lab_meta},
            on_record=None if exporter is None else exporter.observe,
        )
        self.recorder = recorder
        task = asyncio.ensure_future(recorder.run())
        workload_stop: asyncio.Future[None] | None = None
        try:
            await _first(recorder.started.wait(), task, 30)
            if task.done():
                task.result()
            await self._write_kmsg()
            await self._baseline()
            if self.migrates:
                await self.migrate()
            elif self.opts.scenario == "stall":
                await self.stall()
            else:
                await self.stall_vcpu()
            self.mark("settled")
            workload_stop = self._stop_workload()
            # The canaries' events reach the recorder late under TCG: each canary sends
            # them with its once-a-second life line, and the busy guest's agent takes a
            # while to file them (measured from /events in an idle TCG guest: p50 1.8 s,
            # p90 2.9 s, max 4.7 s after the measurement ended). The recorder keeps
            # fetching during the health check, so the wait counts from here.
            drain_end = time.monotonic() + CANARY_DRAIN_S
            await asyncio.sleep(self.opts.linger_s)
            final = self.qemus[-1]
            # The agent's last /metrics, kept for the summary's counters. It is asked for
            # when the health check's first /healthz is answered, so that the slow guest
            # renders it while the health check goes on and the canaries drain: asked for
            # after the health check, it took 2 to 7 s more in paused runs. A request sent
            # before the agent answers at all (right after the migration) can hang for
            # longer than its timeout. Rendering delays the agent's answers, so the
            # recorder's last /clock burst waits for it (the only sample after a precopy's
            # switchover once read 69 ms of round trip beside it, against 12 to 44 ms).
            # Its counters can miss a canary expiration filed after it, while the
            # canaries drain; guest-events.jsonl has every one.
            url = f"http://127.0.0.1:{final.spec.agent_port}/metrics"
            loop = asyncio.get_running_loop()
            fetches: list[asyncio.Future[tuple[bytes, Exception | None]]] = []

            def fetch_metrics() -> None:
                if not fetches:
                    fetch = asyncio.to_thread(_get_or_error, url, 10.0)
                    fetches.append(asyncio.ensure_future(fetch))

            self.say(f"checking the guest's health on {final.spec.name}")
            health = await asyncio.to_thread(
                check_health,
                final,
                self.qemus,
                self.opts.vcpus,
                self.opts.canaries,
                self.opts.kmsg,
                lambda: loop.call_soon_threadsafe(fetch_metrics),
            )
            self.mark("health_checked")
            self.say(
                f"lab health checks: {'ok' if health['ok'] else '; '.join(health['problems'])} "
                f"(agent answered after {health['answer_s']} s, probes up after "
                f"{health['probes_up_s']} s; samples/s {health['samples_per_s']})"
            )
            # A fetch_metrics scheduled by the first answer has run: it was queued before
            # check_health's return. Without an answer, /metrics is asked for now.
            fetch_metrics()
            metrics = fetches[0]
            if self.opts.canaries:
                await asyncio.sleep(max(0.0, drain_end - time.monotonic()))
            body, error = await metrics
            self.mark("metrics_fetched")
            if workload_stop is not None:
                await workload_stop
        finally:
            if workload_stop is not None and not workload_stop.done():
                workload_stop.cancel()
            recorder.stop("lab scenario done")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
            self.mark("recording_stopped")
        if error is not None:
            health["problems"].append(f"/metrics failed: {error}")
            health["ok"] = False
            self.say(f"health: /metrics failed: {error}")
        if workload_stop is not None:
            health["memory"] = self.memory
            problem = memory_problem(self.memory)
            if problem:
                health["problems"].append(problem)
                health["ok"] = False
            self.say(f"memory: {problem or memory_line(self.memory)}")
        if body:
            (self.out / AGENT_METRICS).write_bytes(body)
        rundir.write_json_atomic(self.out / HEALTH, health)
        return self.lab_meta(started)

    async def connect_controls(self) -> None:
        """Connect the scenario's own monitor of each QEMU."""
        assert self.steps is not None
        for q in self.qemus:
            self.controls[q.spec.name] = Control(
                q.spec.name, q.spec.ctl_socket, self.steps, self.say
            )
            await self.controls[q.spec.name].connect()

    async def _start_forwarder(self) -> None:
        """Start the agent's forwarder (on ``--agent-listen`` when given)."""
        host, port = "127.0.0.1", 0
        if self.opts.agent_listen is not None:
            host, port = parse_listen(self.opts.agent_listen)
        self.forwarder = Forwarder(self.qemus[0].spec.agent_port, host, port)
        try:
            await self.forwarder.start()
        except OSError as err:
            raise ScenarioError(
                f"--agent-listen {self.opts.agent_listen}: cannot listen: {err.strerror or err}"
            ) from err
        self.info["agent_url"] = self.forwarder.url
        if self.opts.agent_listen is not None:
            self.say(f"the guest's agent is at {self.forwarder.url}/metrics for the whole run")

    def accel_line(self) -> str:
        """The accelerator in a few words: ``tcg thread=multi (why)``."""
        if self.accel == "kvm":
            return "kvm"
        threads = "multi" if self.accel == "tcg-multi" else "single"
        forced = self.opts.accel in ("tcg-single", "tcg-multi")
        why = f"--accel {self.opts.accel}" if forced else self.accel_why
        return f"tcg thread={threads}" + (f" ({why})" if why else "")

    def lab_meta(self, started: float) -> dict[str, Any]:
        """The ``lab`` section of meta.json."""
        opts = asdict(self.opts)
        opts["out"] = str(self.opts.out)
        version = self.version
        return {
            "options": opts,
            "migrates": self.migrates,
            "accel": self.accel,
            "accel_note": self.accel_note,
            "accel_line": self.accel_line(),
            "tcg_threads": {"tcg": "single", "tcg-multi": "multi"}.get(self.accel),
            "qemu_binary": self.binary,
            "qemu_version": None if version is None else version.number,
            "qemu_version_text": None if version is None else version.text,
            "vcpus": self.opts.vcpus,
            "mem_mb": self.opts.mem_mb,
            "workload": self.opts.workload_size,
            "guest": {
                "key": self.guest.key,
                "boot": self.guest.boot,
                "sizes": self.guest.manifest.get("sizes"),
                "kernel_package": self.guest.manifest.get("kernel_package"),
            },
            "boot_s": self.boot_s,
            "wall_s": round(time.monotonic() - started, 1),
            "qemu": {q.spec.name: q.spec.command() for q in self.qemus},
            **self.info,
        }

    async def close(self) -> None:
        """Disconnect, kill every QEMU, remove the sockets; copy the consoles."""
        for control in self.controls.values():
            await control.close()
        if self.forwarder is not None:
            await self.forwarder.close()
        if self.exporter_server is not None:
            self.exporter_server.close()
        for q in self.qemus:
            q.stop()
            for name in (q.spec.serial_log.name, f"qemu-{q.spec.name}.log"):
                with contextlib.suppress(OSError):
                    shutil.copyfile(self.sockdir / name, self.out / name)
        if self.steps is not None:
            self.steps.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)


class _Prefixed(io.TextIOBase):
    """A text stream that hands each line to ``say`` (the recorder's status lines)."""

    def __init__(self, say: Say) -> None:
        super().__init__()
        self.say = say

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.say(f"recorder: {line}")
        return len(text)

    def flush(self) -> None:
        """Nothing buffered."""


async def _first(aw: Any, task: asyncio.Future[Any], timeout_s: float) -> None:
    waiter = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({waiter, task}, timeout=timeout_s, return_when="FIRST_COMPLETED")
    waiter.cancel()
    if not done:
        raise ScenarioError(f"the recorder did not start within {timeout_s:g} s")


def _freeze_process(pid: int, stall_ns: int) -> dict[str, Any]:
    real0, _ = host_now()
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic_ns()
    try:
        time.sleep(stall_ns / 1e9)
    finally:
        t1 = time.monotonic_ns()
        os.kill(pid, signal.SIGCONT)
    return {
        "freeze_ns": t1 - t0,
        "host_start_ns": real0,
        "host_end_ns": real0 + (t1 - t0),
        "requested_ns": stall_ns,
    }


def _oncpu_ns(pid: int, tids: list[int]) -> dict[str, int]:
    out = {}
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text()
            out[str(tid)] = int(text.split()[0])
    return out


def _sleeps(pid: int, tids: list[int]) -> dict[int, int]:
    """Each thread's voluntary context switches so far (a thread gone is left out)."""
    out = {}
    for tid in tids:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            match = re.search(r"^voluntary_ctxt_switches:\s*(\d+)", status, re.M)
            if match:
                out[tid] = int(match.group(1))
    return out


def _thread_states(pid: int, threads: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Where some of QEMU's threads are (the evidence kept for a blocked freeze).

    Per thread: its scheduler state, wchan and system call (number and first arguments);
    in a futex wait, the futex word and the int 8 bytes further, where a glibc
    ``pthread_mutex_t`` keeps its owner's thread id.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, tid in threads.items():
        task = Path(f"/proc/{pid}/task/{tid}")
        info: dict[str, Any] = {"tid": tid}
        with contextlib.suppress(OSError, IndexError, ValueError, struct.error):
            info["state"] = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            info["wchan"] = (task / "wchan").read_text().strip()
            syscall = (task / "syscall").read_text().split()
            info["syscall"] = " ".join(syscall[:4])
            if syscall[0] == "202":  # futex(uaddr, op, val, ...)
                with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
                    mem.seek(int(syscall[1], 16))
                    word, _, owner = struct.unpack("<iIi", mem.read(12))
                info["futex"] = {"addr": syscall[1], "word": word, "mutex_owner": owner}
        out[name] = info
    return out


@dataclass
class _Watch:
    """What ``_watch_freeze`` saw of the other vCPU threads."""

    #: Sleeps each thread took in the first window.
    first_sleeps: dict[int, int]
    #: Offset (ns from the freeze request) of the window that failed; None: none did.
    blocked_at: int | None = None
    #: Why it failed: ``sleeps`` (too few) or ``spin`` (on CPU all along).
    why: str | None = None
    #: The highest share of a judged window any other thread spent on CPU.
    oncpu_max: float = 0.0


def _watch_freeze(pid: int, others: list[int], t_req: int, stall_ns: int) -> _Watch:
    """Hold a freeze for ``stall_ns`` from ``t_req``, checking the other vCPU threads.

    Every ``FREEZE_CHECK_NS`` window (a last, shorter one is not judged) each other vCPU
    thread must go to sleep at least ``FREEZE_MIN_SLEEPS`` times, and none may be on CPU
    for ``FREEZE_SPIN_SHARE`` of ``FREEZE_SPIN_WINDOWS`` windows in a row: a guest CPU
    that waits in its kernel for the frozen one spins (its thread on CPU 98 % of a
    700 ms freeze, against 55 to 68 % in freezes that left CPU 0 alone) and can still
    sleep briefly several times a window.
    """
    sleeps0, oncpu0, t0 = _sleeps(pid, others), _oncpu_ns(pid, others), time.monotonic_ns()
    watch = _Watch(first_sleeps={})
    spinning = 0
    while True:
        elapsed = time.monotonic_ns() - t_req
        window_end = min(elapsed + FREEZE_CHECK_NS, stall_ns)
        time.sleep(max(0.0, (window_end - elapsed) / 1e9))
        sleeps1, oncpu1, t1 = _sleeps(pid, others), _oncpu_ns(pid, others), time.monotonic_ns()
        slept = {t: n - sleeps0[t] for t, n in sleeps1.items() if t in sleeps0}
        if not watch.first_sleeps:
            watch.first_sleeps = slept
        judged = window_end - elapsed >= FREEZE_CHECK_NS
        if judged:
            share = max(
                ((n - oncpu0[t]) / max(1, t1 - t0) for t, n in oncpu1.items() if t in oncpu0),
                default=0.0,
            )
            watch.oncpu_max = max(watch.oncpu_max, share)
            spinning = spinning + 1 if share >= FREEZE_SPIN_SHARE else 0
            if not all(slept.get(t, 0) >= FREEZE_MIN_SLEEPS for t in others):
                watch.blocked_at, watch.why = elapsed, "sleeps"
                return watch
            if spinning >= FREEZE_SPIN_WINDOWS:
                watch.blocked_at, watch.why = elapsed, "spin"
                return watch
        if window_end >= stall_ns:
            return watch
        sleeps0, oncpu0, t0 = sleeps1, oncpu1, t1


def _freeze_thread(
    cpu: int,
    threads: dict[int, int],
    stall_ns: int,
    pid: int,
    note: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Freeze vCPU ``cpu``'s thread for ``stall_ns``, where it blocks no other vCPU.

    The whole freeze is watched in windows of ``FREEZE_CHECK_NS``: in each, every other
    vCPU thread must go to sleep (a voluntary context switch) at least
    ``FREEZE_MIN_SLEEPS`` times and must not spin (``_watch_freeze``), or the thread is
    thawed at once and frozen again later
    (see the module docstring): 0.1 to 0.3 s later when the first window failed (the
    other vCPUs lost less than the guest's 50 ms threshold), ``FREEZE_LATE_RETRY_S``
    later otherwise, so that what the aborted freeze did to the guest ends more than a
    second before the kept one starts. ``note`` gets one ``freeze_attempt`` record per
    attempt.

    :raise ScenarioError: when ``FREEZE_ATTEMPTS`` attempts in a row were blocked.
    :return: the kept freeze, measured from its own FROZEN write.
    """
    tid = threads[cpu]
    others = [t for c, t in threads.items() if c != cpu]
    names = {"main": pid, **{f"cpu{c}": t for c, t in threads.items()}}
    freezer = _Freezer(tid)
    try:
        for attempt in range(1, FREEZE_ATTEMPTS + 1):
            real0, _ = host_now()
            before = _oncpu_ns(pid, others)
            t_req = time.monotonic_ns()
            freezer.set("FROZEN")
            t0 = time.monotonic_ns()
            watch = _watch_freeze(pid, others, t_req, stall_ns)
            record: dict[str, Any] = {
                "type": "freeze_attempt",
                "attempt": attempt,
                "host_start_ns": real0,
                "check_ns": FREEZE_CHECK_NS,
                "others_sleeps": {str(t): n for t, n in watch.first_sleeps.items()},
                "others_oncpu_max": round(watch.oncpu_max, 3),
            }
            blocked_at = watch.blocked_at
            if blocked_at is None:
                note({**record, "outcome": "kept"})
                break
            record["threads"] = _thread_states(pid, names)
            freezer.set("THAWED")
            note(
                {
                    **record,
                    "outcome": "blocked",
                    "blocked_by": watch.why,
                    "blocked_at_ns": blocked_at,
                    "freeze_ns": time.monotonic_ns() - t_req,
                }
            )
            time.sleep(
                random.uniform(0.1, 0.3) if blocked_at < FREEZE_CHECK_NS else FREEZE_LATE_RETRY_S
            )
        else:
            raise ScenarioError(
                f"each of {FREEZE_ATTEMPTS} freezes of vCPU {cpu} blocked another vCPU "
                f"(lab-steps.jsonl has the threads' states)"
            )
        t1 = time.monotonic_ns()
        freezer.set("THAWED")
        t2 = time.monotonic_ns()
        after = _oncpu_ns(pid, others)
    finally:
        freezer.release()
    return {
        # On-CPU time of the other vCPU threads during the freeze (schedstat field 1):
        # near the freeze's length means they ran (or spun), near 0 that they slept.
        "others_oncpu_ns": {t: after[t] - before[t] for t in after if t in before},
        # Frozen from (about) the FROZEN write to the THAWED write's completion.
        "freeze_ns": t2 - t_req,
        "frozen_confirmed_ns": t1 - t0,
        "host_start_ns": real0,
        "host_end_ns": real0 + (t2 - t_req),
        "requested_ns": stall_ns,
        "attempts": attempt,
    }


def clocksource_args(name: str) -> list[str]:
    """The kernel command line words for ``--clocksource NAME``.

    ``tsc`` also gets ``tsc=reliable``, which keeps the kernel from demoting it: without
    it the kernel does not trust an emulated CPU's TSC at boot and its clocksource
    watchdog may later mark the TSC unstable against the HPET.
    """
    return [f"clocksource={name}", *(["tsc=reliable"] if name == "tsc" else [])]


def run_scenario(opts: LabOptions, say: Say | None = None) -> dict[str, Any]:
    """Run one scenario end to end and write its run directory.

    What the guest lived through is a result, not an error: a guest that did not recover
    still gets a complete run directory, its summary and ``lab-outcome.json``
    (``analysis.lab.outcome``). So does a run the lab could not carry out once it began
    booting the guest (QEMU died, the agent never came up, a command failed): its outcome
    is ``lab-error`` and the error is a ``lab_error`` record in lab-steps.jsonl.

    :param opts: the options.
    :param say: progress lines (default: print with a ``lab:`` prefix and the elapsed time).
    :raise LabError: on bad options or a guest that cannot be built; every process
        started is killed whatever happens.
    :return: the summary (also in lab-summary.json), with ``guest_outcome``.
    """
    opts.check()
    t0 = time.monotonic()

    def default_say(line: str) -> None:
        print(f"lab {time.monotonic() - t0:6.1f}s: {line}", flush=True)

    say = say or default_say
    guest = build_guest(log=lambda line: say(f"build-guest: {line}"))
    scenario = Scenario(opts, guest, say)
    if opts.via == "libvirt":
        from analysis.lab.libvirt import LibvirtScenario

        scenario = LibvirtScenario(opts, guest, say)

    async def main() -> dict[str, Any]:
        try:
            return await scenario.run()
        finally:
            await scenario.close()

    error: LabError | None = None
    with lq.handle_signals():
        try:
            lab_meta = asyncio.run(main())
        except (QemuError, ScenarioError) as err:
            error = err
            lab_meta = scenario.lab_meta(t0)
        finally:
            lq.kill_all()
    opts.out.mkdir(parents=True, exist_ok=True)
    if error is not None:
        say(f"lab error: {error}")
        steps = JsonlWriter(opts.out / STEPS)
        try:
            steps.write_stamped({"type": "lab_error", "error": str(error)})
        finally:
            steps.close()
    meta_path = opts.out / rundir.META
    meta: dict[str, Any] = {"scenario": opts.scenario}
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads(meta_path.read_text())
    meta["lab"] = lab_meta
    rundir.write_json_atomic(meta_path, meta)
    summary = write_summary(opts.out)
    say("summary:\n" + render(summary))
    return summary
