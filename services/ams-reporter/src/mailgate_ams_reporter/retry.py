"""The retry stream: one durable task per (status event, endpoint) that still has to be sent.

The first attempt of every delivery happens on the ``status.>`` consumer. What fails (or is
deferred by the endpoint's breaker or concurrency limit) becomes a ``RetryTask`` on
``webhook.retry.<endpoint>`` in the ``WEBHOOK_RETRY`` stream, published before the status
message is acknowledged. From then on the task alone carries the delivery: JetStream
redelivers it after each ``nak(delay)`` (exponential backoff with jitter) until the endpoint
answers 2xx or the retry deadline passes (then a dead letter). Endpoints that already got the
event have no task, so neither a restart nor another replica ever sends it to them again, and
tasks waiting for a dead endpoint never sit in the ``status.>`` consumer's ack-pending window
(see docs/adr/0005-webhook-retry-stream.md).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import msgspec
import nats.js.errors
from mailgate_core.nats import backoff_delay
from mailgate_core.schemas import StatusEvent
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

RETRY_STREAM = "WEBHOOK_RETRY"
RETRY_SUBJECT_PREFIX = "webhook.retry"
RETRY_FILTER = f"{RETRY_SUBJECT_PREFIX}.>"

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RetryTask(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery of ``status`` to endpoint ``endpoint_id`` still to be made."""

    status: StatusEvent
    endpoint_id: str
    attempts: int = 0
    """HTTP attempts made before the task was queued (0 when deferred without one)."""
    reason: str = ""
    """Why the first try did not deliver (``http 503``, ``timeout``, ``circuit open``...)."""
    http_status: int | None = None
    queued_at: float = 0.0


_task_decoder = msgspec.json.Decoder(RetryTask)
_encoder = msgspec.json.Encoder()


def encode_task(task: RetryTask) -> bytes:
    return _encoder.encode(task)


def decode_task(data: bytes) -> RetryTask:
    return _task_decoder.decode(data)


def subject_token(endpoint_id: str) -> str:
    """``endpoint_id`` as one NATS subject token (hashed when it has other characters)."""
    if _TOKEN.fullmatch(endpoint_id):
        return endpoint_id
    return "h" + hashlib.sha256(endpoint_id.encode()).hexdigest()[:32]


def retry_subject(endpoint_id: str) -> str:
    return f"{RETRY_SUBJECT_PREFIX}.{subject_token(endpoint_id)}"


def retry_msg_id(event_id: str, endpoint_id: str, stream_seq: int) -> str:
    """``Nats-Msg-Id`` of a task: a status message redelivered after a crash queues the same
    task again and JetStream drops the copy; a replay (a new status message) gets its own."""
    return f"retry-{event_id}-{subject_token(endpoint_id)}-{stream_seq}"


async def provision_retry_stream(
    js: JetStreamContext, *, max_age_s: float, replicas: int = 1
) -> None:
    """Create (or update) the ``WEBHOOK_RETRY`` stream. Idempotent, safe from every replica."""
    config = StreamConfig(
        name=RETRY_STREAM,
        subjects=[RETRY_FILTER],
        storage=StorageType.FILE,
        max_age=max_age_s,
        discard=DiscardPolicy.NEW,
        duplicate_window=20 * 60.0,
        num_replicas=replicas,
    )
    try:
        await js.stream_info(RETRY_STREAM)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config)
            return
        except nats.js.errors.BadRequestError:
            pass  # another replica created it first
    await js.update_stream(config)


@dataclass(frozen=True)
class RetryPolicy:
    deadline_s: float
    base_s: float
    max_delay_s: float

    def remaining_s(self, event: StatusEvent, now: float) -> float:
        """Time left before ``event`` is dead-lettered (its retry window starts at
        ``occurred_at``; a replay from the dead letters gets a fresh one)."""
        return event.occurred_at + self.deadline_s - now

    def delay_s(self, attempt: int, remaining_s: float, *, at_least_s: float = 0.0) -> float:
        """Backoff (full jitter over the upper half) before the ``attempt``+1-th try, never
        far past the retry deadline; ``at_least_s`` honours an endpoint's Retry-After."""
        delay = max(backoff_delay(attempt, base_s=self.base_s, cap_s=self.max_delay_s), at_least_s)
        return float(max(min(delay, remaining_s), min(self.base_s, delay)))
