"""Publishing off the response path: a bounded in-memory buffer drained by background tasks.

A recipient's pixel or redirect does not wait for JetStream. Events go into the buffer and a
few publisher tasks send them, each with its own ``event_id`` as ``Nats-Msg-Id``, so a retry
after a lost ack is dropped by JetStream's duplicate window. While NATS is away the buffer
holds events and the tasks retry with backoff; when it is full, new events are dropped and
counted (``mailgate_tracker_events_dropped_total``), never silently. When it is full while
NATS is connected (JetStream merely slower than the traffic), a request waits a bounded time
for room instead: overload turns into latency before it turns into loss. ``close()`` flushes
within a time limit and counts what is left.

Callers that must know the event is durable (unsubscribe) use ``submit_durable`` and await
the returned future with their own timeout; their events go to the front of the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from mailgate_core.nats import PublishError, publish_events
from mailgate_core.schemas import Event
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge

log = structlog.get_logger()

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
FAILURE_LOG_INTERVAL_S = 10.0
#: Room beyond ``capacity`` kept for events a caller waits on (unsubscribes): a backlog of
#: opens and clicks never turns a person's unsubscribe away.
DURABLE_RESERVE = 1_000
#: Events one publisher task publishes at once.
BATCH = 64


@dataclass(frozen=True)
class BufferMetrics:
    published: Counter
    dropped: Counter
    failures: Counter
    buffered: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> BufferMetrics:
        return cls(
            published=Counter(
                "mailgate_tracker_events_published",
                "Tracking events acknowledged by JetStream, by subject.",
                ["subject"],
                registry=registry,
            ),
            dropped=Counter(
                "mailgate_tracker_events_dropped",
                "Tracking events given up: buffer_full (NATS away too long) or shutdown.",
                ["reason"],
                registry=registry,
            ),
            failures=Counter(
                "mailgate_tracker_publish_failures",
                "Publish attempts that failed and will be retried.",
                registry=registry,
            ),
            buffered=Gauge(
                "mailgate_tracker_events_buffered",
                "Tracking events waiting in memory to be published.",
                registry=registry,
            ),
        )


@dataclass
class _Item:
    event: Event
    done: asyncio.Future[None] | None = None


@dataclass
class EventBuffer:
    js: JetStreamContext
    metrics: BufferMetrics
    capacity: int = 10_000
    concurrency: int = 32
    publish_timeout_s: float = 2.0
    connected: Callable[[], bool] = lambda: True
    _queue: deque[_Item] = field(default_factory=deque, init=False)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _room: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)
    _closing: bool = field(default=False, init=False)
    _resume_at: float = field(default=0.0, init=False)
    _backoff_s: float = field(default=BACKOFF_MIN_S, init=False)
    _last_failure_log: float = field(default=0.0, init=False)
    _last_drop_log: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.metrics.buffered.set_function(lambda: len(self._queue))

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        return len(self._queue) >= self.capacity

    def submit(self, event: Event) -> bool:
        """Queue ``event``; ``False`` when the buffer is full (dropped and counted)."""
        item = self._admit(event)
        if item is None:
            return False
        self._queue.append(item)
        self._wakeup.set()
        return True

    async def put(self, event: Event, *, max_wait_s: float) -> bool:
        """Like ``submit``, but while NATS is connected and the buffer is full, wait up to
        ``max_wait_s`` for room (backpressure) before dropping."""
        if not self.full or self._closing:
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
        """Queue ``event`` first in line; the future completes once JetStream acknowledged
        it (the event stays queued if the caller stops waiting). ``None`` when even the
        reserve beyond ``capacity`` is full."""
        item = self._admit(event, reserve=DURABLE_RESERVE)
        if item is None:
            return None
        item.done = asyncio.get_running_loop().create_future()
        self._queue.appendleft(item)
        self._wakeup.set()
        return item.done

    def _admit(self, event: Event, reserve: int = 0) -> _Item | None:
        if not self._closing and len(self._queue) < self.capacity + reserve:
            return _Item(event)
        reason = "shutdown" if self._closing else "buffer_full"
        self.metrics.dropped.labels(reason).inc()
        now = time.monotonic()
        if now - self._last_drop_log >= FAILURE_LOG_INTERVAL_S:
            self._last_drop_log = now
            log.error("track event dropped", reason=reason, subject=event.subject())
        return None

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._publisher(), name=f"track-publisher-{i}")
            for i in range(self.concurrency)
        ]

    async def close(self, timeout_s: float) -> int:
        """Stop taking events, publish what is buffered within ``timeout_s``; return how
        many were dropped (also counted with reason ``shutdown``)."""
        self._closing = True
        self._wakeup.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        left = len(self._queue)
        if left:
            self.metrics.dropped.labels("shutdown").inc(left)
            log.error("track events dropped at shutdown", count=left)
            for item in self._queue:
                if item.done is not None and not item.done.done():
                    item.done.set_exception(PublishError("shutting down"))
                    item.done.exception()  # nobody may be waiting any more: no warning
            self._queue.clear()
        return left

    async def _publisher(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            delay = self._resume_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            if not self.connected():
                self._resume_at = time.monotonic() + 0.1
                continue
            # Up to BATCH events at once: their publishes go out back to back and the acks
            # are awaited together (one round trip for the lot, not one each).
            items = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            self._room.set()
            try:
                await publish_events(
                    self.js, [item.event for item in items], timeout=self.publish_timeout_s
                )
            except PublishError as exc:
                self._queue.extendleft(reversed(items))  # Nats-Msg-Id: a re-publish is harmless
                self._failed(exc)
                continue
            except asyncio.CancelledError:
                self._queue.extendleft(reversed(items))  # counted by close()
                raise
            self._backoff_s = BACKOFF_MIN_S
            for item in items:
                self.metrics.published.labels(item.event.subject()).inc()
                if item.done is not None and not item.done.done():
                    item.done.set_result(None)

    def _failed(self, exc: Exception) -> None:
        self.metrics.failures.inc()
        now = time.monotonic()
        self._resume_at = max(self._resume_at, now + self._backoff_s)
        self._backoff_s = min(BACKOFF_MAX_S, self._backoff_s * 2)
        if now - self._last_failure_log >= FAILURE_LOG_INTERVAL_S:
            self._last_failure_log = now
            log.warning("track event publish failed", buffered=len(self._queue), error=str(exc))
