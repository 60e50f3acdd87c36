"""Consuming facts: one Postgres transaction per batch, then the outbox, then the acks.

For each batch from a stream: decode every message (undecodable ones are terminated and
logged), then in ONE transaction record the new facts (``event_id`` is the idempotency key),
create or complete the message rows, and turn every fact whose message is known into a
customer status event in the outbox (plus a suppression for hard bounces, complaints and
unsubscribes). A fact whose message row does not exist yet (a webhook consumed before
``mail.accepted``) stays *pending* and is turned into its status event when the row appears.
After the commit the new outbox rows are published and the batch is acknowledged; if the
commit fails nothing is acknowledged (nak with backoff).

Concurrent batches (one per stream, several replicas) serialize on transaction-scoped
advisory locks taken in sorted order, one per mailgate id and per Postal id they touch, so a
fact and the row it waits for can never miss each other.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import structlog
from mailgate_core.nats import Ack, Nak, Outcome, Term, backoff_delay, delivery_count
from mailgate_core.records import SuppressionRecord, normalize_email
from mailgate_core.schemas import (
    Event,
    MailAccepted,
    MailFailed,
    MailSkipped,
    MailSubmitted,
    MessageRef,
    PostalEvent,
    SchemaError,
    StatusEvent,
    TrackClick,
    TrackOpen,
    decode_subject,
    encode,
)
from nats.aio.msg import Msg

from .kvsync import KvSync
from .metrics import LedgerMetrics
from .outbox import Outbox, OutboxRow
from .status import SUPPRESSING_STATUSES, Fact, classify, rank

log = structlog.get_logger()

#: (stream, durable consumer, filter subject) the ledger consumes.
CONSUMERS: tuple[tuple[str, str, str], ...] = (
    ("MAIL", "ledger-mail", "mail.>"),
    ("POSTAL", "ledger-postal", "postal.>"),
    ("TRACK", "ledger-track", "track.>"),
    ("STATS", "ledger-stats", "stats.>"),
)

MAIL_EVENTS = (MailAccepted, MailSkipped, MailSubmitted, MailFailed)

#: A fact Postgres refuses (bad data) this many deliveries in a row is terminated.
MAX_POISON_DELIVERIES = 10

#: Errors that only this fact can cause (bad data): retried alone, then terminated. Every
#: other failure (Postgres down, restarting, a bug fixed by a deploy) naks the whole batch.
_FACT_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
_RETRY_NOW = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


def lock_key(kind: str, value: object) -> int:
    """A signed 64-bit advisory-lock key for one mailgate id (``m``) or Postal id (``p``)."""
    digest = hashlib.blake2b(f"{kind}:{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _strip_nul(value: Any) -> Any:
    """jsonb refuses U+0000; drop it from every string of an event before storing it."""
    if isinstance(value, str):
        return value.replace("\x00", "") if "\x00" in value else value
    if isinstance(value, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    return value


def event_history_json(event: Event) -> str:
    """The event as stored in ``events.data``: everything but the raw message."""
    data = msgspec.to_builtins(event)
    data.pop("raw", None)
    return msgspec.json.encode(_strip_nul(data)).decode()


def _ts(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)


@dataclass
class Item:
    index: int
    event: Event
    fact: Fact
    mailgate_id: str | None = None
    postal_id: int | None = None


@dataclass
class Committed:
    outbox: list[OutboxRow] = field(default_factory=list)
    suppressions: list[SuppressionRecord] = field(default_factory=list)
    recorded: int = 0
    duplicates: int = 0


SQL_INSERT_EVENTS = """
INSERT INTO events (event_id, mailgate_id, postal_id, subject, name, status_name, status_data,
                    status_pending, occurred_at, data)
SELECT e, m, p, s, n, sn, sd::jsonb, pend, o, d::jsonb
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::bool[], $9::timestamptz[], $10::text[])
     AS t(e, m, p, s, n, sn, sd, pend, o, d)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

SQL_UPSERT_MESSAGE = """
INSERT INTO messages (mailgate_id, external_id, campaign_id, postal_id, postal_token,
                      account_id, recipient, sender, subject, size, accepted_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (mailgate_id) DO UPDATE SET
    external_id  = COALESCE(messages.external_id, EXCLUDED.external_id),
    campaign_id  = COALESCE(messages.campaign_id, EXCLUDED.campaign_id),
    postal_id    = COALESCE(EXCLUDED.postal_id, messages.postal_id),
    postal_token = COALESCE(EXCLUDED.postal_token, messages.postal_token),
    sender       = COALESCE(messages.sender, EXCLUDED.sender),
    subject      = COALESCE(messages.subject, EXCLUDED.subject),
    size         = COALESCE(messages.size, EXCLUDED.size),
    accepted_at  = COALESCE(messages.accepted_at, EXCLUDED.accepted_at),
    updated_at   = now()
"""

