"""The ``mail.accepted`` handler: one Postal send/raw per recipient, at most once when we can.

Order of durable steps (so a crash anywhere repeats no Postal call we know about):

1. ``submissions[mailgate_id]`` exists -> Postal already took the message: re-publish
   ``mail.submitted`` from the record and ack (no second send).
2. Call Postal. On success, put the record FIRST, then publish ``mail.submitted`` (its
   event_id is ``sub-<mailgate_id>`` so a re-publish is dropped by JetStream), then ack.
3. A permanent refusal publishes ``mail.failed`` (``rejected``); a transient failure naks
   with backoff until ``RETRY_DEADLINE_S`` after acceptance, then ``retries_exhausted``.

After the record, ``postal-pending[mailgate_id]`` is created for the reconciler (pending.py);
a redelivery creates it too when the crash came between the two writes.

The one window left is a reply lost after Postal created the message (timeout once the
request was sent): Postal has no idempotency key, so the retry may duplicate the mail. Those
retries are counted in ``mailgate_postal_ambiguous_retries_total``.

Fault injection (tests only): ``crash_after_submit=N`` (``MAILGATE_TEST_CRASH_AFTER_SUBMIT``)
makes the process ``os._exit(137)`` right after the N-th submission record is stored, before
``mail.submitted`` is published and the message acked: the window a kill -9 can hit.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from mailgate_core.nats import Ack, Nak, Outcome, PublishError, Term, backoff_delay, delivery_count
from mailgate_core.nats import publish_event as _publish_event
from mailgate_core.nats_wire import JetStreamRequests
from mailgate_core.records import AccountRecord
from mailgate_core.schemas import MailAccepted, MailFailed, MailSubmitted, SchemaError, decode
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from .classify import Rejected, Retry, Submitted
from .client import PostalClient
from .metrics import Metrics
from .pending import PendingRecord, create_pending

log = structlog.get_logger()

_KV_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
#: NATS errors that mean "try again later" while reading KV or the object store.
_NATS_TRANSIENT = (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError)
#: Exit status of the fault-injection crash (what a SIGKILL'd process reports).
CRASH_EXIT_STATUS = 137


class SubmissionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What Postal returned for one mailgate_id (bucket ``submissions``, key = mailgate_id)."""

    postal_id: int
    token: str
    message_id: str | None = None
    submitted_at: float = 0.0
    attempts: int = 1


_record_decoder = msgspec.json.Decoder(SubmissionRecord)
_account_decoder = msgspec.json.Decoder(AccountRecord)
_encoder = msgspec.json.Encoder()


def submission_key(mailgate_id: str) -> str:
    if _KV_KEY.match(mailgate_id):
        return mailgate_id
    return hashlib.sha256(mailgate_id.encode()).hexdigest()


class MessageLog:
    """The message's bound logger (``log.bind(mailgate_id=..., ...)``), made on first use:
    most messages log nothing, and a bind per message was a few percent of the CPU."""

    __slots__ = ("_bound", "_context")

    def __init__(
        self, mailgate_id: str, account_id: str, campaign_id: str | None, attempt: int
    ) -> None:
        self._context = (mailgate_id, account_id, campaign_id, attempt)
        self._bound: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._bound is None:
            mailgate_id, account_id, campaign_id, attempt = self._context
            self._bound = log.bind(
                mailgate_id=mailgate_id,
                account_id=account_id,
                campaign_id=campaign_id,
                attempt=attempt,
            )
        return getattr(self._bound, name)


def _delivery_count(msg: Msg) -> int:
    """``delivery_count(msg)`` read straight from the usual ack subject
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``; other forms
    (with a domain and account hash) go through nats-py's parser."""
    reply = msg.reply
    if reply:
        tokens = reply.split(".")
        if len(tokens) == 9 and tokens[0] == "$JS" and tokens[4].isdigit():
            return int(tokens[4])
    return delivery_count(msg)


