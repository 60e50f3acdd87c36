"""webhook-ingest: signed Postal webhooks -> ``postal.<EventName>``; inbound mail from Postal
routes (feedback reports, mailto unsubscribes) -> ``postal.Complaint`` / ``track.unsubscribe``
/ ``postal.Unknown``."""

from __future__ import annotations

import structlog
from aiohttp import web
from mailgate_core.config import BaseSettings, ConfigError, Secret
from mailgate_core.nats import OBJECT_STORE_MAIL
from mailgate_core.service import ServiceBase
from mailgate_core.tracking import TokenSigner
from prometheus_client import CollectorRegistry

from .access import parse_networks
from .handlers import INBOUND_PATH, WEBHOOK_PATH, Gate, InboundHandler, Metrics, WebhookHandler
from .verify import InvalidKeyError, KeyRing

log = structlog.get_logger()


class Settings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "webhook-ingest"
    webhook_host: str = "0.0.0.0"
    webhook_port: int = 8081
    postal_webhook_public_key: str
    """Base64 SPKI DER (the DKIM ``p=`` value) or PEM; several separated by commas."""
    domain: str
    """Our Message-ID domain (``<mailgate_id@DOMAIN>``)."""
    webhook_max_body: int = 1024 * 1024
    inbound_max_body: int = 32 * 1024 * 1024
    """Largest inbound post (the message is base64 inside it: about 4/3 of the mail)."""
    postal_webhook_allowed_ips: list[str] = []
    """CIDRs allowed to post webhooks and inbound mail; empty = any (the signature decides)."""
    tracking_secret: Secret = Secret("")
    """Verifies the unsubscribe token of mailto replies; comma-separated like the tracker's.
    Empty: mailto unsubscribes are not recognised (kept on postal.Unknown)."""

    def tracking_secrets(self) -> list[str]:
        raw = Secret(self.tracking_secret).reveal()
        return [s.strip() for s in raw.split(",") if s.strip()]

    def validate(self) -> None:
        try:
            KeyRing.from_setting(self.postal_webhook_public_key)
        except InvalidKeyError as exc:
            raise ConfigError(
                f"config error: POSTAL_WEBHOOK_PUBLIC_KEY is invalid: {exc}"
            ) from None
        if not self.domain.strip():
            raise ConfigError("config error: DOMAIN is required but empty")
        if self.webhook_max_body < 1024:
            raise ConfigError("config error: WEBHOOK_MAX_BODY must be at least 1024")
        if self.inbound_max_body < 1024:
            raise ConfigError("config error: INBOUND_MAX_BODY must be at least 1024")
        try:
            parse_networks(self.postal_webhook_allowed_ips)
        except ValueError as exc:
            raise ConfigError(f"config error: POSTAL_WEBHOOK_ALLOWED_IPS: {exc}") from None


async def build(settings: Settings, *, registry: CollectorRegistry | None = None) -> ServiceBase:
    service = ServiceBase(settings, registry=registry)
    await service.connect()
    metrics = Metrics(service.registry)
    domain = settings.domain.strip()
    gate = Gate(
        keys=KeyRing.from_setting(settings.postal_webhook_public_key),
        allowed=parse_networks(settings.postal_webhook_allowed_ips),
    )
    secrets = settings.tracking_secrets()
    if not secrets:
        log.warning("TRACKING_SECRET is empty; mailto unsubscribes will not be recognised")
    webhooks = WebhookHandler(
        js=service.js,
        gate=gate,
        domain=domain,
        max_body=settings.webhook_max_body,
        metrics=metrics,
    )
    inbound = InboundHandler(
        js=service.js,
        gate=gate,
        domain=domain,
        max_body=settings.inbound_max_body,
        metrics=metrics,
        signer=TokenSigner(secrets) if secrets else None,
        blobs=await service.js.object_store(OBJECT_STORE_MAIL),
    )
    # client_max_size above our own limits: the handlers enforce them with problem+json.
    limit = max(settings.webhook_max_body, settings.inbound_max_body)
    app = web.Application(client_max_size=limit + 1)
    app.router.add_post(WEBHOOK_PATH, webhooks.handle)
    app.router.add_post(INBOUND_PATH, inbound.handle)
    service.add_http(app, settings.webhook_host, settings.webhook_port)
    return service
