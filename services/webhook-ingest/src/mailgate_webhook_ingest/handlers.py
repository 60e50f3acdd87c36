"""``POST /api/v1/webhook``: read bounded, verify before parsing, publish, then answer 200."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import structlog
from aiohttp import web
from mailgate_core.nats import PublishError, publish_event
from mailgate_core.schemas import POSTAL_EVENT_NAMES
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter

from .parse import BadWebhook, parse_webhook
from .verify import KeyRing

log = structlog.get_logger()

WEBHOOK_PATH = "/api/v1/webhook"
#: Postal waits 5 s for the whole request; answer 503 before it gives up.
PUBLISH_TIMEOUT_S = 3.0
RETRY_AFTER_S = 30

_json = msgspec.json.Encoder()

PROBLEM_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    413: "Content Too Large",
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


@dataclass
class WebhookHandler:
    js: JetStreamContext
    keys: KeyRing
    domain: str
    max_body: int
    metrics: Metrics

    async def handle(self, request: web.Request) -> web.Response:
        try:
            body = await _read_bounded(request, self.max_body)
        except _TooLarge:
            return self._reject("too_large", 413, f"body exceeds {self.max_body} bytes")
        verdict = self.keys.verify(body, request.headers)
        if not verdict.ok:
            log.warning("webhook signature rejected", reason=verdict.reason, size=len(body))
            detail = (
                "no X-Postal-Signature-256 or X-Postal-Signature header"
                if verdict.reason == "missing_signature"
                else "signature does not match the body"
            )
            return self._reject(verdict.reason, 401, detail)
        try:
            event = parse_webhook(body, self.domain)
        except BadWebhook as exc:
            log.warning("webhook body rejected", reason=exc.reason, detail=exc.detail)
            return self._reject(exc.reason, 400, exc.detail)
        blog = log.bind(
            mailgate_id=event.mailgate_id, postal_id=event.postal_id, uuid=event.event_id
        )
        try:
            await publish_event(self.js, event, timeout=PUBLISH_TIMEOUT_S)
        except PublishError as exc:
            blog.error("webhook not published", webhook_event=event.event, error=str(exc))
            return self._reject(
                "publish_failed",
                503,
                "event could not be stored; retry later",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        label = event.event if event.event in POSTAL_EVENT_NAMES else "other"
        self.metrics.received.labels(label).inc()
        blog.info("webhook accepted", webhook_event=event.event)
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    def _reject(
        self, reason: str, status: int, detail: str, *, headers: dict[str, str] | None = None
    ) -> web.Response:
        self.metrics.rejected.labels(reason).inc()
        return problem(status, detail, headers=headers)
