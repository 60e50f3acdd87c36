"""``status.>`` and ``webhook.retry.>`` -> signed HTTP POSTs -> ack / retry task / dead letter.

``StatusHandler`` makes the first try of every delivery of a status event; what does not get
through becomes a ``RetryTask`` (published before the status message is acked).
``RetryHandler`` owns each task until it is delivered or dead-lettered. Both go through the
``Dispatcher``, which applies the endpoint's breaker and concurrency limit (``breaker.py``)
and batching (``batching.py``) around one HTTP attempt (``delivery.py``).
"""

from __future__ import annotations

import asyncio
import random
import time

import msgspec
import structlog
from mailgate_core.nats import (
    Ack,
    Nak,
    Outcome,
    PublishError,
    Term,
    backoff_delay,
    delivery_count,
    publish_event,
)
from mailgate_core.records import EndpointRecord
from mailgate_core.schemas import (
    SchemaError,
    StatusEvent,
    WebhookDeadLettered,
    WebhookDelivered,
    decode,
)
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .batching import BatchConfig, Batcher
from .breaker import LaneBusy, Lanes
from .campaigns import CampaignTally, is_counted
from .delivery import (
    AttemptResult,
    Deferred,
    Delivered,
    Deliverer,
    DeliveryProgress,
    Failed,
    Refused,
)
from .endpoints import EndpointCache
from .metrics import WebhookMetrics
from .payload import build_body, targets
from .retry import RetryPolicy, RetryTask, decode_task, encode_task, retry_msg_id, retry_subject

log = structlog.get_logger()

#: Progress mark of a status message whose event is in the campaign counters (never an
#: endpoint id: those are ULIDs).
COUNTED = "#counted"
#: Deliveries of a status message whose event could not be counted before counting is given
#: up (backoff 1 s doubling to 5 min: a quarter of an hour).
COUNT_MAX_DELIVERIES = 12


class Dispatcher:
    """One try of one event at one endpoint: breaker, concurrency limit, batching, metrics."""

    def __init__(
        self,
        deliverer: Deliverer,
        lanes: Lanes,
        metrics: WebhookMetrics,
        batch: BatchConfig,
        records: DeliveryRecords | None = None,
    ) -> None:
        self._deliverer = deliverer
        self.lanes = lanes
        self._metrics = metrics
        self._records = records
        self.batcher = Batcher(self._post, batch)

    async def send(
        self, event: StatusEvent, endpoint: EndpointRecord, *, attempt: int = 1
    ) -> AttemptResult:
        """One try; ``attempt`` is its number (1 = first try), recorded with a success.

        A success is recorded (``mail.webhook_delivered``) before this returns, so before the
        caller acks its message; each event of a batch records its own fact, concurrently
        with the others (every item's caller runs here in its own task)."""
        lane = self.lanes.get(endpoint.id)
        if lane.breaker.is_open():
            return self._defer(endpoint.id, "circuit_open")
        body = build_body(event, endpoint)
        if endpoint.batch:
            result = await self.batcher.submit(endpoint, event, body)
        else:
            result = await self._post(endpoint, event.event_id, body, 1)
        if isinstance(result, Delivered):
            lag_s = max(0.0, time.time() - event.occurred_at)
            self._metrics.lag.observe(lag_s)
            self._metrics.endpoint_lag.labels(endpoint.id).set(lag_s)
            if self._records is not None:
                await self._records.record(event, endpoint, result, attempt)
        return result

    async def _post(
        self, endpoint: EndpointRecord, webhook_id: str, body: bytes, items: int
    ) -> AttemptResult:
        lane = self.lanes.get(endpoint.id)
        try:
            async with lane.slot():
                if not lane.breaker.try_admit():
                    return self._defer(endpoint.id, "circuit_open")
                started = time.monotonic()
                result = await self._deliverer.attempt(endpoint, webhook_id, body)
                if not isinstance(result, Refused):
                    self._metrics.duration.observe(time.monotonic() - started)
        except LaneBusy:
            return self._defer(endpoint.id, "busy")
        if isinstance(result, Refused):
            lane.breaker.release_probe()
            return result
        self._metrics.attempts.labels(endpoint.id).inc()
        if items > 1 or endpoint.batch:
            self._metrics.batch_size.observe(items)
        if isinstance(result, Delivered):
            lane.breaker.record_success()
        else:
            assert isinstance(result, Failed)
            lane.breaker.record_failure()
            lane.last_failure = result.reason
            lane.last_http_status = result.status
            self._metrics.failures.labels(endpoint.id).inc()
        return result

    def _defer(self, endpoint_id: str, reason: str) -> Deferred:
        lane = self.lanes.get(endpoint_id)
        self._metrics.deferred.labels(endpoint_id, reason).inc()
        if reason == "circuit_open":
            wait = lane.breaker.retry_in_s()
            # Spread the deferred deliveries so the half-open probe is not a stampede.
            return Deferred("circuit open", wait * random.uniform(1.0, 1.2) + random.random())
        return Deferred("endpoint busy", lane.busy_retry_in_s())

    async def close(self) -> None:
        await self.batcher.close()


