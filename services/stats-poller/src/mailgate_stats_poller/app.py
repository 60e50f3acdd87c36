"""stats-poller: polls AMS (and, later, Mail.ru Postmaster) into events and gauges."""

from __future__ import annotations

import aiohttp
import structlog
from mailgate_core.config import BaseSettings, ConfigError, Secret
from mailgate_core.service import ServiceBase
from prometheus_client import CollectorRegistry

from .ams_client import AmsClient
from .poller import AmsMetrics, AmsPoller

log = structlog.get_logger()


class Settings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "stats-poller"
    ops_port: int = 9107
    ams_api_url: str = ""
    ams_api_key: Secret = Secret("")
    ams_poll_interval_s: float = 60.0
    ams_timeout_s: float = 30.0

    def validate(self) -> None:
        if self.ams_poll_interval_s <= 0 or self.ams_timeout_s <= 0:
            raise ConfigError(
                "config error: AMS_POLL_INTERVAL_S and AMS_TIMEOUT_S must be positive"
            )


class StatsPoller(ServiceBase):
    settings: Settings

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None):
        super().__init__(settings, registry=registry)
        self.ams_metrics = AmsMetrics(self.registry)
        self.session: aiohttp.ClientSession | None = None
        self.ams_poller: AmsPoller | None = None

    async def setup(self) -> None:
        await self.connect()
        self.add_ops_server()
        s = self.settings
        if s.ams_api_url and s.ams_api_key:
            self.session = aiohttp.ClientSession(trust_env=False)
            client = AmsClient(
                s.ams_api_url,
                Secret(s.ams_api_key).reveal(),
                self.session,
                timeout_s=s.ams_timeout_s,
            )
            self.ams_poller = AmsPoller(
                client, self.js, self.ams_metrics, interval_s=s.ams_poll_interval_s
            )
            self.on_start.append(self.ams_poller.start)
            self.on_stop.append(self.ams_poller.stop)
        else:
            log.info("ams polling not configured", missing="AMS_API_URL/AMS_API_KEY")
        log.info("postmaster polling not configured")

    async def stop(self) -> None:
        await super().stop()
        if self.session is not None:
            await self.session.close()


async def build(settings: Settings, *, registry: CollectorRegistry | None = None) -> StatsPoller:
    service = StatsPoller(settings, registry=registry)
    await service.setup()
    return service
