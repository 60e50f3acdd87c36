"""Transactional outbox: status events are committed with their facts, then published.

The batch handler hands the rows it just committed to ``submit`` (published in the
background together with the rows other batches committed meanwhile, at most
``max_inflight`` batches' worth at once, so a slow NATS slows intake instead of growing
memory); ``run`` republishes rows a crash (or a NATS outage) left unpublished.
``Nats-Msg-Id`` is the status event id, so JetStream drops a second publish within its
duplicate window and receivers de-duplicate on ``webhook-id`` beyond it.

One STATUS message per status event (the consumers' wire format), but the publishes of a
batch are pipelined: sent back to back on the connection, their JetStream acks collected on
one wildcard inbox subscription (``_AckPipeline``, on ``mailgate_core.nats_wire``), so a
batch costs one round trip and no task, timer or future-with-timeout per event (nats-py's
``js.publish`` creates all three). The publishes of a batch are written to the connection at
once (``nats_wire.write``), as JetStream atomic batches when there are several
(``_AckPipeline.publish``): with ``sync_interval: always`` JetStream syncs once per message
otherwise, and that rate of stores was what bounded STATUS publishing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import msgspec
import nats.errors
import nats.js.errors
import structlog
from mailgate_core import nats_wire
from mailgate_core.ids import new_ulid
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
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


#: How long published rows wait to be marked together (``published_at``, one statement and
#: one commit for all) when no batch transaction is open to carry the mark (``Carrier``). No
#: wait by default: the rows published while a mark runs go in the next one, and a status on
#: STATUS is marked published as soon as before. (A row published and not yet marked when
#: the process dies is republished after the outbox's grace period, and JetStream drops the
#: duplicate.)
MARK_LINGER_S = 0.0
#: Status events per JetStream atomic batch (the server accepts up to 1,000).
ATOMIC_BATCH_MAX = 256
#: JetStream's refusals of an atomic batch: one of its message ids is stored already (a
#: republish: each message is then published alone, de-duplicated one by one), and atomic
#: publishing not enabled on the stream (a server before 2.12, or STATUS not provisioned).
_ERR_BATCH_DUPLICATE = 10201
_ERR_ATOMIC_DISABLED = 10174


def _stored(msg: Msg | None) -> bool:
    """Whether a publish's reply says JetStream stored the message (or already had it)."""
    if msg is None or not msg.data:  # timed out, or "no responders" (no stream)
        return False
    try:
        ack = nats_wire.decode_pub_ack(msg.data)
    except msgspec.DecodeError:
        return False
    return ack.error is None and ack.seq > 0


