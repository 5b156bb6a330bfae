"""Host truth per vCPU (``vcpu-states.jsonl``), read and checked: one ``VcpuInterval`` a line.

The recorder's vCPU sampler (``analysis.record.vcpu_sampler``) writes each line as a
run-length interval of one vCPU thread's host state. ``vcpu_interval`` checks one: the
endpoint a non-empty string, ``vcpu`` in [0, ``MAX_VCPU``), ``tid`` in [1, ``MAX_TID``],
the four times ints in [0, 2**63), each end not before its start, ``state`` one of
``analysis.rundir.VCPU_STATE_NAMES``; ``samples`` and the optional ``wchan``, ``futex``,
``holder_hint``, ``syscall`` are kept when of the right type and dropped alone otherwise
(``end_real_ns``, when missing, is the start plus the monotonic length). A line that fails
a check is a skip with its reason. ``read_vcpu_states`` sorts the intervals by (endpoint,
vCPU, start), since the file is written in the order intervals end, and cuts an interval
that starts before the previous one of the same vCPU ended, so that no host time is
counted twice (one note per file).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from analysis import rundir
from analysis.rundir.jsonl import (
    MAX_NS,
    Issue,
    iter_records,
    printable,
)
from analysis.rundir.qmp import is_int


@dataclass(frozen=True)
class VcpuInterval:
    """One vCPU thread in one host state from ``start`` to ``end`` (exclusive): a line of
    ``vcpu-states.jsonl``, on the recording host's CLOCK_MONOTONIC and CLOCK_REALTIME.

    :param endpoint: the QMP endpoint whose QEMU runs the thread (``src``, ``dst``).
    :param vcpu: QEMU's vCPU index; ``tid`` the host thread (shared by every vCPU under
        single-threaded TCG).
    :param state: one of ``rundir.VCPU_STATE_NAMES``.
    :param wchan: the last wchan seen, None when not given.
    :param samples: readings that saw the state, None when not given.
    :param futex: the futex word's address (hex) of a futex wait; ``holder_hint`` a
        text about who holds it; ``syscall`` the system call number, when given.
    :param also_waiting: for a lock wait, the other threads seen waiting on the same
        futex object (``main``: QEMU's main loop; ``vcpu N``).
    :param line: the line in vcpu-states.jsonl.
    """

    endpoint: str
    vcpu: int
    tid: int
    state: str
    start_mono_ns: int
    end_mono_ns: int
    start_real_ns: int
    end_real_ns: int
    wchan: str | None = None
    samples: int | None = None
    futex: str | None = None
    holder_hint: str | None = None
    syscall: int | None = None
    also_waiting: tuple[str, ...] = ()
    line: int = 0

    @property
    def length_ns(self) -> int:
        """The interval's monotonic length."""
        return self.end_mono_ns - self.start_mono_ns


#: Bounds of ``vcpu-states.jsonl`` fields (QEMU's vCPU index; Linux's PID_MAX_LIMIT).
MAX_VCPU = 1 << 16


MAX_TID = 1 << 22


#: At most this many names in ``also_waiting`` (more: the field is dropped).
MAX_WAITERS = 256


_MAX_NS = MAX_NS


def vcpu_interval(obj: Mapping[str, Any], line: int = 0) -> VcpuInterval | str:
    """Check one ``vcpu-states.jsonl`` record (see the module docstring).

    :param obj: the decoded line.
    :param line: its line number, kept in the result.
    :return: the interval, or the reason it was rejected (one line).
    """
    endpoint = obj.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        return "vCPU state without an 'endpoint' name"
    vcpu, tid, state = obj.get("vcpu"), obj.get("tid"), obj.get("state")
    if not is_int(vcpu) or not 0 <= vcpu < MAX_VCPU:
        return f"vCPU state with 'vcpu' {vcpu!r} not an integer in [0, {MAX_VCPU})"
    if not is_int(tid) or not 1 <= tid <= MAX_TID:
        return f"vCPU state with 'tid' {tid!r} not an integer in [1, {MAX_TID}]"
    if state not in rundir.VCPU_STATE_NAMES:
        return f"vCPU state {state!r} unknown (known: {', '.join(rundir.VCPU_STATE_NAMES)})"
    times: dict[str, int] = {}
    for key in ("start_mono_ns", "end_mono_ns", "start_real_ns", "end_real_ns"):
        value = obj.get(key)
        if value is None and key == "end_real_ns":
            continue
        if not is_int(value) or not 0 <= value <= _MAX_NS:
            return f"vCPU state with '{key}' {value!r} not an integer in [0, 2**63)"
        times[key] = value
    if times["end_mono_ns"] < times["start_mono_ns"]:
        return "vCPU state ending (monotonic) before it starts"
    length = times["end_mono_ns"] - times["start_mono_ns"]
    end_real = times.get("end_real_ns", times["start_real_ns"] + length)
    if end_real < times["start_real_ns"]:
        return "vCPU state ending (realtime) before it starts"
    wchan, samples = obj.get("wchan"), obj.get("samples")
    futex, hint, syscall = obj.get("futex"), obj.get("holder_hint"), obj.get("syscall")
    waiting = obj.get("also_waiting")
    if not (
        isinstance(waiting, list)
        and len(waiting) <= MAX_WAITERS
        and all(isinstance(w, str) and 0 < len(w) <= 32 for w in waiting)
    ):
        waiting = []
    return VcpuInterval(
        endpoint=endpoint,
        vcpu=vcpu,
        tid=tid,
        state=str(state),
        start_mono_ns=times["start_mono_ns"],
        end_mono_ns=times["end_mono_ns"],
        start_real_ns=times["start_real_ns"],
        end_real_ns=end_real,
        wchan=wchan if isinstance(wchan, str) else None,
        samples=samples if is_int(samples) and samples >= 0 else None,
        futex=futex if isinstance(futex, str) else None,
        holder_hint=hint if isinstance(hint, str) else None,
        syscall=syscall if is_int(syscall) else None,
        also_waiting=tuple(waiting),
        line=line,
    )


def read_vcpu_states(path: Path, issue: Callable[[Issue], None]) -> list[VcpuInterval]:
    """Read ``vcpu-states.jsonl``: checked intervals sorted by (endpoint, vCPU, start).

    :param path: the file.
    :param issue: called with each line passed over, and with a note when intervals of
        one vCPU overlapped (the later one is cut to start where the earlier ended).
    :raise RunDirError: when the file cannot be read.
    :return: the intervals (empty ones, after a cut, are left out).
    """
    name = printable(path)
    got: list[VcpuInterval] = []
    for line_no, obj in iter_records(path, issue, dedupe=True):
        checked = vcpu_interval(obj, line_no)
        if isinstance(checked, str):
            issue(Issue(name, line_no, checked))
        else:
            got.append(checked)
    got.sort(key=lambda v: (v.endpoint, v.vcpu, v.start_mono_ns, v.end_mono_ns))
    out: list[VcpuInterval] = []
    cut: list[int] = []
    for iv in got:
        prev = out[-1] if out else None
        same = prev is not None and (prev.endpoint, prev.vcpu) == (iv.endpoint, iv.vcpu)
        if prev is not None and same and iv.start_mono_ns < prev.end_mono_ns:
            cut.append(iv.line)
            if iv.end_mono_ns <= prev.end_mono_ns:
                continue
            shift = prev.end_mono_ns - iv.start_mono_ns
            iv = replace(
                iv,
                start_mono_ns=prev.end_mono_ns,
                start_real_ns=min(iv.start_real_ns + shift, iv.end_real_ns),
            )
        out.append(iv)
    if cut:
        n = len(cut)
        issue(
            Issue(
                name,
                min(cut),
                f"{n} vCPU state interval{'s' if n != 1 else ''} overlapped an earlier one of "
                "the same vCPU: cut to start where that one ended",
                "note",
            )
        )
    return out
