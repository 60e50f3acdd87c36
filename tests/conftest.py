"""Shared fixtures: a real nats-server (JetStream, file storage, sync always) per test and a
real PostgreSQL per session with a fresh database per test.

``NATS_URL`` / ``DATABASE_URL`` in the environment point the suite at servers you run
yourself instead. With ``NATS_URL`` every stream and bucket on that server is deleted before
each test: never point it at a server that holds real mail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from mailgate_core.nats import provision
from mailgate_fakes.infra import NatsServer, Postgres, free_port


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
async def nats_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    external = os.environ.get("NATS_URL")
    if external:
        nc = await nats.connect(external)
        js = nc.jetstream()
        for name in await js.streams_info():
            await js.delete_stream(name.config.name)
        await nc.close()
        yield external
        return
    server: NatsServer = request.getfixturevalue("nats_server")
    yield server.url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


@pytest.fixture
async def js(nc: nats.NATS) -> nats.js.JetStreamContext:
    ctx = nc.jetstream()
    await provision(ctx)
    return ctx


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = Postgres(
        tmp_path_factory.mktemp("pg"), external_url=os.environ.get("DATABASE_URL")
    ).start()
    yield server
    server.stop()


@pytest.fixture
def database_url(postgres: Postgres) -> str:
    """A fresh, empty database for this test."""
    return postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def start_tracker(nats_url: str) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Start tracker services on free loopback ports (settings as keyword overrides); every one
    still running is stopped after the test. Shared here so the integration and security tests
    see the same factory."""
    from mailgate_tracker.app import Settings, TrackerService, build
    from prometheus_client import CollectorRegistry

    started: list[TrackerService] = []

    async def start(**overrides: Any) -> TrackerService:
        values: dict[str, Any] = {
            "nats_url": nats_url,
            "tracker_host": "127.0.0.1",
            "tracker_port": free_port(),
            "publish_timeout_s": 0.5,
            "tracker_flush_timeout_s": 5.0,
        }
        values.update(overrides)
        service = await build(Settings(**values), registry=CollectorRegistry())
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        if not service.health.draining:
            await service.stop()
