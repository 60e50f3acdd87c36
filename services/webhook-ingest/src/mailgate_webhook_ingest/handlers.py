"""``POST /api/v1/webhook`` and ``POST /api/v1/inbound``: check, verify before parsing, publish,
then answer 200.

Both endpoints refuse in this order, each with an RFC 9457 problem: a client outside
``POSTAL_WEBHOOK_ALLOWED_IPS`` (403), a content type Postal does not send (415), a body over
the limit (413), a missing or bad signature (401). A verified webhook that is not Postal's
envelope is 400; a verified inbound post is always published (unrecognised mail goes to
``postal.Unknown``). NATS unavailable is 503 with Retry-After so Postal retries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
import structlog
from aiohttp import web
from mailgate_core.nats import PublishError, publish_event
from mailgate_core.schemas import POSTAL_EVENT_NAMES, Event
from mailgate_core.tracking import TokenSigner
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter

from . import inbound
from .access import Network, is_allowed
from .parse import BadWebhook, parse_webhook
from .verify import KeyRing

log = structlog.get_logger()

WEBHOOK_PATH = "/api/v1/webhook"
INBOUND_PATH = "/api/v1/inbound"
#: Postal waits 5 s for the whole request; answer 503 before it gives up.
PUBLISH_TIMEOUT_S = 3.0
RETRY_AFTER_S = 30
#: Unknown inbound mail larger than this goes to the object store (NATS max payload is 1 MB).
INLINE_MAX_BYTES = 256 * 1024

_json = msgspec.json.Encoder()
JSON = "application/json"

PROBLEM_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    503: "Service Unavailable",
}


def problem(status: int, detail: str, *, headers: dict[str, str] | None = None) -> web.Response:
    """RFC 9457 problem+json."""
    body = {
        "type": "about:blank",
        "title": PROBLEM_TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    return web.Response(
        status=status,
        body=_json.encode(body),
        content_type="application/problem+json",
        headers=headers,
    )


def _ok(extra: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_json.encode({"status": "ok", **(extra or {})}), content_type=JSON)


class Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.received = Counter(
            "mailgate_webhooks_received_total",
            "Verified Postal webhooks published, by event",
            ["event"],
            registry=registry,
        )
        self.rejected = Counter(
            "mailgate_webhooks_rejected_total",
            "Postal webhooks refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.inbound = Counter(
            "mailgate_inbound_messages_total",
            "Verified inbound mail from Postal routes, by what it was",
            ["kind"],
            registry=registry,
        )
        self.inbound_unknown = Counter(
            "mailgate_inbound_unrecognised_total",
            "Inbound mail kept raw on postal.Unknown, by reason",
            ["reason"],
            registry=registry,
        )
        self.inbound_rejected = Counter(
            "mailgate_inbound_rejected_total",
            "Inbound posts refused, by reason",
            ["reason"],
            registry=registry,
        )


class _TooLarge(Exception):
    pass


async def _read_bounded(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)


class _Refused(Exception):
    def __init__(self, reason: str, response: web.Response):
        super().__init__(reason)
        self.reason = reason
        self.response = response


@dataclass
class Gate:
    """The checks both endpoints make before anything is parsed."""

    keys: KeyRing
    allowed: list[Network]

    async def verified_body(
        self, request: web.Request, content_types: tuple[str, ...], max_body: int
    ) -> bytes:
        if not is_allowed(request.remote, self.allowed):
            log.warning("postal post from a disallowed address", remote=request.remote)
            raise _Refused("ip_not_allowed", problem(403, "client address not allowed"))
        if request.content_type not in content_types:
            raise _Refused(
                "unsupported_media_type",
                problem(415, f"Content-Type must be {' or '.join(content_types)}"),
            )
        try:
            body = await _read_bounded(request, max_body)
        except _TooLarge:
            raise _Refused("too_large", problem(413, f"body exceeds {max_body} bytes")) from None
        verdict = self.keys.verify(body, request.headers)
        if not verdict.ok:
            log.warning("postal signature rejected", reason=verdict.reason, size=len(body))
            detail = (
                "no X-Postal-Signature-256 or X-Postal-Signature header"
                if verdict.reason == "missing_signature"
                else "signature does not match the body"
            )
            raise _Refused(verdict.reason, problem(401, detail))
        return body


def _unavailable() -> web.Response:
    return problem(
        503,
        "event could not be stored; retry later",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


@dataclass
class WebhookHandler:
    js: JetStreamContext
    gate: Gate
    domain: str
    max_body: int
    metrics: Metrics

    async def handle(self, request: web.Request) -> web.Response:
        try:
            body = await self.gate.verified_body(request, (JSON,), self.max_body)
        except _Refused as refused:
            self.metrics.rejected.labels(refused.reason).inc()
            return refused.response
        try:
            event = parse_webhook(body, self.domain)
        except BadWebhook as exc:
            log.warning("webhook body rejected", reason=exc.reason, detail=exc.detail)
            self.metrics.rejected.labels(exc.reason).inc()
            return problem(400, exc.detail)
        ids = {"mailgate_id": event.mailgate_id, "postal_id": event.postal_id}
        try:
            await publish_event(self.js, event, timeout=PUBLISH_TIMEOUT_S)
        except PublishError as exc:
            log.error(
                "webhook not published",
                **ids,
                uuid=event.event_id,
                webhook_event=event.event,
                error=str(exc),
            )
            self.metrics.rejected.labels("publish_failed").inc()
            return _unavailable()
        label = event.event if event.event in POSTAL_EVENT_NAMES else "Unknown"
        self.metrics.received.labels(label).inc()
        if label == "Unknown":
            log.warning(
                "unknown webhook event kept raw",
                **ids,
                uuid=event.event_id,
                postal_event=event.payload.get("event"),
            )
        else:
            # Per message: debug (the ledger records every event). At info, rendering and
            # writing this line was about a tenth of the CPU of a webhook.
            log.debug("webhook accepted", **ids, uuid=event.event_id, webhook_event=event.event)
        return _ok()


@dataclass
class InboundHandler:
    """Inbound mail from a Postal route's HTTP endpoint (format RawMessage; see inbound.py)."""

    js: JetStreamContext
    gate: Gate
    domain: str
    max_body: int
    metrics: Metrics
    signer: TokenSigner | None
    blobs: object | None = None

    def _check_token(self, token: str) -> str | None:
        assert self.signer is not None
        payload = self.signer.verify(token)
        if payload is None or payload.kind != "unsubscribe":
            return None
        return str(payload.mailgate_id)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            body = await self.gate.verified_body(request, (JSON, inbound.FORM), self.max_body)
        except _Refused as refused:
            self.metrics.inbound_rejected.labels(refused.reason).inc()
            return refused.response
        post = inbound.parse_post(body, request.content_type)
        kind = inbound.classify(
            post, self.domain, self._check_token if self.signer is not None else None
        )
        now = time.time()
        blog = log.bind(postal_id=post.postal_id, inbound_format=post.format)
        event: Event
        if isinstance(kind, inbound.Complaint):
            event = inbound.complaint_event(post, kind, now=now)
            label = "complaint" if kind.mailgate_id else "complaint_uncorrelated"
            blog = blog.bind(mailgate_id=kind.mailgate_id, feedback_type=kind.report.feedback_type)
        elif isinstance(kind, inbound.MailtoUnsubscribe):
            event = inbound.unsubscribe_event(kind, now=now)
            label = "unsubscribe"
            blog = blog.bind(mailgate_id=kind.mailgate_id, found_in=kind.found_in)
        else:
            try:
                event = await self._unknown_event(post, kind.reason, now)
            except _StoreFailed as exc:
                blog.error("inbound message not stored", error=str(exc))
                self.metrics.inbound_rejected.labels("publish_failed").inc()
                return _unavailable()
            label = "unknown"
            self.metrics.inbound_unknown.labels(kind.reason).inc()
        try:
            await publish_event(self.js, event, timeout=PUBLISH_TIMEOUT_S)
        except PublishError as exc:
            blog.error("inbound event not published", kind=label, error=str(exc))
            self.metrics.inbound_rejected.labels("publish_failed").inc()
            return _unavailable()
        self.metrics.inbound.labels(label).inc()
        blog.info("inbound message accepted", kind=label, event_id=event.event_id)
        return _ok({"kind": label})

    async def _unknown_event(self, post: inbound.InboundPost, reason: str, now: float) -> Event:
        kept = inbound.kept_bytes(post)
        if len(kept) <= INLINE_MAX_BYTES or self.blobs is None:
            return inbound.unknown_event(post, reason, now=now)
        name = f"inbound/{post.digest()}"
        try:
            await self.blobs.put(name, kept)  # type: ignore[attr-defined]
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            raise _StoreFailed(str(exc)) from exc
        return inbound.unknown_event(post, reason, now=now, object_name=name)


class _StoreFailed(Exception):
    pass
