"""The real agent as an unprivileged user: it says what it cannot do, once, and runs anyway.

Run as root, the test drops to uid/gid 65534 (``nobody``) with ``setpriv`` (or ``runuser``);
run as another user, it runs the agent as that user. What that user lacks is found out
first, as that user, so the expectations follow the machine: SCHED_FIFO is refused without
CAP_SYS_NICE and RLIMIT_RTPRIO, and /dev/kmsg is unreadable with kernel.dmesg_restrict=1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from probe.events import Event, iter_event_file
from tests.liveagent import free_port, http_get
from tsprobe.cli import agent_command as tsprobe_agent

NOBODY = 65534
RUN_FOR = "3s"

#: Run as the unprivileged user: what it may do, and whether the agent can be imported.
_FACTS = """
import json, os
out = {"uid": os.geteuid(), "kmsg": False, "fifo": False}
import agent.cli  # the agent and its dependencies, as this user sees them
from tsprobe.cli import agent_command as tsprobe_agent
try:
    os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
    out["kmsg"] = True
except OSError:
    pass
try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    out["fifo"] = True
except OSError:
    pass
print(json.dumps(out))
"""


def unprivileged_prefix() -> list[str] | None:
    """The command prefix that runs a program as an unprivileged user, or None."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    runuser = shutil.which("runuser")
    if runuser is not None:
        return [runuser, "-u", "nobody", "--"]
    return None


@dataclass
class Setting:
    prefix: list[str]
    facts: dict[str, Any]
    writable: Path
    unwritable: Path


@dataclass
class Run:
    returncode: int
    stderr: str
    metrics: str = ""
    events: list[Event] = field(default_factory=list)
    skipped_lines: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def setting() -> Iterator[Setting]:
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("running as root without setpriv or runuser to drop privileges")
    # /tmp, not pytest's tmp_path: that lives under a directory only its owner can enter.
    base = Path(tempfile.mkdtemp(prefix="tsprobe-nonroot-", dir="/tmp"))
    try:
        base.chmod(0o755)
        writable = base / "writable"
        writable.mkdir()
        writable.chmod(0o777)
        unwritable = base / "unwritable"
        unwritable.mkdir()
        unwritable.chmod(0o555)
        probe = subprocess.run(
            [*prefix, sys.executable, "-c", _FACTS],
            cwd=writable,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(
                f"the venv or the repository is not usable by an unprivileged user ({last});"
                " make them readable by others to run this test"
            )
        facts = json.loads(probe.stdout)
        if facts["uid"] == 0:
            pytest.skip(f"{' '.join(prefix)} did not drop root")
        if facts["kmsg"]:
            pytest.skip(
                f"uid {facts['uid']} can read /dev/kmsg (kernel.dmesg_restrict=0?):"
                " the missing-capability path cannot be shown"
            )
        yield Setting(prefix, facts, writable, unwritable)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def agent_command(setting: Setting, events: Path, port: int, duration: str) -> list[str]:
    return [*setting.prefix, *tsprobe_agent(port, events, "--duration", duration)]


def probe_up(metrics: str, probe: str) -> float | None:
    prefix = f'tsprobe_probe_up{{probe="{probe}"}} '
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def nonroot_run(setting: Setting) -> Run:
    """The agent for RUN_FOR with a writable spool; /metrics scraped once stall is up."""
    port = free_port()
    events = setting.writable / "events.jsonl"
    proc = subprocess.Popen(
        agent_command(setting, events, port, RUN_FOR),
        cwd=setting.writable,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = ""
    try:
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                status, _, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=2)
            except OSError:
                status, body = 0, b""
            if status == 200:
                metrics = body.decode()
                if probe_up(metrics, "stall") == 1:
                    break
            time.sleep(0.1)
        _, stderr = proc.communicate(timeout=30)
    finally:
        stop(proc)
    skipped: list[str] = []
    read = list(iter_event_file(events, on_skip=lambda s: skipped.append(str(s))))
    return Run(proc.returncode, stderr, metrics, read, skipped)


def capability_lines(run: Run) -> dict[str, list[str]]:
    """The stderr lines that speak of each capability the unprivileged user lacks."""
    return {
        "SCHED_FIFO": [line for line in run.lines() if "SCHED_FIFO" in line],
        "/dev/kmsg": [line for line in run.lines() if "/dev/kmsg" in line],
    }


def test_runs_without_a_traceback_and_exits_cleanly(nonroot_run: Run) -> None:
    assert nonroot_run.returncode == 0, nonroot_run.stderr
    assert "Traceback" not in nonroot_run.stderr, nonroot_run.stderr
    assert any("serving http://127.0.0.1:" in line for line in nonroot_run.lines())


def test_says_what_it_cannot_do(setting: Setting, nonroot_run: Run) -> None:
    lines = nonroot_run.lines()
    said = capability_lines(nonroot_run)
    assert said["/dev/kmsg"], lines
    assert any("permission denied" in line for line in said["/dev/kmsg"]), said["/dev/kmsg"]
    if setting.facts["fifo"]:
        assert not said["SCHED_FIFO"], "SCHED_FIFO is permitted here, yet reported missing"
    else:
        assert said["SCHED_FIFO"], lines
        assert all("not permitted" in line for line in said["SCHED_FIFO"]), said["SCHED_FIFO"]
    if os.geteuid() == 0:
        assert f"tsprobe: degraded: running as uid {NOBODY}, not root" in lines


def test_says_each_missing_capability_once(setting: Setting, nonroot_run: Run) -> None:
    said = capability_lines(nonroot_run)
    if setting.facts["fifo"]:
        del said["SCHED_FIFO"]
    assert {name: len(lines) for name, lines in said.items()} == dict.fromkeys(said, 1), said


def test_serves_metrics_with_kmsg_down_and_stall_up(nonroot_run: Run) -> None:
    assert nonroot_run.metrics, "no /metrics answer while the agent ran"
    assert probe_up(nonroot_run.metrics, "stall") == 1
    assert probe_up(nonroot_run.metrics, "kmsg") == 0


def test_writes_its_spool_as_that_user(setting: Setting, nonroot_run: Run) -> None:
    spool = setting.writable / "events.jsonl"
    assert spool.stat().st_uid == setting.facts["uid"]
    assert not nonroot_run.skipped_lines
    kinds = [event.kind for event in nonroot_run.events]
    assert kinds[0] == "agent_start" and kinds[-1] == "agent_stop", kinds
    start = nonroot_run.events[0]
    assert any("not root" in note for note in start.get("degraded"))
    if not setting.facts["fifo"]:
        stall = [
            e for e in nonroot_run.events if e.kind == "probe_status" and e.get("probe") == "stall"
        ]
        assert len(stall) == 1
        assert any("SCHED_FIFO not permitted" in note for note in stall[0].get("notes")), stall
    kmsg = [e for e in nonroot_run.events if e.kind == "probe_status" and e.get("probe") == "kmsg"]
    assert len(kmsg) == 1
    assert kmsg[0].get("health")["kmsg"]["up"] is False
    assert nonroot_run.events[-1].get("reason") == "duration"


def test_unwritable_spool_is_one_line_and_a_failed_exit(setting: Setting) -> None:
    events = setting.unwritable / "events.jsonl"
    proc = subprocess.Popen(
        agent_command(setting, events, free_port(), "30s"),
        cwd=setting.writable,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=20)  # well before the 30 s it was asked to run
    finally:
        stop(proc)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert "cannot write the event spool" in lines[0] and str(events) in lines[0], lines[0]
    assert not events.exists()
