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

Every write of a batch is one set-based statement over arrays (``unnest``) or, for the wide
ones (facts, message rows, lock keys and event ids), over one JSON document encoded by
msgspec in a single call (asyncpg encodes array elements one by one, about 1 µs of CPU
each; msgspec's JSON of the same values costs about a tenth). So a batch of 256 facts costs a
handful of round trips, not 256: locks and event-id claims in one call
(``ledger_lock_and_claim``), the message rows of mail.* facts, one read of the rows the facts
belong to (with the facts earlier batches left pending for them), then one statement
inserting the facts in their final state (emitted, repeated, pending or history only: a fact
is never inserted pending and updated in the same transaction), marking the earlier pending
ones emitted, writing their status events into the outbox and the messages' new status. See
``bench/bench_ledger.py``.

Concurrent batches (two per stream in a process, several replicas) serialize on
transaction-scoped advisory locks taken in sorted order, one per mailgate id and per Postal
id they touch, so a fact and the row it waits for can never miss each other. A process's
batches of one stream also claim and commit in the order they were fetched (``_Turn``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
    StatusName,
    TrackBatch,
    TrackClick,
    TrackOpen,
    WebhookDeadLettered,
    decode_subject,
    encode,
)
from nats.aio.msg import Msg

from .kvsync import KvSync
from .metrics import LedgerMetrics
from .outbox import Carrier, Outbox, OutboxRow
from .partitions import PartitionKeeper
from .status import ONCE_PER_MESSAGE, SUPPRESSING_STATUSES, Fact, classify, rank

if TYPE_CHECKING:
    from .db import Conn

log = structlog.get_logger()

#: (stream, durable consumer, filter subject) the ledger consumes.
CONSUMERS: tuple[tuple[str, str, str], ...] = (
    ("MAIL", "ledger-mail", "mail.>"),
    ("POSTAL", "ledger-postal", "postal.>"),
    ("TRACK", "ledger-track", "track.>"),
    ("STATS", "ledger-stats", "stats.>"),
)

MAIL_EVENTS = (MailAccepted, MailSkipped, MailSubmitted, MailFailed)

#: Facts per transaction at most: a fetched batch of ``track.batch`` messages may carry
#: tens of thousands of events; they are committed in slices, acked after the last one.
MAX_FACTS_PER_TRANSACTION = 4096

#: Batches of one stream a ledger process handles at once (``LeanPullWorker`` reads it from
#: the handler). While one batch waits for Postgres (its round trips, its commit's flush)
#: the next one is decoded and runs its statements; a backlog of mail.* facts, which create
#: the message rows and emit the facts waiting for them, is the ledger's critical path.
#: A stream's batches still take their locks and commit in the order they were fetched
#: (``_Turn``), so a fact is never visible before the facts fetched ahead of it.
CONCURRENT_BATCHES = 2

#: A batch ready to commit waits this long for the batch ahead of it to end, then rolls back
#: (releasing its locks, which the batch ahead may be waiting for: a suppression or a
#: Postmaster day both write) and runs again once that batch has ended.
TURN_WAIT_S = 2.0

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


def _json_bytes_without_nul(value: Any) -> bytes:
    """JSON for a jsonb column (which refuses U+0000: stripped, only when present)."""
    raw = msgspec.json.encode(value)
    if b"\\u0000" in raw:
        raw = msgspec.json.encode(_strip_nul(value))
    return raw


def _event_history_bytes(event: Event) -> bytes:
    if getattr(event, "raw", None) is not None:  # not base64-encoded only to be dropped
        event = msgspec.structs.replace(event, raw=None)
    data = msgspec.to_builtins(event)
    data.pop("raw", None)
    return _json_bytes_without_nul(data)


def event_history_json(event: Event) -> str:
    """The event as stored in ``events.data``: everything but the raw message."""
    return _event_history_bytes(event).decode()


def expand(event: Event) -> Sequence[Event]:
    """The facts one message carries: each event of a ``track.batch``, else the event."""
    return event.events() if isinstance(event, TrackBatch) else (event,)


def worst(a: Outcome, b: Outcome) -> Outcome:
    """One message's outcome from its facts': a batch message is acked only when every
    contained event is recorded (or terminated); one to retry (Nak) redelivers it all, and
    the recorded ones are then duplicates (per-event de-duplication)."""
    order = (Ack, Term, Nak)
    return a if order.index(type(a)) >= order.index(type(b)) else b


def _ts(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)


# A batch's transaction starts in the round trip of its BEGIN with the planner told to use
# indexes and nested loops only: every statement of a batch looks rows up by the ids it
# carries, a handful per batch, and must never scan a table. Left to statistics the planner
# chose hash joins over sequential scans of ``messages`` and ``events`` (the status UPDATE
# joined to its unnest, the earlier-pending UPDATE): its plans are made when a table (a new
# month's partition, a fresh database) is empty or not yet analysed, and asyncpg's prepared
# statements keep such a generic plan while the table grows, until autovacuum analyses it
# (a minute at best): each batch then read every row of the month. Measured in the e2e
# flood (3,000 mails): 900 sequential scans reading 8M rows, about half of Postgres' CPU.
# ``SET LOCAL`` ends with the transaction; other users of the pool (the admin API) plan
# as before. Disabled plan kinds are still used where nothing else can answer a query.
SQL_BEGIN = (
    "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; "
    "SET LOCAL enable_mergejoin = off; SET LOCAL plan_cache_mode = force_generic_plan"
)


@contextlib.asynccontextmanager
async def _batch_transaction(conn: Conn) -> AsyncIterator[None]:
    """``conn.transaction()`` with ``SQL_BEGIN``: commits when the block ends, rolls back
    when it raises (a failed COMMIT, or one Postgres answers with ROLLBACK, raises)."""
    await conn.execute(SQL_BEGIN)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            if not conn.is_closed() and conn.is_in_transaction():
                await conn.execute("ROLLBACK")
        raise
    status = await conn.execute("COMMIT")
    if status != "COMMIT":
        raise asyncpg.InterfaceError(f"batch transaction not committed: {status}")


class _Yielded(Exception):
    """The batch ahead did not end in time: this transaction rolls back and runs again."""


class _Turn:
    """A batch's place in its stream's order (see ``CONCURRENT_BATCHES``): it claims its event
    ids (and takes its locks) after the batch ahead has, and commits after that batch ended.
    The waits only ever point at the batch ahead, so they cannot form a cycle among
    themselves; one through Postgres (the batch ahead waiting for a row this one wrote) is
    broken by ``TURN_WAIT_S``."""

    __slots__ = ("ahead", "claimed", "ended")

    def __init__(self, ahead: _Turn | None) -> None:
        self.ahead = ahead
        self.claimed = asyncio.Event()
        self.ended = asyncio.Event()

    async def before_claim(self) -> None:
        if self.ahead is not None:
            await self.ahead.claimed.wait()

    async def before_commit(self) -> None:
        ahead = self.ahead
        if ahead is None or ahead.ended.is_set():
            return
        try:
            async with asyncio.timeout(TURN_WAIT_S):
                await ahead.ended.wait()
        except TimeoutError:
            raise _Yielded from None

    async def after_ahead(self) -> None:
        if self.ahead is not None:
            await self.ahead.ended.wait()

    def end(self) -> None:
        self.claimed.set()
        self.ended.set()
        self.ahead = None  # no chain of every batch ever handled


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


# Lock the batch's messages (sorted keys), then claim its event ids: the ids returned are the
# facts new to the ledger (migration 0005). One round trip. Keys and ids come as two JSON
# arrays (cheaper to send than asyncpg's arrays, see SQL_WRITE_FACTS); the keys are sorted
# here, so every transaction takes its locks in the same order.
SQL_LOCK_AND_CLAIM = """
SELECT * FROM ledger_lock_and_claim(
    ARRAY(SELECT k::bigint FROM jsonb_array_elements_text($1::text::jsonb) AS k ORDER BY 1),
    ARRAY(SELECT jsonb_array_elements_text($2::text::jsonb)))
"""

# SQL_LOCK_AND_CLAIM, marking in the same statement outbox rows published while this batch
# was starting ($3, ``outbox.Carrier``; SQL_WRITE_FACTS' $11 takes those published since):
# their ``published_at`` costs no statement and no commit of its own. SKIP LOCKED: a row the
# outbox's republishing loop holds is marked by that loop; nothing here waits for a row
# lock (only that loop and these marks lock outbox rows).
SQL_MARK_LOCK_AND_CLAIM = """
WITH marked AS (
    UPDATE outbox SET published_at = now()
    WHERE id IN (SELECT id FROM outbox WHERE id = ANY($3::bigint[]) AND published_at IS NULL
                 FOR UPDATE SKIP LOCKED)
)
SELECT * FROM ledger_lock_and_claim(
    ARRAY(SELECT k::bigint FROM jsonb_array_elements_text($1::text::jsonb) AS k ORDER BY 1),
    ARRAY(SELECT jsonb_array_elements_text($2::text::jsonb)))
"""

# The message rows the batch's facts belong to (after its mail.* facts were applied): what a
# status event needs, for messages that got a once-per-message outcome in this batch the ones
# already emitted (``done``), and the facts earlier batches left pending for the message
# (``waiting``: emitted now), each as [event_id, status_name, status_data, occurred_at,
# repeat]; ``repeat``: a once-per-message outcome this message has already emitted.
#
# One round trip, and a plan that does not depend on statistics: every lookup is driven by
# the ids given (a message row by its primary key, pruned to its partition at run time; its
# facts through the ``events_pending`` and ``events_mailgate_id`` indexes). A join the
# planner is free to choose turned, while the tables grew faster than autoanalyze follows
# (a backlog into a fresh month), into sequential scans, hashed subplans over every
# non-pending fact and parallel workers: 25 ms a batch for 256 ids.
SQL_MESSAGE_ROWS = """
SELECT m.mailgate_id, m.account_id, m.recipient, m.external_id, m.campaign_id,
       CASE WHEN m.mailgate_id = ANY($2::text[]) THEN ARRAY(
           SELECT DISTINCT p.status_name FROM events p
           WHERE p.mailgate_id = m.mailgate_id AND p.status_name = ANY($3::text[])
             AND NOT p.status_pending) END AS done,
       (SELECT jsonb_agg(jsonb_build_array(
                   e.event_id, e.status_name, e.status_data, e.occurred_at,
                   e.status_name = ANY($3::text[]) AND EXISTS (
                       SELECT 1 FROM events p
                       WHERE p.mailgate_id = e.mailgate_id AND p.status_name = e.status_name
                         AND NOT p.status_pending)))
        FROM events e
        WHERE e.mailgate_id = m.mailgate_id AND e.status_pending) AS waiting
FROM unnest($1::text[]) AS w(id),
     LATERAL (SELECT * FROM messages WHERE mailgate_id = w.id OFFSET 0) AS m
"""

# The new facts, each inserted in its final state (emitted, repeated, pending or history
# only: never inserted pending and updated in the same transaction), the facts earlier
# batches left pending marked emitted or, for a repeated once-per-message outcome, kept as
# history only (``$8``: a JSON array of {e: event id, m: mailgate id, c: campaign id,
# r: repeated}), the status events they produce into the outbox and the messages' status
# advanced: one statement. The same UPDATE of ``messages`` gives a message the Postal id its
# Postal facts name when it has none yet (``$9``/``$10``; NULL status and rank when only
# that): one statement and one new row version instead of two.
#
# The facts come as ONE JSON array of rows (``_NewFact.row``), not eleven arrays: asyncpg
# encodes an array element by element in Python-level code (type checks per element), which
# for a batch of 256 facts cost the ledger more than msgspec's single encode of the whole
# batch; the jsonb columns (status_data, data) are embedded and parsed once, as before.
SQL_WRITE_FACTS = """
WITH facts AS (
    INSERT INTO events (event_id, mailgate_id, postal_id, subject, name, status_name,
                        status_data, status_pending, occurred_at, data, campaign_id)
    SELECT e, m, p, s, n, sn, sd, pend, o, d, c
    FROM jsonb_to_recordset($1::text::jsonb)
         AS t(e text, m text, p bigint, s text, n text, sn text, sd jsonb, pend boolean,
              o timestamptz, d jsonb, c text)
), earlier AS (
    UPDATE events SET status_pending = false, campaign_id = v.c,
                      status_name = CASE WHEN v.r THEN NULL ELSE events.status_name END,
                      status_data = CASE WHEN v.r THEN NULL ELSE events.status_data END
    FROM json_to_recordset($8::text::json) AS v(e text, m text, c text, r boolean)
    WHERE events.mailgate_id = v.m AND events.event_id = v.e AND events.status_pending
), advanced AS (
    UPDATE messages m SET
        status = CASE WHEN m.status_rank < v.rnk THEN v.status ELSE m.status END,
        status_rank = GREATEST(m.status_rank, v.rnk),
        postal_id = CASE WHEN m.postal_id IS NULL THEN v.pid ELSE m.postal_id END,
        postal_token = CASE WHEN m.postal_id IS NULL AND v.pid IS NOT NULL
                            THEN COALESCE(m.postal_token, v.tok) ELSE m.postal_token END,
        updated_at = now()
    FROM unnest($2::text[], $3::text[], $4::int[], $9::bigint[], $10::text[])
         AS v(id, status, rnk, pid, tok)
    WHERE m.mailgate_id = v.id
      AND (m.status_rank < v.rnk OR (m.postal_id IS NULL AND v.pid IS NOT NULL))
), marked AS (
    UPDATE outbox SET published_at = now()
    WHERE id IN (SELECT id FROM outbox WHERE id = ANY($11::bigint[]) AND published_at IS NULL
                 FOR UPDATE SKIP LOCKED)
)
INSERT INTO outbox (subject, msg_id, payload)
SELECT * FROM unnest($5::text[], $6::text[], $7::bytea[])
ON CONFLICT (msg_id) DO NOTHING
RETURNING id, msg_id
"""

# One row per mailgate id (merged in Python), so ON CONFLICT touches each row once. The rows
# come as one JSON array, as in SQL_WRITE_FACTS.
SQL_UPSERT_MESSAGES = """
INSERT INTO messages (mailgate_id, external_id, campaign_id, postal_id, postal_token,
                      account_id, recipient, sender, subject, size, accepted_at)
SELECT r->>0, r->>1, r->>2, (r->>3)::bigint, r->>4, r->>5, r->>6, r->>7, r->>8,
       (r->>9)::int, (r->>10)::timestamptz
FROM jsonb_array_elements($1::text::jsonb) AS r
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

# The message rows of a batch's mail.* facts (SQL_UPSERT_MESSAGES) and, in the same
# statement, the facts recorded earlier under a Postal id only linked to their message by its
# mail.submitted (``$2``/``$3``; empty arrays when the batch has none): one round trip.
SQL_UPSERT_AND_LINK = (
    "WITH upserted AS (\n"
    + SQL_UPSERT_MESSAGES
    + """)