SQL_LINK_POSTAL_FACTS = """
UPDATE events SET mailgate_id = v.mid
FROM unnest($1::bigint[], $2::text[]) AS v(pid, mid)
WHERE events.postal_id = v.pid AND events.mailgate_id IS NULL AND events.status_pending
RETURNING events.mailgate_id
"""

SQL_SET_POSTAL_ID = """
UPDATE messages SET postal_id = $2, postal_token = COALESCE(postal_token, $3), updated_at = now()
WHERE mailgate_id = $1 AND postal_id IS NULL
"""

SQL_PENDING = """
SELECT e.event_id, e.mailgate_id, e.status_name, e.status_data, e.occurred_at,
       m.account_id, m.recipient, m.external_id, m.campaign_id
FROM events e JOIN messages m ON m.mailgate_id = e.mailgate_id
WHERE e.mailgate_id = ANY($1::text[]) AND e.status_pending
ORDER BY e.occurred_at, e.event_id
"""

SQL_INSERT_OUTBOX = """
INSERT INTO outbox (subject, msg_id, payload)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])
ON CONFLICT (msg_id) DO NOTHING
RETURNING id, subject, msg_id, payload
"""

SQL_ADVANCE_STATUS = """
UPDATE messages m SET status = v.status, status_rank = v.rnk, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::int[]) AS v(id, status, rnk)
WHERE m.mailgate_id = v.id AND m.status_rank < v.rnk
"""

SQL_INSERT_SUPPRESSIONS = """
INSERT INTO suppressions (account_id, email, reason)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT (account_id, email) DO NOTHING
RETURNING account_id, email, reason, created_at
"""


