"""ams-reporter: delivers ``status.>`` events as signed webhooks to customer endpoints, and
stops AMS mailings whose bounce, failure or complaint rate crosses a threshold.

Consumers (durable, shared by replicas):

* ``STATUS`` / ``ams-reporter`` (``status.>``): first try of every delivery.
* ``WEBHOOK_RETRY`` / ``ams-reporter-retry`` (``webhook.retry.>``): retries with backoff,
  then dead letters (``mail.webhook_dead_lettered``).
* Each successful delivery is recorded as ``mail.webhook_delivered`` (WEBHOOK_RECORD_DELIVERIES)
  before its message is acked; a failed record is logged and counted, the webhook not resent.
* Automatic stop (only when the AMS API is configured and AUTOSTOP_ENABLED): the first
  consumer also adds each counted event to its campaign's counters before acking it
  (campaigns.CampaignTally), so every status message is fetched and acked once. (Before,
  a consumer of its own, ``ams-reporter-autostop``, did this; it is deleted on start.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import aiohttp
import nats.errors
import nats.js.errors
import structlog
from mailgate_core.ams import AmsClient
from mailgate_core.config import BaseSettings, ConfigError, Secret
from mailgate_core.ids import new_ulid
from mailgate_core.nats import DAY_S, per_message
from mailgate_core.service import ServiceBase
from prometheus_client import CollectorRegistry

from .autostop import ThresholdBook, Thresholds, check_thresholds, parse_overrides
from .batching import BatchConfig
from .breaker import LaneConfig, Lanes
from .campaigns import (
    KV_CAMPAIGN_AUTOSTOP,
    KV_CAMPAIGN_COUNTERS,
    AutoStopper,
    CampaignCounter,
    CampaignTally,
    Control,
    CounterStore,
    ensure_bucket,
)
from .delivery import Deliverer, make_session
from .endpoints import EndpointCache
from .handlers import DeadLetters, DeliveryRecords, Dispatcher, RetryHandler, StatusHandler
from .metrics import AutostopMetrics, WebhookMetrics
from .retry import RETRY_FILTER, RETRY_STREAM, RetryPolicy, provision_retry_stream
from .worker import FlowWorker

log = structlog.get_logger()

STREAM = "STATUS"
DURABLE = "ams-reporter"
FILTER = "status.>"
RETRY_DURABLE = "ams-reporter-retry"
AUTOSTOP_DURABLE = "ams-reporter-autostop"
"""The autostop consumer of earlier versions (deleted on start)."""


class Settings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "ams-reporter"
    ops_port: int = 9106
    webhook_timeout_s: float = 10.0
    webhook_allow_private: bool = False
    """Allow endpoints on loopback/private/link-local addresses (tests, closed networks)."""
    delivery_concurrency: int = 200
    """Status messages in hand at once (first tries, all endpoints together)."""
    retry_concurrency: int = 100
    """Retry tasks in hand at once."""
    retry_max_ack_pending: int = 200_000
    """Retry tasks waiting for their next try (JetStream keeps them as ack-pending)."""
    webhook_endpoint_concurrency: int = 20
    """Requests in flight to one endpoint."""
    webhook_endpoint_wait_s: float = 5.0
    """How long a delivery waits for a free slot at its endpoint before it is deferred to the
    retry stream. At most 4 x WEBHOOK_ENDPOINT_CONCURRENCY deliveries wait per endpoint, so a
    slow endpoint holds at most 5 x that many of the DELIVERY_CONCURRENCY slots."""
    webhook_breaker_failures: int = 5
    """Consecutive failed attempts that open an endpoint's circuit."""
    webhook_breaker_open_s: float = 30.0
    webhook_breaker_max_open_s: float = 600.0
    webhook_batch_max_items: int = 100
    webhook_batch_max_wait_s: float = 1.0
    webhook_batch_max_bytes: int = 1_000_000
    webhook_record_deliveries: bool = True
    """Publish ``mail.webhook_delivered`` for each successful delivery (the console's message
    history shows it); false saves one JetStream publish per delivery."""
    retry_deadline_s: float = 86400.0
    """Give up (dead-letter) this long after the status event was published."""
    retry_base_s: float = 1.0
    retry_max_delay_s: float = 900.0
    ams_api_url: str = ""
    ams_api_key: Secret = Secret("")
    ams_timeout_s: float = 30.0
    autostop_enabled: bool = True
    autostop_hard_bounce_rate: float = 0.05
    autostop_hard_bounce_min_sent: int = 500
    autostop_complaint_rate: float = 0.003
    autostop_complaint_min_sent: int = 1000
    autostop_failure_rate: float = 0.10
    autostop_failure_min_attempted: int = 500
    autostop_accounts: str = ""
    """JSON ``{account_id: {threshold fields}}`` overriding the defaults per account."""
    autostop_sweep_s: float = 30.0
    autostop_lease_s: float = 180.0
    autostop_max_attempts: int = 10
    autostop_recent_s: float = 86400.0
    """Only events this recent can trigger a stop (a new consumer replaying old history
    counts them but stops nothing)."""

    def validate(self) -> None:
        positive = {
            "DELIVERY_CONCURRENCY": self.delivery_concurrency,
            "RETRY_CONCURRENCY": self.retry_concurrency,
            "RETRY_MAX_ACK_PENDING": self.retry_max_ack_pending,
            "WEBHOOK_ENDPOINT_CONCURRENCY": self.webhook_endpoint_concurrency,
            "WEBHOOK_BREAKER_FAILURES": self.webhook_breaker_failures,
            "WEBHOOK_BATCH_MAX_ITEMS": self.webhook_batch_max_items,
            "WEBHOOK_BATCH_MAX_BYTES": self.webhook_batch_max_bytes,
            "AUTOSTOP_MAX_ATTEMPTS": self.autostop_max_attempts,
            "WEBHOOK_TIMEOUT_S": self.webhook_timeout_s,
            "WEBHOOK_ENDPOINT_WAIT_S": self.webhook_endpoint_wait_s,
            "WEBHOOK_BREAKER_OPEN_S": self.webhook_breaker_open_s,
            "WEBHOOK_BATCH_MAX_WAIT_S": self.webhook_batch_max_wait_s,
            "AMS_TIMEOUT_S": self.ams_timeout_s,
            "AUTOSTOP_SWEEP_S": self.autostop_sweep_s,
            "AUTOSTOP_LEASE_S": self.autostop_lease_s,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"config error: {name} must be positive")
        if self.retry_base_s <= 0 or self.retry_max_delay_s < self.retry_base_s:
            raise ConfigError(
                "config error: RETRY_BASE_S must be positive and at most RETRY_MAX_DELAY_S"
            )
        if self.retry_deadline_s < 0:
            raise ConfigError("config error: RETRY_DEADLINE_S must not be negative")
        if self.webhook_breaker_max_open_s < self.webhook_breaker_open_s:
            raise ConfigError(
                "config error: WEBHOOK_BREAKER_MAX_OPEN_S must be at least WEBHOOK_BREAKER_OPEN_S"
            )
        try:
            check_thresholds(self.thresholds(), where="AUTOSTOP_*")
            parse_overrides(self.autostop_accounts, self.thresholds())
        except ValueError as exc:
            raise ConfigError(f"config error: AUTOSTOP_ACCOUNTS/AUTOSTOP_*: {exc}") from None

    def thresholds(self) -> Thresholds:
        return Thresholds(
            enabled=self.autostop_enabled,
            hard_bounce_rate=self.autostop_hard_bounce_rate,
            hard_bounce_min_sent=self.autostop_hard_bounce_min_sent,
            complaint_rate=self.autostop_complaint_rate,
            complaint_min_sent=self.autostop_complaint_min_sent,
            failure_rate=self.autostop_failure_rate,
            failure_min_attempted=self.autostop_failure_min_attempted,
        )

    @property
    def ams_configured(self) -> bool:
        return bool(self.ams_api_url and self.ams_api_key)


