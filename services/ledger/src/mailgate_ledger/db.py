"""The asyncpg pool: jsonb decoded with msgspec, short timeouts, a readiness probe."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, overload

import asyncpg
import msgspec

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    #: A connection of its own or one borrowed from the pool (``pool.acquire()``): the
    #: functions that run SQL take either.
    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]


class Row(Protocol):
    """A result row as the ledger reads it: asyncpg's ``Record`` (columns by name, no
    mapping iteration) or a dict of the same columns."""

    def __getitem__(self, key: str, /) -> Any: ...
    @overload
    def get(self, key: str, /) -> Any: ...
    @overload
    def get(self, key: str, default: Any, /) -> Any: ...
    def keys(self) -> Iterable[str]: ...


_encoder = msgspec.json.Encoder()


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: _encoder.encode(value).decode(),
        decoder=msgspec.json.decode,
        schema="pg_catalog",
        format="text",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Released connections skip asyncpg's session reset (unlock, close cursors, unlisten,
    RESET ALL: a round trip per release). The ledger leaves no session state behind: settings
    are ``SET LOCAL``, cursors live in transactions, the migration lock is released in a
    ``finally``; asyncpg still rolls back a transaction left open."""


async def create_pool(database_url: str, *, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=max_size,
        timeout=10,
        command_timeout=60,
        init=_init_connection,
        reset=_keep_session,
        server_settings={
            "application_name": "mailgate-ledger",
        },
    )
    assert pool is not None
    return pool


async def ping(pool: asyncpg.Pool) -> bool:
    async with pool.acquire(timeout=2) as conn:
        return bool(await conn.fetchval("SELECT 1", timeout=2))
