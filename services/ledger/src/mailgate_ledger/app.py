"""ledger: the only Postgres owner. Records every fact from NATS, publishes customer status
events (``status.<name>``), keeps the KV caches of accounts/credentials/suppressions/
endpoints, and serves the admin API on ADMIN_HOST:ADMIN_PORT (with /metrics /healthz
/readyz)."""

from __future__ import annotations

import asyncio

import asyncpg
import structlog
from mailgate_core.config import BaseSettings, ConfigError, Secret
from mailgate_core.service import ServiceBase
from prometheus_client import CollectorRegistry

from .admin import AdminContext, make_admin_app
from .console import ConsoleConfig, add_console
from .db import create_pool, ping
from .ingest import CONSUMERS, Ingestor
from .kvsync import KvCache, KvSync
from .metrics import LedgerMetrics
from .migrations import migrate
from .outbox import Outbox
from .partitions import PartitionKeeper
from .pull import LeanPullWorker
from .webhooks import Resolver, system_resolver

log = structlog.get_logger()


class Settings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "ledger"
    database_url: Secret
    admin_token: Secret
    admin_host: str = "0.0.0.0"
    admin_port: int = 8080
    domain: str = "localhost"
    batch_size: int = 256
    retention_days: int = 90
    """Facts and messages older than this go, a whole monthly partition at a time."""
    partition_months_ahead: int = 2
    webhook_allow_private: bool = False
    db_pool_size: int = 10
    outbox_interval_s: float = 1.0
    kv_resync_interval_s: float = 3600.0
    retention_interval_s: float = 3600.0
    grafana_url: str = ""
    """Linked from the operator console's overview (empty: no link)."""
    console_session_hours: float = 12.0
    console_trust_proxy: bool = False
    """Believe X-Forwarded-Proto/-For: the console is behind a TLS-terminating proxy."""
    console_login_max_failures: int = 5
    """Failed sign-ins per username (4x per client IP) per 15 minutes before a wait."""

    def validate(self) -> None:
        if not str(self.database_url).strip():
            raise ConfigError("config error: DATABASE_URL is required but empty")
        if len(str(self.admin_token).strip()) < 16:
            raise ConfigError("config error: ADMIN_TOKEN must be at least 16 characters")
        if self.batch_size < 1:
            raise ConfigError(f"config error: BATCH_SIZE={self.batch_size!r} must be positive")
        if self.console_session_hours <= 0 or self.console_login_max_failures < 1:
            raise ConfigError(
                "config error: CONSOLE_SESSION_HOURS and CONSOLE_LOGIN_MAX_FAILURES must be "
                "positive"
            )
        if self.retention_days < 1:
            raise ConfigError(
                f"config error: RETENTION_DAYS={self.retention_days!r} must be positive"
            )
        if not 0 <= self.partition_months_ahead <= 24:
            raise ConfigError(
                "config error: PARTITION_MONTHS_AHEAD="
                f"{self.partition_months_ahead!r} must be between 0 and 24"
            )


class LedgerService(ServiceBase):
    """ServiceBase plus the Postgres pool and the ledger's background loops."""

    settings: Settings

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None):
        super().__init__(settings, registry=registry)
        self.pool: asyncpg.Pool | None = None
        self.partitions: PartitionKeeper | None = None
        self.outbox: Outbox | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def stop(self) -> None:
        self.health.draining = True
        # Settle the batches in hand on every consumer at once (each waits out its fetch).
        await asyncio.gather(*(worker.stop() for worker in self.workers))
        await super().stop()
        if self.pool is not None:
            try:
                async with asyncio.timeout(10):
                    await self.pool.close()
            except TimeoutError:
                self.pool.terminate()

    async def cancel_tasks(self) -> None:
        """Cancel the background loops; cancel again if a library swallowed the first one."""
        pending = set(self.tasks)
        for _ in range(5):
            if not pending:
                break
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=2.0)
        if pending:
            log.warning("background tasks did not stop", tasks=[t.get_name() for t in pending])
        self.tasks.clear()


