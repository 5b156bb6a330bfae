"""Exceptions of the ``analysis`` package.

::

    AnalysisError
     ├── RunDirError        a run directory that is missing, empty or unreadable
     ├── RecordFormatError  a run-directory line that is not a valid record
     ├── RecorderError      the recorder could not start (bad --qmp spec, unwritable --out)
     └── PrometheusError    a Prometheus server unreachable, refusing a query, or without
                            data for the instance and time range asked for

Each message is one line fit for the command line; the CLI prints it as ``tsprobe: ...``
and exits 2 (usage) or 1 (failure) without a traceback.
"""

from __future__ import annotations


class AnalysisError(Exception):
    """Root of every error this package raises on purpose."""


class RunDirError(AnalysisError):
    """A run directory that cannot be used."""


class RecordFormatError(AnalysisError, ValueError):
    """A line of a run-directory JSONL file that is not a valid record."""


class RecorderError(AnalysisError):
    """The recorder cannot start or go on."""


class PrometheusError(AnalysisError):
    """Prometheus could not give what a report from metrics needs."""
