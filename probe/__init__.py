"""tsprobe's in-guest measurement library.

Each probe lives in a module of its own (``stall``, ``clock``, ``kmsg``, ...) and reports
what it sees as events (``probe.events``), the one data model that the agent writes and
the host-side analysis reads. The package depends on the standard library and psutil only,
so it installs in small guests.

Filesystem sources (/proc, /sys, /dev) are read through a ``Roots`` object
(``probe.roots``) so that every parser can be tested on fixture trees.
"""

__version__ = "0.1.0"
