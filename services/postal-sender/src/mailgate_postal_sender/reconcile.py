"""The reconciler: delivery facts from Postal's messages API when webhooks never came.

Postal drops a webhook after six attempts in about 36 minutes, so an outage of
webhook-ingest longer than that would lose delivery statuses. The leader replica
(leader.py) keeps a copy of ``postal-pending`` (pending.py; read once when it starts leading,
then followed with a KV watch, so a pass reads only what changed), asks Postal about each
non-final submission older than ``RECONCILE_AFTER_S`` (``messages/message`` with the status
and details expansions, then ``messages/deliveries``) and publishes what it learns as the
``postal.*`` events webhook-ingest would have published (docs/adr/0005-postal-reconciler.md).

Event ids are ``rec-<mailgate_id>-<Postal status>``: reconciling twice publishes nothing new
(JetStream de-duplication, then the ledger's idempotency), and the ``rec-`` prefix tells
these facts from Postal's own webhooks (whose ids are Postal's uuids). Only final statuses
are published; a message still Pending or SoftFail is looked at again on the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from mailgate_core.nats import PublishError, publish_event
from mailgate_core.schemas import PostalEvent
from nats.js import JetStreamContext

from .client import Answered, CallResult, NoAnswer, PostalClient
from .leader import LeaderLock
from .metrics import Metrics
from .pending import NATS_TRANSIENT, PendingRecord, decode_record, mark_final
from .sender import ApiKeys, TransientError

log = structlog.get_logger()

#: Message statuses after which Postal does nothing more with the message (specs §4).
FINAL_STATUSES = frozenset({"Sent", "HardFail", "Held", "Bounced", "HoldCancelled"})
#: Delivery status -> the webhook Postal sends for it (§6); other statuses send none.
STATUS_EVENTS = {
    "Sent": "MessageSent",
    "HardFail": "MessageDeliveryFailed",
    "Held": "MessageHeld",
    "Bounced": "MessageBounced",
}
EXPANSIONS = ["status", "details"]

_decoder = msgspec.json.Decoder()


# --- pure: Postal's answers -> facts --------------------------------------------------------


@dataclass(frozen=True)
class Found:
    data: Any


@dataclass(frozen=True)
class NotFound:
    pass


@dataclass(frozen=True)
class Unavailable:
    code: str
    detail: str = ""


Lookup = Found | NotFound | Unavailable


def read_answer(result: CallResult) -> Lookup:
    """A messages/* call's outcome: the ``data``, MessageNotFound, or try again later."""
    if isinstance(result, NoAnswer):
        code = "Timeout" if isinstance(result.error, TimeoutError) else "ConnectionError"
        return Unavailable(code, str(result.error))
    if not isinstance(result, Answered):
        return Unavailable("CircuitOpen")
    if result.status != 200:
        return Unavailable(f"HTTP{result.status}")
    try:
        document = _decoder.decode(result.body)
    except msgspec.DecodeError:
        return Unavailable("BadResponse", "not JSON")
    if not isinstance(document, dict):
        return Unavailable("BadResponse", "not an object")
    data = document.get("data")
    if document.get("status") == "success":
        return Found(data)
    error_code = data.get("code") if isinstance(data, dict) else None
    if error_code == "MessageNotFound":
        return NotFound()
    message = data.get("message") if isinstance(data, dict) else None
    label = error_code or document.get("status") or "BadResponse"
    return Unavailable(str(label), str(message or ""))


def is_same_message(record: PendingRecord, data: dict[str, Any]) -> bool:
    """Postal ids are per server: check the answer is about our message (token or Message-ID)."""
    token = data.get("token")
    if isinstance(token, str) and record.token:
        return token == record.token
    details = data.get("details")
    message_id = details.get("message_id") if isinstance(details, dict) else None
    if isinstance(message_id, str):
        local = message_id.strip("<>").rpartition("@")[0]
        return local.upper() == record.mailgate_id.upper()
    return False


def message_status(data: dict[str, Any]) -> str | None:
    status = data.get("status")
    value = status.get("status") if isinstance(status, dict) else None
    return value if isinstance(value, str) else None


def _m_hash(record: PendingRecord, data: dict[str, Any]) -> dict[str, Any]:
    """Postal's webhook ``M`` shape, rebuilt from the details expansion."""
    details = data.get("details")
    details = details if isinstance(details, dict) else {}
    subject = details.get("subject")
    return {
        "id": record.postal_id,
        "token": record.token,
        "direction": details.get("direction", "outgoing"),
        "message_id": details.get("message_id"),
        "to": details.get("rcpt_to") or record.recipient,
        "from": details.get("mail_from"),
        "subject": subject[:200] if isinstance(subject, str) else subject,
        "timestamp": details.get("timestamp"),
        "spam_status": "NotChecked",
        "tag": details.get("tag"),
    }


def _number(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def facts_from_postal(
    record: PendingRecord, data: dict[str, Any], deliveries: list[Any], *, now: float
) -> list[PostalEvent] | None:
    """The final facts Postal knows about ``record``; ``None`` while it is not final."""
    status = message_status(data)
    if status not in FINAL_STATUSES:
        return None
    latest: dict[str, dict[str, Any]] = {}
    for delivery in deliveries:
        if isinstance(delivery, dict) and delivery.get("status") in STATUS_EVENTS:
            latest[str(delivery["status"])] = delivery
    if not latest and status in STATUS_EVENTS:
        # No delivery rows (Postal purged them): the status expansion is all we have.
        summary = data.get("status")
        if not isinstance(summary, dict):
            summary = {}
        latest[status] = {
            "status": status,
            "timestamp": summary.get("last_delivery_attempt"),
            "details": "",
            "output": "",
        }
    m_hash = _m_hash(record, data)
    events: list[PostalEvent] = []
    for delivery_status, delivery in latest.items():
        name = STATUS_EVENTS[delivery_status]
        timestamp = _number(delivery.get("timestamp"), now)
        payload: dict[str, Any]
        if name == "MessageBounced":
            payload = {"original_message": m_hash, "bounce": None}
        else:
            payload = {
                "message": m_hash,
                "status": delivery_status,
                "details": delivery.get("details") or "",
                "output": (delivery.get("output") or "")[:512],
                "sent_with_ssl": delivery.get("sent_with_ssl"),
                "timestamp": timestamp,
                "time": delivery.get("time"),
            }
        payload["reconciled"] = True
        events.append(
            PostalEvent(
                event_id=f"rec-{record.mailgate_id}-{delivery_status}",
                occurred_at=now,
                event=name,
                postal_timestamp=timestamp,
                mailgate_id=record.mailgate_id,
                postal_id=record.postal_id,
                postal_token=record.token,
                status=delivery_status,
                output=_text(delivery.get("output")) if name != "MessageBounced" else None,
                details=_text(delivery.get("details")),
                recipient=m_hash["to"],
                tag=_text(m_hash["tag"]),
                payload=payload,
            )
        )
    events.sort(key=lambda e: e.postal_timestamp)
    return events


# --- I/O: the leader's periodic pass ----------------------------------------------------------


@dataclass
class PassResult:
    pending: int = 0
    due: int = 0
    checked: int = 0
    recovered: int = 0
    purged: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


@dataclass
class Reconciler:
    js: JetStreamContext
    client: PostalClient
    pending: Any
    api_keys: ApiKeys
    lock: LeaderLock
    metrics: Metrics
    reconcile_after_s: float = 3600.0
    interval_s: float = 300.0
    batch: int = 1000
    concurrency: int = 4
    final_keep_s: float = 3600.0
    index_stall_s: float = 10.0
    """A pass gives up when the leader's copy of ``postal-pending`` lags and gets no entry
    for this long (the next pass reads the bucket afresh)."""
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)
    _index: dict[str, PendingRecord] = field(default_factory=dict, init=False)
    """The leader's copy of ``postal-pending`` (``_follow``); empty on followers."""
    _follower: asyncio.Task[None] | None = field(default=None, init=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _changed: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _seen_seq: int = field(default=0, init=False)

    async def start(self) -> None:
        self._stopping.clear()
        self._tasks = [
            asyncio.create_task(self.lock.run(self._stopping), name="reconciler-lock"),
            asyncio.create_task(self._run(), name="reconciler"),
        ]

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop_following()
        self.metrics.leader.set(0)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            self.metrics.leader.set(1 if self.lock.is_leader else 0)
            if self.lock.is_leader:
                try:
                    await self.run_pass()
                except Exception:
                    log.exception("reconcile pass failed")
                    await self._stop_following()  # the next pass reads the bucket afresh
            else:
                await self._stop_following()  # a new leadership starts from a full read
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._next_wait_s())

    def _next_wait_s(self) -> float:
        # A follower looks again soon after the lock may have changed hands.
        return self.interval_s if self.lock.is_leader else min(self.interval_s, self.lock.ttl_s)

    async def _follow(self) -> None:
        """Keep ``_index`` equal to the bucket: one full read, then every change as it comes.

        A pass then reads nothing but the changes since the last one (and the stream's last
        sequence, to know it has them all), instead of every key of the last hour: final
        markers stay ``final_keep_s`` and would otherwise be read again on every pass.
        """
        watcher = await self.pending.watchall()
        try:
            while True:
                entry = await watcher.updates(timeout=None)
                if entry is None:
                    self._ready.set()
                    self._changed.set()
                    continue
                self._seen_seq = max(self._seen_seq, entry.revision)
                record = None if entry.operation else decode_record(entry.value)
                if record is None:
                    self._index.pop(entry.key, None)
                else:
                    self._index[entry.key] = record
                self._changed.set()
        finally:
            self._index.clear()
            self._ready.clear()
            self._seen_seq = 0
            self._changed.set()
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _stop_following(self) -> None:
        task, self._follower = self._follower, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _synced_index(self) -> dict[str, PendingRecord]:
        """The index, up to date with the bucket as of now (a new leader reads it once)."""
        if self._follower is None or self._follower.done():
            await self._stop_following()
            self._follower = asyncio.create_task(self._follow(), name="reconciler-index")
        state = None
        while True:
            self._changed.clear()
            if self._ready.is_set():
                if state is None:
                    state = (await self.pending.status()).stream_info.state
                if not state.messages or self._seen_seq >= state.last_seq:
                    break
            if self._follower.done():
                self._follower.result()  # raises what stopped it
                raise RuntimeError("postal-pending follower ended")
            try:
                # A large bucket takes a while to read: only a stall is an error.
                await asyncio.wait_for(self._changed.wait(), timeout=self.index_stall_s)
            except TimeoutError:
                await self._stop_following()  # the next pass reads the bucket afresh
                raise TimeoutError("postal-pending index not in sync") from None
        return self._index

    async def _scan(self, now: float) -> tuple[list[tuple[str, PendingRecord]], list[str], int]:
        """What the index says is due, and the final markers old enough to purge."""
        due: list[tuple[str, PendingRecord]] = []
        stale_markers: list[str] = []
        pending = 0
        for key, record in list((await self._synced_index()).items()):
            if record.final:
                if now - record.final_at > self.final_keep_s:
                    stale_markers.append(key)
                continue
            pending += 1
            if now - record.submitted_at >= self.reconcile_after_s and len(due) < self.batch:
                due.append((key, record))
        return due, stale_markers, pending

    async def run_pass(self) -> PassResult:
        """One pass over ``postal-pending``: look up what is due, publish what is final."""
        now = time.time()
        due, stale, pending = await self._scan(now)
        result = PassResult(pending=pending, due=len(due))
        self.metrics.pending.set(pending)
        for key in stale:
            with contextlib.suppress(*NATS_TRANSIENT):
                await self.pending.purge(key)
                result.purged += 1
        slots = asyncio.Semaphore(max(1, self.concurrency))

        async def one(key: str, record: PendingRecord) -> None:
            async with slots:
                if self._stopping.is_set() or not self.lock.is_leader:
                    return
                outcome, published = await self._check(key, record)
            result.checked += 1
            result.recovered += published
            result.outcomes[outcome] = result.outcomes.get(outcome, 0) + 1
            self.metrics.checks.labels(outcome).inc()

        await asyncio.gather(*(one(k, r) for k, r in due))
        if result.due or result.purged:
            log.info(
                "reconcile pass finished",
                pending=result.pending,
                checked=result.checked,
                recovered=result.recovered,
                purged=result.purged,
                outcomes=result.outcomes,
            )
        return result

    async def _check(self, key: str, record: PendingRecord) -> tuple[str, int]:
        """Look one message up; return (outcome, events published)."""
        blog = log.bind(mailgate_id=record.mailgate_id, postal_id=record.postal_id)
        try:
            api_key = await self.api_keys.for_account(record.api_key_ref)
        except TransientError as exc:
            blog.warning("reconcile skipped: no api key", code=exc.code)
            return "error", 0
        params = {"id": record.postal_id, "_expansions": EXPANSIONS}
        found = read_answer((await self.client.call("messages/message", api_key, params))[0])
        if isinstance(found, NotFound) or (
            isinstance(found, Found)
            and not (isinstance(found.data, dict) and is_same_message(record, found.data))
        ):
            # Retention purged it, or the id belongs to another message: nothing to learn.
            blog.warning("message unknown to postal; giving up on it")
            await self._finalize(key, record, "NotFound")
            return "not_found", 0
        if isinstance(found, Unavailable):
            self.metrics.errors.labels(found.code).inc()
            return "error", 0
        assert isinstance(found.data, dict)
        if message_status(found.data) not in FINAL_STATUSES:
            return "pending", 0
        answer = await self.client.call("messages/deliveries", api_key, {"id": record.postal_id})
        rows = read_answer(answer[0])
        if isinstance(rows, Unavailable):
            self.metrics.errors.labels(rows.code).inc()
            return "error", 0
        deliveries = rows.data if isinstance(rows, Found) and isinstance(rows.data, list) else []
        facts = facts_from_postal(record, found.data, deliveries, now=time.time()) or []
        for event in facts:
            try:
                await publish_event(self.js, event)
            except PublishError as exc:
                blog.warning("reconciled event not published", error=str(exc))
                return "error", 0
            self.metrics.recovered.labels(event.event).inc()
            blog.info("delivery fact recovered from postal", postal_event=event.event)
        await self._finalize(key, record, facts[-1].event if facts else "Final")
        return "final", len(facts)

    async def _finalize(self, key: str, record: PendingRecord, event: str) -> None:
        with contextlib.suppress(*NATS_TRANSIENT):
            await mark_final(self.pending, key, record.mailgate_id, event)
