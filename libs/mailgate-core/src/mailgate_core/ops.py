"""/metrics, /healthz and /readyz for every service.

``/healthz`` answers 200 while the process runs its event loop (liveness). ``/readyz`` runs
the service's readiness checks (NATS connected, Postgres reachable, SMTP listening...) and
answers 503 with the failing check names while any fails or while the service is draining.
HTTP services mount these routes on their own app; the others start a small ops server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

ReadinessCheck = Callable[[], Awaitable[bool] | bool]


class Health:
    """Readiness state of one service: named checks plus a draining flag."""

    def __init__(self) -> None:
        self._checks: dict[str, ReadinessCheck] = {}
        self.draining = False

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    async def failing(self) -> list[str]:
        failed: list[str] = ["draining"] if self.draining else []
        for name, check in self._checks.items():
            try:
                result = check()
                if not isinstance(result, bool):
                    result = await asyncio.wait_for(result, timeout=2.0)
                ok = bool(result)
            except Exception:
                ok = False
            if not ok:
                failed.append(name)
        return failed


HEALTH_KEY = web.AppKey("mailgate_health", Health)
REGISTRY_KEY = web.AppKey("mailgate_registry", CollectorRegistry)

_json = msgspec.json.Encoder()


def add_ops_routes(app: web.Application, health: Health, registry: CollectorRegistry) -> None:
    app[HEALTH_KEY] = health
    app[REGISTRY_KEY] = registry
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(_request: web.Request) -> web.Response:
    return web.Response(body=_json.encode({"status": "ok"}), content_type="application/json")


async def _readyz(request: web.Request) -> web.Response:
    failing = await request.app[HEALTH_KEY].failing()
    status = 503 if failing else 200
    body = {"status": "ready" if not failing else "not ready", "failing": failing}
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


async def start_http(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start ``app`` on host:port; the caller stops it with ``await runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner


async def start_ops_server(
    health: Health, registry: CollectorRegistry, host: str, port: int
) -> web.AppRunner:
    app = web.Application()
    add_ops_routes(app, health, registry)
    return await start_http(app, host, port)
