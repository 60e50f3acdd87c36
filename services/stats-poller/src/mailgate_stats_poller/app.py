"""stats-poller: AMS mailing progress and Mail.ru Postmaster statistics into events and gauges.

Two independent loops, each enabled by its settings: AMS (``AMS_API_URL`` + ``AMS_API_KEY``)
and Postmaster (``POSTMASTER_REFRESH_TOKEN``). Run one replica: the Postmaster rate limit is
per account, and the client-side limiter only sees its own process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp
import nats.js.errors
import structlog
from mailgate_core.ams import AmsClient
from mailgate_core.config import BaseSettings, ConfigError, Secret
from mailgate_core.nats import publish_event
from mailgate_core.schemas import PostmasterDaily
from mailgate_core.service import ServiceBase
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry

from .poller import AmsMetrics, AmsPoller
from .postmaster import PostmasterClient, RateLimiter, TokenSource
from .postmaster_poller import (
    KV_BUCKET,
    KvCursorStore,
    PostmasterMetrics,
    PostmasterPoller,
    StopSleep,
)
from .schedule import Window, active_msgtypes

log = structlog.get_logger()


class Settings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "stats-poller"
    ops_port: int = 9107
    # AMS
    ams_api_url: str = ""
    ams_api_key: Secret = Secret("")
    ams_poll_interval_s: float = 60.0
    ams_timeout_s: float = 30.0
    ams_poll_relays: bool = True
    ams_republish_s: float = 3600.0
    """Publish an unchanged mailing's progress again after this long."""
    # Postmaster
    postmaster_refresh_token: Secret = Secret("")
    postmaster_api_url: str = "https://postmaster.mail.ru"
    postmaster_token_url: str = "https://o2.mail.ru/token"  # noqa: S105 - a URL, not a secret
    postmaster_client_id: str = "postmaster_api_client"
    postmaster_domains: list[str] = []
    """Static DKIM domains; empty = every domain reg-list returns."""
    postmaster_msgtypes: list[str] = []
    """msgtypes always polled, besides the active AMS campaigns."""
    postmaster_poll_interval_s: float = 1800.0
    postmaster_timeout_s: float = 30.0
    postmaster_rate_limit_per_min: int = 10
    postmaster_backfill_days: int = 30
    """How far back the first poll of a domain (no cursor yet) reaches; at most 365."""
    postmaster_repoll_days: int = 3
    """Recent days polled again every cycle (Postmaster still revises them)."""
    postmaster_chunk_days: int = 31
    postmaster_msgtype_active_days: float = 3.0
    postmaster_max_msgtypes: int = 20
    postmaster_tz_offset_hours: float = 3.0

    def validate(self) -> None:
        positive = {
            "AMS_POLL_INTERVAL_S": self.ams_poll_interval_s,
            "AMS_TIMEOUT_S": self.ams_timeout_s,
            "POSTMASTER_POLL_INTERVAL_S": self.postmaster_poll_interval_s,
            "POSTMASTER_TIMEOUT_S": self.postmaster_timeout_s,
            "POSTMASTER_RATE_LIMIT_PER_MIN": self.postmaster_rate_limit_per_min,
            "POSTMASTER_REPOLL_DAYS": self.postmaster_repoll_days,
            "POSTMASTER_CHUNK_DAYS": self.postmaster_chunk_days,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"config error: {name}={value!r} must be positive")
        if not 1 <= self.postmaster_backfill_days <= 365:
            raise ConfigError(
                f"config error: POSTMASTER_BACKFILL_DAYS={self.postmaster_backfill_days!r}"
                " must be between 1 and 365"
            )
        if self.postmaster_rate_limit_per_min > 10:
            raise ConfigError(
                "config error: POSTMASTER_RATE_LIMIT_PER_MIN must not exceed Postmaster's 10"
            )


