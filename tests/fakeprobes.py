"""Tiny stand-ins for the probes, to test the agent's plumbing without samplers or /dev."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probe.base import Emit, Health
from probe.events import RawEvent
from probe.roots import Roots

FIXTURE_ROOTS_DIR = Path(__file__).parent / "fixtures" / "roots"
FIXTURE_ROOTS = Roots(
    str(FIXTURE_ROOTS_DIR / "proc"), str(FIXTURE_ROOTS_DIR / "sys"), str(FIXTURE_ROOTS_DIR / "dev")
)
FIXTURE_BOOT_ID = "6c1f0d3e-4b2a-4e8f-9a71-2d5c8b0e9f14"


class EventSink:
    """Collects what a real probe emits from its threads (the probe's ``emit``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[RawEvent] = []

    def emit(self, event: RawEvent) -> None:
        with self._lock:
            self._events.append(event)

    def events(self, kind: str | None = None) -> list[RawEvent]:
        with self._lock:
            return [e for e in self._events if kind is None or e.kind == kind]


class FakeProbe:
    """A probe that reports fixed health and emits what the test tells it to."""

    def __init__(self, name: str, health: Mapping[str, Health] | None = None) -> None:
        self.name = name
        self._health = dict(health) if health is not None else {name: Health(True)}
        self.emit: Emit | None = None
        self.started = 0
        self.stopped = 0

    def start(self, emit: Emit) -> None:
        self.emit = emit
        self.started += 1

    def stop(self) -> None:
        self.stopped += 1

    def health(self) -> Mapping[str, Health]:
        return self._health

    def send(self, kind: str, duration_ns: int | None = None, **fields: Any) -> None:
        """Emit an event stamped with made-up but plausible clock readings."""
        assert self.emit is not None, "probe not started"
        self.emit(RawEvent(kind, 1_000_000_000, 1_767_225_600_000_000_000, duration_ns, fields))


class FakeStall(FakeProbe):
    def __init__(self, samples: Mapping[int, int]) -> None:
        super().__init__("stall")
        self._samples = dict(samples)

    def samples(self) -> dict[int, int]:
        return dict(self._samples)

    def notes(self) -> list[str]:
        return []


@dataclass(frozen=True)
class FakeSync:
    """Shaped like probe.adjtimex.AdjtimexState where the agent reads it."""

    synchronised: bool
    maxerror_ns: int


class FakeClock(FakeProbe):
    def __init__(self, host_offset_ns: int | None = None, sync: FakeSync | None = None) -> None:
        super().__init__(
            "clock",
            {
                "clock": Health(True),
                "adjtimex": Health(True),
                "ptp": Health(False, "no KVM virtual PTP device"),
            },
        )
        self._offset = host_offset_ns
        self._sync = sync

    def clocksource(self) -> str | None:
        return "kvm-clock"

    def host_offset_ns(self) -> int | None:
        return self._offset

    def sync_state(self) -> FakeSync | None:
        return self._sync


class FakeKmsg(FakeProbe):
    def __init__(self, lost: int = 0) -> None:
        super().__init__("kmsg")
        self._lost = lost

    def lost(self) -> int:
        return self._lost


class BrokenHealth(FakeProbe):
    """A probe whose health() raises, as a buggy probe might."""

    def health(self) -> Mapping[str, Health]:
        raise RuntimeError("health exploded")
