"""What a lab run is asked to do: the scenarios, their defaults, and the checked ``LabOptions``.

``SPECS`` describes every scenario in one table, one ``ScenarioSpec`` each: what drives
it (a migration, a SIGSTOP of QEMU, a freeze of one vCPU thread), whether it switches to
postcopy, whether postcopy is paused and with which policy for the destination's vCPUs,
and its default memory workload. ``SCENARIOS``, ``MIGRATING`` and ``POSTCOPY`` are views of
that table. ``LabOptions`` holds one run's parameters
(``tsprobe lab run``'s options) and ``check``s them before anything boots, so a bad
combination is one usage line, not a lab error; ``kernel_args`` and ``workload_size``
derive what the guest is given. ``analysis.lab.scenarios`` runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from analysis import rundir
from analysis.errors import RecorderError
from analysis.lab import qemu as lq
from analysis.lab.errors import LabError
from analysis.record.exporter import parse_listen
from probe.canary import DEFAULT_CANARIES

#: Where a run says what it does (a line of progress).
Say = Callable[[str], None]

#: The clocksources an x86_64 Linux kernel registers (``clocksource=`` takes one of them;
#: the kernel ignores any other name). Which are available depends on the machine:
#: ``kvm-clock`` only under KVM; the lab's TCG guest has tsc, hpet and acpi_pm.
CLOCKSOURCES = ("tsc", "hpet", "acpi_pm", "kvm-clock", "refined-jiffies", "jiffies")


#: What drives a scenario's disturbance: a migration, a SIGSTOP of the whole QEMU, or a
#: cgroup freeze of one vCPU thread.
Driver = Literal["migrate", "stall", "stall-vcpu"]
#: While postcopy is paused for ``--hold``: the destination's vCPUs keep running (QEMU's
#: behaviour, the one libvirt merged) or are stopped (the proposed policy).
Pause = Literal["vcpus-run", "vcpus-stopped"]


@dataclass(frozen=True)
class ScenarioSpec:
    """One scenario: what drives it and how it migrates.

    :param name: what ``--scenario`` takes.
    :param help: one line for ``--help``.
    :param driver: what drives the disturbance (``Driver``).
    :param postcopy: the migration switches to postcopy.
    :param pause: postcopy is paused for ``--hold`` and recovered, with this policy for the
        destination's vCPUs; None: no pause.
    :param workload: the default ``--workload`` (the guest's memory workload; ``0``: none).
    """

    name: str
    help: str
    driver: Driver
    postcopy: bool = False
    pause: Pause | None = None
    workload: str = "0"

    @property
    def migrates(self) -> bool:
        """Whether the scenario migrates the guest."""
        return self.driver == "migrate"


#: Every scenario, one spec each (``analysis.lab.scenarios`` runs them).
SPECS: dict[str, ScenarioSpec] = {
    spec.name: spec
    for spec in (
        ScenarioSpec("precopy", "precopy migration with a bandwidth limit", "migrate"),
        ScenarioSpec(
            "postcopy",
            "precopy, then postcopy with a memory workload",
            "migrate",
            postcopy=True,
            workload="64M",
        ),
        ScenarioSpec(
            "paused",
            "postcopy, migrate-pause for --hold, recover; vCPUs keep running",
            "migrate",
            postcopy=True,
            pause="vcpus-run",
            workload="64M",
        ),
        ScenarioSpec(
            "paused-stop",
            "as paused, with the destination's vCPUs stopped while paused",
            "migrate",
            postcopy=True,
            pause="vcpus-stopped",
            workload="64M",
        ),
        ScenarioSpec("stall", "SIGSTOP/SIGCONT the whole QEMU for each --stall", "stall"),
        ScenarioSpec(
            "stall-vcpu",
            "freeze one vCPU thread (--cpu) for --stall with the cgroup freezer",
            "stall-vcpu",
        ),
    )
}
#: Views of ``SPECS`` for their readers: the help line per name, the migrating ones, the
#: postcopy ones.
SCENARIOS: dict[str, str] = {name: spec.help for name, spec in SPECS.items()}
MIGRATING = frozenset(name for name, spec in SPECS.items() if spec.migrates)
POSTCOPY = frozenset(name for name, spec in SPECS.items() if spec.postcopy)
#: ``--via``: who drives the migration.
VIAS = ("qemu", "libvirt")


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
            from analysis.lab.libvirt_host import check_host

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
            # the others (analysis.lab.freeze; docs/lab-notes.md has the stalls seen with
            # the HPET). The TSC is read without leaving the translated code, so fewer
            # freezes need a retry.
            words += clocksource_args("tsc")
        if self.workload_size not in ("0", ""):
            words += [f"tsprobe.wss={self.workload_size}", f"tsprobe.wcpu={self.workload_cpu}"]
        return words

    @property
    def workload_size(self) -> str:
        """The workload's working set (``0``: none)."""
        if self.workload is not None:
            return self.workload
        spec = SPECS.get(self.scenario)
        return spec.workload if spec is not None else "0"


def clocksource_args(name: str) -> list[str]:
    """The kernel command line words for ``--clocksource NAME``.

    ``tsc`` also gets ``tsc=reliable``, which keeps the kernel from demoting it: without
    it the kernel does not trust an emulated CPU's TSC at boot and its clocksource
    watchdog may later mark the TSC unstable against the HPET.
    """
    return [f"clocksource={name}", *(["tsc=reliable"] if name == "tsc" else [])]
