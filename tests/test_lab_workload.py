"""The lab guest's memory workload (analysis/lab/guest_workload.py), run on the host.

It must stay idle until its go file exists, then announce itself and keep its pages
dirty on the CPU it was given, in passes that leave the CPU mostly idle, until its stop
file exists; a bad argument is one console line and exit status 2. What it wrote is read
back from ``/proc/PID/mem`` (the test is its parent): the one byte it writes into every
page is the pass's stamp, which changes from one pass to the next. It checks its pages:
an older stamp written into a page through ``/proc/PID/mem`` (a write the migration
lost) is found, printed and counted in the verdict it leaves in its result file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.lab.guest_workload import PAGE, parse_size, stamp

SCRIPT = Path(__file__).resolve().parent.parent / "analysis" / "lab" / "guest_workload.py"


@pytest.mark.parametrize(
    ("text", "size"),
    [("64M", 64 << 20), ("1G", 1 << 30), ("512k", 512 << 10), ("4096", 4096), ("2MiB", 2 << 20)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "lots", "-1M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _working_set(pid: int, size: int) -> int:
    """The start address of the workload's buffer: its one anonymous mapping that large."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if high - low >= size and len(fields) == 5 and fields[1].startswith("rw"):
            return low
    raise AssertionError(f"no {size}-byte mapping in /proc/{pid}/maps")


def _written(pid: int, start: int, pages: int) -> set[bytes]:
    """What each page of the mapping holds besides zeros, read without stopping the
    process. The buffer starts a malloc header into the mapping, so every page holds the
    one byte written into it; page 0 also holds the header and is left out."""
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(start)
        data = mem.read(pages * PAGE)
    return {data[i : i + PAGE].strip(b"\0") for i in range(PAGE, len(data), PAGE)}


def test_waits_for_the_go_file_then_dirties(tmp_path: Path) -> None:
    go = tmp_path / "go"
    cpu = sorted(os.sched_getaffinity(0))[-1]
    cmd = [sys.executable, "-I", "-S", str(SCRIPT), "8M", str(cpu), str(go)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert proc.poll() is None
        waiting = _cpu_s(proc.pid)
        time.sleep(1.0)
        # Waiting costs next to nothing (a poll every 0.1 s) ...
        assert _cpu_s(proc.pid) - waiting < 0.2
        assert os.sched_getaffinity(proc.pid) == {cpu}
        go.touch()
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == f"tsprobe-lab: workload: {8 << 20} bytes dirty on CPU {cpu}\n"
        # ... then writes every page, again and again ...
        pages = (8 << 20) // PAGE
        start = _working_set(proc.pid, 8 << 20)
        busy, t0 = _cpu_s(proc.pid), time.monotonic()
        seen: set[bytes] = set()
        stamps = {bytes([stamp(n)]) for n in range(255)}  # one byte per page, never 0
        deadline = time.monotonic() + 3.0
        while len(seen) < 4 and time.monotonic() < deadline:
            seen.update(_written(proc.pid, start, pages))
            time.sleep(0.013)  # not a divisor of the pass period: no aliasing
        assert len(seen) >= 4 and seen <= stamps, seen  # every page, written pass after pass
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
        # ... in passes (one every 50 ms) that leave the CPU mostly idle.
        assert _cpu_s(proc.pid) - busy < 0.3 * (time.monotonic() - t0)
    finally:
        proc.kill()
        proc.wait()


def test_stops_once_its_stop_file_exists(tmp_path: Path) -> None:
    go, stop = tmp_path / "go", tmp_path / "stop"
    go.touch()
    cmd = [sys.executable, "-I", "-S", str(SCRIPT), "1M", "0", str(go), str(stop)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"tsprobe-lab: workload: {1 << 20} bytes dirty on CPU 0\n"
        time.sleep(0.3)
        assert proc.poll() is None  # dirtying
        stop.touch()
        assert proc.wait(5) == 0
        last = proc.stdout.read()
        passes = int(last.removeprefix("tsprobe-lab: workload: stopped after ").split()[0])
        assert last.endswith(" passes\n") and passes >= 3, last  # one every 50 ms
    finally:
        proc.kill()
        proc.wait()


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    for args in ([], ["lots", "0", str(tmp_path / "go")]):
        out = subprocess.run(
            [sys.executable, "-I", "-S", str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 2 and not out.stderr
        assert out.stdout.startswith("tsprobe-lab: workload: ") and out.stdout.count("\n") == 1


def _run_until_stopped(tmp_path: Path, corrupt: bool) -> tuple[str, dict[str, object]]:
    """Run the workload on 4 MiB for about 0.6 s, corrupting one page when asked; its
    console output after the first line and its verdict."""
    go, stop, result = tmp_path / "go", tmp_path / "stop", tmp_path / "result"
    go.touch()
    cmd = [sys.executable, "-I", "-S", str(SCRIPT), "4M", "0", str(go), str(stop), str(result)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"tsprobe-lab: workload: {4 << 20} bytes dirty on CPU 0\n"
        time.sleep(0.3)
        if corrupt:
            # Page 7 gets a stamp the workload wrote long ago: a lost write.
            start = _working_set(proc.pid, 4 << 20)
            with open(f"/proc/{proc.pid}/mem", "r+b", buffering=0) as mem:
                mem.seek(start + 7 * PAGE)
                page = mem.read(PAGE)
                # The buffer starts a malloc header into the mapping: find the stamp byte.
                nonzero = [i for i, b in enumerate(page) if b]
                assert len(nonzero) == 1, nonzero
                offset = nonzero[0]
                mem.seek(start + 7 * PAGE + offset)
                mem.write(bytes([(page[offset] + 100) % 255 + 1]))
            time.sleep(0.3)
        stop.touch()
        assert proc.wait(5) == 0
        out = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    return out, json.loads(result.read_text())


def test_verdict_on_intact_memory(tmp_path: Path) -> None:
    out, verdict = _run_until_stopped(tmp_path, corrupt=False)
    assert re.fullmatch(r"tsprobe-lab: workload: stopped after \d+ passes\n", out), out
    pages = (4 << 20) // PAGE
    assert verdict["ok"] is True and verdict["stopped"] == "workload"
    assert verdict["pages"] == pages and verdict["bad_pages"] == 0
    passes = int(str(verdict["passes"]))
    assert passes >= 6  # 0.6 s at one pass every 50 ms
    assert verdict["checks"] == (passes + 1) * pages  # every page before every pass, and last


def test_a_lost_write_is_found(tmp_path: Path) -> None:
    out, verdict = _run_until_stopped(tmp_path, corrupt=True)
    lines = out.splitlines()
    assert len(lines) == 2 and lines[-1].startswith("tsprobe-lab: workload: stopped after ")
    # The page that held an older stamp is found on the next pass, counted once.
    assert re.fullmatch(
        r"tsprobe-lab: workload: bad memory: page \d+ held 0x[0-9a-f]{2} at pass \d+, "
        r"not 0x[0-9a-f]{2} \(pass \d+'s\)",
        lines[0],
    ), lines[0]
    assert verdict["bad_pages"] == 1
