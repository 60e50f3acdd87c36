"""ams-reporter's pure rules: circuit breaker, endpoint lanes, retry backoff, batching,
replay targeting, response snippets, and the automatic-stop thresholds."""

from __future__ import annotations

import asyncio
import json

import pytest
from mailgate_ams_reporter.autostop import (
    Counts,
    Thresholds,
    campaign_key,
    evaluate,
    mailing_id,
    parse_overrides,
)
from mailgate_ams_reporter.batching import BatchConfig, Batcher
from mailgate_ams_reporter.breaker import CircuitBreaker, Lane, LaneBusy, LaneConfig
from mailgate_ams_reporter.delivery import Delivered, Failed, parse_retry_after, snippet
from mailgate_ams_reporter.payload import batch_webhook_id, targets
from mailgate_ams_reporter.retry import RetryPolicy, retry_msg_id, retry_subject
from mailgate_core.records import EndpointRecord
from mailgate_core.schemas import MessageRef, StatusEvent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def status(name: str = "delivered", **kw) -> StatusEvent:
    ref = MessageRef(mailgate_id="01JMAILGATE000000000000000", account_id="a", recipient="u@x")
    return StatusEvent(name=name, message=ref, timestamp=1, **kw)  # type: ignore[arg-type]


def ep(id: str, **kw) -> EndpointRecord:
    return EndpointRecord(id=id, url="https://h.example/hook", secret="s", **kw)


# --- circuit breaker -------------------------------------------------------------------------


def test_the_breaker_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, open_s=30, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # a success resets the streak
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.try_admit()
    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.is_open() and not breaker.try_admit()
    assert breaker.retry_in_s() == 30


def test_after_the_open_period_one_probe_decides() -> None:
    clock = Clock()
    changes: list[str] = []
    breaker = CircuitBreaker(
        failure_threshold=1, open_s=10, max_open_s=25, clock=clock, on_change=changes.append
    )
    breaker.record_failure()
    clock.now += 10
    assert breaker.state == "half_open"
    assert breaker.try_admit()  # the probe
    assert not breaker.try_admit()  # nobody else while it is out
    assert breaker.is_open()
    breaker.record_failure()  # probe failed: open again, twice as long
    assert breaker.state == "open" and breaker.retry_in_s() == 20
    clock.now += 20
    assert breaker.try_admit()
    breaker.record_failure()
    assert breaker.retry_in_s() == 25  # capped
    clock.now += 25
    assert breaker.try_admit()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.try_admit()
    assert changes == ["open", "half_open", "open", "half_open", "open", "half_open", "closed"]


def test_a_probe_that_was_not_sent_frees_the_half_open_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=5, clock=clock)
    breaker.record_failure()
    clock.now += 5
    assert breaker.try_admit()
    breaker.release_probe()
    assert breaker.try_admit()


async def test_a_lane_limits_concurrency_and_reports_busy_after_its_wait() -> None:
    lane = Lane("ep", LaneConfig(limit=2, wait_s=0.05, max_waiting=1))
    release = asyncio.Event()

    async def hold() -> None:
        async with lane.slot():
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await asyncio.sleep(0)
    assert lane.in_flight == 2
    with pytest.raises(LaneBusy):
        async with lane.slot():
            pass
    release.set()
    await asyncio.gather(*holders)
    async with lane.slot():
        assert lane.in_flight == 1


# --- retries ---------------------------------------------------------------------------------


def test_retry_delay_grows_honours_retry_after_and_never_overshoots_the_deadline() -> None:
    policy = RetryPolicy(deadline_s=86400, base_s=1.0, max_delay_s=900.0)
    assert 0.5 <= policy.delay_s(1, 1e9) <= 1.0
    assert 256 <= policy.delay_s(10, 1e9) <= 512
    assert 450 <= policy.delay_s(30, 1e9) <= 900
    assert policy.delay_s(20, 5.0) <= 5.0
    assert policy.delay_s(1, 1e9, at_least_s=120) == 120
    event = status(occurred_at=1000.0)
    assert policy.remaining_s(event, 1000.0 + 86000) == 400


def test_retry_subjects_and_ids_are_single_tokens_per_status_message() -> None:
    assert retry_subject("ep_01") == "webhook.retry.ep_01"
    odd = retry_subject("a.b c>")
    assert odd.count(".") == 2 and " " not in odd and ">" not in odd
    assert retry_msg_id("E", "ep", 7) != retry_msg_id("E", "ep", 8)


def test_a_replay_targets_only_the_named_enabled_endpoints_and_ignores_filters() -> None:
    endpoints = [ep("a"), ep("b", events=["opened"]), ep("c", enabled=False)]
    assert [e.id for e in targets(endpoints, status("delivered"))] == ["a"]
    replay = status("delivered", endpoint_ids=["b", "c", "gone"])
    assert [e.id for e in targets(endpoints, replay)] == ["b"]


def test_response_snippets_are_bounded_and_retry_after_is_parsed() -> None:
    text = snippet(b"<html>\n" + b"x" * 5000)
    assert len(text) <= 200 and text.startswith("<html> xxx")
    assert snippet("привет".encode()[:-1]).startswith("приве")
    assert parse_retry_after("120") == 120
    assert parse_retry_after("99999") == 3600
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after(None) is None


