"""``tsprobe lab``: build the lab guest, run a scenario on it (see analysis.lab)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from analysis.lab.errors import LabError
from analysis.options import MAX_VCPUS, OutDir, check_canaries, parse_size
from probe.canary import DEFAULT_CANARIES
from probe.durations import parse_duration, parse_duration_list
from probe.errors import DurationError


def _duration(text: str, what: str) -> int:
    try:
        return parse_duration(text)
    except DurationError as err:
        raise click.BadParameter(str(err), param_hint=what) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def lab() -> None:
    """The lab: a real QEMU guest running the agent, migrated or stalled on purpose.

    \b
    tsprobe lab build-guest
    tsprobe lab run --scenario paused --hold 3s --out runs/paused
    """


@lab.command("build-guest")
@click.option("--force", is_flag=True, help="Rebuild even when the cache holds this build.")
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache directory.  [default: $TSPROBE_CACHE or ~/.cache/tsprobe/guest]",
)
def build_guest_cmd(force: bool, cache: Path | None) -> None:
    """Build (or find in the cache) the lab guest: Debian kernel + initramfs.

    \b
    Example:
      tsprobe lab build-guest
    """
    from analysis.lab.guest import build_guest

    try:
        guest = build_guest(cache=cache, force=force)
    except LabError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"kernel {guest.kernel} ({guest.boot})\ninitrd {guest.initrd}")


RUN_EPILOG = """\b
Scenarios:
  precopy      precopy with --bandwidth until completed
  postcopy     ~1 s of precopy, then postcopy (memory workload 64M by default)
  paused       postcopy, migrate-pause for --hold, recover; vCPUs keep running
  paused-stop  as paused, with the destination's vCPUs stopped while paused
  stall        SIGSTOP/SIGCONT the whole QEMU for each --stall
  stall-vcpu   freeze vCPU --cpu's host thread (cgroup freezer) for each --stall
\b
Examples:
  tsprobe lab run --scenario precopy --out runs/precopy
  tsprobe lab run --scenario paused --hold 3s --out runs/paused
  tsprobe lab run --scenario paused --hold 27s --clocksource tsc --out runs/p27
  tsprobe lab run --scenario paused --qemu 10.0 --out runs/paused-10   # scripts/setup's
  tsprobe lab run --scenario paused --via libvirt --out runs/paused-lv   # virsh
  tsprobe lab run --scenario stall --stall 300ms,1.2s --out runs/stall
  tsprobe lab run --scenario stall-vcpu --cpu 1 --stall 700ms --out runs/vcpu
  tsprobe lab run --scenario paused --out runs/p1 \\
      --agent-listen 127.0.0.1:9466 --listen 127.0.0.1:9467   # for Prometheus
\b
Exit status: the guest's outcome (lab-outcome.json; analysis/lab/outcome.py has the rules):
  0  recovered      every CPU sampling again, the agent answering, no kernel warning
  3  degraded       kernel warnings (soft lockup, RCU stall, hung task, clocksource
                    unstable), a kernel oops, or guest time lost beyond the vCPU stops
  4  not-recovered  within the settle time a CPU took no sample, the agent did not
                    answer, the guest's clock stood still, or it panicked or rebooted
  5  lab-error      QEMU died, the agent never came up, a migration failed
  1  the tool's own error (bad options, no guest image); 2  usage error
