"""One dead endpoint never slows the others: per-endpoint concurrency limit, circuit breaker,
and retries that live in their own stream instead of the status consumer's ack window."""

from __future__ import annotations

import asyncio
import time

from mailgate_core.nats import publish_event
from mailgate_fakes.testing import eventually
from test_ams_reporter_support import (
    Receiver,
    StartReporter,
    endpoint,
    metric,
    put_endpoints,
    receiver,
    settled,
    start_reporter,
    status_event,
)

__all__ = ["receiver", "start_reporter"]  # fixtures

HANG_TIMEOUT_S = 2.0


async def test_a_hanging_endpoint_opens_its_breaker_while_a_healthy_one_keeps_low_latency(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    receiver.hang = {"/dead"}
    await put_endpoints(js, "dead-acc", endpoint("dead", receiver.url("/dead")))
    await put_endpoints(js, "live-acc", endpoint("live", receiver.url("/live")))
    service = await start_reporter(
        webhook_timeout_s=HANG_TIMEOUT_S,
        webhook_endpoint_concurrency=4,
        webhook_endpoint_wait_s=0.2,
        webhook_breaker_failures=3,
        webhook_breaker_open_s=30.0,
        delivery_concurrency=50,
        retry_base_s=0.2,
        retry_max_delay_s=1.0,
    )

    published: dict[str, float] = {}
    for i in range(200):
        account = "dead-acc" if i % 2 == 0 else "live-acc"
        event = status_event("delivered", account_id=account, mailgate_id=f"01JMG{i:021d}")
        await publish_event(js, event)
        if account == "live-acc":
            published[event.event_id] = time.time()
        if i % 20 == 19:
            await asyncio.sleep(0.1)  # a steady stream over about a second, not one burst

    await eventually(lambda: len(receiver.on("/live")) == 100, what="every live delivery")
    lags = sorted(c.at - published[c.headers["webhook-id"]] for c in receiver.on("/live"))
    # Head-of-line blocking behind the dead endpoint would cost a whole timeout (2 s).
    assert lags[-1] < 1.0, lags[-5:]
    assert lags[len(lags) // 2] < 0.3, lags[len(lags) // 2]

    # The dead endpoint got its concurrency limit's worth of requests (4) plus those that
    # took the slots of the first two failures before the third opened the circuit.
    await eventually(
        lambda: metric(service, "mailgate_webhook_breaker_state", endpoint="dead") == 2,
        timeout=HANG_TIMEOUT_S + 5,
        what="breaker open",
    )
    assert len(receiver.on("/dead")) <= 4 + 3 - 1
    assert metric(service, "mailgate_webhook_failures_total", endpoint="dead") >= 3
    assert metric(service, "mailgate_webhook_breaker_state", endpoint="live") == 0

    # While open, its deliveries are put off without attempts: retry tasks come back, are
    # nak'd with a delay, and none reaches the endpoint.
    deferred_before = metric(
        service, "mailgate_webhook_deferred_total", endpoint="dead", reason="circuit_open"
    )
    calls_before = len(receiver.on("/dead"))
    await eventually(
        lambda: (
            metric(
                service, "mailgate_webhook_deferred_total", endpoint="dead", reason="circuit_open"
            )
            > deferred_before + 10
        ),
        what="deferrals while open",
    )
    assert len(receiver.on("/dead")) == calls_before
    # Nothing of the dead endpoint's backlog sits in the status consumer: every status
    # message is acked, the 100 dead deliveries wait as retry tasks.
    await eventually(lambda: settled(js), what="status consumer drained")
    info = await js.consumer_info("WEBHOOK_RETRY", "ams-reporter-retry")
    assert info.num_ack_pending + info.num_pending == 100


async def test_a_busy_endpoint_queues_briefly_instead_of_deferring(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    """A healthy endpoint at its concurrency limit: deliveries wait for a slot (backpressure),
    they are not pushed to the retry stream."""
    await put_endpoints(js, "acc1", endpoint("ep", receiver.url("/ep")))
    service = await start_reporter(webhook_endpoint_concurrency=2, webhook_endpoint_wait_s=2.0)
    for i in range(60):
        await publish_event(js, status_event("opened", mailgate_id=f"01JMG{i:021d}"))

    await eventually(lambda: len(receiver.on("/ep")) == 60, what="all delivered")
    await eventually(lambda: settled(js), what="acked")
    assert metric(service, "mailgate_webhook_retries_queued_total") == 0
    assert metric(service, "mailgate_webhook_attempts_total", endpoint="ep") == 60
