"""``tsprobe record`` against real QEMU migrations on loopback (no guest OS), and its faults.

Each QEMU gets two QMP sockets: the first for the test's controller (which drives the
migration, as libvirt would), the second for the recorder. The status sequences asserted
here are what QEMU 7.2 (Debian 12) emits; docs/run-directory.md lists them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil
import pytest
from qemu.qmp import EventListener

from analysis.analyze.load import load_run
from analysis.errors import RecorderError
from analysis.record.agent_client import DRAIN_NS, AgentRecorder, AgentSummary, workers_heard
from analysis.record.recorder import Recorder, RecorderResult
from analysis.rundir import JsonlWriter
from tests.liveagent import live_agent, stop_process
from tests.qemu_helpers import (
    QEMU,
    Controller,
    Pair,
    free_port,
    make_blob,
    qemu_pair,
    start_qemu,
)

needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")

REPO = Path(__file__).resolve().parent.parent
CPUS = sorted(os.sched_getaffinity(0))
FIXTURE_RUN = REPO / "tests" / "fixtures" / "runs" / "postcopy-pause-recover"
GRACE_NS = 1_000_000_000
TSPROBE = [sys.executable, "-m", "tsprobe.cli"]


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_blob(tmp_path_factory.getbasetemp() / "ram-blob.bin")


# -- reading a run ----------------------------------------------------------------------


def records(out: Path, name: str) -> list[dict[str, Any]]:
    path = out / f"qmp-{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def statuses(out: Path, name: str) -> list[str]:
    """The MIGRATION statuses an endpoint's events reported, in order."""
    return [
        r["data"]["status"]
        for r in records(out, name)
        if r["type"] == "event" and r["event"] == "MIGRATION"
    ]


