"""``status.>`` -> signed HTTP POSTs to the account's endpoints -> ack / nak / dead-letter."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog
from mailgate_core.nats import Ack, Nak, Outcome, Term, backoff_delay, delivery_count
from mailgate_core.schemas import SchemaError, StatusEvent, decode
from nats.aio.msg import Msg
from prometheus_client import Counter

from .delivery import Delivered, Deliverer, DeliveryProgress, Failed, Refused
from .endpoints import EndpointCache
from .payload import build_body, wants

log = structlog.get_logger()


@dataclass(frozen=True)
class RetryPolicy:
    deadline_s: float
    base_s: float
    max_delay_s: float

    def delay_s(self, attempt: int, remaining_s: float) -> float:
        """Backoff for the ``attempt``-th delivery, never far past the retry deadline."""
        delay = backoff_delay(attempt, base_s=self.base_s, cap_s=self.max_delay_s)
        return float(max(min(delay, remaining_s), min(self.base_s, delay)))


class StatusHandler:
    def __init__(
        self,
        *,
        endpoints: EndpointCache,
        deliverer: Deliverer,
        progress: DeliveryProgress,
        retry: RetryPolicy,
        outcomes: Counter,
    ) -> None:
        self._endpoints = endpoints
        self._deliverer = deliverer
        self._progress = progress
        self._retry = retry
        self._outcomes = outcomes

    async def __call__(self, msg: Msg) -> Outcome:
        try:
            event = decode(msg.data, StatusEvent)
        except SchemaError as exc:
            log.error("undecodable status event", subject=msg.subject, error=str(exc))
            return Term("undecodable")
        ref = event.message
        blog = log.bind(
            mailgate_id=ref.mailgate_id,
            account_id=ref.account_id,
            event_id=event.event_id,
            status=event.name,
        )
        targets = [e for e in self._endpoints.endpoints(ref.account_id) if wants(e, event.name)]
        done = self._progress.done(event.event_id)
        pending = [e for e in targets if e.id not in done]
        if not pending:
            self._progress.forget(event.event_id)
            return Ack()

        results = await asyncio.gather(
            *(self._deliverer.attempt(e, event.event_id, build_body(event, e)) for e in pending)
        )
        failed = []
        for endpoint, result in zip(pending, results, strict=True):
            elog = blog.bind(endpoint_id=endpoint.id)
            if isinstance(result, Delivered):
                self._outcomes.labels("delivered").inc()
                self._progress.mark(event.event_id, endpoint.id)
                elog.info("webhook delivered", http_status=result.status)
            elif isinstance(result, Refused):
                self._outcomes.labels("refused").inc()
                self._progress.mark(event.event_id, endpoint.id)
                elog.warning("webhook refused", reason=result.reason)
            else:
                assert isinstance(result, Failed)
                self._outcomes.labels("failed").inc()
                failed.append(endpoint)
                elog.info(
                    "webhook delivery failed", reason=result.reason, http_status=result.status
                )
        if not failed:
            self._progress.forget(event.event_id)
            return Ack()

        remaining_s = event.occurred_at + self._retry.deadline_s - time.time()
        if remaining_s <= 0:
            # TODO(dead-letter store): keep the body for listing/replay through the admin API.
            for endpoint in failed:
                self._outcomes.labels("dead_letter").inc()
                blog.error(
                    "webhook dead-lettered",
                    endpoint_id=endpoint.id,
                    attempts=delivery_count(msg),
                    deadline_s=self._retry.deadline_s,
                )
            self._progress.forget(event.event_id)
            return Term("retry deadline passed")
        return Nak(self._retry.delay_s(delivery_count(msg), remaining_s))
