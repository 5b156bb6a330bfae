#!/bin/busybox sh
# PID 1 of the tsprobe lab guest (an initramfs only; busybox sh).
#
# It mounts proc, sys and devtmpfs, loads the virtio modules listed in
# /lib/modules/load-order (modules.dep order, computed at build time), brings up eth0 on
# QEMU's user-mode network (10.0.2.15/24, gateway 10.0.2.2), then starts:
#   - the agent: tsprobe agent --interval 1ms --threshold 50ms --listen 0.0.0.0:9466,
#     its spool in the guest's tmpfs (/run/tsprobe/events.jsonl), with the lab's lighter
#     settings below;
#   - the lab hooks (port 9467, a hooks.py per request): clock steps and the like;
#   - a health line on the console whenever the agent's /healthz changes;
#   - optionally a memory workload that keeps a working set dirty, pinned to one CPU.
# Settings come from the kernel command line:
#   tsprobe.wss=SIZE      working set of the memory workload (e.g. 64M; 0 or absent: none)
#   tsprobe.wcpu=N        CPU the workload is pinned to (default 0)
#   tsprobe.canaries=LIST the agent's --canaries (default timer,heartbeat; none: off)
#   tsprobe.agent="ARGS"  extra agent arguments (commas stand for spaces)
# Every line this script prints starts with "tsprobe-lab:" so the host can grep the
# serial console (console=ttyS0) for it; kernel oopses and warnings reach the console
# through loglevel=5.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
exec >/dev/console 2>&1 </dev/null
mkdir -p /tmp /run /root
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/tsprobe /dev/shm
echo "tsprobe-lab: init at $(cut -d' ' -f1 /proc/uptime)s"

while read -r mod; do
    insmod "/lib/modules/$mod" || echo "tsprobe-lab: insmod $mod failed"
done </lib/modules/load-order

WSS=0
WCPU=0
CANARIES=timer,heartbeat
AGENT_EXTRA=""
for word in $(cat /proc/cmdline); do
    case "$word" in
        tsprobe.wss=*) WSS="${word#*=}" ;;
        tsprobe.wcpu=*) WCPU="${word#*=}" ;;
        tsprobe.canaries=*) CANARIES="${word#*=}" ;;
        tsprobe.agent=*) AGENT_EXTRA="$(echo "${word#*=}" | tr ',' ' ')" ;;
    esac
done

ip link set lo up
tries=0
while [ ! -e /sys/class/net/eth0 ] && [ $tries -lt 50 ]; do
    sleep 0.1
    tries=$((tries + 1))
done
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
echo "tsprobe-lab: network up at $(cut -d' ' -f1 /proc/uptime)s: $(ip -o -4 addr show eth0 | awk '{print $4}')"
echo "tsprobe-lab: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"

# The agent's samplers sleep at SCHED_FIFO. When the host freezes a vCPU while one of
# them is on it, the guest's clock runs on (the vCPU is not stopped in QEMU's sense) and
# the whole freeze is charged to that FIFO task as runtime: a freeze longer than 950 ms
# then triggers RT throttling ("sched: RT throttling activated"), which keeps the
# CPU's sampler off for the rest of the 1 s period and stretches the stall it reports
# (a 1.2 s SIGSTOP read as 1.96 s). The lab measures the host's freeze, not this
# artifact of the probe's own policy, so RT throttling is off in the lab guest.
echo -1 >/proc/sys/kernel/sched_rt_runtime_us

PY="/usr/bin/python3.11 -S"
export PYTHONPATH=/opt/tsprobe
export PYTHONDONTWRITEBYTECODE=1
GO=/run/tsprobe/workload-go
STOP=/run/tsprobe/workload-stop
RESULT=/run/tsprobe/workload-result
if [ "$WSS" != "0" ]; then
    # Started first, while the guest is idle: it allocates and touches its pages now and
    # starts dirtying them once the agent is up (it waits for $GO), so that it neither
    # slows the agent's start under TCG nor pays for its own start under the samplers.
    $PY /opt/tsprobe/lab/workload.py "$WSS" "$WCPU" "$GO" "$STOP" "$RESULT" &
fi
# The lab's agent settings (docs/lab-notes.md has what they cost under TCG, where the
# guest's Python runs about 30 times slower than natively): a timeout ladder from 50 ms,
# like the stall threshold, because TCG's own 1-20 ms gaps would expire a 10 ms rung many
# times a second and filing those events would take the agent a third of a vCPU; the
# clock period at 100 ms (the timerfd sees clock sets at once); a heartbeat beat every
# 10 ms, which still resolves the ladder's 50 ms rung.
# shellcheck disable=SC2086
$PY -m tsprobe.cli agent --interval 1ms --threshold 50ms --listen 0.0.0.0:9466 \
    --timeouts 50ms,100ms,1s,5s,30s --clock-period 100ms --heartbeat-interval 10ms \
    --events /run/tsprobe/events.jsonl --canaries "$CANARIES" $AGENT_EXTRA &
# The lab hooks: a shell per connection reads the host's line; "workload stop" is
# answered here (right after a migration the destination's fresh QEMU runs a Python start
# slowly), anything else by one short-lived hooks.py (see its docstring). The answer to
# "workload stop" is the workload's verdict on its memory ($RESULT, written once it has
# checked every page), or after 30 s without one an answer that says so.
# shellcheck disable=SC2016
HOOK='read -r line
case "$line" in
    "workload stop")
        touch "$STOP"
        i=0
        while [ ! -e "$RESULT" ] && [ $i -lt 300 ]; do
            sleep 0.1
            i=$((i + 1))
        done
        if [ -e "$RESULT" ]; then
            cat "$RESULT"
        else
            echo "{\"ok\": true, \"stopped\": \"workload\", \"verdict\": \"none after 30 s\"}"
        fi ;;
    *) printf "%s\n" "$line" | $PY /opt/tsprobe/lab/hooks.py once ;;
esac'
export PY STOP RESULT
nc -ll -p 9467 -e sh -c "$HOOK" &
# The agent's health on the console: a line when it first answers, and one whenever its
# status, its down probes or its count of dropped events change (/healthz every 5 s).
(
    last=""
    up=""
    while true; do
        # busybox-static's wget -T segfaults when the connection is refused: timeout instead.
        body="$(timeout 3 wget -q -O - http://127.0.0.1:9466/healthz 2>/dev/null)"
        if [ -n "$body" ]; then
            if [ -z "$up" ]; then
                echo "tsprobe-lab: agent up at $(cut -d' ' -f1 /proc/uptime)s"
                up=1
            fi
            line="$(echo "$body" | sed -n \
                -e 's/^{"status": "\([a-z]*\)".*"down": \[\([^]]*\)\].*"dropped": \([0-9]*\).*/status=\1 down=[\2] dropped=\3/p')"
            line="${line:-unreadable /healthz}"
        else
            line="agent not answering"
        fi
        if [ "$line" != "$last" ]; then
            echo "tsprobe-lab: health $line"
            last="$line"
        fi
        sleep 5
    done
) &
if [ "$WSS" != "0" ]; then
    # The workload starts dirtying once the agent has reported its probes (its first
    # probe_status event in the spool). grep on the spool costs the agent nothing; the
    # wget of /healthz every 0.2 s it replaces made the starting agent answer HTTP.
    (
        tries=0
        until grep -q '"probe_status"' /run/tsprobe/events.jsonl 2>/dev/null \
            || [ $tries -ge 600 ]; do
            sleep 0.2
            tries=$((tries + 1))
        done
        touch "$GO"
    ) &
fi

while true; do
    wait
    sleep 1
done
