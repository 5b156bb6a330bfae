"""Record one guest agent over HTTP: its events by sequence number, and clock samples.

The agent's contract (agent/http.py) as this module uses it:

``GET /events?since=SEQ&limit=N``
    JSON Lines of the events with ``seq > since``. ``X-Tsprobe-Next-Since`` is the
    ``since`` of the next page, ``X-Tsprobe-Last-Seq`` the newest ``seq`` assigned,
    ``X-Tsprobe-Missed`` how many events after ``since`` fell out of the agent's ring,
    and ``X-Tsprobe-Agent-Id`` changes when the agent restarts (``seq`` starts again).
``GET /clock``
    JSON with the guest's ``realtime_ns``, ``monotonic_ns``, ``boottime_ns`` read just
    before the reply is written.

``AgentRecorder`` follows pages until ``next_since`` reaches ``last_seq`` and appends each
event line verbatim, in ``seq`` order, to the guest events file, then an ``arrival``
record to ``arrivals-NAME.jsonl``: the page's host receive time and how many lines the
events file has with it (``analysis.analyze.delivery`` measures from them how late each event
reached the host). Gaps in ``seq`` (a jump,
or ``X-Tsprobe-Missed``), the agent becoming unreachable and reachable again, and agent
restarts become records in ``agent-NAME.jsonl``. While the agent is unreachable (a paused
migration freezes the guest, so requests time out) it retries with exponential backoff
capped at ``MAX_BACKOFF_S``; ``since`` is kept, so everything missed is fetched afterwards.
When the recording ends it fetches once more, whatever happened before, with a timeout of
at least ``FINAL_TIMEOUT_S``, and takes a last clock sample with the same timeout: a loaded
guest may answer too slowly for the request timeout for a while after a stall, and its
last events and its clock after the migration must still reach the run directory. A last
fetch that failed is tried again, up to ``FINAL_RETRIES`` times, when the agent answered
the clock sample; one that never got through is said (an ``incomplete`` record, and
``final_fetch`` false in meta.json with ``agent_last_seq``, the newest ``seq`` the agent
said it had), so that a run cannot look complete while the agent's last events are missing.

Before that last fetch the recorder drains the agent's workers: the stall samplers and the
canaries hold their events until their next sign of life (about once a second, later on a
loaded guest), so an event measured before the end can still be on its way into the log.
``GET /healthz`` gives the agent's CLOCK_MONOTONIC (``mono_ns``) and each worker unit's
newest sign of life on it (``workers``; ``agent.workers.Supervisor.heard``). The first
answer's ``mono_ns`` is the mark; while a unit is behind, the recorder fetches the events
(what the workers report meanwhile arrives as soon as it would have before the stop) and
asks again every ``DRAIN_POLL_S``, until every unit has reported past the mark or
``drain_ns`` has passed. A unit still behind then is said (an
``incomplete`` record naming it and how far it reported, ``drained`` false in meta.json,
``workers_behind``), and so is an agent whose /healthz does not say (``drained`` None). An
agent that does not answer /healthz at all is not waited for: its last fetch fails too.

Clock samples: every ``clock_period_ns`` and on request (each migration phase change) a
burst of ``burst_reads`` ``/clock`` reads; the read with the shortest round trip is kept,
with the host's realtime and monotonic send and receive times around it. The guest's
clock offset is then ``guest time - midpoint`` with an error bound of half the round trip.

Requests are blocking ``urllib`` calls, each with a timeout, run in a small thread pool of
the recorder's own (proxies from the environment are ignored: the URL is contacted
directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from analysis.errors import RecorderError
from analysis.rundir import JsonlWriter, host_now
from probe.addresses import MAX_HOST, parse_port
from probe.errors import AddressError

#: Events asked for per page.
PAGE_LIMIT = 1000
#: Backoff while unreachable: first pause and cap.
MIN_BACKOFF_S = 0.1
MAX_BACKOFF_S = 1.0
#: The timeout of the last fetch when the recording ends (at least the client's own).
FINAL_TIMEOUT_S = 5.0
#: More tries of a last fetch that failed while the agent still answered /clock.
FINAL_RETRIES = 2
#: The longest wait for the workers to report past the end (``tsprobe record --drain``).
DRAIN_NS = 10_000_000_000
#: Pause between two /healthz asks while draining.
DRAIN_POLL_S = 0.25


def workers_heard(body: bytes) -> tuple[int, dict[str, int | None]] | None:
    """Read /healthz's ``mono_ns`` and ``workers`` (each unit as ``"probe unit"``).

    :param body: the /healthz body.
    :return: the agent's CLOCK_MONOTONIC and how far each unit has reported on it; None
        when the body does not say (an older agent, or not a /healthz body).
    """
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    now, workers = doc.get("mono_ns"), doc.get("workers")
    if type(now) is not int or not isinstance(workers, dict):
        return None
    heard: dict[str, int | None] = {}
    for probe, units in workers.items():
        if not isinstance(units, dict):
            return None
        for unit, at in units.items():
            if at is not None and type(at) is not int:
                return None
            heard[f"{str(probe)[:40]} {str(unit)[:40]}"] = at
    return now, heard


def check_agent_url(url: str) -> str:
    """Validate an agent base URL.

    :param url: e.g. ``http://127.0.0.1:9466``.
    :raise RecorderError: when it is not an http URL with a host.
    :return: the URL without a trailing slash.
    """
    shown = url if len(url) <= 80 else f"{url[:60]}...({len(url)} characters)"
    try:
        parts = urlsplit(url.strip())
    except ValueError as err:  # an unclosed [ of an IPv6 address
        raise RecorderError(f"invalid agent URL {shown!r}: {err}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise RecorderError(f"invalid agent URL {shown!r}: expected http://HOST:PORT")
    hostport = parts.netloc.rpartition("@")[2]
    after_host = hostport.rpartition("]")[2] if hostport.startswith("[") else hostport
    _host, sep, port = after_host.partition(":")
    if sep:
        try:
            parse_port(port)
        except AddressError as err:
            raise RecorderError(f"invalid agent URL {shown!r}: {err}") from None
    if len(parts.hostname) > MAX_HOST:
        raise RecorderError(f"invalid agent URL {shown!r}: the host name is too long")
    return url.strip().rstrip("/")


@dataclass(frozen=True)
class HttpReply:
    """One HTTP exchange and the host times around it."""

    status: int
    headers: dict[str, str]
    body: bytes
    send_real_ns: int
    send_mono_ns: int
    recv_real_ns: int
    recv_mono_ns: int

    @property
    def rtt_ns(self) -> int:
        return self.recv_mono_ns - self.send_mono_ns


class FetchError(Exception):
    """A request that got no usable answer; the message says why, in one line."""


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout_s: float) -> HttpReply:
    """GET ``url`` (blocking), with the host times around the exchange.

    :param url: the full URL.
    :param timeout_s: connect and per-read timeout.
    :raise FetchError: on any failure, including a status other than 200.
    :return: the reply.
    """
    send_real, send_mono = host_now()
    try:
        with _OPENER.open(url, timeout=timeout_s) as resp:
            body = resp.read()
            status = int(resp.status)
            headers = {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        raise FetchError(f"HTTP {err.code} from {url}") from err
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise FetchError(f"timed out after {timeout_s:g}s") from err
        raise FetchError(str(getattr(reason, "strerror", None) or reason)) from err
    recv_real, recv_mono = host_now()
    if status != 200:
        raise FetchError(f"HTTP {status} from {url}")
    return HttpReply(status, headers, body, send_real, send_mono, recv_real, recv_mono)


@dataclass
class AgentSummary:
    """What meta.json says about one agent."""

    url: str
    events_file: str
    agent_ids: list[str] = field(default_factory=list)
    boot_id: str | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    events: int = 0
    gaps: int = 0
    missed_events: int = 0
    unreachable_periods: int = 0
    restarts: int = 0
    clock_samples: int = 0
    reachable: bool | None = None
    #: The newest ``seq`` the agent said it had assigned (``X-Tsprobe-Last-Seq``).
    agent_last_seq: int | None = None
    #: Whether the last fetch, when the recording ended, got through.
    final_fetch: bool | None = None
    #: Whether every worker unit had reported past the end before the last fetch (None:
    #: the agent did not say, or did not answer), and how long that took.
    drained: bool | None = None
    drain_waited_s: float | None = None
    #: The units still behind when the drain gave up: ``"probe unit"`` -> how far each
    #: reported (guest CLOCK_MONOTONIC ns; None: never).
    workers_behind: dict[str, int | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
            for k, v in self.__dict__.items()
        }


class AgentRecorder:
    """Pulls one agent's events and clock samples until told to stop.

    :param name: the agent's name (used in records and file names).
    :param url: its base URL, e.g. ``http://127.0.0.1:9466``.
    :param events: where event lines go (``guest-events[-NAME].jsonl``).
    :param notes: the recorder's notes about this agent (``agent-NAME.jsonl``).
    :param clock: clock samples (``clock-samples.jsonl``, shared by all agents).
    :param arrivals: when each page arrived (``arrivals-NAME.jsonl``), or None.
    :param events_poll_ns: pause between event fetches while the agent answers.
    :param clock_period_ns: pause between periodic clock bursts.
    :param request_timeout_ns: timeout of each HTTP request.
    :param burst_reads: /clock reads per burst.
    :param drain_ns: the longest wait, at the end, for the workers to report past it.
    :param on_note: called with (agent name, message) for reachability changes.
    """

    def __init__(
        self,
        name: str,
        url: str,
        events: JsonlWriter,
        notes: JsonlWriter,
        clock: JsonlWriter,
        *,
        arrivals: JsonlWriter | None = None,
        events_poll_ns: int = 250_000_000,
        clock_period_ns: int = 1_000_000_000,
        request_timeout_ns: int = 1_000_000_000,
        burst_reads: int = 5,
        drain_ns: int = DRAIN_NS,
        on_note: Callable[[str, str], None] | None = None,
    ) -> None:
        self.name = name
        self.url = check_agent_url(url)
        self._events = events
        self._notes = notes
        self._clock = clock
        self._arrivals = arrivals
        self._events_poll_s = events_poll_ns / 1e9
        self._clock_period_s = clock_period_ns / 1e9
        self._timeout_s = request_timeout_ns / 1e9
        self._burst_reads = max(1, burst_reads)
        self._drain_s = max(0, drain_ns) / 1e9
        self._on_note = on_note
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"tsprobe-{name}")
        self._since = 0
        self._agent_id: str | None = None
        self._unreachable_since: tuple[int, int] | None = None
        self._failed_requests = 0
        self._burst_reasons: list[str] = []
        self._burst_wanted = asyncio.Event()
        self.summary = AgentSummary(self.url, events.path.name)

    # -- plumbing -----------------------------------------------------------------------

    def _note(self, note: str, message: str, **extra: Any) -> None:
        self._notes.write_stamped(
            {"type": note, "agent": self.name, "url": self.url, "message": message, **extra}
        )
        if self._on_note is not None:
            self._on_note(self.name, message)

    async def _get(self, path: str, timeout_s: float | None = None) -> HttpReply:
        loop = asyncio.get_running_loop()
        try:
            reply = await loop.run_in_executor(
                self._pool, http_get, self.url + path, timeout_s or self._timeout_s
            )
        except FetchError as err:
            self._mark_unreachable(str(err))
            raise
        self._mark_reachable()
        return reply

    def _mark_unreachable(self, reason: str) -> None:
        self._failed_requests += 1
        if self._unreachable_since is None:
            self._unreachable_since = host_now()
            self.summary.unreachable_periods += 1
            self.summary.reachable = False
            self._note("unreachable", f"unreachable: {reason}", reason=reason, since=self._since)

    def _mark_reachable(self) -> None:
        if self._unreachable_since is not None:
            real0, mono0 = self._unreachable_since
            _real, mono = host_now()
            self._unreachable_since = None
            self._note(
                "reachable",
                f"reachable again after {(mono - mono0) / 1e9:.1f}s",
                unreachable_since_real_ns=real0,
                unreachable_since_mono_ns=mono0,
                unreachable_ns=mono - mono0,
                failed_requests=self._failed_requests,
            )
            self._failed_requests = 0
        self.summary.reachable = True

    @property
    def reachable(self) -> bool:
        """Whether the last request got an answer."""
        return self._unreachable_since is None

    # -- events -------------------------------------------------------------------------

    def _check_identity(self, headers: dict[str, str]) -> bool:
        """Track the agent id; return False when it changed (seq restarted)."""
        agent_id = headers.get("x-tsprobe-agent-id")
        boot_id = headers.get("x-tsprobe-boot-id")
        if agent_id is None or agent_id == self._agent_id:
            return True
        previous = self._agent_id
        self._agent_id = agent_id
        self.summary.agent_ids.append(agent_id)
        self.summary.boot_id = boot_id
        if previous is None:
            self._note("connected", f"agent {agent_id}", agent_id=agent_id, boot_id=boot_id)
            return True
        self.summary.restarts += 1
        self._note(
            "restart",
            f"agent restarted ({previous} -> {agent_id}): seq starts again",
            old_agent_id=previous,
            new_agent_id=agent_id,
            boot_id=boot_id,
            last_seq=self._since,
        )
        self._since = 0
        return False

    def _gap(self, first_missing: int, last_missing: int, reported: int) -> None:
        count = last_missing - first_missing + 1
        self.summary.gaps += 1
        self.summary.missed_events += count
        self._note(
            "gap",
            f"events {first_missing}..{last_missing} lost ({count})",
            first_missing_seq=first_missing,
            last_missing_seq=last_missing,
            missed=count,
            reported_missed=reported,
        )

    def _take_page(self, reply: HttpReply) -> int:
        """Write a page's lines; return how many."""
        missed = int(reply.headers.get("x-tsprobe-missed", "0") or 0)
        written = 0
        gap_noted = False
        for raw in reply.body.decode("utf-8", errors="replace").splitlines():
            if not raw.strip():
                continue
            try:
                seq = int(json.loads(raw)["seq"])
            except (ValueError, KeyError, TypeError) as err:
                self._note("bad-line", f"unparsable event line skipped: {err}", line=raw[:200])
                continue
            if seq <= self._since:
                continue  # already written
            if seq > self._since + 1:
                self._gap(self._since + 1, seq - 1, missed)
                gap_noted = True
            self._events.write_line(raw)
            written += 1
            self._since = seq
            self.summary.events += 1
            if self.summary.first_seq is None:
                self.summary.first_seq = seq
            self.summary.last_seq = seq
        if written and self._arrivals is not None:
            self._arrivals.write(
                {
                    "type": "arrival",
                    "agent": self.name,
                    "last_seq": self._since,
                    "events": written,
                    "lines": self._events.count,
                    "host_real_ns": reply.recv_real_ns,
                    "host_mono_ns": reply.recv_mono_ns,
                    "host_send_real_ns": reply.send_real_ns,
                }
            )
        if missed and written and not gap_noted:
            self._note(
                "gap",
                f"agent reports {missed} events lost after seq {self._since}",
                missed=missed,
                reported_missed=missed,
            )
            self.summary.gaps += 1
            self.summary.missed_events += missed
        return written

    async def fetch_events(self, timeout_s: float | None = None) -> bool:
        """Fetch every event after the last one written, following pages.

        :param timeout_s: each request's timeout (default: the client's).
        :return: False when the agent could not be reached.
        """
        for _ in range(10_000):
            try:
                reply = await self._get(
                    f"/events?since={self._since}&limit={PAGE_LIMIT}", timeout_s
                )
            except FetchError:
                return False
            if not self._check_identity(reply.headers):
                continue  # the agent restarted: fetch its events from the start
            written = self._take_page(reply)
            try:
                next_since = int(reply.headers.get("x-tsprobe-next-since", self._since))
                last_seq = int(reply.headers.get("x-tsprobe-last-seq", self._since))
            except ValueError:
                return True
            self.summary.agent_last_seq = last_seq
            if written == 0 and next_since > self._since:
                # Nothing after since is left: the events up to next_since are gone.
                missed = int(reply.headers.get("x-tsprobe-missed", "0") or 0)
                self._gap(self._since + 1, next_since, missed)
                self._since = next_since
            if written == 0 or self._since >= last_seq:
                return True
        return True

    async def _events_loop(self, stop: asyncio.Event) -> None:
        backoff = MIN_BACKOFF_S
        while not stop.is_set():
            if await self.fetch_events():
                backoff = MIN_BACKOFF_S
                pause = self._events_poll_s
            else:
                pause = backoff
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)

    def _end_note(self, fetched: bool) -> None:
        """Keep whether the last fetch got through, and say what may be missing if not."""
        self.summary.final_fetch = fetched
        if not fetched:
            self._note(
                "incomplete",
                f"the last fetch of events failed: events after seq {self._since} the agent "
                "may hold never reached the recorder",
                last_seq=self._since,
                agent_last_seq=self.summary.agent_last_seq,
            )

    # -- drain --------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Wait until every worker unit of the agent has reported past the end (see the
        module docstring); keep the outcome in the summary and say what stays behind.

        :param timeout_s: the timeout of each /healthz request.
        """
        started = time.monotonic()
        deadline = started + self._drain_s
        mark: int | None = None
        behind: dict[str, int | None] = {}
        while True:
            try:
                reply = await self._get("/healthz", timeout_s)
            except FetchError:
                if mark is None:
                    return  # no answer at all: the last fetch will fail and say so
            else:
                reading = workers_heard(reply.body)
                if reading is None:
                    self._note(
                        "incomplete",
                        "the agent's /healthz does not say how far its workers have "
                        "reported: events they measured in the last seconds may be missing",
                    )
                    return
                now_ns, heard = reading
                mark = now_ns if mark is None else mark
                behind = {unit: at for unit, at in heard.items() if at is None or at < mark}
                if not behind:
                    break
            if time.monotonic() >= deadline:
                break
            await self.fetch_events()
            await asyncio.sleep(DRAIN_POLL_S)
        waited = round(time.monotonic() - started, 3)
        self.summary.drained = not behind
        self.summary.drain_waited_s = waited
        self.summary.workers_behind = behind
        if behind:
            self._note(
                "incomplete",
                f"{', '.join(sorted(behind))} had not reported past the end of the recording "
                f"after {waited:g} s: what they measured after their last report may be missing",
                mark_mono_ns=mark,
                workers_behind=behind,
            )

    # -- clock --------------------------------------------------------------------------

    def request_burst(self, reason: str) -> None:
        """Ask for a /clock burst now (a phase change); returns at once.

        :param reason: recorded with the sample, e.g. ``src:postcopy-active``.
        """
        self._burst_reasons.append(reason)
        self._burst_wanted.set()

    async def clock_burst(
        self, reason: str, stop: asyncio.Event | None = None, timeout_s: float | None = None
    ) -> dict[str, Any] | None:
        """Read /clock ``burst_reads`` times; record and return the best sample.

        :param reason: why the burst was taken (recorded).
        :param stop: when set, the burst ends after the read in flight (a periodic burst
            need not delay the recording's end: the final burst follows).
        :param timeout_s: per read, instead of the client's timeout (the final burst).
        :return: the record written, or None when no read succeeded.
        """
        best: tuple[HttpReply, dict[str, Any]] | None = None
        ok = 0
        for _ in range(self._burst_reads):
            if stop is not None and stop.is_set():
                break
            try:
                reply = await self._get("/clock", timeout_s)
                body = json.loads(reply.body)
            except FetchError:
                break
            except ValueError:
                continue
            if not isinstance(body, dict):
                continue
            ok += 1
            if best is None or reply.rtt_ns < best[0].rtt_ns:
                best = (reply, body)
        if best is None:
            return None
        reply, body = best
        record: dict[str, Any] = {
            "agent": self.name,
            "reason": reason,
            "host_send_real_ns": reply.send_real_ns,
            "host_send_mono_ns": reply.send_mono_ns,
            "host_recv_real_ns": reply.recv_real_ns,
            "host_recv_mono_ns": reply.recv_mono_ns,
            "rtt_ns": reply.rtt_ns,
            "host_real_ns": (reply.send_real_ns + reply.recv_real_ns) // 2,
            "host_mono_ns": (reply.send_mono_ns + reply.recv_mono_ns) // 2,
            "reads": self._burst_reads,
            "ok_reads": ok,
            "clock": body,
        }
        self._clock.write(record)
        self.summary.clock_samples += 1
        return record

    async def _clock_loop(self, stop: asyncio.Event) -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            delay = max(0.0, next_at - time.monotonic())
            waiters = {
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._burst_wanted.wait()),
            }
            try:
                await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waiters:
                    task.cancel()
            if stop.is_set():
                break
            if self._burst_reasons:
                reasons, self._burst_reasons = self._burst_reasons, []
                self._burst_wanted.clear()
                await self.clock_burst(",".join(dict.fromkeys(reasons)), stop)
                continue
            self._burst_wanted.clear()
            next_at = time.monotonic() + self._clock_period_s
            if self.reachable:
                await self.clock_burst("periodic", stop)

    # -- the recording --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Record until ``stop`` is set; then fetch once more and take a last clock sample.

        :param stop: set it to end the recording.
        """
        fetched = False
        try:
            await asyncio.gather(self._events_loop(stop), self._clock_loop(stop))
            # Also after failures: an agent that answered too slowly for the request
            # timeout (a loaded guest right after a stall) still holds the events, and
            # the end of the recording must not lose them.
            final_timeout = self._final_timeout_s()
            await self.drain(final_timeout)
            fetched = await self.fetch_events(final_timeout)
            # With the same patience, whether or not the fetch got through: the clock lag
            # after a migration is read from this sample, and the recorder had none from
            # the destination in a CI run whose agent was unreachable for the last 5 s
            # (QEMU 10.0 MTTCG precopy on a loaded host).
            answered = await self.clock_burst("final", timeout_s=final_timeout) is not None
            # An agent that answers /clock holds its events too: a CI run lost 25 events
            # (its stalls of the pause) to one /events request that timed out after a
            # paused postcopy on QEMU 10.0, while /clock answered right after it.
            for _ in range(FINAL_RETRIES if answered else 0):
                if fetched:
                    break
                fetched = await self.fetch_events(final_timeout)
            self._end_note(fetched)
        except asyncio.CancelledError:
            if self.summary.final_fetch is None:
                self._end_note(fetched)  # cut short: what did not get through is said
            raise
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _final_timeout_s(self) -> float:
        return max(self._timeout_s, FINAL_TIMEOUT_S)

    def end_budget_s(self) -> float:
        """The longest the end of ``run`` can take once ``stop`` is set (a recorder that
        winds down waits this long before it cancels): the drain, then each request of the
        end with its timeout (the drain's last, the fetch, the clock burst, the retries).

        :return: seconds.
        """
        requests = 2 + self._burst_reads + FINAL_RETRIES
        return self._drain_s + requests * self._final_timeout_s()
