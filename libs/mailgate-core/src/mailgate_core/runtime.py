"""Running a service process: settings, logging, signals and graceful shutdown.

``__main__`` of every service is::

    def main() -> None:
        run_service("postal-sender", Settings, build)

``build(settings)`` returns a ``Service``. On SIGTERM/SIGINT the service is marked draining
(``/readyz`` turns 503), ``stop()`` stops intake and finishes in-flight work within
``SHUTDOWN_GRACE_S``, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import structlog

from .config import BaseSettings, ConfigError, load_settings, redacted
from .logging import configure_logging
from .ops import Health


class Service(Protocol):
    health: Health

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=BaseSettings)


def run_service(name: str, settings_cls: type[S], build: Callable[[S], Awaitable[Service]]) -> None:
    try:
        settings = load_settings(settings_cls)
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(name, settings.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(name, settings, build))


async def _serve(name: str, settings: S, build: Callable[[S], Awaitable[Service]]) -> None:
    log = structlog.get_logger()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("starting", settings=redacted(settings))
    service = await build(settings)
    await service.start()
    log.info("started")
    await stop.wait()
    log.info("stopping")
    service.health.draining = True
    try:
        await asyncio.wait_for(service.stop(), timeout=settings.shutdown_grace_s)
    except TimeoutError:
        log.error("shutdown grace period exceeded", grace_s=settings.shutdown_grace_s)
    log.info("stopped")
