"""The ``heartbeat`` canary: each CPU's stall sampler beats, and watches a peer CPU's beats.

What it models
    Cluster membership (corosync, etcd, Pacemaker, a database's replica set): each member
    sends a heartbeat every interval and declares a peer dead when it has not heard from
    it for longer than its timeout. A migration stalls vCPUs unevenly (a postcopy page
    fault blocks one vCPU; a throttle or a host preemption hits some): the member on a
    stalled CPU falls silent, and the member on a healthy CPU declares it dead. This canary
    measures that, for every timeout ``T`` of the ladder at once.

How
    The members are the per-CPU stall samplers (``probe.stall``): they wake every
    millisecond anyway, so the heartbeat costs no wake-up of its own. The agent pairs the
    CPUs (``agent.samplers.heartbeat_pairs``) and gives every sampler the same shared
    page (a memfd, ``Board``): one slot per CPU holding a sequence number and the send
    times of its last ``RING`` heartbeats. Every ``--beat-ns`` (default 5 ms; and at every
    late wake-up, so a side coming back from a stall is heard again at once) a sampler
    (``Side.beat``):

    1. beats: writes CLOCK_MONOTONIC now into its ring, then its new sequence number
       (8-byte stores, in that order: a reader that sees the number sees the time);
    2. reads every heartbeat of each peer since the last one it read (a ring that wrapped
       loses the oldest: they count as dropped);
    3. judges the silence (``Watcher``). ``last`` is the send time of the newest heartbeat
       heard before this wake-up, ``prev`` the previous wake-up. If something new arrived:
       ``seen = prev - last`` is the longest silence this side saw while it ran (at
       ``prev`` it was awake and had heard nothing newer than ``last``), and
       ``gone = first - last`` is how long the peer did not send (``first``: the send time
       of the oldest new heartbeat). Each ``T`` with ``seen > T + slack_ns(T)``
       (``probe.canary.outlived``) would have declared the peer dead; as the peer comes
       back, the side writes one ``timeout`` line per such ``T``: ``mono_ns`` = ``last + T``
       (when the peer was declared dead), ``duration_ns`` = ``gone - T`` (how long it stayed
       dead), ``timeout_ns``, ``peer_cpu``, ``gone_ns`` and ``seen_ns``.

    Reading before judging makes the asymmetry visible: a side that was itself stalled finds
    its peer's heartbeats waiting when it wakes up, so it declares nothing (it was deaf,
    the peer was not silent); its own stall is the sampler's business. When both CPUs
    stall together neither side sees a silence while it runs, so neither declares.

    A member runs at the sampler's priority: SCHED_FIFO when permitted, as corosync runs
    its own at a real-time priority; an ordinary task on the CPU does not silence it, a
    stalled vCPU does.

    The latency histogram gets every gap between two consecutive heartbeats of the peer by
    their send times (normally the beat interval), except across dropped heartbeats.

A sampler that restarts reads its slot's sequence number and goes on from it; a peer whose
number goes back (a board re-made) is heard afresh, with no verdict on the gap.
"""

from __future__ import annotations

import mmap

from probe.canary import Reporter, outlived, slack_ns

#: ``typing.TYPE_CHECKING`` without importing ``typing`` (the samplers' footprint).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_INTERVAL_NS = 5_000_000
#: Heartbeats kept per slot: a reader more than this many behind loses the oldest.
RING = 64
#: int64 words per slot: the sequence number, then the ring.
SLOT_WORDS = 1 + RING


def board_size(slots: int) -> int:
    """Bytes of a board with this many slots (one per CPU)."""
    return slots * SLOT_WORDS * 8


class Board:
    """The shared page: one slot per CPU, each its sequence number and its last send times.

    :param fd: the board's file (a memfd the agent made, ``board_size`` bytes or more).
    :param slots: how many slots it holds.
    """

    def __init__(self, fd: int, slots: int) -> None:
        self._map = mmap.mmap(fd, board_size(slots))
        self.words = memoryview(self._map).cast("q")

    def seq(self, slot: int) -> int:
        """The slot's newest sequence number (0: never beaten)."""
        return int(self.words[slot * SLOT_WORDS])

    def sent(self, slot: int, seq: int) -> int:
        """The send time of the slot's heartbeat ``seq`` (valid while it is among the last
        ``RING``)."""
        return int(self.words[slot * SLOT_WORDS + 1 + seq % RING])

    def beat(self, slot: int, seq: int, now_ns: int) -> None:
        """Publish heartbeat ``seq`` sent at ``now_ns``: the time first, then the number."""
        base = slot * SLOT_WORDS
        self.words[base + 1 + seq % RING] = now_ns
        self.words[base] = seq

    def since(self, slot: int, seq: int) -> list[tuple[int, int]]:
        """The slot's heartbeats after ``seq``, oldest first, as (send time, sequence); at
        most ``RING`` of them (the older ones are gone)."""
        newest = self.seq(slot)
        first = max(seq + 1, newest - RING + 1, 1)
        return [(self.sent(slot, n), n) for n in range(first, newest + 1)]


