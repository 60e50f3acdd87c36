"""The ledger's batch transactions in Postgres: their statements are index lookups whatever
the statistics say (``ingest.SQL_BEGIN``), and while open they carry the outbox's
``published_at`` marks (``outbox.Carrier``) instead of a transaction per mark; a batch that
does not commit acks nothing and gives its marks back."""

from __future__ import annotations

import re
from typing import Any

from mailgate_core import schemas as s
from mailgate_core.ids import new_ulid
from mailgate_core.nats import Ack, Nak
from mailgate_fakes.testing import eventually
from mailgate_ledger import ingest
from nats.aio.msg import Msg
from test_ledger_support import start_ledger

__all__ = ["start_ledger"]

ACCOUNT = "01HACCOUNT000000000000000P"

# Every statement a batch transaction may run, with the tables it must reach by index.
BATCH_STATEMENTS = {
    "mark, lock and claim": ingest.SQL_MARK_LOCK_AND_CLAIM,
    "message rows and links": ingest.SQL_UPSERT_AND_LINK,
    "message rows read": ingest.SQL_MESSAGE_ROWS,
    "facts written": ingest.SQL_WRITE_FACTS,
    "by Postal id": ingest.SQL_BY_POSTAL_ID,
    "by external id": ingest.SQL_BY_EXTERNAL_ID,
}
SCAN_OR_JOIN = re.compile(
    r"Seq Scan on (events|messages|outbox|event_ids)|(Hash|Merge) (\w+ )?Join"
)


def _scans(plan: list[str]) -> list[str]:
    """The plan lines that read a whole table of the ledger or join by hashing/merging."""
    return [line.strip() for line in plan if SCAN_OR_JOIN.search(line)]


async def _generic_plan(conn: Any, sql: str) -> list[str]:
    """The plan a prepared statement keeps (as asyncpg prepares them), in this transaction."""
    await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
    await conn.execute(f"PREPARE plan_probe AS {sql}")
    try:
        params = await conn.fetchval(
            "SELECT cardinality(parameter_types) FROM pg_prepared_statements"
            " WHERE name = 'plan_probe'"
        )
        rows = await conn.fetch(f"EXPLAIN EXECUTE plan_probe({', '.join(['NULL'] * params)})")
    finally:
        await conn.execute("DEALLOCATE plan_probe")
    return [r[0] for r in rows]


async def test_batch_statements_use_indexes_on_empty_tables(start_ledger: Any) -> None:
    """Plans made while the tables are empty (a fresh database, a new month's partition)
    are the ones asyncpg's prepared statements keep: they must not scan the tables."""
    ledger = await start_ledger()
    pool = ledger.service.pool
    assert pool is not None
    async with pool.acquire() as conn:
        # Left to the statistics, Postgres plans the status update as a hash join over every
        # row of ``messages``: each batch read the whole month (what this change removed).
        async with conn.transaction():
            plain = await _generic_plan(conn, ingest.SQL_WRITE_FACTS)
        assert any("Seq Scan on messages" in line for line in plain), "\n".join(plain)
        await conn.execute(ingest.SQL_BEGIN)
        try:
            for name, sql in BATCH_STATEMENTS.items():
                plan = await _generic_plan(conn, sql)
                assert _scans(plan) == [], (name, "\n".join(plan))
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
        finally:
            await conn.execute("ROLLBACK")
        # SET LOCAL: the next transaction on this connection (the admin API's) plans freely.
        assert await conn.fetchval("SHOW enable_seqscan") == "on"
        assert await conn.fetchval("SHOW plan_cache_mode") == "auto"


def _submitted(count: int, first_postal_id: int) -> list[Msg]:
    """``mail.submitted`` facts (each gives a 'sent' status event) for new messages."""
    msgs = []
    for n in range(count):
        ref = s.MessageRef(mailgate_id=new_ulid(), account_id=ACCOUNT, recipient="a@example.org")
        accepted = s.MailAccepted(
            message=ref,
            mail_from="news@example.com",
            credential="ams",
            message_id_header=f"<{ref.mailgate_id}@mailgate.test>",
            subject_line="hello",
            size=100,
        )
        postal_id = first_postal_id + n
        for event in (
            accepted,
            s.MailSubmitted(message=ref, postal_id=postal_id, postal_token=f"t{postal_id}"),
        ):
            msgs.append(Msg(None, subject=event.subject(), data=s.encode(event)))  # type: ignore[arg-type]
    return msgs


async def _unmarked(pool: Any) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))


async def _all_marked(pool: Any) -> bool:
    return await _unmarked(pool) == 0


async def test_an_open_batch_transaction_carries_the_marks(start_ledger: Any) -> None:
    ledger = await start_ledger(outbox_interval_s=3600.0)
    service = ledger.service
    outbox, pool = service.outbox, service.pool
    assert outbox is not None and pool is not None
    handle = {w.stream: w.handle_batch for w in service.workers}["MAIL"]
    held = outbox.carrier()  # a batch transaction open on another stream

    assert all(isinstance(o, Ack) for o in await handle(_submitted(5, 80_000)))
    await eventually(lambda: outbox.marks_waiting == 5, what="the first statuses published")
    # Published, left for a batch transaction to mark: no statement or commit of their own.
    assert outbox.marks == 0
    assert await _unmarked(pool) == 5
    assert all(isinstance(o, Ack) for o in await handle(_submitted(5, 81_000)))
    # The second batch marked the first batch's rows with its own statements and commit.
    assert outbox.marks_taken == 1
    assert outbox.marks == 0
    await eventually(lambda: outbox.marks_waiting == 5, what="the second statuses published")
    assert await _unmarked(pool) == 5  # the second batch's own rows
    held.done()  # no batch open any more: the outbox marks what is left itself, at once
    await eventually(lambda: _all_marked(pool), what="every row marked")
    assert outbox.marks == 1


async def test_a_batch_that_does_not_commit_acks_nothing_and_gives_its_marks_back(
    start_ledger: Any,
) -> None:
    ledger = await start_ledger(outbox_interval_s=3600.0)
    service = ledger.service
    outbox, pool = service.outbox, service.pool
    assert outbox is not None and pool is not None
    handle = {w.stream: w.handle_batch for w in service.workers}["MAIL"]
    held = outbox.carrier()
    assert all(isinstance(o, Ack) for o in await handle(_submitted(3, 90_000)))
    await eventually(lambda: outbox.marks_waiting == 3, what="the first statuses published")
    # Postgres refuses the next batch's facts (as an outage would: not the facts' fault).
    await pool.execute(
        """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
           CREATE TRIGGER refuse BEFORE INSERT ON event_ids FOR EACH STATEMENT
           EXECUTE FUNCTION refuse()"""
    )
    batch = _submitted(3, 91_000)
    outcomes = await handle(batch)
    assert all(isinstance(o, Nak) for o in outcomes), outcomes  # nothing acked
    assert outbox.marks_taken == 1  # it took the marks ...
    assert outbox.marks_waiting == 3  # ... and gave them back with its rollback
    assert await _unmarked(pool) == 3
    assert int(await pool.fetchval("SELECT count(*) FROM event_ids")) == 6  # 3 x 2 facts
    await pool.execute("DROP TRIGGER refuse ON event_ids")
    held.done()
    await eventually(lambda: _all_marked(pool), what="every row marked")
    # Redelivered, the refused batch is recorded now.
    assert all(isinstance(o, Ack) for o in await handle(batch))
    assert int(await pool.fetchval("SELECT count(*) FROM event_ids")) == 12
