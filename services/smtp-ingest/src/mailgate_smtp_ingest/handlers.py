"""aiosmtpd handler hooks: translate SMTP commands into policy decisions and events.

Every accepted RCPT becomes its own message (own mailgate_id, own Message-ID, own event).
The 250 after DATA is sent only when every recipient's event is acknowledged by JetStream;
anything transient answers 451 so the client retries (a retry publishes new ids).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiosmtpd.smtp import TLSSetupException
from mailgate_core.ids import new_ulid
from mailgate_core.nats import OBJECT_STORE_MAIL, PublishError, publish_events
from mailgate_core.records import AccountRecord, CredentialRecord
from mailgate_core.schemas import MailAccepted, MailSkipped, MessageRef
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from . import replies
from .attachments import find_forbidden_attachment, strict_parts
from .auth import Authenticator, Principal
from .directory import Directory
from .metrics import Metrics
from .mime import CONTENT_FIELDS
from .policy import (
    SendLimiter,
    declared_size,
    is_sender_allowed,
    is_valid_address,
    sender_allowlist,
)
from .replies import Rejected, Reply, TransientError
from .rewrite import (
    HeaderField,
    HeaderRules,
    PreparedMessage,
    message_id_for,
    normalize_line_endings,
    prepare,
    render,
    scan_header_block,
)
from .tracking_rewrite import MessagePlan, TrackingLinks, plan_message, render_copy

log = structlog.get_logger()

#: Recipient copies prepared and published at once (each may be a 10 MB rendered copy).
_PARALLEL_COPIES = 8
#: ... and for a message up to _SMALL_MESSAGE_BYTES, whose copies are small.
_SMALL_GROUP = 64
_SMALL_MESSAGE_BYTES = 64 * 1024
#: Messages larger than this are parsed and rendered in a worker thread, not the event loop.
_THREAD_THRESHOLD_BYTES = 256 * 1024


@dataclass(frozen=True)
class IntakeConfig:
    """The settings the hooks need (a slice of app.Settings)."""

    domain: str
    allowed_sender_domains: tuple[str, ...] = ()
    max_message_size: int = 10_485_760
    max_recipients: int = 100
    object_store_threshold: int = 700_000
    publish_timeout_s: float = 5.0
    object_store_timeout_s: float = 30.0
    rules: HeaderRules = field(default_factory=HeaderRules)
    links: TrackingLinks | None = None
    """Tracker URLs and signer; ``None`` (TRACKING_BASE_URL unset): headers-only rewrite."""


@dataclass(frozen=True)
class _Inspected:
    forbidden_extension: str | None
    prepared: PreparedMessage | None
    plan: MessagePlan | None = None


def _content_fields(fields: Sequence[HeaderField]) -> tuple[HeaderField, ...]:
    return tuple(f for f in fields if f.key in CONTENT_FIELDS)


def _inspect(raw: bytes, rules: HeaderRules, links: TrackingLinks | None) -> _Inspected:
    """CPU-bound parsing, run in a thread for large messages. The MIME tree is walked once:
    the attachment check's walk is reused by the body plan (``lenient_parts``)."""
    raw = normalize_line_endings(raw)
    header = scan_header_block(raw, 0, len(raw))
    parts = strict_parts(raw, header)
    extension = find_forbidden_attachment(raw, parts)
    if extension is not None:
        return _Inspected(extension, None)
    prepared = prepare(raw, rules, header)
    if links is None:
        return _Inspected(None, prepared, None)
    if parts and _content_fields(parts[0].fields) != _content_fields(prepared.fields):
        parts = None  # a rule stripped a Content-* field: the plan reads what is left
    return _Inspected(None, prepared, plan_message(prepared, links, parts=parts))


