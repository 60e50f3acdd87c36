"""Monthly partitions of ``messages`` and ``events``: created ahead, dropped by retention.

The DDL lives in SQL functions of migration 0002 (identifiers and bounds built from dates
with ``format(%I, %L)``); this module decides which months and calls them with parameters.
``messages`` is partitioned by mailgate id (a ULID: its first ten characters are its time),
``events`` by ``recorded_at``; both by UTC month. See docs/adr/0006-ledger-partitioning.md.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg
import structlog
from mailgate_core.ids import is_ulid, ulid_time_ms

if TYPE_CHECKING:
    from .db import Conn

log = structlog.get_logger()

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

#: Maintenance DDL waits at most this long for a lock, so it never stalls ingestion.
LOCK_TIMEOUT = "5s"


def month_of(moment: dt.datetime | dt.date) -> dt.date:
    """The first day of the UTC month of ``moment``."""
    if isinstance(moment, dt.datetime):
        moment = moment.astimezone(dt.UTC).date()
    return moment.replace(day=1)


def add_months(month: dt.date, count: int) -> dt.date:
    index = month.year * 12 + month.month - 1 + count
    return dt.date(index // 12, index % 12 + 1, 1)


def months_ahead(now: dt.datetime, ahead: int) -> list[dt.date]:
    """This month and the ``ahead`` months after it."""
    first = month_of(now)
    return [add_months(first, n) for n in range(ahead + 1)]


def partition_name(parent: str, month: dt.date) -> str:
    return f"{parent}_y{month.year:04d}m{month.month:02d}"


def month_start(month: dt.date) -> dt.datetime:
    return dt.datetime(month.year, month.month, 1, tzinfo=dt.UTC)


def ulid_prefix(moment: dt.datetime) -> str:
    """The ten-character time prefix of ULIDs made at ``moment`` (as ledger_ulid_prefix).

    Every ULID made at or after ``moment`` sorts at or after this prefix, every one made
    before sorts before it: time bounds become mailgate id bounds.
    """
    ms = max(0, int(moment.timestamp() * 1000))
    chars = []
    for _ in range(10):
        chars.append(_CROCKFORD[ms % 32])
        ms //= 32
    return "".join(reversed(chars))


def month_of_ulid(mailgate_id: str) -> dt.date | None:
    if not is_ulid(mailgate_id):
        return None
    return month_of(dt.datetime.fromtimestamp(ulid_time_ms(mailgate_id) / 1000, tz=dt.UTC))


def droppable(month: dt.date, cutoff: dt.datetime) -> bool:
    """A month's partition goes when the whole month is older than the cutoff."""
    return month_start(add_months(month, 1)) <= cutoff


async def ensure_partitions(conn: Conn, months: Iterable[dt.date]) -> list[str]:
    """Create the partitions of ``months`` that are missing; return the names created."""
    wanted = sorted(set(months))
    if not wanted:
        return []
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        rows = await conn.fetch("SELECT * FROM ledger_ensure_partitions($1::date[])", wanted)
    created = [r[0] for r in rows]
    if created:
        log.info("partitions created", partitions=created)
    return created


async def existing_months(conn: Conn) -> dict[str, list[dt.date]]:
    """Table -> the months that have a partition, oldest first."""
    rows = await conn.fetch(
        """SELECT p.relname AS parent, c.relname AS part
           FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_class p ON p.oid = i.inhparent
           WHERE i.inhparent IN ('messages'::regclass, 'events'::regclass)
             AND c.relname ~ '^(messages|events)_y[0-9]{4}m[0-9]{2}$'
           ORDER BY c.relname"""
    )
    out: dict[str, list[dt.date]] = {"messages": [], "events": []}
    for row in rows:
        tail = row["part"].rsplit("_y", 1)[1]
        out[row["parent"]].append(dt.date(int(tail[:4]), int(tail[5:7]), 1))
    return out


@dataclass
class RetentionResult:
    dropped: list[str] = field(default_factory=list)
    deleted: dict[str, int] = field(default_factory=dict)


