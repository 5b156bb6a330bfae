"""A hand-built run directory whose analysis is known exactly (used by the analysis tests).

Host times are offsets from ``BASE``. The migration (QMP, both sides): setup at 1.0 s,
precopy from 1.01 s, the source's STOP at 3.0 s and the destination's RESUME at 3.1 s
(switchover, 100 ms), postcopy-active to 4.0 s, postcopy-paused to 6.0 s,
postcopy-recover to 6.01 s, postcopy-active to 9.0 s, completed.

The guest's monotonic clock reads host time + 100 s until the stop and 100 ms less after
it (a kvm-clock freeze of the stop's length). Clock samples every 0.5 s with a 2 ms round
trip, none between 3.0 s and 6.5 s (the agent is unreachable while paused).

Stalls (host start, length, CPUs): 2.0 s 20 ms CPU 1 (precopy); 4.5 s 1 s CPU 1
(postcopy-paused, CPU 0 runs); 7.0 s 50 ms CPU 0; 8.0 s 200 ms CPUs 0 and 1
(postcopy-active #2). A timer canary timeout (100 ms) at 5.0 s on CPU 1 and a soft
lockup warning at 5.2 s, both in postcopy-paused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BASE = 1_795_640_000_000_000_000
S = 1_000_000_000
MS = 1_000_000
BOOT = "11111111-2222-3333-4444-555555555555"
STOP, RESUME = 3 * S, 3 * S + 100 * MS


def mono(host_offset: int) -> int:
    """Guest monotonic at a host offset (the guest lost the stop's 100 ms)."""
    return host_offset + 100 * S - (100 * MS if host_offset >= RESUME else 0)


def qmp_event(name: str, t: int, status: str | None = None) -> dict[str, Any]:
    """A QMP event record at host offset ``t``."""
    t += BASE
    rec: dict[str, Any] = {
        "type": "event",
        "event": name,
        "timestamp": {"seconds": t // S, "microseconds": t % S // 1000},
        "host_real_ns": t + 100_000,
        "host_mono_ns": t,
    }
    if status is not None:
        rec["data"] = {"status": status}
    return rec


def guest_event(seq: int, kind: str, host_offset: int, **fields: Any) -> dict[str, Any]:
    """A guest event whose start is at a host offset."""
    m = mono(host_offset)
    return {"v": 1, "seq": seq, "boot_id": fields.pop("boot_id", BOOT), "kind": kind,
            "mono_ns": m, "real_ns": m + BASE - 100 * S, **fields}  # fmt: skip


STALLS = [  # (host start offset, length, cpu)
    (2 * S, 20 * MS, 1),
    (4500 * MS, 1 * S, 1),
    (7 * S, 50 * MS, 0),
    (8 * S, 200 * MS, 0),
    (8 * S, 200 * MS, 1),
]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))


def build_run(run: Path, guest: bool = True, qmp: bool = True) -> Path:
    """Write the hand-built run into ``run`` (see the module docstring)."""
    run.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "tsprobe-run", "format_version": 1, "start": {"real_ns": BASE + S // 2},
            "end": {"real_ns": BASE + 10 * S}, "agents": {"guest": {}}}  # fmt: skip
    (run / "meta.json").write_text(json.dumps(meta))
    if qmp:
        src = [
            qmp_event("MIGRATION", 1 * S, "setup"),
            qmp_event("MIGRATION", 1010 * MS, "active"),
            qmp_event("MIGRATION", STOP - 100_000, "postcopy-active"),
            qmp_event("STOP", STOP),
            qmp_event("MIGRATION", 4 * S, "postcopy-paused"),
            qmp_event("MIGRATION", 6 * S, "postcopy-recover"),
            qmp_event("MIGRATION", 6010 * MS, "postcopy-active"),
            qmp_event("MIGRATION", 9 * S, "completed"),
        ]
        dst = [
            qmp_event("MIGRATION", 1005 * MS, "active"),
            qmp_event("RESUME", RESUME),
            qmp_event("MIGRATION", 4 * S, "postcopy-paused"),
            qmp_event("MIGRATION", 6 * S, "postcopy-recover"),
            qmp_event("MIGRATION", 6010 * MS, "postcopy-active"),
            qmp_event("MIGRATION", 9 * S, "completed"),
        ]
        write_jsonl(run / "qmp-src.jsonl", src)
        write_jsonl(run / "qmp-dst.jsonl", dst)
    if guest:
        config = {"threshold_ns": 2 * MS, "interval_ns": MS,
                  "timeouts_ns": [10 * MS, 100 * MS, 1 * S]}  # fmt: skip
        events = [guest_event(1, "agent_start", 600 * MS, agent_id="a1", cpus=[0, 1],
                              config=config, clocksource="kvm-clock")]  # fmt: skip
        seq = 2
        for start, length, cpu in STALLS:
            events.append(guest_event(seq, "stall", start, duration_ns=length, cpu=cpu,
                                      cause="vcpu-blocked"))  # fmt: skip
            seq += 1
        events.append(guest_event(seq, "timeout", 5 * S, canary="timer", timeout_ns=100 * MS,
                                  cpu=1))  # fmt: skip
        events.append(guest_event(seq + 1, "kernel_warning", 5200 * MS, warning="soft_lockup",
                                  cpu=1, text="watchdog: BUG: soft lockup"))  # fmt: skip
        write_jsonl(run / "guest-events.jsonl", events)
        samples = []
        for k in range(1, 20):
            t = k * 500 * MS
            if STOP <= t < 6500 * MS:
                continue
            h = BASE + t
            m = mono(t)
            samples.append({"agent": "guest", "reason": "periodic",
                            "host_send_real_ns": h - MS, "host_recv_real_ns": h + MS,
                            "clock": {"monotonic_ns": m, "realtime_ns": m + BASE - 100 * S,
                                      "boot_id": BOOT, "agent_id": "a1"}})  # fmt: skip
        write_jsonl(run / "clock-samples.jsonl", samples)
    return run
