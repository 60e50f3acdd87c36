"""Optional batching per endpoint (``EndpointRecord.batch``): one POST carries a JSON array.

Each status message handed to ``submit`` waits (un-acked, so nothing is lost on a crash) until
its endpoint's batch is flushed, by size (``max_items`` or ``max_bytes``) or by time
(``max_wait_s`` after the batch's first item), then gets the batch's result as its own. The
array holds exactly the objects single deliveries carry, signed the same way over the whole
body; the ``webhook-id`` of a batch is derived from its event ids (``batch_webhook_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from mailgate_core.records import EndpointRecord
from mailgate_core.schemas import StatusEvent

from .delivery import AttemptResult, Deferred, Failed
from .payload import batch_body, batch_webhook_id

log = structlog.get_logger()

SendBatch = Callable[[EndpointRecord, str, bytes, int], Awaitable[AttemptResult]]
"""``(endpoint, webhook_id, body, item_count) -> result`` (the guarded POST)."""


@dataclass(frozen=True)
class BatchConfig:
    max_items: int = 100
    max_wait_s: float = 1.0
    max_bytes: int = 1_000_000


@dataclass
class _Item:
    event_id: str
    body: bytes
    future: asyncio.Future[AttemptResult]


@dataclass
class _Open:
    endpoint: EndpointRecord
    items: list[_Item] = field(default_factory=list)
    size: int = 2
    timer: asyncio.TimerHandle | None = None


class Batcher:
    def __init__(self, send: SendBatch, config: BatchConfig) -> None:
        self._send = send
        self.config = config
        self._open: dict[str, _Open] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(
        self, endpoint: EndpointRecord, event: StatusEvent, body: bytes
    ) -> AttemptResult:
        """Add one event to ``endpoint``'s open batch; return that batch's result."""
        cfg = self.config
        batch = self._open.get(endpoint.id)
        if batch is not None and batch.items and batch.size + len(body) + 1 > cfg.max_bytes:
            self._flush(endpoint.id)
            batch = None
        if batch is None:
            batch = _Open(endpoint)
            self._open[endpoint.id] = batch
        batch.endpoint = endpoint  # the newest registration (URL, secret) wins
        future: asyncio.Future[AttemptResult] = asyncio.get_running_loop().create_future()
        batch.items.append(_Item(event.event_id, body, future))
        batch.size += len(body) + 1
        if len(batch.items) >= cfg.max_items or batch.size >= cfg.max_bytes:
            self._flush(endpoint.id)
        elif batch.timer is None:
            batch.timer = asyncio.get_running_loop().call_later(
                cfg.max_wait_s, self._flush, endpoint.id
            )
        return await asyncio.shield(future)

    def _flush(self, endpoint_id: str) -> None:
        batch = self._open.pop(endpoint_id, None)
        if batch is None or not batch.items:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.create_task(self._deliver(batch), name=f"batch:{endpoint_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, batch: _Open) -> None:
        items = batch.items
        result: AttemptResult
        try:
            result = await self._send(
                batch.endpoint,
                batch_webhook_id([i.event_id for i in items]),
                batch_body([i.body for i in items]),
                len(items),
            )
        except asyncio.CancelledError:
            self._settle(items, Deferred("shutting down", 1.0))
            raise
        except Exception as exc:  # a bug, not the endpoint: retry later
            log.exception("batch delivery crashed", endpoint_id=batch.endpoint.id)
            result = Failed(f"internal error: {type(exc).__name__}")
        self._settle(items, result)

    @staticmethod
    def _settle(items: list[_Item], result: AttemptResult) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_result(result)

    async def close(self) -> None:
        """Flush what is open and wait for the batches in flight."""
        for endpoint_id in list(self._open):
            self._flush(endpoint_id)
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)