_PRUNE_STATEMENTS = {
    # The idempotency keys of facts whose partitions are gone.
    "event_ids": """DELETE FROM event_ids WHERE event_id IN (
                        SELECT event_id FROM event_ids WHERE recorded_at < $1 LIMIT $2)""",
    # Stray rows outside every monthly partition (non-ULID ids): rare, pruned by age.
    "messages_default": """DELETE FROM messages_default WHERE mailgate_id IN (
                               SELECT mailgate_id FROM messages_default
                               WHERE updated_at < $1 LIMIT $2)""",
    "events_default": """DELETE FROM events_default WHERE event_id IN (
                             SELECT event_id FROM events_default
                             WHERE recorded_at < $1 LIMIT $2)""",
    "dead_letters": """DELETE FROM dead_letters WHERE id IN (
                           SELECT id FROM dead_letters WHERE created_at < $1 LIMIT $2)""",
}


async def apply_retention(
    pool: asyncpg.Pool, *, cutoff: dt.datetime, chunk: int = 5000
) -> RetentionResult:
    """Drop the monthly partitions older than ``cutoff``; prune the small unpartitioned rest.

    Published outbox rows are kept one day (the outbox is a queue, not history).
    """
    result = RetentionResult()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        rows = await conn.fetch("SELECT * FROM ledger_drop_partitions($1)", cutoff)
    result.dropped = [r[0] for r in rows]
    if result.dropped:
        log.info("partitions dropped", partitions=result.dropped, cutoff=cutoff.isoformat())
    statements = dict(_PRUNE_STATEMENTS)
    statements["outbox"] = """DELETE FROM outbox WHERE id IN (
                                  SELECT id FROM outbox WHERE published_at < $1 LIMIT $2)"""
    cutoffs = dict.fromkeys(statements, cutoff)
    cutoffs["outbox"] = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    for table, sql in statements.items():
        total = 0
        while True:
            status = await pool.execute(sql, cutoffs[table], chunk)
            count = int(status.rsplit(" ", 1)[-1])
            total += count
            if count < chunk:
                break
        result.deleted[table] = total
    return result


class PartitionKeeper:
    """Knows which months have partitions; creates missing ones ahead and on demand.

    ``ensure_for`` is called by the ingest path with the mailgate ids of new messages, so a
    backlog of older mail (still within retention) lands in its own month, not in the
    default partition.
    """

    def __init__(self, pool: asyncpg.Pool, *, ahead_months: int, retention_days: int) -> None:
        self._pool = pool
        self._ahead = ahead_months
        self._retention_days = retention_days
        self._known: set[dt.date] = set()
        self._ranges: list[tuple[str, str]] = []
        self._ranges_of: set[dt.date] = set()

    def cutoff(self, now: dt.datetime | None = None) -> dt.datetime:
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(days=self._retention_days)

    async def ensure_ahead(self, now: dt.datetime | None = None) -> list[str]:
        months = months_ahead(now or dt.datetime.now(dt.UTC), self._ahead)
        async with self._pool.acquire() as conn:
            created = await ensure_partitions(conn, months)
            present = await existing_months(conn)
        self._known = set(present["messages"]) & set(present["events"])
        return created

    def _known_ranges(self) -> list[tuple[str, str]]:
        """The ULID time prefixes of the months with partitions, as [lo, hi) ranges."""
        if self._ranges_of != self._known:
            self._ranges = [
                (ulid_prefix(month_start(m)), ulid_prefix(month_start(add_months(m, 1))))
                for m in sorted(self._known)
            ]
            self._ranges_of = set(self._known)
        return self._ranges

    async def ensure_for(self, mailgate_ids: Iterable[str]) -> list[str]:
        ranges = self._known_ranges()
        # Most ids fall in a month that has its partition: a string comparison of their time
        # prefix says so without decoding them.
        unknown = [
            i for i in mailgate_ids if not any(lo <= i[:10].upper() < hi for lo, hi in ranges)
        ]
        if not unknown:
            return []
        cutoff = self.cutoff()
        missing = {
            m
            for m in (month_of_ulid(i) for i in unknown)
            if m is not None and m not in self._known and not droppable(m, cutoff)
        }
        if not missing:
            return []
        horizon = add_months(month_of(dt.datetime.now(dt.UTC)), self._ahead)
        missing = {m for m in missing if m <= horizon}  # far-future ids go to the default
        if not missing:
            return []
        async with self._pool.acquire() as conn:
            created = await ensure_partitions(conn, missing)
        self._known |= missing
        return created

    async def retention(self, now: dt.datetime | None = None) -> RetentionResult:
        result = await apply_retention(self._pool, cutoff=self.cutoff(now))
        if result.dropped:
            async with self._pool.acquire() as conn:
                present = await existing_months(conn)
            self._known = set(present["messages"]) & set(present["events"])
        return result
