"""Recording: the host's side of a live migration, written to a run directory as it happens.

``recorder.Recorder`` runs one ``qmp_endpoint.QmpEndpoint`` per QEMU monitor (QMP events
and polled ``query-migrate`` replies, each record appended and flushed), one
``agent_client.AgentRecorder`` per guest agent (``/events`` and ``/clock``), a
``libvirt_events`` reader where libvirt owns the monitor, and a ``vcpu_sampler`` per local
QEMU (host truth per vCPU thread, ``vcpu_threads`` reads /proc). ``exporter`` serves what
the recorder sees as ``tsprobe_migration_*`` metrics. ``cli`` is ``tsprobe record``.
Everything written follows ``analysis.rundir`` (the layout); nothing here analyses.
"""
