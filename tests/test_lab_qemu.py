"""The lab's QEMU choice (analysis.lab.qemu): ``--qemu`` resolved to a binary, its version
read from ``--version``, the one threading rule of TCG, and the health check's verdict on
the workload's memory (analysis.lab.scenarios); and a bare machine on each QEMU installed."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from analysis.lab import qemu as lq
from analysis.lab.errors import QemuError
from analysis.lab.health import OOPS, memory_line, memory_problem
from tests.qemu_helpers import QEMU_PARAMS, start_qemu

V72 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022"
V100 = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n"


def _cache(root: Path, *versions: str) -> None:
    for version in versions:
        wrapper = root / f"qemu-{version}" / lq.QEMU_BINARY
        wrapper.parent.mkdir(parents=True)
        wrapper.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version}'\n")
        wrapper.chmod(0o755)


def test_parse_version() -> None:
    v = lq.parse_version("/usr/bin/qemu-system-x86_64", V72)
    assert (v.major, v.minor, v.micro, v.number) == (7, 2, 22, "7.2.22")
    assert v.text == "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
    assert not v.at_least((9, 0))
    assert lq.parse_version("q", V100).at_least((9, 0))
    assert lq.parse_version("q", "QEMU emulator version 9.0\n").number == "9.0.0"
    with pytest.raises(QemuError, match=r"^q is not a QEMU \(--version said: Hello\)$"):
        lq.parse_version("q", "Hello\n")


def test_tcg_threading_rule() -> None:
    old, new = lq.parse_version("q", V72), lq.parse_version("q", V100)
    nine = lq.parse_version("q", "QEMU emulator version 9.0.0")
    assert lq.tcg_accel(True, old)[0] == "tcg"
    assert "7.2.22 < 9.0" in lq.tcg_accel(True, old)[1]
    assert lq.tcg_accel(True, new)[0] == "tcg-multi"
    assert lq.tcg_accel(True, nine)[0] == "tcg-multi"
    assert lq.tcg_accel(False, old) == ("tcg-multi", "no migration")


def test_resolve_versions_from_the_cache(tmp_path: Path) -> None:
    _cache(tmp_path, "10.0.2", "10.0.10", "9.2.1")
    assert list(lq.cached_qemus(tmp_path)) == ["9.2.1", "10.0.2", "10.0.10"]
    newest = tmp_path / "qemu-10.0.10" / lq.QEMU_BINARY
    assert lq.resolve_qemu("10.0", tmp_path) == str(newest)
    assert lq.resolve_qemu("10", tmp_path) == str(newest)
    assert lq.resolve_qemu("10.0.2", tmp_path).endswith("qemu-10.0.2/qemu-system-x86_64")
    assert lq.qemu_version(lq.resolve_qemu("9.2", tmp_path)).number == "9.2.1"
    with pytest.raises(QemuError, match=r"^--qemu 10\.1: no QEMU 10\.1 in .*9\.2\.1, 10\.0\.2"):
        lq.resolve_qemu("10.1", tmp_path)
    with pytest.raises(QemuError, match=r"unpacked: none"):
        lq.resolve_qemu("10.0", tmp_path / "empty")


def test_resolve_paths_and_commands(tmp_path: Path) -> None:
    _cache(tmp_path, "10.0.2")
    wrapper = tmp_path / "qemu-10.0.2" / lq.QEMU_BINARY
    assert lq.resolve_qemu(str(wrapper)) == str(wrapper)
    assert lq.resolve_qemu("sh") == shutil.which("sh")
    with pytest.raises(QemuError, match="no such file"):
        lq.resolve_qemu(str(tmp_path / "missing"))
    with pytest.raises(QemuError, match="no such command on PATH"):
        lq.resolve_qemu("no-such-qemu-here")


def test_memory_verdict_in_the_health_check() -> None:
    intact = {"ok": True, "passes": 48, "pages": 16384, "bad_pages": 0, "checks": 802816}
    assert memory_problem(intact) == ""
    assert (
        memory_line(intact) == "0 bad of 16384 workload pages (802816 page checks over 48 passes)"
    )
    bad = {**intact, "bad_pages": 3}
    assert memory_problem(bad) == (
        "memory: 3 of 16384 workload pages lost a write (the guest's memory is corrupted)"
    )
    assert "no verdict" in memory_problem({"ok": True, "verdict": "none after 30 s"})
    assert "not stopped" in memory_problem(None)
    line = "tsprobe-lab: workload: bad memory: page 7 held 0x10 at pass 9, not 0x09 (pass 8's)"
    assert OOPS.search(line)


@pytest.mark.parametrize("binary", QEMU_PARAMS)
def test_each_qemu_starts_and_answers_its_version(tmp_path: Path, binary: str) -> None:
    """A bare q35 machine starts on every QEMU installed (the unpacked 10.0 finds its own
    SeaBIOS and option ROMs through the wrapper's -L) and QMP's query-version agrees with
    ``--version``."""
    version = lq.qemu_version(binary)
    qemu = start_qemu(tmp_path, "vm", None, incoming=False, binary=binary)

    async def ask() -> Any:
        client = QMPClient("test")
        await client.connect(str(qemu.qmp))
        try:
            return await client.execute("query-version")
        finally:
            await client.disconnect()

    try:
        reply = asyncio.run(ask())
    finally:
        qemu.kill()
    got = reply["qemu"]
    assert (got["major"], got["minor"], got["micro"]) == (
        version.major,
        version.minor,
        version.micro,
    )
    assert qemu.log.read_text(errors="replace").strip() == ""  # no firmware complaints