def first(out: Path, name: str, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return next(r for r in records(out, name) if pred(r))


def migration_event(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r.get("event") == "MIGRATION" and r["data"]["status"] == status


def check_meta(
    out: Path, stop_prefix: str, names: tuple[str, ...] = ("src", "dst")
) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((out / "meta.json").read_text())
    assert meta["complete"] is True
    assert meta["stop_reason"].startswith(stop_prefix), meta["stop_reason"]
    assert meta["end"]["mono_ns"] > meta["start"]["mono_ns"]
    assert meta["versions"]["tsprobe"] and meta["versions"]["qemu.qmp"]
    assert meta["command_line"]
    for name in names:
        endpoint = meta["endpoints"][name]
        assert endpoint["oob"] is True
        assert endpoint["statuses"] == statuses(out, name)
        assert meta["versions"]["qemu"][name][0].isdigit()
    for file, count in meta["counts"].items():
        assert count == len((out / file).read_text().splitlines()), file
    for name in names:
        check_layout(records(out, name))
    return meta


def check_layout(recs: list[dict[str, Any]]) -> None:
    """What docs/run-directory.md promises about every QMP record."""
    known = {"connected", "event", "reply", "timeout", "error", "note", "closed"}
    for r in recs:
        assert r["type"] in known, r
        assert isinstance(r["host_real_ns"], int) and isinstance(r["host_mono_ns"], int), r
        if r["type"] == "event":
            assert isinstance(r["event"], str) and set(r["timestamp"]) == {
                "seconds",
                "microseconds",
            }
        elif r["type"] in ("reply", "timeout"):
            assert isinstance(r["command"], str)
        elif r["type"] == "note":
            assert r["note"] and r["message"]
    monos = [r["host_mono_ns"] for r in recs]
    assert monos == sorted(monos)


def check_stopped_by_itself(out: Path, result: RecorderResult) -> None:
    """The recorder stopped on its own: source terminal status plus the grace period."""
    end = result.meta["end"]["mono_ns"]
    terminal = next(
        r["host_mono_ns"]
        for r in records(out, "src")
        if r.get("event") == "MIGRATION"
        and r["data"]["status"] in ("completed", "failed", "cancelled")
    )
    assert GRACE_NS <= end - terminal < GRACE_NS + 3_000_000_000


# -- running a scenario -----------------------------------------------------------------


def recorder_for(pair: Pair, out: Path, **kwargs: Any) -> Recorder:
    options: dict[str, Any] = {"grace_ns": GRACE_NS, "duration_ns": 60_000_000_000}
    options.update(kwargs)
    return Recorder(
        out, qmp={"src": str(pair.src.sockets[1]), "dst": str(pair.dst.sockets[1])}, **options
    )


Drive = Callable[[Controller, Pair], Awaitable[None]]


def run_scenario(
    pair: Pair, out: Path, drive: Drive, postcopy: bool, **kwargs: Any
) -> RecorderResult:
    async def main() -> RecorderResult:
        recorder = recorder_for(pair, out, **kwargs)
        task = asyncio.ensure_future(recorder.run())
        await asyncio.wait_for(recorder.started.wait(), 15)
        async with Controller(pair) as ctl:
            await ctl.prepare(postcopy=postcopy)
            await ctl.migrate()
            await drive(ctl, pair)
            return await asyncio.wait_for(task, 60)

    return asyncio.run(main())


async def start_postcopy(ctl: Controller, pair: Pair) -> None:
    await ctl.wait_src("active")
    await asyncio.sleep(0.5)
    await ctl.src.execute("migrate-start-postcopy")


async def nothing(ctl: Controller, pair: Pair) -> None:
    pass


# -- the four migrations ----------------------------------------------------------------


@needs_qemu
def test_precopy_via_cli(tmp_path: Path, blob: Path) -> None:
    out = tmp_path / "run"
    port = free_port()
    with qemu_pair(tmp_path, blob) as pair, agents_on(port, tmp_path) as start_agent:
        start_agent()
        wait_http(f"http://127.0.0.1:{port}/clock", 20)
        cmd = [
            *TSPROBE, "record",
            "--qmp", f"src={pair.src.sockets[1]}", "--qmp", f"dst={pair.dst.sockets[1]}",
            "--agent", f"http://127.0.0.1:{port}",
            "--out", str(out), "--grace", "1s", "--duration", "60s",
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            lines = read_until(proc, " recording ")

            async def drive() -> None:
                async with Controller(pair) as ctl:
                    await ctl.prepare()
                    await ctl.migrate()
                    await ctl.wait_src("completed")

            asyncio.run(drive())
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    lines += stdout.splitlines()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert statuses(out, "src") == ["setup", "active", "completed"]
    assert statuses(out, "dst") == ["setup", "active", "completed"]
    text = "\n".join(lines)
    assert "src: setup -> active (event)" in text
    assert "dst: active -> completed (event)" in text
    assert "stopped: source completed (+1s grace)" in text
    meta = check_meta(out, "source completed")
    assert meta["endpoints"]["src"]["events_capability"] == "enabled by recorder"
    # precopy: the source stops, the destination resumes
    assert first(out, "src", lambda r: r.get("event") == "STOP")
    assert first(out, "dst", lambda r: r.get("event") == "RESUME")
    replies = [r for r in records(out, "src") if r.get("command") == "query-migrate"]
    assert any(r["return"].get("status") == "active" for r in replies)
    # the agent: its events, and a /clock burst at every phase change
    samples = [json.loads(x) for x in (out / "clock-samples.jsonl").read_text().splitlines()]
    reasons = ",".join(x["reason"] for x in samples)
    for phase in ("src:setup", "src:active", "src:completed", "dst:completed"):
        assert phase in reasons, reasons
    assert [n["type"] for n in agent_notes(out)] == ["connected"]
    events = [json.loads(x) for x in (out / "guest-events.jsonl").read_text().splitlines()]
    assert events and [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert meta["agents"]["guest"]["events"] == len(events)


@needs_qemu
def test_postcopy(tmp_path: Path, blob: Path) -> None:
    out = tmp_path / "run"
    with qemu_pair(tmp_path, blob) as pair:
        result = run_scenario(pair, out, start_postcopy, postcopy=True)
    assert statuses(out, "src") == ["setup", "active", "postcopy-active", "completed"]
    assert statuses(out, "dst") == ["setup", "active", "postcopy-active", "completed"]
    check_meta(out, "source completed")
    check_stopped_by_itself(out, result)
    # every event carries QEMU's own timestamp and the host's receive times
    event = first(out, "dst", migration_event("postcopy-active"))
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    assert abs(event["timestamp"]["seconds"] * 1e9 - event["host_real_ns"]) < 2e9


async def pause_and_recover(ctl: Controller, pair: Pair) -> None:
    await start_postcopy(ctl, pair)
    await ctl.wait_src("postcopy-active")
    await asyncio.sleep(0.5)
    await ctl.src.execute("migrate-pause", oob=True)
    await ctl.wait_src("postcopy-paused")
    await asyncio.sleep(1.0)
    new_uri = pair.uri(free_port())
    await ctl.dst.execute("migrate-recover", {"uri": new_uri}, oob=True)
    await ctl.src.execute("migrate", {"uri": new_uri, "resume": True})


@needs_qemu
def test_postcopy_pause_and_recover(tmp_path: Path, blob: Path) -> None:
    out = tmp_path / "run"
    scenario = {
        "name": "postcopy-pause-recover",
        "how": "bare QEMUs (no guest OS), 48 MB random RAM, max-bandwidth 20 MB/s, "
        "max-postcopy-bandwidth 10 MB/s; migrate-start-postcopy 0.5 s into precopy; "
        "migrate-pause (oob) on src 0.5 s into postcopy; 1 s later migrate-recover (oob) "
        "on dst and migrate resume=true on src",
        "made_by": "tests/test_recorder_qemu.py::test_postcopy_pause_and_recover",
    }
    with qemu_pair(tmp_path, blob) as pair:
        result = run_scenario(
            pair,
            out,
            pause_and_recover,
            postcopy=True,
            extra_meta={"scenario": scenario},
            command_line=[
                "tsprobe",
                "record",
                "--qmp",
                "src=SRC",
                "--qmp",
                "dst=DST",
                "--grace",
                "1s",
            ],
        )
    assert statuses(out, "src") == [
        "setup", "active", "postcopy-active", "postcopy-paused",
        "postcopy-recover", "postcopy-active", "completed",
    ]  # fmt: skip
    # QEMU 7.2's destination reports "setup" again when migrate-recover starts listening
    # (QEMU 9.0 calls that phase postcopy-recover-setup).
    assert statuses(out, "dst") == [
        "setup", "active", "postcopy-active", "postcopy-paused",
        "setup", "postcopy-recover", "postcopy-active", "completed",
    ]  # fmt: skip
    meta = check_meta(out, "source completed")
    check_stopped_by_itself(out, result)
    assert meta["scenario"]["name"] == "postcopy-pause-recover"
    if os.environ.get("TSPROBE_REGEN_RUN_FIXTURE"):
        shutil.rmtree(FIXTURE_RUN, ignore_errors=True)
        shutil.copytree(out, FIXTURE_RUN)


@needs_qemu
def test_cancelled(tmp_path: Path, blob: Path) -> None:
    out = tmp_path / "run"

    async def cancel(ctl: Controller, pair: Pair) -> None:
        await ctl.wait_src("active")
        await asyncio.sleep(0.5)
        await ctl.src.execute("migrate_cancel")

    with qemu_pair(tmp_path, blob) as pair:
        result = run_scenario(pair, out, cancel, postcopy=False)
        dst_exit = pair.dst.proc.wait(5)
    assert statuses(out, "src") == ["setup", "active", "cancelling", "cancelled"]
    # the destination fails its incoming migration and QEMU exits
    assert statuses(out, "dst") == ["setup", "active", "failed"]
    assert dst_exit != 0
    assert records(out, "dst")[-1]["type"] == "closed"
    check_meta(out, "source cancelled")
    check_stopped_by_itself(out, result)


# -- faults -----------------------------------------------------------------------------


@needs_qemu
def test_source_killed_mid_migration(tmp_path: Path, blob: Path) -> None:
    out = tmp_path / "run"

    async def kill_source(ctl: Controller, pair: Pair) -> None:
        await ctl.wait_src("active")
        await asyncio.sleep(0.5)
        pair.src.kill()

    with qemu_pair(tmp_path, blob) as pair:
        result = run_scenario(pair, out, kill_source, postcopy=False)
    src = records(out, "src")
    closed = src[-1]
    assert closed["type"] == "closed" and closed["last_status"] == "active"
    assert "closed the connection" in closed["reason"] or "Error" in closed["reason"]
    assert statuses(out, "src") == ["setup", "active"]
    # the destination went on being recorded after the source was gone
    assert statuses(out, "dst") == ["setup", "active", "failed"]
    failed = first(out, "dst", migration_event("failed"))
    assert failed["host_mono_ns"] > closed["host_mono_ns"] - 50_000_000
    assert records(out, "dst")[-1]["type"] == "closed"
    meta = check_meta(out, "every QMP endpoint closed")
    assert meta["endpoints"]["src"]["closed_reason"] == closed["reason"]
    assert result.stop_reason.startswith("every QMP endpoint closed")


@needs_qemu
def test_destination_monitor_not_answering(tmp_path: Path, blob: Path) -> None:
    """SIGSTOP the destination QEMU for 3 s during precopy."""
    out = tmp_path / "run"
    marks: dict[str, int] = {}

    async def freeze_destination(ctl: Controller, pair: Pair) -> None:
        await ctl.wait_src("active")
        await asyncio.sleep(0.3)
        os.kill(pair.dst.proc.pid, signal.SIGSTOP)
        marks["stop"] = time.monotonic_ns()
        try:
            await asyncio.sleep(0.5)
            await asyncio.wait_for(ctl.src.execute("stop"), 5)  # STOP event from the source
            await asyncio.sleep(0.5)
            await asyncio.wait_for(ctl.src.execute("cont"), 5)  # RESUME event
            await asyncio.sleep(2.0)
        finally:
            marks["cont"] = time.monotonic_ns()
            os.kill(pair.dst.proc.pid, signal.SIGCONT)

    with qemu_pair(tmp_path, blob) as pair:
        result = run_scenario(pair, out, freeze_destination, postcopy=False)
    stop, cont = marks["stop"], marks["cont"]
    dst = records(out, "dst")
    timeouts = [r for r in dst if r["type"] == "timeout"]
    assert timeouts and all(stop < r["host_mono_ns"] < cont for r in timeouts)
    assert len(timeouts) == 1  # one hung poll, not a pile of them
    late = [r for r in dst if r.get("late")]
    assert late and late[0]["host_mono_ns"] > cont and late[0]["latency_ns"] > 2e9
    # polling resumed: on-time replies after the late one
    assert any(r["type"] == "reply" and not r.get("late") and r["host_mono_ns"] > cont for r in dst)
    # the source's events kept arriving while the destination hung
    src_events = [r["event"] for r in records(out, "src") if r["type"] == "event"]
    during = [
        r["event"]
        for r in records(out, "src")
        if r["type"] == "event" and stop < r["host_mono_ns"] < cont
    ]
    assert {"STOP", "RESUME"} <= set(during), src_events
    assert statuses(out, "src") == ["setup", "active", "completed"]
    assert statuses(out, "dst") == ["setup", "active", "completed"]
    meta = check_meta(out, "source completed")
    assert meta["endpoints"]["dst"]["timeouts"] == 1
    check_stopped_by_itself(out, result)


@needs_qemu
def test_started_after_the_migration_began(tmp_path: Path, blob: Path) -> None:
    out = tmp_path / "run"

    async def main(pair: Pair) -> RecorderResult:
        async with Controller(pair) as ctl:
            await ctl.prepare()
            await ctl.migrate()
            await ctl.wait_src("active")
            await asyncio.sleep(0.3)
            recorder = recorder_for(pair, out)
            return await asyncio.wait_for(recorder.run(), 60)

    with qemu_pair(tmp_path, blob) as pair:
        result = asyncio.run(main(pair))
    found = first(out, "src", lambda r: r.get("command") == "query-migrate")
    assert found["return"]["status"] == "active"
    assert result.meta["endpoints"]["src"]["first_status"] == "active"
    # QEMU refuses to change capabilities during a migration: no MIGRATION events, the
    # recorder says so and follows the statuses by polling.
    refused = first(out, "src", lambda r: r["type"] == "error")
    assert refused["command"] == "migrate-set-capabilities"
    note = first(out, "src", lambda r: r.get("note") == "events-enable-failed")
    assert "polling only" in note["message"]
    assert statuses(out, "src") == []
    assert result.meta["endpoints"]["src"]["last_status"] == "completed"
    check_meta(out, "source completed")


@needs_qemu
def test_no_enable_events_polls_only(tmp_path: Path, blob: Path) -> None:
    out = tmp_path / "run"
    with qemu_pair(tmp_path, blob) as pair:
        result = run_scenario(pair, out, nothing, postcopy=False, enable_events=False)
    assert statuses(out, "src") == []
    # QEMU's qemu_start_incoming_migration() sends "setup" whatever the capability says
    assert statuses(out, "dst") == ["setup"]
    assert not [r for r in records(out, "src") if r.get("command") == "migrate-set-capabilities"]
    meta = check_meta(out, "source completed")
    assert meta["endpoints"]["src"]["events_capability"] == "off"
    polled = [
        r["return"]["status"]
        for r in records(out, "src")
        if r.get("command") == "query-migrate" and "status" in r["return"]
    ]
    assert polled[-1] == "completed" and "active" in polled
    assert result.meta["endpoints"]["src"]["last_status"] == "completed"


@needs_qemu
def test_reconnect_when_the_socket_reappears(tmp_path: Path) -> None:
    out = tmp_path / "run"
    socket_path = tmp_path / "vm.qmp"

    async def main() -> RecorderResult:
        stop = asyncio.Event()
        recorder = Recorder(
            out, qmp={"vm": str(socket_path)}, reconnect=True, duration_ns=60_000_000_000
        )
        task = asyncio.ensure_future(recorder.run(stop))
        await asyncio.wait_for(recorder.started.wait(), 5)  # no socket yet: not fatal
        qemus = [start_qemu(tmp_path, "vm", None, incoming=False)]
        try:
            await until(lambda: recorder.statuses["vm"] == "none", 10, "first connection")
            assert (await recorder.execute("vm", "query-status"))["status"] == "running"
            qemus[0].kill()  # the socket file stays: connection refused until a new QEMU
            await until(
                lambda: recorder.endpoints["vm"].summary.closed_reason is not None, 5, "closed"
            )
            await asyncio.sleep(1.0)
            qemus.append(start_qemu(tmp_path, "vm", None, incoming=False))
            await until(lambda: recorder.endpoints["vm"].summary.connects == 2, 10, "reconnect")
            await asyncio.sleep(0.3)
        finally:
            for qemu in qemus:
                qemu.kill()
        stop.set()
        return await asyncio.wait_for(task, 20)

    result = asyncio.run(main())
    recs = records(out, "vm")
    kinds = [r["type"] for r in recs]
    assert kinds[0] == "note" and recs[0]["note"] == "reconnecting"
    connected = [r for r in recs if r["type"] == "connected"]
    assert [r["attempt"] for r in connected] == [1, 2]
    closed = kinds.index("closed")
    assert kinds.index("connected") < closed < len(kinds) - 1 - kinds[::-1].index("connected")
    assert [r["note"] for r in recs if r["type"] == "note"].count("reconnecting") == 2
    check_layout(recs)
    assert any(r.get("command") == "query-status" and r["host_mono_ns"] for r in recs)
    assert result.meta["endpoints"]["vm"]["connects"] == 2
    assert result.stop_reason == "stop requested"


# -- libvirt: a second monitor while another client holds the first -------------------------


@needs_qemu
def test_second_monitor_while_another_client_holds_the_first(tmp_path: Path, blob: Path) -> None:
    """What a libvirt guest with a <qemu:commandline> -qmp looks like to the recorder."""
    out = tmp_path / "run"

    async def main(pair: Pair) -> tuple[dict[str, list[str]], RecorderResult]:
        seen: dict[str, list[str]] = {"src": [], "dst": []}
        # "libvirt": holds monitor 0 of each QEMU for the whole test, enables events
        # itself (as libvirt does) and drives the migration.
        async with Controller(pair) as libvirt:
            for client in (libvirt.src, libvirt.dst):
                await client.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]},
                )
            # the held monitor gives no greeting to a second client
            blocked = Recorder(
                out.with_name("blocked"), qmp={"src": str(pair.src.sockets[0])},
                connect_timeout_ns=1_500_000_000,
            )  # fmt: skip
            with pytest.raises(RecorderError, match="no QMP greeting"):
                await blocked.run()
            listeners = {"src": EventListener("MIGRATION"), "dst": EventListener("MIGRATION")}
            libvirt.src.register_listener(listeners["src"])
            libvirt.dst.register_listener(listeners["dst"])
            recorder = recorder_for(pair, out)
            task = asyncio.ensure_future(recorder.run())
            await asyncio.wait_for(recorder.started.wait(), 15)
            await libvirt.prepare()
            await libvirt.migrate()
            result = await asyncio.wait_for(task, 60)
            for name, listener in listeners.items():
                while not listener.empty():
                    data: Any = (await listener.get())["data"]
                    seen[name].append(data["status"])
            return seen, result

    with qemu_pair(tmp_path, blob) as pair:
        seen, result = asyncio.run(main(pair))
    assert statuses(out, "src") == seen["src"] == ["setup", "active", "completed"]
    assert statuses(out, "dst") == seen["dst"] == ["setup", "active", "completed"]
    meta = check_meta(out, "source completed")
    assert meta["endpoints"]["src"]["events_capability"] == "on"  # left alone
    blocked_meta = json.loads((out.with_name("blocked") / "meta.json").read_text())
    assert blocked_meta["stop_reason"].startswith("could not start")
    assert result.stop_reason.startswith("source completed")


# -- an agent that goes away for 10 s ---------------------------------------------------------


@contextmanager
def agents_on(port: int, tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start real agents on ``port`` on demand; kill every one of them at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"agent{len(started)}.log", "wb")  # noqa: SIM115
        cmd = [
            *TSPROBE, "agent", "--listen", f"127.0.0.1:{port}", "--events", "none",
            "--threshold", "50ms", "--canaries", "none",
        ]  # fmt: skip
        # No canaries: a test compares the events it fetched with the recorder's just
        # before stopping the agent, and a canary's event between the two (a 10 ms timeout
        # on a loaded host) made the recorder's copy longer (seen in CI).
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            with suppress(psutil.Error):
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]
                for p in tree:
                    with suppress(psutil.Error):
                        p.resume()
                        p.kill()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def wait_http(url: str, timeout: float) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with opener.open(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def agent_notes(out: Path) -> list[dict[str, Any]]:
    path = out / "agent-guest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def all_events(url: str) -> list[dict[str, Any]]:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    out: list[dict[str, Any]] = []
    since = 0
    while True:
        with opener.open(f"{url}/events?since={since}&limit=10000", timeout=5) as resp:
            page = [json.loads(line) for line in resp.read().decode().splitlines() if line]
        if not page:
            return out
        out += page
        since = page[-1]["seq"]


def test_agent_unreachable_for_10s_then_back(tmp_path: Path) -> None:
    out = tmp_path / "run"
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def types() -> list[str]:
        return [n["type"] for n in agent_notes(out)]

    async def main(start: Callable[[], subprocess.Popen[bytes]]) -> dict[str, Any]:
        stop = asyncio.Event()
        recorder = Recorder(
            out, agents={"guest": url}, agent_timeout_ns=500_000_000,
            events_poll_ns=200_000_000, duration_ns=90_000_000_000,
        )  # fmt: skip
        task = asyncio.ensure_future(recorder.run(stop))
        await asyncio.sleep(1.0)  # nobody listens yet: connection refused
        agent = start()
        await until(lambda: "connected" in types(), 20, "the agent")
        await asyncio.sleep(1.0)
        tree = [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(True)]
        for p in tree:
            p.suspend()  # the whole agent freezes, as in a paused guest
        frozen_at = time.monotonic_ns()
        await asyncio.sleep(10.0)
        for p in tree:
            p.resume()
        resumed_at = time.monotonic_ns()
        await until(lambda: types().count("reachable") >= 1, 10, "reachable again")
        await asyncio.sleep(2.0)
        first_run = await asyncio.to_thread(all_events, url)
        agent.terminate()
        await asyncio.to_thread(agent.wait, 10)
        start()  # a new agent on the same port: a restart, seq starts again
        await until(lambda: "restart" in types(), 20, "the restart")
        await asyncio.sleep(1.0)
        stop.set()
        result = await asyncio.wait_for(task, 30)
        return {
            "first_run": first_run,
            "frozen_at": frozen_at,
            "resumed_at": resumed_at,
            "meta": result.meta,
        }

    with agents_on(port, tmp_path) as start:
        got = asyncio.run(main(start))
    notes = agent_notes(out)
    kinds = [n["type"] for n in notes]
    # refused until the agent listens; frozen for 10 s; killed and started again (refused
    # for a moment unless no request fell into that moment)
    assert kinds[:5] == ["unreachable", "reachable", "connected", "unreachable", "reachable"]
    assert kinds[5:] in (["restart"], ["unreachable", "reachable", "restart"]), kinds
    assert "refused" in notes[0]["reason"].lower()
    frozen, back, restart = notes[3], notes[4], notes[-1]
    assert "timed out" in frozen["reason"]
    assert got["frozen_at"] < frozen["host_mono_ns"] < got["resumed_at"]
    assert 9e9 < back["unreachable_ns"] < 13e9
    # every event of the first agent, in seq order, none lost, including those made
    # while it was frozen and fetched afterwards
    lines = [json.loads(line) for line in (out / "guest-events.jsonl").read_text().splitlines()]
    restart_at = next(i for i, e in enumerate(lines[1:], 1) if e["seq"] == 1)
    first_agent, second_agent = lines[:restart_at], lines[restart_at:]
    expected = [e["seq"] for e in got["first_run"]]
    assert [e["seq"] for e in first_agent] == expected == list(range(1, len(expected) + 1))
    assert [e["seq"] for e in second_agent] == list(range(1, len(second_agent) + 1))
    assert any(e["seq"] > frozen["since"] for e in first_agent)
    assert not [n for n in notes if n["type"] == "gap"]
    assert restart["old_agent_id"] == notes[2]["agent_id"] != restart["new_agent_id"]
    samples = [json.loads(x) for x in (out / "clock-samples.jsonl").read_text().splitlines()]
    # one per second while reachable (about 3 s here), and a last one at the stop
    assert len(samples) >= 3 and all(s["agent"] == "guest" for s in samples)
    assert samples[-1]["reason"] == "final" and samples[0]["reason"] == "periodic"
    assert all(s["ok_reads"] == s["reads"] == 5 for s in samples)
    assert all(s["host_send_mono_ns"] < s["host_recv_mono_ns"] for s in samples)
    assert all("realtime_ns" in s["clock"] for s in samples)
    meta = got["meta"]
    assert meta["stop_reason"] == "stop requested"
    agent_meta = meta["agents"]["guest"]
    assert agent_meta["unreachable_periods"] == kinds.count("unreachable")
    assert agent_meta["restarts"] == 1
    assert agent_meta["gaps"] == 0
    assert meta["counts"]["guest-events.jsonl"] == len(lines)


class FakeAgent(ThreadingHTTPServer):
    """Serves /events like agent/http.py from a list, with a ring that lost the oldest."""

    daemon_threads = True

    def __init__(self, last_seq: int, oldest: int, hole: set[int]) -> None:
        self.seqs = [q for q in range(oldest, last_seq + 1) if q not in hole]
        self.last_seq = last_seq
        self.oldest = oldest
        self.queries: list[tuple[int, int]] = []
        #: The /healthz body (its ``workers`` say how far each unit has reported).
        self.health: Callable[[], dict[str, Any]] = lambda: {"mono_ns": 1, "workers": {}}
        super().__init__(("127.0.0.1", 0), _FakeAgentHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def before_answer(self, path: str) -> None:
        """Called in the request's thread before it is answered (a subclass may block)."""


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[None]:
    """Serve from a daemon thread for the block; shut down and close after it."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


class _FakeAgentHandler(BaseHTTPRequestHandler):
    server: FakeAgent

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        agent = self.server
        agent.before_answer(url.path)
        headers = {"X-Tsprobe-Agent-Id": "fake", "X-Tsprobe-Boot-Id": "boot"}
        if url.path == "/clock":
            body = json.dumps({"realtime_ns": time.time_ns(), "monotonic_ns": 1}).encode()
        elif url.path == "/healthz":
            body = json.dumps(agent.health()).encode()
        else:
            query = parse_qs(url.query)
            since, limit = int(query["since"][0]), int(query["limit"][0])
            agent.queries.append((since, limit))
            page = [q for q in agent.seqs if q > since][:limit]
            body = "".join(
                json.dumps({"v": 1, "seq": q, "kind": "x"}) + "\n" for q in page
            ).encode()
            headers["X-Tsprobe-Next-Since"] = str(page[-1] if page else agent.last_seq)
            headers["X-Tsprobe-Last-Seq"] = str(agent.last_seq)
            headers["X-Tsprobe-Oldest-Seq"] = str(agent.oldest)
            headers["X-Tsprobe-Missed"] = str(max(0, agent.oldest - since - 1))
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_agent_pages_and_gaps_are_recorded(tmp_path: Path) -> None:
    """2500 events, the oldest 300 gone from the ring, seq 1500 missing: pages of 1000."""
    fake = FakeAgent(last_seq=2500, oldest=301, hole={1500})
    out = tmp_path / "run"

    async def main() -> RecorderResult:
        recorder = Recorder(out, agents={"guest": fake.url}, duration_ns=1_500_000_000)
        return await asyncio.wait_for(recorder.run(), 20)

    with serving(fake):
        result = asyncio.run(main())
    lines = [json.loads(x) for x in (out / "guest-events.jsonl").read_text().splitlines()]
    assert [e["seq"] for e in lines] == [q for q in range(301, 2501) if q != 1500]
    gaps = [n for n in agent_notes(out) if n["type"] == "gap"]
    assert [(g["first_missing_seq"], g["last_missing_seq"], g["missed"]) for g in gaps] == [
        (1, 300, 300),
        (1500, 1500, 1),
    ]
    assert gaps[0]["reported_missed"] == 300
    # the first fetch followed the pages: since 0, then after each page of 1000
    assert fake.queries[:3] == [(0, 1000), (1300, 1000), (2301, 1000)]
    agent = result.meta["agents"]["guest"]
    assert agent["gaps"] == 2 and agent["missed_events"] == 301 and agent["events"] == 2199
    assert result.stop_reason == "duration 1.5s"


class GatedClockAgent(FakeAgent):
    """Holds the first /clock request until the test releases it."""

    def __init__(self) -> None:
        super().__init__(last_seq=3, oldest=1, hole=set())
        self.lock = threading.Lock()
        self.clock_requests = 0
        self.arrived = threading.Event()
        self.release = threading.Event()

    def before_answer(self, path: str) -> None:
        if path != "/clock":
            return
        with self.lock:
            self.clock_requests += 1
            first = self.clock_requests == 1
        if first:
            self.arrived.set()
            self.release.wait(10)


def test_stop_ends_a_periodic_burst_after_the_read_in_flight(tmp_path: Path) -> None:
    """Stopped while the first read of a periodic 5-read burst is in flight: that burst
    ends with the read (recorded with ok_reads 1), then the final burst takes its 5."""
    fake = GatedClockAgent()
    out = tmp_path / "run"

    async def main() -> RecorderResult:
        stop = asyncio.Event()
        recorder = Recorder(out, agents={"guest": fake.url}, clock_period_ns=100_000_000)
        task = asyncio.ensure_future(recorder.run(stop))
        assert await asyncio.to_thread(fake.arrived.wait, 10)
        stop.set()
        fake.release.set()
        return await asyncio.wait_for(task, 20)

    with serving(fake):
        result = asyncio.run(main())
    samples = [json.loads(x) for x in (out / "clock-samples.jsonl").read_text().splitlines()]
    assert [(s["reason"], s["ok_reads"], s["reads"]) for s in samples] == [
        ("periodic", 1, 5),
        ("final", 5, 5),
    ]
    assert fake.clock_requests == 6
    assert result.stop_reason == "stop requested"


class SlowEventsAgent(FakeAgent):
    """Answers /events after ``delay_s`` (a loaded guest right after a stall)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(last_seq=40, oldest=1, hole=set())
        self.delay_s = delay_s

    def before_answer(self, path: str) -> None:
        if path == "/events":
            time.sleep(self.delay_s)


def test_the_last_fetch_gets_the_events_of_an_agent_too_slow_for_the_timeout(
    tmp_path: Path,
) -> None:
    """Every /events answer takes 1.5 s, the request timeout is 0.5 s: the agent reads as
    unreachable for the whole recording, and the fetch at the end (timeout 5 s) still
    writes all 40 events."""
    fake = SlowEventsAgent(delay_s=1.5)
    out = tmp_path / "run"

    async def main() -> RecorderResult:
        recorder = Recorder(
            out, agents={"guest": fake.url}, agent_timeout_ns=500_000_000,
            duration_ns=2_000_000_000,
        )  # fmt: skip
        return await asyncio.wait_for(recorder.run(), 30)

    with serving(fake):
        result = asyncio.run(main())
    kinds = [n["type"] for n in agent_notes(out)]
    assert kinds[0] == "unreachable" and "connected" in kinds, kinds
    lines = [json.loads(x) for x in (out / "guest-events.jsonl").read_text().splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, 41))
    assert result.meta["agents"]["guest"]["events"] == 40


class DroppingAgent(FakeAgent):
    """Closes the first ``drops`` /events connections unanswered (a CI run's agent left one
    /events request without an answer after a paused postcopy while /clock answered);
    /clock too when ``clock`` is False."""

    def __init__(self, drops: int, clock: bool = True) -> None:
        super().__init__(last_seq=40, oldest=1, hole=set())
        self.drops = drops
        self.clock = clock
        self.requests: list[str] = []

    def before_answer(self, path: str) -> None:
        self.requests.append(path)
        if path == "/events" and self.drops > 0:
            self.drops -= 1
            raise ConnectionAbortedError("dropped")
        if path == "/clock" and not self.clock:
            raise ConnectionAbortedError("dropped")


def _end_only(fake: FakeAgent, out: Path, drain_ns: int = DRAIN_NS) -> AgentSummary:
    """Run an AgentRecorder already told to stop: only its drain and fetch at the end run."""
    out.mkdir()
    writers = [JsonlWriter(out / n) for n in ("events.jsonl", "notes.jsonl", "clock.jsonl")]

    async def main() -> AgentSummary:
        agent = AgentRecorder("guest", fake.url, *writers, drain_ns=drain_ns)
        stop = asyncio.Event()
        stop.set()
        await asyncio.wait_for(agent.run(stop), 60)
        return agent.summary

    try:
        with serving(fake):
            return asyncio.run(main())
    finally:
        for writer in writers:
            writer.close()


@pytest.mark.parametrize(
    ("drops", "clock", "events", "final_fetch", "event_requests"),
    [
        (0, True, 40, True, 1),
        (2, True, 40, True, 3),  # failed, then the clock answered: tried twice more
        (3, True, 0, False, 3),  # FINAL_RETRIES spent
        (1, False, 0, False, 1),  # nothing answered at all: no retry
    ],
)
def test_a_last_fetch_that_failed_is_tried_again_while_the_agent_answers(
    tmp_path: Path, drops: int, clock: bool, events: int, final_fetch: bool, event_requests: int
) -> None:
    fake = DroppingAgent(drops, clock)
    summary = _end_only(fake, tmp_path / "run")
    assert fake.requests.count("/events") == event_requests, fake.requests
    assert (summary.events, summary.final_fetch) == (events, final_fetch)
    notes = [json.loads(x) for x in (tmp_path / "run" / "notes.jsonl").read_text().splitlines()]
    incomplete = [n for n in notes if n["type"] == "incomplete"]
    if final_fetch:
        assert incomplete == [] and summary.agent_last_seq == 40
    else:
        assert [n["last_seq"] for n in incomplete] == [0], notes
        assert "events after seq 0 the agent may hold never reached" in incomplete[0]["message"]


class LaggingAgent(FakeAgent):
    """/healthz at mono 1000 ns; unit ``timer cpu 1`` reports past it at the ``catch_up``-th
    answer (never when None); ``timer cpu 0`` always has."""

    def __init__(self, catch_up: int | None) -> None:
        super().__init__(last_seq=40, oldest=1, hole=set())
        self.answers = 0

        def health() -> dict[str, Any]:
            self.answers += 1
            late = catch_up is not None and self.answers >= catch_up
            return {"mono_ns": 1000, "workers": {"timer": {"cpu 0": 1200, "cpu 1": (
                1100 if late else 900
            )}, "stall": {"cpu 0": None} if self.answers == 1 else {}}}  # fmt: skip

        self.health = health


def _notes(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "notes.jsonl").read_text().splitlines()]


