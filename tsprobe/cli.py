"""Command-line entry point: a click group that imports each subcommand lazily.

Each subcommand is registered as ``"module:attribute"``; the module is imported only when
the command is invoked or its ``--help`` is asked for. A command whose module cannot be
imported (a guest without the host extras) fails with one line naming the missing package
and the extra that provides it.

Two rules hold for every command, here, once:

- Every argument must be valid UTF-8. tsprobe writes what it is given into JSON and
  reports (paths, names, command lines), which must be UTF-8; an argument that is not
  (``sys.argv`` holds its bytes as lone surrogates) is a usage error naming its position.
- An ``OSError`` that reaches the command line (a path too long for the kernel, a
  directory where a file was expected, no permission) is one line, ``Error: PATH: reason``,
  exit 1: the system said no, and its reason is the message. Commands still check their
  options first; this is the net under them, not a substitute.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from probe import __version__

#: name -> (module:attribute, one-line help shown in ``tsprobe --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("agent.cli:agent", "Run the in-guest measurement agent."),
    "record": ("analysis.record.cli:record", "Record a migration: QMP on both sides, the agents."),
    "timeline": ("analysis.analyze.cli:timeline", "Print the migration phases of a run."),
    "lab": ("analysis.lab.cli:lab", "Build the lab guest and run migration scenarios."),
    "report": ("analysis.report.cli:report", "Write report.html, report.md, summary.json."),
    "compare": ("analysis.report.compare_cli:compare", "Compare runs side by side."),
}


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = COMMANDS.get(cmd_name)
        if spec is None:
            return None
        module_name, attr = spec[0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            missing = getattr(err, "name", None) or str(err)
            if missing.split(".")[0] in ("probe", "agent", "analysis", "tsprobe"):
                raise  # our own bug, not a missing extra: let it show
            raise click.ClickException(
                f"'{cmd_name}' needs the Python package {missing!r}, which is not installed "
                "(host commands need: pip install 'tsprobe[host]')"
            ) from err
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        for position, arg in enumerate(args, 1):
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:
                shown = arg.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
                raise click.UsageError(
                    f"argument {position} ({shown[:60]!r}) is not valid UTF-8", ctx
                ) from None
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise  # click's own handling: a closed stdout (| head) is not an error
        except OSError as err:
            raise click.ClickException(os_error_line(err)) from err

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def agent_command(port: int, events: str | os.PathLike[str], *args: str) -> list[str]:
    """The command line that runs ``tsprobe agent`` with this interpreter, on
    127.0.0.1:``port``, its events spooled to ``events`` (the demo and the tests start it so).

    :param args: more flags.
    """
    listen = f"127.0.0.1:{port}"
    return [
        sys.executable,
        "-m",
        "tsprobe.cli",
        "agent",
        "--listen",
        listen,
        "--events",
        os.fspath(events),
        *args,
    ]


def os_error_line(err: OSError) -> str:
    """One line for an OSError: ``PATH: reason``, the path shortened.

    :param err: the error.
    :return: the line.
    """
    reason = err.strerror or str(err) or type(err).__name__
    name = err.filename
    if name is None:
        return reason
    text = os.fsdecode(name) if isinstance(name, bytes) else str(name)
    if len(text) > 80:
        text = f"{text[:60]}...({len(text)} characters)"
    return f"{text}: {reason}"


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tsprobe")
def main() -> None:
    """tsprobe: what a guest's applications felt during a live migration.

    \b
    In the guest:   tsprobe agent --duration 10s
    On the host:    tsprobe record --qmp src=/run/src.qmp --agent http://guest:9466 --out run1
    """


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
