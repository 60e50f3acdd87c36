"""The asyncpg pool: jsonb decoded with msgspec, short timeouts, a readiness probe."""

from __future__ import annotations

import asyncpg
import msgspec

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