\b
The run directory holds the recorder's files (meta.json, qmp-src.jsonl, qmp-dst.jsonl,
guest-events.jsonl, clock-samples.jsonl), lab-steps.jsonl, lab-health.json, the serial
consoles, lab-outcome.json and lab-summary.txt/.json, whatever the outcome.
--agent-listen and --listen give Prometheus fixed targets: the guest's agent (followed
from source to destination) and the host migration exporter.
"""


#: A vCPU of the lab guest.
VCPU = click.IntRange(0, MAX_VCPUS - 1)


@lab.command("run", epilog=RUN_EPILOG)
@click.option("--scenario", required=True, metavar="NAME", help="See the list below.")
@click.option("--out", required=True, type=OutDir(), help="New run directory.")
@click.option("--vcpus", type=click.IntRange(min=1, max=MAX_VCPUS), default=2, show_default=True)
@click.option("--mem", default="512M", show_default=True, help="Guest RAM.")
@click.option("--hold", default="3s", show_default=True, help="How long to stay paused.")
@click.option(
    "--stall", default="300ms", show_default=True, help="Freeze length(s), comma-separated."
)
@click.option(
    "--cpu", type=VCPU, default=1, show_default=True, help="vCPU that stall-vcpu freezes."
)
@click.option(
    "--workload",
    default=None,
    help="Working set kept dirty in the guest (e.g. 64M; 0: none).  "
    "[default: 64M for the postcopy scenarios, else none]",
)
@click.option("--workload-cpu", type=VCPU, default=0, show_default=True, help="Its vCPU.")
@click.option(
    "--bandwidth", default="50M", show_default=True, help="max-bandwidth per second (bytes)."
)
@click.option(
    "--accel",
    type=click.Choice(["auto", "kvm", "tcg", "tcg-single", "tcg-multi"]),
    default="auto",
    show_default=True,
    help="auto: KVM if a smoke boot works, else TCG; TCG is multi-threaded for migrations "
    "on QEMU >= 9.0 and for the stall scenarios, else single-threaded (tcg-single, "
    "tcg-multi: force it).",
)
@click.option(
    "--qemu",
    default=None,
    metavar="PATH|VERSION",
    help="The QEMU binary: a path, a command, or a version that scripts/setup unpacked "
    "(e.g. 10.0: /var/cache/tsprobe/qemu-10.0.*/qemu-system-x86_64).  "
    "[default: qemu-system-x86_64 on PATH]",
)
@click.option(
    "--clocksource",
    default=None,
    metavar="NAME",
    help="The guest kernel's clocksource= (tsc, hpet, acpi_pm, ...; tsc also gets "
    "tsc=reliable so that the kernel keeps it).  [default: the kernel's choice; hpet "
    "under TCG]",
)
@click.option(
    "--via",
    type=click.Choice(["qemu", "libvirt"]),
    default="qemu",
    show_default=True,
    help="Who drives the migration: the lab on QEMU's monitors, or two libvirt daemons "
    "on this host and virsh (migrating scenarios, root; analysis/lab/libvirt.py).",
)
@click.option(
    "--clock-step",
    default=None,
    help="Step the guest's realtime by this much first (stall scenarios), e.g. 2s.",
)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Also serve the migration state on http://HOST:PORT/metrics (as record --listen).",
)
@click.option(
    "--agent-listen",
    metavar="HOST:PORT",
    help="Reach the guest's agent here for the whole run (source, then destination).  "
    "[default: 127.0.0.1 and a free port]",
)
@click.option(
    "--canaries",
    metavar="CANARIES",
    callback=check_canaries,
    default=",".join(DEFAULT_CANARIES),
    show_default=True,
    help="The guest agent's canaries (timer, heartbeat, rpc; none).",
)
@click.option(
    "--kmsg",
    default=None,
    metavar="LINE",
    help="Write LINE to the guest's /dev/kmsg before the disturbance (a known kernel "
    "warning, e.g. 'watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [app:42]').",
)
@click.option(
    "--baseline",
    default="1s",
    show_default=True,
    help="How long to record the undisturbed guest first.",
)
@click.option(
    "--linger",
    default="0s",
    show_default=True,
    help="How long to keep recording (and serving) after the guest settled.",
)
def run_cmd(
    scenario: str,
    out: Path,
    vcpus: int,
    mem: str,
    hold: str,
    stall: str,
    cpu: int,
    workload: str | None,
    workload_cpu: int,
    bandwidth: str,
    accel: str,
    qemu: str | None,
    clocksource: str | None,
    via: str,
    clock_step: str | None,
    listen: str | None,
    agent_listen: str | None,
    canaries: tuple[str, ...],
    kmsg: str | None,
    baseline: str,
    linger: str,
) -> None:
    """Run one lab scenario end to end, print its summary, exit with the guest's outcome."""
    from analysis.lab.scenarios import run_scenario
    from analysis.lab.spec import CLOCKSOURCES, SCENARIOS, LabOptions

    if scenario not in SCENARIOS:
        raise click.BadParameter(
            f"unknown scenario {scenario!r}: choose from {', '.join(SCENARIOS)}",
            param_hint="--scenario",
        )
    if clocksource == "default":
        clocksource = None
    if clocksource is not None and clocksource not in CLOCKSOURCES:
        raise click.BadParameter(
            f"{clocksource!r} is not a clocksource of the lab's x86 kernel (it would ignore "
            f"it and keep its own): choose from {', '.join(CLOCKSOURCES)}, or default",
            param_hint="--clocksource",
        )
    try:
        stalls = tuple(parse_duration_list(stall))
    except DurationError as err:
        raise click.BadParameter(str(err), param_hint="--stall") from None
    if workload is not None and workload.strip() != "0":
        parse_size(workload, "--workload")
    step = None
    if clock_step is not None:
        negative = clock_step.strip().startswith("-")
        step = _duration(clock_step.strip().lstrip("+-"), "--clock-step")
        step = -step if negative else step
    opts = LabOptions(
        scenario=scenario,
        out=out,
        vcpus=vcpus,
        mem_mb=parse_size(mem, "--mem") >> 20,
        hold_ns=_duration(hold, "--hold"),
        stalls_ns=stalls,
        cpu=cpu,
        workload=workload,
        workload_cpu=workload_cpu,
        bandwidth=parse_size(bandwidth, "--bandwidth"),
        accel=accel,
        qemu=qemu,
        clocksource=clocksource,
        via=via,
        clock_step_ns=step,
        listen=listen,
        agent_listen=agent_listen,
        canaries=canaries,
        kmsg=kmsg,
        baseline_s=_duration(baseline, "--baseline") / 1e9,
        linger_s=_duration(linger, "--linger") / 1e9,
    )
    try:
        summary = run_scenario(opts)
    except LabError as err:
        raise click.ClickException(str(err)) from err
    click.get_current_context().exit(outcome_exit(summary, out))


def outcome_exit(summary: dict[str, Any], out: Path) -> int:
    """Say the guest's outcome in one line (stderr) and return its exit code."""
    from analysis.lab.outcome import EXIT_CODES

    outcome = summary.get("guest_outcome") or {}
    name = str(outcome.get("outcome") or "lab-error")
    evidence = outcome.get("evidence") or ["no outcome was written"]
    click.echo(
        f"tsprobe lab: guest outcome {name}: {evidence[0]} ({out}/lab-outcome.json)", err=True
    )
    return EXIT_CODES.get(name, EXIT_CODES["lab-error"])


def _add_study_commands() -> None:
    """``lab study`` and ``lab study-report`` (analysis.lab.study_cli; it imports lazily)."""
    from analysis.lab.study_cli import STUDY_COMMANDS

    for command in STUDY_COMMANDS:
        lab.add_command(command)


_add_study_commands()
