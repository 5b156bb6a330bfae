"""A seeded fuzz corpus of command lines for every ``tsprobe`` command, and its runner.

The promise under test: bad input gets one clear line and a non-zero exit, never a
traceback and never a hang. Each case is one command line run as its own process (so a
hang is a hang and a traceback is what a user would see), classified as:

``ok``           exit 0;
``clear error``  a non-zero exit with no traceback on stderr;
``traceback``    a Python traceback on stderr, or death by a signal;
``hang``         still running after the case's time limit (then killed).

How the corpus is made (``corpus(seed, count)``):

- ``ISSUE_CASES``: the command lines issue 18 named, each by a stable name (the tests
  run each as its own case).
- Then ``count`` cases drawn with ``random.Random(seed)``: a command, one of its options
  (or an argument), and an odd value from the pools of that option's kind (durations of
  400 digits, Unicode digits, ports out of range, 5,000-character paths, regexes nested
  5,000 deep, bytes that are not UTF-8, ...), sometimes with a second odd option. The same
  seed gives the same corpus; the tests use ``SEED`` and a script (``bench/fuzz_cli``)
  runs held-out seeds.

Every case runs on top of a base command line that makes a valid command end quickly and
touch nothing outside a scratch directory: the agent with its probes off and
``--duration 100ms``; ``record`` against an agent URL nobody answers; the lab with a QEMU
that does not exist (so every option is checked and the run stops before booting) and a
lab lock of its own. ``lab build-guest`` is given only values that cannot start a build.
Values never name a writable system path (this runs as root in CI): write paths are
relative (inside the scratch directory), missing, or read-only (/proc).
"""

from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = str(REPO / "tests" / "fixtures" / "lab-runs" / "paused")
SEED = 18
CLASSES = ("ok", "clear error", "traceback", "hang")
#: A case still running after this long is a hang (a valid report takes about 2 s).
TIME_LIMIT_S = 20.0
#: Address space per case: a parser that grows memory fails here instead of the machine.
MEMORY_LIMIT = 3 << 30

Arg = str | bytes


@dataclass(frozen=True)
class Case:
    """One command line (after ``tsprobe``), with a stable name."""

    name: str
    argv: tuple[Arg, ...]


@dataclass(frozen=True)
class Outcome:
    """What one case did."""

    case: Case
    klass: str
    returncode: int | None
    seconds: float
    last_line: str


# -- values ------------------------------------------------------------------------------

LONG_DIGITS = "1" * 400
HUGE_DIGITS = "9" * 5000
LONG_NAME = "x" * 5000
DEEP_REGEX = "(" * 5000 + "a" + ")" * 5000

COMMON: tuple[Arg, ...] = (
    "",
    " ",
    "-",
    "--",
    "0",
    "-1",
    LONG_DIGITS,
    HUGE_DIGITS,
    "²",
    "١٢٣",
    "1e999",
    "nan",
    "inf",
    "0x10",
    LONG_NAME,
    "\t\n",
    "a=b=c",
    "ünïcödé",
    b"\xff\xfe",
    "%s%n",
    "\x1b[31m",
)

