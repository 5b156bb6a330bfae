"""Analysis: from a run directory's records to what the guest felt, phase by phase.

``load.load_run`` reads a run directory once (through ``analysis.rundir``) into a ``Run``:
QMP records and their ``timeline.Timeline``, guest events as columns, clock samples, host
truth. Then, each a pure function of what came before:

- ``timeline.build_timeline``: migration phases from the QMP records of every endpoint;
- ``alignment.align``: guest clocks on the host's, and the clock steps a stop caused;
- ``host_vcpu``: the host's per-vCPU states, per phase;
- ``attribution.analyse``: stalls and timeout expirations placed in phases, checked
  against QEMU's own figures (an ``Analysis``);
- ``findings.findings``: the sentences a reader should not miss.

``cli`` is ``tsprobe timeline``. Rendering belongs to ``analysis.report``.
"""
