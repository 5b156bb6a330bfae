"""The policy study's runner: many ``tsprobe lab run`` over a cross product, each reported.

A study is the cross product scenario x hold x clocksource x accel, each *cell* run
``repeat`` times. The question it answers (../shared/context) is a policy choice while
postcopy is paused: keep the vCPUs running (``paused``) or stop them (``paused-stop``);
its answer is a distribution over runs, so every cell is repeated and the report
(``analysis.report.study``) gives k of n, medians and spreads.

Order. Runs go round-robin over the repeats (``plan_runs``): every cell's first run, then
every cell's second, and so on, so a drift of the shared machine (another job, a warm
cache) spreads over all cells instead of hitting one.

Each run is a subprocess, ``tsprobe lab run ... --out DIR/runs/NAME`` (``lab_command``),
then ``tsprobe report DIR/runs/NAME``. A lab crash or hang does not end the study: a run
has ``run_timeout_s`` (a base plus a multiple of its hold); past it the run's process
group gets SIGTERM (the lab kills its QEMUs on it), then SIGKILL. Whatever happened is
kept in ``study-run.json`` in the run directory (``RunRecord``: exit status, wall time,
timeout, the tail of the lab's output in ``study-run.log``) and the run's outcome is read
by ``analysis.report.study.read_cell``: ``lab-outcome.json`` when the lab wrote one, else
``lab-error`` with that evidence.

Complete run (skipped by ``--resume``): ``study-run.json`` records an ended run (not
interrupted) and either its outcome is a guest outcome (``recovered``, ``degraded``,
``not-recovered``) and ``summary.json`` exists, or it is a ``lab-error`` (a result too:
the study says which runs failed; ``--retry-errors`` runs those again). A run directory
left by an interrupted run is moved to ``DIR/runs/.incomplete/`` before the run starts
again, never deleted.

The lab lock. Two labs on this 2-core machine must never share the cores, so every
command that boots lab guests runs under one lock file (``TSPROBE_LAB_LOCK``, default
``/tmp/tsprobe-lab.lock``; ``flock /tmp/tsprobe-lab.lock tsprobe lab run ...`` by hand).
The runner takes it (``fcntl.flock``, exclusive) around each ``lab run`` and releases it
for the report, so concurrent studies queue run by run. When the study itself was started
under ``flock`` on the same file, it inherited the lock: it then holds it for its whole
life instead (a second open of the file would wait for itself).

study.json is rewritten (atomically) after every run, so an interrupted study keeps every
finished run; Ctrl-C stops the running lab (SIGTERM to its group), records the study as
interrupted and exits 130. ``DIR/study.json``'s ``params`` are the study's identity: a
second study into the same DIR must have the same parameters (except ``repeat``, which
``--resume`` may raise) and ``--resume``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from analysis.lab.errors import LabError
from probe.durations import format_duration

#: ``--clocksource`` value meaning "no clocksource= on the kernel command line".
DEFAULT_CLOCKSOURCE = "default"
LOCK_ENV = "TSPROBE_LAB_LOCK"
DEFAULT_LOCK = "/tmp/tsprobe-lab.lock"
#: Tests only: a command line (shlex) that replaces ``python -m tsprobe.cli``.
COMMAND_ENV = "TSPROBE_STUDY_COMMAND"
RUNS = "runs"
INCOMPLETE = ".incomplete"
RUN_RECORD = "study-run.json"
RUN_LOG = "study-run.log"
OUTCOME = "lab-outcome.json"
SUMMARY = "summary.json"
GUEST_OUTCOMES = ("recovered", "degraded", "not-recovered")
#: A run's timeout: ``TIMEOUT_BASE_S`` + ``TIMEOUT_HOLD_FACTOR`` x its hold. A run takes
#: 20-40 s plus its hold here; a guest that does not recover adds the lab's settle time.
TIMEOUT_BASE_S = 300.0
TIMEOUT_HOLD_FACTOR = 3.0
#: Seconds between SIGTERM and SIGKILL of a run that timed out or was interrupted.
KILL_GRACE_S = 20.0
REPORT_TIMEOUT_S = 300.0
TAIL_LINES = 12


@dataclass(frozen=True)
class StudyParams:
    """What the study was asked for; everything but ``repeat`` is its identity."""

    scenarios: tuple[str, ...]
    holds_ns: tuple[int, ...]
    clocksources: tuple[str, ...] = (DEFAULT_CLOCKSOURCE,)
    accels: tuple[str, ...] = ("auto",)
    repeat: int = 1
    qemu: str | None = None
    #: Options passed to every ``lab run`` as given (e.g. ``("--workload", "64M")``).
    extra: tuple[str, ...] = ()

    def check(self) -> None:
        """:raise LabError: one line for an empty list, a non-positive hold or repeat."""
        for what, values in (
            ("--scenario", self.scenarios),
            ("--hold", self.holds_ns),
            ("--clocksource", self.clocksources),
            ("--accel", self.accels),
        ):
            if not values:
                raise LabError(f"{what} needs at least one value")
            if len(set(values)) != len(values):
                raise LabError(f"{what} names a value twice")
        if any(h <= 0 for h in self.holds_ns):
            raise LabError("--hold values must be positive (e.g. 2s,30s)")
        if self.repeat < 1:
            raise LabError("--repeat must be at least 1")

    def identity(self) -> dict[str, Any]:
        """The parameters two runs of one study must share (JSON-ready)."""
        doc = self.to_dict()
        doc.pop("repeat")
        return doc

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (lists, not tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> StudyParams:
        """The parameters stored in study.json.

        :raise LabError: when they are not a study's parameters.
        """
        try:
            return cls(
                scenarios=tuple(str(s) for s in doc["scenarios"]),
                holds_ns=tuple(int(h) for h in doc["holds_ns"]),
                clocksources=tuple(str(c) for c in doc["clocksources"]),
                accels=tuple(str(a) for a in doc["accels"]),
                repeat=int(doc["repeat"]),
                qemu=None if doc.get("qemu") is None else str(doc["qemu"]),
                extra=tuple(str(e) for e in doc.get("extra") or ()),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise LabError(f"study.json: not a study's params ({err})") from err


def hold_label(hold_ns: int) -> str:
    """A hold as typed: ``2s``, ``1.5s``, ``500ms``."""
    return format_duration(hold_ns)


@dataclass(frozen=True)
class RunSpec:
    """One run of one cell."""

    scenario: str
    hold_ns: int
    clocksource: str
    accel: str
    repeat: int  #: 1-based

    @property
    def cell(self) -> tuple[str, int, str, str]:
        """The cell this run repeats."""
        return (self.scenario, self.hold_ns, self.clocksource, self.accel)

    @property
    def name(self) -> str:
        """The run directory's name, e.g. ``paused-h30s-csdefault-auto-r2``."""
        hold = hold_label(self.hold_ns).replace(".", "p")
        return f"{self.scenario}-h{hold}-cs{self.clocksource}-{self.accel}-r{self.repeat}"

    def describe(self) -> str:
        """For progress lines: ``paused hold=30s cs=default accel=auto #2``."""
        return (
            f"{self.scenario} hold={hold_label(self.hold_ns)} cs={self.clocksource} "
            f"accel={self.accel} #{self.repeat}"
        )


