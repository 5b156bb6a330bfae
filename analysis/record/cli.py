"""``tsprobe record``: the command line of the host-side recorder (analysis.record.recorder).

Every value is checked here before anything starts, and every problem (a malformed
``--qmp``, an unwritable ``--out``, a socket nobody listens on) is printed as one line
``tsprobe: ...`` on stderr: exit status 2 for a usage error, 1 when the recording could not
start. Nothing the user can cause prints a traceback. qemu.qmp's own log messages are
silenced; what matters is in the run directory and the status lines.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import NoReturn

import click

from analysis.errors import RecorderError
from analysis.record.agent_client import check_agent_url
from analysis.record.exporter import ExporterServer, MigrationExporter
from analysis.record.qmp_endpoint import parse_address
from analysis.record.recorder import Recorder, check_name
from probe.durations import parse_duration
from probe.errors import DurationError

EPILOG = """\b
Examples:
  tsprobe record --qmp src=/run/src.qmp --qmp dst=/run/dst.qmp \\
      --agent http://127.0.0.1:9466 --out run1
  tsprobe record --qmp src=127.0.0.1:4444 --qemu-pid src=4711 --duration 2m --out run2
  virsh qemu-monitor-event --domain vm1 --loop --timestamp | \\
      tsprobe record --libvirt-events - --agent guest=http://vm1:9466 --out run3
\b
It stops when the source (the endpoint named src, else the first --qmp) reaches
completed, failed or cancelled, plus --grace; after --duration; or on Ctrl-C.
Then each agent gets up to --drain to report what its samplers and canaries
measured before the end (they send it about once a second); a worker still behind
is written down as an incomplete record in agent-NAME.jsonl and in meta.json.
The run directory is described in docs/run-directory.md. With --listen it also
serves the migration state on /metrics for Prometheus (docs/prometheus.md); keep
--grace above two scrape intervals so the final state is scraped.