def test_the_drain_waits_until_every_unit_reported_past_the_first_answer(tmp_path: Path) -> None:
    """The unit behind catches up at the 4th /healthz (0.25 s apart); a unit that left (a
    sampler no longer running) is not waited for."""
    fake = LaggingAgent(catch_up=4)
    summary = _end_only(fake, tmp_path / "run")
    assert fake.answers == 4 and summary.drained is True and summary.workers_behind == {}
    assert summary.drain_waited_s is not None and 0.7 <= summary.drain_waited_s < 5
    assert summary.events == 40 and summary.final_fetch is True
    assert [n for n in _notes(tmp_path / "run") if n["type"] == "incomplete"] == []


def test_a_unit_that_never_catches_up_is_said_after_the_drain(tmp_path: Path) -> None:
    fake = LaggingAgent(catch_up=None)
    summary = _end_only(fake, tmp_path / "run", drain_ns=1_000_000_000)
    assert summary.drained is False and summary.workers_behind == {"timer cpu 1": 900}
    assert summary.drain_waited_s is not None and 1.0 <= summary.drain_waited_s < 5
    assert summary.events == 40  # the events the agent has are still fetched
    (note,) = [n for n in _notes(tmp_path / "run") if n["type"] == "incomplete"]
    assert (note["mark_mono_ns"], note["workers_behind"]) == (1000, {"timer cpu 1": 900})
    assert note["message"].startswith("timer cpu 1 had not reported past the end")


