"""The scenario's own QMP monitor of one QEMU: every command with a timeout, every command logged.

The recorder holds one monitor of each QEMU; the lab drives QEMU through a second one
(``Control``). While postcopy is paused the destination's monitor can hang (its main
loop waits on a vCPU stuck on a missing page), so every command has a timeout and the
ones that must get through there are sent out of band (``exec-oob``). Each command, with
its reply, error or timeout and its host times, is a record of lab-steps.jsonl, which
the analysis reads (a ``stop`` command dates the freeze it caused).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from analysis.lab.errors import QemuError, ScenarioError
from analysis.lab.spec import Say
from analysis.rundir import JsonlWriter, host_now


class Control:
    """The scenario's own QMP monitor of one QEMU: commands with timeouts, logged."""

    def __init__(self, name: str, socket_path: Path, steps: JsonlWriter, say: Say) -> None:
        self.name = name
        self.socket_path = socket_path
        self.steps = steps
        self.say = say
        self.client = QMPClient(f"lab-{name}")

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and negotiate (OOB is enabled when QEMU offers it).

        :raise QemuError: when the monitor does not answer in time.
        """
        try:
            await asyncio.wait_for(self.client.connect(str(self.socket_path)), timeout_s)
        except (OSError, QMPError, TimeoutError) as err:
            raise QemuError(f"{self.name}: cannot connect to {self.socket_path}: {err}") from err

    async def cmd(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout_s: float = 10.0,
        oob: bool = False,
        check: bool = True,
    ) -> Any:
        """Run a command; log it (reply, error or timeout) to lab-steps.jsonl.

        :raise ScenarioError: on an error reply or a timeout (when ``check``).
        :return: the command's return value, or None after a tolerated failure.
        """
        real0, mono0 = host_now()
        record: dict[str, Any] = {
            "type": "command",
            "endpoint": self.name,
            "command": command,
            "arguments": arguments or {},
            "oob": oob,
            "host_real_ns": real0,
            "host_mono_ns": mono0,
        }
        try:
            result = await asyncio.wait_for(
                self.client.execute(command, arguments, oob=oob), timeout_s
            )
        except TimeoutError as err:
            record.update(outcome="timeout", timeout_s=timeout_s)
            self._log(record, mono0)
            if check:
                raise ScenarioError(
                    f"{self.name}: {command} got no answer within {timeout_s:g} s"
                ) from err
            return None
        except QMPError as err:
            record.update(outcome="error", error=str(err))
            self._log(record, mono0)
            if check:
                raise ScenarioError(f"{self.name}: {command} failed: {err}") from err
            return None
        record.update(outcome="reply", **{"return": result})
        self._log(record, mono0)
        return result

    def _log(self, record: dict[str, Any], mono0: int) -> None:
        record["elapsed_ns"] = time.monotonic_ns() - mono0
        self.steps.write(record)

    async def close(self) -> None:
        """Disconnect (never raises)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.disconnect(), 2.0)