class IngestHandler:
    def __init__(
        self,
        config: IntakeConfig,
        *,
        js: JetStreamContext,
        directory: Directory,
        authenticator: Authenticator,
        metrics: Metrics,
    ):
        self.config = config
        self._js = js
        self._directory = directory
        self._auth = authenticator
        self._metrics = metrics
        self._limiters: dict[str, tuple[tuple[float | None, int | None], SendLimiter]] = {}
        self._blobs: ObjectStore | None = None

    # --- AUTH ---------------------------------------------------------------------------

    def auth_blocked(self, client_ip: str | None) -> bool:
        return self._auth.is_blocked(client_ip)

    async def authenticate(
        self, username: str, password: str, client_ip: str | None
    ) -> Principal | None:
        principal = await self._auth.authenticate(username, password, client_ip)
        if principal is None:
            log.info("auth failed", username=username, client_ip=client_ip)
        return principal

    # --- envelope -----------------------------------------------------------------------

    async def _account(self, session: Any) -> tuple[Principal, AccountRecord]:
        principal = session.auth_data
        if not isinstance(principal, Principal):
            raise Rejected(replies.MUST_AUTHENTICATE)
        account = await self._directory.account(principal.account_id)
        if account is None or account.disabled:
            raise Rejected(replies.MUST_AUTHENTICATE)
        return principal, account

    def _allowed_senders(self, account: AccountRecord) -> tuple[str, ...]:
        return sender_allowlist(account.allowed_sender_domains, self.config.allowed_sender_domains)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        try:
            _, account = await self._account(session)
            size = declared_size(mail_options)
            if size is not None and size > self.config.max_message_size:
                raise Rejected(replies.TOO_BIG)
            if not is_sender_allowed(address, self._allowed_senders(account)):
                raise Rejected(replies.disallowed_sender(address))
        except Exception as exc:
            return self._refusal(exc)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(replies.SENDER_OK)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        try:
            if not is_valid_address(address):
                raise Rejected(replies.invalid_recipient(address))
            if any(r.lower() == address.lower() for r in envelope.rcpt_tos):
                return str(replies.RECIPIENT_OK)  # one copy per distinct recipient
            if len(envelope.rcpt_tos) >= self.config.max_recipients:
                raise Rejected(replies.TOO_MANY_RECIPIENTS)
            await self._take_send_slot(session)
        except Exception as exc:
            return self._refusal(exc)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RECIPIENT_OK)

    async def _take_send_slot(self, session: Any) -> None:
        principal = session.auth_data
        credential = await self._directory.credential(principal.username)
        if credential is None or credential.disabled:
            raise Rejected(replies.MUST_AUTHENTICATE)
        refused = self._limiter(credential).try_acquire(time.time())
        if refused == "rate":
            raise Rejected(replies.RATE_LIMITED)
        if refused == "daily":
            raise Rejected(replies.DAILY_LIMIT)

    def _limiter(self, credential: CredentialRecord) -> SendLimiter:
        params = (credential.rate_per_second, credential.daily_limit)
        known = self._limiters.get(credential.username)
        if known is None or known[0] != params:
            known = (params, SendLimiter(*params))
            self._limiters[credential.username] = known
        return known[1]

    # --- DATA ---------------------------------------------------------------------------

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        started = time.monotonic()
        bound = log.bind(client_ip=getattr(server, "client_ip", None))
        try:
            first_id = await self._accept(session, envelope, bound)
        except Exception as exc:
            return self._refusal(exc, bound)
        self._metrics.data_to_ack.observe(time.monotonic() - started)
        return str(replies.queued(first_id))

    async def _accept(self, session: Any, envelope: Any, bound: Any) -> str:
        principal, account = await self._account(session)
        raw: bytes = envelope.content
        config = self.config
        if len(raw) > _THREAD_THRESHOLD_BYTES:
            inspected = await asyncio.to_thread(_inspect, raw, config.rules, config.links)
        else:
            inspected = _inspect(raw, config.rules, config.links)
        if inspected.forbidden_extension is not None:
            raise Rejected(replies.forbidden_attachment(inspected.forbidden_extension))
        prepared = inspected.prepared
        assert prepared is not None
        allowed = self._allowed_senders(account)
        for sender in prepared.from_addresses:
            if not is_sender_allowed(sender, allowed):
                raise Rejected(replies.disallowed_sender(sender))
        if inspected.plan is not None and inspected.plan.fell_back:
            self._metrics.rewrite_fallbacks.inc()
            bound.warning("body rewrite fell back to headers only", size=len(raw))
        ids = [new_ulid() for _ in envelope.rcpt_tos]
        bound = bound.bind(
            account_id=account.id,
            credential=principal.username,
            campaign_id=prepared.campaign_id,
            external_id=prepared.external_id,
        )
        # Copies are made a group at a time and each group's events are published together
        # (one wait for all of their acks); the 250 goes out only when every group is acked.
        group = _PARALLEL_COPIES if len(raw) > _SMALL_MESSAGE_BYTES else _SMALL_GROUP
        pairs = list(zip(ids, envelope.rcpt_tos, strict=True))
        for start in range(0, len(pairs), group):
            chunk = pairs[start : start + group]
            outcomes: list[MailAccepted | MailSkipped | BaseException]
            if len(chunk) == 1:  # the common case: no task (and no loop turn) for one copy
                mid, rcpt = chunk[0]
                outcomes = [
                    await self._event_for(
                        mid, rcpt, envelope, principal, account, inspected, session
                    )
                ]
            else:
                outcomes = await asyncio.gather(
                    *(
                        self._event_for(mid, rcpt, envelope, principal, account, inspected, session)
                        for mid, rcpt in chunk
                    ),
                    return_exceptions=True,
                )
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            if failures:
                transient = [f for f in failures if isinstance(f, PublishError | TransientError)]
                raise transient[0] if transient else failures[0]
            events = [o for o in outcomes if not isinstance(o, BaseException)]
            # Group commit: with other sessions' events in one atomic batch under load.
            await publish_events(
                self._js, events, timeout=self.config.publish_timeout_s, group=True
            )
            skipped = sum(1 for e in events if isinstance(e, MailSkipped))
            if skipped:
                self._metrics.skipped.inc(skipped)
            if len(events) > skipped:
                self._metrics.accepted.inc(len(events) - skipped)
        bound.info("message accepted", mailgate_ids=ids, recipients=len(ids), size=len(raw))
        return ids[0]

    async def _event_for(
        self,
        mailgate_id: str,
        recipient: str,
        envelope: Any,
        principal: Principal,
        account: AccountRecord,
        inspected: _Inspected,
        session: Any,
    ) -> MailAccepted | MailSkipped:
        """The recipient's event (its copy rendered; stored in the object store if large)."""
        prepared = inspected.prepared
        assert prepared is not None
        ref = MessageRef(
            mailgate_id=mailgate_id,
            account_id=account.id,
            recipient=recipient,
            external_id=prepared.external_id,
            campaign_id=prepared.campaign_id,
        )
        suppression = await self._directory.suppression(account.id, recipient)
        if suppression is not None:
            return MailSkipped(
                message=ref,
                mail_from=envelope.mail_from,
                reason=suppression.reason,
                subject_line=prepared.subject,
            )
        domain = self.config.domain
        tracking = account.tracking and not prepared.tracking_opt_out
        data = await self._render(inspected, mailgate_id, tracking=tracking)
        object_name = None
        if len(data) > self.config.object_store_threshold:
            object_name = mailgate_id
            await self._store_blob(object_name, data)
        peer = session.peer if isinstance(session.peer, tuple) else None
        return MailAccepted(
            message=ref,
            mail_from=envelope.mail_from,
            credential=principal.username,
            message_id_header=message_id_for(mailgate_id, domain),
            subject_line=prepared.subject,
            size=len(data),
            raw=None if object_name else data,
            object_name=object_name,
            tracking=tracking,
            postal_api_key_ref=account.id if account.has_postal_api_key else None,
            client_ip=str(peer[0]) if peer else None,
        )

    async def _render(self, inspected: _Inspected, mailgate_id: str, *, tracking: bool) -> bytes:
        """One recipient's copy (its own unsubscribe/click/open URLs); never raises for a
        body it cannot rewrite: that copy gets the headers-only rewrite and is counted."""
        prepared = inspected.prepared
        assert prepared is not None
        domain = self.config.domain
        links, plan = self.config.links, inspected.plan
        if links is None or plan is None:
            return render(prepared, mailgate_id=mailgate_id, domain=domain)
        if prepared.body_size > _THREAD_THRESHOLD_BYTES:
            data, fell_back = await asyncio.to_thread(
                render_copy, plan, links, mailgate_id=mailgate_id, domain=domain, tracking=tracking
            )
        else:
            data, fell_back = render_copy(
                plan, links, mailgate_id=mailgate_id, domain=domain, tracking=tracking
            )
        if fell_back:
            self._metrics.rewrite_fallbacks.inc()
            log.warning("body rewrite fell back to headers only", mailgate_id=mailgate_id)
        return data

    async def _store_blob(self, name: str, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.config.object_store_timeout_s):
                if self._blobs is None:
                    self._blobs = await self._js.object_store(OBJECT_STORE_MAIL)
                await self._blobs.put(name, data)
        except Exception as exc:
            raise TransientError(f"object store: {type(exc).__name__}: {exc}") from exc

    # --- errors -------------------------------------------------------------------------

    def _refusal(self, exc: Exception, bound: Any = None) -> str:
        """The one place an exception becomes an SMTP reply (and a metric)."""
        logger = bound if bound is not None else log
        reply: Reply
        if isinstance(exc, Rejected):
            reply = exc.reply
            logger.info("message rejected", reason=reply.reason, reply=str(reply))
        elif isinstance(exc, PublishError | TransientError):
            reply = replies.TRY_LATER
            logger.warning("transient failure", error=str(exc))
        else:
            reply = replies.INTERNAL_ERROR
            logger.error("internal error", exc_info=exc)
        self._metrics.rejected.labels(reply.reason).inc()
        return str(reply)

    async def handle_exception(self, error: Exception) -> str:
        """Exceptions aiosmtpd caught in a command handler."""
        if isinstance(error, TLSSetupException):  # aiosmtpd closes the connection itself
            log.info("tls handshake failed", error=str(error.__cause__ or error))
            return "454 4.7.0 TLS not available"
        return self._refusal(error)