class DeliveryRecords:
    """Publishes ``mail.webhook_delivered`` for each successful delivery (the ledger shows it
    in the message's history). Best effort: a failed publish is logged and counted, never
    retried by re-sending the webhook."""

    def __init__(self, js: JetStreamContext, metrics: WebhookMetrics) -> None:
        self._js = js
        self._metrics = metrics

    async def record(
        self, event: StatusEvent, endpoint: EndpointRecord, result: Delivered, attempts: int
    ) -> None:
        fact = WebhookDelivered(
            event_id=f"wd-{event.event_id}-{endpoint.id}",
            status_event_id=event.event_id,
            status_name=event.name,
            message=event.message,
            endpoint_id=endpoint.id,
            url=endpoint.url,
            http_status=result.status,
            attempts=attempts,
            duration_ms=round(result.duration_s * 1000, 3),
        )
        try:
            await publish_event(self._js, fact)
        except Exception as exc:  # PublishError, or the connection is closing
            self._metrics.delivery_records_failed.inc()
            log.warning(
                "webhook delivery not recorded",
                mailgate_id=event.message.mailgate_id,
                event_id=event.event_id,
                endpoint_id=endpoint.id,
                error=str(exc),
            )


def dead_letter_id(event: StatusEvent, endpoint_id: str) -> str:
    """``dl-{event_id}-{endpoint_id}``; a replay (the ledger names its endpoints and stamps a
    fresh ``occurred_at``) that fails again gets its own id, suffixed with that stamp in ms, so
    JetStream's de-duplication does not drop it and the ledger lists it as a new dead letter.
    Retries of one replay carry the same stamp, so a repeated publish stays a no-op."""
    base = f"dl-{event.event_id}-{endpoint_id}"
    if event.endpoint_ids:
        return f"{base}-r{round(event.occurred_at * 1000)}"
    return base


class DeadLetters:
    """Publishes ``mail.webhook_dead_lettered`` (the ledger keeps it for listing/replay)."""

    def __init__(self, js: JetStreamContext, metrics: WebhookMetrics) -> None:
        self._js = js
        self._metrics = metrics

    async def publish(
        self,
        event: StatusEvent,
        endpoint_id: str,
        *,
        url: str,
        attempts: int,
        reason: str,
        http_status: int | None,
    ) -> None:
        """Raises PublishError when the dead letter is not durable (then nak and retry)."""
        dead = WebhookDeadLettered(
            event_id=dead_letter_id(event, endpoint_id),
            status=event,
            endpoint_id=endpoint_id,
            url=url,
            attempts=attempts,
            reason=reason,
            http_status=http_status,
        )
        await publish_event(self._js, dead)
        self._metrics.outcomes.labels("dead_letter").inc()
        self._metrics.dead_letters.labels(endpoint_id).inc()
        log.error(
            "webhook dead-lettered",
            mailgate_id=event.message.mailgate_id,
            event_id=event.event_id,
            endpoint_id=endpoint_id,
            attempts=attempts,
            reason=reason,
            http_status=http_status,
        )


def _log_result(
    event: StatusEvent, endpoint_id: str, result: AttemptResult, **extra: object
) -> None:
    ids = {
        "mailgate_id": event.message.mailgate_id,
        "event_id": event.event_id,
        "status": event.name,
        "endpoint_id": endpoint_id,
        **extra,
    }
    if isinstance(result, Delivered):
        log.debug("webhook delivered", http_status=result.status, **ids)
    elif isinstance(result, Refused):
        log.warning("webhook refused", reason=result.reason, **ids)
    elif isinstance(result, Failed):
        log.info(
            "webhook delivery failed",
            reason=result.reason,
            http_status=result.status,
            response=result.snippet or None,
            **ids,
        )
    else:
        log.debug(
            "webhook deferred", reason=result.reason, retry_in_s=round(result.retry_in_s, 2), **ids
        )


