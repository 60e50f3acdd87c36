"""The ledger's batch write path: a whole backlog in few large batches leaves exactly the
rows that the same facts leave one fact per transaction, and a transaction that fails half
way loses and duplicates nothing."""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import msgspec
from mailgate_core import schemas as s
from mailgate_core.ids import new_ulid
from mailgate_fakes.testing import eventually
from mailgate_ledger.app import build
from mailgate_ledger.ingest import _jsonb_order
from prometheus_client import CollectorRegistry
from test_ledger_support import ledger_settings, start_ledger, status_events

__all__ = ["start_ledger"]

ACCOUNT = "01HACCOUNT000000000000000A"
CONSUMERS = (("MAIL", "ledger-mail"), ("POSTAL", "ledger-postal"), ("TRACK", "ledger-track"))


def _ref(mid: str, n: int) -> s.MessageRef:
    return s.MessageRef(
        mailgate_id=mid,
        account_id=ACCOUNT,
        recipient=f"User{n}@Example.org",
        external_id=f"ams-{n}",
        campaign_id=str(70 + n % 2),
    )


def _accepted(mid: str, n: int) -> s.MailAccepted:
    return s.MailAccepted(
        message=_ref(mid, n),
        mail_from="news@example.com",
        credential="ams",
        message_id_header=f"<{mid}@mailgate.test>",
        subject_line="Weekly",
        size=100 + n,
        raw=b"Subject: x\r\n\r\nbody",
    )


def _postal(mid: str | None, postal_id: int, t: float, **extra: Any) -> s.PostalEvent:
    values: dict[str, Any] = {
        "event": "MessageSent",
        "postal_timestamp": t,
        "mailgate_id": mid,
        "postal_id": postal_id,
        "status": "Sent",
        "output": "250 2.0.0 OK",
        "details": "accepted",
        "recipient": "x@example.org",
    } | extra
    return s.PostalEvent(**values)


def _mixed_facts() -> list[tuple[s.Event, str]]:
    """Every kind of fact, with duplicates, a fact of a message never accepted, facts known
    by their Postal id only, repeated outcomes and a dead letter (with each its Nats-Msg-Id)."""
    t0 = time.time() - 60
    ids = [new_ulid() for _ in range(6)]
    a, b, c, d, e, unknown = ids
    facts: list[s.Event] = []
    # a: the whole life, with a second 'delivered' (repeated) and a suppressing unsubscribe.
    facts += [
        _accepted(a, 0),
        s.MailSubmitted(message=_ref(a, 0), postal_id=1001, postal_token="tok-a"),
        _postal(a, 1001, t0 + 1),
        _postal(a, 1001, t0 + 2),  # the reconciler's and the webhook's: emitted once
        s.TrackOpen(mailgate_id=a, ip="203.0.113.9", audience="human", user_agent="UA"),
        s.TrackClick(mailgate_id=a, url="https://example.com/x", audience="human"),
        s.TrackUnsubscribe(mailgate_id=a, one_click=True),
    ]
    # b: a hard bounce known by its Postal id only, before the message is even submitted.
    facts += [
        _postal(
            None,
            2002,
            t0 + 3,
            event="MessageDeliveryFailed",
            status="HardFail",
            output="550 5.1.1 <x@example.org>: user unknown",
        ),
        _accepted(b, 1),
        s.MailSubmitted(message=_ref(b, 1), postal_id=2002, postal_token="tok-b"),
    ]
    # c: skipped; d: failed twice (once per message); e: delayed then delivered, clicked.
    facts += [
        s.MailSkipped(
            message=_ref(c, 2),
            mail_from="news@example.com",
            reason="manual",
            subject_line="Weekly",
        ),
        _accepted(d, 3),
        s.MailFailed(message=_ref(d, 3), reason="rejected", code="550", detail="no"),
        _accepted(e, 4),
        s.MailSubmitted(message=_ref(e, 4), postal_id=5005, postal_token="tok-e"),
        _postal(e, 5005, t0 + 4, event="MessageDelayed", status="SoftFail", output="451 later"),
        _postal(e, 5005, t0 + 5),
        s.TrackClick(mailgate_id=e, url="https://example.com/y\x00z"),  # NUL is stripped
        # history only: Postal's own open, an inbound Unknown, delivered webhooks, a dead letter
        _postal(e, 5005, t0 + 6, event="MessageLoaded"),
        _postal(None, 9009, t0 + 7, event="Unknown"),
        s.WebhookDelivered(
            status_event_id="st-x",
            status_name="sent",
            message=_ref(a, 0),
            endpoint_id="ep1",
            url="https://hooks.example.com/",
            http_status=200,
        ),
        # a fact of a message the ledger never hears of: pending for good
        s.TrackOpen(mailgate_id=unknown, audience="prefetch"),
    ]
    dead = s.StatusEvent(
        event_id=f"st-{new_ulid()}",
        name="delivered",
        message=_ref(a, 0),
        timestamp=int(t0),
    )
    facts.append(
        s.WebhookDeadLettered(
            status=dead, endpoint_id="ep1", url="https://hooks.example.com/", attempts=8
        )
    )
    out = [(f, f.event_id) for f in facts]
    # duplicates: the same facts again under another Nats-Msg-Id (a producer's retry)
    out += [(facts[4], f"again-{uuid.uuid4().hex}"), (facts[8], f"again-{uuid.uuid4().hex}")]
    return out