UPDATE events SET mailgate_id = v.mid
FROM unnest($2::bigint[], $3::text[]) AS v(pid, mid)
WHERE events.postal_id = v.pid AND events.mailgate_id IS NULL AND events.status_pending
RETURNING events.mailgate_id
"""
)

SQL_BY_POSTAL_ID = "SELECT postal_id, mailgate_id FROM messages WHERE postal_id = ANY($1::bigint[])"

# Legacy tracking links name AMS's ids only: the newest message with that external id.
SQL_BY_EXTERNAL_ID = """
SELECT DISTINCT ON (v.ext, v.cid) v.ext, v.cid, m.mailgate_id
FROM unnest($1::text[], $2::text[]) AS v(ext, cid)
JOIN messages m ON m.external_id = v.ext AND (v.cid IS NULL OR m.campaign_id = v.cid)
ORDER BY v.ext, v.cid, m.mailgate_id DESC
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


def _jsonb_order(value: Any) -> Any:
    """``value`` as read back from a jsonb column: object keys shortest first, then bytewise
    (so a status event built from a new fact equals one built from its stored row)."""
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return {k: _jsonb_order(value[k]) for k in keys}
    if isinstance(value, list):
        return [_jsonb_order(v) for v in value]
    return value


class _FactRow(msgspec.Struct, omit_defaults=True):
    """An ``events`` row as ``SQL_WRITE_FACTS`` reads it (``jsonb_to_recordset``; a key left
    out is NULL)."""

    e: str
    s: str
    n: str
    pend: bool
    o: dt.datetime
    d: msgspec.Raw
    m: str | None = None
    p: int | None = None
    sn: str | None = None
    sd: msgspec.Raw | None = None
    c: str | None = None


