"""Consuming facts: one Postgres transaction per batch, acks after the commit.

For each batch from a stream: decode every message (undecodable ones are terminated and
logged), then in ONE transaction record the new facts (``event_id`` is the idempotency key,
claimed in ``event_ids``), create or complete the message rows, and turn every fact whose
message is known into a customer status event in the outbox (plus a suppression for hard
bounces, complaints and unsubscribes). A fact whose message row does not exist yet (a
webhook consumed before ``mail.accepted``) stays *pending* and is turned into its status
event when the row appears. After the commit the batch is acknowledged and the new outbox
rows are handed to the outbox publisher (the outbox makes their publication durable, so the
input need not wait for it); if the commit fails nothing is acknowledged (nak with backoff).

Every write of a batch is one set-based statement over arrays (``unnest``), so a batch of
256 facts costs about ten round trips, not 256: see ``bench/bench_ledger.py``.

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
from mailgate_core.ids import new_ulid
from mailgate_core.nats import Ack, Nak, Outcome, Term, backoff_delay, delivery_count
from mailgate_core.records import SuppressionRecord, normalize_email
from mailgate_core.schemas import (
    AmsMailingProgress,
    CampaignAutoStopped,
    CampaignResumed,
    Event,
    MailAccepted,
    MailFailed,
    MailSkipped,
    MailSubmitted,
    MessageRef,
    PostalEvent,
    PostmasterDaily,
    SchemaError,
    StatusEvent,
    TrackClick,
    TrackOpen,
    WebhookDeadLettered,
    decode_subject,
    encode,
)
from nats.aio.msg import Msg

from .kvsync import KvSync
from .metrics import LedgerMetrics
from .outbox import Outbox, OutboxRow
from .partitions import PartitionKeeper
from .status import ONCE_PER_MESSAGE, SUPPRESSING_STATUSES, Fact, classify, rank

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


def _json_without_nul(value: Any) -> str:
    """JSON text for a jsonb column (which refuses U+0000: stripped, only when present)."""
    raw = msgspec.json.encode(value)
    if b"\\u0000" in raw:
        raw = msgspec.json.encode(_strip_nul(value))
    return raw.decode()


def event_history_json(event: Event) -> str:
    """The event as stored in ``events.data``: everything but the raw message."""
    data = msgspec.to_builtins(event)
    data.pop("raw", None)
    return _json_without_nul(data)


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
    dead_letters: int = 0


# Facts: claim the event ids first; only the ones claimed now are inserted as history.
SQL_INSERT_EVENTS = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::bool[], $9::timestamptz[], $10::text[],
                         $11::text[])
         AS t(e, m, p, s, n, sn, sd, pend, o, d, c)
), claimed AS (
    INSERT INTO event_ids (event_id) SELECT e FROM input
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
)
INSERT INTO events (event_id, mailgate_id, postal_id, subject, name, status_name, status_data,
                    status_pending, occurred_at, data, campaign_id)
SELECT e, m, p, s, n, sn, sd::jsonb, pend, o, d::jsonb, c
FROM input JOIN claimed ON claimed.event_id = input.e
RETURNING event_id
"""

# One row per mailgate id (merged in Python), so ON CONFLICT touches each row once.
SQL_UPSERT_MESSAGES = """
INSERT INTO messages (mailgate_id, external_id, campaign_id, postal_id, postal_token,
                      account_id, recipient, sender, subject, size, accepted_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::text[], $10::int[], $11::timestamptz[])
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

SQL_SET_POSTAL_IDS = """
UPDATE messages m SET postal_id = v.pid, postal_token = COALESCE(m.postal_token, v.tok),
                      updated_at = now()
