"""``tsprobe agent``: the command line of the in-guest agent.

Flags follow DESIGN.md; each built-in probe has an enable flag (``--stall/--no-stall``) and
its options under its name (``--stall-mode``, ``--clock-period``), as node_exporter does
with its collectors. Durations are typed as users write them (``500us``, ``2ms``, ``1.5s``)
and parsed by ``probe.durations``; a bad value is one line naming the flag, never a
traceback.

The probes are built by factories that import their modules only when the probe is
enabled, so this module imports nothing of them at load time. A probe whose module is
missing or whose constructor fails is reported as down at startup and in /healthz; the
agent runs with the others. A constructor that rejects a flag value (``ValueError``) is a
usage error instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from agent.config import AgentConfig, resolve_cpus
from agent.errors import AgentError, ConfigError, ListenError
from agent.http import DEFAULT_LISTEN, parse_listen
from agent.main import Agent
from agent.metrics import DEFAULT_WARNING_KINDS
from agent.registry import PROBES, Factory, Option, load
from probe.base import Probe
from probe.canary import DEFAULT_CANARIES, parse_canaries
from probe.durations import parse_duration, parse_duration_list
from probe.errors import LogSpecError, ProbeUnavailable
from probe.procfs import parse_cpu_list
from probe.roots import Roots

if TYPE_CHECKING:
    # click >= 8.2 makes ParamType generic; older releases (Debian 12 ships 8.1) do not.
    _AnyBase = click.ParamType[Any, Any]
    _NamesBase = click.ParamType[tuple[str, ...], Any]
    _TextBase = click.ParamType[str, Any]
else:
    _AnyBase = _NamesBase = _TextBase = click.ParamType

ROOT_SPOOL = "/var/lib/tsprobe/events.jsonl"
#: The most events --events-ring may keep in memory (a few hundred bytes each).
MAX_RING = 10_000_000
USER_SPOOL = "tsprobe-events.jsonl"


class ParsedType(_AnyBase):
    """A value parsed from text by one of ``probe``'s parsers; a parse error is one line.

    :param name: the metavar shown in --help.
    :param parse: text -> value; raises ValueError (DurationError, ParseError) when invalid.
    :param parsed: the type of an already converted value (defaults), passed through.
    """

    def __init__(self, name: str, parse: Callable[[str], Any], parsed: type) -> None:
        self.name = name
        self._parse = parse
        self._parsed = parsed

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self._parsed):
            return value
        try:
            return self._parse(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


class CanariesType(_NamesBase):
    """``none`` or a comma-separated list of canary names (``probe.canary.parse_canaries``)."""

    name = "CANARIES"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_canaries(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


class LogSpecType(_TextBase):
    """A ``PATH:REGEX[:NAME]`` log-watch specification, checked (``probe.logwatch``)."""

    name = "PATH:REGEX[:NAME]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            _load("probe.logwatch", "parse_log_spec")(text)
        except LogSpecError as err:
            self.fail(str(err), param, ctx)
        return text


def _check_listen(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        parse_listen(value)
    except ListenError as err:
        raise click.BadParameter(str(err), ctx, param) from err
    return value


def check_spool_path(path: str) -> str:
    """Check an explicit --events path before anything starts: its directory must exist
    (only the default spool's directory is created), and it must not be a directory.

    :param path: the --events value.
    :raise click.BadParameter: naming --events, in one line.
    :return: the path.
    """
    shown = path if len(path) <= 80 else f"{path[:60]}...({len(path)} characters)"

    def fail(reason: str) -> NoReturn:
        raise click.BadParameter(f"{shown!r}: {reason}", param_hint="--events")

    if not path.strip():
        fail("empty (write 'none' to keep events in memory only)")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        if os.path.exists(parent) and not os.path.isdir(parent):
            fail(f"{parent[:80]!r} is not a directory")
        if not os.path.isdir(parent):
            fail(f"the directory {parent[:80]!r} does not exist (it is not created)")
        if os.path.isdir(path):
            fail("is a directory; give a file name")
    except OSError as err:  # ENAMETOOLONG and the like
        fail(err.strerror or str(err))
    return path


def default_spool_path() -> str:
    """Where the spool goes without --events: the state directory as root, else the cwd.

    :return: an absolute path.
    """
    if os.geteuid() == 0:
        return ROOT_SPOOL
    return os.path.abspath(USER_SPOOL)


# -- probes ------------------------------------------------------------------------------


def _load(module: str, attr: str) -> Any:
    return load(module, attr)


#: The built-in probes' factories, by name, in start order (``agent.registry.PROBES``);
#: a probe that rides another (the heartbeat) is built by its carrier's.
FACTORIES: dict[str, Factory] = {spec.name: spec.build for spec in PROBES if not spec.rides}


def build_probes(
    config: AgentConfig, roots: Roots, cpus: list[int]
) -> tuple[list[Probe], dict[str, str]]:
    """Build the enabled probes.

    :param config: the settings (which probes, and their options).
    :param roots: where /proc, /sys and /dev are.
    :param cpus: the resolved CPUs to sample.
    :raise ConfigError: when a probe rejects a setting (its constructor's ValueError).
    :return: (probes, name -> why a probe could not be built).
    """
    probes: list[Probe] = []
    unavailable: dict[str, str] = {}
    for name, factory in FACTORIES.items():
        if not config.enabled(name):
            continue
        try:
            probes.append(factory(config, roots, cpus))
        except ImportError as err:
            unavailable[name] = f"not available in this install ({err})"
        except ProbeUnavailable as err:
            unavailable[name] = str(err)
        except ValueError as err:
            raise ConfigError(f"{name} probe: {err}") from err
        except Exception as err:
            unavailable[name] = f"could not be set up: {err!r}"
    return probes, unavailable


def warning_kinds() -> tuple[str, ...]:
    """The kernel warning kinds the kmsg probe knows, or a built-in list without it.

    :return: the kinds exported from the start.
    """
    try:
        kinds = _load("probe.kmsg_patterns", "WARNING_KINDS")
    except (ImportError, AttributeError):
        return DEFAULT_WARNING_KINDS
    return tuple(str(kind) for kind in kinds)


def run_agent(config: AgentConfig) -> str:
    """Build the probes, start the agent, run it, stop it.

    :param config: the settings.
    :raise AgentError: when the agent cannot start (the CLI prints it as one line).
    :return: why the agent stopped.
    """
    roots = config.roots()
    cpus = resolve_cpus(config.cpus, roots)
    probes, unavailable = build_probes(config, roots, cpus)
    agent = Agent(config, probes, roots, unavailable=unavailable, warning_kinds=warning_kinds())
    with agent.stopping_on_signals():
        agent.start()
        try:
            return agent.run(config.duration_ns)
        finally:
            agent.stop()


DURATION = ParsedType("DURATION", parse_duration, int)
EPILOG = """\b
Examples:
  tsprobe agent --duration 10s --events none
  tsprobe agent --cpus 0-3 --threshold 50ms --listen 127.0.0.1:9466
  tsprobe agent --canaries timer,heartbeat,rpc --timeouts 10ms,100ms,1s,5s,30s
  tsprobe agent --watch-log '/var/log/app.log:deadline exceeded|DEADLINE_EXCEEDED:grpc'
  curl -s 'http://127.0.0.1:9466/events?since=0&limit=100'
\b
Endpoints: /metrics (Prometheus), /events?since=SEQ&limit=N (JSON Lines),
/clock (guest clocks, JSON), /healthz (probe health, JSON).
"""


def _check_periods(interval: int, threshold: int, stall_mode: str, **periods: int) -> None:
    """Every period positive, and in tick mode a threshold longer than the interval.

    :param periods: the probes' duration options by parameter name (``clock_period`` ->
        --clock-period).
    :raise click.BadParameter: naming the option.
    """
    if interval <= 0:
        raise click.BadParameter("must be positive", param_hint="--interval")
    if stall_mode == "tick" and threshold <= interval:
        raise click.BadParameter(
            "must be longer than --interval (a gap is measured in sampler periods)",
            param_hint="--threshold",
        )
    for name, value in periods.items():
        if value <= 0:
            raise click.BadParameter("must be positive", param_hint="--" + name.replace("_", "-"))


def _option_flag(option: Option) -> Callable[[Any], Any]:
    """One probe option as a click option (``agent.registry.Option``)."""
    if option.kind == "switch":
        return click.option(
            f"--{option.flag}/--no-{option.flag}",
            option.param,
            default=bool(option.default),
            show_default=True,
            help=option.help,
        )
    kind: Any = DURATION if option.kind == "duration" else click.Choice(list(option.choices))
    return click.option(
        f"--{option.flag}",
        option.param,
        type=kind,
        default=option.default,
        show_default=True,
        help=option.help,
    )


def _probe_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Add every registered probe's switch and options, in registry order."""
    flags: list[Callable[[Any], Any]] = []
    for spec in PROBES:
        if spec.switch == "flag":
            flags.append(
                click.option(
                    f"--{spec.name}/--no-{spec.name}",
                    spec.name,
                    default=True,
                    show_default=True,
                    help=spec.help,
                )
            )
        flags.extend(_option_flag(option) for option in spec.options)
    for flag in reversed(flags):
        command = flag(command)
    return command


def _probe_settings(params: dict[str, Any]) -> tuple[frozenset[str], dict[str, Any]]:
    """(switched-off probes, options by key) from the command line's parameters."""
    off = frozenset(s.name for s in PROBES if s.switch == "flag" and not params.pop(s.name))
    options = {o.key: params.pop(o.param) for s in PROBES for o in s.options}
    return off, options


def _events_path(events: str | None) -> str | None:
    """``--events``: the default spool, ``none`` for none, or a checked path."""
    if events is None:
        return default_spool_path()
    if events.strip().lower() == "none":
        return None
    return check_spool_path(events)


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--cpus",
    type=ParsedType("CPUS", lambda text: tuple(parse_cpu_list(text)), tuple),
    default=None,
    help="CPUs to sample, e.g. 0,1 or 0-3.  [default: all online]",
)
@click.option("--interval", type=DURATION, default="1ms", show_default=True, help="Sampler period.")
@click.option(
    "--threshold",
    type=DURATION,
    default="2ms",
    show_default=True,
    help="Shortest gap recorded as a stall.",
)
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    callback=_check_listen,
    metavar="HOST:PORT",
    help="HTTP address (port 0 picks a free port).",
)
@click.option(
    "--events",
    "events",
    default=None,
    metavar="PATH|none",
    help=f"Event spool (JSON Lines, rotated); 'none' keeps events in memory only.  "
    f"[default: {ROOT_SPOOL} as root, else ./{USER_SPOOL}]",
)
@click.option(
    "--events-ring",
    type=click.IntRange(min=1, max=MAX_RING),
    default=100_000,
    show_default=True,
    help="Newest events kept in memory for /events.",
)
@click.option(
    "--timeouts",
    type=ParsedType("DURATIONS", lambda text: tuple(parse_duration_list(text)), tuple),
    default="10ms,100ms,1s,5s,30s",
    show_default=True,
    help="The timeout ladder.",
)
@click.option(
    "--canaries",
    type=CanariesType(),
    default=",".join(DEFAULT_CANARIES),
    show_default=True,
    help="Canaries: timer, heartbeat, rpc, or none.",
)
@click.option(
    "--watch-log",
    "watch_logs",
    type=LogSpecType(),
    multiple=True,
    help="Count lines of PATH matching REGEX as application timeouts named NAME (repeatable;"
    " followed like tail -F). PATH ends at the first ':'; NAME is the text after the last"
    " ':' when it is a plain name (letters, digits, _, -, spaces), else there is none and"
    " the rest is REGEX. Write '\\:' for a colon the rule would misread.",
)
@click.option("--duration", type=DURATION, default=None, help="Run this long, then exit.")
@_probe_flags
@click.option("--path.procfs", "procfs", default="/proc", show_default=True, help="procfs root.")
@click.option("--path.sysfs", "sysfs", default="/sys", show_default=True, help="sysfs root.")
@click.option("--path.devfs", "devfs", default="/dev", show_default=True, help="devfs root.")
def agent(
    cpus: tuple[int, ...] | None,
    interval: int,
    threshold: int,
    listen: str,
    events: str | None,
    events_ring: int,
    timeouts: tuple[int, ...],
    canaries: tuple[str, ...],
    watch_logs: tuple[str, ...],
    duration: int | None,
    procfs: str,
    sysfs: str,
    devfs: str,
    **probe_params: Any,
) -> None:
    """Run the in-guest agent: per-CPU stalls, clock steps, kernel warnings, timeouts.

    The canaries (--canaries) measure what applications with deadlines feel: timed waits
    (timer), heartbeats between two CPUs (heartbeat), loopback requests (rpc); each counts
    the timeouts of the ladder (--timeouts) that would have expired; --watch-log counts the
    timeouts applications write to their logs.

    It serves /metrics, /events, /clock and /healthz over HTTP and writes every event to a
    rotated JSON Lines spool. It runs until --duration elapses or SIGINT/SIGTERM.
    """
    off, options = _probe_settings(probe_params)
    _check_periods(
        interval,
        threshold,
        options["stall_mode"],
        **{o.param: options[o.key] for s in PROBES for o in s.options if o.kind == "duration"},
    )
    config = AgentConfig(
        cpus=cpus,
        interval_ns=interval,
        threshold_ns=threshold,
        listen=listen,
        events_path=_events_path(events),
        timeouts_ns=timeouts,
        canaries=canaries,
        watch_logs=watch_logs,
        duration_ns=duration,
        off=off,
        options=options,
        procfs=procfs,
        sysfs=sysfs,
        devfs=devfs,
        ring_size=events_ring,
    )
    try:
        run_agent(config)
    except AgentError as err:
        raise click.ClickException(str(err)) from err
