"""The lab: a real QEMU guest running the agent, migrated or stalled on purpose.

How it fits together (``tsprobe lab run --scenario NAME --out RUNDIR``)::

    guest.build_guest()          Debian kernel (apt-get download, dpkg-deb -x, PVH vmlinux)
          |                      + initramfs: busybox, host python3.11, agent, virtio modules
          v                      cached by content under ~/.cache/tsprobe/guest
    qemu.start(src), start(dst)  q35 on --qemu (default: the system's; 10.0: the one
          |                      scripts/setup unpacks), -accel tcg,thread=multi on QEMU
          |                      >= 9.0 and for stall and stall-vcpu, thread=single for
          |                      migrations on older QEMU (KVM after a smoke boot),
          |                      serial console to a file, user-mode net with hostfwd on
          |                      127.0.0.1 (agent 9466, lab hooks 9467), two QMP sockets each
          v
    scenarios.Scenario.run()     waits for the agent, starts analysis.record.recorder.Recorder on
          |                      one monitor per QEMU and on the agent (through
          |                      proxy.Forwarder, which follows the guest to the destination),
          |                      drives QEMU on the other monitor (timeouts, OOB), checks the
          v                      guest's health, stops the recorder
    summary.write_summary()      phases, stalls per CPU and phase, clock lag, injected
                                 freezes against what the guest saw -> lab-summary.txt/.json

The guest side: ``init.sh`` is PID 1 (busybox sh): it mounts /proc, /sys, /dev, loads the
virtio modules, sets up eth0 (10.0.2.15/24 via 10.0.2.2), turns RT throttling off (see the
script for why), and starts ``tsprobe agent --interval 1ms --threshold 50ms`` (with a
timeout ladder from 50 ms and a 100 ms clock period: see the script for why) and
busybox ``nc`` on port 9467, which runs ``guest_hooks.py`` for each request of the host
(a clock step, a line in /dev/kmsg), a shell loop that prints the agent's health on the
console, and ``guest_workload.py``, the optional memory workload from
``tsprobe.wss=``/``tsprobe.wcpu=`` on the kernel command line.

What was measured on this kind of machine (boot times, the agent's answers after a pause,
the clocksource under TCG, QEMU 10.0 under multi-threaded TCG) is in docs/lab-notes.md.

Modules: ``spec`` (the scenarios and ``LabOptions``), ``scenarios`` (a run, step by step),
``control`` (the lab's own QMP monitor), ``health`` (is the guest well), ``freeze`` (the
stall scenarios' freezes), ``summary`` and ``outcome`` (lab-summary.txt, the guest's
outcome), ``study`` and ``study_cli`` (the policy study), ``libvirt`` (``--via libvirt``),
``guest`` (build), ``wheel``, ``elf`` and ``cpio`` (its inputs and binary formats),
``qemu`` (command lines, processes, accelerator), ``proxy``, ``cli``, ``errors``;
``guest_hooks.py``, ``guest_workload.py`` and ``init.sh`` run inside the guest only.
"""