def plan_runs(params: StudyParams) -> list[RunSpec]:
    """Every run of the study in the order to run it: round-robin over the repeats.

    :return: for repeat 1, every cell (scenario slowest, then hold, clocksource, accel);
        then for repeat 2 the same cells; and so on.
    """
    cells = [
        (s, h, c, a)
        for h in params.holds_ns
        for s in params.scenarios
        for c in params.clocksources
        for a in params.accels
    ]
    return [RunSpec(s, h, c, a, r) for r in range(1, params.repeat + 1) for (s, h, c, a) in cells]


def run_timeout_s(hold_ns: int) -> float:
    """How long one run may take before the study kills it."""
    return TIMEOUT_BASE_S + TIMEOUT_HOLD_FACTOR * hold_ns / 1e9


def base_command() -> list[str]:
    """The ``tsprobe`` command line (``TSPROBE_STUDY_COMMAND`` replaces it in tests)."""
    override = os.environ.get(COMMAND_ENV)
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "tsprobe.cli"]


def lab_command(params: StudyParams, spec: RunSpec, rundir: Path) -> list[str]:
    """The ``tsprobe lab run`` command line of one run."""
    cmd = [*base_command(), "lab", "run", "--scenario", spec.scenario]
    cmd += ["--hold", hold_label(spec.hold_ns), "--accel", spec.accel]
    if spec.clocksource != DEFAULT_CLOCKSOURCE:
        cmd += ["--clocksource", spec.clocksource]
    if params.qemu:
        cmd += ["--qemu", params.qemu]
    return [*cmd, *params.extra, "--out", str(rundir)]