Host truth per vCPU: for each --qmp whose QEMU runs on this host (found from a
unix socket's peer, or --qemu-pid for a TCP monitor), every vCPU thread is read
from /proc every --vcpu-poll into vcpu-states.jsonl (--vcpu-poll 0: off).
"""

#: The largest QEMU pid accepted (Linux's PID_MAX_LIMIT).
PID_MAX = 4_194_304


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"tsprobe: {message}", err=True)
    sys.exit(code)


def _pairs(values: tuple[str, ...], option: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, target = value.partition("=")
        if not sep or not name or not target:
            _fail(f"{option} {value!r}: expected NAME={what}, e.g. src=/run/src.qmp", 2)
        if name in out:
            _fail(f"{option}: the name {name!r} is given twice", 2)
        try:
            check_name(name, "endpoint")
        except RecorderError as err:
            _fail(f"{option} {value!r}: {err}", 2)
        out[name] = target
    return out


def _agents(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    unnamed = 0
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or "://" in name:
            unnamed += 1
            name, url = ("guest" if unnamed == 1 else f"guest{unnamed}"), value
        if name in out:
            _fail(f"--agent: the name {name!r} is given twice", 2)
        try:
            check_agent_url(url)
        except RecorderError as err:
            _fail(f"--agent: {err}", 2)
        out[name] = url
    return out


def _libvirt(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, source = value.partition("=")
        if not sep:
            name, source = ("libvirt" if not out else f"libvirt{len(out) + 1}"), value
        if not source:
            _fail(f"--libvirt-events {value!r}: expected FILE, '-' or NAME=FILE", 2)
        if name in out:
            _fail(f"--libvirt-events: the name {name!r} is given twice", 2)
        out[name] = source
    if list(out.values()).count("-") > 1:
        _fail("--libvirt-events: stdin ('-') can be read only once", 2)
    return out


def _duration(value: str | None, option: str, allow_zero: bool = False) -> int | None:
    if value is None:
        return None
    try:
        ns = parse_duration(value)
    except DurationError as err:
        _fail(f"{option}: {err}", 2)
    if ns < 0 or (ns == 0 and not allow_zero):
        _fail(f"{option}: must be positive", 2)
    return ns


def _pids(values: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, text in _pairs(values, "--qemu-pid", "PID").items():
        if not text.isascii() or not text.isdigit() or not 0 < int(text) <= PID_MAX:
            _fail(f"--qemu-pid {name}={text}: the pid must be a number from 1 to {PID_MAX}", 2)
        out[name] = int(text)
    return out


def _quiet_qemu_logs() -> None:
    """Keep qemu.qmp's own log records off the terminal (the recorder prints its status)."""
    for name in ("qemu.qmp", "qemu"):
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


def _serve(
    exporter: MigrationExporter | None, listen: str | None, quiet: bool
) -> ExporterServer | None:
    """With ``--listen``, serve the migration exporter (a refusal is one line, exit 2)."""
    if exporter is None or listen is None:
        return None
    try:
        server = exporter.serve(listen)
    except RecorderError as err:
        _fail(str(err), 2)
    if not quiet:
        click.echo(f"serving the migration state on http://{server.address}/metrics")
    return server


async def _record(recorder: Recorder) -> str:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, recorder.stop, sig.name)
    result = await recorder.run()
    return result.stop_reason


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--qmp",
    "qmp",
    multiple=True,
    metavar="NAME=SOCKET",
    help="A QMP monitor to record: unix socket path or HOST:PORT (repeatable).",
)
@click.option(
    "--agent",
    "agents",
    multiple=True,
    metavar="[NAME=]URL",
    help="A guest agent's base URL, e.g. http://127.0.0.1:9466 (repeatable).",
)
@click.option("--out", "out", metavar="RUNDIR", help="The run directory to create.  [required]")
@click.option("--poll", default="100ms", show_default=True, help="query-migrate period.")
@click.option(
    "--grace", default="5s", show_default=True, help="Go on this long after the migration ends."
)
@click.option("--duration", default=None, help="Stop after this long.")
@click.option(
    "--qmp-timeout",
    default="1s",
    show_default=True,
    help="A QMP command slower than this is recorded as a timeout.",
)
@click.option("--reconnect", is_flag=True, help="Reconnect when a QMP socket reappears.")
@click.option(
    "--no-enable-events",
    is_flag=True,
    help="Never turn the 'events' migration capability on (poll only if it is off).",
)
@click.option(
    "--libvirt-events",
    "libvirt",
    multiple=True,
    metavar="[NAME=]FILE|-",
    help="Output of 'virsh qemu-monitor-event --loop --timestamp' (a file or stdin).",
)
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    help="Also serve the migration state on http://HOST:PORT/metrics (Prometheus).",
)
@click.option(
    "--vcpu-poll",
    default="10ms",
    show_default=True,
    help="Period of the host-side vCPU thread sampler (0: off).",
)
@click.option(
    "--qemu-pid",
    "qemu_pid",
    multiple=True,
    metavar="NAME=PID",
    help="The pid of --qmp NAME's QEMU, where its monitor is not a unix socket (repeatable).",
)
@click.option(
    "--drain",
    default="10s",
    show_default=True,
    help="At the end, wait at most this long for the agents' samplers and canaries to "
    "report what they measured before it (0: do not wait).",
)
@click.option("--quiet", "-q", is_flag=True, help="No status lines.")
def record(
    qmp: tuple[str, ...],
    agents: tuple[str, ...],
    out: str | None,
    poll: str,
    grace: str,
    duration: str | None,
    qmp_timeout: str,
    reconnect: bool,
    no_enable_events: bool,
    libvirt: tuple[str, ...],
    listen: str | None,
    vcpu_poll: str,
    qemu_pid: tuple[str, ...],
    drain: str,
    quiet: bool,
) -> None:
    """Record a migration: both QMP monitors, the guest agents, into a run directory.

    Every QMP event with QEMU's timestamp and the host's receive times, query-migrate and
    query-status every --poll, the agents' events and /clock samples. One status line is
    printed per migration phase change.
    """
    if not out or not out.strip():
        _fail("--out RUNDIR is required (and must not be blank)", 2)
    qmp_map = _pairs(qmp, "--qmp", "SOCKET")
    for name, target in qmp_map.items():
        try:
            parse_address(target)
        except RecorderError as err:
            _fail(f"--qmp {name}: {err}", 2)
    libvirt_map = _libvirt(libvirt)
    agent_map = _agents(agents)
    poll_ns = _duration(poll, "--poll")
    grace_ns = _duration(grace, "--grace", allow_zero=True)
    timeout_ns = _duration(qmp_timeout, "--qmp-timeout")
    duration_ns = _duration(duration, "--duration")
    vcpu_poll_ns = _duration(vcpu_poll, "--vcpu-poll", allow_zero=True)
    drain_ns = _duration(drain, "--drain", allow_zero=True)
    pid_map = _pids(qemu_pid)
    assert vcpu_poll_ns is not None and drain_ns is not None
    assert poll_ns is not None and grace_ns is not None and timeout_ns is not None
    _quiet_qemu_logs()
    exporter = None
    if listen is not None:
        exporter = MigrationExporter([*qmp_map, *libvirt_map], agent_map, run=out)
    try:
        recorder = Recorder(
            out,
            qmp=qmp_map,
            agents=agent_map,
            libvirt_events=libvirt_map,
            poll_ns=poll_ns,
            grace_ns=grace_ns,
            duration_ns=duration_ns,
            command_timeout_ns=timeout_ns,
            connect_timeout_ns=max(5_000_000_000, timeout_ns),
            reconnect=reconnect,
            enable_events=not no_enable_events,
            status_stream=None if quiet else sys.stdout,
            on_record=None if exporter is None else exporter.observe,
            vcpu_poll_ns=vcpu_poll_ns,
            qemu_pids=pid_map,
            drain_ns=drain_ns,
        )
    except RecorderError as err:
        _fail(str(err), 2)
    server = _serve(exporter, listen, quiet)
    try:
        asyncio.run(_record(recorder))
    except RecorderError as err:
        _fail(str(err), 1)
    finally:
        if server is not None:
            server.close()
