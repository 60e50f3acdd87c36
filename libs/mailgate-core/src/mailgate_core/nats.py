"""NATS connection, JetStream provisioning, durable publishing and pull-consumer workers.

Every service calls ``provision(js)`` at start-up: it creates (or updates to the current
config) every stream, KV bucket and object store, so services can start in any order.
All storage is file-backed; the nats-server we run has ``sync_interval: always`` so a
publish ack means the event is on disk.

The hot paths that skip nats-py's general publish and request machinery use ``nats_wire``
instead: ``publish_event``/``publish_events`` (through one ``JetStreamRequests`` per
connection, closed by ``ServiceBase.stop`` before the drain), the ledger's acks and STATUS
outbox, postal-sender's KV and publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    StorageType,
    StreamConfig,
)
from prometheus_client import CollectorRegistry, Gauge, Histogram

from . import nats_wire  # a cycle: nats_wire raises this module's PublishError
from .schemas import Event, encode

log = structlog.get_logger()

DAY_S = 24 * 3600.0


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age_s: float = 7 * DAY_S
    max_bytes: int = -1
    duplicate_window_s: float = 20 * 60.0
    allow_atomic: bool = False
    """JetStream atomic batch publishing (nats-server 2.12+): the ledger's outbox publishes
    STATUS in atomic batches, smtp-ingest's group commit (``publish_events(group=True)``)
    MAIL; the server stores a batch with one sync."""


#: The streams of design.md. ``discard=new`` makes a full stream refuse a publish (the
#: publisher answers 4xx) instead of silently dropping the oldest accepted mail.
STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("MAIL", ("mail.>",), allow_atomic=True),
    StreamSpec("POSTAL", ("postal.>",)),
    StreamSpec("TRACK", ("track.>",)),
    StreamSpec("STATUS", ("status.>",), allow_atomic=True),
    StreamSpec("STATS", ("stats.>",), max_age_s=30 * DAY_S),
)

#: KV buckets. ledger writes credentials/accounts/suppressions/endpoints (a cache of Postgres,
#: rebuilt on its start); postal-sender writes submissions (its idempotency record).
KV_CREDENTIALS = "credentials"
KV_ACCOUNTS = "accounts"
KV_SUPPRESSIONS = "suppressions"
KV_ENDPOINTS = "endpoints"
KV_SUBMISSIONS = "submissions"
KV_BUCKETS: dict[str, float | None] = {
    KV_CREDENTIALS: None,
    KV_ACCOUNTS: None,
    KV_SUPPRESSIONS: None,
    KV_ENDPOINTS: None,
    KV_SUBMISSIONS: 14 * DAY_S,
}
#: Buckets read with direct gets (``$JS.API.DIRECT.GET``: no JSON API request, no base64;
#: a quarter of nats-server's CPU per get). smtp-ingest reads suppressions once per recipient.
KV_DIRECT_GET = frozenset({KV_SUPPRESSIONS})
OBJECT_STORE_MAIL = "mail-blobs"


async def connect(url: str, name: str, **options: Any) -> NATS:
    """Connect with endless reconnects; logs disconnects instead of raising them."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", error=str(exc))

    async def on_disconnected() -> None:
        log.warning("nats disconnected")

    async def on_reconnected() -> None:
        log.info("nats reconnected")

    params: dict[str, Any] = {
        "servers": [u.strip() for u in url.split(",") if u.strip()],
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        "allow_reconnect": True,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
    }
    params.update(options)
    return await nats.connect(**params)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.stream_info(str(config.name))
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config)
            return
        except nats.js.errors.BadRequestError:
            pass  # another replica created it first
    await js.update_stream(config)


