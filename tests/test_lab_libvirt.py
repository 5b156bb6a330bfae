"""``tsprobe lab run --via libvirt``: the domain, the daemons, and one real run.

The pure parts (the domain XML, ``virsh domjobinfo`` parsing, the emulator wrapper, the
options) run everywhere. The live test (root, libvirt and QEMU, as scripts/setup leaves
the machine) starts two libvirt daemons, boots the lab guest as a domain on one,
migrates it with ``virsh migrate --live --postcopy``, ``virsh migrate-postcopy``,
pauses it with ``virsh domjobabort --postcopy`` for 2 s and recovers it with ``virsh
migrate --postcopy --postcopy-resume``, then reports it (about 60 s under TCG).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from analysis.lab import libvirt as libvirt_lab
from analysis.lab.errors import LabError
from analysis.lab.guest import Guest
from analysis.lab.libvirt import LibvirtScenario
from analysis.lab.libvirt_host import (
    DOMAIN,
    TOOLS,
    Daemon,
    VirshResult,
    domain_xml,
    parse_jobinfo,
    tcg_wrapper,
)
from analysis.lab.qemu import QemuSpec
from analysis.lab.scenarios import LabOptions

REPO = Path(__file__).resolve().parent.parent
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def _spec(tmp_path: Path, name: str) -> QemuSpec:
    guest = Guest("k", tmp_path, tmp_path / "vmlinux", tmp_path / "initramfs.cpio", "pvh", {})
    return QemuSpec(
        name=name, guest=guest, workdir=tmp_path, binary="/usr/bin/qemu-system-x86_64",
        mem_mb=512, vcpus=2, cmdline=["tsprobe.canaries=timer", "tsprobe.wss=64M"],
        incoming=name == "dst",
    )  # fmt: skip


def test_domain_xml(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "src")
    root = ET.fromstring(domain_xml(spec, "/usr/bin/qemu-system-x86_64", "1b4e28ba-2fa1-11d2"))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == DOMAIN
    assert root.findtext("os/kernel") == str(tmp_path / "vmlinux")
    assert root.findtext("os/initrd") == str(tmp_path / "initramfs.cpio")
    cmdline = root.findtext("os/cmdline") or ""
    assert cmdline.startswith("console=ttyS0") and cmdline.endswith("tsprobe.wss=64M")
    assert root.find("devices/serial/source").get("path") == str(spec.serial_log)  # type: ignore[union-attr]
    args = [a.get("value") for a in root.iter(f"{QEMU_NS}arg")]
    assert args[args.index("-qmp") + 1] == f"unix:{spec.qmp_socket},server=on,wait=off"
    netdev = args[args.index("-netdev") + 1] or ""
    assert f"hostfwd=tcp:127.0.0.1:{spec.agent_port}-:9466" in netdev
    assert f"hostfwd=tcp:127.0.0.1:{spec.hooks_port}-:9467" in netdev
    dst = ET.fromstring(domain_xml(_spec(tmp_path, "dst"), "q", "1b4e28ba-2fa1-11d2", "kvm"))
    assert dst.get("type") == "kvm"
    assert dst.findtext("uuid") == root.findtext("uuid")  # one domain on both sides


def test_tcg_wrapper_makes_libvirts_tcg_single_threaded(tmp_path: Path) -> None:
    wrapper = tcg_wrapper(tmp_path, "echo", "7.2.22")
    out = subprocess.run(
        [str(wrapper), "-name", "x y", "-accel", "tcg", "-m", "512", "-machine", "none,accel=tcg"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert out == ["-name", "x", "y", "-accel", "tcg,thread=single", "-m", "512", "-machine",
                   "none,accel=tcg"]  # fmt: skip


def test_parse_jobinfo() -> None:
    text = (
        "Job type:         Completed   \nOperation:        Outgoing migration\n"
        "Time elapsed:     11660        ms\nTotal downtime:   11           ms\n"
        "Postcopy requests: 158         \n\n"
    )
    assert parse_jobinfo(text) == {
        "Job type": "Completed",
        "Operation": "Outgoing migration",
        "Time elapsed": "11660 ms",
        "Total downtime": "11 ms",
        "Postcopy requests": "158",
    }


def test_virsh_result_error_and_line() -> None:
    result = VirshResult(
        "dst", ["suspend", DOMAIN], 1, "",
        "error: Failed to suspend domain 'tsprobe-lab'\nerror: Timed out during operation: "
        "cannot acquire state change lock\n", 0, 30.02,
    )  # fmt: skip
    assert result.line() == 'virsh -c "$DST" suspend tsprobe-lab'
    assert result.error() == "error: Timed out during operation: cannot acquire state change lock"
    assert VirshResult("src", ["x"], None, "", "", 0, 30.0).error() == "no answer within 30 s"


def test_a_first_migrate_without_answer_is_waited_for_then_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A pause during libvirt's Finish phase leaves the first virsh migrate without an
    # answer; the lab waits RECOVERY_WAIT_S for it, then goes on to the recovery.
    monkeypatch.setattr(libvirt_lab, "RECOVERY_WAIT_S", 0.2)
    scenario = LibvirtScenario.__new__(LibvirtScenario)
    scenario.libvirt, said = {}, []
    scenario.say = said.append

    async def wait(result: VirshResult | None) -> float:
        migration: asyncio.Future[VirshResult] = asyncio.get_running_loop().create_future()
        if result is not None:
            migration.set_result(result)
        t0 = time.monotonic()
        await scenario._first_migrate_end(migration)
        return time.monotonic() - t0

    assert 0.2 <= asyncio.run(wait(None)) < 1.0
    assert scenario.libvirt["migrate_when_paused"] == {
        "rc": None, "error": "no answer 0.2 s into the pause"
    }  # fmt: skip
    failed = "error: operation failed: job 'migration in' failed in post-copy phase"
    ended = VirshResult("src", ["migrate"], 1, "", failed + "\n", 0, 0.03)
    assert asyncio.run(wait(ended)) < 0.1
    assert scenario.libvirt["migrate_when_paused"] == {"rc": 1, "error": failed}
    assert said[-1] == f"the first virsh migrate ended: {failed}"


def test_daemon_command_binds_every_state_directory(tmp_path: Path) -> None:
    daemon = Daemon("dst", tmp_path / "lv", 49216, caps_cache=tmp_path / "caps")
    script = daemon.command()[-1]
    for sub, target in (("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"),
                        ("log", "/var/log/libvirt"), ("etc", "/etc/libvirt")):  # fmt: skip
        assert f"mount --bind {tmp_path / 'lv' / sub} {target}" in script
    assert f"mount --bind {tmp_path / 'caps'} /var/cache/libvirt" in script
    assert script.endswith(
        "exec libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid"
    )
    assert daemon.uri == f"qemu:///system?socket={tmp_path}/lv/run/libvirt-sock"


def test_via_libvirt_needs_a_migrating_scenario(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="--via libvirt migrates"):
        LabOptions(scenario="stall", out=tmp_path / "r", via="libvirt").check()
    with pytest.raises(LabError, match="--via ssh"):
        LabOptions(scenario="paused", out=tmp_path / "r", via="ssh").check()


LIVE = all(shutil.which(t) for t in TOOLS) and shutil.which("qemu-system-x86_64")


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(not LIVE, reason="needs libvirt and QEMU (scripts/setup installs them)")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (libvirtd in mount namespaces)")
def test_live_paused_postcopy_through_libvirt(tmp_path: Path) -> None:  # pragma: no cover
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "tsprobe.cli", "lab", "run", "--scenario", "paused", "--via",
         "libvirt", "--accel", "tcg", "--hold", "2s", "--canaries", "timer", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=360,
    )  # fmt: skip
    log = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, log
    meta = json.loads((out / "meta.json").read_text())
    lab = meta["lab"]
    assert lab["via"] == "libvirt" and meta["command_line"][-2:] == ["--via", "libvirt"], log
    libvirt = lab["libvirt"]
    lines = [c["line"] for c in libvirt["commands"]]
    for command in (
        "migrate --live --postcopy --bandwidth",
        "migrate-postcopy",
        "domjobabort --postcopy",
        "migrate --live --postcopy --postcopy-resume",
    ):
        assert any(command in line for line in lines), (command, lines)  # fmt: skip
    assert libvirt["src_state_while_paused"] == "paused (post-copy failed)"
    outcome = json.loads((out / "lab-outcome.json").read_text())
    assert outcome["outcome"] in ("recovered", "not-recovered"), (outcome, log)
    if libvirt["migrate_when_paused"]["rc"] is None:
        # The pause came during libvirt's Finish phase on the destination: the first virsh
        # migrate never returned, libvirt never marked the destination post-copy failed and
        # refused the recovery (analysis/lab/libvirt.py). The guest's outcome, with evidence.
        assert outcome["outcome"] == "not-recovered", (outcome, log)
        assert any("the first virsh migrate never returned" in e for e in outcome["evidence"])
    else:
        assert libvirt["dst_state_while_paused"] == "running (post-copy failed)"
    if outcome["outcome"] == "not-recovered":
        # libvirt 9.0 sends migrate-recover in-band; a destination whose main loop is
        # blocked on a missing page is not recovered (analysis/lab/libvirt.py). That is the
        # guest's outcome, with its evidence, and the run is reported like any other.
        assert proc.returncode == 4, log
        assert outcome["evidence"][0].startswith(
            "lab-steps.jsonl: the migration was never recovered: virsh migrate"
            " --postcopy-resume did not take the destination out of postcopy-paused"
        ), outcome
        for side in ("src", "dst"):
            for way, statuses in libvirt["statuses"][side].items():
                assert "postcopy-paused" in statuses, (side, way, statuses)
                assert "completed" not in statuses, (side, way, statuses)
        _report(out)
        return
    # Both ways of recording saw the pause and the recovery, on both sides.
    for side in ("src", "dst"):
        for way, statuses in libvirt["statuses"][side].items():
            for status in ("postcopy-active", "postcopy-paused", "postcopy-recover", "completed"):
                assert status in statuses, (side, way, statuses)
    assert libvirt["completed_jobs"]["src"]["Job type"] == "Completed"
    assert "Suspended Post-copy Error" in (out / "libvirt-events-src.txt").read_text()
    assert "event MIGRATION" in (out / "libvirt-monitor-events-dst.txt").read_text()
    virsh_meta = json.loads((out / "virsh-monitor-src" / "meta.json").read_text())
    assert virsh_meta["endpoints"]["libvirt"]["kind"] == "libvirt-events"
    assert proc.returncode == 0, log
    _report(out)


def _report(out: Path) -> None:
    report = subprocess.run(
        [sys.executable, "-m", "tsprobe.cli", "report", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    assert "postcopy-paused" in (out / "report.md").read_text()


def test_libvirt_9_null_details_parse() -> None:
    # libvirt 9.0's virsh prints "<null>" for an event without data (seen in the lab).
    from analysis.record.libvirt_events import LibvirtParser

    line = "2026-12-06 14:07:13.832+0000: event STOP for domain 'tsprobe-lab': <null>\n"
    [record] = LibvirtParser("x").feed(line, 1)
    assert record["event"] == "STOP" and "data" not in record
