"""Option values shared by the host commands: output directories and sizes.

One checker per kind of value, so that ``record``, ``report``, ``compare``, ``lab run`` and
``lab study`` accept and refuse the same things, each naming its option:

- An output directory (``--out``) is not empty or blank: ``--out ""`` used to write into
  the current directory. Whether it can be created is for the command to find out (the
  command line turns the system's refusal into one line).
- The guest agent's canaries (``--canaries`` of ``lab run`` and ``lab study``) are
  checked by the probe's own parser (``probe.canary.parse_canaries``), so the lab and the
  agent accept the same names without the host side importing the agent.
- A size (``512M``, ``64M``, ``50M``; K, M, G are powers of 1024, a trailing ``B`` or
  ``iB`` is allowed) is a finite, non-negative number of ASCII digits, at most
  ``MAX_SIZE`` bytes (1 TiB): ``nan``, ``inf`` and 400-digit sizes used to overflow.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from probe.canary import parse_canaries

#: The most vCPUs a lab guest may have (QEMU's q35 machine takes up to 288; a TCG lab
#: guest with more than a few is already slow).
MAX_VCPUS = 255
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
#: The largest size accepted: 1 TiB.
MAX_SIZE = 1 << 40
_SIZE = re.compile(r"^([0-9]{1,20}(?:\.[0-9]{0,9})?)([KMG]?)$")


def _shown(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:40]}...({len(text)} characters)"


def parse_size(text: str, option: str) -> int:
    """Parse a size such as ``512M`` into bytes.

    :param text: the size.
    :param option: the option's name, for the message.
    :raise click.BadParameter: when it is not such a size or above ``MAX_SIZE``.
    :return: the size in bytes.
    """
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    match = _SIZE.match(value)
    if match is None:
        raise click.BadParameter(f"not a size: {_shown(text)!r} (e.g. 512M)", param_hint=option)
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2)])
    if size > MAX_SIZE:
        raise click.BadParameter(f"{_shown(text)!r}: more than 1 TiB", param_hint=option)
    return size


class OutDir(click.Path):
    """A ``--out`` directory: a ``click.Path`` giving a ``Path``, refusing an empty or
    blank value (click's Path would turn ``""`` into ``.``).

    :param kwargs: passed to ``click.Path`` (``file_okay=False``, ...).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(path_type=Path, **kwargs)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("must name a directory, not an empty or blank string", param, ctx)
        return super().convert(value, param, ctx)


def check_canaries(
    ctx: click.Context | None, param: click.Parameter | None, value: Any
) -> tuple[str, ...]:
    """A ``--canaries`` value as canary names (a click callback; ``()`` for ``none``).

    :raise click.BadParameter: when ``probe.canary.parse_canaries`` refuses it.
    :return: the names; a tuple (an already converted value) is passed through.
    """
    if isinstance(value, tuple):
        return value
    try:
        return parse_canaries(str(value))
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
