"""End-to-end lab tests: the real guest under QEMU (TCG), each scenario from its run directory.

One guest is built (or found in the cache) per session; each scenario runs once per module
and several tests read its run directory. What each asserts is what the guest must have
felt (issue 4); where QEMU or the guest behave differently than first expected, the
reason is written next to the assertion, never a looser bound.

Needs root (the cgroup v1 freezer, SCHED_FIFO samplers in the guest are the guest's own),
qemu-system-x86_64, apt with network access or a warm cache. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("qemu.qmp")

from analysis.lab.guest import Guest, build_guest
from analysis.lab.scenarios import FREEZER, LabOptions, run_scenario

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
    pytest.mark.timeout(240),
]

MS = 1_000_000
INTERVAL_NS = 1 * MS


@pytest.fixture(scope="session")
def lab_guest() -> Guest:
    """The lab guest, built once per session (instant when cached)."""
    return build_guest(log=lambda line: print(f"build-guest: {line}"))


def _run(tmp_path_factory: pytest.TempPathFactory, guest: Guest, **kw: Any) -> dict[str, Any]:
    out = tmp_path_factory.mktemp(kw["scenario"]) / "run"
    opts = LabOptions(out=out, accel="tcg", **kw)
    return run_scenario(opts)


@pytest.fixture(scope="module")
def precopy(tmp_path_factory: pytest.TempPathFactory, lab_guest: Guest) -> dict[str, Any]:
    return _run(tmp_path_factory, lab_guest, scenario="precopy")


@pytest.fixture(scope="module")
def postcopy(tmp_path_factory: pytest.TempPathFactory, lab_guest: Guest) -> dict[str, Any]:
    return _run(tmp_path_factory, lab_guest, scenario="postcopy")


@pytest.fixture(scope="module")
def paused(tmp_path_factory: pytest.TempPathFactory, lab_guest: Guest) -> dict[str, Any]:
    return _run(tmp_path_factory, lab_guest, scenario="paused", hold_ns=3000 * MS)


@pytest.fixture(scope="module")
def paused_stop(tmp_path_factory: pytest.TempPathFactory, lab_guest: Guest) -> dict[str, Any]:
    return _run(tmp_path_factory, lab_guest, scenario="paused-stop", hold_ns=3000 * MS)


@pytest.fixture(scope="module")
def stall(tmp_path_factory: pytest.TempPathFactory, lab_guest: Guest) -> dict[str, Any]:
    return _run(
        tmp_path_factory,
        lab_guest,
        scenario="stall",
        stalls_ns=(300 * MS, 1200 * MS),
        clock_step_ns=2000 * MS,
    )


@pytest.fixture(scope="module")
def stall_vcpu(tmp_path_factory: pytest.TempPathFactory, lab_guest: Guest) -> dict[str, Any]:
    if not (FREEZER / "tasks").exists() or os.geteuid() != 0:
        pytest.skip("needs root and the cgroup v1 freezer")
    return _run(tmp_path_factory, lab_guest, scenario="stall-vcpu", cpu=1, stalls_ns=(700 * MS,))


# -- shared checks -----------------------------------------------------------------------


def _names(summary: dict[str, Any]) -> list[str]:
    return [p["name"] for p in summary["phases"]]


def _phase(summary: dict[str, Any], name: str, nth: int = 0) -> dict[str, Any]:
    return [p for p in summary["phases"] if p["name"] == name][nth]


def _healthy_and_continuous(summary: dict[str, Any]) -> None:
    health = summary["health"]
    assert health["ok"], health["problems"]
    cont = summary["continuity"]
    assert cont["continuous"], f"guest events lost: {cont}"
    assert cont["agent_starts"] == 1  # one agent, one seq run, across the migration


def _lag_growth(summary: dict[str, Any]) -> tuple[int, int]:
    lag = summary["clock_lag"]
    assert lag["growth_ns"] is not None, "no clock samples before or after"
    return int(lag["growth_ns"]), int(lag["vcpus_stopped_ns"])


# -- migrations ------------------------------------------------------------------------------


def test_precopy_phases_and_health(precopy: dict[str, Any]) -> None:
    assert _names(precopy) == ["setup", "precopy", "stop-and-copy", "completed"]
    _healthy_and_continuous(precopy)


def test_precopy_downtime_is_a_clock_lag(precopy: dict[str, Any]) -> None:
    # kvm-clock / the HPET stand still while QEMU has the vCPUs stopped: the guest feels
    # the downtime as its clock falling behind the host's, not as a gap.
    growth, _ = _lag_growth(precopy)
    downtime = precopy["timeline_summary"]["downtime_ns"]
    assert downtime and downtime > 0
    assert abs(growth - downtime) <= 0.10 * downtime + 5 * MS, (growth, downtime)


def test_postcopy_stalls_inside_postcopy_active(postcopy: dict[str, Any]) -> None:
    assert _names(postcopy) == ["setup", "precopy", "switchover", "postcopy-active", "completed"]
    _healthy_and_continuous(postcopy)
    inside = [s for s in postcopy["stalls"] if s["phase"] == "postcopy-active"]
    assert inside, postcopy["stalls_per_cpu_phase"]


def test_paused_stalls_of_about_hold(paused: dict[str, Any]) -> None:
    assert _names(paused) == [
        "setup", "precopy", "switchover", "postcopy-active", "postcopy-paused",
        "postcopy-recover-setup", "postcopy-recover", "postcopy-active", "completed",
    ]  # fmt: skip
    _healthy_and_continuous(paused)
    hold = _phase(paused, "postcopy-paused")
    for cpu in ("0", "1"):
        covering = [
            s
            for s in paused["stalls"]
            if str(s["cpu"]) == cpu
            and s["host_start_ns"] is not None
            and s["host_start_ns"] <= hold["start_ns"] + 0.1 * hold["duration_ns"]
            and s["host_end_ns"] >= hold["start_ns"] + 0.9 * hold["duration_ns"]
        ]
        # The vCPUs (one host thread under TCG) are usually already blocked on a page
        # request when the pause comes (the postcopy bandwidth limit makes requested
        # pages queue), and the page arrives only after recovery: the stall covers the
        # whole pause and is longer than --hold (3.77 s for a 3.02 s pause, seen here).
        assert len(covering) == 1, (cpu, paused["stalls"])
        assert covering[0]["duration_ns"] >= 0.95 * hold["duration_ns"]
        assert covering[0]["duration_ns"] <= hold["duration_ns"] + 2_000 * MS


def test_paused_stop_is_a_clock_lag_not_a_stall(paused_stop: dict[str, Any]) -> None:
    assert "postcopy-paused" in _names(paused_stop)
    _healthy_and_continuous(paused_stop)
    growth, stopped = _lag_growth(paused_stop)
    hold = _phase(paused_stop, "postcopy-paused")["duration_ns"]
    assert stopped >= hold  # stop before the pause, cont after the recovery
    assert abs(growth - stopped) <= 0.10 * stopped + 5 * MS, (growth, stopped)
    near_hold = [s for s in paused_stop["stalls"] if s["duration_ns"] >= hold // 2]
    assert not near_hold, near_hold


# -- known workloads ---------------------------------------------------------------------------


def test_stall_every_cpu_one_matching_stall(stall: dict[str, Any]) -> None:
    _healthy_and_continuous(stall)
    assert len(stall["injected"]) == 2
    for inj in stall["injected"]:
        seen = inj["guest_stalls_ns"]
        assert sorted(seen) == ["0", "1"], inj
        for cpu, lengths in seen.items():
            assert len(lengths) == 1, (cpu, inj)
            assert abs(lengths[0] - inj["freeze_ns"]) <= INTERVAL_NS + 20 * MS, (cpu, inj)


def test_clock_step_reported_once(stall: dict[str, Any]) -> None:
    steps = [s for s in stall["clock_steps"] if s["clock"] == "realtime"]
    assert len(steps) == 1, stall["clock_steps"]
    assert abs(steps[0]["step_ns"] - 2000 * MS) <= 5 * MS, steps


def test_stall_vcpu_freezes_one_cpu_only(stall_vcpu: dict[str, Any]) -> None:
    _healthy_and_continuous(stall_vcpu)
    (inj,) = stall_vcpu["injected"]
    assert list(inj["guest_stalls_ns"]) == ["1"], inj
    (length,) = inj["guest_stalls_ns"]["1"]
    assert abs(length - inj["freeze_ns"]) <= INTERVAL_NS + 20 * MS, inj
    # CPU 0 during the freeze (a second either side): its vCPU thread must keep running.
    # Under multi-threaded TCG a freeze can also stop it (about 1 in 10: vCPU 1 frozen
    # holding QEMU's big lock or just woken to take it, or inside an interrupts-off
    # section of the guest that CPU 0 then spins on); the lab checks the first 20 ms of
    # each freeze and freezes again when CPU 0's thread stopped (analysis.lab.scenarios).
    lo, hi = inj["host_start_ns"] - 1000 * MS, inj["host_end_ns"] + 1000 * MS
    others = [
        s
        for s in stall_vcpu["stalls"]
        if str(s["cpu"]) == "0"
        and s["duration_ns"] > 50 * MS
        and s["host_start_ns"] is not None
        and lo <= s["host_start_ns"] <= hi
    ]
    assert not others, others


# -- the command line ----------------------------------------------------------------------------


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tsprobe.cli", "lab", "run", "--scenario", "nope",
         "--out", str(tmp_path / "r")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown scenario 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr
