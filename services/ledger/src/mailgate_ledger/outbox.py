"""Transactional outbox: status events are committed with their facts, then published.

The batch handler hands the rows it just committed to ``submit`` (published in the
background, at most ``max_inflight`` batches at once, so a slow NATS slows intake instead of
growing memory); ``run`` republishes rows a crash (or a NATS outage) left unpublished.
``Nats-Msg-Id`` is the status event id, so JetStream drops a second publish within its
duplicate window and receivers de-duplicate on ``webhook-id`` beyond it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext

from .metrics import LedgerMetrics

log = structlog.get_logger()

_CONCURRENCY = 64


class _Ref(msgspec.Struct):
    campaign_id: str | None = None


class _CampaignOnly(msgspec.Struct):
    """The one field of a status event the per-campaign counter needs (others skipped)."""

    message: _Ref = msgspec.field(default_factory=_Ref)


_campaign_decoder = msgspec.json.Decoder(_CampaignOnly)


def _campaign_of(payload: bytes) -> str:
    try:
        return _campaign_decoder.decode(payload).message.campaign_id or ""
    except msgspec.DecodeError:
        return ""


@dataclass(frozen=True)
class OutboxRow:
    id: int
    subject: str
    msg_id: str
    payload: bytes


class Outbox:
    def __init__(
        self,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        metrics: LedgerMetrics,
        *,
        interval_s: float = 1.0,
        grace_s: float = 5.0,
        max_inflight: int = 8,
    ) -> None:
        self._pool = pool
        self._js = js
        self._metrics = metrics
        self._interval_s = interval_s
        self._grace_s = grace_s
        self._slots = asyncio.Semaphore(max_inflight)
        self._inflight: set[asyncio.Task[None]] = set()

    async def _publish_one(self, row: OutboxRow) -> bool:
        try:
            await self._js.publish(
                row.subject, row.payload, timeout=5.0, headers={"Nats-Msg-Id": row.msg_id}
            )
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            log.warning("status publish failed", subject=row.subject, error=str(exc))
            return False
        status = row.subject.partition(".")[2]
        self._metrics.status_published.labels(status).inc()
        campaign = _campaign_of(row.payload)
        if campaign:
            self._metrics.campaign_status.labels(campaign, status).inc()
        return True

    async def _publish(self, rows: Sequence[OutboxRow]) -> list[int]:
        """Publish ``rows``; return the ids JetStream acknowledged."""
        sem = asyncio.Semaphore(_CONCURRENCY)

        async def one(row: OutboxRow) -> int | None:
            async with sem:
                return row.id if await self._publish_one(row) else None

        results = await asyncio.gather(*(one(r) for r in rows))
        return [i for i in results if i is not None]

    async def publish_committed(self, rows: Sequence[OutboxRow]) -> None:
        """Publish rows just committed by a batch; leave failures to the background loop."""
        if not rows:
            return
        done = await self._publish(rows)
        if not done:
            return
        try:
            await self._pool.execute(
                "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", done
            )
        except Exception as exc:  # republished later; JetStream de-duplicates
            log.warning("outbox mark failed", error=str(exc), count=len(done))

    async def submit(self, rows: Sequence[OutboxRow]) -> None:
        """Publish committed rows in the background; waits while too many batches are out."""
        if not rows:
            return
        await self._slots.acquire()

        async def publish() -> None:
            try:
                await self.publish_committed(rows)
            except Exception as exc:  # the background loop republishes them
                log.warning("outbox publish failed", error=repr(exc), count=len(rows))
            finally:
                self._slots.release()

        task = asyncio.create_task(publish(), name="ledger:outbox-publish")
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for the background publishes in flight (on shutdown)."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout_s)

    async def flush_pending(self, limit: int = 500) -> int:
        """Publish rows older than the grace period still unpublished; return how many."""
        async with self._pool.acquire() as conn, conn.transaction():
            records = await conn.fetch(
                """SELECT id, subject, msg_id, payload FROM outbox
                   WHERE published_at IS NULL AND created_at < now() - $1::interval
                   ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED""",
                dt.timedelta(seconds=self._grace_s),
                limit,
            )
            rows = [
                OutboxRow(r["id"], r["subject"], r["msg_id"], bytes(r["payload"])) for r in records
            ]
            done = await self._publish(rows)
            if done:
                await conn.execute(
                    "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", done
                )
        if done:
            log.info("outbox republished", count=len(done))
        return len(done)

    async def count_pending(self) -> int:
        return int(
            await self._pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        )

    async def run(self) -> None:
        while True:
            try:
                while await self.flush_pending() > 0:
                    pass
                self._metrics.outbox_pending.set(await self.count_pending())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox loop failed", error=str(exc))
            await asyncio.sleep(self._interval_s)
