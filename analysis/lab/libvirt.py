"""``tsprobe lab run --via libvirt``: the lab guest as a libvirt domain, migrated by virsh.

What is the same as the lab's own runs (``analysis.lab.scenarios``): the cached guest,
its kernel command line, the agent and its forwarder, tsprobe's recorder on a QMP monitor
of its own in each QEMU, the health check, the summary and the outcome. What libvirt
does instead of the lab:

- Two libvirt daemons on this host, ``src`` and ``dst`` (``Daemon``). libvirtd keeps its
  state in fixed places when run as root (``/run/libvirt``, ``/var/lib/libvirt``,
  ``/var/cache/libvirt``, ``/var/log/libvirt``, its configuration in ``/etc/libvirt``),
  so each runs in a mount namespace of its own (``unshare --mount --propagation
  private``) with a directory of the run bound over each of those: its socket is then
  ``DIR/run/libvirt-sock`` on the host, and its URI
  ``qemu:///system?socket=DIR/run/libvirt-sock``. Each has its own ``host_uuid``:
  libvirt refuses a migration between two daemons with the same host UUID ("Attempt to
  migrate guest to the same host"). The daemons share the host's network namespace, so
  the destination's QEMU forwards the agent on other host ports than the source's.
- ``qemu.conf`` of both: root, no security driver, no cgroups (``cgroup_controllers =
  [ ]``: both daemons would create the same cgroup for the same domain name), QEMU's
  output to a file (``stdio_handler = "file"``: no virtlogd), and migration port ranges
  that do not overlap. libvirt 9.0 refuses ``migration_host`` and ``migration_address``
  naming this machine ("must not be the address of the local machine"), so each
  ``virsh migrate`` names the stream's address instead: ``--migrateuri tcp://127.0.0.1
  --listen-address 127.0.0.1``.
- The domain (``domain_xml``): ``type='qemu'`` (TCG; ``kvm`` when the lab's accelerator
  is KVM), q35, direct kernel boot of the lab guest (``<kernel>``, ``<initrd>``,
  ``<cmdline>``), no USB, no balloon, the serial console in a file, and through
  ``<qemu:commandline>``: the user-mode network with the agent's and the hooks' ports
  forwarded, and tsprobe's own QMP monitor (the README's way 1). The destination gets
  the same domain with its own ports, monitor and console file (``virsh migrate
  --xml``); libvirt's ABI check leaves ``<qemu:commandline>`` alone.
- libvirt starts QEMU with ``-accel tcg``, which on x86 is multi-threaded TCG. QEMU
  before ``MTTCG_MIGRATION_MIN`` loses guest writes in a multi-threaded TCG migration
  (``analysis.lab.qemu``), and libvirt has no setting for TCG's threads, so on such a
  QEMU the domain's ``<emulator>`` is a wrapper (``tcg_wrapper``) that turns
  ``-accel tcg`` into ``-accel tcg,thread=single``.

The migration (``LibvirtScenario.migrate``)::

    virsh -c SRC migrate --live [--postcopy] --bandwidth MIB [--postcopy-bandwidth MIB]
        --xml dst.xml --migrateuri tcp://127.0.0.1 --listen-address 127.0.0.1 DOM DST
    virsh -c SRC migrate-postcopy DOM               (postcopy, ~1 s after it began)
    virsh -c SRC domjobabort --postcopy DOM         (paused: postcopy-paused on both)
    virsh -c SRC migrate --live --postcopy --postcopy-resume ... DOM DST   (after --hold)

The first ``virsh migrate`` ends with an error once paused ("job 'migration in' failed
in post-copy phase"); the resume is another ``virsh migrate``. When the pause comes
while libvirt's Finish phase on the destination still waits for an answer of its QEMU,
it never ends and libvirt refuses the resume (``_first_migrate_end``). libvirt 9.0 sends
the destination's ``migrate-recover`` in-band, so the recovery needs the destination's main
loop, and under TCG that loop can block for the whole pause (a guest page it or the
vCPU holding QEMU's lock touches has not arrived). Then tsprobe's own monitor there
stops answering about 1 s into the pause, and ``--postcopy-resume`` never gets the
destination past postcopy-paused (80 s, then "Unable to read from monitor: Connection
reset by peer" when the lab destroys the domain). That is a result, not the lab's failure:
after ``RECOVERY_WAIT_S`` the lab writes a ``recovery_failed`` step and ends the run, and
its outcome is ``not-recovered`` with that evidence (``analysis.lab.outcome``). On QEMU 7.2.22
under single-threaded TCG that happened in 3 of 5 ``paused`` runs (keeping the agent's
requests off the destination during the pause did not prevent it) and in 2 of 3
``paused-stop`` runs. The lab's own runs send ``migrate-recover`` out-of-band.

``paused-stop`` sends ``virsh suspend`` to the destination during the pause and records
what libvirt did with it: libvirt 9.0 runs a domain's commands one job at a time and
suspend is not among those allowed during an incoming migration, so it waits for the
migration job, up to libvirt's 30 s job wait ("cannot acquire state change lock (held
by monitor=remoteDispatchDomainMigratePrepare3Params)"); when the migration ends within
that wait, it stops the vCPUs after the migration (seen once, by hand). The recovery
waits for the suspend's answer, and the lab resumes a destination left paused (``virsh
resume``).

Recorded two ways, as the README's libvirt section says: the lab's recorder on tsprobe's
own monitors (the run directory's ``qmp-src.jsonl``, ``qmp-dst.jsonl``; the destination's
monitor appears when libvirt starts its QEMU, so the recorder reconnects), and ``virsh
qemu-monitor-event --loop --timestamp`` of each daemon piped into ``tsprobe record
--libvirt-events -`` (``virsh-monitor-src/``, ``virsh-monitor-dst/``, each a run directory
of its own; the raw lines in ``libvirt-monitor-events-*.txt``). Besides: every virsh
command with its output and exit status (``libvirt-commands.txt``, and ``virsh`` records
in lab-steps.jsonl), ``virsh domjobinfo`` of the source every second during the
migration and ``--completed`` on both sides afterwards (``libvirt-domjobinfo.txt``),
``virsh event --all --loop --timestamp`` of each daemon (``libvirt-events-*.txt``), the
domain XMLs, the daemons' logs and libvirt's QEMU logs. meta.json's ``lab`` says
``"via": "libvirt"`` and holds ``libvirt``: the daemons, the commands with their exit
status and time, the completed jobs' figures, what became of the suspend, and the
migration statuses each way of recording saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from analysis.lab import qemu as lq
from analysis.lab.errors import ScenarioError
from analysis.lab.guest import cache_dir
from analysis.lab.libvirt_host import (
    ABORT_AFTER_S,
    COMMANDS,
    DOMAIN,
    JOBINFO,
    JOBINFO_PERIOD_S,
    LIBVIRT_JOB_WAIT_S,
    PAUSED_STATE_WAIT_S,
    PORT_MIN,
    RECOVERY_WAIT_S,
    VIRSH_TIMEOUT_S,
    Daemon,
    DomainQemu,
    VirshResult,
    domain_xml,
    parse_jobinfo,
    tcg_wrapper,
)
from analysis.lab.scenarios import (
    MIGRATION_TIMEOUT_S,
    POSTCOPY,
    Scenario,
)
from analysis.rundir import host_now


class LibvirtScenario(Scenario):
    """A migrating lab scenario driven through two libvirt daemons (``--via libvirt``)."""

    reconnect_monitors = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemons: dict[str, Daemon] = {}
        self.xml_paths: dict[str, Path] = {}
        self.commands: list[VirshResult] = []
        self.pipelines: dict[str, tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]] = {}
        self.watchers: list[subprocess.Popen[bytes]] = []
        self.libvirt: dict[str, Any] = {}
        self.info["via"] = "libvirt"
        self.info["libvirt"] = self.libvirt

    # -- virsh -----------------------------------------------------------------------------

    def virsh(self, side: str, *args: str, timeout_s: float = VIRSH_TIMEOUT_S) -> VirshResult:
        """Run ``virsh -c URI ARGS`` on ``side``'s daemon; log it (transcript and steps)."""
        real0, _ = host_now()
        t0 = time.monotonic()
        cmd = ["virsh", "-c", self.daemons[side].uri, *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = None
            out = _text(exc.stdout)
            err = _text(exc.stderr)
        result = VirshResult(side, list(args), rc, out, err, real0, time.monotonic() - t0)
        self.commands.append(result)
        self._transcribe(result)
        if self.steps is not None:
            self.steps.write(result.record())
        return result

    async def avirsh(
        self, side: str, *args: str, timeout_s: float = VIRSH_TIMEOUT_S
    ) -> VirshResult:
        """``virsh`` in a worker thread."""
        return await asyncio.to_thread(self.virsh, side, *args, timeout_s=timeout_s)

    def _must(self, result: VirshResult) -> VirshResult:
        if result.rc != 0:
            raise ScenarioError(f"{result.line()}: {result.error()}")
        return result

    def _transcribe(self, result: VirshResult) -> None:
        status = "killed" if result.rc is None else f"exit {result.rc}"
        line = result.line()
        for name, daemon in self.daemons.items():
            line = line.replace(shlex.quote(daemon.uri), f'"${name.upper()}"')
        lines = [f"# {_utc(result.host_real_ns)}", f"$ {line}"]
        lines += [f"  {ln}" for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
        lines.append(f"  ({status} after {result.elapsed_s:.2f} s)")
        with open(self.out / COMMANDS, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")

    def _migrate_args(self, resume: bool = False) -> list[str]:
        args = ["migrate", "--live"]
        postcopy = self.opts.scenario in POSTCOPY
        if postcopy:
            args.append("--postcopy")
        if resume:
            args.append("--postcopy-resume")
        else:
            mib = str(max(1, self.opts.bandwidth >> 20))
            args += ["--bandwidth", mib, *(["--postcopy-bandwidth", mib] if postcopy else [])]
        return [
            *args, "--xml", str(self.xml_paths["dst"]), "--migrateuri", "tcp://127.0.0.1",
            "--listen-address", "127.0.0.1", DOMAIN, self.daemons["dst"].uri,
        ]  # fmt: skip

    # -- boot ------------------------------------------------------------------------------

    def boot(self) -> None:
        """Start both daemons, define and start the domain on the source, wait for the agent."""
        emulator = self._choose_emulator()
        self._start_daemons(emulator)
        specs = self._write_domains(emulator)
        self._must(self.virsh("src", "define", str(self.xml_paths["src"])))
        started = time.monotonic()
        self._must(self.virsh("src", "start", DOMAIN))
        self.qemus = [
            DomainQemu(specs["src"], self.daemons["src"], started),
            DomainQemu(specs["dst"], self.daemons["dst"], started),
        ]
        self.wait_guest(specs["src"].agent_port, "virsh start")

    def _choose_emulator(self) -> str:
        """The QEMU and accelerator; the emulator libvirt runs (the TCG wrapper under TCG)."""
        self.binary = lq.resolve_qemu(self.opts.qemu)
        self.version = version = lq.qemu_version(self.binary)
        scenario_accel, self.accel_why = lq.tcg_accel(True, version)
        self.accel, self.accel_note = lq.choose_accel(
            self.opts.accel, self.guest, self.sockdir, scenario_accel, self.binary
        )
        if self.accel_note:
            self.say(self.accel_note)
        emulator = self.binary
        if self.accel == "tcg":
            emulator = str(tcg_wrapper(self.sockdir, self.binary, version.number))
        self.say(f"QEMU {version.number} ({self.binary}) under libvirt: {self.accel_line()}")
        return emulator

    def _start_daemons(self, emulator: str) -> None:
        """Both libvirtd up, their URIs in libvirt-commands.txt, ``virsh event`` on each."""
        caps_cache = cache_dir().parent / "libvirt-cache"
        t0 = time.monotonic()
        for name in ("src", "dst"):
            daemon = Daemon(name, self.sockdir / f"lv-{name}", PORT_MIN[name], caps_cache)
            self.daemons[name] = daemon
            daemon.start()
        self.libvirt["daemons_up_s"] = round(time.monotonic() - t0, 2)
        version_text = self.virsh("src", "version").stdout
        self.libvirt.update(
            version=_first_match(r"Using library: libvirt (\S+)", version_text),
            daemons={
                n: {"uri": d.uri, "host_uuid": d.host_uuid, "migration_ports": d.port_min}
                for n, d in self.daemons.items()
            },
            domain=DOMAIN,
            emulator=emulator,
        )
        self.say(
            f"libvirt {self.libvirt['version']}: daemons src and dst up "
            f"({self.daemons['src'].uri}, {self.daemons['dst'].uri})"
        )
        with open(self.out / COMMANDS, "w", encoding="utf-8") as fh:
            fh.write("".join(f"{n.upper()}='{d.uri}'\n" for n, d in self.daemons.items()))
        for name, daemon in self.daemons.items():
            log = self.out / f"libvirt-events-{name}.txt"
            self.watchers.append(
                lq.spawn(
                    ["stdbuf", "-oL", "virsh", "-c", daemon.uri, "event", "--all", "--loop",
                     "--timestamp"],
                    log,
                )
            )  # fmt: skip

    def _write_domains(self, emulator: str) -> dict[str, lq.QemuSpec]:
        """The source's and the destination's domain XML in the run directory."""
        domain_uuid = str(uuid.uuid4())
        domain_type = "kvm" if self.accel == "kvm" else "qemu"
        specs = {
            "src": self.qemu_spec("src"),
            "dst": self.qemu_spec("dst", incoming=True),
        }
        for name, spec in specs.items():
            path = self.out / f"libvirt-domain-{name}.xml"
            path.write_text(domain_xml(spec, emulator, domain_uuid, domain_type))
            self.xml_paths[name] = path
        self.say(
            f"booting the guest as libvirt domain {DOMAIN} (type {domain_type}, "
            f"{self.opts.vcpus} vCPUs, {self.opts.mem_mb} MiB, workload {self.opts.workload_size})"
        )
        return specs

    async def connect_controls(self) -> None:
        """None: libvirt drives the QEMUs; tsprobe only records on its own monitors."""

    # -- recording through virsh -------------------------------------------------------------

    def _start_monitor_event_records(self) -> None:
        """``virsh qemu-monitor-event ... | tsprobe record --libvirt-events -`` per side.

        The source's names the domain; the destination's cannot (the domain exists there
        only once the migration begins), so it takes every domain of its daemon.
        """
        duration = MIGRATION_TIMEOUT_S + self.opts.hold_ns / 1e9 + 120
        for name, daemon in self.daemons.items():
            domain = f" --domain {DOMAIN}" if name == "src" else ""
            raw = self.out / f"libvirt-monitor-events-{name}.txt"
            producer = subprocess.Popen(
                [
                    "sh", "-c",
                    f"stdbuf -oL virsh -c {shlex.quote(daemon.uri)} qemu-monitor-event "
                    f"--loop --timestamp{domain} | tee {shlex.quote(str(raw))}",
                ],
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                process_group=0,
            )  # fmt: skip
            out = self.out / f"virsh-monitor-{name}"
            with open(self.out / f"virsh-monitor-{name}.log", "ab") as log:
                consumer = subprocess.Popen(
                    [
                        sys.executable, "-m", "tsprobe.cli", "record", "--libvirt-events", "-",
                        "--out", str(out), "--grace", "2s", "--duration", f"{duration:.0f}s",
                    ],
                    stdin=producer.stdout,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    process_group=0,
                )  # fmt: skip
            assert producer.stdout is not None
            producer.stdout.close()
            for proc in (producer, consumer):
                lq.PROCESSES[proc.pid] = proc
            self.pipelines[name] = (producer, consumer)

    def _stop_monitor_event_records(self, wait_s: float = 10.0) -> None:
        """Let each ``tsprobe record`` end by itself (completed + grace), then end virsh."""
        deadline = time.monotonic() + wait_s
        for producer, consumer in self.pipelines.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                consumer.wait(max(0.1, deadline - time.monotonic()))
            lq.kill(producer)
            with contextlib.suppress(subprocess.TimeoutExpired):
                consumer.wait(5)
            lq.kill(consumer)
        self.pipelines.clear()

    async def _poll_jobinfo(self, done: asyncio.Event) -> None:
        """``virsh domjobinfo`` of the source every ``JOBINFO_PERIOD_S`` until ``done``."""
        with open(self.out / JOBINFO, "a", encoding="utf-8") as fh:
            while not done.is_set():
                real0, _ = host_now()
                proc = await asyncio.create_subprocess_exec(
                    "virsh", "-c", self.daemons["src"].uri, "domjobinfo", DOMAIN,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                )  # fmt: skip
                out, _ = await proc.communicate()
                fh.write(f"# src domjobinfo at {_utc(real0)}\n{out.decode()}\n")
                fh.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), JOBINFO_PERIOD_S)

    def _completed_jobs(self) -> None:
        """``virsh domjobinfo --completed`` on both sides, kept and parsed."""
        jobs = {}
        with open(self.out / JOBINFO, "a", encoding="utf-8") as fh:
            for side in ("src", "dst"):
                result = self.virsh(side, "domjobinfo", "--completed", DOMAIN)
                fh.write(f"# {side} domjobinfo --completed\n{result.stdout}{result.stderr}\n")
                jobs[side] = parse_jobinfo(result.stdout)
        self.libvirt["completed_jobs"] = jobs

    # -- the migration -----------------------------------------------------------------------

    async def migrate(self) -> None:
        """Migrate with virsh: precopy, postcopy, paused (domjobabort --postcopy, resume)."""
        scenario = self.opts.scenario
        self._start_monitor_event_records()
        done = asyncio.Event()
        poller = asyncio.ensure_future(self._poll_jobinfo(done))
        self.mark("disturb_start")
        self.qemus[1].started_mono = time.monotonic()
        self.say(f"virsh migrate ({scenario}, --bandwidth {self.opts.bandwidth >> 20} MiB/s)")
        timeout = MIGRATION_TIMEOUT_S + self.opts.hold_ns / 1e9
        migration: asyncio.Future[VirshResult] = asyncio.ensure_future(
            self.avirsh("src", *self._migrate_args(), timeout_s=timeout)
        )
        try:
            await self._wait_or_fail(migration, "src", ("active", "completed"), 30)
            if scenario in POSTCOPY:
                await asyncio.sleep(self.opts.postcopy_after_s)
                self.say("virsh migrate-postcopy")
                self._must(await self.avirsh("src", "migrate-postcopy", DOMAIN))
                await self._wait_or_fail(migration, "dst", ("postcopy-active", "completed"), 30)
            if scenario in ("paused", "paused-stop"):
                migration = await self._pause_and_recover_libvirt(migration, timeout)
            result = await migration
            self._must(result)
            self.libvirt["migrate_s"] = round(result.elapsed_s, 2)
            await self.wait_status("src", ("completed",), MIGRATION_TIMEOUT_S)
            await self.wait_status("dst", ("completed",), 30)
            self.say(f"migration completed (virsh migrate returned after {result.elapsed_s:.2f} s)")
        finally:
            done.set()
            with contextlib.suppress(Exception):
                await poller
            if not migration.done():
                migration.cancel()
        await asyncio.to_thread(self._completed_jobs)
        await asyncio.to_thread(self._stop_monitor_event_records)

    async def _wait_or_fail(
        self,
        migration: asyncio.Future[VirshResult],
        endpoint: str,
        statuses: tuple[str, ...],
        timeout_s: float,
    ) -> None:
        """``wait_status``, or the error of a ``virsh migrate`` that ended first."""
        waiter = asyncio.ensure_future(self.wait_status(endpoint, statuses, timeout_s))
        both: list[asyncio.Future[Any]] = [waiter, migration]
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done() and migration.done() and migration.result().rc != 0:
            waiter.cancel()
            self._must(migration.result())
        await waiter

    async def _pause_and_recover_libvirt(
        self, migration: asyncio.Future[VirshResult], timeout_s: float
    ) -> asyncio.Future[VirshResult]:
        """Pause with ``domjobabort --postcopy``, hold, resume with ``--postcopy-resume``.

        :return: the resuming ``virsh migrate``.
        """
        stop_policy = self.opts.scenario == "paused-stop"
        hold_s = self.opts.hold_ns / 1e9
        await asyncio.sleep(ABORT_AFTER_S)
        if self.status_events.get(("src", "completed")):
            raise ScenarioError(
                "postcopy completed before virsh domjobabort --postcopy could be sent: "
                "lower --bandwidth or raise --workload"
            )
        self.say(f"virsh domjobabort --postcopy on the source; holding {hold_s:g} s")
        self._must(await self.avirsh("src", "domjobabort", "--postcopy", DOMAIN))
        await self.wait_status("src", ("postcopy-paused",), 15)
        await self.wait_status("dst", ("postcopy-paused",), 15)
        t_paused = time.monotonic()
        await self._first_migrate_end(migration)
        suspend: asyncio.Future[VirshResult] | None = None
        if stop_policy:
            self.say("virsh suspend on the destination (paused-stop through libvirt)")
            suspend = asyncio.ensure_future(
                self.avirsh("dst", "suspend", DOMAIN, timeout_s=LIBVIRT_JOB_WAIT_S + hold_s + 30)
            )
            await asyncio.sleep(1.0)
            state = await self.avirsh("dst", "domstate", "--reason", DOMAIN, timeout_s=5)
            self.libvirt["dst_state_after_suspend_1s"] = state.stdout.strip() or state.error()
            self.say(
                f"destination 1 s after virsh suspend: {state.stdout.strip() or state.error()}"
            )
        for side in ("src", "dst"):
            await self._state_while_paused(side, t_paused + min(hold_s, PAUSED_STATE_WAIT_S))
        await asyncio.sleep(max(0.0, hold_s - (time.monotonic() - t_paused)))
        if suspend is not None and not suspend.done():
            # A recovery started while the suspend waits for libvirt's job lock did not
            # get the destination past postcopy-paused once (virsh migrate
            # --postcopy-resume hung for 80 s): the recovery waits for its answer.
            self.say("waiting for virsh suspend's answer before the recovery")
            await suspend
        event = self.status_events.get(("dst", "postcopy-active"))
        if event is not None:
            event.clear()
        first_returned = migration.done()  # libvirt refuses the resume while it runs
        self.say("virsh migrate --postcopy --postcopy-resume")
        t_resume = time.monotonic()
        resume = asyncio.ensure_future(
            self.avirsh("src", *self._migrate_args(resume=True), timeout_s=timeout_s)
        )
        try:
            await self._wait_or_fail(
                resume, "dst", ("postcopy-active", "completed"), RECOVERY_WAIT_S
            )
        except ScenarioError as err:
            # Not the lab's failure: the management stack could not recover the migration,
            # and the guest is left on a destination missing pages (analysis.lab.outcome).
            if self.steps is not None:
                self.steps.write_stamped(
                    {
                        "type": "recovery_failed",
                        "command": "virsh migrate --postcopy-resume",
                        "waited_s": round(time.monotonic() - t_resume, 1),
                        "paused_for_s": round(time.monotonic() - t_paused, 1),
                        "error": str(err),
                        "first_migrate_returned": first_returned,
                    }
                )
            raise
        if suspend is not None:
            await self._after_suspend(suspend, resume)
        return resume

    async def _first_migrate_end(self, migration: asyncio.Future[VirshResult]) -> None:
        """Wait up to ``RECOVERY_WAIT_S`` for the first ``virsh migrate`` to end once paused;
        keep how (``migrate_when_paused``: its exit status and error, ``rc`` None if none).

        It ends with an error within a tenth of a second of the pause when libvirt's Finish
        phase on the destination waits for the migration's end (QEMU's MIGRATION event tells
        it of the pause). A pause that comes while that phase still waits for an answer of
        the destination's QEMU, whose main loop the pause blocks under TCG, leaves it with
        no answer: libvirt then holds the migration job and refuses ``--postcopy-resume``
        ("being actively monitored by another thread"), and on the destination it never
        marks the domain ``post-copy failed``. The recovery is sent after this wait either
        way, so that libvirt's own answer is in the record.
        """
        done, _ = await asyncio.wait([migration], timeout=RECOVERY_WAIT_S)
        if done:
            first = migration.result()
            self.libvirt["migrate_when_paused"] = {"rc": first.rc, "error": first.error()}
            self.say(f"the first virsh migrate ended: {first.error()}")
            return
        error = f"no answer {RECOVERY_WAIT_S:g} s into the pause"
        self.libvirt["migrate_when_paused"] = {"rc": None, "error": error}
        self.say(f"the first virsh migrate: {error} (libvirt still holds the migration job)")

    async def _state_while_paused(self, side: str, until: float) -> None:
        """libvirt's state of the domain on ``side`` while paused: ``virsh domstate
        --reason`` until it says ``post-copy failed`` or ``until`` (monotonic s) passes.

        libvirt learns of the pause from its own monitor's MIGRATION event, on its own
        time: a first answer of ``running (post-copy)`` on the destination was seen after
        tsprobe's monitor had reported postcopy-paused. Kept: the last answer and when
        (``SIDE_state_while_paused``, ``SIDE_state_after_s``: seconds from the first ask).
        """
        t0 = time.monotonic()
        while True:
            state = await self.avirsh(side, "domstate", "--reason", DOMAIN, timeout_s=5)
            text = state.stdout.strip() or state.error()
            if "post-copy failed" in text or time.monotonic() >= until:
                break
            await asyncio.sleep(0.1)
        self.libvirt[f"{side}_state_while_paused"] = text
        self.libvirt[f"{side}_state_after_s"] = round(time.monotonic() - t0, 2)

    async def _after_suspend(
        self, suspend: asyncio.Future[VirshResult], resume: asyncio.Future[VirshResult]
    ) -> None:
        """Record what libvirt did with the suspend; resume the vCPUs if it stopped them."""
        await resume
        result = await suspend
        state = await self.avirsh("dst", "domstate", "--reason", DOMAIN, timeout_s=10)
        resumed = None
        if state.stdout.strip().startswith("paused"):
            resumed = (await self.avirsh("dst", "resume", DOMAIN)).rc == 0
        self.libvirt["suspend_on_destination"] = {
            "rc": result.rc,
            "answered_after_s": round(result.elapsed_s, 2),
            "error": result.error() if result.rc != 0 else None,
            "state_after_migration": state.stdout.strip() or state.error(),
            "resumed_after": resumed,
        }
        what = "succeeded" if result.rc == 0 else f"failed: {result.error()}"
        self.say(
            f"virsh suspend on the destination {what} after {result.elapsed_s:.1f} s; "
            f"destination then {state.stdout.strip()}"
            + ("; virsh resume sent" if resumed is not None else "")
        )

    # -- the end -----------------------------------------------------------------------------

    def lab_meta(self, started: float) -> dict[str, Any]:
        """The lab section of meta.json, with what libvirt ran and both recordings' view."""
        meta = super().lab_meta(started)
        meta["qemu"] = {n: f"started by libvirt from {p.name}" for n, p in self.xml_paths.items()}
        self.libvirt["commands"] = [
            {"line": c.line(), "rc": c.rc, "elapsed_s": round(c.elapsed_s, 3)}
            for c in self.commands
        ]
        self.libvirt["statuses"] = {
            side: {
                "own_monitor": _statuses(self.out / f"qmp-{side}.jsonl"),
                "virsh_qemu_monitor_event": _statuses(
                    self.out / f"virsh-monitor-{side}" / "qmp-libvirt.jsonl"
                ),
            }
            for side in ("src", "dst")
        }
        meta["libvirt"] = self.libvirt
        return meta

    async def close(self) -> None:
        """Destroy the domain, keep the daemons' and QEMUs' logs, stop the daemons."""
        self._stop_monitor_event_records(wait_s=0)
        for q in self.qemus:
            q.stop()
        for proc in self.watchers:
            lq.kill(proc)
        for name, daemon in self.daemons.items():
            logs = daemon.directory / "log"
            with contextlib.suppress(OSError):
                shutil.copyfile(logs / "libvirtd.log", self.out / f"libvirtd-{name}.log")
            with contextlib.suppress(OSError):
                shutil.copyfile(logs / "qemu" / f"{DOMAIN}.log", self.sockdir / f"qemu-{name}.log")
            daemon.stop()
        await super().close()


def _statuses(path: Path) -> list[str]:
    """The MIGRATION statuses in a ``qmp-*.jsonl``, in order, repeats collapsed."""
    seen: list[str] = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("type") == "event" and record.get("event") == "MIGRATION":
                    status = str((record.get("data") or {}).get("status"))
                    if not seen or seen[-1] != status:
                        seen.append(status)
    return seen


def _utc(real_ns: int) -> str:
    """``14:07:11.684 UTC``."""
    stamp = time.strftime("%H:%M:%S", time.gmtime(real_ns / 1e9))
    return f"{stamp}.{real_ns // 1_000_000 % 1000:03d} UTC"


def _first_match(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
