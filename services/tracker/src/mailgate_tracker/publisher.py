"""Publishing off the response path: a bounded in-memory buffer drained in the background.

A recipient's pixel or redirect does not wait for JetStream. Opens and clicks go into the
buffer; one background loop packs what it holds into ``track.batch`` messages (up to
``max_batch_events`` events and ``max_batch_bytes`` encoded bytes each) and publishes them,
at most ``concurrency`` at once. A batch waits up to ``linger_s`` for company before it goes
out (never longer than it takes to fill one), so a burst costs one JetStream message (one
fsync with ``sync_interval: always``) per batch instead of one per event. A batch is fixed
once formed: a retry after a lost ack publishes the same bytes with the same ``Nats-Msg-Id``
(its own ``event_id``), which JetStream's duplicate window drops; every contained event keeps
its own ``event_id`` for the ledger's per-event de-duplication.

While NATS is away the buffer holds events and the loop retries with backoff; when it is
full, new events are dropped and counted (``mailgate_tracker_events_dropped_total``), never
silently. When it is full while NATS is connected (JetStream merely slower than the traffic),
a request waits a bounded time for room instead: overload turns into latency before it turns
into loss. ``close()`` flushes within a time limit and counts what is left.

Callers that must know the event is durable (unsubscribe) use ``submit_durable`` and await
the returned future with their own timeout; their events go to the front of the queue and
are published as their own messages (subject ``track.unsubscribe``), as is any other event
that is not an open or a click.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from mailgate_core.nats import PublishError, publish_events
from mailgate_core.schemas import Event, TrackBatch, TrackClick, TrackOpen, encode
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge

log = structlog.get_logger()

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
FAILURE_LOG_INTERVAL_S = 10.0
#: Room beyond ``capacity`` kept for events a caller waits on (unsubscribes): a backlog of
#: opens and clicks never turns a person's unsubscribe away.
DURABLE_RESERVE = 1_000
#: Events published as their own messages (unsubscribes) at once.
DURABLE_BATCH = 64
#: Defaults for one ``track.batch`` message: events, encoded bytes (NATS refuses a message
#: above the server's ``max_payload``, 1 MB by default) and how long its first event may wait.
BATCH_MAX_EVENTS = 256
BATCH_MAX_BYTES = 512 * 1024
BATCH_LINGER_S = 0.01

_BATCHED = (TrackOpen, TrackClick)
_PUBLISH_ERRORS = (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError)


@dataclass(frozen=True)
class BufferMetrics:
    published: Counter
    dropped: Counter
    failures: Counter
    buffered: Gauge
    batches: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> BufferMetrics:
        return cls(
            published=Counter(
                "mailgate_tracker_events_published",
                "Tracking events acknowledged by JetStream (alone or inside a track.batch "
                "message), by the event's own subject.",
                ["subject"],
                registry=registry,
            ),
            dropped=Counter(
                "mailgate_tracker_events_dropped",
                "Tracking events given up: buffer_full (NATS away too long), shutdown, or "
                "invalid (not encodable as JSON).",
                ["reason"],
                registry=registry,
            ),
            failures=Counter(
                "mailgate_tracker_publish_failures",
                "Publish attempts (a batch, or a group of unsubscribes) that failed and will "
                "be retried.",
                registry=registry,
            ),
            buffered=Gauge(
                "mailgate_tracker_events_buffered",
                "Tracking events waiting in memory to be published.",
                registry=registry,
            ),
            batches=Counter(
                "mailgate_tracker_batches_published",
                "track.batch messages acknowledged by JetStream.",
                registry=registry,
            ),
        )


@dataclass
class _Durable:
    event: Event
    done: asyncio.Future[None] | None = None


@dataclass(frozen=True)
class Packed:
    """A formed ``track.batch`` message: the bytes never change, so a retry is the same
    message (``Nats-Msg-Id`` = ``event_id``)."""

    event_id: str
    data: bytes
    opens: int
    clicks: int

    @property
    def size(self) -> int:
        return self.opens + self.clicks


def pack(
    pending: deque[Any],
    max_events: int,
    max_bytes: int,
    dropped: Callable[[Event], None] | None = None,
) -> Packed | None:
    """Take up to ``max_events`` opens/clicks from the front of ``pending`` into one batch
    whose encoding fits ``max_bytes``; events that do not fit go back to the front. A single
    event is packed whatever its size (it is bounded far below NATS's limit). An event JSON
    cannot encode is left out and handed to ``dropped`` (``None`` when nothing is left)."""
    taken = [pending.popleft() for _ in range(min(max_events, len(pending)))]
    while True:
        opens = [e for e in taken if isinstance(e, TrackOpen)]
        clicks = [e for e in taken if not isinstance(e, TrackOpen)]
        batch = TrackBatch(opens=opens, clicks=clicks)
        try:
            data = encode(batch)
        except (UnicodeEncodeError, TypeError, ValueError):
            taken = _encodable(taken, dropped)  # never one bad event blocking the rest
            if not taken:
                return None
            continue
        if len(data) <= max_bytes or len(taken) == 1:
            return Packed(batch.event_id, data, len(opens), len(clicks))
        keep = len(taken) // 2
        pending.extendleft(reversed(taken[keep:]))
        del taken[keep:]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _encodable(events: list[Any], dropped: Callable[[Event], None] | None) -> list[Any]:
    """The events JSON can encode; the others are logged and left out (the handlers clean
    what they take from requests, so this is a last line of defence)."""
    good = []
    for event in events:
        try:
            encode(event)
        except (UnicodeEncodeError, TypeError, ValueError) as exc:
            log.error("track event not encodable, dropped", event_id=event.event_id, error=str(exc))
            if dropped is not None:
                dropped(event)
            continue
        good.append(event)
    return good


@dataclass
class EventBuffer:
    js: JetStreamContext
    metrics: BufferMetrics
    capacity: int = 10_000
    concurrency: int = 4
    """Publishes (batches, or groups of unsubscribes) awaiting their ack at once."""
    publish_timeout_s: float = 2.0
    connected: Callable[[], bool] = lambda: True
    max_batch_events: int = BATCH_MAX_EVENTS
    max_batch_bytes: int = BATCH_MAX_BYTES
    linger_s: float = BATCH_LINGER_S
    _pending: deque[TrackOpen | TrackClick] = field(default_factory=deque, init=False)
    _durable: deque[_Durable] = field(default_factory=deque, init=False)
    _retry: deque[Packed] = field(default_factory=deque, init=False)
    _retry_events: int = field(default=0, init=False)
    _first_at: float = field(default=0.0, init=False)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _room: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _in_flight: dict[asyncio.Task[None], list[_Durable] | Packed] = field(
        default_factory=dict, init=False
    )
    _closing: bool = field(default=False, init=False)
    _resume_at: float = field(default=0.0, init=False)
    _backoff_s: float = field(default=BACKOFF_MIN_S, init=False)
    _last_failure_log: float = field(default=0.0, init=False)
    _last_drop_log: float = field(default=0.0, init=False)
    _published: dict[str, Any] = field(default_factory=dict, init=False)
    _linger_done: asyncio.Future[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.metrics.buffered.set_function(self.__len__)
        for subject in ("track.open", "track.click"):
            self._published[subject] = self.metrics.published.labels(subject)

    def __len__(self) -> int:
        """Events buffered (not counting those being published right now)."""
        return len(self._pending) + len(self._durable) + self._retry_events

    @property
    def full(self) -> bool:
        # __len__ spelled out: asked on every request
        return len(self._pending) + len(self._durable) + self._retry_events >= self.capacity

    def submit(self, event: Event) -> bool:
        """Queue ``event``; ``False`` when the buffer is full (dropped and counted)."""
        if self._closing or self.full:
            self._drop(event)
            return False
        if isinstance(event, _BATCHED):
            pending = self._pending
            if not pending:
                self._first_at = time.monotonic()
            pending.append(event)
        else:
            self._durable.append(_Durable(event))
        if not self._wakeup.is_set():
            self._wakeup.set()
        return True

    def submit_batched(self, event: TrackOpen | TrackClick) -> bool:
        """``submit`` for an open or a click (the inline routes: one per request)."""
        pending = self._pending
        if self._closing or len(pending) + len(self._durable) + self._retry_events >= self.capacity:
            self._drop(event)
            return False
        if not pending:
            self._first_at = time.monotonic()
        pending.append(event)
        if not self._wakeup.is_set():
            self._wakeup.set()
        return True

    async def put(self, event: Event, *, max_wait_s: float) -> bool:
        """Like ``submit``, but while NATS is connected and the buffer is full, wait up to
        ``max_wait_s`` for room (backpressure) before dropping."""
        if self._closing or len(self) < self.capacity:
            return self.submit(event)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_s
        while self.full and not self._closing and self.connected():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), remaining)
        return self.submit(event)

    def submit_durable(self, event: Event) -> asyncio.Future[None] | None:
        """Queue ``event`` first in line, to be published as its own message; the future
        completes once JetStream acknowledged it (the event stays queued if the caller stops
        waiting). ``None`` when even the reserve beyond ``capacity`` is full."""
        if self._closing or len(self) >= self.capacity + DURABLE_RESERVE:
            self._drop(event)
            return None
        item = _Durable(event, asyncio.get_running_loop().create_future())
        self._durable.appendleft(item)
        self._wakeup.set()
        return item.done

    def _drop(self, event: Event) -> None:
        reason = "shutdown" if self._closing else "buffer_full"
        self.metrics.dropped.labels(reason).inc()
        now = time.monotonic()
        if now - self._last_drop_log >= FAILURE_LOG_INTERVAL_S:
            self._last_drop_log = now
            log.error("track event dropped", reason=reason, subject=event.subject())

    def _invalid(self, event: Event) -> None:
        self.metrics.dropped.labels("invalid").inc()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="track-publisher")

    async def close(self, timeout_s: float) -> int:
        """Stop taking events, publish what is buffered within ``timeout_s``; return how
        many were dropped (also counted with reason ``shutdown``)."""
        self._closing = True
        self._wakeup.set()
        if self._linger_done is not None:
            _resolve(self._linger_done)
        if self._task is not None:
            _, pending = await asyncio.wait([self._task], timeout=timeout_s)
            tasks = [*pending, *self._in_flight]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for job in self._in_flight.values():  # cancelled before they started
                self._requeue(job)
            self._in_flight.clear()
        left = len(self)
        if left:
            self.metrics.dropped.labels("shutdown").inc(left)
            log.error("track events dropped at shutdown", count=left)
            for item in self._durable:
                if item.done is not None and not item.done.done():
                    item.done.set_exception(PublishError("shutting down"))
                    item.done.exception()  # nobody may be waiting any more: no warning
            self._pending.clear()
            self._durable.clear()
            self._retry.clear()
            self._retry_events = 0
        self._room.set()
        return left

    # --- the background loop -------------------------------------------------------------

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        while True:
            if not (self._durable or self._retry or self._pending):
                if self._closing and not self._in_flight:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._durable and not self._retry and not self._closing:
                # Let a batch fill: wait until its first event is ``linger_s`` old, unless
                # it is already full.
                wait = self._first_at + self.linger_s - time.monotonic()
                if wait > 0 and len(self._pending) < self.max_batch_events:
                    await self._linger(wait)
                    continue
            delay = self._resume_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            if not self.connected():
                self._resume_at = time.monotonic() + 0.1
                continue
            await slots.acquire()  # more events gather meanwhile: larger batches
            job = self._next_job()
            if job is None:
                slots.release()
                continue
            task = asyncio.create_task(self._publish(job, slots))
            self._in_flight[task] = job

    async def _linger(self, wait_s: float) -> None:
        """Sleep ``wait_s``, or until ``close()`` (which publishes at once)."""
        loop = asyncio.get_running_loop()
        done = self._linger_done = loop.create_future()
        timer = loop.call_later(wait_s, _resolve, done)
        try:
            await done
        finally:
            timer.cancel()
            self._linger_done = None

    def _next_job(self) -> list[_Durable] | Packed | None:
        if self._durable:
            n = min(DURABLE_BATCH, len(self._durable))
            job: list[_Durable] | Packed = [self._durable.popleft() for _ in range(n)]
        elif self._retry:
            job = self._retry.popleft()
            self._retry_events -= job.size
        elif self._pending:
            packed = pack(self._pending, self.max_batch_events, self.max_batch_bytes, self._invalid)
            self._first_at = time.monotonic()
            if packed is None:
                return None
            job = packed
        else:
            return None
        self._room.set()
        return job

    async def _publish(self, job: list[_Durable] | Packed, slots: asyncio.Semaphore) -> None:
        try:
            if isinstance(job, Packed):
                await self._publish_batch(job)
            else:
                await publish_events(
                    self.js, [item.event for item in job], timeout=self.publish_timeout_s
                )
        except PublishError as exc:
            self._requeue(job)  # Nats-Msg-Id: a re-publish is harmless
            self._failed(exc)
            return
        except asyncio.CancelledError:
            self._requeue(job)  # counted by close()
            raise
        except Exception as exc:  # a bug must not lose the events either: retried, logged
            log.exception("track publish crashed")
            self._requeue(job)
            self._failed(exc)
            return
        finally:
            slots.release()
            self._in_flight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._wakeup.set()
        self._backoff_s = BACKOFF_MIN_S
        if isinstance(job, Packed):
            self.metrics.batches.inc()
            if job.opens:
                self._published["track.open"].inc(job.opens)
            if job.clicks:
                self._published["track.click"].inc(job.clicks)
            return
        for item in job:
            self.metrics.published.labels(item.event.subject()).inc()
            if item.done is not None and not item.done.done():
                item.done.set_result(None)

    async def _publish_batch(self, batch: Packed) -> None:
        try:
            await self.js.publish(
                TrackBatch.subject_prefix,
                batch.data,
                timeout=self.publish_timeout_s,
                headers={"Nats-Msg-Id": batch.event_id},
            )
        except _PUBLISH_ERRORS as exc:
            raise PublishError(f"{type(exc).__name__}: {exc}") from exc

    def _requeue(self, job: list[_Durable] | Packed) -> None:
        if isinstance(job, Packed):
            self._retry.appendleft(job)
            self._retry_events += job.size
        else:
            self._durable.extendleft(reversed(job))

    def _failed(self, exc: Exception) -> None:
        self.metrics.failures.inc()
        now = time.monotonic()
        self._resume_at = max(self._resume_at, now + self._backoff_s)
        self._backoff_s = min(BACKOFF_MAX_S, self._backoff_s * 2)
        if now - self._last_failure_log >= FAILURE_LOG_INTERVAL_S:
            self._last_failure_log = now
            log.warning("track event publish failed", buffered=len(self), error=str(exc))