FROM unnest($1::text[], $2::bigint[], $3::text[]) AS v(mid, pid, tok)
WHERE m.mailgate_id = v.mid AND m.postal_id IS NULL
"""

SQL_BY_POSTAL_ID = "SELECT postal_id, mailgate_id FROM messages WHERE postal_id = ANY($1::bigint[])"

# Legacy tracking links name AMS's ids only: the newest message with that external id.
SQL_BY_EXTERNAL_ID = """
SELECT DISTINCT ON (v.ext, v.cid) v.ext, v.cid, m.mailgate_id
FROM unnest($1::text[], $2::text[]) AS v(ext, cid)
JOIN messages m ON m.external_id = v.ext AND (v.cid IS NULL OR m.campaign_id = v.cid)
ORDER BY v.ext, v.cid, m.mailgate_id DESC
"""

# ``repeat``: a once-per-message outcome this message has already emitted.
SQL_PENDING = """
SELECT e.event_id, e.mailgate_id, e.status_name, e.status_data, e.occurred_at,
       m.account_id, m.recipient, m.external_id, m.campaign_id,
       (e.status_name = ANY($2::text[]) AND EXISTS (
           SELECT 1 FROM events p
           WHERE p.mailgate_id = e.mailgate_id AND p.status_name = e.status_name
             AND NOT p.status_pending)) AS repeat
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

# A repeated outcome stays in the history as a fact without a customer event.
SQL_DROP_REPEATED = """
UPDATE events SET status_name = NULL, status_data = NULL, status_pending = false,
                  campaign_id = v.cid
FROM unnest($1::text[], $2::text[], $3::text[]) AS v(eid, mid, cid)
WHERE events.mailgate_id = v.mid AND events.event_id = v.eid AND events.status_pending
"""

SQL_MARK_EMITTED = """
UPDATE events SET status_pending = false, campaign_id = v.cid
FROM unnest($1::text[], $2::text[], $3::text[]) AS v(eid, mid, cid)
WHERE events.mailgate_id = v.mid AND events.event_id = v.eid AND events.status_pending
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

SQL_INSERT_DEAD_LETTERS = """
INSERT INTO dead_letters (id, event_id, status_event_id, status_name, mailgate_id, account_id,
                          endpoint_id, url, attempts, reason, http_status, payload)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::int[], $10::text[], $11::int[], $12::bytea[])
ON CONFLICT (event_id) DO NOTHING
"""

# A revised day (new event id, newer poll) replaces the row; an older poll never does.
SQL_UPSERT_POSTMASTER_DAILY = """
INSERT INTO postmaster_daily (domain, msgtype, date, messages_sent, delivered, read,
                              deleted_read, deleted_unread, spam, probably_spam, complaints,
                              reputation, trend, event_id, occurred_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::date[], $4::bigint[], $5::bigint[],
                     $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[],
                     $11::bigint[], $12::float8[], $13::float8[], $14::text[],
                     $15::timestamptz[])
ON CONFLICT (domain, msgtype, date) DO UPDATE SET
    messages_sent  = EXCLUDED.messages_sent,
    delivered      = EXCLUDED.delivered,
    read           = EXCLUDED.read,
    deleted_read   = EXCLUDED.deleted_read,
    deleted_unread = EXCLUDED.deleted_unread,
    spam           = EXCLUDED.spam,
    probably_spam  = EXCLUDED.probably_spam,
    complaints     = EXCLUDED.complaints,
    reputation     = EXCLUDED.reputation,
    trend          = EXCLUDED.trend,
    event_id       = EXCLUDED.event_id,
    occurred_at    = EXCLUDED.occurred_at,
    updated_at     = now()