POOLS: dict[str, tuple[Arg, ...]] = {
    "duration": (
        LONG_DIGITS + "s",
        LONG_DIGITS + "ms",
        LONG_DIGITS + ".5h",
        "0." + "0" * 400 + "1s",
        "9" * 30 + "h",
        "1" * 20 + "ns",
        "-5ms",
        "5 ms",
        "5S",
        "²s",
        "1.5.5s",
        "0ns",
        "0.1ns",
        "100ms",
        "1µs",
    ),
    "durations": (
        ",",
        ",,,",
        "1ms," * 2000,
        LONG_DIGITS + "s,1s",
        "1s,-1s",
        "0,1s",
        "10ms,100ms",
        "1ms,1ms,1ms",
    ),
    "listen": (
        "127.0.0.1:²",
        "127.0.0.1:١",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:" + LONG_DIGITS,
        "[::1",
        "[::1]:0",
        "::1:80",
        "256.0.0.1:0",
        "no.such.host.invalid:0",
        ":",
        "127.0.0.1:",
        "127.0.0.1:0",
    ),
    "url": (
        "http://[::1",
        "http://[::1]:²",
        "http://127.0.0.1:²",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "http://",
        "http://:80",
        "ftp://127.0.0.1:9",
        "http://" + LONG_NAME,
        "http://127.0.0.1:9/" + LONG_NAME,
        "guest=http://[::1",
        "=http://127.0.0.1:9",
    ),
    "int": ("1" + "0" * 30, "10", "1", "0", "-1", HUGE_DIGITS, "1.5", "²"),
    "cpus": (
        "0-999999999",
        "0-" + LONG_DIGITS,
        LONG_DIGITS,
        "5-1",
        "0,,1",
        "0-1-2",
        "²",
        "0-" + "9" * 12,
        "999999",
        "0",
    ),
    "logspec": (
        "/nonexistent/app.log:" + DEEP_REGEX,
        "/nonexistent/app.log:" + "(?:" * 2000 + "a" + ")" * 2000,
        "/nonexistent/app.log:(",
        "/nonexistent/app.log:[",
        "/nonexistent/app.log:a{99999999999}",
        "/nonexistent/app.log:" + "a" * 200_000,
        "/nonexistent/app.log:timeout:",
        ":timeout",
        "app.log:timeout:name",
        LONG_NAME + ":timeout",
    ),
    "write_path": (
        "",
        LONG_NAME,
        "a/" * 3000 + "x",
        "missing/dir/x",
        "/proc/version/x",
        "/proc/version",
        "adir",
        "afile",
        "out",
        b"out\xff",
    ),
    "read_path": (
        "",
        LONG_NAME,
        "/nonexistent",
        "/proc/version",
        "adir",
        "afile",
        b"\xff",
    ),
    "size": ("512M", "1" + "0" * 400 + "M", "0", "-1M", "1e999M", "²M", "M", "nan", "inf"),
    "list": (",", "paused," * 2000, "paused,,paused", "x" * 5000, "paused,paused-stop"),
    "name": ("src", "", "a/b", "..", "x" * 5000, "ü", "a b"),
    "time": ("2026-11-25T10:00:00Z", "", "x", LONG_DIGITS, "9999-99-99", "-1", "nan"),
    "text": ("x", "", LONG_NAME),
}

#: command -> (base argv with {tmp} for the scratch directory, ((option, kind), ...))
COMMANDS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "agent": (
        (
            "agent",
            "--duration",
            "100ms",
            "--events",
            "none",
            "--listen",
            "127.0.0.1:0",
            "--no-stall",
            "--no-clock",
            "--no-kmsg",
            "--canaries",
            "none",
        ),
        (
            ("--cpus", "cpus"),
            ("--interval", "duration"),
            ("--threshold", "duration"),
            ("--listen", "listen"),
            ("--events", "write_path"),
            ("--events-ring", "int"),
            ("--timeouts", "durations"),
            ("--canaries", "list"),
            ("--heartbeat-interval", "duration"),
            ("--rpc-interval", "duration"),
            ("--watch-log", "logspec"),
            ("--duration", "duration"),
            ("--stall-mode", "text"),
            ("--clock-period", "duration"),
            ("--clock-step-threshold", "duration"),
            ("--path.procfs", "read_path"),
            ("--path.sysfs", "read_path"),
            ("--path.devfs", "read_path"),
        ),
    ),
    "record": (
        ("record", "--agent", "http://127.0.0.1:9", "--duration", "200ms", "--out", "rec", "-q"),
        (
            ("--qmp", "name"),
            ("--agent", "url"),
            ("--out", "write_path"),
            ("--poll", "duration"),
            ("--grace", "duration"),
            ("--duration", "duration"),
            ("--qmp-timeout", "duration"),
            ("--libvirt-events", "read_path"),
            ("--listen", "listen"),
            ("--vcpu-poll", "duration"),
            ("--qemu-pid", "name"),
        ),
    ),
    "timeline": (("timeline", RUN), (("RUNDIR", "read_path"), ("--json", "flag"))),
    "report": (
        ("report", RUN, "--out", "rep"),
        (
            ("RUNDIR", "read_path"),
            ("--out", "write_path"),
            ("--prometheus", "url"),
            ("--instance", "text"),
            ("--from", "time"),
            ("--to", "time"),
            ("--run", "read_path"),
        ),
    ),
    "compare": (
        ("compare", RUN, RUN, "--out", "cmp"),
        (("RUNDIR", "read_path"), ("--out", "write_path"), ("--name", "text")),
    ),
    "lab run": (
        (
            "lab",
            "run",
            "--scenario",
            "paused",
            "--out",
            "labrun",
            "--qemu",
            "/nonexistent/qemu-system-x86_64",
        ),
        (
            ("--scenario", "text"),
            ("--out", "write_path"),
            ("--vcpus", "int"),
            ("--mem", "size"),
            ("--hold", "duration"),
            ("--stall", "durations"),
            ("--cpu", "int"),
            ("--workload", "size"),
            ("--workload-cpu", "int"),
            ("--bandwidth", "size"),
            ("--accel", "text"),
            ("--clocksource", "text"),
            ("--clock-step", "duration"),
            ("--listen", "listen"),
            ("--agent-listen", "listen"),
            ("--canaries", "list"),
            ("--kmsg", "text"),
            ("--baseline", "duration"),
            ("--linger", "duration"),
        ),
    ),
    "lab study": (
        (
            "lab",
            "study",
            "--scenario",
            "paused",
            "--hold",
            "2s",
            "--out",
            "study",
            "--qemu",
            "/nonexistent/qemu-system-x86_64",
        ),
        (
            ("--scenario", "list"),
            ("--hold", "durations"),
            ("--clocksource", "list"),
            ("--accel", "list"),
            ("--repeat", "int"),
            ("--out", "write_path"),
            ("--workload", "size"),
            ("--vcpus", "int"),
            ("--mem", "size"),
            ("--baseline", "duration"),
            ("--canaries", "list"),
            ("--bandwidth", "size"),
            ("--run-timeout", "duration"),
        ),
    ),
    "lab study-report": (("lab", "study-report", "study"), (("DIR", "read_path"),)),
}

