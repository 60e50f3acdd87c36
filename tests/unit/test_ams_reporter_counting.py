"""Counting for the automatic stop rides on the delivery consumer's handler: a status message
is acked only once its event is counted, is redelivered (with backoff) while counting fails,
and after COUNT_MAX_DELIVERIES the count is given up so the message does not stay in hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mailgate_ams_reporter.autostop import ThresholdBook, Thresholds
from mailgate_ams_reporter.campaigns import CampaignCounter, CampaignTally
from mailgate_ams_reporter.endpoints import EndpointCache
from mailgate_ams_reporter.handlers import COUNT_MAX_DELIVERIES, StatusHandler
from mailgate_ams_reporter.metrics import AutostopMetrics, WebhookMetrics
from mailgate_ams_reporter.retry import RetryPolicy
from mailgate_core.nats import Ack, Nak
from mailgate_core.schemas import MessageRef, StatusEvent, encode
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry


class RefusingCounter(CampaignCounter):
    """A counter whose writes always fail (KV in trouble)."""

    def __init__(self) -> None:
        super().__init__(
            store=None,  # type: ignore[arg-type]
            stopper=None,  # type: ignore[arg-type]
            thresholds=ThresholdBook(Thresholds()),
            metrics=AutostopMetrics(CollectorRegistry()),
        )
        self.calls = 0

    async def count(self, events: Sequence[StatusEvent]) -> list[bool]:
        self.calls += 1
        return [False] * len(events)


def handler(counter: CampaignCounter) -> StatusHandler:
    return StatusHandler(
        js=None,  # type: ignore[arg-type]
        endpoints=EndpointCache(None),  # type: ignore[arg-type]  # no endpoints: counting only
        dispatcher=None,  # type: ignore[arg-type]
        dead_letters=None,  # type: ignore[arg-type]
        retry=RetryPolicy(deadline_s=3600, base_s=1, max_delay_s=60),
        metrics=WebhookMetrics(CollectorRegistry()),
        tally=CampaignTally(counter, linger_s=0.001),
    )


def delivery(event: StatusEvent, delivered: int) -> Msg:
    reply = f"$JS.ACK.STATUS.ams-reporter.{delivered}.7.7.1700000000000000000.0"
    return Msg(_client=None, subject=event.subject(), reply=reply, data=encode(event))  # type: ignore[arg-type]


def sent(campaign_id: str | None = "73") -> StatusEvent:
    ref = MessageRef(
        mailgate_id="01JMGCOUNT0000000000000000",
        account_id="acc1",
        recipient="u@example.com",
        campaign_id=campaign_id,
    )
    return StatusEvent(name="sent", timestamp=1700000000, data={}, message=ref)


def dropped(counter: CampaignCounter, status: str) -> Any:
    return counter.metrics.dropped.labels(status)._value.get()


async def test_a_failed_count_is_redelivered_with_backoff_and_counted_again() -> None:
    counter = RefusingCounter()
    status = handler(counter)
    first = await status(delivery(sent(), 1))
    later = await status(delivery(sent(), 6))
    assert isinstance(first, Nak) and first.delay_s >= 1.0
    assert isinstance(later, Nak) and later.delay_s >= 16.0  # backoff grows per delivery
    assert counter.calls == 2
    assert dropped(counter, "sent") == 0


async def test_counting_is_given_up_after_the_last_delivery_so_the_message_is_acked() -> None:
    counter = RefusingCounter()
    outcome = await handler(counter)(delivery(sent(), COUNT_MAX_DELIVERIES))
    assert outcome == Ack()
    assert dropped(counter, "sent") == 1


async def test_an_event_without_campaign_or_endpoint_is_acked_without_counting() -> None:
    counter = RefusingCounter()
    assert await handler(counter)(delivery(sent(campaign_id=None), 1)) == Ack()
    assert counter.calls == 0
