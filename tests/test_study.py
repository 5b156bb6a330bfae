"""The study runner (analysis.lab.study) with a fake ``tsprobe`` instead of the lab.

``TSPROBE_STUDY_COMMAND`` points the runner at tests/fixtures/study/fake_tsprobe.py,
which writes a minimal run directory per ``lab run`` (outcome chosen per run or scenario
by ``FAKE_LAB_BEHAVIOUR``) and a summary.json per ``report``, and logs every call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from analysis.lab.cli import lab
from analysis.lab.errors import LabError
from analysis.lab.study import (
    RunRecord,
    RunSpec,
    StudyParams,
    is_complete,
    lab_command,
    plan_runs,
    run_study,
    run_timeout_s,
)

FAKE = Path(__file__).parent / "fixtures" / "study" / "fake_tsprobe.py"


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake tsprobe, its call log and a private lab lock."""
    log = tmp_path / "calls.log"
    monkeypatch.setenv("TSPROBE_STUDY_COMMAND", f"{sys.executable} {FAKE}")
    monkeypatch.setenv("FAKE_LAB_LOG", str(log))
    monkeypatch.setenv("TSPROBE_LAB_LOCK", str(tmp_path / "lab.lock"))
    monkeypatch.delenv("FAKE_LAB_BEHAVIOUR", raising=False)
    return log


def behave(monkeypatch: pytest.MonkeyPatch, **what: str) -> None:
    monkeypatch.setenv("FAKE_LAB_BEHAVIOUR", json.dumps(what))


def lab_runs(log: Path) -> list[str]:
    return [line.split()[1] for line in log.read_text().splitlines() if line.startswith("lab-run")]


PARAMS = StudyParams(
    scenarios=("paused", "paused-stop"), holds_ns=(2_000_000_000, 30_000_000_000), repeat=2
)


def test_plan_interleaves_cells_round_robin() -> None:
    names = [s.name for s in plan_runs(PARAMS)]
    assert names == [
        "paused-h2s-csdefault-auto-r1",
        "paused-stop-h2s-csdefault-auto-r1",
        "paused-h30s-csdefault-auto-r1",
        "paused-stop-h30s-csdefault-auto-r1",
        "paused-h2s-csdefault-auto-r2",
        "paused-stop-h2s-csdefault-auto-r2",
        "paused-h30s-csdefault-auto-r2",
        "paused-stop-h30s-csdefault-auto-r2",
    ]
    three = StudyParams(("paused",), (1_500_000_000,), ("default", "tsc"), ("auto",), repeat=3)
    plan = plan_runs(three)
    assert [s.repeat for s in plan] == [1, 1, 2, 2, 3, 3]
    assert plan[1].name == "paused-h1p5s-cstsc-auto-r1"


def test_lab_command_passes_options_and_leaves_default_clocksource_out() -> None:
    params = StudyParams(("paused",), (30_000_000_000,), qemu="10.0", extra=("--workload", "8M"))
    cmd = lab_command(params, RunSpec("paused", 30_000_000_000, "default", "auto", 1), Path("R"))
    assert cmd[-10:] == [
        "--hold", "30s", "--accel", "auto", "--qemu", "10.0", "--workload", "8M", "--out", "R",
    ]  # fmt: skip
    assert "--clocksource" not in cmd
    cmd = lab_command(params, RunSpec("paused", 30_000_000_000, "tsc", "auto", 1), Path("R"))
    assert cmd[cmd.index("--clocksource") + 1] == "tsc"
    assert run_timeout_s(30_000_000_000) > run_timeout_s(2_000_000_000) > 60


def test_study_runs_in_order_reports_each_run_and_writes_study_json(
    fake: Path, tmp_path: Path
) -> None:
    out = tmp_path / "study"
    lines: list[str] = []
    result = run_study(PARAMS, out, say=lines.append)
    assert lab_runs(fake) == [s.name for s in plan_runs(PARAMS)]
    calls = fake.read_text().splitlines()
    # every lab run is followed by its report
    assert [c.split()[0] for c in calls] == ["lab-run", "report"] * 8
    assert result.ran == 8 and not result.failed and not result.interrupted
    progress = [line for line in lines if line.startswith("study: run ")]
    assert len(progress) == 8
    assert progress[4].startswith("study: run 5/8 paused hold=2s cs=default accel=auto #2: ")
    assert (
        "recovered in" in progress[4] and "cells done 1/4" in progress[4] and "ETA" in progress[4]
    )
    assert "cells done 4/4" in progress[-1]
    doc = json.loads((out / "study.json").read_text())
    assert doc["kind"] == "tsprobe-study" and doc["schema_version"] == 1
    assert doc["status"] == "complete" and doc["runs_done"] == 8
    cell = doc["cells"][0]
    for key in (
        "scenario", "hold_ms", "clocksource", "accel", "qemu_version", "repeat", "rundir",
        "outcome", "evidence", "kernel_warnings", "clock_lag_growth_ms", "longest_stall_ms",
        "timeouts",
    ):  # fmt: skip
        assert key in cell, key
    assert cell["rundir"] == "runs/paused-h2s-csdefault-auto-r1"
    assert cell["hold_ms"] == 2000.0 and cell["repeat"] == 1
    assert cell["longest_stall_ms"] == {"0": 2300.0, "1": 2290.0}
    assert cell["timeouts"] == {"50": 2, "100": 2, "1000": 2, "5000": 0, "30000": 0}
    assert (out / "study.md").exists() and (out / "study.html").exists()