#: Values of ``lab build-guest`` that cannot start a build (a build takes minutes).
BUILD_GUEST_CASES: tuple[tuple[Arg, ...], ...] = (
    ("lab", "build-guest", "--cache", "/proc/version"),
    ("lab", "build-guest", "--cache", LONG_NAME),
    ("lab", "build-guest", "--bogus"),
    ("lab", "build-guest", "--force", "--force", "--cache", "/proc/version"),
)

#: name -> (command, ((option, value), ...)) set on that command's base line.
ISSUE_CASES: dict[str, tuple[str, tuple[tuple[str, Arg], ...]]] = {
    "record_duration_400_digits": ("record", (("--duration", LONG_DIGITS + "s"),)),
    "record_poll_400_digits": ("record", (("--poll", LONG_DIGITS + "ms"),)),
    "record_qmp_timeout_400_digits": ("record", (("--qmp-timeout", LONG_DIGITS + "s"),)),
    "record_vcpu_poll_400_digits": ("record", (("--vcpu-poll", LONG_DIGITS + "ms"),)),
    "record_grace_400_digits": ("record", (("--grace", LONG_DIGITS + "s"),)),
    "record_agent_unclosed_ipv6": ("record", (("--agent", "http://[::1"),)),
    "record_agent_unicode_port": ("record", (("--agent", "http://127.0.0.1:²"),)),
    "record_listen_unicode_port": ("record", (("--listen", "127.0.0.1:²"),)),
    "record_qmp_unicode_port": ("record", (("--qmp", "src=127.0.0.1:²"),)),
    "record_out_empty": ("record", (("--out", ""),)),
    "agent_duration_400_digits": ("agent", (("--duration", LONG_DIGITS + "s"),)),
    "agent_interval_400_digits": ("agent", (("--interval", LONG_DIGITS + "ms"),)),
    "agent_timeouts_400_digits": ("agent", (("--timeouts", LONG_DIGITS + "s"),)),
    "agent_listen_unicode_port": ("agent", (("--listen", "127.0.0.1:²"),)),
    "agent_events_ring_10e30": ("agent", (("--events-ring", "1" + "0" * 30),)),
    "agent_cpus_huge_range": ("agent", (("--cpus", "0-999999999"),)),
    "agent_watch_log_deep_regex": (
        "agent",
        (("--watch-log", "/nonexistent/app.log:" + DEEP_REGEX),),
    ),
    "agent_events_in_missing_dir": ("agent", (("--events", "nonexistent/dir/x.jsonl"),)),
    "timeline_long_path": ("timeline", (("RUNDIR", LONG_NAME),)),
    "report_long_path": ("report", (("RUNDIR", LONG_NAME),)),
    "report_out_empty": ("report", (("--out", ""),)),
    "compare_out_empty": ("compare", (("--out", ""),)),
    "lab_run_hold_400_digits": ("lab run", (("--hold", LONG_DIGITS + "s"),)),
    "lab_run_mem_400_digits": ("lab run", (("--mem", "1" + "0" * 400 + "M"),)),
    "lab_study_repeat_10e30": ("lab study", (("--repeat", "1" + "0" * 30),)),
}


