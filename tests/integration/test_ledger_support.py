"""Shared fixture and helpers for the ledger's integration tests (holds no tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from mailgate_core.config import Secret
from mailgate_core.schemas import StatusEvent, decode
from mailgate_fakes.infra import free_port
from mailgate_ledger.app import LedgerService, Settings, build
from prometheus_client import CollectorRegistry

ADMIN_TOKEN = "admin-token-for-tests-0123456789"

StartLedger = Callable[..., Awaitable[LedgerService]]


class Ledger:
    """A running ledger plus an HTTP client for its admin API."""

    def __init__(self, service: LedgerService, http: aiohttp.ClientSession) -> None:
        self.service = service
        self.http = http
        settings = service.settings
        self.base = f"http://127.0.0.1:{settings.admin_port}"

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = ADMIN_TOKEN,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else msgspec.json.encode(body))
        async with self.http.request(method, self.base + path, data=data, headers=headers) as r:
            text = await r.read()
            ctype = r.headers.get("Content-Type", "")
            value = msgspec.json.decode(text) if "json" in ctype and text else text
            return r.status, value, r.headers


def ledger_settings(database_url: str, nats_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "database_url": Secret(database_url),
        "admin_token": Secret(ADMIN_TOKEN),
        "admin_host": "127.0.0.1",
        "admin_port": free_port(),
        "webhook_allow_private": True,
        "outbox_interval_s": 0.2,
        "batch_size": 64,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def start_ledger(database_url: str, nats_url: str, js: Any) -> AsyncIterator[StartLedger]:
    """``await start_ledger(**settings)`` -> a started Ledger; all stopped at teardown."""
    running: list[tuple[LedgerService, aiohttp.ClientSession]] = []

    async def start(*, resolver: Any = None, **overrides: Any) -> Ledger:
        extra = {"resolver": resolver} if resolver is not None else {}
        service = await build(
            ledger_settings(database_url, nats_url, **overrides),
            registry=CollectorRegistry(),
            **extra,
        )
        await service.start()
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        running.append((service, http))
        return Ledger(service, http)

    yield start
    for service, http in running:
        await http.close()
        if not service.health.draining:
            try:
                async with asyncio.timeout(15):
                    await service.stop()
            except TimeoutError:
                for task in asyncio.all_tasks():  # show what did not stop
                    task.print_stack()
                raise


async def status_events(js: Any) -> list[StatusEvent]:
    """Every event on the STATUS stream, in stream order."""
    info = await js.stream_info("STATUS")
    out: list[StatusEvent] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg("STATUS", seq)
        out.append(decode(msg.data, StatusEvent))
    return out