async def provision(
    js: JetStreamContext,
    *,
    stream_max_bytes: dict[str, int] | None = None,
    replicas: int = 1,
) -> None:
    """Create or update every stream, KV bucket and object store (idempotent)."""
    limits = stream_max_bytes or {}
    for spec in STREAMS:
        await _ensure_stream(
            js,
            StreamConfig(
                name=spec.name,
                subjects=list(spec.subjects),
                storage=StorageType.FILE,
                max_age=spec.max_age_s,
                max_bytes=limits.get(spec.name, spec.max_bytes),
                discard=DiscardPolicy.NEW,
                duplicate_window=spec.duplicate_window_s,
                num_replicas=replicas,
                allow_atomic=spec.allow_atomic or None,
            ),
        )
    for bucket, ttl in KV_BUCKETS.items():
        try:
            await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=1,
                    ttl=ttl,
                    direct=bucket in KV_DIRECT_GET,
                    storage=StorageType.FILE,
                    replicas=replicas,
                )
            )
    try:
        await js.object_store(OBJECT_STORE_MAIL)
    except nats.js.errors.BucketNotFoundError:
        await js.create_object_store(
            OBJECT_STORE_MAIL,
            ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas, ttl=7 * DAY_S),
        )


class PublishError(Exception):
    """The event could not be made durable; the caller must answer 4xx / nak."""


def _timeout_s(js: JetStreamContext, timeout: float | None) -> float:
    """``None``: the JetStream context's own timeout (as ``js.publish`` has it); a timeout
    that is not positive could never see an ack: PublishError before anything is sent."""
    if timeout is None:
        return nats_wire.jetstream_timeout(js)
    if not timeout > 0:
        raise PublishError(f"ValueError: publish timeout must be positive, not {timeout!r}")
    return timeout


async def publish_event(js: JetStreamContext, event: Event, *, timeout: float | None = 5.0) -> int:
    """Publish ``event`` on its subject with ``Nats-Msg-Id = event_id``; return the stream seq
    once JetStream acknowledged it (stored, or a duplicate of a stored one: then its seq).

    Raises PublishError when JetStream did not acknowledge it within ``timeout`` seconds (no
    stream, an API error, timeout, stream full, connection closed or draining): the event is
    then not durable and the input must not be acknowledged. ``timeout=None`` is the
    context's own (``nc.jetstream(timeout=...)``); zero or less raises PublishError at once.

    The publish goes out through the connection's shared ``nats_wire.JetStreamRequests``
    (nats-py's ``js.publish`` once that is closed), with ``js.publish``'s exceptions, which
    the PublishError's text names: ``"TimeoutError: nats: timeout"``.
    """
    timeout_s = _timeout_s(js, timeout)
    requests = nats_wire.connection_requests(js)
    if requests is not None:
        return await requests.publish_event(event, timeout_s=timeout_s)
    return await _publish_through_nats_py(js, event, timeout_s)


async def _publish_through_nats_py(js: JetStreamContext, event: Event, timeout: float) -> int:
    try:
        ack = await js.publish(
            event.subject(),
            encode(event),
            timeout=timeout,
            headers={"Nats-Msg-Id": event.event_id},
        )
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
        raise PublishError(f"{type(exc).__name__}: {exc}") from exc
    return int(ack.seq)