class TransientError(Exception):
    """Try again later (NATS trouble, an account record not there yet)."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


class PermanentError(Exception):
    """Retrying cannot help (the message body is gone)."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def store_record_retry() -> AsyncRetrying:
    """Storing the record after Postal said yes: a failure here risks a duplicate send, so
    try a few times in-process before leaving it to redelivery."""
    return AsyncRetrying(
        stop=stop_after_attempt(4),
        wait=wait_exponential(multiplier=0.2, max=2.0),
        retry=retry_if_exception_type(_NATS_TRANSIENT),
        reraise=True,
    )


class ApiKeys:
    """The Postal API key for a message: its account's own key, else ``POSTAL_API_KEY``.

    A key read from KV is reused for ``cache_s`` seconds (``ACCOUNT_CACHE_S``): one KV round
    trip per account and period instead of one per message. A changed key takes effect
    within that time; a missing or unreadable record is never cached."""

    def __init__(self, accounts: Any, default_api_key: str, *, cache_s: float = 0.0):
        self._accounts = accounts
        self._default = default_api_key
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, str]] = {}

    async def for_account(self, account_id: str | None) -> str:
        if not account_id:
            return self._default
        if self._cache_s > 0:
            hit = self._cache.get(account_id)
            now = time.monotonic()
            if hit is not None and now < hit[0]:
                return hit[1]
            key = await self._read(account_id)
            if len(self._cache) >= 10_000:
                self._cache.clear()
            self._cache[account_id] = (now + self._cache_s, key)
            return key
        return await self._read(account_id)

    async def _read(self, account_id: str) -> str:
        try:
            entry = await self._accounts.get(account_id)
        except nats.js.errors.KeyNotFoundError as exc:
            # The ledger rewrites the bucket on start: the record may be back soon.
            raise TransientError("AccountNotFound", f"account {account_id} not in KV") from exc
        except _NATS_TRANSIENT as exc:
            raise TransientError("NatsError", f"accounts lookup: {exc}") from exc
        try:
            account = _account_decoder.decode(entry.value or b"")
        except msgspec.DecodeError as exc:
            raise TransientError("AccountUnreadable", f"account {account_id}: {exc}") from exc
        return account.postal_api_key or self._default