@dataclass
class RunRecord:
    """What the runner saw of one run (``study-run.json`` in its directory)."""

    name: str
    scenario: str
    hold_ns: int
    clocksource: str
    accel: str
    repeat: int
    command: list[str]
    started_real_ns: int
    wall_s: float | None = None
    exit_code: int | None = None
    timed_out: bool = False
    timeout_s: float | None = None
    interrupted: bool = False
    report_exit: int | None = None
    tail: list[str] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        """The lab run ended by itself or by its timeout (not by Ctrl-C)."""
        return not self.interrupted and (self.exit_code is not None or self.timed_out)

    def save(self, rundir: Path) -> None:
        """Write ``study-run.json`` (atomically)."""
        write_json_atomic(rundir / RUN_RECORD, asdict(self))

    @classmethod
    def load(cls, rundir: Path) -> RunRecord | None:
        """The record in ``rundir``, or None when there is none or it is unreadable."""
        try:
            doc = json.loads((rundir / RUN_RECORD).read_text())
            return cls(**doc)
        except (OSError, ValueError, TypeError):
            return None


def write_json_atomic(path: Path, doc: Any, sort_keys: bool = True) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=sort_keys) + "\n")
    os.replace(tmp, path)


def read_outcome_name(rundir: Path) -> str | None:
    """The ``outcome`` of ``lab-outcome.json``, or None when it is missing or unreadable."""
    try:
        doc = json.loads((rundir / OUTCOME).read_text())
    except (OSError, ValueError):
        return None
    value = doc.get("outcome") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def is_complete(rundir: Path, retry_errors: bool = False) -> bool:
    """Whether ``--resume`` skips this run (module docstring: "Complete run")."""
    record = RunRecord.load(rundir)
    if record is None or not record.ended:
        return False
    outcome = read_outcome_name(rundir)
    if outcome is None and not record.timed_out and record.exit_code in EXIT_OUTCOMES:
        outcome = EXIT_OUTCOMES[record.exit_code]
    if outcome in GUEST_OUTCOMES:
        return (rundir / SUMMARY).exists()
    return not retry_errors


