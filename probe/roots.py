"""Where the kernel's files are: /proc, /sys and /dev, movable for tests.

Every probe reads through a ``Roots`` value instead of literal paths, as node_exporter does
with ``--path.procfs`` and ``--path.sysfs``. Tests point it at fixture trees under
tests/fixtures/; the agent exposes ``--path.procfs``, ``--path.sysfs`` and ``--path.devfs``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Roots:
    """The three filesystem roots a probe may read."""

    proc: str = "/proc"
    sys: str = "/sys"
    dev: str = "/dev"

    def proc_path(self, *parts: str) -> str:
        """A path under the proc root, e.g. ``proc_path("stat")``."""
        return os.path.join(self.proc, *parts)

    def sys_path(self, *parts: str) -> str:
        """A path under the sys root."""
        return os.path.join(self.sys, *parts)

    def dev_path(self, *parts: str) -> str:
        """A path under the dev root."""
        return os.path.join(self.dev, *parts)

    def read_text(self, path: str) -> str:
        """Read a whole (small) kernel file as text.

        :param path: an absolute path, usually from one of the ``*_path`` helpers.
        :raise OSError: when the file cannot be read.
        :return: its content.
        """
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()


DEFAULT_ROOTS = Roots()
