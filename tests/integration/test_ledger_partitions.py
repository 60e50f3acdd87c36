"""ledger history partitioned by month: migrating a 0001 database, idempotency, retention."""

from __future__ import annotations

import datetime as dt
import json

import asyncpg
from mailgate_core import schemas as s
from mailgate_core.ids import new_ulid, ulid_time_ms
from mailgate_core.nats import publish_event
from mailgate_fakes.testing import eventually
from mailgate_ledger.migrations import load_migrations
from mailgate_ledger.partitions import (
    apply_retention,
    month_of,
    months_ahead,
    partition_name,
    ulid_prefix,
)
from test_ledger_support import start_ledger, status_events

__all__ = ["start_ledger"]

ACCOUNT = "01HACCOUNT000000000000000A"
NOW = dt.datetime.now(dt.UTC)
OLD = NOW - dt.timedelta(days=200)


def _ms(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000)


async def _partition_of(conn: asyncpg.Connection, table: str, column: str, value: str) -> str:
    return str(
        await conn.fetchval(
            f"SELECT tableoid::regclass::text FROM {table} WHERE {column} = $1",  # noqa: S608
            value,
        )
    )


async def _partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent IN ('messages'::regclass, 'events'::regclass)"""
    )
    return {r["relname"] for r in rows}


async def _fill_0001(conn: asyncpg.Connection) -> dict[str, str]:
    """A database at schema version 1 with an old and a recent message and their facts."""
    await conn.execute(load_migrations()[0].sql)
    await conn.execute(
        """CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL
           DEFAULT '', applied_at timestamptz NOT NULL DEFAULT now());
           INSERT INTO schema_migrations (version, name) VALUES (1, '0001_init.sql')"""
    )
    ids = {
        "old": new_ulid(_ms(OLD)),
        "new": new_ulid(),
        "old_fact": new_ulid(_ms(OLD)),
        "new_fact": new_ulid(),
        "pending_fact": "7d9e1c2a-0b1f-4a57-9a0e-3c5b2f1e8d44",
    }
    for key, when in (("old", OLD), ("new", NOW)):
        await conn.execute(
            """INSERT INTO messages (mailgate_id, external_id, campaign_id, account_id, recipient,
                                     status, status_rank, accepted_at, updated_at)
               VALUES ($1, $2, 'c-0001', $3, 'ivan@example.org', 'sent', 10, $4, $4)""",
            ids[key],
            f"ams-{key}",
            ACCOUNT,
            when,
        )
        await conn.execute(
            """INSERT INTO events (event_id, mailgate_id, subject, name, status_name, status_data,
                                   occurred_at, recorded_at, data)
               VALUES ($1, $2, 'mail.submitted', 'sent', 'sent', '{}', $3, $3, '{"k": 1}')""",
            ids[f"{key}_fact"],
            ids[key],
            when,
        )
    # a Postal webhook still waiting for its message (named by Postal id only)
    await conn.execute(
        """INSERT INTO events (event_id, postal_id, subject, name, status_name, status_data,
                               status_pending, occurred_at, data)
           VALUES ($1, 555, 'postal.MessageSent', 'delivered', 'delivered', '{}', true, now(),
                   '{}')""",
        ids["pending_fact"],
    )
    await conn.execute(
        "INSERT INTO suppressions (account_id, email, reason) VALUES ($1, $2, 'manual')",
        ACCOUNT,
        "x@example.org",
    )
    return ids


async def test_a_0001_database_with_data_migrates_into_monthly_partitions(
    start_ledger, database_url, js
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        ids = await _fill_0001(conn)
        # Retention would drop the 200-day-old month while the test reads it.
        ledger = await start_ledger(retention_days=3650)
        old_month, new_month = month_of(OLD), month_of(NOW)
        assert await _partition_of(conn, "messages", "mailgate_id", ids["old"]) == partition_name(
            "messages", old_month
        )
        assert await _partition_of(conn, "messages", "mailgate_id", ids["new"]) == partition_name(
            "messages", new_month
        )
        assert await _partition_of(conn, "events", "event_id", ids["old_fact"]) == partition_name(
            "events", old_month
        )
        expected = {partition_name(t, m) for t in ("messages", "events") for m in [old_month]}
        expected |= {
            partition_name(t, m) for t in ("messages", "events") for m in months_ahead(NOW, 2)
        }
        assert expected <= await _partitions(conn)
        assert await conn.fetchval("SELECT count(*) FROM event_ids") == 3
        assert await conn.fetchval("SELECT count(*) FROM messages_default") == 0
        emitted = await conn.fetchval(
            "SELECT campaign_id FROM events WHERE event_id = $1", ids["new_fact"]
        )
        assert emitted == "c-0001"  # campaign statistics read events alone now
        assert await conn.fetchval("SELECT reason FROM suppressions") == "manual"
    finally:
        await conn.close()

    # the history reads as before through the admin API
    status, detail, _ = await ledger.call("GET", f"/v1/messages/{ids['old']}")
    assert status == 200 and detail["external_id"] == "ams-old"
    assert [e["event_id"] for e in detail["events"]] == [ids["old_fact"]]
    assert detail["events"][0]["data"] == {"k": 1}

    # idempotency survived: a redelivered 0001 fact is a duplicate, the pending one completes
    again = s.MailSubmitted(
        event_id=ids["new_fact"],
        message=s.MessageRef(mailgate_id=ids["new"], account_id=ACCOUNT, recipient="r@x.org"),
        postal_id=555,
        postal_token="tok",
    )
    await js.publish(again.subject(), s.encode(again), headers={"Nats-Msg-Id": "redelivered"})
    fresh = s.MailSubmitted(
        message=s.MessageRef(mailgate_id=ids["new"], account_id=ACCOUNT, recipient="r@x.org"),
        postal_id=555,
        postal_token="tok",
    )
    await publish_event(js, fresh)

    async def delivered() -> list[s.StatusEvent] | None:
        events = await status_events(js)
        return events if any(e.name == "delivered" for e in events) else None

    events = await eventually(delivered, what="the migrated pending webhook emitted")
    assert sorted(e.source_event_id for e in events) == sorted(
        [fresh.event_id, ids["pending_fact"]]
    )
    metrics = (await ledger.call("GET", "/metrics", token=None))[1].decode()
    assert "mailgate_ledger_duplicate_events_total 1.0" in metrics


async def test_retention_drops_whole_old_partitions_and_keeps_recent_ones(
    start_ledger, database_url, js
) -> None:
    ledger = await start_ledger(retention_days=3650)
    backlog = new_ulid(_ms(OLD))  # a late backlog: its month gets a partition on arrival
    recent = new_ulid()
    for mid in (backlog, recent):
        ref = s.MessageRef(mailgate_id=mid, account_id=ACCOUNT, recipient="r@example.org")
        await publish_event(
            js,
            s.MailAccepted(
                message=ref, mail_from="f@x.org", credential="c", message_id_header="<x>"
            ),
        )

    async def both() -> bool:
        return all(
            [(await ledger.call("GET", f"/v1/messages/{m}"))[0] == 200 for m in (backlog, recent)]
        )

    await eventually(both, what="both messages recorded")
    conn = await asyncpg.connect(database_url)
    try:
        old_part = partition_name("messages", month_of(OLD))
        assert await _partition_of(conn, "messages", "mailgate_id", backlog) == old_part
        # an old fact (recorded long ago) in an old events partition, and its id
        await conn.execute("SELECT ledger_ensure_partitions($1::date[])", [month_of(OLD)])
        await conn.execute(
            "INSERT INTO event_ids (event_id, recorded_at) VALUES ('old-fact', $1)", OLD
        )
        await conn.execute(
            """INSERT INTO events (event_id, subject, name, occurred_at, recorded_at, data)
               VALUES ('old-fact', 'stats.ams.mailing', 'stats.ams.mailing', $1, $1, '{}')""",
            OLD,
        )
        result = await apply_retention(ledger.service.pool, cutoff=NOW - dt.timedelta(days=90))
        assert set(result.dropped) == {old_part, partition_name("events", month_of(OLD))}
        assert result.deleted["event_ids"] == 1
        remaining = await _partitions(conn)
        assert old_part not in remaining
        assert partition_name("messages", month_of(NOW)) in remaining
        assert await conn.fetchval("SELECT count(*) FROM events WHERE event_id = 'old-fact'") == 0
    finally:
        await conn.close()
    assert (await ledger.call("GET", f"/v1/messages/{backlog}"))[0] == 404
    status, detail, _ = await ledger.call("GET", f"/v1/messages/{recent}")
    assert status == 200 and [e["name"] for e in detail["events"]] == ["accepted"]


async def test_time_bounds_in_python_match_the_sql_partition_bounds(database_url) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(load_migrations()[0].sql)
        await conn.execute(load_migrations()[1].sql)
        moments = [
            OLD,
            NOW,
            dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
            dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
        ]
        for moment in moments:
            assert await conn.fetchval("SELECT ledger_ulid_prefix($1)", moment) == ulid_prefix(
                moment
            )
        mid = new_ulid()
        back = await conn.fetchval("SELECT ledger_ulid_time($1)", mid)
        assert round(back.timestamp() * 1000) == ulid_time_ms(mid)
        assert await conn.fetchval("SELECT ledger_ulid_time('not-a-ulid')") is None
        bound = await conn.fetchval(
            """SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c
               WHERE c.relname = $1""",
            partition_name("messages", month_of(NOW)),
        )
        start = dt.datetime(NOW.year, NOW.month, 1, tzinfo=dt.UTC)
        assert json.dumps(ulid_prefix(start))[1:-1] in bound
    finally:
        await conn.close()