async def _publish_all(js: Any, facts: list[tuple[s.Event, str]]) -> None:
    for fact, msg_id in facts:
        await js.publish(fact.subject(), s.encode(fact), headers={"Nats-Msg-Id": msg_id})


def _without_made_at(payload: bytes) -> dict[str, Any]:
    return {k: v for k, v in msgspec.json.decode(payload).items() if k != "occurred_at"}


async def _rows(database_url: str) -> dict[str, Any]:
    """Everything the facts leave in Postgres, without ids and times made at write time."""
    conn = await asyncpg.connect(database_url)
    try:
        queries = {
            "events": """SELECT event_id, mailgate_id, postal_id, subject, name, status_name,
                                status_data::text, status_pending, occurred_at, data::text,
                                campaign_id FROM events ORDER BY event_id""",
            "messages": """SELECT mailgate_id, external_id, campaign_id, postal_id,
                                  postal_token, account_id, recipient, sender, subject, size,
                                  status, status_rank, accepted_at
                           FROM messages ORDER BY mailgate_id""",
            "outbox": "SELECT subject, msg_id, payload FROM outbox ORDER BY msg_id",
            "suppressions": "SELECT account_id, email, reason FROM suppressions ORDER BY 1, 2",
            "dead_letters": """SELECT event_id, status_event_id, status_name, mailgate_id,
                                      account_id, endpoint_id, url, attempts, reason,
                                      http_status, payload FROM dead_letters ORDER BY 1""",
            "event_ids": "SELECT event_id FROM event_ids ORDER BY 1",
        }
        rows = {name: [tuple(r) for r in await conn.fetch(sql)] for name, sql in queries.items()}
        # a status event's own occurred_at is when it was made; the rest is the fact's
        rows["outbox"] = [
            (subject, msg_id, _without_made_at(payload))
            for subject, msg_id, payload in rows["outbox"]
        ]
        return rows
    finally:
        await conn.close()


async def _ingest(nats_url: str, database_url: str, count: int, batch_size: int) -> None:
    ledger = await build(
        ledger_settings(database_url, nats_url, batch_size=batch_size),
        registry=CollectorRegistry(),
    )
    await ledger.start()
    conn = await asyncpg.connect(database_url)
    try:

        async def recorded() -> bool:
            return await conn.fetchval("SELECT count(*) FROM events") >= count

        await eventually(recorded, timeout=30, what="every fact recorded")

        async def published() -> bool:
            return not await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")

        await eventually(published, timeout=30, what="every status event published")
    finally:
        await conn.close()
        await ledger.stop()


