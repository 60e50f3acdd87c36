"""Which submitted messages still lack a final Postal status (KV bucket ``postal-pending``).

postal-sender owns this bucket (docs/adr/0005-postal-reconciler.md):

* after Postal accepts a message the sender *creates* ``pending[mailgate_id]`` (non-final);
* the durable consumer ``postal-sender-final`` on ``postal.>`` *puts* a final marker when
  MessageSent / MessageDeliveryFailed / MessageBounced / MessageHeld arrives;
* the reconciler looks up non-final records older than ``RECONCILE_AFTER_S`` in Postal.

A webhook may be consumed before the sender writes its record: ``create`` then finds the
final marker and leaves it alone, so both orders end final. Final markers are purged by the
reconciler once older than ``final_keep_s``; every entry expires with the bucket TTL.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from mailgate_core.nats import Ack, Nak, Outcome, Term, backoff_delay, delivery_count
from mailgate_core.schemas import PostalEvent, SchemaError, decode
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType

from .metrics import Metrics

log = structlog.get_logger()

KV_PENDING = "postal-pending"
PENDING_TTL_S = 7 * 24 * 3600.0
KV_LOCKS = "postal-sender-locks"
FINAL_DURABLE = "postal-sender-final"

#: Postal webhooks after which nothing more is expected for a message.
FINAL_EVENTS = frozenset({"MessageSent", "MessageDeliveryFailed", "MessageBounced", "MessageHeld"})

#: NATS errors that mean "try again later".
NATS_TRANSIENT = (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError)


class PendingRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One submission awaiting its final status, or (``final``) a marker that it has one."""

    mailgate_id: str
    postal_id: int = 0
    token: str = ""
    recipient: str = ""
    account_id: str = ""
    campaign_id: str | None = None
    api_key_ref: str | None = None
    """Account whose Postal API key sent it (``None``: the default key); never the key."""
    submitted_at: float = 0.0
    final: bool = False
    final_event: str | None = None
    final_at: float = 0.0


_decoder = msgspec.json.Decoder(PendingRecord)
_encoder = msgspec.json.Encoder()


def encode_record(record: PendingRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes | None) -> PendingRecord | None:
    if not data:
        return None
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


async def ensure_bucket(js: JetStreamContext, name: str, ttl_s: float, replicas: int = 1) -> Any:
    """This service's own KV bucket, created on first use (file storage, one revision)."""
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        try:
            return await js.create_key_value(
                KeyValueConfig(
                    bucket=name, history=1, ttl=ttl_s, storage=StorageType.FILE, replicas=replicas
                )
            )
        except nats.js.errors.BadRequestError:
            return await js.key_value(name)  # another replica created it first


async def create_pending(kv: Any, key: str, record: PendingRecord) -> bool:
    """Create the non-final record unless the key exists (a final marker won the race)."""
    try:
        await kv.create(key, encode_record(record))
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    return True


async def mark_final(kv: Any, key: str, mailgate_id: str, event: str) -> None:
    marker = PendingRecord(
        mailgate_id=mailgate_id, final=True, final_event=event, final_at=time.time()
    )
    await kv.put(key, encode_record(marker))


class FinalMarker:
    """Handler of ``postal-sender-final``: final postal.* events close pending records."""

    def __init__(self, pending: Any, metrics: Metrics, key_for: Any):
        self._pending = pending
        self._metrics = metrics
        self._key_for = key_for

    async def handle(self, msg: Msg) -> Outcome:
        try:
            event = decode(msg.data, PostalEvent)
        except SchemaError:
            return Term("schema")
        if event.event not in FINAL_EVENTS or not event.mailgate_id:
            return Ack()
        try:
            await mark_final(
                self._pending, self._key_for(event.mailgate_id), event.mailgate_id, event.event
            )
        except NATS_TRANSIENT as exc:
            log.warning("final marker not stored", mailgate_id=event.mailgate_id, error=str(exc))
            return Nak(backoff_delay(delivery_count(msg)))
        self._metrics.finalized.inc()
        return Ack()
