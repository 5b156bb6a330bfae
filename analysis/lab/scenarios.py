"""The lab's scenarios: boot the guest, disturb it in a known way, record, check, summarize.

Every scenario boots the cached guest in a source QEMU (and, when it migrates, starts a
destination with ``-incoming defer``), waits until the agent's probes are up, then
records with ``analysis.record.recorder.Recorder`` (QMP of both QEMUs on their own monitors, the
agent through ``analysis.lab.proxy.Forwarder``, which follows the guest to the
destination) while it drives QEMU over a second monitor per QEMU (``Control``: every
command with a timeout, out-of-band where the main loop may be stuck). Then it checks the
guest's health, stops the recorder and writes ``lab-summary.txt``/``.json``.

==============  =================================================================
``precopy``     ``migrate`` with ``max-bandwidth`` (``--bandwidth``) until completed.
``postcopy``    precopy for ~1 s, then ``migrate-start-postcopy`` (postcopy-ram on
                both sides, ``postcopy-blocktime`` on the destination,
                ``max-postcopy-bandwidth`` = ``--bandwidth``); a memory workload
                (``--workload``, default 64M) makes the guest fault on missing pages.
``paused``      postcopy, then ``migrate-pause`` (OOB, source) for ``--hold``, then
                ``migrate-recover`` (OOB, destination, a new port) and ``migrate``
                with ``resume: true``. The vCPUs keep running on the destination: the
                behaviour libvirt merged; a vCPU touching a missing page blocks. The
                bandwidth limit only keeps the migration from completing before the
                pause: during the pause ``max-postcopy-bandwidth`` goes to 0 (no
                limit), so the recovered migration completes in a few hundred ms
                instead of seconds (docs/lab-notes.md).
``paused-stop`` the same, with the destination's vCPUs stopped while the migration is
                paused, as the upstream patch proposed. QEMU's monitor hangs on ``stop``
                while postcopy-paused (the symptom of QEMU issue 1052: the main loop
                waits for a vCPU stuck on a missing page; docs/lab-notes.md),
                so the lab sends ``stop`` to the destination *before* the pause, while
                postcopy-active (it returns once the faulting vCPUs have their pages),
                and ``cont`` once the recovered migration is postcopy-active again. It
                also sends ``query-status`` (1 s timeout) during the pause and records
                whether the monitor answered.
``stall``       SIGSTOP / SIGCONT of the whole source QEMU for each ``--stall`` (all
                vCPUs at once); the host measures each freeze between the two kill()
                calls. ``--clock-step`` first steps the guest's realtime through the
                lab hooks.
``stall-vcpu``  freeze ONE vCPU's host thread (``query-cpus-fast`` ``thread-id`` of
                ``--cpu``) with the cgroup v1 freezer for ``--stall`` while the others
                run. Needs a host thread per vCPU: KVM, or ``-accel tcg,thread=multi``
                (fine without migration). Each freeze is checked and retried (below).
==============  =================================================================

Freezing one vCPU without stalling the others (``stall-vcpu``) is ``analysis.lab.freeze``'s
job: each freeze is watched and kept only when the other vCPUs ran through it.

Besides the recorder's files, the run directory gets ``lab-steps.jsonl`` (each command
with its reply or timeout, each injected freeze with host times, and marks: baseline
start, disturbance start, settled), ``lab-health.json``, the serial consoles
(``serial-src.log``, ``serial-dst.log``), QEMU's own output (``qemu-*.log``) and meta.json
gains ``scenario`` and ``lab`` (parameters, accelerator, boot time, wall time,
``agent_url``: the forwarder the agent was recorded through, and with ``--listen``
``exporter_url``).

For Prometheus (docs/prometheus.md): ``--agent-listen HOST:PORT`` puts the forwarder on a
fixed address, so one scrape target reaches the guest's agent for the whole run (on the
source, then on the destination), and ``--listen HOST:PORT`` serves the host migration
exporter of ``tsprobe record --listen``, fed by the same recorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO, cast

from analysis import rundir
from analysis.errors import RecorderError
from analysis.lab import qemu as lq
from analysis.lab.control import Control
from analysis.lab.errors import LabError, QemuError, ScenarioError
from analysis.lab.freeze import FREEZE_SPIN_WINDOWS, _freeze_process, _freeze_thread
from analysis.lab.guest import Guest, build_guest
from analysis.lab.health import (
    _get,
    _get_or_error,
    check_health,
    hooks_command,
    memory_line,
    memory_problem,
    required_probes,
    wait_agent,
)
from analysis.lab.proxy import Forwarder
from analysis.lab.spec import POSTCOPY as POSTCOPY  # for analysis.lab.libvirt
from analysis.lab.spec import SPECS, LabOptions, Say
from analysis.lab.summary import AGENT_METRICS, HEALTH, STEPS, render, write_summary
from analysis.record.exporter import ExporterServer, MigrationExporter, parse_listen
from analysis.record.qmp_endpoint import StatusChange
from analysis.record.recorder import Recorder
from analysis.rundir import JsonlWriter

#: The console line of the guest's init that names the clocksource it booted with.
CLOCKSOURCE_MARK = re.compile(r"tsprobe-lab: clocksource (\S+)")

BOOT_TIMEOUT_S = 120.0
#: How long the guest's hooks may take to answer ``workload stop``: they wait up to 30 s
#: for the workload's verdict on its memory.
WORKLOAD_VERDICT_S = 40.0
#: The baseline goes on for up to this long past --baseline until a /clock sample came.
BASELINE_WAIT_S = 5.0
#: The longest the recorder waits at the end for the guest's samplers and canaries to
#: report what they measured before it (``analysis.record.agent_client``): they send their
#: lines about once a second, and a slow guest after a migration sends them seconds later
#: (how late each event came is measured per run: lab-summary.json ``delivery``).
DRAIN_NS = 30_000_000_000
MIGRATION_TIMEOUT_S = 120.0
#: Threading of TCG (``analysis.lab.qemu.tcg_accel``, the one rule): the scenarios that
#: do not migrate run multi-threaded TCG (a host thread per vCPU) on every QEMU; the
#: migrating ones on QEMU 9.0 and newer, source and destination alike, and
#: single-threaded on older QEMU, whose multi-threaded TCG loses guest writes during a
#: migration. ``stall`` SIGSTOPs every thread at once, so it measures the same freeze
#: either way; multi-threaded, its guest gets both host CPUs. The memory workload checks
#: its pages on every pass and at its end (``guest_workload.py``); a bad page makes the
#: run unhealthy.


class Scenario:
    """One run of a scenario (use ``run_scenario``)."""

    #: Let the recorder wait for monitors that appear later (libvirt starts the
    #: destination's QEMU only when the migration begins).
    reconnect_monitors = False

    def __init__(self, opts: LabOptions, guest: Guest, say: Say) -> None:
        self.opts = opts
        self.guest = guest
        self.say = say
        self.out = opts.out
        self.spec = SPECS[opts.scenario]
        self.migrates = self.spec.migrates
        self.qemus: list[lq.Qemu] = []
        self.controls: dict[str, Control] = {}
        self.status_events: dict[tuple[str, str], asyncio.Event] = {}
        self.forwarder: Forwarder | None = None
        self.recorder: Recorder | None = None
        self.exporter_server: ExporterServer | None = None
        self.accel = "tcg"
        self.accel_note = ""
        self.accel_why = ""
        self.binary = ""
        self.version: lq.QemuVersion | None = None
        self.boot_s: float | None = None
        #: The memory workload's verdict (its answer to ``workload stop``), when it ran.
        self.memory: dict[str, Any] | None = None
        self.steps: JsonlWriter | None = None
        self.sockdir = Path(tempfile.mkdtemp(prefix="tsprobe-lab-"))
        self.info: dict[str, Any] = {}

    # -- helpers ---------------------------------------------------------------------------

    def mark(self, name: str) -> None:
        """Record a named host time (the summary's windows)."""
        assert self.steps is not None
        self.steps.write_stamped({"type": "mark", "name": name})

    def _on_status(self, change: StatusChange) -> None:
        self.status_events.setdefault((change.endpoint, change.status), asyncio.Event()).set()
        if (
            self.forwarder is not None
            and len(self.qemus) > 1
            and change.status in ("postcopy-active", "completed")
        ):
            self.forwarder.target = self.qemus[1].spec.agent_port

    async def wait_status(self, endpoint: str, statuses: tuple[str, ...], timeout_s: float) -> str:
        """Wait until ``endpoint`` reports one of ``statuses``.

        :raise ScenarioError: on ``failed``/``cancelled`` or a timeout.
        :return: the status reached.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            for status in statuses:
                event = self.status_events.get((endpoint, status))
                if event is not None and event.is_set():
                    return status
            for bad in ("failed", "cancelled"):
                if bad not in statuses and (endpoint, bad) in self.status_events:
                    raise ScenarioError(f"{endpoint}: migration {bad}")
            if time.monotonic() > deadline:
                raise ScenarioError(
                    f"{endpoint} did not reach {'/'.join(statuses)} within {timeout_s:g} s"
                )
            await asyncio.sleep(0.02)

    # -- boot ------------------------------------------------------------------------------

    def boot(self) -> None:
        """Choose the accelerator, start the QEMUs, wait for the agent."""
        self.binary = lq.resolve_qemu(self.opts.qemu)
        self.version = version = lq.qemu_version(self.binary)
        scenario_accel, self.accel_why = lq.tcg_accel(self.migrates, version)
        self.accel, self.accel_note = lq.choose_accel(
            self.opts.accel, self.guest, self.sockdir, scenario_accel, self.binary
        )
        if self.accel_note:
            self.say(self.accel_note)
        self.say(f"QEMU {version.number} ({self.binary}): {self.accel_line()}")
        if self.migrates and self.accel == "tcg-multi" and scenario_accel != "tcg-multi":
            self.say(f"note: multi-threaded TCG forced ({self.accel_why})")
        src_spec = self.qemu_spec("src")
        self.say(
            f"booting the guest ({self.guest.boot}, {self.accel}, {self.opts.vcpus} vCPUs, "
            f"{self.opts.mem_mb} MiB, workload {self.opts.workload_size})"
        )
        self.qemus.append(lq.start(src_spec))
        if self.migrates:
            dst_spec = self.qemu_spec("dst", incoming=True)
            self.qemus.append(lq.start(dst_spec))
        self.wait_guest(src_spec.agent_port, "QEMU started")

    def qemu_spec(self, name: str, incoming: bool = False) -> lq.QemuSpec:
        """A QEMU of this run: the guest, the accelerator and the size the options ask for."""
        return lq.QemuSpec(
            name=name,
            guest=self.guest,
            workdir=self.sockdir,
            binary=self.binary,
            accel=self.accel,
            mem_mb=self.opts.mem_mb,
            vcpus=self.opts.vcpus,
            cmdline=self.opts.kernel_args(),
            incoming=incoming,
        )

    def wait_guest(self, agent_port: int, since: str) -> None:
        """Wait for the source guest's agent (and its workload), note the clocksource.

        Every probe the health check wants, not the samplers alone: a canary or the clock
        probe that comes up during the disturbance misses it (a slow boot can bring the
        canaries up only after the pause, with no /clock burst in the baseline).

        :param agent_port: the agent's forwarded port on the source.
        :param since: what the boot time counts from, for the progress line.
        """
        self.boot_s = round(
            wait_agent(
                agent_port, self.qemus[0], BOOT_TIMEOUT_S, required_probes(self.opts.canaries)
            ),
            2,
        )
        if self.opts.workload_size not in ("0", ""):
            self.qemus[0].wait_console("tsprobe-lab: workload:", 30)
        self.say(f"guest agent up, sampling every CPU {self.boot_s} s after {since}")
        self._note_clocksource()

    def _note_clocksource(self) -> None:
        """Record the clocksource asked for and the one the guest uses (its agent's /clock
        says, else the line its init printed at boot), and say so in one line when the
        kernel did not keep the one asked for."""
        used = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            clock = json.loads(_get(f"http://127.0.0.1:{self.qemus[0].spec.agent_port}/clock"))
            used = clock.get("clocksource")
        if not isinstance(used, str):
            found = CLOCKSOURCE_MARK.search(self.qemus[0].console())
            used = found.group(1) if found else None
        asked = self.opts.clocksource
        self.info["clocksource_requested"] = asked
        self.info["clocksource_used"] = used
        if asked is not None and used != asked:
            self.say(
                f"--clocksource {asked}: the guest's kernel did not keep it; "
                f"the guest uses {used or 'an unknown clocksource'}"
            )
        else:
            self.say(f"clocksource {used} ({'asked for' if asked else 'the kernel choice'})")

    # -- the drivers -------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Drive a precopy/postcopy/paused/paused-stop migration to completion."""
        src, dst = self.controls["src"], self.controls["dst"]
        scenario = self.opts.scenario
        postcopy = self.spec.postcopy
        if postcopy:
            caps = [{"capability": "postcopy-ram", "state": True}]
            await src.cmd("migrate-set-capabilities", {"capabilities": caps})
            await dst.cmd(
                "migrate-set-capabilities",
                {"capabilities": [*caps, {"capability": "postcopy-blocktime", "state": True}]},
            )
        params: dict[str, Any] = {"max-bandwidth": self.opts.bandwidth}
        if postcopy:
            params["max-postcopy-bandwidth"] = self.opts.bandwidth
        await src.cmd("migrate-set-parameters", params)
        port = lq.free_port()
        uri = f"tcp:127.0.0.1:{port}"
        await dst.cmd("migrate-incoming", {"uri": uri})
        self.mark("disturb_start")
        self.say(f"migrate to {uri} ({scenario}, max-bandwidth {self.opts.bandwidth >> 20} MiB/s)")
        await src.cmd("migrate", {"uri": uri})
        await self.wait_status("src", ("active", "completed"), 30)
        if postcopy:
            await asyncio.sleep(self.opts.postcopy_after_s)
            self.say("migrate-start-postcopy")
            await src.cmd("migrate-start-postcopy")
            await self.wait_status("dst", ("postcopy-active", "completed"), 30)
        if self.spec.pause is not None:
            await self._pause_and_recover(src, dst)
        await self.wait_status("src", ("completed",), MIGRATION_TIMEOUT_S)
        await self.wait_status("dst", ("completed",), 30)
        self.say("migration completed")

    async def _pause_and_recover(self, src: Control, dst: Control) -> None:
        stop_policy = self.spec.pause == "vcpus-stopped"
        await asyncio.sleep(0.3)
        if self.status_events.get(("src", "completed")):
            raise ScenarioError(
                "postcopy completed before migrate-pause could be sent: lower --bandwidth "
                "or raise --workload"
            )
        if stop_policy:
            self.say("stop on the destination (before the pause: it hangs while paused)")
            await dst.cmd("stop", timeout_s=30)
        self.say(f"migrate-pause (OOB) on the source; holding {self.opts.hold_ns / 1e9:g} s")
        await src.cmd("migrate-pause", oob=True, timeout_s=5)
        await self.wait_status("src", ("postcopy-paused",), 15)
        await self.wait_status("dst", ("postcopy-paused",), 15)
        t_paused = time.monotonic()
        if stop_policy:
            answered = await dst.cmd("query-status", timeout_s=1.0, check=False)
            self.info["dst_monitor_answered_while_paused"] = answered is not None
            self.say(
                "destination monitor "
                + ("answered query-status" if answered is not None else "did not answer")
                + " while postcopy-paused"
            )
        # The recovered channel takes max-postcopy-bandwidth when it connects.
        await src.cmd("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
        await asyncio.sleep(max(0.0, self.opts.hold_ns / 1e9 - (time.monotonic() - t_paused)))
        port = lq.free_port()
        uri = f"tcp:127.0.0.1:{port}"
        event = self.status_events.get(("dst", "postcopy-active"))
        if event is not None:
            event.clear()  # wait for the recovered migration's postcopy-active below
        self.say(f"migrate-recover (OOB) on the destination at {uri}, resume the source")
        await dst.cmd("migrate-recover", {"uri": uri}, oob=True, timeout_s=10)
        await src.cmd("migrate", {"uri": uri, "resume": True}, timeout_s=10)
        if stop_policy:
            await self.wait_status("dst", ("postcopy-active", "completed"), 60)
            self.say("cont on the destination")
            await dst.cmd("cont", timeout_s=30)

    async def stall(self) -> None:
        """SIGSTOP/SIGCONT the source QEMU for each --stall (and a clock step first)."""
        await self._clock_step()
        pid = self.qemus[0].pid
        self.mark("disturb_start")
        for index, stall_ns in enumerate(self.opts.stalls_ns):
            if index:
                await asyncio.sleep(2.5)
            self.say(f"SIGSTOP QEMU (pid {pid}) for {stall_ns / 1e6:g} ms")
            record = await asyncio.to_thread(_freeze_process, pid, stall_ns)
            self._inject(record, "SIGSTOP QEMU")

    async def stall_vcpu(self) -> None:
        """Freeze one vCPU thread with the cgroup freezer for each --stall."""
        await self._clock_step()
        cpus = await self.controls["src"].cmd("query-cpus-fast")
        threads = {int(c["cpu-index"]): int(c["thread-id"]) for c in cpus}
        if len(set(threads.values())) < len(threads):
            raise ScenarioError(
                f"the vCPUs share host threads ({self.accel}): stall-vcpu needs KVM or "
                "multi-threaded TCG"
            )
        tid = threads[self.opts.cpu]
        steps = self.steps
        assert steps is not None

        def note(attempt: dict[str, Any]) -> None:  # from the freezing thread
            steps.write(attempt)
            if attempt["outcome"] == "blocked":
                why = (
                    f"on CPU {FREEZE_SPIN_WINDOWS} windows of {attempt['check_ns'] / 1e6:.0f} ms"
                    if attempt["blocked_by"] == "spin"
                    else f"too few sleeps in {attempt['check_ns'] / 1e6:.0f} ms"
                )
                self.say(
                    f"  attempt {attempt['attempt']} blocked another vCPU "
                    f"{attempt['blocked_at_ns'] / 1e6:.0f} ms into the freeze ({why}): "
                    "thawed, freezing again"
                )

        self.mark("disturb_start")
        for index, stall_ns in enumerate(self.opts.stalls_ns):
            if index:
                await asyncio.sleep(2.5)
            self.say(f"freezing vCPU {self.opts.cpu} (thread {tid}) for {stall_ns / 1e6:g} ms")
            record = await asyncio.to_thread(
                _freeze_thread, self.opts.cpu, threads, stall_ns, self.qemus[0].pid, note
            )
            self._inject(record, f"cgroup-freeze vCPU {self.opts.cpu}", cpu=self.opts.cpu)

    def _inject(self, record: dict[str, Any], what: str, **extra: Any) -> None:
        assert self.steps is not None
        self.steps.write({"type": "inject", "what": what, **record, **extra})
        self.say(f"  host-measured freeze {record['freeze_ns'] / 1e6:.1f} ms")

    async def _clock_step(self) -> None:
        if self.opts.clock_step_ns is None:
            return
        self.say(f"stepping the guest's realtime by {self.opts.clock_step_ns / 1e9:+g} s")
        await self._hooks(self.qemus[0], f"step {self.opts.clock_step_ns}", "clock_step")
        await asyncio.sleep(1.5)
        await self._baseline()  # a new one, after the step

    async def _baseline(self) -> None:
        """Mark the baseline's start and record the undisturbed guest for ``baseline_s``,
        and on until the recorder has a /clock sample taken in it (for the lag before; at
        most BASELINE_WAIT_S more): the busy guest's agent sometimes answered no burst in
        1 s."""
        recorder = self.recorder
        assert recorder is not None

        def samples() -> int:
            return sum(a.summary.clock_samples for a in recorder.agents.values())

        self.mark("baseline_start")
        before = samples()
        await asyncio.sleep(self.opts.baseline_s)
        deadline = time.monotonic() + BASELINE_WAIT_S
        while time.monotonic() < deadline and samples() == before:
            await asyncio.sleep(0.1)

    def _stop_workload(self) -> asyncio.Future[None] | None:
        """Ask the final guest's hooks to stop the memory workload, in the background;
        its answer is the workload's verdict on the guest's memory (``self.memory``).

        Its job ends with the migration, and on the destination (whose QEMU translates the
        guest's code anew) it would delay the agent's answers to the health check
        (docs/lab-notes.md has the delays measured).
        """
        if not self.migrates or self.opts.workload_size in ("0", ""):
            return None
        steps = self.steps
        assert steps is not None

        async def stop() -> None:
            try:
                self.memory = await self._hooks(
                    self.qemus[-1], "workload stop", "workload_stop", WORKLOAD_VERDICT_S
                )
            except ScenarioError as err:
                self.say(f"the memory workload was not stopped: {err}")
                steps.write_stamped({"type": "workload_stop", "ok": False, "error": str(err)})

        return asyncio.ensure_future(stop())

    async def _write_kmsg(self) -> None:
        if self.opts.kmsg is None:
            return
        self.say(f"writing to the guest's /dev/kmsg: {self.opts.kmsg}")
        await self._hooks(self.qemus[0], f"kmsg {self.opts.kmsg}", "kmsg")

    async def _hooks(
        self, qemu: lq.Qemu, line: str, kind: str, timeout_s: float = 5.0
    ) -> dict[str, Any]:
        """Send ``line`` to ``qemu``'s guest hooks; record the answer as a ``kind`` step.

        :param timeout_s: how long the answer may take once the line was sent.
        :raise ScenarioError: when the hooks do not answer or refuse.
        :return: the answer.
        """
        reply = await asyncio.to_thread(hooks_command, qemu.spec.hooks_port, line, timeout_s)
        assert self.steps is not None
        self.steps.write_stamped({"type": kind, **reply})
        return reply

    # -- the whole run ---------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Boot, record, drive, check; return the lab info for meta.json."""
        started = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        # In this (the main) thread: each QEMU gets PR_SET_PDEATHSIG, which fires when the
        # thread that started it ends, so a worker thread would take QEMU down with it.
        self.boot()
        self.steps = JsonlWriter(self.out / STEPS)
        await self.connect_controls()
        await self._start_forwarder()
        recorder = self._recorder(self._serve_exporter(), self.lab_meta(started))
        self.recorder = recorder
        task = asyncio.ensure_future(recorder.run())
        workload_stop: asyncio.Future[None] | None = None
        try:
            await _first(recorder.started.wait(), task, 30)
            if task.done():
                task.result()
            await self._write_kmsg()
            await self._baseline()
            drive = {"migrate": self.migrate, "stall": self.stall, "stall-vcpu": self.stall_vcpu}
            await drive[self.spec.driver]()
            self.mark("settled")
            workload_stop = self._stop_workload()
            health, body, error = await self._check_guest()
            if workload_stop is not None:
                await workload_stop
        finally:
            if workload_stop is not None and not workload_stop.done():
                workload_stop.cancel()
            recorder.stop("lab scenario done")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
            self.mark("recording_stopped")
        self._keep_health(health, body, error, workload_stop is not None)
        return self.lab_meta(started)

    def _serve_exporter(self) -> MigrationExporter | None:
        """With ``--listen``, the host migration exporter fed by the recorder."""
        assert self.forwarder is not None
        if self.opts.listen is None:
            return None
        exporter = MigrationExporter(
            [q.spec.name for q in self.qemus], {"guest": self.forwarder.url}, run=str(self.out)
        )
        try:
            self.exporter_server = exporter.serve(self.opts.listen)
        except RecorderError as err:
            raise ScenarioError(str(err)) from err
        self.info["exporter_url"] = f"http://{self.exporter_server.address}/metrics"
        self.say(f"serving the migration state on {self.info['exporter_url']}")
        return exporter

    def _recorder(self, exporter: MigrationExporter | None, lab_meta: dict[str, Any]) -> Recorder:
        """The recorder on one monitor of each QEMU and on the agent, through the forwarder."""
        assert self.forwarder is not None
        return Recorder(
            self.out,
            qmp={q.spec.name: str(q.spec.qmp_socket) for q in self.qemus},
            agents={"guest": self.forwarder.url},
            grace_ns=600_000_000_000,
            on_status=self._on_status,
            command_timeout_ns=1_000_000_000,
            clock_period_ns=250_000_000,
            events_poll_ns=250_000_000,
            drain_ns=DRAIN_NS,
            status_stream=cast(TextIO, _Prefixed(self.say)) if self.opts.verbose else None,
            command_line=["tsprobe", "lab", "run", "--scenario", self.opts.scenario]
            + (["--via", self.opts.via] if self.opts.via != "qemu" else []),
            reconnect=self.reconnect_monitors,
            extra_meta={"scenario": self.opts.scenario, "lab": lab_meta},
            on_record=None if exporter is None else exporter.observe,
        )

    async def _check_guest(self) -> tuple[dict[str, Any], bytes, Exception | None]:
        """After the disturbance: the health check and the agent's last /metrics.

        The agent's last /metrics is asked for as soon as the health check's first /healthz
        is answered, so the slow guest renders it while the check goes on (asked for after
        the check, it came seconds later; sent before the agent answers at all, right after
        a migration, it can hang past its timeout). Its counters can miss an event the
        workers report after it; the recorder's drain, when it stops, waits for those
        (``DRAIN_NS``) and guest-events.jsonl has every one.

        :return: the health report, the /metrics body and the error fetching it, if any.
        """
        await asyncio.sleep(self.opts.linger_s)
        final = self.qemus[-1]
        url = f"http://127.0.0.1:{final.spec.agent_port}/metrics"
        loop = asyncio.get_running_loop()
        fetches: list[asyncio.Future[tuple[bytes, Exception | None]]] = []

        def fetch_metrics() -> None:
            if not fetches:
                fetch = asyncio.to_thread(_get_or_error, url, 10.0)
                fetches.append(asyncio.ensure_future(fetch))

        self.say(f"checking the guest's health on {final.spec.name}")
        health = await asyncio.to_thread(
            check_health,
            final,
            self.qemus,
            self.opts.vcpus,
            self.opts.canaries,
            self.opts.kmsg,
            lambda: loop.call_soon_threadsafe(fetch_metrics),
        )
        self.mark("health_checked")
        self.say(
            f"lab health checks: {'ok' if health['ok'] else '; '.join(health['problems'])} "
            f"(agent answered after {health['answer_s']} s, probes up after "
            f"{health['probes_up_s']} s; samples/s {health['samples_per_s']})"
        )
        # A fetch_metrics scheduled by the first answer has run: it was queued before
        # check_health's return. Without an answer, /metrics is asked for now.
        fetch_metrics()
        body, error = await fetches[0]
        self.mark("metrics_fetched")
        return health, body, error

    def _keep_health(
        self, health: dict[str, Any], body: bytes, error: Exception | None, workload: bool
    ) -> None:
        """Fold the /metrics fetch and the workload's memory verdict into the health
        report; write it (lab-health.json) and the agent's last /metrics."""
        if error is not None:
            health["problems"].append(f"/metrics failed: {error}")
            health["ok"] = False
            self.say(f"health: /metrics failed: {error}")
        if workload:
            health["memory"] = self.memory
            problem = memory_problem(self.memory)
            if problem:
                health["problems"].append(problem)
                health["ok"] = False
            self.say(f"memory: {problem or memory_line(self.memory)}")
        if body:
            (self.out / AGENT_METRICS).write_bytes(body)
        rundir.write_json_atomic(self.out / HEALTH, health)

    async def connect_controls(self) -> None:
        """Connect the scenario's own monitor of each QEMU."""
        assert self.steps is not None
        for q in self.qemus:
            self.controls[q.spec.name] = Control(
                q.spec.name, q.spec.ctl_socket, self.steps, self.say
            )
            await self.controls[q.spec.name].connect()

    async def _start_forwarder(self) -> None:
        """Start the agent's forwarder (on ``--agent-listen`` when given)."""
        host, port = "127.0.0.1", 0
        if self.opts.agent_listen is not None:
            host, port = parse_listen(self.opts.agent_listen)
        self.forwarder = Forwarder(self.qemus[0].spec.agent_port, host, port)
        try:
            await self.forwarder.start()
        except OSError as err:
            raise ScenarioError(
                f"--agent-listen {self.opts.agent_listen}: cannot listen: {err.strerror or err}"
            ) from err
        self.info["agent_url"] = self.forwarder.url
        if self.opts.agent_listen is not None:
            self.say(f"the guest's agent is at {self.forwarder.url}/metrics for the whole run")

    def accel_line(self) -> str:
        """The accelerator in a few words: ``tcg thread=multi (why)``."""
        if self.accel == "kvm":
            return "kvm"
        threads = "multi" if self.accel == "tcg-multi" else "single"
        forced = self.opts.accel in ("tcg-single", "tcg-multi")
        why = f"--accel {self.opts.accel}" if forced else self.accel_why
        return f"tcg thread={threads}" + (f" ({why})" if why else "")

    def lab_meta(self, started: float) -> dict[str, Any]:
        """The ``lab`` section of meta.json."""
        opts = asdict(self.opts)
        opts["out"] = str(self.opts.out)
        version = self.version
        return {
            "options": opts,
            "migrates": self.migrates,
            "accel": self.accel,
            "accel_note": self.accel_note,
            "accel_line": self.accel_line(),
            "tcg_threads": {"tcg": "single", "tcg-multi": "multi"}.get(self.accel),
            "qemu_binary": self.binary,
            "qemu_version": None if version is None else version.number,
            "qemu_version_text": None if version is None else version.text,
            "vcpus": self.opts.vcpus,
            "mem_mb": self.opts.mem_mb,
            "workload": self.opts.workload_size,
            "guest": {
                "key": self.guest.key,
                "boot": self.guest.boot,
                "sizes": self.guest.manifest.get("sizes"),
                "kernel_package": self.guest.manifest.get("kernel_package"),
            },
            "boot_s": self.boot_s,
            "wall_s": round(time.monotonic() - started, 1),
            "qemu": {q.spec.name: q.spec.command() for q in self.qemus},
            **self.info,
        }

    async def close(self) -> None:
        """Disconnect, kill every QEMU, remove the sockets; copy the consoles."""
        for control in self.controls.values():
            await control.close()
        if self.forwarder is not None:
            await self.forwarder.close()
        if self.exporter_server is not None:
            self.exporter_server.close()
        for q in self.qemus:
            q.stop()
            for name in (q.spec.serial_log.name, f"qemu-{q.spec.name}.log"):
                with contextlib.suppress(OSError):
                    shutil.copyfile(self.sockdir / name, self.out / name)
        if self.steps is not None:
            self.steps.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)


class _Prefixed(io.TextIOBase):
    """A text stream that hands each line to ``say`` (the recorder's status lines)."""

    def __init__(self, say: Say) -> None:
        super().__init__()
        self.say = say

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.say(f"recorder: {line}")
        return len(text)

    def flush(self) -> None:
        """Nothing buffered."""


async def _first(aw: Any, task: asyncio.Future[Any], timeout_s: float) -> None:
    waiter = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({waiter, task}, timeout=timeout_s, return_when="FIRST_COMPLETED")
    waiter.cancel()
    if not done:
        raise ScenarioError(f"the recorder did not start within {timeout_s:g} s")


def run_scenario(opts: LabOptions, say: Say | None = None) -> dict[str, Any]:
    """Run one scenario end to end and write its run directory.

    What the guest lived through is a result, not an error: a guest that did not recover
    still gets a complete run directory, its summary and ``lab-outcome.json``
    (``analysis.lab.outcome``). So does a run the lab could not carry out once it began
    booting the guest (QEMU died, the agent never came up, a command failed): its outcome
    is ``lab-error`` and the error is a ``lab_error`` record in lab-steps.jsonl.

    :param opts: the options.
    :param say: progress lines (default: print with a ``lab:`` prefix and the elapsed time).
    :raise LabError: on bad options or a guest that cannot be built; every process
        started is killed whatever happens.
    :return: the summary (also in lab-summary.json), with ``guest_outcome``.
    """
    opts.check()
    t0 = time.monotonic()

    def default_say(line: str) -> None:
        print(f"lab {time.monotonic() - t0:6.1f}s: {line}", flush=True)

    say = say or default_say
    guest = build_guest(log=lambda line: say(f"build-guest: {line}"))
    scenario = Scenario(opts, guest, say)
    if opts.via == "libvirt":
        from analysis.lab.libvirt import LibvirtScenario

        scenario = LibvirtScenario(opts, guest, say)

    async def main() -> dict[str, Any]:
        try:
            return await scenario.run()
        finally:
            await scenario.close()

    error: LabError | None = None
    with lq.handle_signals():
        try:
            lab_meta = asyncio.run(main())
        except (QemuError, ScenarioError) as err:
            error = err
            lab_meta = scenario.lab_meta(t0)
        finally:
            lq.kill_all()
    opts.out.mkdir(parents=True, exist_ok=True)
    if error is not None:
        say(f"lab error: {error}")
        steps = JsonlWriter(opts.out / STEPS)
        try:
            steps.write_stamped({"type": "lab_error", "error": str(error)})
        finally:
            steps.close()
    meta_path = opts.out / rundir.META
    meta: dict[str, Any] = {"scenario": opts.scenario}
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads(meta_path.read_text())
    meta["lab"] = lab_meta
    rundir.write_json_atomic(meta_path, meta)
    summary = write_summary(opts.out)
    say("summary:\n" + render(summary))
    return summary
