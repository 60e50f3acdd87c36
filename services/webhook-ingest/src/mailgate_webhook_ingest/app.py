"""webhook-ingest: signed Postal webhooks -> ``postal.<EventName>`` on NATS."""

from __future__ import annotations

from aiohttp import web
from mailgate_core.config import BaseSettings, ConfigError
from mailgate_core.service import ServiceBase
from prometheus_client import CollectorRegistry

from .handlers import WEBHOOK_PATH, Metrics, WebhookHandler
from .verify import InvalidKeyError, KeyRing


class Settings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "webhook-ingest"
    webhook_host: str = "0.0.0.0"
    webhook_port: int = 8081
    postal_webhook_public_key: str
    """Base64 SPKI DER (the DKIM ``p=`` value) or PEM; several separated by commas."""
    domain: str
    """Our Message-ID domain (``<mailgate_id@DOMAIN>``)."""
    webhook_max_body: int = 1024 * 1024

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


async def build(settings: Settings, *, registry: CollectorRegistry | None = None) -> ServiceBase:
    service = ServiceBase(settings, registry=registry)
    await service.connect()
    handler = WebhookHandler(
        js=service.js,
        keys=KeyRing.from_setting(settings.postal_webhook_public_key),
        domain=settings.domain.strip(),
        max_body=settings.webhook_max_body,
        metrics=Metrics(service.registry),
    )
    # client_max_size above our own limit: the handler enforces it and answers problem+json.
    app = web.Application(client_max_size=settings.webhook_max_body + 1)
    app.router.add_post(WEBHOOK_PATH, handler.handle)
    service.add_http(app, settings.webhook_host, settings.webhook_port)
    return service
