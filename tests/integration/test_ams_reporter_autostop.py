"""Automatic campaign stop against a real nats-server and the AMS fake: stopMailing exactly
once (replicas, duplicates, restarts), nothing below the minimum volume, resume."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import pytest
from mailgate_ams_reporter.app import AmsReporter
from mailgate_ams_reporter.autostop import CampaignCounters, Counts, ThresholdBook, Thresholds
from mailgate_ams_reporter.campaigns import (
    AutoStopper,
    CampaignCounter,
    CampaignTally,
    ConflictError,
    CounterStore,
    ensure_bucket,
)
from mailgate_ams_reporter.metrics import AutostopMetrics
from mailgate_core.nats import publish_event
from mailgate_core.schemas import CampaignAutoStopped, CampaignResumed, StatusEvent, decode
from mailgate_fakes.ams import AmsFake
from mailgate_fakes.infra import free_port
from mailgate_fakes.testing import eventually
from nats.js.api import ConsumerConfig
from prometheus_client import CollectorRegistry
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

KEY = "ams-test-key"
MIN_SENT = 50


@pytest.fixture
async def ams() -> AsyncIterator[AmsFake]:
    fake = AmsFake(KEY)
    fake.add_mailing(73, name="Spring sale", state="running", total=20000)
    fake.add_mailing(74, name="Newsletter", state="running", total=5000)
    fake.url = await fake.start()  # type: ignore[attr-defined]
    yield fake
    await fake.stop()


def settings(url: str, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        ams_api_url=url,
        ams_api_key=KEY,
        ams_timeout_s=5.0,
        autostop_hard_bounce_min_sent=MIN_SENT,
        autostop_complaint_min_sent=MIN_SENT,
        autostop_failure_min_attempted=MIN_SENT,
        autostop_sweep_s=0.2,
    )
    values.update(overrides)
    return values


async def publish(
    js: Any, name: str, count: int, campaign_id: str = "73", start: int = 0
) -> list[StatusEvent]:
    events = [
        status_event(name, campaign_id=campaign_id, mailgate_id=f"01JMG{name[:4]}{i:017d}")
        for i in range(start, start + count)
    ]
    for event in events:
        await publish_event(js, event)
    return events


async def counted(js: Any) -> bool:
    return await settled(js, "STATUS", "ams-reporter")


async def counters(js: Any, campaign_id: str = "73") -> CampaignCounters:
    kv = await js.key_value("campaign-counters")
    return msgspec.json.decode((await kv.get(campaign_id)).value, type=CampaignCounters)


async def request(nc: Any, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    """A control request, retried on "no responders": nats-server 2.15 sometimes answers that
    for a request sent right after the subscription was made (and flushed) on a connection
    busy with JetStream pulls; any caller of ams.control.* should retry it briefly."""

    async def attempt() -> dict[str, Any] | None:
        try:
            reply = await nc.request(subject, json.dumps(body).encode(), timeout=10)
        except nats.errors.NoRespondersError:
            return None
        return json.loads(reply.data)  # type: ignore[no-any-return]

    return await eventually(attempt, timeout=10, what=f"an answer on {subject}")


def stops(fake: AmsFake, mailing: int = 73) -> int:
    return len(fake.received("stopMailing", id=mailing))


async def test_a_crossing_stops_the_mailing_exactly_once_across_replicas_and_restarts(
    js, ams: AmsFake, start_reporter: StartReporter
) -> None:
    replicas: list[AmsReporter] = [await start_reporter(**settings(ams.url)) for _ in range(2)]
    await publish(js, "sent", MIN_SENT)
    bounces = await publish(js, "hard_bounced", 4)  # 8 % > 5 %
    await eventually(lambda: stops(ams) == 1, what="stopMailing called")
    await eventually(lambda: counted(js), what="counted")
    assert ams.mailings[73]["state"] == "paused"
    assert ams.mailings[74]["state"] == "running"

    async def autostopped() -> Any:
        try:
            return await js.get_last_msg("STATS", "stats.campaign.autostopped")
        except nats.js.errors.NotFoundError:  # published once AMS confirmed: just after
            return None

    msg = await eventually(autostopped, what="stats.campaign.autostopped")
    event = decode(msg.data, CampaignAutoStopped)
    assert (event.campaign_id, event.mailing_id, event.account_id) == ("73", "73", "acc1")
    assert (event.reason, event.threshold, event.min_volume) == ("hard_bounce_rate", 0.05, MIN_SENT)
    assert event.generation == 1 and event.sent == MIN_SENT and event.hard_bounced >= 3
    assert event.rate > 0.05
    assert event.event_id == "autostop-73-1"
    total = sum(
        metric(r, "mailgate_autostop_campaigns_stopped_total", reason="hard_bounce_rate")
        for r in replicas
    )
    assert total == 1

    # More bad news, duplicates of old news, then a restart of every replica: still once.
    await publish(js, "hard_bounced", 10, start=100)
    for event in bounces:  # the same events again: JetStream drops them (Nats-Msg-Id)
        await publish_event(js, event)
    await eventually(lambda: counted(js), what="counted")
    for replica in replicas:
        await replica.stop()
    again = await start_reporter(**settings(ams.url))
    await publish(js, "hard_bounced", 5, start=200)
    await eventually(lambda: counted(js), what="counted after restart")
    await eventually(
        lambda: metric(again, "mailgate_autostop_campaigns_stopped_now") == 1, what="swept"
    )
    assert stops(ams) == 1
    assert ams.overlaps == 0  # never two AMS calls at once
    assert (await counters(js)).totals.hard_bounced == 4 + 10 + 5


async def test_below_the_minimum_volume_nothing_is_stopped(
    js, ams: AmsFake, start_reporter: StartReporter
) -> None:
    service = await start_reporter(**settings(ams.url))
    await publish(js, "sent", MIN_SENT - 1)
    await publish(js, "hard_bounced", 30)
    await publish(js, "complained", 10)
    await publish(js, "delivered", 5)  # not counted
    await eventually(lambda: counted(js), what="counted")

    record = await counters(js)
    assert (record.totals.sent, record.totals.hard_bounced, record.totals.complained) == (
        MIN_SENT - 1,
        30,
        10,
    )
    assert metric(service, "mailgate_autostop_events_counted_total", status="sent") == MIN_SENT - 1
    assert ams.received("stopMailing") == []
    listed = await request(service.nc, "ams.control.autostops", {})
    assert listed == {"items": []}


async def test_resume_starts_the_mailing_and_rearms_the_stop_on_new_volume(
    js, nc, ams: AmsFake, start_reporter: StartReporter
) -> None:
    service = await start_reporter(**settings(ams.url))
    await publish(js, "sent", MIN_SENT)
    await publish(js, "failed", 10)  # 10 / 60 = 16.7 % > 10 %
    await eventually(lambda: stops(ams) == 1, what="stopped")

    async def announced() -> list[dict[str, Any]] | None:
        # The stop's last marker write (``published``) follows stopMailing: a resume sent
        # before it would meet "changed meanwhile; try again".
        listed = await request(nc, "ams.control.autostops", {"campaign_id": "73"})
        items: list[dict[str, Any]] = listed["items"]
        return items if items and items[0].get("published") else None

    items = await eventually(announced, what="listed and announced")
    assert [(m["state"], m["reason"]) for m in items] == [("stopped", "failure_rate")]

    answer = await request(nc, "ams.control.resume", {"campaign_id": "73", "requested_by": "ops"})
    assert answer["state"] == "resumed" and answer["generation"] == 1
    assert len(ams.received("startMailing", id=73)) == 1
    assert ams.mailings[73]["state"] == "running"
    assert metric(service, "mailgate_autostop_campaigns_resumed_total") == 1
    resumed = decode(
        (await js.get_last_msg("STATS", "stats.campaign.resumed")).data, CampaignResumed
    )
    assert (resumed.campaign_id, resumed.requested_by, resumed.started) == ("73", "ops", True)
    # A repeated resume is answered the same and calls AMS no more.
    assert (await request(nc, "ams.control.resume", {"campaign_id": "73"}))["state"] == "resumed"
    assert len(ams.received("startMailing", id=73)) == 1

    # The old failures no longer count: a little more traffic stops nothing...
    await publish(js, "sent", 10, start=1000)
    await publish(js, "failed", 1, start=1000)
    await eventually(lambda: counted(js), what="counted")
    assert stops(ams) == 1
    # ...but a new crossing on new volume stops it again (generation 2).
    await publish(js, "sent", MIN_SENT, start=2000)
    await publish(js, "failed", 10, start=2000)
    await eventually(lambda: stops(ams) == 2, what="stopped again")

    # AMS answers stopMailing before the fact is published: wait for the second fact.
    async def second_stop() -> CampaignAutoStopped | None:
        msg = await js.get_last_msg("STATS", "stats.campaign.autostopped")
        event = decode(msg.data, CampaignAutoStopped)
        return event if event.generation == 2 else None

    event = await eventually(second_stop, what="generation 2 published")
    assert event.sent == 10 + MIN_SENT


async def test_bad_resume_requests_get_problem_answers(
    nc, ams: AmsFake, start_reporter: StartReporter
) -> None:
    await start_reporter(**settings(ams.url))
    missing = await request(nc, "ams.control.resume", {})
    assert missing["error"]["status"] == 400
    unknown = await request(nc, "ams.control.resume", {"campaign_id": "999"})
    assert unknown["error"]["status"] == 404 and "999" in unknown["error"]["detail"]
    assert ams.received("startMailing") == []


async def test_a_stop_that_fails_while_ams_is_down_is_retried_until_it_succeeds_once(
    js, start_reporter: StartReporter
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1"
    service = await start_reporter(**settings(url, autostop_hard_bounce_min_sent=10))
    await publish(js, "sent", 10)
    await publish(js, "hard_bounced", 2)
    await eventually(
        lambda: metric(service, "mailgate_autostop_stop_failures_total") >= 2,
        what="failed attempts while AMS is down",
    )

    fake = AmsFake(KEY)
    fake.add_mailing(73, state="running")
    await fake.start(port=port)
    try:
        await eventually(lambda: stops(fake) == 1, what="stopped once AMS is back")
        await eventually(
            lambda: metric(service, "mailgate_autostop_campaigns_stopped_now") == 1, what="swept"
        )
        assert fake.mailings[73]["state"] == "paused"
        assert stops(fake) == 1
        assert (
            metric(service, "mailgate_autostop_campaigns_stopped_total", reason="hard_bounce_rate")
            == 1
        )
    finally:
        await fake.stop()


async def test_counting_rides_on_the_delivery_consumer_and_each_webhook_goes_out_once(
    js, ams: AmsFake, receiver: Receiver, start_reporter: StartReporter
) -> None:
    # An old deployment's autostop durable is removed: nothing holds status messages for it.
    await js.add_consumer(
        "STATUS", ConsumerConfig(durable_name="ams-reporter-autostop", filter_subject="status.>")
    )
    await put_endpoints(js, "acc1", endpoint("ep1", receiver.url(), events=["sent"]))
    service = await start_reporter(**settings(ams.url))
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.consumer_info("STATUS", "ams-reporter-autostop")

    await publish(js, "sent", 20)
    await publish(js, "delivered", 20)  # neither counted nor wanted by the endpoint
    await eventually(lambda: counted(js), what="counted and acked")
    record = await counters(js)
    assert (record.totals.sent, record.totals.hard_bounced) == (20, 0)
    assert metric(service, "mailgate_autostop_events_counted_total", status="sent") == 20
    sent = sorted(body["message"]["mailgate_id"] for body in receiver.bodies("/hook"))
    assert len(sent) == 20 and len(set(sent)) == 20


class FlakyStore(CounterStore):
    """Refuses the first ``failures`` writes, like a KV bucket in trouble."""

    def __init__(self, kv: Any, failures: int) -> None:
        super().__init__(kv)
        self.failures = failures
        self.writes = 0

    async def add(self, campaign_id: str, account_id: str, delta: Counts) -> CampaignCounters:
        if self.failures > 0:
            self.failures -= 1
            raise ConflictError("busy")
        self.writes += 1
        return await super().add(campaign_id, account_id, delta)


async def test_the_tally_writes_a_burst_at_once_and_reports_a_failed_write(js) -> None:
    kv = await ensure_bucket(js, "campaign-counters", ttl_s=None)
    store = FlakyStore(kv, failures=1)
    counter = CampaignCounter(
        store=store,
        stopper=AutoStopper(
            js=js,
            markers=await ensure_bucket(js, "campaign-autostop", ttl_s=None),
            counters=store,
            ams=None,
            metrics=AutostopMetrics(CollectorRegistry()),
            owner="test",
        ),
        thresholds=ThresholdBook(Thresholds()),
        metrics=AutostopMetrics(CollectorRegistry()),
    )
    tally = CampaignTally(counter, linger_s=0.05)
    events = [
        status_event("sent", mailgate_id=f"01JMGTALLY{i:016d}", campaign_id=str(70 + i % 2))
        for i in range(40)
    ]
    first = await asyncio.gather(*(tally.submit(e) for e in events))
    # The write of campaign 70 was refused (its events must be redelivered), 71's stored.
    assert first == [i % 2 == 1 for i in range(40)]
    assert (await counters(js, "71")).totals.sent == 20
    again = await asyncio.gather(*(tally.submit(e) for e in events[::2]))
    assert again == [True] * 20
    assert (await counters(js, "70")).totals.sent == 20
    assert store.writes == 2  # one compare-and-set per campaign per burst
