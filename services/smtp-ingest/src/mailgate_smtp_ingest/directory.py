"""Ledger-owned state read from NATS KV: credentials and accounts cached by watchers,
suppressions looked up per recipient.

Credentials and accounts are small and read on every connection, so each bucket is mirrored
in memory by a KV watcher: changes (a new password, a disabled account) apply live. The
watcher is re-created every ``resync_s`` and the mirror replaced wholesale from its initial
snapshot, so a watcher that silently died (NATS restarted) costs at most one resync period.
A cache miss falls back to a direct ``get`` (a credential created a moment ago).
Suppression lists can be large, so they are not mirrored: a Bloom filter of their keys
(suppression_index.py) answers "certainly not suppressed" for nearly every recipient, and
any other recipient is read with ``get``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Generic, TypeVar

import msgspec
import nats.errors
import nats.js.errors
import structlog
from mailgate_core.nats import KV_ACCOUNTS, KV_CREDENTIALS, KV_SUPPRESSIONS
from mailgate_core.records import (
    AccountRecord,
    CredentialRecord,
    SuppressionRecord,
    suppression_key,
)
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from .replies import TransientError
from .suppression_index import SuppressionIndex

log = structlog.get_logger()

T = TypeVar("T")

_DELETE_OPS = {"DEL", "PURGE"}
_MISSING = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)


class KvMirror(Generic[T]):
    """An in-memory copy of one KV bucket, kept current by a watcher."""

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        record_type: type[T],
        *,
        resync_s: float = 60.0,
        timeout_s: float = 2.0,
    ):
        self._js = js
        self.bucket = bucket
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(record_type)
        self._resync_s = resync_s
        self._timeout_s = timeout_s
        self._items: dict[str, T] = {}
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._kv: KeyValue | None = None

    @property
    def synced(self) -> bool:
        """The first full snapshot has been loaded."""
        return self._synced.is_set()

    def __len__(self) -> int:
        return len(self._items)

    async def start(self, *, timeout_s: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-mirror:{self.bucket}")
        try:
            await asyncio.wait_for(self._synced.wait(), timeout_s)
        except TimeoutError:
            log.warning("kv mirror not synced at start", bucket=self.bucket)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def get(self, key: str) -> T | None:
        return self._items.get(key)

    async def fetch(self, key: str) -> T | None:
        """The cached record, or a direct read when the watcher has not delivered it yet."""
        cached = self._items.get(key)
        if cached is not None:
            return cached
        try:
            kv = await self._bucket()
            async with asyncio.timeout(self._timeout_s):
                entry = await kv.get(key)
        except _MISSING:
            return None
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            raise TransientError(f"kv {self.bucket}: {type(exc).__name__}") from exc
        record = self._decode(key, entry.value)
        if record is not None:
            self._items.setdefault(key, record)
        return record

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            async with asyncio.timeout(self._timeout_s):
                self._kv = await self._js.key_value(self.bucket)
        return self._kv

    def _decode(self, key: str, value: bytes | None) -> T | None:
        if not value:
            return None
        try:
            return self._decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("kv record undecodable", bucket=self.bucket, key=key, error=str(exc))
            return None

    def _apply(self, target: dict[str, T], entry: Any) -> None:
        if entry.operation in _DELETE_OPS:
            target.pop(entry.key, None)
            return
        record = self._decode(entry.key, entry.value)
        if record is None:
            target.pop(entry.key, None)
        else:
            target[entry.key] = record

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            watcher = None
            try:
                kv = await self._bucket()
                watcher = await kv.watchall()
                snapshot: dict[str, T] | None = {}
                deadline = loop.time() + self._resync_s
                while (remaining := deadline - loop.time()) > 0:
                    try:
                        entry = await watcher.updates(timeout=min(remaining, 5.0))  # type: ignore[no-untyped-call]
                    except nats.errors.TimeoutError:
                        continue
                    if entry is None:  # end of the initial snapshot
                        if snapshot is not None:
                            self._items = snapshot
                            snapshot = None
                            self._synced.set()
                        continue
                    if not isinstance(entry, KeyValue.Entry):
                        break  # the watcher was stopped under us
                    self._apply(self._items if snapshot is None else snapshot, entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("kv watch failed", bucket=self.bucket, error=str(exc))
                self._kv = None
                await asyncio.sleep(1.0)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]


class Directory:
    """Credentials, accounts and suppressions, as smtp-ingest needs them."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        resync_s: float = 60.0,
        timeout_s: float = 2.0,
        suppression_index: SuppressionIndex | None = None,
    ):
        self._js = js
        self.suppression_index = suppression_index
        self._timeout_s = timeout_s
        self.credentials = KvMirror(
            js, KV_CREDENTIALS, CredentialRecord, resync_s=resync_s, timeout_s=timeout_s
        )
        self.accounts = KvMirror(
            js, KV_ACCOUNTS, AccountRecord, resync_s=resync_s, timeout_s=timeout_s
        )
        self._suppressions: KeyValue | None = None
        self._suppression_decoder = msgspec.json.Decoder(SuppressionRecord)

    @property
    def synced(self) -> bool:
        return self.credentials.synced and self.accounts.synced

    async def start(self) -> None:
        if self.suppression_index is not None:
            await self.suppression_index.start()  # (not awaited: gets until it is complete)
        await asyncio.gather(self.credentials.start(), self.accounts.start())

    async def stop(self) -> None:
        await asyncio.gather(self.credentials.stop(), self.accounts.stop())
        if self.suppression_index is not None:
            await self.suppression_index.stop()

    async def credential(self, username: str) -> CredentialRecord | None:
        return await self.credentials.fetch(username)

    async def account(self, account_id: str) -> AccountRecord | None:
        return await self.accounts.fetch(account_id)

    async def suppression(self, account_id: str, email: str) -> SuppressionRecord | None:
        """The suppression of ``email`` for the account; TransientError when KV is down."""
        key = suppression_key(account_id, email)
        if self.suppression_index is not None and self.suppression_index.rules_out(key):
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._suppressions is None:
                    self._suppressions = await self._js.key_value(KV_SUPPRESSIONS)
                entry = await self._suppressions.get(key)
        except _MISSING:
            return None
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            raise TransientError(f"kv {KV_SUPPRESSIONS}: {type(exc).__name__}") from exc
        if not entry.value:
            return None
        try:
            return self._suppression_decoder.decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("kv record undecodable", bucket=KV_SUPPRESSIONS, key=key)
            return None