async def publish_events(
    js: JetStreamContext,
    events: Sequence[Event],
    *,
    timeout: float | None = 5.0,
    group: bool = False,
) -> list[int]:
    """Publish every event at once and wait for all of their acks (each within
    ``timeout``, as ``publish_event`` takes it); the stream seqs in order.

    The publishes go out back to back (in one write) and their acks come back together: one
    round trip for the lot instead of one per event. Raises PublishError unless JetStream
    acknowledged every one; some may then be stored, which ``Nats-Msg-Id`` makes harmless
    for a retry with the same events, and a caller answering 4xx lets the client retry.

    ``group=True``: group commit (``nats_wire.GroupCommit``) when every event goes to one
    stream with ``allow_atomic``: under load (``GROUP_WINDOW`` publishes of this connection
    awaiting their ack) the events of concurrent callers queue and go out together as one
    JetStream atomic batch (one store and one PubAck for the server); below it, as without.
    Same return, same errors, same guarantee."""
    timeout_s = _timeout_s(js, timeout)
    if group and events:
        stream = atomic_stream_of(events)
        grouped = nats_wire.connection_group_commit(js, stream) if stream else None
        if grouped is not None:
            return await grouped.publish(events, timeout_s=timeout_s)
    requests = nats_wire.connection_requests(js)
    if requests is not None:
        return await requests.publish_events(events, timeout_s=timeout_s)
    if len(events) == 1:
        return [await _publish_through_nats_py(js, events[0], timeout_s)]
    outcomes = await asyncio.gather(
        *(_publish_through_nats_py(js, event, timeout_s) for event in events),
        return_exceptions=True,
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            if isinstance(outcome, PublishError):
                raise outcome
            raise PublishError(f"{type(outcome).__name__}: {outcome}") from outcome
    return [int(seq) for seq in outcomes if not isinstance(seq, BaseException)]


_ATOMIC_STREAMS: dict[str, str | None] = {}
"""A subject's first token -> the stream with ``allow_atomic`` holding it (None: none)."""


def _atomic_stream_of(token: str) -> str | None:
    for spec in STREAMS:
        if f"{token}.>" in spec.subjects:  # every stream here is ``<token>.>``
            return spec.name if spec.allow_atomic else None
    return None


def atomic_stream_of(events: Sequence[Event]) -> str | None:
    """The one stream with ``allow_atomic`` (``STREAMS``) all ``events`` go to, else None."""
    stream: str | None = None
    for event in events:
        token = event.subject().partition(".")[0]
        try:
            found = _ATOMIC_STREAMS[token]
        except KeyError:
            found = _ATOMIC_STREAMS[token] = _atomic_stream_of(token)
        if found is None or (stream is not None and found != stream):
            return None
        stream = found
    return stream


def count_publish_batches(nc: NATS | None, registry: CollectorRegistry) -> Histogram:
    """``mailgate_nats_publish_batch_size``: messages per group commit (``publish_events(...,
    group=True)``) on ``nc``: an atomic batch's, a pipelined set's or a lone caller's."""
    histogram = Histogram(
        "mailgate_nats_publish_batch_size",
        "Messages per group commit of durable publishes (a JetStream atomic batch when >= 32).",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        registry=registry,
    )
    if nc is not None:
        nats_wire.observe_group_commits(nc, histogram.observe)
    return histogram


# --- pull consumers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    pass


@dataclass(frozen=True)
class Nak:
    """Redeliver after ``delay_s`` (transient failure)."""

    delay_s: float = 1.0


@dataclass(frozen=True)
class Term:
    """Never redeliver (poison message; the handler already recorded why)."""

    reason: str = ""


Outcome = Ack | Nak | Term

MessageHandler = Callable[[Msg], Awaitable[Outcome]]
BatchHandler = Callable[[Sequence[Msg]], Awaitable[Sequence[Outcome]]]


def backoff_delay(attempt: int, *, base_s: float = 1.0, cap_s: float = 300.0) -> float:
    """Exponential backoff with full jitter for the ``attempt``-th delivery (1-based)."""
    ceiling = min(cap_s, base_s * (2 ** max(0, attempt - 1)))
    return random.uniform(ceiling / 2, ceiling)


@dataclass
class PullWorker:
    """Fetches batches from a durable pull consumer and settles each message.

    ``stop()`` stops fetching, waits for the batch in hand to be handled and settled, then
    returns: that is the graceful-shutdown contract (finish in-flight work, ack, exit).

    With ``handler`` (a one-message handler) the worker runs without head-of-line blocking:
    up to ``concurrency`` messages in hand, each settled as soon as its own handling ends,
    and a new fetch as soon as a quarter of the slots is free. The batch mode waits for the
    slowest message of a batch before fetching again, which for slow handlers (an HTTP
    delivery that may take the whole timeout) would let one slow message delay all others.
    """

    js: JetStreamContext
    stream: str
    durable: str
    filter_subject: str
    handle_batch: BatchHandler
    batch: int = 64
    fetch_timeout_s: float = 1.0
    ack_wait_s: float = 60.0
    max_ack_pending: int = 1000
    max_deliver: int = -1
    settle_concurrency: int = 1
    """Acks of one batch sent at once (each is a round trip; 1 settles them in order)."""
    sync_acks: bool = True
    """Wait for the server to confirm each ack. An idempotent consumer may pass ``False``:
    a lost ack then means a redelivery, and a batch's acks cost no round trip each."""
    handler: MessageHandler | None = None
    """Per-message mode (see the class docstring); ``handle_batch`` is then unused."""
    concurrency: int = 100
    """Messages in hand at once in per-message mode."""
    eager: bool = False
    """Hand a fetch over as soon as one message is in: a one-message pull waits for it, then
    a pull expiring after ``top_up_s`` takes what else is ready. (nats-py's fetch of N, when
    the stream was empty, waits for N messages or ``fetch_timeout_s``: below saturation a
    message could wait up to that timeout.) One more pull request per fetch."""
    top_up_s: float = 0.002
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _sub: Any = field(default=None, init=False)
    _room: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _in_flight: int = field(default=0, init=False)

    def consumer_config(self) -> ConsumerConfig:
        """The durable consumer this worker creates (or binds to)."""
        return ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_ack_pending=self.max_ack_pending,
            max_deliver=self.max_deliver,
            filter_subject=self.filter_subject,
        )

    async def start(self) -> None:
        self._sub = await self.js.pull_subscribe(
            self.filter_subject,
            durable=self.durable,
            stream=self.stream,
            config=self.consumer_config(),
        )
        self._task = asyncio.create_task(self._run(), name=f"pull:{self.durable}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def in_flight(self) -> int:
        """Messages being handled now (per-message mode)."""
        return self._in_flight

    async def _pull(self, size: int) -> list[Msg]:
        if not self.eager or size <= 1:
            return list(await self._sub.fetch(size, timeout=self.fetch_timeout_s))
        msgs = list(await self._sub.fetch(1, timeout=self.fetch_timeout_s))
        try:
            msgs += await self._sub.fetch(size - 1, timeout=self.top_up_s)
        except (TimeoutError, nats.errors.TimeoutError):
            pass
        except Exception as exc:  # keep the message in hand; the next fetch tries again
            log.debug("top-up fetch failed", durable=self.durable, error=str(exc))
        return msgs

    async def _fetch(self, size: int) -> list[Msg] | None:
        """Up to ``size`` messages; ``None`` when the connection closed while stopping."""
        try:
            return await self._pull(size)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except (nats.errors.ConnectionClosedError, nats.errors.DrainTimeoutError):
            if self._stopping.is_set():
                return None
            await asyncio.sleep(0.5)
            return []
        except Exception as exc:  # reconnecting, consumer deleted, ...
            log.warning("fetch failed", durable=self.durable, error=str(exc))
            await asyncio.sleep(0.5)
            return []

    def _chunk(self) -> int:
        # Fetch in chunks: a pull request per freed slot would cost a round trip per message.
        return max(1, min(self.batch, self.concurrency) // 4)

    async def _run_each(self, handler: MessageHandler) -> None:
        tasks: set[asyncio.Task[None]] = set()
        chunk = self._chunk()
        while not self._stopping.is_set():
            free = self.concurrency - self._in_flight
            if free < chunk:
                self._room.clear()
                await self._room.wait()
                continue
            msgs = await self._fetch(min(free, self.batch))
            if msgs is None:
                break
            for msg in msgs:
                self._in_flight += 1
                task = asyncio.create_task(self._one(handler, msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if tasks:  # graceful stop: finish and settle what is in hand
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, handler: MessageHandler, msg: Msg) -> None:
        try:
            try:
                outcome = await handler(msg)
            except Exception:
                log.exception("message handler crashed", subject=msg.subject)
                outcome = Nak(backoff_delay(_delivered(msg)))
            await self._settle_one(msg, outcome)
        finally:
            self._in_flight -= 1
            if self.concurrency - self._in_flight >= self._chunk():
                self._room.set()

    async def _settle_one(self, msg: Msg, outcome: Outcome) -> None:
        """Settle one message of the per-message mode once its handling has ended (a
        subclass may hold acks back to send several in one write)."""
        await _settle(msg, outcome, sync=self.sync_acks)

    async def _run(self) -> None:
        if self.handler is not None:
            await self._run_each(self.handler)
            return
        while not self._stopping.is_set():
            try:
                msgs = await self._pull(self.batch)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.DrainTimeoutError):
                if self._stopping.is_set():
                    return
                await asyncio.sleep(0.5)
                continue
            except Exception as exc:  # reconnecting, consumer deleted, ...
                log.warning("fetch failed", durable=self.durable, error=str(exc))
                await asyncio.sleep(0.5)
                continue
            if not msgs:
                continue
            try:
                outcomes = await self.handle_batch(msgs)
            except Exception:
                log.exception("batch handler crashed", durable=self.durable, size=len(msgs))
                outcomes = [Nak(backoff_delay(_delivered(m))) for m in msgs]
            await _settle_all(msgs, outcomes, self.settle_concurrency, sync=self.sync_acks)

    async def stop(self) -> None:
        self._stopping.set()
        self._room.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


def per_message(handler: MessageHandler, concurrency: int = 16) -> BatchHandler:
    """Adapt a one-message handler to a batch handler running up to ``concurrency`` at once."""
    sem = asyncio.Semaphore(concurrency)

    async def one(msg: Msg) -> Outcome:
        async with sem:
            try:
                return await handler(msg)
            except Exception:
                log.exception("message handler crashed", subject=msg.subject)
                return Nak(backoff_delay(_delivered(msg)))

    async def batch(msgs: Sequence[Msg]) -> Sequence[Outcome]:
        return await asyncio.gather(*(one(m) for m in msgs))

    return batch


def _delivered(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


def delivery_count(msg: Msg) -> int:
    """How many times JetStream has delivered ``msg`` (1 on the first delivery)."""
    return _delivered(msg)


async def _settle_all(
    msgs: Sequence[Msg], outcomes: Sequence[Outcome], concurrency: int, *, sync: bool
) -> None:
    if concurrency <= 1:
        for msg, outcome in zip(msgs, outcomes, strict=True):
            await _settle(msg, outcome, sync=sync)
        return
    sem = asyncio.Semaphore(concurrency)

    async def one(msg: Msg, outcome: Outcome) -> None:
        async with sem:
            await _settle(msg, outcome, sync=sync)

    await asyncio.gather(*(one(m, o) for m, o in zip(msgs, outcomes, strict=True)))


async def _settle(msg: Msg, outcome: Outcome, *, sync: bool = True) -> None:
    try:
        if isinstance(outcome, Ack):
            if sync:
                await msg.ack_sync(timeout=5.0)
            else:
                await msg.ack()
        elif isinstance(outcome, Nak):
            await msg.nak(delay=outcome.delay_s)
        else:
            await msg.term()
    except Exception as exc:
        # The ack did not reach the server: JetStream redelivers after ack_wait and the
        # handler's idempotency makes that harmless.
        log.warning("settle failed", subject=msg.subject, error=str(exc))


class ConsumerLag:
    """Backlog gauges of durable pull consumers, read from JetStream's consumer info.

    ``mailgate_consumer_pending_messages{stream,consumer}`` counts messages not yet delivered,
    ``mailgate_consumer_ack_pending_messages`` those delivered but not yet acknowledged. The
    consumer is shared, so every replica reports the same numbers: aggregate with ``max``.
    """

    def __init__(
        self, js: JetStreamContext, registry: CollectorRegistry, *, interval_s: float = 15.0
    ) -> None:
        self._js = js
        self._interval_s = interval_s
        self._consumers: list[tuple[str, str]] = []
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        labels = ["stream", "consumer"]
        self.pending = Gauge(
            "mailgate_consumer_pending_messages",
            "Messages of a durable consumer's stream not yet delivered (its backlog).",
            labels,
            registry=registry,
        )
        self.ack_pending = Gauge(
            "mailgate_consumer_ack_pending_messages",
            "Messages delivered to a durable consumer and not yet acknowledged.",
            labels,
            registry=registry,
        )

    def watch(self, stream: str, durable: str) -> None:
        if (stream, durable) not in self._consumers:
            self._consumers.append((stream, durable))

    async def refresh(self) -> None:
        for stream, durable in self._consumers:
            try:
                info = await self._js.consumer_info(stream, durable, timeout=2.0)
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                log.debug("consumer info failed", durable=durable, error=str(exc))
                continue
            self.pending.labels(stream, durable).set(info.num_pending or 0)
            self.ack_pending.labels(stream, durable).set(info.num_ack_pending or 0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="consumer-lag")

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._stopping.wait()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