class _AckPipeline:
    """JetStream publishes without a round trip each: every publish carries a reply subject
    of one ``JetStreamRequests`` (one subscription resolves the waiting futures). At most
    ``window`` publishes await their ack at once (over all callers): JetStream stores them
    one by one, so more would only wait in its queue and run into the timeout."""

    def __init__(self, nc: NatsClient, window: int = 512, *, atomic: bool = True) -> None:
        self._nc = nc
        self._atomic = atomic
        self._window = asyncio.Semaphore(window)
        self._replies = nats_wire.JetStreamRequests(nc)

    def _release(self, _: asyncio.Future[Msg]) -> None:
        self._window.release()

    async def _write(self, pending: list[tuple[OutboxRow, str]]) -> None:
        """Send the publishes in one write (``nats_wire.write``), or one by one through
        nats-py when a subject or message id is not a plain token or the connection is not
        connected."""
        if all(
            nats_wire.is_plain_token(r.subject) and nats_wire.is_plain_token(r.msg_id)
            for r, _ in pending
        ):
            data = b"".join(
                [
                    nats_wire.publish_command(
                        r.subject, reply, r.payload, ("Nats-Msg-Id", r.msg_id)
                    )
                    for r, reply in pending
                ]
            )
            if await nats_wire.write(self._nc, data):
                return
        for row, reply in pending:
            await self._nc.publish(
                row.subject, row.payload, reply=reply, headers={"Nats-Msg-Id": row.msg_id}
            )

    async def publish(self, rows: Sequence[OutboxRow], timeout_s: float) -> list[bool]:
        """Publish ``rows``; for each, whether JetStream acknowledged it within the time.

        Several rows go as JetStream atomic batches (``ATOMIC_BATCH_MAX`` each): with
        ``sync_interval: always`` the server then writes and syncs a batch once instead of
        once per message (measured: about 8x the stored messages per second, a quarter of the
        server's CPU). A batch is stored whole or not at all; one JetStream refuses (a
        republish containing a stored message id) is published message by message."""
        await self._replies.start()
        plain = all(
            nats_wire.is_plain_token(r.subject) and nats_wire.is_plain_token(r.msg_id) for r in rows
        )
        if not (
            self._atomic
            and plain
            and len(rows) > 1
            and nats_wire.atomic_batches_supported(self._nc)
        ):
            return await self._publish_each(rows, timeout_s)
        results: list[bool] = []
        for start in range(0, len(rows), ATOMIC_BATCH_MAX):
            chunk = rows[start : start + ATOMIC_BATCH_MAX]
            stored = await self._publish_atomic(chunk, timeout_s) if self._atomic else None
            if stored is None:
                results += await self._publish_each(chunk, timeout_s)
            else:
                results += [stored] * len(chunk)
        return results

    async def _publish_atomic(self, rows: Sequence[OutboxRow], timeout_s: float) -> bool | None:
        """One atomic batch: True when stored, False when not known to be (no answer in
        time, connection error), None when JetStream refused it (publish one by one)."""
        await self._window.acquire()
        reply, future = self._replies.expect()
        future.add_done_callback(self._release)
        batch_id = new_ulid()
        last = len(rows) - 1
        commands = [
            nats_wire.atomic_batch_command(
                row.subject,
                reply if i == last else "",
                row.msg_id,
                row.payload,
                batch_id=batch_id,
                sequence=i + 1,
                commit=i == last,
            )
            for i, row in enumerate(rows)
        ]
        try:
            if not await nats_wire.write(self._nc, b"".join(commands)):
                return None  # not connected: nats-py's publish decides (buffer or refuse)
            await asyncio.wait([future], timeout=timeout_s)
        except (nats.errors.Error, OSError) as exc:
            log.warning("status publish failed", error=str(exc), count=len(rows))
            return False
        finally:
            self._replies.forget(reply)
            if not future.done():
                future.cancel()
        if future.cancelled():
            return False  # the outbox loop republishes; a stored batch is then a duplicate
        answer = future.result()
        try:
            ack = nats_wire.decode_pub_ack(answer.data) if answer.data else None
        except msgspec.DecodeError:
            ack = None
        if ack is not None and ack.error is None and ack.seq > 0:
            return True
        error = ack.error if ack is not None else None
        if error is None or error.err_code != _ERR_BATCH_DUPLICATE:
            log.warning(
                "atomic status publish refused",
                code=error.err_code if error else None,
                description=error.description if error else "no answer",
            )
            if error is not None and error.err_code == _ERR_ATOMIC_DISABLED:
                self._atomic = False  # this stream does not take atomic batches
        return None

    async def _publish_each(self, rows: Sequence[OutboxRow], timeout_s: float) -> list[bool]:
        """One publish per row, pipelined (each with its own ack)."""
        replies: list[str] = []
        futures: list[asyncio.Future[Msg]] = []
        unsent: list[tuple[OutboxRow, str]] = []  # (row, reply) not written yet
        try:
            for row in rows:
                if unsent and self._window.locked():  # write what waits before blocking
                    await self._write(unsent)
                    unsent = []
                await self._window.acquire()
                reply, future = self._replies.expect()
                future.add_done_callback(self._release)
                replies.append(reply)
                futures.append(future)
                unsent.append((row, reply))
            if unsent:
                await self._write(unsent)
            await asyncio.wait(futures, timeout=timeout_s)
        except (nats.errors.Error, OSError) as exc:  # the rest counts as not published
            log.warning("status publish failed", error=str(exc), count=len(rows))
        finally:
            for reply in replies:
                self._replies.forget(reply)
            for future in futures:  # timed out: give the window slot back
                if not future.done():
                    future.cancel()
        results = [not f.cancelled() and _stored(f.result()) for f in futures]
        results += [False] * (len(rows) - len(results))
        return results


