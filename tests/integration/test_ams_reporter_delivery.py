"""ams-reporter against a real nats-server and an aiohttp receiver on loopback: delivery,
retries through the retry stream, dead letters, replays, restarts, batching."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import aiohttp
import msgspec
from mailgate_ams_reporter.signing import verify_simple, verify_standard
from mailgate_core.nats import publish_event
from mailgate_core.schemas import (
    StatusEvent,
    WebhookDeadLettered,
    WebhookDelivered,
    decode,
    encode,
)
from mailgate_fakes.infra import NatsServer
from mailgate_fakes.testing import eventually
from structlog.testing import capture_logs
from test_ams_reporter_support import (
    RAW_KEY,
    SECRET,
    Receiver,
    StartReporter,
    all_settled,
    endpoint,
    metric,
    outcome,
    put_endpoints,
    receiver,
    settled,
    start_reporter,
    status_event,
)

__all__ = ["receiver", "start_reporter"]  # fixtures


async def dead_letter(js) -> WebhookDeadLettered:
    msg = await js.get_last_msg("MAIL", "mail.webhook_dead_lettered")
    return decode(msg.data, WebhookDeadLettered)


async def delivery_records(js) -> list[WebhookDelivered]:
    """Every ``mail.webhook_delivered`` in the MAIL stream, in order."""
    info = await js.stream_info("MAIL", subjects_filter="mail.webhook_delivered")
    count = (info.state.subjects or {}).get("mail.webhook_delivered", 0)
    if not count:
        return []
    sub = await js.pull_subscribe("mail.webhook_delivered", stream="MAIL")
    try:
        msgs = await sub.fetch(count, timeout=5)
    finally:
        await sub.unsubscribe()
    return [decode(m.data, WebhookDelivered) for m in msgs]


async def test_a_delivery_is_recorded_once_as_mail_webhook_delivered_before_the_ack(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(js, "acc1", endpoint("ep1", receiver.url()))
    service = await start_reporter()
    event = status_event("opened")
    await publish_event(js, event)

    await eventually(lambda: settled(js), what="message acked")
    records = await delivery_records(js)  # published before the ack: already there
    assert len(records) == 1
    fact = records[0]
    assert fact.subject() == "mail.webhook_delivered"
    assert fact.event_id == f"wd-{event.event_id}-ep1"
    assert fact.status_event_id == event.event_id
    assert fact.status_name == "opened"
    assert fact.message == event.message
    assert (fact.endpoint_id, fact.url) == ("ep1", receiver.url())
    assert (fact.http_status, fact.attempts) == (200, 1)
    assert fact.duration_ms > 0
    assert metric(service, "mailgate_webhook_delivery_records_failed_total") == 0


async def test_recording_deliveries_can_be_turned_off(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(js, "acc1", endpoint("ep1", receiver.url()))
    service = await start_reporter(webhook_record_deliveries=False)
    await publish_event(js, status_event("opened"))

    await eventually(lambda: settled(js), what="message acked")
    assert len(receiver.calls) == 1
    assert outcome(service, "delivered") == 1
    assert await delivery_records(js) == []


async def test_a_delivery_that_cannot_be_recorded_is_acked_and_not_sent_again(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(js, "acc1", endpoint("ep1", receiver.url()))
    service = await start_reporter()
    await js.delete_stream("MAIL")  # the fact's publish finds no stream
    with capture_logs() as logs:
        await publish_event(js, status_event("opened"))
        await eventually(lambda: settled(js), what="message acked")
    assert len(receiver.calls) == 1
    assert outcome(service, "delivered") == 1
    assert metric(service, "mailgate_webhook_delivery_records_failed_total") == 1
    assert any(e["event"] == "webhook delivery not recorded" for e in logs)


async def test_an_event_reaches_the_endpoint_with_the_exact_body_and_valid_signatures(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    service = await start_reporter()
    # Registered after start: the KV watch must pick it up live.
    await put_endpoints(js, "acc1", endpoint("ep1", receiver.url()))
    await eventually(lambda: service.endpoints.endpoints("acc1"), what="endpoint watched")
    event = status_event("clicked", url="https://example.com/x")
    await publish_event(js, event)

    await eventually(lambda: len(receiver.calls) == 1, what="one delivery")
    call = receiver.calls[0]
    headers, body = call.headers, call.body
    assert json.loads(body) == {
        "message": {
            "id": "AMS-42",
            "mailgate_id": "01JMAILGATE000000000000000",
            "campaign_id": "73",
            "email": "user@example.com",
        },
        "event": {
            "name": "clicked",
            "timestamp": 1700000000,
            "data": {"url": "https://example.com/x"},
            "id": event.event_id,
        },
    }
    assert headers["webhook-id"] == event.event_id
    timestamp = headers["webhook-timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    signed = f"{event.event_id}.{timestamp}.".encode() + body
    expected_v1 = base64.b64encode(hmac.new(RAW_KEY, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected_v1}"
    expected_hex = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Mailgate-Signature"] == f"sha256={expected_hex}"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "mailgate/0.1"
    await eventually(lambda: settled(js), what="message acked")
    assert outcome(service, "delivered") == 1
    assert metric(service, "mailgate_webhook_attempts_total", endpoint="ep1") == 1
    assert metric(service, "mailgate_webhook_lag_seconds_count") == 1


async def test_a_500_is_retried_through_the_retry_stream_and_then_delivered_once(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(js, "acc1", endpoint("ep1", receiver.url()))
    receiver.script = {"/hook": [500]}
    service = await start_reporter()
    event = status_event("delivered")
    await publish_event(js, event)

    await eventually(lambda: len(receiver.calls) == 2, what="retry")
    assert {c.headers["webhook-id"] for c in receiver.calls} == {event.event_id}
    await eventually(lambda: all_settled(js), what="status message and retry task acked")
    assert outcome(service, "failed") == 1
    assert outcome(service, "delivered") == 1
    assert metric(service, "mailgate_webhook_retries_queued_total") == 1
    assert metric(service, "mailgate_webhook_failures_total", endpoint="ep1") == 1
    assert metric(service, "mailgate_webhook_attempts_total", endpoint="ep1") == 2
    assert len(receiver.calls) == 2
    [fact] = await delivery_records(js)
    assert (fact.status_event_id, fact.http_status, fact.attempts) == (event.event_id, 200, 2)


async def test_a_retry_resends_only_to_the_endpoint_that_failed(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(
        js, "acc1", endpoint("ok", receiver.url("/ok")), endpoint("flaky", receiver.url("/flaky"))
    )
    receiver.script = {"/flaky": [503, 503]}
    service = await start_reporter()
    await publish_event(js, status_event("opened"))

    await eventually(lambda: len(receiver.on("/flaky")) == 3, what="flaky retried twice")
    await eventually(lambda: all_settled(js), what="everything acked")
    assert len(receiver.on("/ok")) == 1
    assert outcome(service, "delivered") == 2  # /ok once, /flaky on the second retry
    assert outcome(service, "failed") == 2


async def test_the_events_filter_is_respected(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(
        js,
        "acc1",
        endpoint("only", receiver.url("/only"), events=["delivered"]),
        endpoint("all", receiver.url("/all")),
    )
    await start_reporter()
    await publish_event(js, status_event("opened"))
    await publish_event(js, status_event("delivered"))

    await eventually(lambda: len(receiver.on("/all")) == 2, what="both to /all")
    await eventually(lambda: settled(js), what="both acked")
    assert [b["event"]["name"] for b in receiver.bodies("/only")] == ["delivered"]


async def test_private_addresses_are_refused_unless_allowed(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(
        js,
        "acc1",
        endpoint("ip", receiver.url("/ip")),
        endpoint("name", receiver.url("/name", host="localhost")),
    )
    service = await start_reporter(webhook_allow_private=False)
    await publish_event(js, status_event("delivered"))

    await eventually(lambda: outcome(service, "refused") == 2, what="both refused")
    await eventually(lambda: all_settled(js), what="message settled")
    assert receiver.calls == []
    assert outcome(service, "delivered") == 0
    assert metric(service, "mailgate_webhook_retries_queued_total") == 0


async def test_an_event_past_the_retry_deadline_is_dead_lettered_for_the_ledger(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(js, "acc1", endpoint("ep1", receiver.url()))
    receiver.script = {"/hook": [500, 500, 500]}
    service = await start_reporter(retry_deadline_s=0.0)
    event = status_event("failed")
    await publish_event(js, event)

    await eventually(lambda: outcome(service, "dead_letter") == 1, what="dead letter")
    await eventually(lambda: all_settled(js), what="message settled")
    assert len(receiver.calls) == 1
    dead = await dead_letter(js)
    assert dead.event_id == f"dl-{event.event_id}-ep1"
    assert dead.status == event
    assert (dead.endpoint_id, dead.url, dead.attempts) == ("ep1", receiver.url(), 1)
    assert (dead.reason, dead.http_status) == ("http 500", 500)
    assert metric(service, "mailgate_webhook_dead_letters_total", endpoint="ep1") == 1


async def test_retries_stop_at_the_deadline_with_a_dead_letter_and_bodies_are_truncated_in_logs(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(js, "acc1", endpoint("ep1", receiver.url()))
    receiver.default = {"/hook": 503}
    receiver.response_text = "x" * 5000
    with capture_logs() as logs:
        service = await start_reporter(retry_deadline_s=1.0, webhook_breaker_failures=1000)
        event = status_event("delivered")
        await publish_event(js, event)
        await eventually(lambda: outcome(service, "dead_letter") == 1, what="dead letter")
        await eventually(lambda: all_settled(js), what="retry task settled")

    dead = await dead_letter(js)
    assert dead.status.event_id == event.event_id
    assert dead.attempts == len(receiver.calls) >= 3
    assert (dead.reason, dead.http_status) == ("http 503", 503)
    failures = [e for e in logs if e["event"] == "webhook delivery failed"]
    assert len(failures) == len(receiver.calls)
    assert all(len(e["response"]) <= 200 for e in failures)
    assert failures[0]["response"].startswith("xxx")


async def test_accounts_without_endpoints_are_acked_and_ops_routes_answer(
    js, start_reporter: StartReporter
) -> None:
    service = await start_reporter()
    await publish_event(js, status_event("sent", account_id="nobody"))
    await eventually(lambda: settled(js), what="acked")
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.settings.ops_port}"
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    assert "mailgate_webhook_delivery_seconds" in text
    assert "mailgate_webhook_lag_seconds" in text


async def test_a_replay_from_the_dead_letters_goes_only_to_the_endpoints_it_names(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(
        js, "acc1", endpoint("a", receiver.url("/a")), endpoint("b", receiver.url("/b"))
    )
    service = await start_reporter()
    original = status_event("hard_bounced")
    # What the ledger publishes on a replay: the dead-lettered event, for its endpoint only.
    replay = StatusEvent(
        event_id=original.event_id,
        name=original.name,
        message=original.message,
        timestamp=original.timestamp,
        endpoint_ids=["b"],
    )
    await js.publish(replay.subject(), encode(replay), headers={"Nats-Msg-Id": "replay-dl1-1"})
    await eventually(lambda: len(receiver.on("/b")) == 1, what="replayed to b")
    await eventually(lambda: settled(js), what="acked")
    assert receiver.on("/a") == []
    assert receiver.on("/b")[0].headers["webhook-id"] == original.event_id
    assert outcome(service, "delivered") == 1


async def test_a_replay_that_fails_again_is_a_new_dead_letter_not_a_dropped_duplicate(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(js, "acc1", endpoint("ep1", receiver.url()))
    receiver.default = {"/hook": 500}
    service = await start_reporter(retry_deadline_s=0.0)
    original = status_event("failed")
    await publish_event(js, original)
    await eventually(lambda: outcome(service, "dead_letter") == 1, what="first dead letter")
    first = await dead_letter(js)

    replay = msgspec.structs.replace(original, occurred_at=time.time(), endpoint_ids=["ep1"])
    await js.publish(replay.subject(), encode(replay), headers={"Nats-Msg-Id": "replay-dl1-1"})
    await eventually(lambda: outcome(service, "dead_letter") == 2, what="second dead letter")
    await eventually(lambda: all_settled(js), what="settled")

    second = await dead_letter(js)
    assert second.event_id != first.event_id
    assert second.event_id.startswith(f"dl-{original.event_id}-ep1-r")
    assert second.status.endpoint_ids == ["ep1"]
    info = await js.stream_info("MAIL")
    # Both dead letters are in the stream (the second was not de-duplicated away).
    assert info.state.messages >= 2
    assert len(receiver.calls) == 2


async def test_a_service_restart_mid_retry_delivers_the_rest_and_never_resends(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(
        js, "acc1", endpoint("ok", receiver.url("/ok")), endpoint("down", receiver.url("/down"))
    )
    receiver.default = {"/down": 503}
    first = await start_reporter(retry_base_s=0.3, retry_max_delay_s=0.5)
    await publish_event(js, status_event("delivered"))
    await eventually(lambda: len(receiver.on("/down")) >= 2, what="down retried")
    assert len(receiver.on("/ok")) == 1
    await first.stop()

    receiver.default = {}  # the endpoint comes back while no ams-reporter runs
    second = await start_reporter()
    await eventually(lambda: outcome(second, "delivered") == 1, what="delivered after restart")
    await eventually(lambda: all_settled(js), what="everything acked")
    assert len(receiver.on("/ok")) == 1
    assert (
        receiver.on("/down")[-1].headers["webhook-id"]
        == receiver.on("/ok")[0].headers["webhook-id"]
    )


async def test_a_nats_restart_mid_retry_loses_no_pending_delivery(
    js, nats_server: NatsServer, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(
        js, "acc1", endpoint("ok", receiver.url("/ok")), endpoint("down", receiver.url("/down"))
    )
    receiver.default = {"/down": 503}
    service = await start_reporter(retry_base_s=0.3, retry_max_delay_s=0.5)
    await publish_event(js, status_event("delivered"))
    await eventually(lambda: len(receiver.on("/down")) >= 2, what="down retried")
    await eventually(lambda: settled(js), what="status message acked: the task is queued")

    nats_server.restart()
    receiver.default = {}
    await eventually(
        lambda: outcome(service, "delivered") == 2,
        timeout=20,
        what="delivered after the NATS restart",
    )
    assert len(receiver.on("/ok")) == 1


async def test_a_batch_endpoint_gets_json_arrays_flushed_by_size_and_time(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(js, "acc1", endpoint("bulk", receiver.url("/bulk"), batch=True))
    service = await start_reporter(webhook_batch_max_items=2, webhook_batch_max_wait_s=0.3)
    events = [status_event("opened", mailgate_id=f"01JMAILGATE00000000000000{i}") for i in range(5)]
    for event in events:
        await publish_event(js, event)

    await eventually(
        lambda: sum(len(b) for b in receiver.bodies("/bulk")) == 5, what="five items delivered"
    )
    await eventually(lambda: settled(js), what="all acked")
    bodies = receiver.bodies("/bulk")
    assert all(isinstance(b, list) and 1 <= len(b) <= 2 for b in bodies)
    assert sorted(item["event"]["id"] for b in bodies for item in b) == sorted(
        e.event_id for e in events
    )
    assert bodies[0][0]["message"]["email"] == "user@example.com"
    for call in receiver.on("/bulk"):
        assert call.headers["webhook-id"].startswith("batch_")
        assert verify_standard(SECRET, call.headers, call.body, now=time.time())
        assert verify_simple(SECRET, call.headers["X-Mailgate-Signature"], call.body)
    assert metric(service, "mailgate_webhook_batch_items_count") == len(bodies)
    records = await delivery_records(js)  # one fact per event of each batch
    assert sorted(r.status_event_id for r in records) == sorted(e.event_id for e in events)
    assert {(r.endpoint_id, r.http_status) for r in records} == {("bulk", 200)}


async def test_a_failed_batch_is_retried_item_by_item_until_every_event_is_delivered(
    js, receiver: Receiver, start_reporter: StartReporter
) -> None:
    await put_endpoints(js, "acc1", endpoint("bulk", receiver.url("/bulk"), batch=True))
    receiver.script = {"/bulk": [500]}
    service = await start_reporter(webhook_batch_max_items=10, webhook_batch_max_wait_s=0.3)
    events = [status_event("sent", mailgate_id=f"01JMAILGATE00000000000000{i}") for i in range(3)]
    for event in events:
        await publish_event(js, event)

    await eventually(lambda: outcome(service, "delivered") == 3, what="all three delivered")
    await eventually(lambda: all_settled(js), what="everything acked")
    delivered_ids = [item["event"]["id"] for b in receiver.bodies("/bulk")[1:] for item in b]
    assert sorted(delivered_ids) == sorted(e.event_id for e in events)
