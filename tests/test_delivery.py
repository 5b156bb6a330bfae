"""How late events reach the recorder (analysis.analyze.delivery), on a live agent.

The agent runs on this machine, so its clocks are the host's: an event's end read from its
own CLOCK_REALTIME fields is an independent reading of when it happened, against which the
alignment-based figure is checked. A timer canary is frozen for 300 ms to make events
mid-recording; every event must reach the recorder within a second of its end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import psutil

from analysis.analyze.alignment import align
from analysis.analyze.delivery import LATE_NS, delivery
from analysis.analyze.load import load_run
from analysis.record.recorder import Recorder
from tests.liveagent import is_worker, live_agent

MS = 1_000_000


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_event_reaches_the_recorder_within_a_second(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with live_agent(tmp_path, "--no-kmsg") as agent:
        victim = sorted(os.sched_getaffinity(0))[-1]

        async def record() -> None:
            stop = asyncio.Event()
            recorder = Recorder(out, agents={"guest": agent.url}, duration_ns=5_000_000_000)
            task = asyncio.ensure_future(recorder.run(stop))
            await asyncio.sleep(2.0)
            children = psutil.Process(agent.proc.pid).children(recursive=True)
            timer = next(c for c in children if is_worker(c, "probe.canary_timer", victim))
            timer.send_signal(signal.SIGSTOP)
            await asyncio.sleep(0.3)
            timer.send_signal(signal.SIGCONT)
            await task

        asyncio.run(record())
    run = load_run(out)
    figures = delivery(run, align(run))
    assert figures is not None
    print(figures)
    assert figures.events > 0 and figures.late == 0, figures
    assert figures.max_ns <= LATE_NS

    # The independent reading: arrival minus the event's end by its own realtime fields.
    arrivals = _records(out / "arrivals-guest.jsonl")
    events = _records(out / "guest-events.jsonl")
    start = json.loads((out / "meta.json").read_text())["start"]["real_ns"]
    own = []
    for line_no, ev in enumerate(events, start=1):
        page = next(a for a in arrivals if int(str(a["lines"])) >= line_no)
        end = int(str(ev["real_ns"])) + max(0, int(str(ev.get("duration_ns") or 0)))
        if end >= start:
            own.append(int(str(page["host_real_ns"])) - end)
    timeouts = [e for e in events if e["kind"] == "timeout" and e.get("cpu") == victim]
    assert timeouts, "the frozen timer canary reported nothing"
    assert len(own) == figures.events
    assert min(own) >= 0
    tolerance = (figures.error_ns or 0) + 2 * MS
    assert abs(max(own) - figures.max_ns) <= tolerance, (max(own), figures)
    assert abs(sorted(own)[len(own) // 2] - figures.p50_ns) <= tolerance, figures