# --- batching --------------------------------------------------------------------------------


async def test_batches_flush_by_size_then_by_time_and_every_item_gets_the_result() -> None:
    sent: list[tuple[str, list]] = []

    async def send(endpoint, webhook_id, body, items):
        sent.append((webhook_id, json.loads(body)))
        return Delivered(200) if items > 1 else Failed("http 500", 500)

    batcher = Batcher(send, BatchConfig(max_items=2, max_wait_s=0.05))
    events = [status(event_id=f"e{i}") for i in range(3)]
    results = await asyncio.gather(
        *(
            batcher.submit(ep("b", batch=True), e, json.dumps({"n": i}).encode())
            for i, e in enumerate(events)
        )
    )
    assert [r for r in results] == [Delivered(200), Delivered(200), Failed("http 500", 500)]
    assert [body for _, body in sent] == [[{"n": 0}, {"n": 1}], [{"n": 2}]]
    assert sent[0][0] == batch_webhook_id(["e0", "e1"]) != batch_webhook_id(["e1", "e0"])


async def test_a_batch_is_flushed_before_it_would_exceed_the_byte_limit() -> None:
    sizes: list[int] = []

    async def send(endpoint, webhook_id, body, items):
        sizes.append(items)
        return Delivered(200)

    batcher = Batcher(send, BatchConfig(max_items=100, max_wait_s=0.05, max_bytes=30))
    await asyncio.gather(
        *(batcher.submit(ep("b"), status(event_id=f"e{i}"), b'"0123456789"') for i in range(3))
    )
    assert sizes == [2, 1]  # [a,b] is 27 bytes; adding c would make 40
    await batcher.close()


# --- automatic stop --------------------------------------------------------------------------

DEFAULT = Thresholds()


def test_nothing_trips_below_the_minimum_volume_however_bad_the_rate() -> None:
    assert evaluate(Counts(sent=499, hard_bounced=400, failed=0), DEFAULT) is None
    assert evaluate(Counts(sent=999, complained=500), DEFAULT) is None
    assert evaluate(Counts(sent=0, failed=499), DEFAULT) is None


def test_each_rate_trips_strictly_above_its_threshold() -> None:
    assert evaluate(Counts(sent=500, hard_bounced=25), DEFAULT) is None  # exactly 5 %
    trip = evaluate(Counts(sent=500, hard_bounced=26), DEFAULT)
    assert trip is not None and trip.reason == "hard_bounce_rate" and trip.rate == 26 / 500
    assert evaluate(Counts(sent=1000, complained=3), DEFAULT) is None  # exactly 0.3 %
    trip = evaluate(Counts(sent=1000, complained=4), DEFAULT)
    assert trip is not None and (trip.reason, trip.min_volume) == ("complaint_rate", 1000)
    trip = evaluate(Counts(sent=400, failed=100), DEFAULT)  # 20 % of 500 attempted
    assert trip is not None and (trip.reason, trip.volume) == ("failure_rate", 500)


def test_complaints_are_reported_first_when_several_rates_trip() -> None:
    trip = evaluate(Counts(sent=2000, hard_bounced=500, complained=100, failed=900), DEFAULT)
    assert trip is not None and trip.reason == "complaint_rate"


def test_after_a_resume_only_what_came_later_counts() -> None:
    totals = Counts(sent=1000, hard_bounced=100)
    since = totals.minus(totals)
    assert evaluate(since, DEFAULT) is None
    later = Counts(sent=1600, hard_bounced=140).minus(totals)
    assert later == Counts(sent=600, hard_bounced=40)
    trip = evaluate(later, DEFAULT)
    assert trip is not None and trip.reason == "hard_bounce_rate"


def test_account_overrides_replace_single_fields_and_can_disable() -> None:
    overrides = parse_overrides(
        '{"big": {"hard_bounce_rate": 0.02, "hard_bounce_min_sent": 5000}, '
        '"off": {"enabled": false}}',
        DEFAULT,
    )
    assert overrides["big"].hard_bounce_rate == 0.02 and overrides["big"].complaint_rate == 0.003
    assert evaluate(Counts(sent=600, hard_bounced=100), overrides["big"]) is None
    assert evaluate(Counts(sent=100_000, hard_bounced=90_000), overrides["off"]) is None
    assert parse_overrides("  ", DEFAULT) == {}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[1]", "JSON object"),
        ("{", "not JSON"),
        ('{"a": {"hard_bounce_rate": 2}}', "between 0 and 1"),
        ('{"a": {"typo_rate": 0.1}}', "typo_rate"),
        ('{"a": {"complaint_min_sent": 0}}', "at least 1"),
    ],
)
def test_bad_overrides_are_refused_with_a_reason(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_overrides(text, DEFAULT)


def test_campaign_keys_and_mailing_ids() -> None:
    assert campaign_key("73") == "73"
    weird = campaign_key("spring sale/2025")
    assert weird.startswith("h_") and weird == campaign_key("spring sale/2025")
    assert mailing_id("73") == 73 and mailing_id("x-1") == "x-1"