def test_an_agent_that_does_not_say_is_noted_and_not_waited_for(tmp_path: Path) -> None:
    fake = FakeAgent(last_seq=40, oldest=1, hole=set())
    fake.health = lambda: {"status": "ok", "probes": {}}  # an agent before the drain
    summary = _end_only(fake, tmp_path / "run")
    assert summary.drained is None and summary.events == 40
    (note,) = [n for n in _notes(tmp_path / "run") if n["type"] == "incomplete"]
    assert "does not say how far its workers have reported" in note["message"]


def test_an_agent_that_does_not_answer_healthz_is_not_waited_for(tmp_path: Path) -> None:
    fake = DroppingAgent(drops=0)
    fake.health = lambda: {"mono_ns": 1, "workers": {"timer": {"cpu 0": 0}}}
    real_before = fake.before_answer

    def before(path: str) -> None:
        real_before(path)
        if path == "/healthz":
            raise ConnectionAbortedError("dropped")

    fake.before_answer = before  # type: ignore[method-assign]
    started = time.monotonic()
    summary = _end_only(fake, tmp_path / "run", drain_ns=30_000_000_000)
    assert time.monotonic() - started < 10
    assert fake.requests.count("/healthz") == 1
    assert summary.drained is None and summary.events == 40


def _stopped_timer_canary_run(tmp_path: Path, cont_after_s: float | None, drain_ns: int) -> Path:
    """A real agent whose timer canary on the last CPU is SIGSTOPped; a Recorder of 1.5 s
    on it; SIGCONT ``cont_after_s`` after the stop (None: never, until the agent ends)."""
    victim = CPUS[-1]
    out = tmp_path / "run"
    with live_agent(tmp_path, "--canaries", "timer", "--no-kmsg", "--no-clock") as agent:
        deadline = time.monotonic() + 20
        while not (agent.healthz()["probes"]["timer"]["up"] and agent.timer_pid(victim)):
            assert time.monotonic() < deadline, agent.healthz()
            time.sleep(0.1)
        pid = agent.timer_pid(victim)
        stop_process(pid)
        resume = None
        if cont_after_s is not None:
            resume = threading.Timer(cont_after_s, os.kill, (pid, signal.SIGCONT))
            resume.start()
        try:
            recorder = Recorder(
                out, agents={"guest": agent.url}, duration_ns=1_500_000_000, drain_ns=drain_ns
            )
            asyncio.run(asyncio.wait_for(recorder.run(), 60))
        finally:
            if resume is not None:
                resume.join()
            os.kill(pid, signal.SIGCONT)
    return out


