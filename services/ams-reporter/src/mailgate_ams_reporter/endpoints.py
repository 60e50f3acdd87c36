"""A live in-memory copy of the ``endpoints`` KV bucket (ledger writes it, we watch it).

Key = account id, value = ``AccountEndpoints``. The watcher delivers the current value of
every key first, then each change as it happens, so a registration or removal through the
admin API applies to the next delivery attempt without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import structlog
from mailgate_core.nats import KV_ENDPOINTS
from mailgate_core.records import AccountEndpoints, EndpointRecord
from nats.js import JetStreamContext

log = structlog.get_logger()

_decoder = msgspec.json.Decoder(AccountEndpoints)
_DELETES = frozenset({"DEL", "PURGE"})


class EndpointCache:
    def __init__(self, js: JetStreamContext, *, bucket: str = KV_ENDPOINTS) -> None:
        self._js = js
        self._bucket = bucket
        self._by_account: dict[str, AccountEndpoints] = {}
        self.loaded = asyncio.Event()
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None

    def endpoints(self, account_id: str) -> list[EndpointRecord]:
        record = self._by_account.get(account_id)
        return list(record.endpoints) if record is not None else []

    def find(self, account_id: str, endpoint_id: str) -> EndpointRecord | None:
        """The endpoint's current registration (URL and secret may have changed since)."""
        record = self._by_account.get(account_id)
        if record is None:
            return None
        return next((e for e in record.endpoints if e.id == endpoint_id), None)

    def __len__(self) -> int:
        return len(self._by_account)

    def apply(self, key: str, operation: str | None, value: bytes | None) -> None:
        """Apply one KV entry (pure state change; bad values are logged and dropped)."""
        if operation in _DELETES or not value:
            self._by_account.pop(key, None)
            return
        try:
            record = _decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("bad endpoints record", account_id=key, error=str(exc))
            self._by_account.pop(key, None)
            return
        self._by_account[key] = record

    async def start(self, *, timeout_s: float = 10.0) -> None:
        """Start watching and wait until the bucket's current contents are loaded."""
        kv = await self._js.key_value(self._bucket)
        self._watcher = await kv.watchall()
        self._task = asyncio.create_task(self._run(), name="endpoints-watch")
        await asyncio.wait_for(self.loaded.wait(), timeout=timeout_s)
        log.info("endpoints loaded", accounts=len(self._by_account))

    async def _run(self) -> None:
        async for entry in self._watcher:
            if entry is None:  # end of the initial snapshot
                self.loaded.set()
                continue
            self.apply(entry.key, entry.operation, entry.value)

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()
            # Bounded: nats-py may swallow the cancellation inside the watcher.
            await asyncio.wait({self._task}, timeout=2.0)
