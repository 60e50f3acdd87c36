"""Which suppression keys exist, without a NATS round trip per recipient.

Almost no recipient of a campaign is suppressed, yet each cost a KV ``get`` (a request,
its reply and a socket write each way: about a tenth of smtp-ingest's CPU per message
and the nats-server's work). ``SuppressionIndex`` keeps a Bloom filter of every key in
the ``suppressions`` bucket, filled by a KV watcher (the bucket's keys, not its values:
about 10 bits per key, 1.2 MB for a million suppressions). A key the filter has never
seen is certainly not suppressed; any other key (a real suppression, a deleted one, a 1%
false positive) is read with ``get`` as before, so the answer is always the bucket's.

The filter is trusted only while it is known complete: after its first full snapshot,
while its watcher runs, and only if the NATS connection has not reconnected since that
snapshot began (a watcher may not survive a server restart). It is rebuilt from a new
snapshot every ``resync_s``; until then, and whenever it is not trusted, every recipient
is read with ``get``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from typing import Any

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

log = structlog.get_logger()

_DELETE_OPS = {"DEL", "PURGE"}
#: Hash functions; with ~9.6 bits per key this gives about 1% false positives.
_HASHES = 7


class BloomFilter:
    """A set of strings without false negatives; about 1% false positives up to
    ``capacity`` keys (more past it: those only cost a ``get``)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1024, capacity)
        self._bits = math.ceil(self.capacity * -math.log(0.01) / (math.log(2) ** 2))
        self._array = bytearray((self._bits + 7) // 8)
        self.count = 0

    def _positions(self, key: str) -> list[int]:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        first = int.from_bytes(digest[:8], "little")
        step = int.from_bytes(digest[8:], "little") | 1
        bits = self._bits
        return [(first + i * step) % bits for i in range(_HASHES)]

    def add(self, key: str) -> None:
        array = self._array
        for position in self._positions(key):
            array[position >> 3] |= 1 << (position & 7)
        self.count += 1

    def __contains__(self, key: str) -> bool:
        """``_positions`` one at a time, stopping at the first clear bit: a key that is not
        in the set (nearly every recipient) usually costs the hash and one probe."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        position = int.from_bytes(digest[:8], "little")
        step = int.from_bytes(digest[8:], "little") | 1
        bits = self._bits
        array = self._array
        for _ in range(_HASHES):
            at = position % bits
            if not array[at >> 3] >> (at & 7) & 1:
                return False
            position += step
        return True


class SuppressionIndex:
    """The keys of one KV bucket, as a Bloom filter kept current by a watcher."""

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        *,
        resync_s: float = 300.0,
        timeout_s: float = 2.0,
        reconnects: Any = None,
    ) -> None:
        self._js = js
        self.bucket = bucket
        self._resync_s = resync_s
        self._timeout_s = timeout_s
        self._reconnects = reconnects or (lambda: 0)
        """Returns the NATS connection's reconnect count (``nc.stats["reconnects"]``)."""
        self._filter: BloomFilter | None = None
        self._filter_reconnects = -1
        self._rebuilding = True
        self._task: asyncio.Task[None] | None = None

    @property
    def trusted(self) -> bool:
        """The filter holds every key of the bucket (see the module docstring)."""
        return (
            self._filter is not None
            and not self._rebuilding
            and self._task is not None
            and not self._task.done()
            and self._reconnects() == self._filter_reconnects
        )

    def rules_out(self, key: str) -> bool:
        """``True`` when ``key`` is certainly not in the bucket (no ``get`` needed)."""
        current = self._filter
        return current is not None and self.trusted and key not in current

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-index:{self.bucket}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._filter = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            watcher = None
            try:
                async with asyncio.timeout(self._timeout_s):
                    kv = await self._js.key_value(self.bucket)
                # Until the new snapshot is complete, every lookup is a get: a key put
                # now may come at the end of a long snapshot.
                self._rebuilding = True
                reconnects = self._reconnects()
                watcher = await kv.watchall(meta_only=True)
                capacity = 2 * self._filter.count if self._filter is not None else 0
                building: BloomFilter | None = BloomFilter(max(65_536, capacity))
                deadline = loop.time() + self._resync_s
                while (remaining := deadline - loop.time()) > 0:
                    try:
                        entry = await watcher.updates(timeout=min(remaining, 5.0))  # type: ignore[no-untyped-call]
                    except nats.errors.TimeoutError:
                        continue
                    if entry is None:  # the snapshot is complete
                        if building is not None:
                            self._filter, self._filter_reconnects = building, reconnects
                            self._rebuilding = False
                            building = None
                        continue
                    if not isinstance(entry, KeyValue.Entry):
                        break  # the watcher was stopped under us
                    if entry.operation in _DELETE_OPS:
                        continue  # (stays in the filter: a deleted key only costs a get)
                    (building or self._filter or BloomFilter(0)).add(entry.key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("kv index watch failed", bucket=self.bucket, error=str(exc))
                self._filter = None  # untrusted until a new snapshot completes
                await asyncio.sleep(1.0)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]