@pytest.mark.slow
@pytest.mark.skipif(len(CPUS) < 2, reason="needs a CPU whose canary is stopped and another")
def test_the_drain_gets_the_timeouts_of_a_canary_stopped_past_the_end(tmp_path: Path) -> None:
    """The canary is stopped from before the recording until 3.5 s after the stop, 2 s
    after the recording's end: the drain waits for it, and its 1 s timeout is in the run."""
    out = _stopped_timer_canary_run(tmp_path, 3.5, 20_000_000_000)
    guest = json.loads((out / "meta.json").read_text())["agents"]["guest"]
    assert guest["drained"] is True and guest["workers_behind"] == {}, guest
    assert 1.0 <= guest["drain_waited_s"] < 10, guest
    events = [json.loads(x) for x in (out / "guest-events.jsonl").read_text().splitlines()]
    late = [
        e for e in events
        if e["kind"] == "timeout" and e["cpu"] == CPUS[-1] and e["timeout_ns"] == 1_000_000_000
    ]  # fmt: skip
    assert len(late) == 1 and late[0]["duration_ns"] >= 2_000_000_000, late


@pytest.mark.slow
@pytest.mark.skipif(len(CPUS) < 2, reason="needs a CPU whose canary is stopped and another")
def test_a_canary_stopped_through_the_drain_is_said_in_the_run(tmp_path: Path) -> None:
    out = _stopped_timer_canary_run(tmp_path, None, 1_000_000_000)
    guest = json.loads((out / "meta.json").read_text())["agents"]["guest"]
    unit = f"timer cpu {CPUS[-1]}"
    assert guest["drained"] is False and list(guest["workers_behind"]) == [unit], guest
    notes = [n for n in agent_notes(out) if n["type"] == "incomplete"]
    assert [list(n["workers_behind"]) for n in notes] == [[unit]], notes
    said = [i.reason for i in load_run(out).issues if "had not reported past" in i.reason]
    assert said == [
        f"agent 'guest': {unit} had not reported past the end of the recording, so what "
        "they measured last may be missing"
    ]


