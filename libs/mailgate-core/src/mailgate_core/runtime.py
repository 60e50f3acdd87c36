"""Running a service process: settings, logging, signals and graceful shutdown.

``__main__`` of every service is::

    def main() -> None:
        run_service("postal-sender", Settings, build)

``build(settings)`` returns a ``Service``. On SIGTERM/SIGINT the service is marked draining
(``/readyz`` turns 503), ``stop()`` stops intake and finishes in-flight work within
``SHUTDOWN_GRACE_S``, and the process exits 0.

The event loop is uvloop (libuv): a service spends much of its CPU in the loop and socket
writes, which uvloop does in C. ``EVENT_LOOP=asyncio`` selects the standard loop (for
comparisons, or if a library misbehaves under uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

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
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=loop_factory()) as runner,
    ):
        runner.run(_serve(name, settings, build))


def loop_factory(choice: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory unless ``EVENT_LOOP`` (or ``choice``) is ``asyncio`` or uvloop is
    not installed; ``None`` means asyncio's default loop."""
    wanted = (choice or os.environ.get("EVENT_LOOP", "uvloop")).strip().lower()
    if wanted == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of mailgate-core
        return None
    factory: Callable[[], Any] = uvloop.new_event_loop
    return factory


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