class Watcher:
    """One side's view of its peer (pure: fed with heartbeats and wake-up times).

    :param ladder: the timeouts, ascending.
    :param reporter: where events and histogram observations go.
    :param peer_cpu: the peer's CPU, for the events.
    """

    def __init__(self, ladder: list[int], reporter: Reporter, peer_cpu: int) -> None:
        self.ladder = ladder
        self.reporter = reporter
        self.peer_cpu = peer_cpu
        self.last_ns: int | None = None  # send time of the newest heartbeat heard
        self.last_seq = -2  # sequence number of the newest heartbeat heard
        self.prev_wake_ns: int | None = None
        #: The longest silence no timeout of the ladder outlives (``probe.canary.outlived``).
        self.quiet_ns = min((t + slack_ns(t) for t in ladder), default=-1)

    def next_one(self, now_ns: int, sent_ns: int, seq: int) -> bool:
        """``wake`` for its most common case, in fewer steps: exactly one heartbeat arrived,
        the next in sequence, and the silence before it outlived no timeout. Anything else
        is left to ``wake``.

        :return: whether it was that case (and is done).
        """
        last = self.last_ns
        prev = self.prev_wake_ns
        if (
            seq != self.last_seq + 1
            or last is None
            or prev is None
            or prev - last > self.quiet_ns
            or sent_ns < last
        ):
            return False
        self.reporter.latency.observe(sent_ns - last)
        self.reporter.count += 1
        self.last_ns = sent_ns
        self.last_seq = seq
        self.prev_wake_ns = now_ns
        return True

    def wake(self, now_ns: int, heartbeats: list[tuple[int, int]]) -> None:
        """Process one wake-up: the heartbeats read (send time, sequence), oldest first.

        :param now_ns: CLOCK_MONOTONIC at this wake-up.
        :param heartbeats: what arrived since the previous wake-up.
        """
        reporter = self.reporter
        if heartbeats:
            first = heartbeats[0][0]
            last = self.last_ns
            prev = self.prev_wake_ns
            if last is not None and prev is not None:
                seen = prev - last
                gone = first - last
                expired = outlived(seen, self.ladder, gone)
                if expired:
                    reporter.expirations(
                        last + max(gone, seen),
                        now_ns,
                        expired,
                        peer_cpu=self.peer_cpu,
                        gone_ns=gone,
                        seen_ns=seen,
                    )
            latency = reporter.latency
            for sent, seq in heartbeats:
                previous = self.last_ns
                if previous is not None and seq == self.last_seq + 1:
                    latency.observe(sent - previous)
                if previous is None or sent >= previous:
                    self.last_ns = sent
                self.last_seq = seq
                reporter.count += 1
        self.prev_wake_ns = now_ns


class Side:
    """One sampler's membership: its slot, and a ``Watcher`` per peer it watches.

    :param board: the shared board.
    :param slot: this CPU's slot.
    :param peers: (slot, CPU) of each peer it watches.
    :param ladder: the timeouts, ascending.
    :param reporter: where its lines go (the sampler's own batch).
    """

    def __init__(
        self,
        board: Board,
        slot: int,
        peers: Sequence[tuple[int, int]],
        ladder: list[int],
        reporter: Reporter,
    ) -> None:
        self.board = board
        self.slot = slot
        self.reporter = reporter
        self.seq = board.seq(slot)  # a restarted sampler goes on from its last number
        self.watchers = [(peer_slot, Watcher(ladder, reporter, cpu)) for peer_slot, cpu in peers]
        self.heard = [board.seq(peer_slot) for peer_slot, _ in peers]

    def beat(self, now_ns: int) -> None:
        """Beat, read each peer's new heartbeats, judge (see the module docstring).

        The common cases take a short path with the same outcome (``Watcher.next_one``;
        nothing new: only the wake-up is noted): a beat comes every 5 ms on every CPU, and
        each step of it costs a cache-cold wake-up's share.
        """
        self.seq += 1
        board = self.board
        board.beat(self.slot, self.seq, now_ns)
        for k, (peer_slot, watcher) in enumerate(self.watchers):
            newest = board.seq(peer_slot)
            heard = self.heard[k]
            if newest == heard:
                watcher.prev_wake_ns = now_ns
                continue
            if newest == heard + 1 and watcher.next_one(
                now_ns, board.sent(peer_slot, newest), newest
            ):
                self.heard[k] = newest
                continue
            self.hear(k, now_ns)

    def hear(self, k: int, now_ns: int) -> None:
        """The rule in full for peer ``k``: read its heartbeats since the last one heard and
        hand them to its watcher.

        :param k: the peer's index in ``watchers``.
        :param now_ns: CLOCK_MONOTONIC at this wake-up.
        """
        peer_slot, watcher = self.watchers[k]
        board = self.board
        newest = board.seq(peer_slot)
        if newest < self.heard[k]:  # the board was made anew: start over
            watcher.last_ns, watcher.last_seq = None, -2
            self.heard[k] = 0
        beats = board.since(peer_slot, self.heard[k]) if newest != self.heard[k] else []
        if beats:
            self.heard[k] = beats[-1][1]
        watcher.wake(now_ns, beats)