def test_an_end_cut_short_says_its_last_fetch_did_not_get_through(tmp_path: Path) -> None:
    """The recorder winding down cancels an agent's end (here while /healthz hangs): the
    run says the last fetch never got through instead of leaving it unknown."""
    fake = FakeAgent(last_seq=40, oldest=1, hole=set())
    release = threading.Event()
    fake.before_answer = lambda path: release.wait(10) if path == "/healthz" else None  # type: ignore[method-assign]
    out = tmp_path / "run"
    out.mkdir()
    writers = [JsonlWriter(out / n) for n in ("events.jsonl", "notes.jsonl", "clock.jsonl")]

    async def main() -> AgentSummary:
        agent = AgentRecorder("guest", fake.url, *writers)
        assert agent.end_budget_s() == 10 + (2 + 5 + 2) * 5.0  # drain, then 9 requests of 5 s
        stop = asyncio.Event()
        stop.set()
        task = asyncio.ensure_future(agent.run(stop))
        await asyncio.sleep(0.5)
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        return agent.summary

    try:
        with serving(fake):
            summary = asyncio.run(main())
            release.set()
    finally:
        for writer in writers:
            writer.close()
    assert (summary.final_fetch, summary.drained, summary.events) == (False, None, 0)
    (note,) = [n for n in _notes(out) if n["type"] == "incomplete"]
    assert "the last fetch of events failed" in note["message"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"mono_ns": 5, "workers": {"timer": {"cpu 0": 7, "cpu 1": null}}}',
         (5, {"timer cpu 0": 7, "timer cpu 1": None})),
        (b'{"mono_ns": 5, "workers": {}}', (5, {})),
        (b'{"status": "ok"}', None),
        (b'{"mono_ns": "5", "workers": {}}', None),
        (b'{"mono_ns": 5, "workers": {"timer": {"cpu 0": 1.5}}}', None),
        (b'{"mono_ns": 5, "workers": {"timer": []}}', None),
        (b'{"mono_ns": true, "workers": {}}', None),
        (b"[1]", None),
        (b"not json", None),
        (b'{"mono_ns": 5, "work', None),
    ],
)  # fmt: skip
def test_workers_heard_reads_only_a_well_formed_answer(
    body: bytes, expected: tuple[int, dict[str, int | None]] | None
) -> None:
    assert workers_heard(body) == expected


