"""The Postmaster polling loop: one cycle every ``interval_s``, within the rate limit.

A cycle asks ``reg-list`` (unless POSTMASTER_DOMAINS is set) and ``troubles-list`` (group
"reg", one key for the account), then the ``stat-list-detailed`` requests ``plan_cycle``
lists (group "stat", one key per domain). Requests wait in one queue per domain; the next one
sent is always the one whose domain gets a free slot soonest, so a domain with many msgtypes
or a long backfill never holds up the others and nothing is sent that the limiter would not
allow. Each answer's days are published as ``stats.postmaster.daily`` (unchanged days are
skipped) and only then is the (domain, msgtype) cursor saved in the ``stats-poller`` KV bucket.

A rejected refresh token ("token not found") halts the poller: ``mailgate_postmaster_auth_failed``
goes to 1 and one error is logged; no further token requests are made until a restart with a
corrected POSTMASTER_REFRESH_TOKEN.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Protocol

import msgspec
import structlog
from mailgate_core.schemas import PostmasterDaily
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, Counter, Gauge

from .postmaster import (
    DayStats,
    DomainTroubles,
    PostmasterApiError,
    PostmasterAuthError,
    PostmasterClient,
    PostmasterError,
    PostmasterRateLimited,
    PostmasterTokenRejected,
    PostmasterTransportError,
)
from .schedule import (
    Cursor,
    CursorKey,
    StatRequest,
    Window,
    cursor_key,
    daily_event,
    gauge_day,
    local_day,
    plan_cycle,
    trouble_check,
)

log = structlog.get_logger()

KV_BUCKET = "stats-poller"

Publish = Callable[[PostmasterDaily], Awaitable[object]]


class Stopped(Exception):
    """The service is stopping: abandon the wait (and the cycle)."""


class StopSleep:
    """``await sleep(s)``: a real sleep that ends at once with ``Stopped`` on ``stop()``."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        if self.stopping.is_set():
            raise Stopped
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=max(0.0, seconds))
        if self.stopping.is_set():
            raise Stopped

    def stop(self) -> None:
        self.stopping.set()


class CursorStore(Protocol):
    async def load(self) -> dict[CursorKey, date]: ...

    async def save(self, domain: str, msgtype: str | None, day: date) -> None: ...


class KvCursorStore:
    """Cursors in the ``stats-poller`` KV bucket (created by the service at start-up)."""

    def __init__(self, kv: KeyValue, clock: Callable[[], float] = time.time) -> None:
        self._kv = kv
        self._clock = clock

    async def load(self) -> dict[CursorKey, date]:
        out: dict[CursorKey, date] = {}
        try:
            keys = await self._kv.keys()
        except NoKeysError:
            return out
        for key in keys:
            if not key.startswith("cursor."):
                continue
            try:
                entry = await self._kv.get(key)
                cursor = msgspec.json.decode(entry.value or b"", type=Cursor)
                out[(cursor.domain, cursor.msgtype)] = date.fromisoformat(cursor.last_date)
            except (KeyNotFoundError, msgspec.DecodeError, msgspec.ValidationError, ValueError):
                continue
        return out

    async def save(self, domain: str, msgtype: str | None, day: date) -> None:
        value = Cursor(
            domain=domain, msgtype=msgtype, last_date=day.isoformat(), updated_at=self._clock()
        )
        await self._kv.put(cursor_key(domain, msgtype), msgspec.json.encode(value))


