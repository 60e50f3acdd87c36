"""ams-reporter: delivers ``status.>`` events as signed webhooks to customer endpoints."""

from __future__ import annotations

import aiohttp
import structlog
from mailgate_core.config import BaseSettings, ConfigError, Secret
from mailgate_core.nats import PullWorker, per_message
from mailgate_core.service import ServiceBase
from prometheus_client import CollectorRegistry, Counter, Histogram

from .delivery import Deliverer, DeliveryProgress, make_session
from .endpoints import EndpointCache
from .handlers import RetryPolicy, StatusHandler

log = structlog.get_logger()

STREAM = "STATUS"
DURABLE = "ams-reporter"
FILTER = "status.>"


class Settings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "ams-reporter"
    ops_port: int = 9106
    webhook_timeout_s: float = 10.0
    webhook_allow_private: bool = False
    """Allow endpoints on loopback/private/link-local addresses (tests, closed networks)."""
    delivery_concurrency: int = 50
    retry_deadline_s: float = 86400.0
    """Give up (dead-letter) this long after the status event was published."""
    retry_base_s: float = 1.0
    retry_max_delay_s: float = 900.0
    ams_api_url: str = ""
    ams_api_key: Secret = Secret("")
    """AMS JSON-RPC (automatic campaign stop; not used by the delivery path)."""

    def validate(self) -> None:
        if self.delivery_concurrency < 1:
            raise ConfigError("config error: DELIVERY_CONCURRENCY must be at least 1")
        if self.webhook_timeout_s <= 0:
            raise ConfigError("config error: WEBHOOK_TIMEOUT_S must be positive")
        if self.retry_base_s <= 0 or self.retry_max_delay_s < self.retry_base_s:
            raise ConfigError(
                "config error: RETRY_BASE_S must be positive and at most RETRY_MAX_DELAY_S"
            )


class AmsReporter(ServiceBase):
    settings: Settings

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None):
        super().__init__(settings, registry=registry)
        self.outcomes = Counter(
            "mailgate_webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, failed, refused, dead_letter).",
            ["outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "mailgate_webhook_delivery_seconds",
            "Duration of one webhook HTTP attempt.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.progress = DeliveryProgress()
        self.session: aiohttp.ClientSession | None = None
        self._endpoints: EndpointCache | None = None

    @property
    def endpoints(self) -> EndpointCache:
        assert self._endpoints is not None, "connect() first"
        return self._endpoints

    async def setup(self) -> None:
        await self.connect()
        s = self.settings
        self._endpoints = EndpointCache(self.js)
        self.health.add_check("endpoints", self.endpoints.loaded.is_set)
        self.session = make_session(
            timeout_s=s.webhook_timeout_s,
            allow_private=s.webhook_allow_private,
            concurrency=s.delivery_concurrency,
        )
        handler = StatusHandler(
            endpoints=self.endpoints,
            deliverer=Deliverer(
                self.session, allow_private=s.webhook_allow_private, duration=self.duration
            ),
            progress=self.progress,
            retry=RetryPolicy(
                deadline_s=s.retry_deadline_s,
                base_s=s.retry_base_s,
                max_delay_s=s.retry_max_delay_s,
            ),
            outcomes=self.outcomes,
        )
        self.workers.append(
            PullWorker(
                self.js,
                STREAM,
                DURABLE,
                FILTER,
                per_message(handler, s.delivery_concurrency),
                batch=s.delivery_concurrency,
                # Nak'd messages waiting for their retry count as pending: leave room so a
                # failing endpoint does not stall everyone (per-endpoint queues come later).
                max_ack_pending=20_000,
            )
        )
        self.add_ops_server()
        if not (s.ams_api_url and s.ams_api_key):
            log.info("ams api not configured")

    async def start(self) -> None:
        await self.endpoints.start()  # deliveries need the endpoints before the first fetch
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        await self.endpoints.stop()
        if self.session is not None:
            await self.session.close()


async def build(settings: Settings, *, registry: CollectorRegistry | None = None) -> AmsReporter:
    service = AmsReporter(settings, registry=registry)
    await service.setup()
    return service