@needs_qemu
def test_cli_stops_on_duration_and_on_sigint(tmp_path: Path) -> None:
    qemu = start_qemu(tmp_path, "vm", None, incoming=False)
    try:
        first = run_cli("--qmp", f"vm={qemu.qmp}", "--out", str(tmp_path / "a"), "--duration", "1s")
        assert first.returncode == 0, first.stderr
        assert "stopped: duration 1s" in first.stdout
        meta = json.loads((tmp_path / "a" / "meta.json").read_text())
        assert meta["complete"] and meta["stop_reason"] == "duration 1s"
        assert 1.0 <= meta["duration_s"] < 3.0

        proc = subprocess.Popen(
            [*TSPROBE, "record", "--qmp", f"vm={qemu.qmp}", "--out", str(tmp_path / "b")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        read_until(proc, " recording ")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr and "stopped: SIGINT" in stdout
        meta = json.loads((tmp_path / "b" / "meta.json").read_text())
        assert meta["complete"] and meta["stop_reason"] == "SIGINT"
        assert meta["counts"]["qmp-vm.jsonl"] == len(records(tmp_path / "b", "vm"))
    finally:
        qemu.kill()


def test_cli_help_has_an_example() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "Examples:" in proc.stdout and "tsprobe record --qmp src=" in proc.stdout


# -- bad input at the command line ------------------------------------------------------------


def read_until(proc: subprocess.Popen[str], text: str) -> list[str]:
    """Status lines up to the first holding ``text`` (the recorder is then ready)."""
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or text not in lines[-1]:
        line = proc.stdout.readline()
        assert line, f"the recorder ended before printing {text!r}: {lines}"
        lines.append(line)
    return lines


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TSPROBE, "record", *args], cwd=REPO, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--qmp", "/tmp/x.qmp"], "expected NAME=SOCKET"),
        (["--qmp", "src="], "expected NAME=SOCKET"),
        (["--qmp", "s/rc=/tmp/x.qmp"], "invalid endpoint name"),
        (["--qmp", "src=127.0.0.1:notaport"], "invalid QMP address"),
        (["--qmp", "src=/tmp/x", "--poll", "10"], "--poll: invalid duration"),
        (["--qmp", "src=/tmp/x", "--agent", "ftp://x"], "invalid agent URL"),
        ([], "--out RUNDIR is required"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    extra = [] if "--out" in message else ["--out", str(tmp_path / "run")]
    proc = run_cli(*args, *extra)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("tsprobe: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unwritable_out_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_cli("--qmp", f"src={tmp_path / 'x.qmp'}", "--out", str(blocker / "run"))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("tsprobe: cannot create run directory")
    assert "Traceback" not in proc.stderr


def test_cli_missing_socket_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("--qmp", f"src={tmp_path / 'nobody.qmp'}", "--out", str(out), "--quiet")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "cannot connect" in proc.stderr and "No such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["stop_reason"].startswith("could not start")
