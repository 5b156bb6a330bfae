"""The lab's ports: each QEMU forward gets a port of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from analysis.lab.qemu import QemuSpec, free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_guest_specs_forward_ports_of_their_own() -> None:
    # Source and destination of a migration, each with an agent and a hooks forward.
    specs = [QemuSpec(name, cast(Any, None), Path("/nonexistent")) for name in ("src", "dst")]
    ports = [port for spec in specs for port in (spec.agent_port, spec.hooks_port)]
    assert len(set(ports)) == 4
