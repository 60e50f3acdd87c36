"""What every service process has: NATS + JetStream, health, metrics, workers, HTTP runners.

A service's ``build(settings)`` creates a ``ServiceBase`` (or subclass), registers its pull
workers and HTTP apps, and returns it; ``run_service`` starts and stops it. Tests pass in
their own ``CollectorRegistry`` and a local NATS URL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from . import nats_wire
from .config import BaseSettings
from .nats import ConsumerLag, PullWorker, connect, provision
from .ops import Health, add_ops_routes, start_http


class ServiceBase:
    """Lifecycle: ``await connect()`` in build, ``start()`` opens intake, ``stop()`` drains."""

    def __init__(self, settings: BaseSettings, *, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.health = Health()
        self.nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self.workers: list[PullWorker] = []
        self.apps: list[tuple[web.Application, str, int]] = []
        self.runners: list[web.AppRunner] = []
        self.on_stop: list[Callable[[], Awaitable[Any]]] = []
        self.on_start: list[Callable[[], Awaitable[Any]]] = []
        self.consumer_lag: ConsumerLag | None = None

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "connect() first"
        return self._js

    async def connect(self) -> None:
        self.nc = await connect(self.settings.nats_url, self.settings.service_name)
        self._js = self.nc.jetstream(timeout=10)
        await provision(self._js, replicas=self.settings.jetstream_replicas)
        nc = self.nc
        self.health.add_check("nats", lambda: nc.is_connected)

    def add_http(self, app: web.Application, host: str, port: int, *, ops: bool = True) -> None:
        """Serve ``app`` (with /metrics /healthz /readyz when ``ops``) once started."""
        if ops:
            add_ops_routes(app, self.health, self.registry)
        self.apps.append((app, host, port))

    def add_ops_server(self) -> None:
        """A bare ops server on OPS_HOST:OPS_PORT for services with no HTTP app of their own."""
        self.add_http(web.Application(), self.settings.ops_host, self.settings.ops_port)

    async def start(self) -> None:
        for app, host, port in self.apps:
            self.runners.append(await start_http(app, host, port))
        for worker in self.workers:
            await worker.start()
        for hook in self.on_start:
            await hook()
        self.health.add_check("workers", lambda: all(w.running for w in self.workers))
        self._start_consumer_lag()

    def _start_consumer_lag(self) -> None:
        """Backlog gauges of this service's pull consumers (dashboards and alerts read them)."""
        interval_s = self.settings.consumer_lag_interval_s
        if not self.workers or interval_s <= 0 or self.consumer_lag is not None:
            return
        try:
            self.consumer_lag = ConsumerLag(self.js, self.registry, interval_s=interval_s)
        except ValueError:  # a registry shared with another service already has the gauges
            return
        for worker in self.workers:
            self.consumer_lag.watch(worker.stream, worker.durable)
        self.consumer_lag.start()

    async def stop(self) -> None:
        """Stop intake, finish in-flight work and settle it, then close connections."""
        self.health.draining = True
        if self.consumer_lag is not None:
            await self.consumer_lag.stop()
        for hook in self.on_stop:  # intake first (e.g. close the SMTP listener)
            with contextlib.suppress(Exception):
                await hook()
        for runner in self.runners:  # HTTP: stop accepting, let in-flight requests finish
            await runner.cleanup()
        for worker in self.workers:  # settle the batch in hand
            await worker.stop()
        if self.nc is not None and not self.nc.is_closed:
            # The event publishes' reply subscription: its acks still awaited come in, then it
            # goes (a drain would cut them off); a late publish takes nats-py's path.
            with contextlib.suppress(Exception):
                await nats_wire.close_connection_requests(self.nc)
            with contextlib.suppress(Exception):
                await self.nc.drain()
