"""``tsprobe lab study`` and ``tsprobe lab study-report``: the policy study's commands.

The runner is ``analysis.lab.study``, the report ``analysis.report.study``; both are
imported when a command runs. Exit status of ``lab study``: 0 when every planned run has
ended (runs that ended in ``lab-error`` included: they are listed, and ``--resume
--retry-errors`` runs them again), 1 for a study that cannot start (one line: another
study in --out, a missing lab option), 2 for bad usage, 130 when interrupted (study.json
and the reports then hold the runs finished so far).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

from analysis.options import MAX_VCPUS, OutDir
from probe.durations import parse_duration
from probe.errors import DurationError

if TYPE_CHECKING:
    from analysis.lab.study import StudyParams

ACCELS = ("auto", "kvm", "tcg", "tcg-single", "tcg-multi")
CLOCKSOURCE = re.compile(r"^[a-z0-9_-]+$")

STUDY_EPILOG = """\b
Examples:
  flock /tmp/tsprobe-lab.lock tsprobe lab study --scenario paused,paused-stop \\
      --hold 2s,30s --repeat 2 --out studies/s1
  tsprobe lab study --scenario paused,paused-stop --hold 30s --clocksource default,tsc \\
      --out studies/cs
  tsprobe lab study ... --out studies/s1 --resume      # continue; skip complete runs
  tsprobe lab study-report studies/s1                   # rebuild the reports only
\b
Runs go round-robin over the repeats (every cell once, then every cell again), each as
`tsprobe lab run` into DIR/runs/NAME (e.g. paused-h30s-csdefault-auto-r2) followed by
`tsprobe report` on it. Each run takes the lab lock ($TSPROBE_LAB_LOCK, default
/tmp/tsprobe-lab.lock) so studies and labs queue; under `flock` on that file the study
holds it throughout. DIR/study.json is rewritten after every run (Ctrl-C keeps what ran);
DIR/study.md and study.html are written at the end. A lab crash, hang (timeout: 300 s +
3 x the hold) or error is recorded as lab-error with its evidence and the study goes on.
--clocksource default is the guest kernel's own choice (the run records which it used).
"""


#: The most --repeat, and the most runs a study may plan (cells x repeats): a study of
#: 1,000 runs is days of lab time; a larger one is a typing mistake.
MAX_REPEAT = 100
MAX_RUNS = 1000


def _list(text: str, what: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped, each value once (in the order given)."""
    items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not items:
        raise click.BadParameter("give at least one value", param_hint=what)
    return items


def _check_passed(
    workload: str | None,
    mem: str | None,
    baseline: str | None,
    canaries: str | None,
    bandwidth: str | None,
) -> None:
    """Check the options passed to every lab run the way lab run checks them, before the
    first run, so a bad value is one usage line instead of a study of lab errors."""
    from analysis.options import check_canaries, parse_size

    if workload is not None and workload.strip() != "0":
        parse_size(workload, "--workload")
    if mem is not None:
        parse_size(mem, "--mem")
    if bandwidth is not None:
        parse_size(bandwidth, "--bandwidth")
    if baseline is not None:
        try:
            parse_duration(baseline)
        except DurationError as err:
            raise click.BadParameter(str(err), param_hint="--baseline") from None
    if canaries is not None:
        check_canaries(None, None, canaries)


def _holds(text: str) -> tuple[int, ...]:
    holds = []
    for item in _list(text, "--hold"):
        try:
            ns = parse_duration(item)
        except DurationError as err:
            raise click.BadParameter(str(err), param_hint="--hold") from None
        if ns <= 0:
            raise click.BadParameter(f"{item!r}: a hold must be positive", param_hint="--hold")
        holds.append(ns)
    return tuple(holds)


def _run_has_option(flag: str) -> bool:
    from analysis.lab.cli import run_cmd

    return any(flag in p.opts for p in run_cmd.params)