class StatsPoller(ServiceBase):
    settings: Settings

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None):
        super().__init__(settings, registry=registry)
        self.ams_metrics = AmsMetrics(self.registry)
        self.postmaster_metrics = PostmasterMetrics(self.registry)
        self.session: aiohttp.ClientSession | None = None
        self.ams_client: AmsClient | None = None
        self.ams_poller: AmsPoller | None = None
        self.postmaster_poller: PostmasterPoller | None = None
        self.kv: KeyValue | None = None
        self._stop_sleep = StopSleep()

    def _http(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(trust_env=False)
        return self.session

    async def setup(self) -> None:
        await self.connect()
        self.add_ops_server()
        s = self.settings
        if s.ams_api_url and s.ams_api_key:
            self.ams_client = AmsClient(
                s.ams_api_url,
                Secret(s.ams_api_key).reveal(),
                self._http(),
                timeout_s=s.ams_timeout_s,
                observer=self.ams_metrics.observe_call,
            )
            self.ams_poller = AmsPoller(
                self.ams_client,
                self.js,
                self.ams_metrics,
                interval_s=s.ams_poll_interval_s,
                poll_relays=s.ams_poll_relays,
                republish_s=s.ams_republish_s,
            )
            self.on_start.append(self.ams_poller.start)
            self.on_stop.append(self.ams_poller.stop)
        else:
            log.info("ams polling not configured", missing="AMS_API_URL/AMS_API_KEY")
        if s.postmaster_refresh_token:
            await self._setup_postmaster()
        else:
            log.info("postmaster polling not configured", missing="POSTMASTER_REFRESH_TOKEN")

    async def _setup_postmaster(self) -> None:
        s = self.settings
        self.kv = await ensure_bucket(self.js, replicas=s.jetstream_replicas)
        sleep = self._stop_sleep
        metrics = self.postmaster_metrics
        tokens = TokenSource(
            s.postmaster_token_url,
            Secret(s.postmaster_refresh_token).reveal(),
            self._http(),
            time.time,
            client_id=s.postmaster_client_id,
            timeout_s=s.postmaster_timeout_s,
            on_refresh=metrics.token_refreshes.inc,
        )
        limiter = RateLimiter(time.time, sleep, limit=s.postmaster_rate_limit_per_min)
        client = PostmasterClient(
            s.postmaster_api_url,
            tokens,
            self._http(),
            limiter,
            timeout_s=s.postmaster_timeout_s,
            observer=metrics.observe_request,
        )
        js = self.js

        async def publish(event: PostmasterDaily) -> int:
            return await publish_event(js, event)

        self.postmaster_poller = PostmasterPoller(
            client,
            KvCursorStore(self.kv),
            publish,
            metrics,
            clock=time.time,
            sleep=sleep,
            interval_s=s.postmaster_poll_interval_s,
            window=Window(
                repoll_days=s.postmaster_repoll_days,
                initial_days=s.postmaster_backfill_days,
                chunk_days=s.postmaster_chunk_days,
            ),
            static_domains=s.postmaster_domains,
            msgtypes=self.active_msgtypes,
            tz_offset_h=s.postmaster_tz_offset_hours,
            warmup=self._first_ams_poll,
        )
        self.on_start.append(self.postmaster_poller.start)
        self.on_stop.append(self._stop_postmaster)

    async def _first_ams_poll(self) -> None:
        """Let the first cycle know the active campaigns (bounded: AMS may be down)."""
        if self.ams_poller is not None:
            waiter = asyncio.create_task(self.ams_poller.polled.wait())
            stopper = asyncio.create_task(self._stop_sleep.stopping.wait())
            await asyncio.wait(
                {waiter, stopper},
                timeout=self.settings.ams_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            waiter.cancel()
            stopper.cancel()

    async def _stop_postmaster(self) -> None:
        self._stop_sleep.stop()
        if self.postmaster_poller is not None:
            await self.postmaster_poller.stop()

    def active_msgtypes(self) -> Sequence[str]:
        """Static POSTMASTER_MSGTYPES plus the AMS mailings running or recently started."""
        s = self.settings
        mailings = self.ams_poller.mailings if self.ams_poller is not None else []
        return active_msgtypes(
            mailings,
            time.time(),
            active_days=s.postmaster_msgtype_active_days,
            static=s.postmaster_msgtypes,
            max_msgtypes=s.postmaster_max_msgtypes,
        )

    async def stop(self) -> None:
        await super().stop()
        if self.session is not None:
            await self.session.close()


async def ensure_bucket(js: nats.js.JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The ``stats-poller`` KV bucket (Postmaster cursors), created when missing."""
    try:
        return await js.key_value(KV_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(
            KeyValueConfig(bucket=KV_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas)
        )
    except nats.js.errors.BadRequestError:  # another replica created it first
        return await js.key_value(KV_BUCKET)


async def build(settings: Settings, *, registry: CollectorRegistry | None = None) -> StatsPoller:
    service = StatsPoller(settings, registry=registry)
    await service.setup()
    return service
