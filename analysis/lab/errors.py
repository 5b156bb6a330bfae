"""Exceptions of the lab (``tsprobe lab``).

::

    AnalysisError (analysis.errors)
     └── LabError            the lab cannot go on
          ├── GuestBuildError   building the guest failed (apt, dpkg-deb, missing files)
          ├── QemuError         a QEMU did not start, boot or answer in time
          └── ScenarioError     a scenario step failed (QMP error, migration failed)

Each message is one line; the CLI prints it as ``tsprobe: ...`` without a traceback.
"""

from __future__ import annotations

from analysis.errors import AnalysisError


class LabError(AnalysisError):
    """Root of the lab's errors."""


class GuestBuildError(LabError):
    """The guest image could not be built."""


class QemuError(LabError):
    """A QEMU process failed to start, boot or answer."""


class ScenarioError(LabError):
    """A scenario step failed."""