def _outcome_name(result: AttemptResult) -> str:
    return {Delivered: "delivered", Failed: "failed", Refused: "refused", Deferred: "deferred"}[
        type(result)
    ]


class StatusHandler:
    """First try of each delivery of a ``status.>`` message; with automatic stop on, also
    its count in the campaign counters (``tally``), stored before the message is acked."""

    def __init__(
        self,
        *,
        js: JetStreamContext,
        endpoints: EndpointCache,
        dispatcher: Dispatcher,
        dead_letters: DeadLetters,
        retry: RetryPolicy,
        metrics: WebhookMetrics,
        progress: DeliveryProgress | None = None,
        tally: CampaignTally | None = None,
    ) -> None:
        self._js = js
        self._endpoints = endpoints
        self._dispatcher = dispatcher
        self._dead_letters = dead_letters
        self._retry = retry
        self._metrics = metrics
        self._progress = progress if progress is not None else DeliveryProgress()
        self._tally = tally

    async def __call__(self, msg: Msg) -> Outcome:
        try:
            event = decode(msg.data, StatusEvent)
        except SchemaError as exc:
            log.error("undecodable status event", subject=msg.subject, error=str(exc))
            return Term("undecodable")
        ref = event.message
        chosen = targets(self._endpoints.endpoints(ref.account_id), event)
        counting = self._tally is not None and is_counted(event)
        if not chosen and not counting:
            return Ack()
        seq = _stream_seq(msg)
        key = str(seq)
        done = self._progress.done(key)
        count: asyncio.Future[bool] | None = None
        if counting and COUNTED not in done:
            assert self._tally is not None
            count = self._tally.submit(event)  # written while the webhooks go out
        pending = [e for e in chosen if e.id not in done]
        results: list[AttemptResult]
        if not pending:
            results = []
        elif len(pending) == 1:  # the usual case: no gather, no extra task
            results = [await self._dispatcher.send(event, pending[0])]
        else:
            results = list(
                await asyncio.gather(*(self._dispatcher.send(event, e) for e in pending))
            )

        remaining_s = self._retry.remaining_s(event, time.time())
        unsettled = False
        served: list[str] = []
        for endpoint, result in zip(pending, results, strict=True):
            self._metrics.outcomes.labels(_outcome_name(result)).inc()
            _log_result(event, endpoint.id, result)
            if isinstance(result, Failed | Deferred):
                try:
                    if remaining_s <= 0:
                        await self._dead_letter(event, endpoint, result)
                    else:
                        await self._queue_retry(event, endpoint, result, seq)
                except PublishError as exc:
                    log.warning(
                        "retry task not queued",
                        mailgate_id=ref.mailgate_id,
                        event_id=event.event_id,
                        endpoint_id=endpoint.id,
                        error=str(exc),
                    )
                    unsettled = True
                    continue
            served.append(endpoint.id)
        count_delay_s = 0.0
        if count is not None:
            assert self._tally is not None
            if await count:
                served.append(COUNTED)
            elif delivery_count(msg) >= COUNT_MAX_DELIVERIES:
                # Counting has failed for a long time (backoff up to 5 min each): give it up
                # rather than hold this message, and with enough of them every delivery.
                self._tally.give_up(event)
            else:
                unsettled = True
                count_delay_s = backoff_delay(delivery_count(msg))
        if unsettled:  # redelivered soon: remember who needs nothing more
            for endpoint_id in served:
                self._progress.mark(key, endpoint_id)
            return Nak(max(count_delay_s, random.uniform(1.0, 3.0)))
        if done:
            self._progress.forget(key)
        return Ack()

    async def _queue_retry(
        self, event: StatusEvent, endpoint: EndpointRecord, result: Failed | Deferred, seq: int
    ) -> None:
        task = RetryTask(
            status=event,
            endpoint_id=endpoint.id,
            attempts=1 if isinstance(result, Failed) else 0,
            reason=result.reason,
            http_status=result.status if isinstance(result, Failed) else None,
            queued_at=time.time(),
        )
        try:
            await self._js.publish(
                retry_subject(endpoint.id),
                encode_task(task),
                timeout=5.0,
                headers={"Nats-Msg-Id": retry_msg_id(event.event_id, endpoint.id, seq)},
            )
        except Exception as exc:  # timeout, no responders, stream full...
            raise PublishError(f"{type(exc).__name__}: {exc}") from exc
        self._metrics.retries_queued.inc()

    async def _dead_letter(
        self, event: StatusEvent, endpoint: EndpointRecord, result: Failed | Deferred
    ) -> None:
        await self._dead_letters.publish(
            event,
            endpoint.id,
            url=endpoint.url,
            attempts=1 if isinstance(result, Failed) else 0,
            reason=result.reason,
            http_status=result.status if isinstance(result, Failed) else None,
        )


