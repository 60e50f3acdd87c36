"""What a mail message costs the ledger on NATS (nats-server's own count for the ledger's
connection): its four facts delivered and acked, its two status events published. Pull
requests and their "no messages" answers, and a PubAck per committed batch, are not paid
per message any more; status events of batches committed close together share a publish
and a ``published_at`` update."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

from mailgate_core import schemas as s
from mailgate_core.ids import new_ulid
from mailgate_core.nats import Ack, publish_event
from mailgate_fakes.testing import eventually
from mailgate_ledger.metrics import LedgerMetrics
from mailgate_ledger.outbox import Outbox, OutboxRow
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry
from test_ledger_support import start_ledger

__all__ = ["start_ledger"]

ACCOUNT = "01HACCOUNT000000000000000B"
MESSAGES = 40


def _ledger_msgs(monitor_port: int) -> int:
    """Messages nats-server received from and sent to the ledger's connection so far."""
    url = f"http://127.0.0.1:{monitor_port}/connz?limit=1024"
    with urllib.request.urlopen(url, timeout=5) as resp:
        conns = json.loads(resp.read())["connections"]
    return sum(int(c["in_msgs"]) + int(c["out_msgs"]) for c in conns if c.get("name") == "ledger")


def _facts(mid: str, postal_id: int) -> list[s.Event]:
    ref = s.MessageRef(
        mailgate_id=mid, account_id=ACCOUNT, recipient="ivan@example.org", campaign_id="7"
    )
    return [
        s.MailAccepted(
            message=ref,
            mail_from="news@example.com",
            credential="ams",
            message_id_header=f"<{mid}@mailgate.test>",
            subject_line="hello",
            size=100,
        ),
        s.MailSubmitted(message=ref, postal_id=postal_id, postal_token=f"tok{postal_id}"),
        s.PostalEvent(
            event="MessageSent",
            postal_timestamp=time.time() + 1,
            mailgate_id=mid,
            postal_id=postal_id,
            postal_token=f"tok{postal_id}",
            status="Sent",
            output="250 OK",
            recipient="ivan@example.org",
        ),
        s.WebhookDelivered(
            event_id=f"wd-st-{mid}-ep",
            status_event_id=f"st-{mid}",
            status_name="sent",
            message=ref,
            endpoint_id="ep",
            http_status=200,
        ),
    ]


async def _statuses(js: Any) -> int:
    return int((await js.stream_info("STATUS")).state.messages)


async def test_a_mail_message_costs_the_ledger_about_ten_nats_messages(
    start_ledger: Any, js: Any, nats_server: Any
) -> None:
    ledger = await start_ledger()

    async def ready() -> bool:
        return await ledger.service.health.failing() == []

    await eventually(ready, what="ledger ready (KV synced)")
    before = await asyncio.to_thread(_ledger_msgs, nats_server.monitor_port)
    started = time.monotonic()
    for n in range(MESSAGES):  # a trickle: each message recorded before the next comes
        mid = new_ulid()
        for fact in _facts(mid, 50_000 + n):
            await publish_event(js, fact)

        async def recorded(n: int = n) -> bool:
            return await _statuses(js) == 2 * (n + 1)

        await eventually(recorded, timeout=10, what=f"message {n} recorded")

    async def done() -> bool:
        return await _statuses(js) == 2 * MESSAGES

    await eventually(done, timeout=20, what="every sent and delivered status published")

    async def settled() -> bool:
        for durable, stream in (("ledger-mail", "MAIL"), ("ledger-postal", "POSTAL")):
            info = await js.consumer_info(stream, durable)
            if info.num_ack_pending or info.num_pending:
                return False
        return True

    await eventually(settled, timeout=20, what="every fact acked")
    elapsed = time.monotonic() - started
    used = await asyncio.to_thread(_ledger_msgs, nats_server.monitor_port) - before
    # 4 deliveries + 4 acks + 2 status publishes = 10 per message. Idle pull requests: a
    # request and its expiry answer per stream and second (4 streams).
    idle = 2 * 4 * (elapsed + 1)
    per_message = (used - idle) / MESSAGES
    # Plus at most a PubAck per status here (each batch commits alone in a trickle). A
    # no-wait pull request and its "no messages" answer per batch made this about 20.
    assert per_message <= 13, (used, elapsed, per_message)


