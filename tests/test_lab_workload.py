"""The lab guest's memory workload (analysis/lab/guest_workload.py), run on the host.

It must stay idle until its go file exists, then announce itself and keep its pages
dirty on the CPU it was given; a bad argument is one console line and exit status 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.lab.guest_workload import parse_size

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
        # ... and dirtying keeps the CPU busy.
        busy = _cpu_s(proc.pid)
        time.sleep(1.0)
        assert _cpu_s(proc.pid) - busy > 0.3
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