def test_failed_and_hung_runs_are_lab_errors_and_the_study_goes_on(
    fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    behave(
        monkeypatch,
        **{"paused-h2s-csdefault-auto-r1": "crash", "paused-stop-h2s-csdefault-auto-r1": "hang"},
    )
    params = StudyParams(("paused", "paused-stop"), (2_000_000_000,))
    out = tmp_path / "study"
    lines: list[str] = []
    t0 = time.monotonic()
    result = run_study(params, out, say=lines.append, run_timeout=lambda _h: 1.5)
    assert time.monotonic() - t0 < 40  # the hang was killed (SIGTERM to its group)
    assert result.failed == ["paused-h2s-csdefault-auto-r1", "paused-stop-h2s-csdefault-auto-r1"]
    doc = json.loads((out / "study.json").read_text())
    crash, hang = doc["cells"]
    assert crash["outcome"] == "lab-error" and hang["outcome"] == "lab-error"
    assert "tsprobe lab run exited with status 1" in crash["evidence"]
    assert "lab output: Error: QEMU died (fake)" in crash["evidence"]
    assert any("did not end within 2 s: killed" in e for e in hang["evidence"])
    assert hang["timed_out"] is True
    assert any("2 run(s) ended in lab-error" in line for line in lines)
    assert doc["aggregates"][0]["lab_errors"] == ["runs/paused-h2s-csdefault-auto-r1"]


def test_resume_skips_complete_runs_and_moves_incomplete_ones_aside(
    fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    behave(monkeypatch, **{"paused-stop-h2s-csdefault-auto-r1": "crash"})
    params = StudyParams(("paused", "paused-stop"), (2_000_000_000,))
    out = tmp_path / "study"
    run_study(params, out, say=lambda _line: None)
    runs = out / "runs"
    # an interrupted run: its record says so, and it has no outcome
    rec = RunRecord.load(runs / "paused-h2s-csdefault-auto-r1")
    assert rec is not None
    rec.interrupted = True
    rec.save(runs / "paused-h2s-csdefault-auto-r1")
    assert not is_complete(runs / "paused-h2s-csdefault-auto-r1")
    assert is_complete(runs / "paused-stop-h2s-csdefault-auto-r1")  # lab-error: a result
    assert not is_complete(runs / "paused-stop-h2s-csdefault-auto-r1", retry_errors=True)
    fake.write_text("")
    behave(monkeypatch)
    lines: list[str] = []
    more = StudyParams(("paused", "paused-stop"), (2_000_000_000,), repeat=2)
    result = run_study(more, out, resume=True, say=lines.append)
    assert lab_runs(fake) == [
        "paused-h2s-csdefault-auto-r1",
        "paused-h2s-csdefault-auto-r2",
        "paused-stop-h2s-csdefault-auto-r2",
    ]
    assert result.skipped == 1 and result.ran == 3
    assert "study: 1 of 4 runs already complete" in lines[0]
    aside = list((runs / ".incomplete").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("paused-h2s-csdefault-auto-r1-")
    doc = json.loads((out / "study.json").read_text())
    assert doc["runs_done"] == 4 and doc["params"]["repeat"] == 2
    fake.write_text("")
    run_study(more, out, resume=True, retry_errors=True, say=lambda _line: None)
    assert lab_runs(fake) == ["paused-stop-h2s-csdefault-auto-r1"]
    # a smaller --repeat on resume keeps the study's repeats (and runs nothing)
    fake.write_text("")
    result = run_study(params, out, resume=True, say=lambda _line: None)
    assert lab_runs(fake) == [] and result.skipped == 4
    assert json.loads((out / "study.json").read_text())["params"]["repeat"] == 2


def test_out_holding_a_study_needs_resume_and_the_same_parameters(
    fake: Path, tmp_path: Path
) -> None:
    params = StudyParams(("paused",), (2_000_000_000,))
    out = tmp_path / "study"
    run_study(params, out, say=lambda _line: None)
    with pytest.raises(LabError, match="holds this study already: add --resume"):
        run_study(params, out, say=lambda _line: None)
    other = StudyParams(("paused",), (5_000_000_000,))
    with pytest.raises(LabError, match=r"holds another study \(holds_ns .*use a new --out"):
        run_study(other, out, resume=True, say=lambda _line: None)


def test_runs_wait_for_the_lab_lock(fake: Path, tmp_path: Path) -> None:
    lock = os.environ["TSPROBE_LAB_LOCK"]
    holder = subprocess.Popen(["flock", lock, "sleep", "2"])  # another lab
    time.sleep(0.5)
    lines: list[str] = []
    params = StudyParams(("paused",), (2_000_000_000,))
    t0 = time.monotonic()
    run_study(params, tmp_path / "s", say=lines.append)
    holder.wait(timeout=10)
    assert time.monotonic() - t0 > 1.0  # it waited for the holder
    assert any("waiting for the lab lock" in line for line in lines)
    assert lab_runs(fake) == ["paused-h2s-csdefault-auto-r1"]


def test_a_study_started_under_flock_holds_the_inherited_lock(fake: Path, tmp_path: Path) -> None:
    lock = os.environ["TSPROBE_LAB_LOCK"]
    proc = subprocess.run(
        ["flock", lock, sys.executable, "-m", "tsprobe.cli", "lab", "study",
         "--scenario", "paused", "--hold", "1s", "--out", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60, env=os.environ,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "held by the calling flock" in proc.stdout
    assert "study: run 1/1 paused hold=1s cs=default accel=auto #1: recovered" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "paused", "--hold", "0"], "a hold must be positive"),
        (["--scenario", "paused", "--hold", "2x"], "--hold"),
        (["--scenario", "pasued", "--hold", "2s"], "unknown scenario 'pasued'"),
        (["--scenario", "paused", "--hold", "2s", "--accel", "qemu"], "'qemu': choose from"),
        (["--scenario", "paused", "--hold", "2s", "--repeat", "0"], "--repeat"),
        (["--hold", "2s"], "--scenario and --hold are required"),
        (["--scenario", "paused", "--hold", "2s", "--clocksource", "default,tcs"], "'tcs' is not"),
    ],
)
def test_bad_input_is_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(lab, ["study", *args, "--out", str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_cli_says_another_study_in_one_line(fake: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "s")
    first = CliRunner().invoke(lab, ["study", "--scenario", "paused", "--hold", "1s", "--out", out])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(lab, ["study", "--scenario", "paused", "--hold", "3s", "--out", out])
    assert again.exit_code == 1
    assert "holds another study" in again.output and "--resume" in again.output
    only = CliRunner().invoke(lab, ["study-report", out])
    assert only.exit_code == 0 and "study.html" in only.output
    again = CliRunner().invoke(lab, ["study", "--report-only", "--out", out])
    assert again.exit_code == 0 and "study.html" in again.output
    none = CliRunner().invoke(lab, ["study", "--report-only", "--out", str(tmp_path / "no")])
    assert none.exit_code == 1 and "holds no study.json" in none.output
    assert "study-report" in CliRunner().invoke(lab, ["--help"]).output
    help_text = CliRunner().invoke(lab, ["study", "--help"]).output
    assert "Examples:" in help_text and "--resume" in help_text


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_the_run_and_keeps_study_json(
    fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals
) -> None:
    behave(monkeypatch, **{"paused-stop": "hang"})
    out = tmp_path / "s"
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: under `make test &` the study would never see this Ctrl-C. The
    # study is started as a terminal starts it, with SIGINT at its default.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tsprobe.cli", "lab", "study", "--scenario", "paused,paused-stop",
         "--hold", "1s", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while "paused-stop-h1s" not in (fake.read_text() if fake.exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(sig)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # a study that did not stop leaves no process behind (its run's group
        subprocess.run(["pkill", "-f", str(out)], check=False)  # is its own session)
        raise
    assert proc.returncode == 130, output
    assert "interrupted" in output
    doc = json.loads((out / "study.json").read_text())
    assert doc["status"] == "interrupted"
    assert [c["outcome"] for c in doc["cells"]] == ["recovered", "lab-error"]
    assert "interrupted (Ctrl-C)" in doc["cells"][1]["evidence"][0]
    assert (out / "study.html").exists()
    hung = out / "runs" / "paused-stop-h1s-csdefault-auto-r1"
    assert not is_complete(hung)
    assert subprocess.run(["pgrep", "-f", str(hung)], capture_output=True).returncode == 1


def test_every_option_the_runner_passes_is_an_option_of_lab_run() -> None:
    from analysis.lab.cli import run_cmd

    known = {opt for p in run_cmd.params for opt in p.opts}
    params = StudyParams(
        ("paused",), (2_000_000_000,), qemu="10.0",
        extra=("--workload", "8M", "--vcpus", "2", "--mem", "512M", "--baseline", "5s",
               "--canaries", "none", "--bandwidth", "50M"),
    )  # fmt: skip
    cmd = lab_command(params, RunSpec("paused", 2_000_000_000, "tsc", "tcg-multi", 1), Path("R"))
    flags = [arg for arg in cmd[cmd.index("run") + 1 :] if arg.startswith("--")]
    assert set(flags) <= known, set(flags) - known
    result = CliRunner().invoke(lab, ["run", *cmd[cmd.index("run") + 1 :], "--help"])
    assert result.exit_code == 0, result.output