@click.command("study", epilog=STUDY_EPILOG)
@click.option(
    "--scenario", "scenarios", default=None, metavar="LIST", help="e.g. paused,paused-stop"
)
@click.option("--hold", "holds", default=None, metavar="LIST", help="Pause lengths, e.g. 2s,30s.")
@click.option(
    "--clocksource",
    "clocksources",
    default="default",
    show_default=True,
    metavar="LIST",
    help="Guest clocksources (default: the kernel's choice), e.g. default,tsc.",
)
@click.option(
    "--accel", "accels", default="auto", show_default=True, metavar="LIST", help="As lab run."
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1, max=MAX_REPEAT),
    default=1,
    show_default=True,
    help="Runs per cell.",
)
@click.option("--qemu", default=None, metavar="PATH|VERSION", help="As lab run --qemu (e.g. 10.0).")
@click.option(
    "--out",
    required=True,
    type=OutDir(file_okay=False),
    help="Study directory.",
)
@click.option("--resume", is_flag=True, help="Continue the study in --out; skip complete runs.")
@click.option("--retry-errors", is_flag=True, help="With --resume: run lab-error runs again.")
@click.option("--report-only", is_flag=True, help="Only rebuild study.json/md/html of --out.")
@click.option("--workload", default=None, help="Passed to lab run (e.g. 64M; 0: none).")
@click.option(
    "--vcpus", type=click.IntRange(min=1, max=MAX_VCPUS), default=None, help="Passed to lab run."
)
@click.option("--mem", default=None, help="Passed to lab run (guest RAM).")
@click.option("--baseline", default=None, help="Passed to lab run (e.g. 5s).")
@click.option("--canaries", default=None, help="Passed to lab run (timer,heartbeat; none).")
@click.option("--bandwidth", default=None, help="Passed to lab run.")
@click.option(
    "--via", type=click.Choice(["qemu", "libvirt"]), default=None, help="Passed to lab run."
)
@click.option(
    "--run-timeout",
    default=None,
    metavar="DURATION",
    help="Kill a run after this long.  [default: 300 s + 3 x its hold]",
)
def study_cmd(
    scenarios: str | None,
    holds: str | None,
    clocksources: str,
    accels: str,
    repeat: int,
    qemu: str | None,
    out: Path,
    resume: bool,
    retry_errors: bool,
    report_only: bool,
    workload: str | None,
    vcpus: int | None,
    mem: str | None,
    baseline: str | None,
    canaries: str | None,
    bandwidth: str | None,
    via: str | None,
    run_timeout: str | None,
) -> None:
    """Run the policy study: scenario x hold x clocksource x accel, each --repeat times.

    Writes DIR/study.json, study.md, study.html and a run directory (with its report) per
    run under DIR/runs.
    """
    from analysis.lab.errors import LabError

    if report_only:
        _report(out)
        return
    if not scenarios or not holds:
        raise click.UsageError("--scenario and --hold are required (or --report-only)")
    from analysis.lab import qemu as lq
    from analysis.lab.study import StudyParams, run_timeout_s

    names, sources, accel_list = _axes(scenarios, clocksources, accels)
    _check_passed(workload, mem, baseline, canaries, bandwidth)
    holds_ns = _holds(holds)
    planned = len(names) * len(holds_ns) * len(sources) * len(accel_list) * repeat
    if planned > MAX_RUNS:
        raise click.UsageError(
            f"the study would plan {planned} runs (scenarios x holds x clocksources x accels"
            f" x --repeat), more than {MAX_RUNS}: split it"
        )
    try:
        lq.qemu_version(lq.resolve_qemu(qemu))  # a QEMU that runs, before the first run
    except LabError as err:
        raise click.ClickException(str(err)) from err
    extra = _passed_on(
        workload=workload,
        vcpus=vcpus,
        mem=mem,
        baseline=baseline,
        canaries=canaries,
        bandwidth=bandwidth,
        via=via,
    )
    timeout = _timeout(run_timeout, run_timeout_s)

    params = StudyParams(
        scenarios=names,
        holds_ns=holds_ns,
        clocksources=sources,
        accels=accel_list,
        repeat=repeat,
        qemu=qemu,
        extra=extra,
    )

    _run(params, out, resume, retry_errors, timeout)


