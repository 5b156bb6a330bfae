"""tsprobe's host side: record a migration, rebuild its phases, and explain what the guest felt.

``rundir`` defines the run directory (the recorder writes it, everything else reads it),
``recorder`` talks to QEMU's QMP monitors and to the guest agents, ``timeline`` turns QMP
records into migration phases. The package reads guest events through ``probe.events``
and never imports ``agent``.
"""
