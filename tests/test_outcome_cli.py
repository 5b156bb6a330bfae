"""``tsprobe lab run``'s exit codes and ``--clocksource``, without booting a guest.

``run_scenario`` is replaced by one that returns a summary with the given outcome, so the
command's own mapping is what is tested: 0 recovered, 3 degraded, 4 not-recovered,
5 lab-error (1 and 2 stay the tool's errors and usage errors). The one lab run that
checks them end to end is in tests/test_lab.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from analysis.lab import scenarios
from analysis.lab.cli import lab
from analysis.lab.errors import LabError
from analysis.lab.guest import BASE_CMDLINE, Guest
from analysis.lab.outcome import EXIT_CODES
from analysis.lab.qemu import QemuSpec


def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, outcome: str, *args: str) -> Any:
    seen: list[scenarios.LabOptions] = []

    def fake(opts: scenarios.LabOptions) -> dict[str, Any]:
        seen.append(opts)
        return {"guest_outcome": {"outcome": outcome, "evidence": [f"why {outcome}"]}}

    monkeypatch.setattr(scenarios, "run_scenario", fake)
    result = CliRunner().invoke(
        lab, ["run", "--scenario", "paused", "--out", str(tmp_path / "r"), *args]
    )
    return result, seen


@pytest.mark.parametrize(
    ("outcome", "code"),
    [("recovered", 0), ("degraded", 3), ("not-recovered", 4), ("lab-error", 5)],
)
def test_each_outcome_has_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, outcome: str, code: int
) -> None:
    result, _ = _run(monkeypatch, tmp_path, outcome)
    assert result.exit_code == code == EXIT_CODES[outcome], result.output
    assert f"guest outcome {outcome}: why {outcome}" in result.output


def test_a_lab_error_raised_before_the_run_stays_exit_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fake(opts: scenarios.LabOptions) -> dict[str, Any]:
        raise LabError("no guest image")

    monkeypatch.setattr(scenarios, "run_scenario", fake)
    result = CliRunner().invoke(lab, ["run", "--scenario", "paused", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "Error: no guest image" in result.output


def test_help_lists_the_exit_codes() -> None:
    text = CliRunner().invoke(lab, ["run", "--help"]).output
    for line in ("0  recovered", "3  degraded", "4  not-recovered", "5  lab-error"):
        assert line in text, line
    assert "--clocksource NAME" in text


def test_clocksource_reaches_the_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _, seen = _run(monkeypatch, tmp_path, "recovered", "--clocksource", "tsc")
    assert seen[0].clocksource == "tsc"
    _, seen = _run(monkeypatch, tmp_path, "recovered", "--clocksource", "default")
    assert seen[0].clocksource is None


def test_an_unknown_clocksource_is_one_usage_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    result, seen = _run(monkeypatch, tmp_path, "recovered", "--clocksource", "tscc")
    assert result.exit_code == 2 and not seen
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert "'tscc' is not a clocksource of the lab's x86 kernel" in line
    assert "it would ignore it and keep its own" in line
    with pytest.raises(LabError, match="--clocksource tscc: not a clocksource"):
        scenarios.LabOptions(scenario="paused", out=tmp_path / "r", clocksource="tscc").check()


@pytest.mark.parametrize(
    ("scenario", "clocksource", "words"),
    [
        ("paused", "tsc", ["clocksource=tsc", "tsc=reliable"]),
        ("paused", "hpet", ["clocksource=hpet"]),
        ("paused", "acpi_pm", ["clocksource=acpi_pm"]),
        ("paused", None, []),
        # stall-vcpu keeps the TSC by default (scenarios.Scenario.boot says why)...
        ("stall-vcpu", None, ["clocksource=tsc", "tsc=reliable"]),
        # ... and takes the one asked for.
        ("stall-vcpu", "hpet", ["clocksource=hpet"]),
    ],
)
def test_clocksource_reaches_the_kernel_command_line(
    tmp_path: Path, scenario: str, clocksource: str | None, words: list[str]
) -> None:
    opts = scenarios.LabOptions(scenario=scenario, out=tmp_path / "r", clocksource=clocksource)
    args = opts.kernel_args()
    assert [w for w in args if w.startswith(("clocksource=", "tsc="))] == words
    guest = Guest(
        key="k", directory=tmp_path, kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd",
        boot="pvh",
        manifest={},
    )  # fmt: skip
    spec = QemuSpec(
        name="src", guest=guest, workdir=tmp_path, binary="qemu", accel="tcg", mem_mb=512,
        vcpus=2, cmdline=args,
    )  # fmt: skip
    command = spec.command()
    append = command[command.index("-append") + 1]
    assert append == " ".join([BASE_CMDLINE, *args])


def test_a_run_the_lab_could_not_carry_out_is_a_complete_lab_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The guest's agent never came up: run_scenario records the error, completes the run
    # directory and classifies it, instead of raising.
    from analysis.lab.errors import QemuError

    class NoAgent:
        def __init__(self, opts: scenarios.LabOptions, guest: object, say: object) -> None:
            self.opts = opts

        async def run(self) -> dict[str, Any]:
            raise QemuError("the guest's agent was not ready after 120 s (console: empty)")

        async def close(self) -> None:
            pass

        def lab_meta(self, started: float) -> dict[str, Any]:
            return {"migrates": True, "vcpus": 2}

    monkeypatch.setattr(scenarios, "build_guest", lambda log: None)
    monkeypatch.setattr(scenarios, "Scenario", NoAgent)
    lines: list[str] = []
    out = tmp_path / "r"
    summary = scenarios.run_scenario(
        scenarios.LabOptions(scenario="paused", out=out), say=lines.append
    )
    outcome = summary["guest_outcome"]
    assert outcome["outcome"] == "lab-error"
    assert outcome["evidence"] == [
        "lab-steps.jsonl: the lab stopped: the guest's agent was not ready after 120 s "
        "(console: empty)"
    ]
    for name in ("lab-outcome.json", "lab-summary.txt", "lab-summary.json", "meta.json"):
        assert (out / name).exists(), name
    assert lines[0].startswith("lab error: the guest's agent was not ready")
    assert (out / "lab-summary.txt").read_text().startswith("guest outcome: lab-error")