WHERE postmaster_daily.occurred_at <= EXCLUDED.occurred_at
"""
_POSTMASTER_COLUMNS = 15

_MESSAGE_COLUMNS = 11
_KEEP_FIRST = (1, 2, 5, 6, 7, 8, 9, 10)  # external_id, campaign_id, account... accepted_at
_KEEP_LAST = (3, 4)  # postal_id, postal_token


def merge_message_rows(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """One row per mailgate id: the first known value of each field (the last for Postal's
    ids), the same precedence the upsert applies against the stored row."""
    merged: dict[str, list[Any]] = {}
    for row in rows:
        current = merged.get(row[0])
        if current is None:
            merged[row[0]] = list(row)
            continue
        for i in _KEEP_FIRST:
            if current[i] is None:
                current[i] = row[i]
        for i in _KEEP_LAST:
            if row[i] is not None:
                current[i] = row[i]
    return [tuple(values) for values in merged.values()]


def postmaster_rows(events: Sequence[PostmasterDaily]) -> list[tuple[Any, ...]]:
    """One row per (domain, msgtype, date): the newest poll of each day wins (an upsert may
    not touch a row twice). A day that is not a YYYY-MM-DD date is left out (history only)."""
    newest: dict[tuple[str, str, dt.date], PostmasterDaily] = {}
    for event in events:
        try:
            day = dt.date.fromisoformat(event.date)
        except (TypeError, ValueError):
            log.warning("postmaster day not recorded: bad date", event_id=event.event_id)
            continue
        key = (event.domain.strip().lower(), event.msgtype or "", day)
        current = newest.get(key)
        if current is None or event.occurred_at >= current.occurred_at:
            newest[key] = event
    return [
        (
            domain,
            msgtype,
            day,
            e.messages_sent,
            e.delivered,
            e.read,
            e.deleted_read,
            e.deleted_unread,
            e.spam,
            e.probably_spam,
            e.complaints,
            e.reputation,
            e.trend,
            e.event_id,
            _ts(e.occurred_at),
        )
        for (domain, msgtype, day), e in newest.items()
    ]


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


def _campaign_fact_id(event: Any) -> str | None:
    """Campaign facts (auto-stop, resume, AMS progress) are filed under their campaign so the
    admin API finds them by campaign (the ``events_campaign`` index)."""
    if isinstance(event, CampaignAutoStopped | CampaignResumed):
        return event.campaign_id or None
    if isinstance(event, AmsMailingProgress):
        return event.mailing_id or None
    return None


class Ingestor:
    """The batch handler behind every ledger pull consumer."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        outbox: Outbox,
        kv: KvSync,
        metrics: LedgerMetrics,
        partitions: PartitionKeeper | None = None,
    ) -> None:
        self._pool = pool
        self._outbox = outbox
        self._kv = kv
        self._metrics = metrics
        self._partitions = partitions

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
            await self._ensure_partitions(items)
            await self._record(stream, msgs, items, outcomes)
        self._metrics.batch_seconds.labels(stream).observe(time.perf_counter() - started)
        return outcomes

    async def _ensure_partitions(self, items: list[Item]) -> None:
        """New messages of a month without a partition (a late backlog) get one first."""
        if self._partitions is None:
            return
        ids = [i.event.message.mailgate_id for i in items if isinstance(i.event, MAIL_EVENTS)]
        try:
            created = await self._partitions.ensure_for(ids)
        except Exception as exc:  # the rows land in the default partition meanwhile
            log.warning("partition creation failed", error=repr(exc))
            return
        self._metrics.partitions_created.inc(len(created))

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
        await self._outbox.submit(committed.outbox)
        if committed.suppressions:
            await self._kv.put_suppressions(committed.suppressions)
        self._metrics.duplicates.inc(committed.duplicates)
        self._metrics.dead_letters.inc(committed.dead_letters)
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
            result.dead_letters = await self._insert_dead_letters(conn, new)
            await self._upsert_postmaster(conn, new)
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
            rows = await conn.fetch(SQL_BY_POSTAL_ID, by_postal)
            found = {r["postal_id"]: r["mailgate_id"] for r in rows}
            for item in items:
                if item.mailgate_id is None and item.postal_id in found:
                    item.mailgate_id = found[item.postal_id]
        legacy = [
            i
            for i in items
            if i.mailgate_id is None
            and isinstance(i.event, TrackOpen | TrackClick)
            and i.event.external_id
        ]
        if legacy:
            pairs = {(i.event.external_id, i.event.campaign_id) for i in legacy}  # type: ignore[attr-defined]
            rows = await conn.fetch(
                SQL_BY_EXTERNAL_ID, [p[0] for p in pairs], [p[1] for p in pairs]
            )
            by_pair = {(r["ext"], r["cid"]): r["mailgate_id"] for r in rows}
            for item in legacy:
                event = item.event
                assert isinstance(event, TrackOpen | TrackClick)
                item.mailgate_id = by_pair.get((event.external_id, event.campaign_id))

    async def _insert_events(self, conn: asyncpg.Connection, items: list[Item]) -> set[str]:
        if not items:
            return set()
        rows = []
        for item in items:
            fact = item.fact
            resolvable = item.mailgate_id is not None or item.postal_id is not None
            rows.append(
                (
                    item.event.event_id,
                    item.mailgate_id,
                    item.postal_id,
                    item.event.subject(),
                    fact.name,
                    fact.status,
                    _json_without_nul(fact.data) if fact.status else None,
                    fact.status is not None and resolvable,
                    _ts(fact.timestamp),
                    event_history_json(item.event),
                    _campaign_fact_id(item.event),
                )
            )
        recorded = await conn.fetch(SQL_INSERT_EVENTS, *_columns(rows, 11))
        return {r["event_id"] for r in recorded}

    async def _apply_mail_facts(self, conn: asyncpg.Connection, items: list[Item]) -> set[str]:
        """Create or complete message rows from mail.* facts; return mailgate ids touched."""
        upserts: list[tuple[Any, ...]] = []
        submitted: dict[int, str] = {}
        postal_ids: dict[str, tuple[int, str | None]] = {}
        for item in items:
            event = item.event
            if isinstance(event, MAIL_EVENTS):
                upserts.append(_message_row(event))
                if isinstance(event, MailSubmitted):
                    submitted[event.postal_id] = event.message.mailgate_id
            elif isinstance(event, PostalEvent) and item.mailgate_id and item.postal_id:
                postal_ids[item.mailgate_id] = (item.postal_id, event.postal_token)
        touched: set[str] = set()
        if upserts:
            await conn.execute(
                SQL_UPSERT_MESSAGES, *_columns(merge_message_rows(upserts), _MESSAGE_COLUMNS)
            )
        if submitted:
            rows = await conn.fetch(
                SQL_LINK_POSTAL_FACTS, list(submitted), list(submitted.values())
            )
            touched.update(r["mailgate_id"] for r in rows)
        if postal_ids:
            await conn.execute(
                SQL_SET_POSTAL_IDS,
                list(postal_ids),
                [p for p, _ in postal_ids.values()],
                [t for _, t in postal_ids.values()],
            )
        return touched

    async def _insert_dead_letters(self, conn: asyncpg.Connection, items: list[Item]) -> int:
        rows = []
        for item in items:
            event = item.event
            if not isinstance(event, WebhookDeadLettered):
                continue
            status = event.status
            rows.append(
                (
                    new_ulid(),
                    event.event_id,
                    status.event_id,
                    status.name,
                    status.message.mailgate_id,
                    status.message.account_id,
                    event.endpoint_id,
                    event.url,
                    event.attempts,
                    event.reason,
                    event.http_status,
                    encode(status),
                )
            )
        if rows:
            await conn.execute(SQL_INSERT_DEAD_LETTERS, *_columns(rows, 12))
        return len(rows)

    async def _upsert_postmaster(self, conn: asyncpg.Connection, items: list[Item]) -> None:
        rows = postmaster_rows([i.event for i in items if isinstance(i.event, PostmasterDaily)])
        if rows:
            await conn.execute(SQL_UPSERT_POSTMASTER_DAILY, *_columns(rows, _POSTMASTER_COLUMNS))

    async def _emit_pending(
        self, conn: asyncpg.Connection, mailgate_ids: list[str], result: Committed
    ) -> None:
        """Turn pending facts of messages whose row exists into outbox status events."""
        if not mailgate_ids:
            return
        rows = await conn.fetch(SQL_PENDING, mailgate_ids, list(ONCE_PER_MESSAGE))
        if not rows:
            return
        subjects: list[str] = []
        msg_ids: list[str] = []
        payloads: list[bytes] = []
        best: dict[str, str] = {}
        suppress: dict[tuple[str, str], str] = {}
        once: set[tuple[str, str]] = set()
        repeated: list[Any] = []
        for row in rows:
            status = row["status_name"]
            if status in ONCE_PER_MESSAGE:
                key = (row["mailgate_id"], status)
                if row["repeat"] or key in once:
                    # Recorded in the history; the customer already has (or gets) this outcome.
                    self._metrics.repeated_outcomes.labels(status).inc()
                    repeated.append(row)
                    continue
                once.add(key)
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
        if repeated:
            await conn.execute(
                SQL_DROP_REPEATED,
                [r["event_id"] for r in repeated],
                [r["mailgate_id"] for r in repeated],
                [r["campaign_id"] for r in repeated],
            )
        await conn.execute(
            SQL_MARK_EMITTED,
            [r["event_id"] for r in rows],
            [r["mailgate_id"] for r in rows],
            [r["campaign_id"] for r in rows],
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