class Ingestor:
    """The batch handler behind every ledger pull consumer."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        outbox: Outbox,
        kv: KvSync,
        metrics: LedgerMetrics,
    ) -> None:
        self._pool = pool
        self._outbox = outbox
        self._kv = kv
        self._metrics = metrics

    def handler(self, stream: str) -> Callable[[Sequence[Msg]], Awaitable[Sequence[Outcome]]]:
        async def handle(msgs: Sequence[Msg]) -> Sequence[Outcome]:
            return await self.handle_batch(stream, msgs)

        return handle

    async def handle_batch(self, stream: str, msgs: Sequence[Msg]) -> list[Outcome]:
        started = time.perf_counter()
        outcomes: list[Outcome] = [Ack()] * len(msgs)
        items: list[Item] = []
        for index, msg in enumerate(msgs):
            try:
                event = decode_subject(msg.subject, msg.data)
            except SchemaError as exc:
                log.warning("undecodable message terminated", subject=msg.subject, error=str(exc))
                self._metrics.rejected.labels(stream).inc()
                outcomes[index] = Term(str(exc))
                continue
            fact = classify(event)
            items.append(Item(index, event, fact, fact.mailgate_id, fact.postal_id))
        if items:
            await self._record(stream, msgs, items, outcomes)
        self._metrics.batch_seconds.labels(stream).observe(time.perf_counter() - started)
        return outcomes

    async def _record(
        self, stream: str, msgs: Sequence[Msg], items: list[Item], outcomes: list[Outcome]
    ) -> None:
        try:
            committed = await self._commit_with_retry(items)
        except _FACT_ERRORS as exc:
            self._metrics.batch_failures.labels(stream).inc()
            if len(items) > 1:  # one bad fact must not hold back the rest
                log.warning("batch refused, recording facts one by one", error=repr(exc))
                for item in items:
                    await self._record(stream, msgs, [item], outcomes)
                return
            item = items[0]
            msg = msgs[item.index]
            log.error(
                "fact not recordable",
                subject=msg.subject,
                event_id=item.event.event_id,
                error=repr(exc),
                deliveries=delivery_count(msg),
            )
            if delivery_count(msg) >= MAX_POISON_DELIVERIES:
                outcomes[item.index] = Term(f"not recordable: {exc!r}")
            else:
                outcomes[item.index] = Nak(_delay(msg))
            return
        except Exception as exc:
            self._metrics.batch_failures.labels(stream).inc()
            log.warning("batch not committed", stream=stream, size=len(items), error=repr(exc))
            for item in items:
                outcomes[item.index] = Nak(_delay(msgs[item.index]))
            return
        await self._outbox.publish_committed(committed.outbox)
        if committed.suppressions:
            await self._kv.put_suppressions(committed.suppressions)
        self._metrics.duplicates.inc(committed.duplicates)
        for item in items:
            outcomes[item.index] = Ack()

    async def _commit_with_retry(self, items: list[Item], attempts: int = 3) -> Committed:
        for attempt in range(1, attempts + 1):
            try:
                return await self._commit(items)
            except _RETRY_NOW:
                if attempt == attempts:
                    raise
                log.info("batch transaction retried", attempt=attempt)
        raise AssertionError("unreachable")

    async def _commit(self, items: list[Item]) -> Committed:
        unique: list[Item] = []
        seen: set[str] = set()
        for item in items:
            if item.event.event_id not in seen:
                seen.add(item.event.event_id)
                unique.append(item)
        result = Committed(duplicates=len(items) - len(unique))
        async with self._pool.acquire(timeout=10) as conn, conn.transaction():
            await self._lock(conn, unique)
            await self._find_messages(conn, unique)
            recorded = await self._insert_events(conn, unique)
            new = [item for item in unique if item.event.event_id in recorded]
            result.recorded = len(new)
            result.duplicates += len(unique) - len(new)
            touched = await self._apply_mail_facts(conn, new)
            touched.update(item.mailgate_id for item in new if item.mailgate_id)
            await self._emit_pending(conn, sorted(touched), result)
        for item in new:
            self._metrics.events.labels(item.event.subject()).inc()
        return result

    async def _lock(self, conn: asyncpg.Connection, items: list[Item]) -> None:
        keys = {lock_key("m", i.mailgate_id) for i in items if i.mailgate_id}
        keys |= {lock_key("p", i.postal_id) for i in items if i.postal_id is not None}
        if keys:
            await conn.execute("SELECT ledger_lock_keys($1::bigint[])", sorted(keys))

    async def _find_messages(self, conn: asyncpg.Connection, items: list[Item]) -> None:
        """Fill in the mailgate id of facts that name their message another way."""
        by_postal = [
            i.postal_id
            for i in items
            if i.mailgate_id is None
            and i.postal_id is not None
            and isinstance(i.event, PostalEvent)
        ]
        if by_postal:
            rows = await conn.fetch(
                "SELECT postal_id, mailgate_id FROM messages WHERE postal_id = ANY($1::bigint[])",
                by_postal,
            )
            found = {r["postal_id"]: r["mailgate_id"] for r in rows}
            for item in items:
                if item.mailgate_id is None and item.postal_id in found:
                    item.mailgate_id = found[item.postal_id]
        for item in items:
            event = item.event
            # legacy tracking links carry AMS's ids only
            if (
                item.mailgate_id is None
                and isinstance(event, TrackOpen | TrackClick)
                and event.external_id
            ):
                item.mailgate_id = await conn.fetchval(
                    """SELECT mailgate_id FROM messages
                           WHERE external_id = $1 AND ($2::text IS NULL OR campaign_id = $2)
                           ORDER BY mailgate_id DESC LIMIT 1""",
                    event.external_id,
                    event.campaign_id,
                )

    async def _insert_events(self, conn: asyncpg.Connection, items: list[Item]) -> set[str]:
        if not items:
            return set()
        columns: list[list[Any]] = [[] for _ in range(10)]
        for item in items:
            fact = item.fact
            resolvable = item.mailgate_id is not None or item.postal_id is not None
            row = (
                item.event.event_id,
                item.mailgate_id,
                item.postal_id,
                item.event.subject(),
                fact.name,
                fact.status,
                msgspec.json.encode(_strip_nul(fact.data)).decode() if fact.status else None,
                fact.status is not None and resolvable,
                _ts(fact.timestamp),
                event_history_json(item.event),
            )
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        rows = await conn.fetch(SQL_INSERT_EVENTS, *columns)
        return {r["event_id"] for r in rows}

    async def _apply_mail_facts(self, conn: asyncpg.Connection, items: list[Item]) -> set[str]:
        """Create or complete message rows from mail.* facts; return mailgate ids touched."""
        upserts: list[tuple[Any, ...]] = []
        submitted: list[tuple[int, str]] = []
        postal_ids: list[tuple[str, int, str | None]] = []
        for item in items:
            event = item.event
            if isinstance(event, MAIL_EVENTS):
                upserts.append(_message_row(event))
                if isinstance(event, MailSubmitted):
                    submitted.append((event.postal_id, event.message.mailgate_id))
            elif isinstance(event, PostalEvent) and item.mailgate_id and item.postal_id:
                postal_ids.append((item.mailgate_id, item.postal_id, event.postal_token))
        touched: set[str] = set()
        if upserts:
            await conn.executemany(SQL_UPSERT_MESSAGE, upserts)
        if submitted:
            rows = await conn.fetch(
                SQL_LINK_POSTAL_FACTS, [p for p, _ in submitted], [m for _, m in submitted]
            )
            touched.update(r["mailgate_id"] for r in rows)
        if postal_ids:
            await conn.executemany(SQL_SET_POSTAL_ID, postal_ids)
        return touched

    async def _emit_pending(
        self, conn: asyncpg.Connection, mailgate_ids: list[str], result: Committed
    ) -> None:
        """Turn pending facts of messages whose row exists into outbox status events."""
        if not mailgate_ids:
            return
        rows = await conn.fetch(SQL_PENDING, mailgate_ids)
        if not rows:
            return
        subjects: list[str] = []
        msg_ids: list[str] = []
        payloads: list[bytes] = []
        best: dict[str, str] = {}
        suppress: dict[tuple[str, str], str] = {}
        for row in rows:
            status = row["status_name"]
            event = StatusEvent(
                event_id=f"st-{row['event_id']}",
                name=status,
                message=MessageRef(
                    mailgate_id=row["mailgate_id"],
                    account_id=row["account_id"],
                    recipient=row["recipient"],
                    external_id=row["external_id"],
                    campaign_id=row["campaign_id"],
                ),
                timestamp=int(row["occurred_at"].timestamp()),
                data=row["status_data"] or {},
                source_event_id=row["event_id"],
            )
            subjects.append(event.subject())
            msg_ids.append(event.event_id)
            payloads.append(encode(event))
            current = best.get(row["mailgate_id"])
            if current is None or rank(status) > rank(current):
                best[row["mailgate_id"]] = status
            if status in SUPPRESSING_STATUSES:
                key = (row["account_id"], normalize_email(row["recipient"]))
                suppress.setdefault(key, status)
        inserted = await conn.fetch(SQL_INSERT_OUTBOX, subjects, msg_ids, payloads)
        result.outbox.extend(
            OutboxRow(r["id"], r["subject"], r["msg_id"], bytes(r["payload"])) for r in inserted
        )
        await conn.execute(
            "UPDATE events SET status_pending = false WHERE event_id = ANY($1::text[])",
            [r["event_id"] for r in rows],
        )
        await conn.execute(
            SQL_ADVANCE_STATUS,
            list(best),
            list(best.values()),
            [rank(s) for s in best.values()],
        )
        if suppress:
            added = await conn.fetch(
                SQL_INSERT_SUPPRESSIONS,
                [a for a, _ in suppress],
                [e for _, e in suppress],
                list(suppress.values()),
            )
            for r in added:
                self._metrics.suppressions_added.labels(r["reason"]).inc()
                result.suppressions.append(
                    SuppressionRecord(
                        account_id=r["account_id"],
                        email=r["email"],
                        reason=r["reason"],
                        created_at=r["created_at"].timestamp(),
                    )
                )


def _message_row(event: MailAccepted | MailSkipped | MailSubmitted | MailFailed) -> tuple[Any, ...]:
    ref = event.message
    postal_id = event.postal_id if isinstance(event, MailSubmitted) else None
    postal_token = event.postal_token if isinstance(event, MailSubmitted) else None
    sender = subject = size = accepted_at = None
    if isinstance(event, MailAccepted | MailSkipped):
        sender, subject = event.mail_from, event.subject_line
        accepted_at = _ts(event.occurred_at)
    if isinstance(event, MailAccepted):
        size = event.size
    return (
        ref.mailgate_id,
        ref.external_id,
        ref.campaign_id,
        postal_id,
        postal_token,
        ref.account_id,
        ref.recipient,
        sender,
        subject,
        size,
        accepted_at,
    )


def _delay(msg: Msg) -> float:
    return backoff_delay(delivery_count(msg), base_s=1.0, cap_s=60.0)
