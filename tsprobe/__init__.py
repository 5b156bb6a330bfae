"""The ``tsprobe`` command: one entry point whose subcommands live in the packages they serve.

``tsprobe agent`` is defined in ``agent.cli``; the host-side commands (``record``,
``timeline``, ``report``, ``compare``, ``lab``) in ``analysis``. Subcommands are imported
only when invoked, so the guest, which has only the base dependencies, never imports numpy
or qemu.qmp.
"""

from probe import __version__

__all__ = ["__version__"]
