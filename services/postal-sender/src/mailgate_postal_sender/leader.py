"""Leader election through one KV key (bucket ``postal-sender-locks``, TTL = the lease).

A replica becomes leader by *creating* the key (it succeeds only when the key is absent) and
stays leader by *updating* it with the revision it last wrote (compare-and-set) every third
of the lease. A leader that dies stops renewing; the bucket's TTL removes the key and another
replica's create succeeds. A clean stop deletes the key so the next leader starts at once.

The lock keeps the reconciler's work (Postal API calls) to one replica. It is not needed
for correctness: reconciled events have deterministic ids, so two leaders for a moment
publish duplicates JetStream drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import nats.errors
import nats.js.errors
import structlog

log = structlog.get_logger()

_NATS_TRANSIENT = (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError)


class LeaderLock:
    def __init__(self, kv: Any, key: str, owner: str, ttl_s: float):
        self._kv = kv
        self.key = key
        self.owner = owner
        self.ttl_s = ttl_s
        self.is_leader = False
        self._revision: int | None = None
        self._renewed_at = 0.0

    @property
    def renew_every_s(self) -> float:
        return self.ttl_s / 3.0

    async def step(self) -> bool:
        """Acquire or renew once; return whether this replica leads now."""
        now = time.monotonic()
        if self.is_leader:
            try:
                self._revision = await self._kv.update(
                    self.key, self.owner.encode(), last=self._revision
                )
                self._renewed_at = now
            except nats.js.errors.KeyWrongLastSequenceError:
                self._lose("lock taken over")
            except _NATS_TRANSIENT as exc:
                # Past most of the lease another replica may already hold the key.
                if now - self._renewed_at > self.ttl_s * 0.6:
                    self._lose(f"lock not renewed: {exc}")
            return self.is_leader
        try:
            self._revision = await self._kv.create(self.key, self.owner.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except _NATS_TRANSIENT as exc:
            log.debug("leader lock not acquired", error=str(exc))
            return False
        self.is_leader = True
        self._renewed_at = now
        log.info("leadership acquired", lock=self.key, owner=self.owner)
        return True

    def _lose(self, why: str) -> None:
        self.is_leader = False
        self._revision = None
        log.warning("leadership lost", lock=self.key, reason=why)

    async def run(self, stopping: asyncio.Event) -> None:
        """Keep stepping until ``stopping`` is set, then release the lock."""
        while not stopping.is_set():
            await self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self.renew_every_s)
        await self.release()

    async def release(self) -> None:
        if not self.is_leader:
            return
        self.is_leader = False
        with contextlib.suppress(Exception):
            await self._kv.delete(self.key, last=self._revision)
        log.info("leadership released", lock=self.key)