async def _maintenance_loop(
    partitions: PartitionKeeper, metrics: LedgerMetrics, interval_s: float
) -> None:
    """Create next months' partitions and apply retention, now and every ``interval_s``."""
    while True:
        try:
            created = await partitions.ensure_ahead()
            metrics.partitions_created.inc(len(created))
            result = await partitions.retention()
            metrics.partitions_dropped.inc(len(result.dropped))
            for table, count in result.deleted.items():
                metrics.retention_deleted.labels(table).inc(count)
            if result.dropped or any(result.deleted.values()):
                log.info("retention applied", dropped=result.dropped, **result.deleted)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("partition maintenance failed", error=repr(exc))
        await asyncio.sleep(interval_s)


async def build(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    resolver: Resolver = system_resolver,
) -> LedgerService:
    service = LedgerService(settings, registry=registry)
    await service.connect()
    try:
        pool = await create_pool(str(settings.database_url), max_size=settings.db_pool_size)
    except BaseException:
        if service.nc is not None:
            await service.nc.close()
        raise
    service.pool = pool
    partitions = PartitionKeeper(
        pool,
        ahead_months=settings.partition_months_ahead,
        retention_days=settings.retention_days,
    )
    service.partitions = partitions
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        await partitions.ensure_ahead()
        cache = KvCache(service.js)
        await cache.open()
    except BaseException:
        await pool.close()
        if service.nc is not None:
            await service.nc.close()
        raise

    metrics = LedgerMetrics(service.registry)
    kv = KvSync(pool, cache, interval_s=settings.kv_resync_interval_s)
    outbox = Outbox(pool, service.js, metrics, interval_s=settings.outbox_interval_s, nc=service.nc)
    service.outbox = outbox
    ingestor = Ingestor(pool, outbox, kv, metrics, partitions)
    for stream, durable, subject in CONSUMERS:
        service.workers.append(
            LeanPullWorker(
                service.js,
                stream,
                durable,
                subject,
                ingestor.handler(stream),
                batch=settings.batch_size,
                max_ack_pending=max(1000, settings.batch_size * 4),
                sync_acks=False,  # idempotent: a lost ack is a harmless redelivery
                nc=service.nc,
            )
        )

    admin_context = AdminContext(
        pool=pool,
        kv=kv,
        admin_token=str(settings.admin_token),
        allow_private_webhooks=settings.webhook_allow_private,
        domain=settings.domain,
        resolve=resolver,
        js=service.js,
        nc=service.nc,
        metrics=metrics,
        outbox=outbox,
        partitions=partitions,
        health=service.health,
    )
    admin = make_admin_app(admin_context)
    add_console(
        admin,
        admin_context,
        ConsoleConfig(
            session_hours=settings.console_session_hours,
            trust_proxy=settings.console_trust_proxy,
            grafana_url=settings.grafana_url,
            max_failures_per_user=settings.console_login_max_failures,
            max_failures_per_ip=settings.console_login_max_failures * 4,
        ),
    )
    service.add_http(admin, settings.admin_host, settings.admin_port)

    async def postgres_ready() -> bool:
        return await ping(pool)

    service.health.add_check("postgres", postgres_ready)
    service.health.add_check("kv_synced", lambda: kv.synced)

    async def start_loops() -> None:
        service.tasks += [
            asyncio.create_task(kv.run(), name="ledger:kv-resync"),
            asyncio.create_task(outbox.run(), name="ledger:outbox"),
            asyncio.create_task(
                _maintenance_loop(partitions, metrics, settings.retention_interval_s),
                name="ledger:partitions",
            ),
        ]

    service.on_start.append(start_loops)

    async def drain_outbox() -> None:
        await outbox.drain()

    service.on_stop.append(drain_outbox)
    service.on_stop.append(kv.stop)
    service.on_stop.append(service.cancel_tasks)
    return service
