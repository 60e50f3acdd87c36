"""Ledger-owned NATS KV buckets: a cache of Postgres for the other services.

Postgres is the truth. After every change the ledger puts the changed key (after the commit);
on start, on request (a put failed) and periodically it rewrites every key and deletes keys
that no longer exist in Postgres. A put that fails never fails the change itself: it
schedules a full resync instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Iterable
from typing import TYPE_CHECKING

import asyncpg
import msgspec
import nats.js.errors
import structlog
from mailgate_core.nats import KV_ACCOUNTS, KV_CREDENTIALS, KV_ENDPOINTS, KV_SUPPRESSIONS
from mailgate_core.records import (
    AccountEndpoints,
    AccountRecord,
    CredentialRecord,
    EndpointRecord,
    SuppressionRecord,
    suppression_key,
)
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

if TYPE_CHECKING:
    from .db import Row

log = structlog.get_logger()

_encoder = msgspec.json.Encoder()
_PUT_CONCURRENCY = 64
_BULK_CONCURRENCY = 256


# --- rows -> records (pure) ----------------------------------------------------------------


def credential_record(row: Row) -> CredentialRecord:
    return CredentialRecord(
        username=row["username"],
        account_id=row["account_id"],
        password_hash=row["password_hash"],
        rate_per_second=row["rate_per_second"],
        daily_limit=row["daily_limit"],
        allowed_ips=list(row["allowed_ips"] or []),
        disabled=bool(row["disabled"]),
    )


def account_record(row: Row) -> AccountRecord:
    return AccountRecord(
        id=row["id"],
        name=row["name"],
        allowed_sender_domains=list(row["allowed_sender_domains"] or []),
        tracking=bool(row["tracking"]),
        has_postal_api_key=bool(row["postal_api_key"]),
        postal_api_key=row["postal_api_key"] or None,
        disabled=bool(row["disabled"]),
    )


def suppression_record(row: Row) -> SuppressionRecord:
    return SuppressionRecord(
        account_id=row["account_id"],
        email=row["email"],
        reason=row["reason"],
        created_at=row["created_at"].timestamp(),
    )


def endpoint_record(row: Row) -> EndpointRecord:
    return EndpointRecord(
        id=row["id"],
        url=row["url"],
        secret=row["secret"],
        events=list(row["events"] or []),
        batch=bool(row["batch"]),
        legacy_complained_spelling=bool(row["legacy_complained_spelling"]),
        enabled=bool(row["enabled"]),
    )


def account_endpoints(account_id: str, rows: Iterable[Row]) -> AccountEndpoints:
    """Only enabled endpoints go to KV: a disabled one is, for ams-reporter, gone."""
    return AccountEndpoints(
        account_id=account_id,
        endpoints=[endpoint_record(r) for r in rows if r["enabled"]],
    )


# --- SQL -----------------------------------------------------------------------------------

SQL_CREDENTIALS = "SELECT * FROM credentials"
SQL_ACCOUNTS = "SELECT * FROM accounts"
SQL_ENDPOINTS = "SELECT * FROM endpoints WHERE enabled ORDER BY account_id, created_at"
SQL_ENDPOINTS_OF = "SELECT * FROM endpoints WHERE account_id = $1 ORDER BY created_at"
SQL_SUPPRESSIONS = "SELECT account_id, email, reason, created_at FROM suppressions"
SQL_SUPPRESSIONS_CHANGED = """
SELECT account_id, email, reason, created_at FROM suppressions
WHERE account_id = $1 AND email > $3 AND updated_at >= $2
ORDER BY email LIMIT 5000
"""
SQL_SUPPRESSIONS_GONE = """
SELECT email FROM unnest($2::text[]) AS v(email)
WHERE NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.account_id = $1 AND s.email = v.email)
"""


class KvCache:
    """The four buckets and single-key writes."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.buckets: dict[str, KeyValue] = {}

    async def open(self) -> None:
        for name in (KV_CREDENTIALS, KV_ACCOUNTS, KV_SUPPRESSIONS, KV_ENDPOINTS):
            self.buckets[name] = await self._js.key_value(name)

    async def put(self, bucket: str, key: str, value: msgspec.Struct) -> None:
        async with asyncio.timeout(5.0):
            await self.buckets[bucket].put(key, _encoder.encode(value))

    async def delete(self, bucket: str, key: str) -> None:
        async with asyncio.timeout(5.0):
            await self.buckets[bucket].delete(key)

    async def keys(self, bucket: str) -> set[str]:
        try:
            async with asyncio.timeout(30.0):
                return set(await self.buckets[bucket].keys())
        except nats.js.errors.NoKeysError:
            return set()