async def test_a_mixed_backlog_in_large_batches_leaves_the_rows_of_one_fact_per_batch(
    js, nats_url, database_url, postgres
) -> None:
    facts = _mixed_facts()
    await _publish_all(js, facts)
    distinct = len({f.event_id for f, _ in facts})

    await _ingest(nats_url, database_url, distinct, batch_size=256)
    batched = await _rows(database_url)

    # the same streams again from the start, one fact per transaction, into a fresh database
    for stream, durable in CONSUMERS:
        await js.delete_consumer(stream, durable)
    single_url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    await _ingest(nats_url, single_url, distinct, batch_size=1)
    single = await _rows(single_url)

    for table in batched:
        assert batched[table] == single[table], table
    # and the rows are the ones the rules say
    events = {r[0]: r for r in batched["events"]}
    assert len(events) == distinct
    by_status = {r[1]: r[10] for r in batched["messages"]}
    assert sorted(by_status.values()) == [
        "clicked",
        "failed",
        "hard_bounced",
        "skipped",
        "unsubscribed",
    ]
    names = sorted(p[0].partition(".")[2] for p in batched["outbox"])
    expected = [
        *("sent", "delivered", "opened", "clicked", "unsubscribed"),  # a
        *("hard_bounced", "sent"),  # b
        "skipped",  # c
        "failed",  # d
        *("sent", "soft_bounced", "delivered", "clicked"),  # e
    ]
    assert names == sorted(expected)
    pending = [r for r in batched["events"] if r[7]]
    assert [(r[4], r[5]) for r in pending] == [("opened", "opened")]  # the unknown message
    repeated = [r for r in batched["events"] if r[4] == "delivered" and r[5] is None]
    assert len(repeated) == 1 and repeated[0][10] == "70"  # history only, under its campaign
    assert {r[2] for r in batched["suppressions"]} == {"unsubscribed", "hard_bounced"}
    assert len(batched["dead_letters"]) == 1
    assert all("\\u0000" not in (r[9] or "") for r in batched["events"])
    # the status events are the outbox rows, once each
    stored = await status_events(js)
    assert sorted(e.event_id for e in stored) == sorted(p[1] for p in batched["outbox"])


async def test_a_transaction_failing_half_way_records_the_batch_once_on_redelivery(
    start_ledger, js, database_url
) -> None:
    facts = _mixed_facts()
    ledger = await start_ledger(batch_size=256)  # migrates
    conn = await asyncpg.connect(database_url)
    try:
        # The first statement writing status events fails once (after the locks, the event
        # ids, the message rows and the dead letter of that transaction were written).
        await conn.execute(
            """CREATE SEQUENCE fail_once;
               CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   IF nextval('fail_once') = 1 THEN
                       RAISE EXCEPTION 'injected failure';
                   END IF;
                   RETURN NULL;
               END $$;
               CREATE TRIGGER fail_once BEFORE INSERT ON outbox
                   FOR EACH STATEMENT EXECUTE FUNCTION fail_once();"""
        )
        await _publish_all(js, facts)
        distinct = len({f.event_id for f, _ in facts})

        async def recorded() -> bool:
            return await conn.fetchval("SELECT count(*) FROM events") == distinct

        await eventually(recorded, timeout=30, what="every fact recorded after the retry")
        assert await conn.fetchval("SELECT nextval('fail_once')") > 2  # it did fail once
        rows = await _rows(database_url)
    finally:
        await conn.close()
    assert len(rows["event_ids"]) == distinct
    assert len(rows["dead_letters"]) == 1
    expected = 13  # status events of _mixed_facts (see the test above)

    async def all_published() -> list[s.StatusEvent] | None:
        events = await status_events(js)
        return events if len(events) >= expected else None

    stored = await eventually(all_published, timeout=30, what="status events published")
    assert len(stored) == expected == len(rows["outbox"])
    assert len({e.event_id for e in stored}) == expected
    metrics = (await ledger.call("GET", "/metrics", token=None))[1].decode()
    failures = [
        float(line.rpartition(" ")[2])
        for line in metrics.splitlines()
        if line.startswith("mailgate_ledger_batch_failures_total{")
    ]
    assert sum(failures) == 1  # that one transaction, retried on redelivery


async def test_status_data_is_ordered_as_postgres_returns_jsonb(database_url) -> None:
    """A status event built from a new fact equals the one built from its stored row."""
    conn = await asyncpg.connect(database_url)
    try:
        for value in (
            {"zz": 1, "a": {"yy": [1, {"b": 2, "aa": None}], "x": "é"}, "bb": True, "é": 0.5},
            {"diagnostic": "550", "code": "550", "postal_status": "HardFail", "k": ""},
        ):
            text = await conn.fetchval(
                "SELECT $1::jsonb::text", msgspec.json.encode(value).decode()
            )
            assert list(_jsonb_order(value).items()) == list(msgspec.json.decode(text).items())
            assert msgspec.json.encode(_jsonb_order(value)) == msgspec.json.encode(
                msgspec.json.decode(text)
            )
    finally:
        await conn.close()