@dataclass
class Sender:
    js: JetStreamContext
    client: PostalClient
    submissions: Any
    pending: Any
    blobs: Any
    api_keys: ApiKeys
    retry_deadline_s: float
    metrics: Metrics
    retry_base_s: float = 1.0
    final_keep_s: float = 3600.0
    """How long final markers are kept (reconciler); a replay older than this skips pending."""
    crash_after_submit: int = 0
    requests: JetStreamRequests | None = None
    """Lean JetStream publishes (mailgate_core.nats_wire); ``None``: nats-py's ``js.publish``."""
    _stored: int = field(default=0, init=False)

    async def _publish(self, event: MailSubmitted | MailFailed) -> int:
        if self.requests is not None:
            return await self.requests.publish_event(event)
        return await _publish_event(self.js, event)

    def _backoff(self, attempt: int) -> float:
        return float(backoff_delay(attempt, base_s=self.retry_base_s))

    async def handle(self, msg: Msg) -> Outcome:
        try:
            event = decode(msg.data, MailAccepted)
        except SchemaError as exc:
            log.error("undecodable mail.accepted dropped", error=str(exc))
            return Term("schema")
        attempt = _delivery_count(msg)
        ref = event.message
        blog: Any = MessageLog(ref.mailgate_id, ref.account_id, ref.campaign_id, attempt)
        key = submission_key(ref.mailgate_id)

        try:
            record = await self._load_record(key)
        except TransientError as exc:
            return await self._retry_later(blog, event, attempt, exc.code, exc.detail)
        if record is not None:
            blog.info("already submitted; re-publishing", postal_id=record.postal_id)
            self.metrics.replayed.inc()
            if time.time() - record.submitted_at < self.final_keep_s:
                try:
                    await self._note_pending(key, event, record)
                except _NATS_TRANSIENT as exc:
                    blog.warning("pending record not stored; will retry", error=str(exc))
                    return Nak(self._backoff(attempt))
            return await self._publish_submitted(blog, event, record, attempt)

        try:
            raw = await self._load_raw(event)
            api_key = await self.api_keys.for_account(event.postal_api_key_ref)
        except PermanentError as exc:
            return await self._fail(blog, event, "rejected", exc.code, exc.detail, attempt)
        except TransientError as exc:
            return await self._retry_later(blog, event, attempt, exc.code, exc.detail)

        result = await self.client.send_raw(
            api_key=api_key, mail_from=event.mail_from, recipient=ref.recipient, raw=raw
        )
        outcome = result.classification
        if outcome.outcome != "deferred":
            self.metrics.request_outcome(outcome.outcome).inc()

        if isinstance(outcome, Submitted):
            record = SubmissionRecord(
                postal_id=outcome.postal_id,
                token=outcome.token,
                message_id=outcome.message_id,
                submitted_at=time.time(),
                attempts=attempt,
            )
            try:
                await self._store_record(key, record)
            except _NATS_TRANSIENT as exc:
                # Postal has the message but we could not note it: redelivery will send again.
                blog.error("submission record not stored", error=str(exc))
                self.metrics.ambiguous.inc()
                return Nak(self._backoff(attempt))
            self.metrics.submitted.inc()
            # One line per message at debug (the ledger records every message's fate);
            # warnings and errors above and below carry the message's ids.
            log.debug(
                "submitted to postal", mailgate_id=ref.mailgate_id, postal_id=record.postal_id
            )
            self._maybe_crash(blog)
            # Both only need the submission record: write them at once (one round trip of
            # waiting instead of two). Either failing naks; the redelivery redoes both from
            # the record without calling Postal (the publish is de-duplicated by event id).
            noting = asyncio.ensure_future(self._note_pending(key, event, record))
            try:
                published = await self._publish_submitted(blog, event, record, attempt)
            except BaseException:
                noting.cancel()  # unexpected: the message is redelivered and redoes both
                raise
            try:
                await noting
            except _NATS_TRANSIENT as exc:
                blog.warning("pending record not stored; will retry", error=str(exc))
                return Nak(self._backoff(attempt))
            return published

        if isinstance(outcome, Rejected):
            self.metrics.errors.labels(outcome.code).inc()
            blog.warning("postal rejected message", code=outcome.code, detail=outcome.detail)
            return await self._fail(blog, event, "rejected", outcome.code, outcome.detail, attempt)

        assert isinstance(outcome, Retry)
        if outcome.outcome != "deferred":
            self.metrics.errors.labels(outcome.code).inc()
        if outcome.outcome == "suspended":
            blog.error("postal server suspended; holding mail", detail=outcome.detail)
        if outcome.ambiguous:
            self.metrics.ambiguous.inc()
            blog.warning("postal reply lost after sending; retry may duplicate", code=outcome.code)
        return await self._retry_later(blog, event, attempt, outcome.code, outcome.detail)

    # --- steps ---------------------------------------------------------------------------

    def _maybe_crash(self, blog: Any) -> None:
        """Fault injection (MAILGATE_TEST_CRASH_AFTER_SUBMIT): die like kill -9 would."""
        if self.crash_after_submit <= 0:
            return
        self._stored += 1
        if self._stored >= self.crash_after_submit:
            blog.critical("fault injection: exiting after the submission record")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(CRASH_EXIT_STATUS)

    async def _store_record(self, key: str, record: SubmissionRecord) -> None:
        """Put the submission record; on a NATS error retry a few times in-process (tenacity
        only then: building its state for every message cost more than the put's encoding)."""
        data = _encoder.encode(record)
        try:
            await self.submissions.put(key, data)
            return
        except _NATS_TRANSIENT as exc:
            log.warning("submission record put failed; retrying", key=key, error=str(exc))
        async for trying in store_record_retry():
            with trying:
                await self.submissions.put(key, data)

    async def _note_pending(self, key: str, event: MailAccepted, record: SubmissionRecord) -> None:
        ref = event.message
        pending = PendingRecord(
            mailgate_id=ref.mailgate_id,
            postal_id=record.postal_id,
            token=record.token,
            recipient=ref.recipient,
            account_id=ref.account_id,
            campaign_id=ref.campaign_id,
            api_key_ref=event.postal_api_key_ref,
            submitted_at=record.submitted_at,
        )
        await create_pending(self.pending, key, pending)

    async def _load_record(self, key: str) -> SubmissionRecord | None:
        try:
            entry = await self.submissions.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except _NATS_TRANSIENT as exc:
            raise TransientError("NatsError", f"submissions lookup: {exc}") from exc
        if not entry.value:
            return None
        try:
            return _record_decoder.decode(entry.value)
        except msgspec.DecodeError:
            log.error("unreadable submission record ignored", key=key)
            return None

    async def _load_raw(self, event: MailAccepted) -> bytes:
        if event.raw is not None:
            return bytes(event.raw)
        if not event.object_name:
            raise PermanentError(
                "MessageBodyMissing", "mail.accepted carries neither raw nor object"
            )
        try:
            result = await self.blobs.get(event.object_name)
        except nats.js.errors.ObjectNotFoundError as exc:
            raise PermanentError(
                "MessageBodyMissing", f"object {event.object_name} not found"
            ) from exc
        except nats.js.errors.ObjectDeletedError as exc:
            raise PermanentError(
                "MessageBodyMissing", f"object {event.object_name} deleted"
            ) from exc
        except _NATS_TRANSIENT as exc:
            raise TransientError("NatsError", f"object store: {exc}") from exc
        data: bytes | None = result.data
        return bytes(data or b"")

    async def _publish_submitted(
        self, blog: Any, event: MailAccepted, record: SubmissionRecord, attempt: int
    ) -> Outcome:
        submitted = MailSubmitted(
            event_id=f"sub-{event.message.mailgate_id}",
            occurred_at=record.submitted_at or time.time(),
            message=event.message,
            postal_id=record.postal_id,
            postal_token=record.token,
            postal_message_id=record.message_id,
            attempts=record.attempts,
        )
        try:
            await self._publish(submitted)
        except PublishError as exc:
            # The record is stored: the redelivery re-publishes without calling Postal.
            blog.warning("mail.submitted not published; will retry", error=str(exc))
            return Nak(self._backoff(attempt))
        return Ack()

    async def _fail(
        self, blog: Any, event: MailAccepted, reason: str, code: str, detail: str, attempt: int
    ) -> Outcome:
        failed = MailFailed(
            event_id=f"fail-{event.message.mailgate_id}",
            message=event.message,
            reason=reason,
            code=code,
            detail=detail[:1000],
            attempts=attempt,
        )
        try:
            await self._publish(failed)
        except PublishError as exc:
            blog.warning("mail.failed not published; will retry", error=str(exc))
            return Nak(self._backoff(attempt))
        self.metrics.failed.labels(reason).inc()
        blog.info("mail failed", reason=reason, code=code)
        return Ack()

    async def _retry_later(
        self, blog: Any, event: MailAccepted, attempt: int, code: str, detail: str
    ) -> Outcome:
        if time.time() - event.occurred_at >= self.retry_deadline_s:
            return await self._fail(blog, event, "retries_exhausted", code, detail, attempt)
        delay = self._backoff(attempt)
        blog.warning(
            "transient failure; retrying", code=code, detail=detail, delay_s=round(delay, 2)
        )
        return Nak(delay)