def _run(
    params: StudyParams,
    out: Path,
    resume: bool,
    retry_errors: bool,
    timeout: Callable[[int], float],
) -> None:
    """Run the study, SIGTERM taken as Ctrl-C; say what ran (exit 130 when interrupted)."""
    from analysis.lab.errors import LabError
    from analysis.lab.study import run_study

    def on_term(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    saved = signal.signal(signal.SIGTERM, on_term)
    try:
        result = run_study(
            params,
            out,
            resume=resume,
            retry_errors=retry_errors,
            say=lambda line: click.echo(line),
            run_timeout=timeout,
        )
    except LabError as err:
        raise click.ClickException(str(err)) from err
    finally:
        signal.signal(signal.SIGTERM, saved)
    click.echo(
        f"study: {result.ran} run(s) in {result.wall_s / 60:.1f} min, {result.skipped} "
        f"skipped as complete, {len(result.failed)} lab error(s)"
    )
    if result.interrupted:
        raise SystemExit(130)


def _axes(
    scenarios: str, clocksources: str, accels: str
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The study's scenarios, clocksources and accelerators, each checked.

    :raise click.BadParameter: naming the option of a value the lab does not know.
    """
    from analysis.lab.spec import SCENARIOS

    names = _list(scenarios, "--scenario")
    for name in names:
        if name not in SCENARIOS:
            raise click.BadParameter(
                f"unknown scenario {name!r}: choose from {', '.join(SCENARIOS)}",
                param_hint="--scenario",
            )
    sources = _list(clocksources, "--clocksource")
    if any(cs != "default" for cs in sources) and not _run_has_option("--clocksource"):
        raise click.ClickException(
            "this tsprobe's lab run has no --clocksource yet: use --clocksource default"
        )
    from analysis.lab.spec import CLOCKSOURCES as known

    for cs in sources:
        if not CLOCKSOURCE.match(cs) or (known and cs != "default" and cs not in known):
            raise click.BadParameter(
                f"{cs!r} is not a clocksource of the lab's kernel: choose from "
                f"default, {', '.join(known)}",
                param_hint="--clocksource",
            )
    accel_list = _list(accels, "--accel")
    for a in accel_list:
        if a not in ACCELS:
            raise click.BadParameter(
                f"{a!r}: choose from {', '.join(ACCELS)}", param_hint="--accel"
            )
    return names, sources, accel_list


def _passed_on(**options: str | int | None) -> tuple[str, ...]:
    """The options every lab run gets, as ``lab run`` flags (``vcpus`` -> ``--vcpus N``)."""
    extra: list[str] = []
    for name, value in options.items():
        if value is not None:
            extra += [f"--{name}", str(value)]
    return tuple(extra)


def _timeout(run_timeout: str | None, default: Callable[[int], float]) -> Callable[[int], float]:
    """``--run-timeout`` as the seconds a run of each hold may take (``default`` without it).

    :raise click.BadParameter: when it is not a positive duration.
    """
    if run_timeout is None:
        return default
    try:
        fixed = parse_duration(run_timeout) / 1e9
    except DurationError as err:
        raise click.BadParameter(str(err), param_hint="--run-timeout") from None
    if fixed <= 0:
        raise click.BadParameter("must be positive", param_hint="--run-timeout")
    return lambda _hold_ns: fixed


def _report(out: Path) -> None:
    from analysis.lab.errors import LabError
    from analysis.report.study_render import write_reports

    try:
        paths = write_reports(out)
    except LabError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"study: wrote {paths['html']}, {paths['md'].name}, study.json")


@click.command("study-report")
@click.argument("out", type=click.Path(file_okay=False, exists=True, path_type=Path))
def study_report_cmd(out: Path) -> None:
    """Rebuild DIR/study.json, study.md and study.html from a study's run directories.

    \b
    Example:
      tsprobe lab study-report studies/s1
    """
    _report(out)


STUDY_COMMANDS = (study_cmd, study_report_cmd)
