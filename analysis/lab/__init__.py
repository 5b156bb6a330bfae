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

What was learnt on this kind of machine (2 cores, QEMU 7.2, Debian 12 kernel 6.1, TCG):

- Boot to an agent with every probe up: 9.2 to 17.6 s (12 s on average) in a migrating
  run, and as varied between runs of the same scenario (kernel to init 2.2 to 3.6 s
  without the crypto self-tests, 4.3 to 5 s with them; the agent's Python start is most of
  the rest, ~30x slower than native under TCG). In an otherwise idle guest: a warm
  ``python3 -S -c pass`` 0.2 s (the first one 1.65 s), ``import prometheus_client``
  1.8 s, ``import click`` 1.1 s, ``import http.server`` 1.2 s, ``tsprobe agent --help``
  2.6 s, a worker's imports 0.24 s. With the six workers forked from the fork server
  (``agent.forkserver``) instead of each started as a fresh interpreter, and the hooks run
  per request instead of as a resident Python, the average migrating boot went from
  15.0 s to 12.0 and 12.5 s (``bench/lab_scenarios --repeat 3``). The
  host's second core stays mostly idle all the while (single-threaded TCG: one host thread
  for every vCPU), and that thread is busy through the whole boot (QEMU's CPU time equalled
  the wall time in 6 boots of 11.3 to 14.4 s), a good part of it translating: 200,000
  translation blocks by the end of a boot (HMP ``info jit``), and 55,000 more on the
  destination in the 4.5 s after paused-stop's ``cont``.
- Right after a 4 s pause the agent takes 1 to 7 s to answer a request (a /clock or
  /healthz takes 0.1 to 0.5 s once it settles; /metrics 1 to 5 s, and one asked for right
  when the migration completed went unanswered for 15 s). The recorder's 1 s
  requests time out meanwhile (13 of them after one pause), and the agent still answers
  each one it gave up on. With 5 s requests only 2 failed and the agent answered the
  health check after 1.4 to 2.9 s instead of 1.7 to 6.8 s, but a request in flight to
  the source at a precopy's switchover then hung 5 s, and a precopy run kept no /clock
  sample after the switchover but the last one: the lab keeps 1 s.
- The guest's clocksource under TCG is ``hpet``: it counts QEMU's virtual clock, so it
  stands still while QEMU has the vCPUs stopped (precopy downtime, the postcopy
  switchover, ``stop``) and the guest's realtime falls behind the host's by that much; it
  runs on through a SIGSTOP or a cgroup freeze, which the guest sees as a gap.
- ``/clock`` round trips take 15 to 250 ms under TCG, so the lag is estimated from the
  reply's receipt (the agent reads its clocks just before answering), not the midpoint.
- ``paused``: the vCPUs are usually already blocked on a requested page when the pause
  comes, so the stall starts in postcopy-active and ends after recovery (3.77 s for a
  3.02 s pause).
- QEMU 10.0.2 (bookworm-backports, unpacked by scripts/setup) under multi-threaded TCG,
  source and destination (``bench/lab_scenarios --qemu 10.0 --repeat 3
  --precopy-workload 8M``): every migrating run 15.6 to 17.6 s, boots 5.5 to 7.9 s, all
  healthy, no workload page lost a write (12 runs; 2048 pages checked 94 to 102 times in
  precopy, 16384 pages 38 to 53 times in the postcopy ones). 10.0 reports ``device``
  right after the STOP of the switchover and ``postcopy-recover-setup`` on the source
  (``analysis.analyze.timeline`` rules 2 and 7). Multi-threaded TCG forced on 7.2.22 lost no
  write the workload could see either (precopy 8M x4 and 2M x3, postcopy x3, paused x3):
  the workload's check finds a stale page (tests/test_lab_workload.py writes one), but
  these runs never made one.
- ``paused-stop``: ``stop`` is sent before the pause (QEMU's monitor can hang on it while
  postcopy-paused); with the vCPUs stopped, the destination's monitor answered
  ``query-status`` during the pause.

Modules: ``guest`` (build), ``elf`` and ``cpio`` (its binary formats), ``qemu`` (command
lines, processes, accelerator), ``proxy``, ``scenarios``, ``summary``, ``cli``,
``errors``; ``guest_hooks.py``, ``guest_workload.py`` and ``init.sh`` run inside the
guest only.
"""
