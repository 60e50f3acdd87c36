"""tracker: open pixel, click redirect and unsubscribe endpoints -> ``track.*`` events."""

from __future__ import annotations

from aiohttp import web
from mailgate_core.config import BaseSettings, ConfigError, Secret
from mailgate_core.service import ServiceBase
from mailgate_core.tracking import TokenSigner
from prometheus_client import CollectorRegistry, Counter

from .handlers import TrackerHandlers


class Settings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "tracker"
    tracker_host: str = "0.0.0.0"
    tracker_port: int = 8082
    tracking_secret: Secret = Secret("")
    """Comma-separated; the first signs new tokens, every one verifies (rotation)."""
    tracking_legacy_hosts: list[str] = []
    """Hosts the legacy unsigned ``/track/c?url=`` form may redirect to."""
    publish_timeout_s: float = 2.0

    def secrets(self) -> list[str]:
        raw = Secret(self.tracking_secret).reveal()
        return [s.strip() for s in raw.split(",") if s.strip()]

    def validate(self) -> None:
        if not self.secrets():
            raise ConfigError("config error: TRACKING_SECRET is required but not set")


async def build(settings: Settings, *, registry: CollectorRegistry | None = None) -> ServiceBase:
    service = ServiceBase(settings, registry=registry)
    requests = Counter(
        "mailgate_tracker_requests",
        "Tracking requests by kind (open, click, legacy_*, unsubscribe*) and result.",
        ["kind", "result"],
        registry=service.registry,
    )
    await service.connect()
    handlers = TrackerHandlers(
        js=service.js,
        signer=TokenSigner(settings.secrets()),
        legacy_hosts=settings.tracking_legacy_hosts,
        requests=requests,
        publish_timeout_s=settings.publish_timeout_s,
    )
    app = web.Application(client_max_size=64 * 1024)
    app.add_routes(handlers.routes())
    service.add_http(app, settings.tracker_host, settings.tracker_port)
    return service