class PostmasterMetrics:
    STAT_FIELDS = (
        "messages_sent",
        "delivered",
        "read",
        "spam",
        "probably_spam",
        "complaints",
        "reputation",
        "trend",
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["domain", "msgtype"]
        self.stats = {
            name: Gauge(
                f"mailgate_postmaster_{name}",
                f"Mail.ru Postmaster {name} of the latest complete day, per DKIM domain and "
                'msgtype (msgtype "" = the whole domain).',
                labels,
                registry=registry,
            )
            for name in self.STAT_FIELDS
        }
        self.day = Gauge(
            "mailgate_postmaster_stats_day_timestamp_seconds",
            "Unix time (00:00 UTC) of the day the Postmaster gauges show.",
            labels,
            registry=registry,
        )
        self.trouble = Gauge(
            "mailgate_postmaster_dns_trouble",
            "1 per DNS trouble Postmaster reports for a domain (check: spf/dkim/dmarc/other).",
            ["domain", "check", "code"],
            registry=registry,
        )
        self.domains = Gauge(
            "mailgate_postmaster_domains", "Domains polled in the last cycle.", registry=registry
        )
        self.requests = Counter(
            "mailgate_postmaster_requests",
            "Postmaster API requests by method and HTTP status (0 = no answer).",
            ["method", "status"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "mailgate_postmaster_rate_limited",
            "HTTP 429 answers received despite the client-side limiter.",
            registry=registry,
        )
        self.limiter_wait = Counter(
            "mailgate_postmaster_limiter_wait_seconds",
            "Time spent waiting for a free rate-limit slot.",
            registry=registry,
        )
        self.token_refreshes = Counter(
            "mailgate_postmaster_token_refreshes",
            "Access tokens exchanged from the refresh token.",
            registry=registry,
        )
        self.auth_failed = Gauge(
            "mailgate_postmaster_auth_failed",
            "1 when Postmaster rejected POSTMASTER_REFRESH_TOKEN (polling halted).",
            registry=registry,
        )
        self.cycles = Counter(
            "mailgate_postmaster_cycles", "Polling cycles by result.", ["result"], registry=registry
        )
        self.failed_requests = Counter(
            "mailgate_postmaster_failed_requests",
            "stat-list-detailed requests that failed (retried next cycle), by reason.",
            ["reason"],
            registry=registry,
        )
        self.events = Counter(
            "mailgate_postmaster_events_published",
            "stats.postmaster.daily events published.",
            registry=registry,
        )
        self.last_success = Gauge(
            "mailgate_postmaster_last_success_timestamp_seconds",
            "Unix time of the last complete Postmaster cycle.",
            registry=registry,
        )
        self._series: set[tuple[str, str]] = set()
        self._troubles: set[tuple[str, str, str]] = set()

    def observe_request(self, method: str, status: int, _seconds: float) -> None:
        self.requests.labels(method, str(status)).inc()
        if status == 429:
            self.rate_limited.inc()

    def set_day(self, domain: str, msgtype: str | None, day: DayStats) -> None:
        labels = (domain, msgtype or "")
        for name in self.STAT_FIELDS:
            value = getattr(day, name)
            if value is not None:
                self.stats[name].labels(*labels).set(value)
        with contextlib.suppress(ValueError):
            self.day.labels(*labels).set(
                (date.fromisoformat(day.date) - date(1970, 1, 1)).total_seconds()
            )
        self._series.add(labels)

    def keep_only(self, keep: set[tuple[str, str]]) -> None:
        """Drop the series of (domain, msgtype) pairs no longer polled."""
        for labels in self._series - keep:
            for gauge in (*self.stats.values(), self.day):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        self._series &= keep

    def set_troubles(self, troubles: Sequence[DomainTroubles]) -> None:
        now = {
            (t.domain.lower(), trouble_check(e.msg), str(e.code))
            for t in troubles
            for e in t.errors
        }
        for labels in self._troubles - now:
            with contextlib.suppress(KeyError):
                self.trouble.remove(*labels)
        for labels in now:
            self.trouble.labels(*labels).set(1)
        self._troubles = now


@dataclass
class CycleReport:
    domains: int = 0
    requests: int = 0
    published: int = 0
    failed: int = 0
    troubles: list[DomainTroubles] = field(default_factory=list)


class PostmasterPoller:
    def __init__(
        self,
        client: PostmasterClient,
        cursors: CursorStore,
        publish: Publish,
        metrics: PostmasterMetrics,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        interval_s: float,
        window: Window,
        static_domains: Sequence[str] = (),
        msgtypes: Callable[[], Sequence[str]] = lambda: (),
        tz_offset_h: float = 3.0,
        max_consecutive_failures: int = 3,
        warmup: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._warmup = warmup
        self._client = client
        self._cursors = cursors
        self._publish = publish
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._interval_s = interval_s
        self._window = window
        self._static_domains = [d.strip().lower() for d in static_domains if d.strip()]
        self._msgtypes = msgtypes
        self._tz_offset_h = tz_offset_h
        self._max_failures = max_consecutive_failures
        self._cursor_cache: dict[CursorKey, date] | None = None
        self._published_ids: dict[tuple[str, str, str], str] = {}
        self.halted = False
        self.cycles = 0
        self._task: asyncio.Task[None] | None = None

    # --- one cycle -------------------------------------------------------------------

    async def run_cycle(self) -> CycleReport:
        report = CycleReport()
        domains = self._static_domains or sorted({d.lower() for d in await self._client.reg_list()})
        report.domains = len(domains)
        self._metrics.domains.set(len(domains))
        report.troubles = await self._client.troubles_list()
        self._metrics.set_troubles(report.troubles)
        if self._cursor_cache is None:
            self._cursor_cache = await self._cursors.load()
        today = local_day(self._clock(), self._tz_offset_h)
        msgtypes = list(dict.fromkeys(self._msgtypes()))
        plan = plan_cycle(domains, msgtypes, self._cursor_cache, today, self._window)
        await self._execute(plan, today, report)
        self._metrics.keep_only({(d, m or "") for d in domains for m in (None, *msgtypes)})
        self._prune(today)
        return report

    async def _execute(self, plan: list[StatRequest], today: date, report: CycleReport) -> None:
        queues: dict[tuple[str, str], deque[tuple[StatRequest, int]]] = {}
        for request in plan:
            queues.setdefault(request.key, deque()).append((request, 0))
        limiter = self._client.limiter
        failures = 0
        while queues:
            key = min(queues, key=limiter.available_at)  # dicts keep plan order on ties
            wait_s = limiter.available_at(key) - self._clock()
            if wait_s > 0:
                self._metrics.limiter_wait.inc(wait_s)
                await self._sleep(wait_s)
            request, attempt = queues[key].popleft()
            if not queues[key]:
                del queues[key]
            report.requests += 1
            try:
                report.published += await self._poll(request, today)
                failures = 0
            except PostmasterRateLimited as exc:
                # The limiter is blocked for this key now; try again after the others.
                if attempt < 3:
                    queues.setdefault(key, deque()).append((request, attempt + 1))
                else:
                    report.failed += 1
                    self._metrics.failed_requests.labels("rate_limited").inc()
                log.warning("postmaster request deferred", domain=request.domain, error=str(exc))
            except PostmasterApiError as exc:
                report.failed += 1
                self._metrics.failed_requests.labels("api_error").inc()
                log.warning(
                    "postmaster api error",
                    domain=request.domain,
                    msgtype=request.msgtype,
                    error=exc.error,
                )
            except PostmasterTransportError as exc:
                report.failed += 1
                failures += 1
                self._metrics.failed_requests.labels("transport").inc()
                log.warning("postmaster request failed", domain=request.domain, error=str(exc))
                if failures >= self._max_failures:
                    raise

    async def _poll(self, request: StatRequest, today: date) -> int:
        try:
            answer = await self._client.stat_list_detailed(
                request.date_from,
                request.date_to,
                domain=request.domain,
                msgtype=request.msgtype,
            )
        except PostmasterApiError as exc:
            if not (request.msgtype and exc.is_no_data):
                raise
            answer = []  # no mail with this msgtype on this domain: nothing to backfill
        days = [d for block in answer if block.domain.lower() == request.domain for d in block.data]
        published = 0
        now = self._clock()
        for day in days:
            if not day.date:
                continue
            event = daily_event(request.domain, request.msgtype, day, now)
            slot = (request.domain, request.msgtype or "", day.date)
            if self._published_ids.get(slot) == event.event_id:
                continue
            await self._publish(event)  # raises when not durable: the cursor stays put
            self._published_ids[slot] = event.event_id
            published += 1
        self._metrics.events.inc(published)
        if request.date_to >= today - timedelta(days=1):
            shown = gauge_day(days, today)
            if shown is not None:
                self._metrics.set_day(request.domain, request.msgtype, shown)
        await self._cursors.save(request.domain, request.msgtype, request.date_to)
        assert self._cursor_cache is not None
        self._cursor_cache[(request.domain, request.msgtype)] = request.date_to
        return published

    def _prune(self, today: date) -> None:
        oldest = (today - timedelta(days=400)).isoformat()
        for slot in [s for s in self._published_ids if s[2] < oldest]:
            del self._published_ids[slot]

    # --- the loop --------------------------------------------------------------------

    async def run(self, *, until: float | None = None) -> None:
        """Cycle every ``interval_s`` until stopped, halted or (simulated) ``until``."""
        if self._warmup is not None:  # e.g. the first AMS poll, for the active msgtypes
            with contextlib.suppress(Exception):
                await self._warmup()
        while not self.halted and (until is None or self._clock() < until):
            started = self._clock()
            try:
                report = await self.run_cycle()
                self.cycles += 1
                result = "ok" if not report.failed else "partial"
                self._metrics.cycles.labels(result).inc()
                self._metrics.last_success.set(time.time())
                log.info(
                    "postmaster cycle done",
                    domains=report.domains,
                    requests=report.requests,
                    published=report.published,
                    failed=report.failed,
                )
            except PostmasterTokenRejected as exc:
                self.halted = True
                self._metrics.auth_failed.set(1)
                self._metrics.cycles.labels("auth_failed").inc()
                log.error(
                    "postmaster refresh token rejected, polling stopped",
                    error=str(exc),
                    fix="set a valid POSTMASTER_REFRESH_TOKEN and restart stats-poller",
                )
                return
            except Stopped:
                return
            except (PostmasterAuthError, PostmasterError) as exc:
                self._metrics.cycles.labels("error").inc()
                log.warning("postmaster cycle failed", error=str(exc))
            except Exception:
                self._metrics.cycles.labels("error").inc()
                log.exception("postmaster cycle crashed")
            pause = started + self._interval_s - self._clock()
            if until is not None:
                pause = min(pause, until - self._clock())
            try:
                await self._sleep(max(0.0, pause))
            except Stopped:
                return

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="postmaster-poller")

    async def stop(self) -> None:
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=5.0)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
