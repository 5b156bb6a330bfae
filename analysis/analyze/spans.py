"""The analysis' phases and the stalls placed in them: ``Span`` and ``Placed``.

A ``Span`` is one phase as the analysis cuts the run: the timeline's phases
(``analysis.analyze.timeline``), or one whole-run span when phases are unknown or there was
no migration, with ``before migration`` in front when guest data starts earlier.
``span_label`` names a span, numbering names that repeat (``postcopy-active #2``).
``Placed`` holds every guest stall on the host's clock as numpy columns (start, end,
error bound, length, lane, cause hint, phase, near a boundary).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]


@dataclass(frozen=True)
class Span:
    """A phase as attribution uses it: a name and a closed-open host interval."""

    index: int
    name: str
    start_ns: int
    end_ns: int
    vm_stopped: bool = False

    @property
    def length_ns(self) -> int:
        """The phase's length (0 for an empty one)."""
        return max(0, self.end_ns - self.start_ns)


@dataclass
class Placed:
    """Stalls on the host clock (numpy columns, one row per stall of ``Run.stalls``)."""

    start: I64
    end: I64
    err: F64
    dur: I64
    lane: I32
    cause: I32
    phase: I32
    near: npt.NDArray[np.bool_]


def span_label(spans: list[Span], phase: int) -> str:
    """A phase's name, with ``#2``, ``#3`` when a name repeats (postcopy-active)."""
    name = spans[phase].name
    seen = sum(1 for s in spans[: phase + 1] if s.name == name)
    total = sum(1 for s in spans if s.name == name)
    return f"{name} #{seen}" if total > 1 else name
