"""tsprobe's host side: record a migration, rebuild its phases, and explain what the guest felt.

The subpackages are the stages a run's data goes through, in this order (each imports
only from the stages before it; docs/architecture.md draws the map)::

    record/   QMP monitors, guest agents, libvirt, vCPU threads  ->  a run directory
    rundir/   the run directory: its layout, the one JSONL reader, the checked record
              models (guest events; QMP: the one QEMU timestamp decoder and the one
              STOP -> RESUME rule)
    analyze/  load a run (``analyze.load``), then timeline, alignment, attribution, findings
    report/   summary.json, report.html/.md, plots, comparisons, the study report
    prom/     the same tables from a Prometheus server instead of a run directory
    lab/      a real QEMU guest, migrated or stalled on purpose, and the policy study

Command-line front ends (``*/cli.py``, ``report/compare_cli.py``, ``lab/study_cli.py``)
sit beside their stage; no library module imports one. ``errors`` holds the root
exception, ``options`` the option checkers the commands share. The package reads guest
events through ``probe.events`` and never imports ``agent``.
"""