async def test_batches_committed_close_together_share_a_publish_and_a_mark(
    start_ledger: Any, js: Any
) -> None:
    ledger = await start_ledger()
    service = ledger.service
    assert service.pool is not None
    outbox = Outbox(service.pool, service.js, LedgerMetrics(CollectorRegistry()), nc=service.nc)
    batches: list[list[OutboxRow]] = []
    for b in range(10):
        rows = await service.pool.fetch(
            """INSERT INTO outbox (subject, msg_id, payload)
               SELECT 'status.sent', 'st-co-' || $1 || '-' || n, '{}'::bytea
               FROM generate_series(1, 5) AS n RETURNING id, subject, msg_id, payload""",
            str(b),
        )
        batches.append([OutboxRow(r["id"], r["subject"], r["msg_id"], r["payload"]) for r in rows])
    for rows in batches:  # ten batches committed back to back
        await outbox.submit(rows)
    await outbox.drain()
    # One publish starts at once; the nine batches submitted meanwhile go in a second, and
    # one mark (or two) covers them all: one each made this ten publishes and ten marks.
    assert outbox.publishes == 2
    assert outbox.marks <= 2
    assert await _statuses(js) == 50

    async def marked() -> bool:
        left = await service.pool.fetchval(
            "SELECT count(*) FROM outbox WHERE msg_id LIKE 'st-co-%' AND published_at IS NULL"
        )
        return int(left) == 0

    await eventually(marked, what="every row marked published")


async def test_a_mail_message_costs_postgres_few_statements_per_batch(start_ledger: Any) -> None:
    ledger = await start_ledger(
        outbox_interval_s=3600.0, kv_resync_interval_s=3600.0, retention_interval_s=3600.0
    )
    service = ledger.service
    assert service.pool is not None

    async def ready() -> bool:
        return await service.health.failing() == []

    await eventually(ready, what="ledger ready (KV synced)")
    await asyncio.sleep(0.2)  # the background loops' first rounds are over
    statements: list[str] = []
    held = [await service.pool.acquire() for _ in range(service.settings.db_pool_size)]
    for conn in held:  # every pooled connection reports each statement it runs
        conn.add_query_logger(lambda q: statements.append(q.query))
    for conn in held:
        await service.pool.release(conn)
    workers = {w.stream: w.handle_batch for w in service.workers}

    async def three_batches(first_postal_id: int) -> list[str]:
        mids = [new_ulid() for _ in range(10)]
        facts = [_facts(mid, first_postal_id + n) for n, mid in enumerate(mids)]
        for stream, kind in (("MAIL", 0), ("MAIL", 1), ("POSTAL", 2)):  # accepted, submitted, sent
            msgs = [Msg(None, subject=f[kind].subject(), data=s.encode(f[kind])) for f in facts]  # type: ignore[arg-type]
            outcomes = await workers[stream](msgs)
            assert all(isinstance(o, Ack) for o in outcomes)
        return mids

    await three_batches(70_000)  # asyncpg prepares (and introspects) each statement once
    await eventually(lambda: _marked(service), what="the first round marked published")
    statements.clear()
    mids = await three_batches(60_000)

    async def published() -> bool:
        return await _statuses(service.js) == 40  # both rounds' sent and delivered

    await eventually(published, what="sent and delivered published")
    await eventually(lambda: _marked(service), what="every status marked published")
    # Per batch: BEGIN, lock-and-claim, (mail.*: the message rows and the Postal-id links in
    # one statement), the message rows read, the facts written (and a Postal fact's Postal id
    # set in the same statement), COMMIT: 6 + 6 + 5; then a mark or two for the statuses.
    # Separate link and Postal-id statements (and marks) made this 24.
    # Not this test's own polling, nor asyncpg's type introspection (once per connection
    # and statement: the warm-up round may have run on another pooled connection).
    ledgers = [
        q
        for q in statements
        if q != MARKED_SQL and not any(mark in q for mark in ASYNCPG_INTROSPECTION)
    ]
    assert len(ledgers) <= 19, "\n".join(" ".join(q.split())[:50] for q in ledgers)
    rows = await service.pool.fetch(
        "SELECT status, postal_id FROM messages WHERE mailgate_id = ANY($1::text[])", mids
    )
    assert sorted((r["status"], r["postal_id"]) for r in rows) == sorted(
        ("delivered", 60_000 + n) for n in range(10)
    )


MARKED_SQL = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
ASYNCPG_INTROSPECTION = ("current_setting('jit')", "set_config('jit'", "typeinfo_tree")


async def _marked(service: Any) -> bool:
    return int(await service.pool.fetchval(MARKED_SQL)) == 0