class RetryHandler:
    """Tries a ``RetryTask`` again, with backoff, until delivered or past the deadline."""

    def __init__(
        self,
        *,
        endpoints: EndpointCache,
        dispatcher: Dispatcher,
        dead_letters: DeadLetters,
        retry: RetryPolicy,
        metrics: WebhookMetrics,
    ) -> None:
        self._endpoints = endpoints
        self._dispatcher = dispatcher
        self._dead_letters = dead_letters
        self._retry = retry
        self._metrics = metrics

    async def __call__(self, msg: Msg) -> Outcome:
        try:
            task = decode_task(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("undecodable retry task", subject=msg.subject, error=str(exc))
            return Term("undecodable")
        event = task.status
        endpoint = self._endpoints.find(event.message.account_id, task.endpoint_id)
        if endpoint is None or not endpoint.enabled:
            self._metrics.outcomes.labels("dropped").inc()
            log.info(
                "webhook retry dropped",
                mailgate_id=event.message.mailgate_id,
                event_id=event.event_id,
                endpoint_id=task.endpoint_id,
                reason="endpoint removed or disabled",
            )
            return Ack()
        tries = task.attempts + delivery_count(msg) - 1
        lane = self._dispatcher.lanes.get(endpoint.id)
        remaining_s = self._retry.remaining_s(event, time.time())
        if remaining_s <= 0:
            last = lane.last_failure or task.reason
            return await self._give_up(
                event, endpoint, tries, last, lane.last_http_status or task.http_status
            )

        result = await self._dispatcher.send(event, endpoint, attempt=tries + 1)
        self._metrics.outcomes.labels(_outcome_name(result)).inc()
        _log_result(event, endpoint.id, result, tries=tries + 1)
        if isinstance(result, Delivered | Refused):
            return Ack()
        remaining_s = self._retry.remaining_s(event, time.time())
        if isinstance(result, Failed):
            if remaining_s <= 0:
                return await self._give_up(event, endpoint, tries + 1, result.reason, result.status)
            return Nak(
                self._retry.delay_s(tries + 1, remaining_s, at_least_s=result.retry_after_s or 0.0)
            )
        if remaining_s <= 0:
            reason = f"{result.reason}; last failure: {lane.last_failure or task.reason}"
            return await self._give_up(event, endpoint, tries, reason, lane.last_http_status)
        return Nak(max(0.05, min(result.retry_in_s, remaining_s)))

    async def _give_up(
        self,
        event: StatusEvent,
        endpoint: EndpointRecord,
        attempts: int,
        reason: str,
        http_status: int | None,
    ) -> Outcome:
        try:
            await self._dead_letters.publish(
                event,
                endpoint.id,
                url=endpoint.url,
                attempts=attempts,
                reason=reason,
                http_status=http_status,
            )
        except PublishError as exc:
            log.warning("dead letter not published", endpoint_id=endpoint.id, error=str(exc))
            return Nak(random.uniform(1.0, 3.0))
        return Ack()


def _stream_seq(msg: Msg) -> int:
    """The stream sequence from the ack subject (``$JS.ACK.<stream>.<consumer>.<delivered>.
    <stream seq>...``, or with domain and account hash first), without building nats-py's
    whole metadata (its timestamp conversion cost more than the rest)."""
    tokens = (msg.reply or "").split(".")
    try:
        if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
            return int(tokens[5])
        return int(msg.metadata.sequence.stream)
    except Exception:
        return 0