class AmsReporter(ServiceBase):
    settings: Settings

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None):
        super().__init__(settings, registry=registry)
        self.metrics = WebhookMetrics(self.registry)
        self.autostop_metrics = AutostopMetrics(self.registry)
        self.lanes = Lanes(
            LaneConfig(
                limit=settings.webhook_endpoint_concurrency,
                wait_s=settings.webhook_endpoint_wait_s,
                failure_threshold=settings.webhook_breaker_failures,
                open_s=settings.webhook_breaker_open_s,
                max_open_s=settings.webhook_breaker_max_open_s,
            ),
            on_change=self.metrics.breaker_changed,
        )
        self.session: aiohttp.ClientSession | None = None
        self.dispatcher: Dispatcher | None = None
        self.ams: AmsClient | None = None
        self.stopper: AutoStopper | None = None
        self.control: Control | None = None
        self._endpoints: EndpointCache | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._sweep_stop = asyncio.Event()

    @property
    def endpoints(self) -> EndpointCache:
        assert self._endpoints is not None, "connect() first"
        return self._endpoints

    async def setup(self) -> None:
        await self.connect()
        s = self.settings
        await provision_retry_stream(
            self.js, max_age_s=s.retry_deadline_s + DAY_S, replicas=s.jetstream_replicas
        )
        self._endpoints = EndpointCache(self.js)
        self.health.add_check("endpoints", self.endpoints.loaded.is_set)
        self.session = make_session(
            timeout_s=s.webhook_timeout_s,
            allow_private=s.webhook_allow_private,
            concurrency=s.delivery_concurrency + s.retry_concurrency,
        )
        self.dispatcher = Dispatcher(
            Deliverer(self.session, allow_private=s.webhook_allow_private),
            self.lanes,
            self.metrics,
            BatchConfig(
                max_items=s.webhook_batch_max_items,
                max_wait_s=s.webhook_batch_max_wait_s,
                max_bytes=s.webhook_batch_max_bytes,
            ),
            DeliveryRecords(self.js, self.metrics) if s.webhook_record_deliveries else None,
        )
        retry = RetryPolicy(
            deadline_s=s.retry_deadline_s, base_s=s.retry_base_s, max_delay_s=s.retry_max_delay_s
        )
        dead_letters = DeadLetters(self.js, self.metrics)
        first = StatusHandler(
            js=self.js,
            endpoints=self.endpoints,
            dispatcher=self.dispatcher,
            dead_letters=dead_letters,
            retry=retry,
            metrics=self.metrics,
            tally=await self._setup_autostop(),
        )
        again = RetryHandler(
            endpoints=self.endpoints,
            dispatcher=self.dispatcher,
            dead_letters=dead_letters,
            retry=retry,
            metrics=self.metrics,
        )
        # An attempt holds its message for at most the slot wait plus the HTTP timeout (a
        # batch item also the batch's wait): ack_wait leaves a wide margin over that.
        ack_wait_s = max(60.0, 3 * (s.webhook_timeout_s + s.webhook_endpoint_wait_s))
        ack_wait_s += s.webhook_batch_max_wait_s
        self.workers.append(
            FlowWorker(
                self.js,
                STREAM,
                DURABLE,
                FILTER,
                per_message(first, s.delivery_concurrency),
                handler=first,
                batch=min(s.delivery_concurrency, 256),
                ack_wait_s=ack_wait_s,
                max_ack_pending=max(1000, 4 * s.delivery_concurrency),
                concurrency=s.delivery_concurrency,
            )
        )
        self.workers.append(
            FlowWorker(
                self.js,
                RETRY_STREAM,
                RETRY_DURABLE,
                RETRY_FILTER,
                per_message(again, s.retry_concurrency),
                handler=again,
                batch=min(s.retry_concurrency, 256),
                ack_wait_s=ack_wait_s,
                max_ack_pending=s.retry_max_ack_pending,
                concurrency=s.retry_concurrency,
            )
        )
        self.on_stop.append(self._stop_intake)
        self.add_ops_server()

    async def _setup_autostop(self) -> CampaignTally | None:
        s = self.settings
        await self._delete_old_autostop_consumer()
        if not s.autostop_enabled:
            log.info("autostop disabled")
            return None
        if not s.ams_configured:
            log.info("autostop disabled: AMS API not configured")
            return None
        counters = CounterStore(
            await ensure_bucket(
                self.js, KV_CAMPAIGN_COUNTERS, ttl_s=30 * DAY_S, replicas=s.jetstream_replicas
            )
        )
        markers = await ensure_bucket(
            self.js, KV_CAMPAIGN_AUTOSTOP, ttl_s=90 * DAY_S, replicas=s.jetstream_replicas
        )
        api_key = Secret(s.ams_api_key).reveal()
        self.ams = AmsClient(s.ams_api_url, api_key, timeout_s=s.ams_timeout_s)
        self.stopper = AutoStopper(
            js=self.js,
            markers=markers,
            counters=counters,
            ams=self.ams,
            metrics=self.autostop_metrics,
            owner=f"{socket.gethostname()}-{new_ulid()}",
            lease_s=s.autostop_lease_s,
            max_attempts=s.autostop_max_attempts,
        )
        book = ThresholdBook(s.thresholds(), parse_overrides(s.autostop_accounts, s.thresholds()))
        counter = CampaignCounter(
            store=counters,
            stopper=self.stopper,
            thresholds=book,
            metrics=self.autostop_metrics,
            recent_s=s.autostop_recent_s,
        )
        assert self.nc is not None
        self.control = Control(self.nc, self.stopper)
        self.on_start.append(self.control.start)
        self.on_start.append(self._start_sweeper)
        return CampaignTally(counter)

    async def _delete_old_autostop_consumer(self) -> None:
        """The durable that counted before the delivery consumer did: left alone, it would
        hold its backlog and redelivery state on the server for nothing."""
        try:
            await self.js.delete_consumer(STREAM, AUTOSTOP_DURABLE)
        except nats.js.errors.NotFoundError:
            return
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            log.warning("old autostop consumer not deleted", error=str(exc))
            return
        log.info("old autostop consumer deleted", durable=AUTOSTOP_DURABLE)

    async def _stop_intake(self) -> None:
        """First step of stop(): no more requests, sweeps or fetches; in-flight deliveries
        and stop calls finish and are settled (all workers at once, so the stop takes one
        fetch timeout, not one per worker). NATS is still connected meanwhile."""
        if self.control is not None:
            await self.control.stop()
        if self._sweeper is not None:
            # Not task.cancel(): nats-py swallows CancelledError in places, and a swallowed
            # cancel would leave the loop running; the flag ends it after the current sweep.
            self._sweep_stop.set()
            _done, pending = await asyncio.wait(
                {self._sweeper}, timeout=self.settings.ams_timeout_s
            )
            for task in pending:
                task.cancel()
        await asyncio.gather(*(worker.stop() for worker in self.workers))
        if self.stopper is not None:
            await self.stopper.close(timeout_s=self.settings.ams_timeout_s)

    async def _start_sweeper(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="autostop-sweep")

    async def _sweep_forever(self) -> None:
        assert self.stopper is not None
        while not self._sweep_stop.is_set():
            try:
                await self.stopper.sweep()
            except Exception as exc:
                log.warning("autostop sweep failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.autostop_sweep_s):
                    await self._sweep_stop.wait()

    async def start(self) -> None:
        await self.endpoints.start()  # deliveries need the endpoints before the first fetch
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self.dispatcher is not None:
            await self.dispatcher.close()
        await self.endpoints.stop()
        if self.session is not None:
            await self.session.close()
        if self.ams is not None:
            await self.ams.close()


async def build(settings: Settings, *, registry: CollectorRegistry | None = None) -> AmsReporter:
    service = AmsReporter(settings, registry=registry)
    await service.setup()
    return service
