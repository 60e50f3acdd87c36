"""Shared fixtures and helpers for ams-reporter's integration tests (holds no tests)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aiohttp import web
from mailgate_ams_reporter.app import AmsReporter, Settings, build
from mailgate_core.nats import KV_ENDPOINTS
from mailgate_core.records import AccountEndpoints, EndpointRecord
from mailgate_core.schemas import MessageRef, StatusEvent
from mailgate_fakes.infra import free_port
from prometheus_client import CollectorRegistry

RAW_KEY = b"k" * 32
SECRET = "whsec_" + base64.b64encode(RAW_KEY).decode()


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    """time.time() when the request arrived."""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver on loopback: answers with scripted statuses (then 200), hangs on
    the paths in ``hang`` (until the client gives up), records every request."""

    port: int
    script: dict[str, list[int]] = field(default_factory=dict)
    """Per path, the statuses of the next answers (then ``default``)."""
    default: dict[str, int] = field(default_factory=dict)
    """Per path, the status once the script is used up (200 when absent)."""
    hang: set[str] = field(default_factory=set)
    response_text: str = "ok"
    calls: list[Call] = field(default_factory=list)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def on(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]

    def bodies(self, path: str) -> list[Any]:
        return [c.json() for c in self.on(path)]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(port=free_port())

    async def hook(request: web.Request) -> web.Response:
        rec.calls.append(
            Call(request.path, dict(request.headers), await request.read(), time.time())
        )
        if request.path in rec.hang:
            await asyncio.sleep(3600)
        queue = rec.script.get(request.path, [])
        status = queue.pop(0) if queue else rec.default.get(request.path, 200)
        return web.Response(status=status, text=rec.response_text)

    app = web.Application()
    app.router.add_post("/{name}", hook)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", rec.port).start()
    yield rec
    await runner.cleanup()


StartReporter = Callable[..., Awaitable[AmsReporter]]

FAST = dict(
    webhook_allow_private=True,
    webhook_timeout_s=2.0,
    retry_base_s=0.05,
    retry_max_delay_s=0.2,
    webhook_batch_max_wait_s=0.2,
)


@pytest.fixture
async def start_reporter(nats_url: str) -> AsyncIterator[StartReporter]:
    """Builds and starts ams-reporters; stops those still running at the end."""
    started: list[AmsReporter] = []

    async def factory(**overrides: Any) -> AmsReporter:
        values: dict[str, Any] = dict(nats_url=nats_url, ops_host="127.0.0.1", ops_port=free_port())
        values.update(FAST)
        values.update(overrides)
        service = await build(Settings(**values), registry=CollectorRegistry())
        await service.start()
        started.append(service)
        return service

    yield factory
    for service in started:
        if not service.health.draining:
            await service.stop()


def status_event(
    name: str = "delivered",
    account_id: str = "acc1",
    *,
    campaign_id: str | None = "73",
    mailgate_id: str = "01JMAILGATE000000000000000",
    **data: Any,
) -> StatusEvent:
    return StatusEvent(
        name=name,  # type: ignore[arg-type]
        timestamp=1700000000,
        data=data,
        message=MessageRef(
            mailgate_id=mailgate_id,
            account_id=account_id,
            recipient="user@example.com",
            external_id="AMS-42",
            campaign_id=campaign_id,
        ),
    )


async def put_endpoints(js: Any, account_id: str, *endpoints: EndpointRecord) -> None:
    kv = await js.key_value(KV_ENDPOINTS)
    record = AccountEndpoints(account_id=account_id, endpoints=list(endpoints))
    await kv.put(account_id, msgspec.json.encode(record))


def endpoint(id: str, url: str, **kw: Any) -> EndpointRecord:
    return EndpointRecord(id=id, url=url, secret=SECRET, **kw)


def metric(service: AmsReporter, name: str, **labels: str) -> float:
    return service.registry.get_sample_value(name, labels) or 0.0


def outcome(service: AmsReporter, name: str) -> float:
    return metric(service, "mailgate_webhook_deliveries_total", outcome=name)


async def settled(js: Any, stream: str = "STATUS", durable: str = "ams-reporter") -> bool:
    """Nothing left to do on the consumer: no pending and nothing waiting for an ack."""
    info = await js.consumer_info(stream, durable)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def all_settled(js: Any) -> bool:
    return await settled(js) and await settled(js, "WEBHOOK_RETRY", "ams-reporter-retry")