class KvSync:
    """Writes changed keys and runs full resyncs (start, on request, periodically)."""

    def __init__(self, pool: asyncpg.Pool, cache: KvCache, *, interval_s: float = 3600.0):
        self._pool = pool
        self._cache = cache
        self._interval_s = interval_s
        self._wake = asyncio.Event()
        self._bulk: set[asyncio.Task[int]] = set()
        self.synced = False
        """True once a full resync has completed (a readiness check)."""

    # single changes (called after the Postgres commit) ------------------------------------

    async def _safe(self, bucket: str, key: str, value: msgspec.Struct | None) -> None:
        try:
            if value is None:
                await self._cache.delete(bucket, key)
            else:
                await self._cache.put(bucket, key, value)
        except Exception as exc:
            log.warning("kv write failed", bucket=bucket, key=key, error=str(exc))
            self.request_resync()

    async def put_credential(self, record: CredentialRecord) -> None:
        await self._safe(KV_CREDENTIALS, record.username, record)

    async def put_account(self, record: AccountRecord) -> None:
        await self._safe(KV_ACCOUNTS, record.id, record)

    async def put_suppressions(self, records: Iterable[SuppressionRecord]) -> None:
        sem = asyncio.Semaphore(_PUT_CONCURRENCY)

        async def one(rec: SuppressionRecord) -> None:
            async with sem:
                await self._safe(KV_SUPPRESSIONS, suppression_key(rec.account_id, rec.email), rec)

        await asyncio.gather(*(one(r) for r in records))

    def sync_suppressions_since(self, account_id: str, since: dt.datetime) -> None:
        """Write the account's suppressions changed since ``since`` to KV in the background.

        Used after a bulk CSV import: KV takes a few thousand writes a second, Postgres far
        more, so the import answers once Postgres has committed and KV catches up here,
        reading the rows back page by page (bounded memory whatever the import's size).
        """
        task = asyncio.create_task(
            self._sync_suppressions(account_id, since), name="ledger:kv-suppressions"
        )
        self._bulk.add(task)
        task.add_done_callback(self._bulk_done)

    def _bulk_done(self, task: asyncio.Task[int]) -> None:
        self._bulk.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("kv bulk write failed", error=repr(task.exception()))
            self.request_resync()

    @property
    def bulk_writes_running(self) -> int:
        return len(self._bulk)

    async def _sync_suppressions(self, account_id: str, since: dt.datetime) -> int:
        async def put_all(records: list[SuppressionRecord]) -> None:
            pending = iter(records)

            async def worker() -> None:  # a fixed number of writers, not a task per key
                for rec in pending:
                    key = suppression_key(rec.account_id, rec.email)
                    await self._safe(KV_SUPPRESSIONS, key, rec)

            await asyncio.gather(*(worker() for _ in range(_BULK_CONCURRENCY)))

        written = 0
        cursor = ""
        while True:
            rows = await self._pool.fetch(SQL_SUPPRESSIONS_CHANGED, account_id, since, cursor)
            if not rows:
                break
            await put_all([suppression_record(r) for r in rows])
            # A suppression removed while this page was being written must not stay in KV.
            emails = [r["email"] for r in rows]
            gone = await self._pool.fetch(SQL_SUPPRESSIONS_GONE, account_id, emails)
            for r in gone:
                await self._safe(KV_SUPPRESSIONS, suppression_key(account_id, r["email"]), None)
            written += len(rows)
            cursor = rows[-1]["email"]
        log.info("kv suppressions written", account_id=account_id, count=written)
        return written

    async def stop(self) -> None:
        """Cancel background bulk writes (the next start's resync completes them)."""
        for task in list(self._bulk):
            task.cancel()
        if self._bulk:
            await asyncio.wait(set(self._bulk), timeout=5.0)

    async def delete_suppression(self, account_id: str, email: str) -> None:
        await self._safe(KV_SUPPRESSIONS, suppression_key(account_id, email), None)

    async def put_endpoints_of(self, account_id: str) -> None:
        try:
            rows = await self._pool.fetch(SQL_ENDPOINTS_OF, account_id)
        except Exception as exc:
            log.warning("kv endpoints read failed", account_id=account_id, error=str(exc))
            self.request_resync()
            return
        await self._safe(KV_ENDPOINTS, account_id, account_endpoints(account_id, rows))

    # full resync ----------------------------------------------------------------------------

    def request_resync(self) -> None:
        self._wake.set()

    async def _desired(self) -> dict[str, dict[str, msgspec.Struct]]:
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            creds = await conn.fetch(SQL_CREDENTIALS)
            accounts = await conn.fetch(SQL_ACCOUNTS)
            endpoints = await conn.fetch(SQL_ENDPOINTS)
            suppressions = await conn.fetch(SQL_SUPPRESSIONS)
        by_account: dict[str, list[Row]] = {}
        for row in endpoints:
            by_account.setdefault(row["account_id"], []).append(row)
        return {
            KV_CREDENTIALS: {r["username"]: credential_record(r) for r in creds},
            KV_ACCOUNTS: {r["id"]: account_record(r) for r in accounts},
            KV_ENDPOINTS: {a: account_endpoints(a, rows) for a, rows in by_account.items()},
            KV_SUPPRESSIONS: {
                suppression_key(r["account_id"], r["email"]): suppression_record(r)
                for r in suppressions
            },
        }

    async def _desired_keys(self) -> dict[str, set[str]]:
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            creds = await conn.fetch("SELECT username FROM credentials")
            accounts = await conn.fetch("SELECT id FROM accounts")
            endpoints = await conn.fetch("SELECT DISTINCT account_id FROM endpoints")
            suppressions = await conn.fetch("SELECT account_id, email FROM suppressions")
        return {
            KV_CREDENTIALS: {r["username"] for r in creds},
            KV_ACCOUNTS: {r["id"] for r in accounts},
            # an account whose endpoints are all disabled keeps an empty record
            KV_ENDPOINTS: {r["account_id"] for r in endpoints},
            KV_SUPPRESSIONS: {suppression_key(r["account_id"], r["email"]) for r in suppressions},
        }

    async def resync(self) -> dict[str, int]:
        """Rewrite every key from Postgres, then delete keys Postgres no longer has.

        Stale keys are judged against a second read of Postgres made *after* listing the
        bucket: a key written by a concurrent change (always after its commit) is then in
        Postgres too, so it is never deleted by mistake.
        """
        desired = await self._desired()
        sem = asyncio.Semaphore(_PUT_CONCURRENCY)

        async def put(bucket: str, key: str, value: msgspec.Struct) -> None:
            async with sem:
                await self._cache.put(bucket, key, value)

        for bucket, values in desired.items():
            await asyncio.gather(*(put(bucket, k, v) for k, v in values.items()))
        present = {bucket: await self._cache.keys(bucket) for bucket in desired}
        still = await self._desired_keys()
        deleted = 0
        for bucket, keys in present.items():
            for key in keys - still[bucket]:
                await self._cache.delete(bucket, key)
                deleted += 1
        counts = {bucket: len(values) for bucket, values in desired.items()}
        log.info("kv resynced", deleted=deleted, **counts)
        self.synced = True
        return counts

    async def run(self) -> None:
        """Resync at start, whenever requested and every ``interval_s``; retry on failure."""
        attempt = 0
        while True:
            self._wake.clear()
            try:
                await self.resync()
                attempt = 0
                delay = self._interval_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                delay = min(30.0, 0.5 * 2**attempt)
                log.warning("kv resync failed", error=str(exc), retry_in_s=delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
