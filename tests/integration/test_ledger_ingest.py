"""ledger consuming facts from NATS: history, status events, ordering, duplicates, bounces."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
import nats.js.errors
from mailgate_core import schemas as s
from mailgate_core.ids import new_ulid
from mailgate_core.nats import publish_event
from mailgate_core.records import SuppressionRecord, suppression_key
from mailgate_fakes.testing import eventually
from test_ledger_support import start_ledger, status_events

__all__ = ["start_ledger"]

ACCOUNT = "01HACCOUNT000000000000000A"


def _ref(mailgate_id: str, **extra: Any) -> s.MessageRef:
    values = {
        "mailgate_id": mailgate_id,
        "account_id": ACCOUNT,
        "recipient": "Ivan@Example.org",
        "external_id": "ams-42",
        "campaign_id": "73",
    } | extra
    return s.MessageRef(**values)


def _accepted(mid: str, **extra: Any) -> s.MailAccepted:
    return s.MailAccepted(
        message=_ref(mid, **extra),
        mail_from="news@example.com",
        credential="ams",
        message_id_header=f"<{mid}@mailgate.test>",
        subject_line="Скидки недели",
        size=1234,
        raw=b"Subject: x\r\n\r\nbody",
    )


def _submitted(mid: str, postal_id: int = 37171) -> s.MailSubmitted:
    return s.MailSubmitted(message=_ref(mid), postal_id=postal_id, postal_token="Qm3v8d0aZk1L2pXy")


def _postal(mid: str | None, event: str = "MessageSent", **extra: Any) -> s.PostalEvent:
    values: dict[str, Any] = {
        "event": event,
        "postal_timestamp": time.time() + 1,
        "mailgate_id": mid,
        "postal_id": 37171,
        "postal_token": "Qm3v8d0aZk1L2pXy",
        "status": "Sent",
        "output": "250 2.0.0 OK",
        "recipient": "ivan@example.org",
    } | extra
    return s.PostalEvent(**values)


async def _message(
    ledger: Any, mid: str, status: str | None = None, *, events: int = 0, timeout: float = 10
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        code, body, _ = await ledger.call("GET", f"/v1/messages/{mid}")
        if code != 200 or (status is not None and body["status"] != status):
            return None
        if len(body["events"]) < events:
            return None
        return dict(body)

    return await eventually(check, timeout=timeout, what=f"message {mid} status {status}")


async def _wait_status(js: Any, expected: int) -> list[s.StatusEvent]:
    async def check() -> list[s.StatusEvent] | None:
        events = await status_events(js)
        return events if len(events) >= expected else None

    return await eventually(check, what=f"{expected} status events")


async def test_accepted_submitted_delivered_builds_history_and_one_status_each(
    start_ledger, js, database_url
) -> None:
    ledger = await start_ledger()
    mid = new_ulid()
    delivered_fact = _postal(mid)
    for event in (_accepted(mid), _submitted(mid), delivered_fact):
        await publish_event(js, event)

    detail = await _message(ledger, mid, "delivered", events=3)
    assert detail["external_id"] == "ams-42" and detail["campaign_id"] == "73"
    assert detail["postal_id"] == 37171 and detail["postal_token"] == "Qm3v8d0aZk1L2pXy"
    assert detail["recipient"] == "Ivan@Example.org" and detail["size"] == 1234
    assert [e["name"] for e in detail["events"]] == ["accepted", "sent", "delivered"]
    assert all("raw" not in e["data"] for e in detail["events"])

    events = await _wait_status(js, 2)
    assert sorted(e.name for e in events) == ["delivered", "sent"]
    for event in events:
        assert event.message == _ref(mid)
        assert event.event_id == f"st-{event.source_event_id}"
    delivered = next(e for e in events if e.name == "delivered")
    assert delivered.timestamp == int(delivered_fact.postal_timestamp)
    assert delivered.data["code"] == "250"

    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM messages WHERE mailgate_id = $1", mid)
        unpublished = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    finally:
        await conn.close()
    assert row["status"] == "delivered" and row["external_id"] == "ams-42"
    assert unpublished == 0

    code, page, _ = await ledger.call("GET", "/v1/messages?external_id=ams-42")
    assert code == 200 and [m["mailgate_id"] for m in page["items"]] == [mid]
    for query in ("email=ivan@example.org", "campaign_id=73", "postal_id=37171"):
        code, page, _ = await ledger.call("GET", f"/v1/messages?{query}")
        assert [m["mailgate_id"] for m in page["items"]] == [mid], query

    code, stats, _ = await ledger.call("GET", "/v1/campaigns/73/stats")
    assert code == 200 and stats["messages"] == 1 and stats["statuses"]["delivered"] == 1
    assert stats["events"]["delivered"] == {"total": 1, "unique": 1}
    assert stats["rates"]["delivery_rate"] == 1.0

    metrics = (await ledger.call("GET", "/metrics", token=None))[1].decode()
    assert 'mailgate_ledger_status_published_total{name="delivered"} 1.0' in metrics
    assert 'mailgate_ledger_events_total{subject_kind="mail.accepted"} 1.0' in metrics


async def test_a_webhook_delivery_is_recorded_in_the_message_history_once(start_ledger, js) -> None:
    ledger = await start_ledger()
    mid = new_ulid()
    await publish_event(js, _accepted(mid))
    delivered = s.WebhookDelivered(
        event_id=f"wd-st-x-ep1-{mid}",
        status_event_id="st-x",
        status_name="opened",
        message=_ref(mid),
        endpoint_id="ep1",
        url="https://crm.example.com/hook",
        http_status=200,
        attempts=2,
        duration_ms=8.25,
    )
    await publish_event(js, delivered)
    # a redelivery that got past JetStream's de-duplication window: the ledger keeps one row
    await js.publish(delivered.subject(), s.encode(delivered), headers={"Nats-Msg-Id": new_ulid()})
    detail = await _message(ledger, mid, events=2)
    [fact] = [e for e in detail["events"] if e["name"] == "webhook_delivered"]
    assert fact["event_id"] == delivered.event_id

    async def consumed() -> bool:
        info = await js.consumer_info("MAIL", "ledger-mail")
        return not info.num_pending and not info.num_ack_pending

    await eventually(consumed, what="MAIL consumed")
    code, timeline, _ = await ledger.call("GET", f"/v1/messages/{mid}/timeline")
    assert code == 200
    assert [e["name"] for e in timeline["timeline"]] == ["accepted", "webhook_delivered"]
    assert "status_event" not in timeline["timeline"][-1]  # history only
    [row] = timeline["webhook_deliveries"]
    assert row["status_event"] == "opened" and row["status_event_id"] == "st-x"
    assert (row["endpoint_id"], row["url"]) == ("ep1", "https://crm.example.com/hook")
    assert (row["http_status"], row["attempts"], row["duration_ms"]) == (200, 2, 8.25)
    assert timeline["dead_letters"] == []
    assert await status_events(js) == []


async def test_a_fact_published_twice_yields_one_status_event(start_ledger, js) -> None:
    ledger = await start_ledger()
    mid = new_ulid()
    events = [_accepted(mid), _submitted(mid), _postal(mid)]
    for event in events:
        await publish_event(js, event)
    for event in events:  # a replay with new Nats-Msg-Ids: JetStream keeps both copies
        await js.publish(event.subject(), s.encode(event), headers={"Nats-Msg-Id": new_ulid()})
    info = await js.stream_info("MAIL")
    assert info.state.messages == 4

    await _message(ledger, mid, "delivered")

    async def all_consumed() -> bool:
        for stream, durable in (("MAIL", "ledger-mail"), ("POSTAL", "ledger-postal")):
            consumer = await js.consumer_info(stream, durable)
            if consumer.num_pending or consumer.num_ack_pending:
                return False
        return True

    await eventually(all_consumed, what="replay consumed")
    detail = await _message(ledger, mid)
    assert len(detail["events"]) == 3
    names = sorted(e.name for e in await status_events(js))
    assert names == ["delivered", "sent"]


async def test_a_reconciled_outcome_and_postal_s_late_webhook_emit_one_customer_event(
    start_ledger, js
) -> None:
    ledger = await start_ledger()
    mid = new_ulid()
    reconciled = _postal(mid, event_id=f"rec-{mid}-Sent", payload={"reconciled": True})
    for event in (_accepted(mid), _submitted(mid), reconciled):
        await publish_event(js, event)
    await _message(ledger, mid, "delivered", events=3)
    # Postal's own webhook for the same delivery arrives later, under its own uuid.
    await publish_event(js, _postal(mid))
    detail = await _message(ledger, mid, "delivered", events=4)

    assert [e["name"] for e in detail["events"]] == ["accepted", "sent", "delivered", "delivered"]
    assert sorted(e.name for e in await _wait_status(js, 2)) == ["delivered", "sent"]
    code, stats, _ = await ledger.call("GET", "/v1/campaigns/73/stats")
    assert code == 200 and stats["events"]["delivered"] == {"total": 1, "unique": 1}
    metrics = (await ledger.call("GET", "/metrics", token=None))[1].decode()
    assert 'mailgate_ledger_repeated_outcomes_total{status="delivered"} 1.0' in metrics
    assert 'mailgate_ledger_status_published_total{name="delivered"} 1.0' in metrics


async def test_a_webhook_before_the_message_is_applied_once_the_message_arrives(
    start_ledger, js
) -> None:
    ledger = await start_ledger()
    mid = new_ulid()
    await publish_event(js, _postal(mid))  # MessageSent consumed first

    async def postal_done() -> bool:
        info = await js.consumer_info("POSTAL", "ledger-postal")
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(postal_done, what="webhook recorded")
    assert await status_events(js) == []  # no MessageRef yet: nothing emitted

    await publish_event(js, _accepted(mid))
    detail = await _message(ledger, mid, "delivered")
    await publish_event(js, _submitted(mid))
    await _wait_status(js, 2)
    detail = await _message(ledger, mid)
    assert detail["status"] == "delivered"  # `sent` came later but ranks lower
    names = sorted(e.name for e in await status_events(js))
    assert names == ["delivered", "sent"]
    delivered = next(e for e in await status_events(js) if e.name == "delivered")
    assert delivered.message == _ref(mid)


async def test_a_webhook_naming_only_the_postal_id_waits_for_mail_submitted(
    start_ledger, js
) -> None:
    ledger = await start_ledger()
    mid = new_ulid()
    await publish_event(js, _accepted(mid))
    await _message(ledger, mid, "accepted")
    await publish_event(js, _postal(None, postal_id=555, output="250 OK"))

    async def postal_done() -> bool:
        info = await js.consumer_info("POSTAL", "ledger-postal")
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(postal_done, what="webhook recorded")
    assert await status_events(js) == []
    await publish_event(js, _submitted(mid, postal_id=555))
    await _message(ledger, mid, "delivered")
    names = sorted(e.name for e in await _wait_status(js, 2))
    assert names == ["delivered", "sent"]


async def test_a_hard_bounce_suppresses_the_recipient_in_postgres_and_kv(
    start_ledger, js, database_url
) -> None:
    ledger = await start_ledger()
    mid = new_ulid()
    await publish_event(js, _accepted(mid))
    await publish_event(js, _submitted(mid))
    await publish_event(
        js,
        _postal(mid, "MessageDeliveryFailed", status="HardFail", output="550 5.1.1 User unknown"),
    )
    detail = await _message(ledger, mid, "hard_bounced", events=3)
    assert detail["events"][-1]["name"] == "hard_bounced"

    events = await _wait_status(js, 2)
    bounce = next(e for e in events if e.name == "hard_bounced")
    assert bounce.data["code"] == "550" and bounce.data["enhanced_code"] == "5.1.1"

    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM suppressions WHERE account_id = $1", ACCOUNT)
    finally:
        await conn.close()
    assert row["email"] == "ivan@example.org" and row["reason"] == "hard_bounced"

    kv = await js.key_value("suppressions")

    async def in_kv() -> SuppressionRecord | None:
        try:
            entry = await kv.get(suppression_key(ACCOUNT, "ivan@example.org"))
        except nats.js.errors.KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value, type=SuppressionRecord)

    record = await eventually(in_kv, what="suppression in KV")
    assert record.reason == "hard_bounced" and record.email == "ivan@example.org"


async def test_track_events_and_a_soft_failure_follow_the_status_order(start_ledger, js) -> None:
    ledger = await start_ledger()
    mid = new_ulid()
    await publish_event(js, _accepted(mid))
    await publish_event(js, _submitted(mid))
    await publish_event(js, _postal(mid, "MessageDelayed", status="SoftFail", output="451 later"))
    await publish_event(js, _postal(mid))
    await publish_event(js, s.TrackOpen(mailgate_id=mid, audience="prefetch", user_agent="GIP"))
    await publish_event(js, s.TrackClick(mailgate_id=mid, url="https://example.com/p"))
    await _message(ledger, mid, "clicked")
    events = await _wait_status(js, 5)
    by_name = {e.name: e for e in events}
    assert set(by_name) == {"sent", "soft_bounced", "delivered", "opened", "clicked"}
    assert by_name["clicked"].data["url"] == "https://example.com/p"
    assert by_name["opened"].data["automated"] is True
    assert by_name["soft_bounced"].data["code"] == "451"


async def test_an_undecodable_message_is_terminated_and_the_rest_recorded(start_ledger, js) -> None:
    ledger = await start_ledger()
    mid = new_ulid()
    await js.publish("mail.accepted", b'{"not": "an event"}', headers={"Nats-Msg-Id": "bad-1"})
    await publish_event(js, _accepted(mid))
    await _message(ledger, mid, "accepted")

    async def settled() -> bool:
        info = await js.consumer_info("MAIL", "ledger-mail")
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(settled, what="bad message terminated")
    metrics = (await ledger.call("GET", "/metrics", token=None))[1].decode()
    assert 'mailgate_ledger_rejected_messages_total{stream="MAIL"} 1.0' in metrics


async def test_committed_but_unpublished_status_events_are_republished(
    start_ledger, js, database_url
) -> None:
    """A crash between the commit and the publish leaves outbox rows; the loop sends them."""
    event = s.StatusEvent(
        event_id="st-crash-1",
        name="delivered",
        message=_ref(new_ulid()),
        timestamp=1714400000,
    )
    conn = await asyncpg.connect(database_url)
    try:
        await start_ledger()  # migrates
        await conn.execute(
            """INSERT INTO outbox (subject, msg_id, payload, created_at)
               VALUES ($1, $2, $3, now() - interval '1 minute')""",
            event.subject(),
            event.event_id,
            s.encode(event),
        )
        (got,) = await _wait_status(js, 1)
        assert got == event

        async def marked() -> bool:
            return bool(
                await conn.fetchval("SELECT published_at IS NOT NULL FROM outbox WHERE id = 1")
            )

        await eventually(marked, what="row marked published")
    finally:
        await conn.close()


async def test_postgres_outage_naks_and_the_batch_is_recorded_later(
    start_ledger, js, postgres, database_url
) -> None:
    ledger = await start_ledger()
    name = urlsplit(database_url).path.lstrip("/")
    postgres.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    postgres.execute(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"  # noqa: S608
    )
    try:
        mid = new_ulid()
        await publish_event(js, _accepted(mid))

        async def not_ready() -> bool:
            code, body, _ = await ledger.call("GET", "/readyz", token=None)
            return code == 503 and "postgres" in body["failing"]

        await eventually(not_ready, what="readiness fails")

        async def nakked() -> bool:
            info = await js.consumer_info("MAIL", "ledger-mail")
            return info.num_redelivered >= 1 or info.num_ack_pending >= 1

        await eventually(nakked, what="batch not acknowledged")
        info = await js.consumer_info("MAIL", "ledger-mail")
        assert info.ack_floor.stream_seq == 0  # nothing acknowledged without a commit
    finally:
        postgres.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    await _message(ledger, mid, "accepted", timeout=30)