def with_option(base: Sequence[Arg], option: str, value: Arg | None) -> tuple[Arg, ...]:
    """``base`` with ``option`` set to ``value`` (replacing the base's own value), or
    with the positional argument ``option`` (an upper-case name) replaced; a ``flag`` kind
    passes ``value`` None."""
    argv = list(base)
    if option.isupper():
        positional = [i for i, arg in enumerate(argv) if arg == RUN or arg in ("study",)]
        if positional and value is not None:
            argv[positional[-1]] = value
        return tuple(argv)
    if value is None:
        return (*argv, option)
    if option in argv and option not in ("--agent", "--name"):
        argv[argv.index(option) + 1] = value
        return tuple(argv)
    return (*argv, option, value)


def issue_case(name: str) -> Case:
    """An issue case: its odd values set on its command's base line."""
    command, changes = ISSUE_CASES[name]
    argv = COMMANDS[command][0]
    for option, value in changes:
        argv = with_option(argv, option, value)
    return Case(name, argv)


def corpus(seed: int = SEED, count: int = 200) -> list[Case]:
    """The issue's cases, ``lab build-guest``'s, and ``count`` seeded random cases.

    :param seed: the random seed (the same seed, the same corpus).
    :param count: how many random cases.
    :return: the cases, named uniquely.
    """
    cases = [issue_case(name) for name in ISSUE_CASES]
    cases += [Case(f"build_guest_{i}", argv) for i, argv in enumerate(BUILD_GUEST_CASES)]
    for command in COMMANDS:
        cases.append(Case(f"{command}_base", COMMANDS[command][0]))
        cases.append(Case(f"{command}_unknown_option", (*COMMANDS[command][0], "--bogus")))
    rng = random.Random(seed)
    names = sorted(COMMANDS)
    for index in range(count):
        command = rng.choice(names)
        base, options = COMMANDS[command]
        argv = base
        for _ in range(1 if rng.random() < 0.8 else 2):
            option, kind = rng.choice(options)
            if kind == "flag":
                argv = with_option(argv, option, None)
                continue
            pool = POOLS.get(kind, ()) + COMMON
            argv = with_option(argv, option, rng.choice(pool))
        cases.append(Case(f"seed{seed}_{index}_{command.replace(' ', '_')}", argv))
    return cases


# -- running -----------------------------------------------------------------------------


def _limit_memory() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    os.setsid()


def classify(returncode: int | None, stderr: str) -> str:
    """The outcome class of a finished (or, with ``returncode`` None, killed) case."""
    if returncode is None:
        return "hang"
    if "Traceback (most recent call last)" in stderr or returncode < 0:
        return "traceback"
    return "ok" if returncode == 0 else "clear error"


def run_case(case: Case, time_limit_s: float = TIME_LIMIT_S) -> Outcome:
    """Run one case as ``python -m tsprobe.cli ARGV`` in a scratch directory.

    :param case: the case.
    :param time_limit_s: after this long the case is a hang and its process group killed.
    :return: its outcome.
    """
    with tempfile.TemporaryDirectory(prefix="tsprobe-fuzz-") as tmp:
        (Path(tmp) / "adir").mkdir()
        (Path(tmp) / "afile").write_text("not a directory\n")
        env = dict(os.environ)
        env["TSPROBE_LAB_LOCK"] = str(Path(tmp) / "lab.lock")
        env["TSPROBE_CACHE"] = str(Path(tmp) / "cache")
        env["PYTHONPATH"] = str(REPO)
        args: list[Arg] = [sys.executable, "-m", "tsprobe.cli", *case.argv]
        start = time.monotonic()
        proc = subprocess.Popen(
            args,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_limit_memory,
        )
        try:
            _, err = proc.communicate(timeout=time_limit_s)
            returncode: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            _, err = proc.communicate()
            returncode = None
        seconds = time.monotonic() - start
    stderr = err.decode("utf-8", "replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    return Outcome(
        case, classify(returncode, stderr), returncode, seconds, lines[-1][:300] if lines else ""
    )


def run_all(cases: Iterable[Case], workers: int = 4) -> list[Outcome]:
    """Run the cases, ``workers`` at a time, in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run_case, cases))


def table(outcomes: Iterable[Outcome]) -> dict[str, dict[str, int]]:
    """Counts per command and class: ``{command: {class: n}}`` (every class present)."""
    counts: dict[str, Counter[str]] = {}
    for outcome in outcomes:
        argv = [a for a in outcome.case.argv if isinstance(a, str)]
        command = " ".join(argv[:2]) if argv[0] == "lab" else argv[0]
        counts.setdefault(command, Counter())[outcome.klass] += 1
    return {
        command: {klass: counts[command][klass] for klass in CLASSES} for command in sorted(counts)
    }