class _EarlierFact(msgspec.Struct):
    """A fact an earlier batch left pending, as ``SQL_WRITE_FACTS`` updates it: emitted now,
    or (``r``) kept as history only, a once-per-message outcome the message already has."""

    e: str
    m: str
    c: str | None
    r: bool = False


class _NewFact:
    """A fact recorded by this batch and the state its ``events`` row is inserted in."""

    __slots__ = ("campaign_id", "item", "occurred_at", "pending", "status", "status_json")

    def __init__(self, item: Item) -> None:
        fact = item.fact
        self.item = item
        self.occurred_at = _ts(fact.timestamp)
        self.status = fact.status
        self.status_json = _json_bytes_without_nul(fact.data) if fact.status else None
        resolvable = item.mailgate_id is not None or item.postal_id is not None
        # Waits for its message row unless this batch emits it (or finds it repeated).
        self.pending = fact.status is not None and resolvable
        self.campaign_id = _campaign_fact_id(item.event)

    def status_data(self) -> Any:
        assert self.status_json is not None
        return _jsonb_order(msgspec.json.decode(self.status_json))

    def emitted(self, campaign_id: str | None) -> None:
        self.pending = False
        self.campaign_id = campaign_id

    def repeated(self, campaign_id: str | None) -> None:
        """A once-per-message outcome the message already has: history only."""
        self.pending = False
        self.status = None
        self.status_json = None
        self.campaign_id = campaign_id

    def row(self) -> _FactRow:
        """The ``events`` row, one object of ``SQL_WRITE_FACTS``'s JSON (the jsonb columns
        embedded as they are)."""
        item = self.item
        return _FactRow(
            e=item.event.event_id,
            m=item.mailgate_id,
            p=item.postal_id,
            s=item.event.subject(),
            n=item.fact.name,
            sn=self.status,
            sd=None if self.status_json is None else msgspec.Raw(self.status_json),
            pend=self.pending,
            o=self.occurred_at,
            d=msgspec.Raw(_event_history_bytes(item.event)),
            c=self.campaign_id,
        )


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
        self._last_turn: dict[str, _Turn] = {}

    def handler(self, stream: str) -> Callable[[Sequence[Msg]], Awaitable[Sequence[Outcome]]]:
        async def handle(msgs: Sequence[Msg]) -> Sequence[Outcome]:
            return await self.handle_batch(stream, msgs)

        handle.batches_in_flight = CONCURRENT_BATCHES  # type: ignore[attr-defined]
        return handle

    async def handle_batch(self, stream: str, msgs: Sequence[Msg]) -> list[Outcome]:
        turn = self._last_turn[stream] = _Turn(self._last_turn.get(stream))
        try:
            return await self._handle_batch(stream, msgs, turn)
        finally:
            turn.end()

    async def _handle_batch(self, stream: str, msgs: Sequence[Msg], turn: _Turn) -> list[Outcome]:
        started = time.perf_counter()
        outcomes: list[Outcome] = [Ack()] * len(msgs)
        items: list[Item] = []
        # One slot per fact: a track.batch message gives one per contained event (each with
        # its own event id), settled together below.
        slots: list[Msg] = []
        owners: list[int] = []
        for index, msg in enumerate(msgs):
            try:
                event = decode_subject(msg.subject, msg.data)
            except SchemaError as exc:
                log.warning("undecodable message terminated", subject=msg.subject, error=str(exc))
                self._metrics.rejected.labels(stream).inc()
                outcomes[index] = Term(str(exc))
                continue
            for part in expand(event):
                fact = classify(part)
                items.append(Item(len(slots), part, fact, fact.mailgate_id, fact.postal_id))
                slots.append(msg)
                owners.append(index)
        if items:
            await self._ensure_partitions(items)
            settled: list[Outcome] = [Ack()] * len(slots)
            for start in range(0, len(items), MAX_FACTS_PER_TRANSACTION):
                await self._record(
                    stream, slots, items[start : start + MAX_FACTS_PER_TRANSACTION], settled, turn
                )
            for slot, outcome in enumerate(settled):
                outcomes[owners[slot]] = worst(outcomes[owners[slot]], outcome)
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
        self,
        stream: str,
        msgs: Sequence[Msg],
        items: list[Item],
        outcomes: list[Outcome],
        turn: _Turn | None = None,
    ) -> None:
        turn = turn or _Turn(None)
        try:
            committed = await self._commit_with_retry(items, turn)
        except _FACT_ERRORS as exc:
            self._metrics.batch_failures.labels(stream).inc()
            if len(items) > 1:  # one bad fact must not hold back the rest
                log.warning("batch refused, recording facts one by one", error=repr(exc))
                for item in items:
                    await self._record(stream, msgs, [item], outcomes, turn)
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

    async def _commit_with_retry(
        self, items: list[Item], turn: _Turn, attempts: int = 3
    ) -> Committed:
        attempt = 1
        while True:
            try:
                return await self._commit(items, turn)
            except _Yielded:
                log.info("batch transaction yielded to the batch ahead")
                await turn.after_ahead()
            except _RETRY_NOW:
                if attempt == attempts:
                    raise
                log.info("batch transaction retried", attempt=attempt)
                attempt += 1

    async def _commit(self, items: list[Item], turn: _Turn) -> Committed:
        unique: list[Item] = []
        seen: set[str] = set()
        for item in items:
            if item.event.event_id not in seen:
                seen.add(item.event.event_id)
                unique.append(item)
        result = Committed(duplicates=len(items) - len(unique))
        await turn.before_claim()
        carrier = self._outbox.carrier()  # outbox rows published meanwhile: marked here
        try:
            async with self._pool.acquire(timeout=10) as conn, _batch_transaction(conn):
                try:
                    claimed = await self._lock_and_claim(conn, unique, carrier.take())
                finally:
                    turn.claimed.set()
                new = [item for item in unique if item.event.event_id in claimed]
                result.recorded = len(new)
                result.duplicates += len(unique) - len(new)
                if new:
                    await self._find_messages(conn, new)
                    linked, postal_ids = await self._apply_mail_facts(conn, new)
                    result.dead_letters = await self._insert_dead_letters(conn, new)
                    await self._upsert_postmaster(conn, new)
                    await self._write_facts(conn, new, linked, postal_ids, result, carrier)
                carrier.done()
                await turn.before_commit()
        except BaseException:
            carrier.give_back()  # not committed: marked later
            raise
        for item in new:
            self._metrics.events.labels(item.event.subject()).inc()
        return result

    async def _lock_and_claim(
        self, conn: Conn, items: list[Item], marks: Sequence[int] = ()
    ) -> set[str]:
        """Take the batch's advisory locks (sorted), then claim its event ids; return the ids
        claimed now (the new facts). ``marks``: outbox rows to mark published meanwhile."""
        keys = {lock_key("m", i.mailgate_id) for i in items if i.mailgate_id}
        keys |= {lock_key("p", i.postal_id) for i in items if i.postal_id is not None}
        args: list[Any] = [
            msgspec.json.encode(sorted(keys)).decode(),
            # Sorted too: concurrent batches holding a redelivered fact each claim in one
            # order, so they wait for each other instead of deadlocking.
            msgspec.json.encode(sorted(i.event.event_id for i in items)).decode(),
        ]
        if marks:
            rows = await conn.fetch(SQL_MARK_LOCK_AND_CLAIM, *args, list(marks))
        else:
            rows = await conn.fetch(SQL_LOCK_AND_CLAIM, *args)
        return {r[0] for r in rows}

    async def _find_messages(self, conn: Conn, items: list[Item]) -> None:
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

    async def _apply_mail_facts(
        self, conn: Conn, items: list[Item]
    ) -> tuple[set[str], dict[str, tuple[int, str | None]]]:
        """Create or complete message rows from mail.* facts; return the mailgate ids of
        facts recorded earlier under a Postal id only and linked to their message now, and
        the Postal id (and token) the batch's Postal facts name for their message (written
        by ``SQL_WRITE_FACTS`` where the message has none yet)."""
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
        linked: set[str] = set()
        if upserts:
            rows = await conn.fetch(
                SQL_UPSERT_AND_LINK,
                msgspec.json.encode(merge_message_rows(upserts)).decode(),
                list(submitted),
                list(submitted.values()),
            )
            linked.update(r["mailgate_id"] for r in rows)
        if submitted:
            for item in items:  # this batch's facts known by that Postal id only
                if (
                    item.mailgate_id is None
                    and item.fact.status is not None
                    and item.postal_id in submitted
                ):
                    item.mailgate_id = submitted[item.postal_id]
        return linked, postal_ids

    async def _insert_dead_letters(self, conn: Conn, items: list[Item]) -> int:
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

    async def _upsert_postmaster(self, conn: Conn, items: list[Item]) -> None:
        rows = postmaster_rows([i.event for i in items if isinstance(i.event, PostmasterDaily)])
        if rows:
            await conn.execute(SQL_UPSERT_POSTMASTER_DAILY, *_columns(rows, _POSTMASTER_COLUMNS))

    async def _write_facts(
        self,
        conn: Conn,
        new: list[Item],
        linked: set[str],
        postal_ids: dict[str, tuple[int, str | None]],
        result: Committed,
        carrier: Carrier | None = None,
    ) -> None:
        """Insert the new facts and turn every fact whose message row exists into its status
        event in the outbox, in (occurred_at, event_id) order: the batch's facts and the
        facts earlier batches left pending for these messages (their row appeared now)."""
        mids = {i.mailgate_id for i in new if i.mailgate_id} | linked
        once_ids = {
            i.mailgate_id for i in new if i.mailgate_id and i.fact.status in ONCE_PER_MESSAGE
        }
        messages: dict[str, asyncpg.Record] = {}
        if mids:
            rows = await conn.fetch(
                SQL_MESSAGE_ROWS, list(mids), list(once_ids), list(ONCE_PER_MESSAGE)
            )
            messages = {r["mailgate_id"]: r for r in rows}
        # (occurred_at, event_id, mailgate_id, status, data, already emitted, new item)
        candidates: list[tuple[dt.datetime, str, str, StatusName, Any, bool, _NewFact | None]] = []
        # The facts earlier batches left pending: event id -> its row of SQL_WRITE_FACTS' $8.
        earlier: dict[str, _EarlierFact] = {}
        for mid, message in messages.items():
            for event_id, status, data, occurred_at, repeat in message["waiting"] or ():
                earlier[event_id] = _EarlierFact(e=event_id, m=mid, c=message["campaign_id"])
                candidates.append(
                    (
                        dt.datetime.fromisoformat(occurred_at),
                        event_id,
                        mid,
                        status,
                        data or {},
                        bool(repeat),
                        None,
                    )
                )
        facts: list[_NewFact] = []
        for item in new:
            new_fact = _NewFact(item)
            facts.append(new_fact)
            status = item.fact.status
            row = messages.get(item.mailgate_id) if item.mailgate_id else None
            if status is None or row is None:
                continue
            done = row["done"]
            candidates.append(
                (
                    new_fact.occurred_at,
                    item.event.event_id,
                    row["mailgate_id"],
                    status,
                    new_fact.status_data(),
                    done is not None and status in done,
                    new_fact,
                )
            )
        candidates.sort(key=lambda c: (c[0], c[1]))
        subjects: list[str] = []
        msg_ids: list[str] = []
        payloads: list[bytes] = []
        best: dict[str, str] = {}
        suppress: dict[tuple[str, str], str] = {}
        once: set[tuple[str, str]] = set()
        for occurred_at, event_id, mid, status, data, repeat, fact in candidates:
            message = messages[mid]
            if status in ONCE_PER_MESSAGE:
                if repeat or (mid, status) in once:
                    # Recorded in the history; the customer already has (or gets) this outcome.
                    self._metrics.repeated_outcomes.labels(status).inc()
                    if fact is None:
                        earlier[event_id].r = True
                    else:
                        fact.repeated(message["campaign_id"])
                    continue
                once.add((mid, status))
            if fact is not None:  # (an earlier fact is marked emitted by SQL_WRITE_FACTS' $8)
                fact.emitted(message["campaign_id"])
            event = StatusEvent(
                event_id=f"st-{event_id}",
                name=status,
                message=MessageRef(
                    mailgate_id=mid,
                    account_id=message["account_id"],
                    recipient=message["recipient"],
                    external_id=message["external_id"],
                    campaign_id=message["campaign_id"],
                ),
                timestamp=int(occurred_at.timestamp()),
                data=data,
                source_event_id=event_id,
            )
            subjects.append(event.subject())
            msg_ids.append(event.event_id)
            payloads.append(encode(event))
            current = best.get(mid)
            if current is None or rank(status) > rank(current):
                best[mid] = status
            if status in SUPPRESSING_STATUSES:
                key = (message["account_id"], normalize_email(message["recipient"]))
                suppress.setdefault(key, status)
        # One row per message whose status advances or that learns its Postal id.
        updated = list(best) + [mid for mid in postal_ids if mid not in best]
        no_postal_id: tuple[int | None, str | None] = (None, None)
        inserted = await conn.fetch(
            SQL_WRITE_FACTS,
            msgspec.json.encode([fact.row() for fact in facts]).decode(),
            updated,
            [best.get(mid) for mid in updated],
            [rank(best[mid]) if mid in best else None for mid in updated],
            subjects,
            msg_ids,
            payloads,
            msgspec.json.encode(list(earlier.values())).decode(),
            [postal_ids.get(mid, no_postal_id)[0] for mid in updated],
            [postal_ids.get(mid, no_postal_id)[1] for mid in updated],
            carrier.take() if carrier is not None else [],
        )
        sent = {msg_id: i for i, msg_id in enumerate(msg_ids)}
        for r in inserted:
            i = sent[r["msg_id"]]
            result.outbox.append(OutboxRow(r["id"], subjects[i], msg_ids[i], payloads[i]))
        if suppress:
            await self._suppress(conn, suppress, result)

    async def _suppress(
        self, conn: Conn, suppress: dict[tuple[str, str], str], result: Committed
    ) -> None:
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