class Carrier:
    """One batch transaction's part in marking published rows: while it can still run a
    statement (``take`` before it), the rows published meanwhile wait for it instead of
    costing a statement and a commit of their own; the marks it took commit with it, or come
    back when it does not commit (``give_back``). ``done`` once it takes no more (before its
    COMMIT); what is left is then marked by the outbox, unless another batch is open."""

    __slots__ = ("_done", "_outbox", "taken")

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._done = False
        self.taken: list[int] = []

    def take(self) -> list[int]:
        """The published rows to mark in the caller's next statement."""
        if self._done:
            return []
        ids = self._outbox._take()
        self.taken += ids
        return ids

    def done(self) -> None:
        if not self._done:
            self._done = True
            self._outbox._carrier_done()

    def give_back(self) -> None:
        """The transaction did not commit: its marks are marked later."""
        self.done()
        ids, self.taken = self.taken, []
        if ids:
            self._outbox._give_back(ids)


@dataclass(frozen=True)
class OutboxRow:
    id: int
    subject: str
    msg_id: str
    payload: bytes


class Outbox:
    """Publishes committed status events (``submit``) and republishes what is left (``run``).

    Rows submitted while a publish is out wait for it and then go together (at most
    ``max_publishing`` publishes at once, each up to ``max_rows_per_publish`` rows): the batches
    of several streams committed close together cost one atomic batch, one PubAck and one store
    for JetStream, not one each. Marks ride on a batch transaction open at the time
    (``Carrier``), else are coalesced (one ``UPDATE`` and one commit at a time, for every row
    published meanwhile and over ``mark_linger_s``, instead of one per batch); a mark that is
    lost (a crash, Postgres down) only means a republish after ``grace_s``, which JetStream's
    de-duplication drops. ``submit`` waits while ``max_inflight`` batches' worth of rows is
    queued or out, so a slow NATS slows intake instead of growing memory."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        metrics: LedgerMetrics,
        *,
        interval_s: float = 1.0,
        grace_s: float = 5.0,
        max_inflight: int = 8,
        nc: NatsClient | None = None,
        max_publishing: int = 1,
        max_rows_per_publish: int = 4 * ATOMIC_BATCH_MAX,
        mark_linger_s: float = MARK_LINGER_S,
    ) -> None:
        self._pool = pool
        self._js = js
        self._pipeline = _AckPipeline(nc) if nc is not None else None
        self._metrics = metrics
        self._interval_s = interval_s
        self._grace_s = grace_s
        self._max_rows = max_inflight * ATOMIC_BATCH_MAX
        self._max_publishing = max(1, max_publishing)
        self._rows_per_publish = max(1, max_rows_per_publish)
        self._queue: list[OutboxRow] = []
        self._held = 0  # rows queued or being published
        self._room = asyncio.Event()
        self._publishing = 0  # publishes out
        self._tasks: set[asyncio.Task[None]] = set()
        self._to_mark: list[int] = []
        self._marking = False
        self.mark_linger_s = mark_linger_s
        """See ``MARK_LINGER_S``."""
        self.publishes = 0
        """Publishes of submitted rows so far (each one atomic batch or pipelined set)."""
        self.marks = 0
        """``published_at`` updates of submitted rows so far, in transactions of their own."""
        self.marks_taken = 0
        """Sets of published rows batch transactions took to mark (``Carrier.take``)."""
        self._carriers = 0  # batch transactions open that can still take marks

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

    def _count_published(self, rows: Sequence[OutboxRow]) -> None:
        statuses: Counter[str] = Counter()
        campaigns: Counter[tuple[str, str]] = Counter()
        for row in rows:
            status = row.subject.partition(".")[2]
            statuses[status] += 1
            campaign = _campaign_of(row.payload)
            if campaign:
                campaigns[campaign, status] += 1
        for status, count in statuses.items():
            self._metrics.status_published.labels(status).inc(count)
        for (campaign, status), count in campaigns.items():
            self._metrics.campaign_status.labels(campaign, status).inc(count)

    async def _publish(self, rows: Sequence[OutboxRow]) -> list[int]:
        """Publish ``rows``; return the ids JetStream acknowledged."""
        if self._pipeline is not None:
            if not rows:
                return []
            stored = await self._pipeline.publish(rows, timeout_s=5.0)
            done = [row for row, ok in zip(rows, stored, strict=True) if ok]
            if len(done) < len(rows):
                log.warning("status publish failed", count=len(rows) - len(done))
            self._count_published(done)
            return [row.id for row in done]
        sem = asyncio.Semaphore(_CONCURRENCY)

        async def one(row: OutboxRow) -> int | None:
            async with sem:
                return row.id if await self._publish_one(row) else None

        results = await asyncio.gather(*(one(r) for r in rows))
        return [i for i in results if i is not None]

    async def _mark(self, ids: list[int]) -> None:
        try:
            await self._pool.execute(
                "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", ids
            )
        except Exception as exc:  # republished later; JetStream de-duplicates
            log.warning("outbox mark failed", error=str(exc), count=len(ids))

    @property
    def marks_waiting(self) -> int:
        """Published rows not marked yet (nor taken by a batch transaction)."""
        return len(self._to_mark)

    def carrier(self) -> Carrier:
        """A batch transaction about to start that can carry marks (``Carrier``)."""
        self._carriers += 1
        return Carrier(self)

    def _take(self) -> list[int]:
        ids, self._to_mark = self._to_mark, []
        if ids:
            self.marks_taken += 1
        return ids

    def _carrier_done(self) -> None:
        self._carriers -= 1
        self._start_marking()

    def _give_back(self, ids: Sequence[int]) -> None:
        self._to_mark += ids
        self._start_marking()

    def _start_marking(self) -> None:
        """Mark what is waiting unless a batch transaction that can still carry it is open
        (the last one to finish starts this again), or a mark runs (it takes them next)."""
        if self._marking or not self._to_mark or self._carriers > 0:
            return
        self._marking = True
        task = asyncio.create_task(self._mark_loop(), name="ledger:outbox-mark")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mark_loop(self) -> None:
        try:
            while self._to_mark and self._carriers == 0:
                if self.mark_linger_s > 0:
                    await asyncio.sleep(self.mark_linger_s)
                ids, self._to_mark = self._to_mark, []
                if ids:
                    self.marks += 1
                    await self._mark(ids)
        finally:
            self._marking = False
        self._start_marking()  # given back meanwhile, with no carrier left

    async def submit(self, rows: Sequence[OutboxRow]) -> None:
        """Publish committed rows in the background (with what else is waiting); waits
        while too many rows are queued or out."""
        if not rows:
            return
        while self._held >= self._max_rows:
            self._room.clear()
            await self._room.wait()
        self._queue.extend(rows)
        self._held += len(rows)
        self._start_publishes()

    def _start_publishes(self) -> None:
        while self._queue and self._publishing < self._max_publishing:
            rows = self._queue[: self._rows_per_publish]
            del self._queue[: self._rows_per_publish]
            self._publishing += 1
            task = asyncio.create_task(self._publish_queued(rows), name="ledger:outbox-publish")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _publish_queued(self, rows: list[OutboxRow]) -> None:
        """Publish ``rows``, let the next publish start, then leave what is published to be
        marked (by a batch transaction, else by ``_mark_loop``)."""
        done: list[int] = []
        try:
            self.publishes += 1
            done = await self._publish(rows)
        except Exception as exc:  # the background loop republishes them
            log.warning("outbox publish failed", error=repr(exc), count=len(rows))
        finally:
            self._publishing -= 1
            self._held -= len(rows)
            self._room.set()
            self._start_publishes()
        if done:
            self._to_mark += done
            self._start_marking()

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for the publishes and marks in flight (on shutdown)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._tasks:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            await asyncio.wait(set(self._tasks), timeout=left)

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
