"""Concurrent batches of one stream: the pull worker hands out two batches at once when the
handler says it may, and the ledger's batches still claim their facts in the order they were
fetched, commit after the batch ahead, and yield to it when it waits for one of their rows."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import structlog
from mailgate_core import schemas as s
from mailgate_core.ids import new_ulid
from mailgate_core.nats import Ack, Outcome, publish_event
from mailgate_fakes.testing import eventually
from mailgate_ledger import ingest
from mailgate_ledger.ingest import CONSUMERS, lock_key
from mailgate_ledger.pull import LeanPullWorker
from nats.aio.msg import Msg
from test_ledger_support import start_ledger

__all__ = ["start_ledger"]

ACCOUNT = "01HACCOUNT000000000000000C"
STREAMS = [stream for stream, _, _ in CONSUMERS]


def _accepted(mid: str) -> s.MailAccepted:
    return s.MailAccepted(
        message=s.MessageRef(mailgate_id=mid, account_id=ACCOUNT, recipient=f"{mid}@example.org"),
        mail_from="news@example.com",
        credential="ams",
        message_id_header=f"<{mid}@mailgate.test>",
        subject_line="Weekly",
        size=10,
    )


def _msgs(events: Sequence[s.Event]) -> list[Msg]:
    return [Msg(None, subject=e.subject(), data=s.encode(e)) for e in events]  # type: ignore[arg-type]


async def _count(conn: asyncpg.Connection, sql: str, *args: object) -> int:
    return int(await conn.fetchval(sql, *args))


async def test_a_handler_that_allows_it_gets_two_batches_at_once(js, nc) -> None:  # type: ignore[no-untyped-def]
    for n in range(20):
        await publish_event(js, s.TrackOpen(mailgate_id=f"c{n}"))
    sizes: list[int] = []
    release = asyncio.Event()

    async def handle(msgs: Sequence[Msg]) -> list[Outcome]:
        sizes.append(len(msgs))
        await release.wait()
        return [Ack()] * len(msgs)

    handle.batches_in_flight = 2  # type: ignore[attr-defined]
    worker = LeanPullWorker(
        js, "TRACK", "c", "track.>", handle, nc=nc, batch=8, fetch_timeout_s=0.5, sync_acks=False
    )
    assert worker.batch_slots() == 2
    await worker.start()
    try:
        await eventually(lambda: len(sizes) == 2, what="two batches in hand")
        info = await js.consumer_info("TRACK", "c")
        assert info.num_ack_pending == 16  # both held, nothing acked before the handler returns
        assert sizes == [8, 8]
        release.set()

        async def settled() -> bool:
            info = await js.consumer_info("TRACK", "c")
            return sum(sizes) == 20 and info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(settled, what="every message handled and acked")
    finally:
        await worker.stop()


async def test_a_batch_claims_its_facts_only_after_the_batch_ahead_of_it(
    start_ledger, database_url
) -> None:
    ledger = await start_ledger()
    handle = ledger.service.workers[STREAMS.index("MAIL")].handle_batch
    first, second = [new_ulid() for _ in range(3)], [new_ulid() for _ in range(3)]
    holder = await asyncpg.connect(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        # The first batch waits for a lock of one of its messages held elsewhere.
        await holder.execute("SELECT pg_advisory_lock($1)", lock_key("m", first[0]))
        ahead = asyncio.create_task(handle(_msgs([_accepted(m) for m in first])))

        async def first_waits() -> bool:
            sql = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            return await _count(conn, sql) == 1

        await eventually(first_waits, what="the first batch waiting for its lock")
        behind = asyncio.create_task(handle(_msgs([_accepted(m) for m in second])))
        done, _ = await asyncio.wait({behind}, timeout=0.5)
        assert not done  # the second batch (other messages, no lock in its way) waits too
        assert await _count(conn, "SELECT count(*) FROM event_ids") == 0
        # ... before its claim: it holds none of its messages' locks
        keys = [lock_key("m", m) for m in second]
        sql = """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
                 AND ((classid::bigint << 32) | objid::bigint) = ANY($1::bigint[])"""
        assert await _count(conn, sql, keys) == 0
        # (the check does see the locks the first batch took, in order, before the held one)
        blocked = lock_key("m", first[0])
        taken = [k for k in (lock_key("m", m) for m in first[1:]) if k < blocked]
        assert await _count(conn, sql, [lock_key("m", m) for m in first[1:]]) == len(taken)
        await holder.execute("SELECT pg_advisory_unlock($1)", lock_key("m", first[0]))
        outcomes = await asyncio.wait_for(asyncio.gather(ahead, behind), timeout=10)
    finally:
        await holder.close()
    try:
        assert all(isinstance(o, Ack) for batch in outcomes for o in batch)
        rows = await conn.fetch("SELECT mailgate_id FROM messages ORDER BY 1")
        assert [r[0] for r in rows] == sorted(first + second)
    finally:
        await conn.close()


async def test_a_batch_ready_first_yields_to_the_batch_ahead_waiting_for_a_row(
    start_ledger, database_url, monkeypatch
) -> None:
    monkeypatch.setattr(ingest, "TURN_WAIT_S", 0.2)
    ledger = await start_ledger()
    workers = ledger.service.workers
    mail = workers[STREAMS.index("MAIL")].handle_batch
    track = workers[STREAMS.index("TRACK")].handle_batch
    one, two = new_ulid(), new_ulid()
    await mail(_msgs([_accepted(one), _accepted(two)]))
    opens = [s.TrackOpen(mailgate_id=one), s.TrackOpen(mailgate_id=two)]
    holder = await asyncpg.connect(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        # A row the first batch updates (its message's status) is locked elsewhere: the
        # first batch waits inside Postgres, after its claim, while the second is ready.
        tx = holder.transaction()
        await tx.start()
        await holder.execute("UPDATE messages SET updated_at = now() WHERE mailgate_id = $1", one)
        with structlog.testing.capture_logs() as logs:
            ahead = asyncio.create_task(track(_msgs(opens[:1])))
            behind = asyncio.create_task(track(_msgs(opens[1:])))

            def yielded() -> bool:
                return any(
                    e["event"] == "batch transaction yielded to the batch ahead" for e in logs
                )

            await eventually(yielded, what="the second batch yielding")
            assert not ahead.done() and not behind.done()
            sql = "SELECT count(*) FROM events WHERE subject = 'track.open'"
            assert await _count(conn, sql) == 0  # neither committed
            await tx.rollback()
            outcomes = await asyncio.wait_for(asyncio.gather(ahead, behind), timeout=10)
    finally:
        await holder.close()
    try:
        assert all(isinstance(o, Ack) for batch in outcomes for o in batch)
        rows = await conn.fetch(
            "SELECT event_id, status_pending FROM events WHERE subject = 'track.open'"
        )
        assert sorted((r[0], r[1]) for r in rows) == sorted((e.event_id, False) for e in opens)
        sql = "SELECT msg_id FROM outbox WHERE msg_id = ANY($1::text[])"
        sent = await conn.fetch(sql, [f"st-{e.event_id}" for e in opens])
        assert sorted(r[0] for r in sent) == sorted(f"st-{e.event_id}" for e in opens)  # once
        statuses = await conn.fetch("SELECT status FROM messages ORDER BY mailgate_id")
        assert [r[0] for r in statuses] == ["opened", "opened"]
    finally:
        await conn.close()
