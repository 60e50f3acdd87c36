"""tracker: open pixel, click redirect and unsubscribe endpoints -> ``track.*`` events."""

from __future__ import annotations

import msgspec
from aiohttp import web
from mailgate_core.config import BaseSettings, ConfigError, Secret
from mailgate_core.ops import add_ops_routes
from mailgate_core.service import ServiceBase
from mailgate_core.tracking import TokenSigner
from prometheus_client import CollectorRegistry

from .audience import (
    DEFAULT_PREFETCH_NETWORKS,
    PROXY_AGENTS,
    SCANNER_AGENTS,
    ClickHistory,
    Rules,
    parse_networks,
)
from .handlers import TrackerHandlers, TrackerMetrics
from .inline import InlineRoutes, TrackingAppRunner
from .publisher import BufferMetrics, EventBuffer


class Settings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "tracker"
    tracker_host: str = "0.0.0.0"
    tracker_port: int = 8082
    tracking_secret: Secret = Secret("")
    """Comma-separated; the first signs new tokens, every one verifies (rotation)."""
    tracking_legacy_hosts: list[str] = []
    """Hosts the legacy unsigned ``/track/c?url=`` form may redirect to."""
    publish_timeout_s: float = 2.0
    tracker_buffer_size: int = 10_000
    """Events held in memory while NATS is unavailable; beyond it they are dropped (counted)."""
    tracker_buffer_wait_s: float = 1.0
    """With the buffer full but NATS connected (slow, not gone), how long a request waits
    for room before its event is dropped."""
    tracker_publish_concurrency: int = 4
    """JetStream publishes (track.batch messages, or groups of unsubscribes) awaiting their
    ack at once."""
    tracker_batch_max_events: int = 256
    """Opens and clicks packed into one ``track.batch`` message at most."""
    tracker_batch_max_bytes: int = 512 * 1024
    """Encoded size of one ``track.batch`` message at most (also kept under the NATS server's
    ``max_payload``)."""
    tracker_batch_linger_s: float = 0.01
    """How long the first event of a batch waits for more before the batch is published."""
    tracker_flush_timeout_s: float = 5.0
    """On shutdown, how long to keep publishing buffered events."""
    tracker_unsubscribe_wait_s: float = 3.0
    """How long an unsubscribe POST waits for the JetStream ack before answering 503."""
    tracker_early_click_s: float = 30.0
    """Clicks within this many seconds of the message's acceptance are ``scanner`` (0: off)."""
    tracker_click_burst_s: float = 2.0
    """Clicks on different links of one message within this many seconds are ``scanner``."""
    tracker_prefetch_networks: list[str] = msgspec.field(
        default_factory=lambda: list(DEFAULT_PREFETCH_NETWORKS)
    )
    """CIDRs of mail-provider proxies (opens from them are ``prefetch``)."""
    tracker_scanner_networks: list[str] = []
    """CIDRs of link scanners (everything from them is ``scanner``)."""
    tracker_scanner_agents: list[str] = []
    """Extra user-agent substrings (case-insensitive) that mark a link scanner."""
    tracker_inline_routes: bool = True
    """Answer valid opens and clicks inside the HTTP protocol (``inline.py``) instead of
    through aiohttp's request/response objects; off: every request goes through the app."""

    def secrets(self) -> list[str]:
        raw = Secret(self.tracking_secret).reveal()
        return [s.strip() for s in raw.split(",") if s.strip()]

    def rules(self) -> Rules:
        return Rules(
            prefetch_networks=parse_networks(self.tracker_prefetch_networks),
            scanner_networks=parse_networks(self.tracker_scanner_networks),
            scanner_agents=SCANNER_AGENTS
            + tuple(a.strip().lower() for a in self.tracker_scanner_agents if a.strip()),
            prefetch_agents=PROXY_AGENTS,
            early_click_s=self.tracker_early_click_s,
            burst_window_s=self.tracker_click_burst_s,
        )

    def validate(self) -> None:
        if not self.secrets():
            raise ConfigError("config error: TRACKING_SECRET is required but not set")
        for name in ("tracker_prefetch_networks", "tracker_scanner_networks"):
            try:
                parse_networks(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(f"config error: {name.upper()}: {exc}") from None
        if self.tracker_buffer_size < 1 or self.tracker_publish_concurrency < 1:
            raise ConfigError(
                "config error: TRACKER_BUFFER_SIZE and TRACKER_PUBLISH_CONCURRENCY must be >= 1"
            )
        if self.tracker_batch_max_events < 1 or self.tracker_batch_max_bytes < 1024:
            raise ConfigError(
                "config error: TRACKER_BATCH_MAX_EVENTS must be >= 1 and "
                "TRACKER_BATCH_MAX_BYTES >= 1024"
            )
        if self.tracker_batch_linger_s < 0:
            raise ConfigError("config error: TRACKER_BATCH_LINGER_S must be >= 0")


class TrackerService(ServiceBase):
    """ServiceBase plus the event buffer: started before HTTP, flushed after HTTP stops."""

    buffer: EventBuffer
    app: web.Application
    inline: InlineRoutes | None = None

    async def connect(self) -> None:
        await super().connect()
        # Readiness must not follow NATS: while it is away the buffer holds events and a
        # recipient's click still reaches its target. Alert on the buffer/drop metrics.
        self.health.add_check("nats", lambda: True)

    async def start(self) -> None:
        self.buffer.start()
        settings: Settings = self.settings  # type: ignore[assignment]
        # start_http's runner, with the inline routes in front when they are on
        if self.inline is not None:
            runner: web.AppRunner = TrackingAppRunner(
                self.app, inline=self.inline, access_log=None, shutdown_timeout=5.0
            )
        else:
            runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        self.runners.append(runner)
        site = web.TCPSite(runner, settings.tracker_host, settings.tracker_port, reuse_address=True)
        await site.start()
        await super().start()

    async def stop(self) -> None:
        self.health.draining = True
        for runner in self.runners:  # intake first: no new events after this
            await runner.cleanup()
        self.runners.clear()
        settings: Settings = self.settings  # type: ignore[assignment]
        await self.buffer.close(settings.tracker_flush_timeout_s)
        await super().stop()


async def build(settings: Settings, *, registry: CollectorRegistry | None = None) -> TrackerService:
    service = TrackerService(settings, registry=registry)
    await service.connect()
    nc = service.nc
    assert nc is not None
    rules = settings.rules()
    service.buffer = EventBuffer(
        js=service.js,
        metrics=BufferMetrics.create(service.registry),
        capacity=settings.tracker_buffer_size,
        concurrency=settings.tracker_publish_concurrency,
        publish_timeout_s=settings.publish_timeout_s,
        connected=lambda: nc.is_connected,
        max_batch_events=settings.tracker_batch_max_events,
        # room for the headers under the server's limit (1 MB by default)
        max_batch_bytes=min(settings.tracker_batch_max_bytes, nc.max_payload - 4096),
        linger_s=settings.tracker_batch_linger_s,
    )
    handlers = TrackerHandlers(
        buffer=service.buffer,
        signer=TokenSigner(settings.secrets()),
        legacy_hosts=settings.tracking_legacy_hosts,
        rules=rules,
        history=ClickHistory(window_s=rules.burst_window_s),
        metrics=TrackerMetrics.create(service.registry),
        unsubscribe_wait_s=settings.tracker_unsubscribe_wait_s,
        buffer_wait_s=settings.tracker_buffer_wait_s,
    )
    app = web.Application(client_max_size=64 * 1024)
    handlers.add_to(app)
    add_ops_routes(app, service.health, service.registry)
    service.app = app  # served by start() (not add_http: its runner has the inline routes)
    if settings.tracker_inline_routes:
        service.inline = InlineRoutes(handlers)
    return service