#: ``tsprobe lab run``'s exit codes for the guest's outcomes.
EXIT_OUTCOMES = {0: "recovered", 3: "degraded", 4: "not-recovered"}


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` non-empty lines of a text file (none when unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


# -- the lab lock ----------------------------------------------------------------------------


def lock_path() -> Path:
    """The lab lock file (``TSPROBE_LAB_LOCK``, default ``/tmp/tsprobe-lab.lock``)."""
    return Path(os.environ.get(LOCK_ENV) or DEFAULT_LOCK)


def inherited_lock_fd(path: Path) -> int | None:
    """An fd this process inherited that is open on ``path`` (``flock FILE tsprobe ...``)."""
    try:
        target = path.stat()
    except OSError:
        return None
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                return fd
    return None


class LabLock:
    """The lab lock, taken per run (or held for the study when inherited from ``flock``)."""

    def __init__(self, path: Path, say: Callable[[str], None]) -> None:
        self.path = path
        self.say = say
        self.inherited = inherited_lock_fd(path)
        if self.inherited is not None:
            say(f"study: {path} is held by the calling flock; runs do not take it again")

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the block (waiting, and saying so, when another lab has it)."""
        if self.inherited is not None:
            yield
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.say(f"study: waiting for the lab lock {self.path} (another lab is running)")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# -- running one command ---------------------------------------------------------------------


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) arrived while a run was going."""


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the run's process group, SIGKILL it when it outlives ``KILL_GRACE_S``."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: list[str], log: Path, timeout_s: float) -> tuple[int | None, bool, float]:
    """Run ``cmd`` in its own session, its output appended to ``log``.

    :return: (exit status or None when killed on timeout, timed out, wall seconds).
    :raise Interrupted: on KeyboardInterrupt, after stopping the command's group.
    """
    t0 = time.monotonic()
    with open(log, "ab") as out:
        out.write(("$ " + shlex.join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s)
            return code, False, time.monotonic() - t0
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return None, True, time.monotonic() - t0
        except KeyboardInterrupt:
            _stop_group(proc)
            raise Interrupted() from None


# -- the study -------------------------------------------------------------------------------


def load_study_doc(out: Path) -> dict[str, Any] | None:
    """``out/study.json``, or None when there is none.

    :raise LabError: when it exists but is not a study's.
    """
    path = out / "study.json"
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LabError(f"{path}: unreadable ({err}); use a new --out") from err
    if not isinstance(doc, dict) or doc.get("kind") != "tsprobe-study":
        raise LabError(f"{path} is not a tsprobe study; use a new --out")
    return doc


def check_out(out: Path, params: StudyParams, resume: bool) -> StudyParams:
    """Check ``out`` against the study asked for.

    :return: the parameters to run (with --resume, ``repeat`` is the larger of the two).
    :raise LabError: when ``out`` holds another study, or this one without ``--resume``.
    """
    doc = load_study_doc(out)
    if doc is None:
        if (out / RUNS).exists() and any((out / RUNS).iterdir()) and not resume:
            raise LabError(f"{out} holds run directories: add --resume or use a new --out")
        return params
    old = StudyParams.from_dict(doc.get("params") or {})
    mine, theirs = params.identity(), old.identity()
    differing = [k for k in mine if mine[k] != theirs.get(k)]
    if differing:
        what = ", ".join(f"{k} {theirs.get(k)} (asked: {mine[k]})" for k in differing)
        raise LabError(
            f"{out} holds another study ({what}): use a new --out, or the same parameters "
            "with --resume"
        )
    if not resume:
        raise LabError(f"{out} holds this study already: add --resume to continue it")
    return replace(params, repeat=max(params.repeat, old.repeat))


def _eta(overheads: list[float], left: list[RunSpec]) -> str:
    """Time left: per remaining run, the mean run time beyond its hold so far plus its hold."""
    if not overheads or not left:
        return "0s"
    mean = sum(overheads) / len(overheads)
    seconds = int(sum(mean + spec.hold_ns / 1e9 for spec in left))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class StudyResult:
    """What ``run_study`` did."""

    planned: int
    ran: int
    skipped: int
    failed: list[str]
    interrupted: bool
    wall_s: float


def run_study(
    params: StudyParams,
    out: Path,
    *,
    resume: bool = False,
    retry_errors: bool = False,
    say: Callable[[str], None] = print,
    run_timeout: Callable[[int], float] = run_timeout_s,
) -> StudyResult:
    """Run (or continue) a study into ``out`` and write its reports.

    :raise LabError: on bad parameters or an ``out`` holding another study.
    :return: counts of what ran, with the names of the runs that ended in ``lab-error``.
    """
    from analysis.report import study as study_report
    from analysis.report.study_render import write_reports

    params.check()
    params = check_out(out, params, resume)
    t0 = time.monotonic()
    runs_dir = out / RUNS
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_runs(params)
    cells_total = len({spec.cell for spec in plan})
    lock = LabLock(lock_path(), say)
    todo = [spec for spec in plan if not is_complete(runs_dir / spec.name, retry_errors)]
    skipped = len(plan) - len(todo)
    if skipped:
        say(f"study: {skipped} of {len(plan)} runs already complete in {out}, skipped")
    state = {"status": "running", "started_real_ns": time.time_ns()}
    study_report.write_study_json(out, params, plan, state)
    overheads: list[float] = []
    failed: list[str] = []
    interrupted = False
    ran = 0
    try:
        for i, spec in enumerate(todo, start=1):
            outcome, wall = _one_run(params, spec, runs_dir, lock, run_timeout)
            ran += 1
            overheads.append(max(wall - spec.hold_ns / 1e9, 0.0))
            if outcome == "lab-error":
                failed.append(spec.name)
            done_cells = _cells_done(plan, runs_dir, spec)
            study_report.write_study_json(out, params, plan, state)
            note = " (lab error: see its study-run.log)" if outcome == "lab-error" else ""
            say(
                f"study: run {skipped + i}/{len(plan)} {spec.describe()}: {outcome} in "
                f"{wall:.1f} s{note}; cells done {done_cells}/{cells_total}; "
                f"ETA {_eta(overheads, todo[i:])}"
            )
    except Interrupted:
        interrupted = True
        say("study: interrupted; the runs finished so far are in study.json")
    state["status"] = "interrupted" if interrupted else "complete"
    doc = study_report.write_study_json(out, params, plan, state)
    write_reports(out, doc)
    say(f"study: report {out / 'study.html'} (and study.md, study.json)")
    if failed:
        say(f"study: {len(failed)} run(s) ended in lab-error: {', '.join(failed)}")
    return StudyResult(len(plan), ran, skipped, failed, interrupted, time.monotonic() - t0)


def _cells_done(plan: list[RunSpec], runs_dir: Path, current: RunSpec) -> int:
    """Cells whose every repeat has run (complete, or just run: ``current``)."""
    done: dict[tuple[str, int, str, str], bool] = {}
    for spec in plan:
        ok = spec == current or (RunRecord.load(runs_dir / spec.name) or _NOT_RUN).ended
        done[spec.cell] = done.get(spec.cell, True) and ok
    return sum(done.values())


_NOT_RUN = RunRecord("", "", 0, "", "", 0, [], 0)


def _one_run(
    params: StudyParams,
    spec: RunSpec,
    runs_dir: Path,
    lock: LabLock,
    run_timeout: Callable[[int], float],
) -> tuple[str, float]:
    """Run, report and record one run.

    :return: its outcome and wall time.
    :raise Interrupted: on Ctrl-C (the record says so).
    """
    from analysis.report import study as study_report

    rundir = runs_dir / spec.name
    if rundir.exists():
        aside = runs_dir / INCOMPLETE / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        rundir.rename(aside)
    rundir.mkdir(parents=True)
    cmd = lab_command(params, spec, rundir)
    record = RunRecord(
        name=spec.name,
        scenario=spec.scenario,
        hold_ns=spec.hold_ns,
        clocksource=spec.clocksource,
        accel=spec.accel,
        repeat=spec.repeat,
        command=cmd,
        started_real_ns=time.time_ns(),
        timeout_s=run_timeout(spec.hold_ns),
    )
    record.save(rundir)
    log = rundir / RUN_LOG
    try:
        with lock.held():
            record.started_real_ns = time.time_ns()
            code, timed_out, wall = run_logged(cmd, log, record.timeout_s or 0.0)
        record.exit_code, record.timed_out, record.wall_s = code, timed_out, round(wall, 3)
        record.tail = tail(log)
        record.save(rundir)
        if (rundir / "meta.json").exists():
            report = [*base_command(), "report", str(rundir)]
            rcode, _, _ = run_logged(report, log, REPORT_TIMEOUT_S)
            record.report_exit = rcode
            record.save(rundir)
    except Interrupted:
        record.interrupted = True
        record.tail = tail(log)
        record.save(rundir)
        raise
    cell = study_report.read_cell(runs_dir.parent, rundir)
    return str(cell["outcome"]), wall
