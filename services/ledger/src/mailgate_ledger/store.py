"""Postgres access for the admin API: one function per question, rows in, plain values out."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

Row = Mapping[str, Any]


# --- accounts ----------------------------------------------------------------------------


async def insert_account(
    conn: asyncpg.Connection,
    *,
    account_id: str,
    name: str,
    allowed_sender_domains: list[str],
    postal_api_key: str | None,
    tracking: bool,
    api_token_hash: str,
    api_token_prefix: str,
) -> Row:
    return await conn.fetchrow(  # type: ignore[no-any-return]
        """INSERT INTO accounts (id, name, allowed_sender_domains, postal_api_key, tracking,
                                 api_token_hash, api_token_prefix)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *""",
        account_id,
        name,
        allowed_sender_domains,
        postal_api_key,
        tracking,
        api_token_hash,
        api_token_prefix,
    )


async def get_account(conn: asyncpg.Connection, account_id: str) -> Row | None:
    return await conn.fetchrow("SELECT * FROM accounts WHERE id = $1", account_id)  # type: ignore[no-any-return]


async def account_by_token_hash(conn: asyncpg.Connection, token_hash: str) -> Row | None:
    return await conn.fetchrow(  # type: ignore[no-any-return]
        "SELECT * FROM accounts WHERE api_token_hash = $1 AND NOT disabled", token_hash
    )


async def list_accounts(conn: asyncpg.Connection, *, limit: int, cursor: str | None) -> list[Row]:
    return await conn.fetch(  # type: ignore[no-any-return]
        """SELECT * FROM accounts WHERE ($1::text IS NULL OR id > $1)
           ORDER BY id LIMIT $2""",
        cursor,
        limit,
    )


_ACCOUNT_COLUMNS = ("name", "allowed_sender_domains", "postal_api_key", "tracking", "disabled")


async def update_account(
    conn: asyncpg.Connection, account_id: str, changes: dict[str, Any]
) -> Row | None:
    sets = [c for c in _ACCOUNT_COLUMNS if c in changes]
    if not sets:
        return await get_account(conn, account_id)
    assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(sets, start=2))
    return await conn.fetchrow(  # type: ignore[no-any-return]
        f"UPDATE accounts SET {assignments} WHERE id = $1 RETURNING *",  # noqa: S608 - fixed names
        account_id,
        *(changes[c] for c in sets),
    )


async def set_account_token(
    conn: asyncpg.Connection, account_id: str, token_hash: str, prefix: str
) -> Row | None:
    return await conn.fetchrow(  # type: ignore[no-any-return]
        """UPDATE accounts SET api_token_hash = $2, api_token_prefix = $3
           WHERE id = $1 RETURNING *""",
        account_id,
        token_hash,
        prefix,
    )


# --- credentials -------------------------------------------------------------------------


async def insert_credential(
    conn: asyncpg.Connection,
    *,
    username: str,
    account_id: str,
    name: str,
    password_hash: str,
    rate_per_second: float | None,
    daily_limit: int | None,
    allowed_ips: list[str],
) -> Row | None:
    """The new row, or ``None`` when the username is taken."""
    return await conn.fetchrow(  # type: ignore[no-any-return]
        """INSERT INTO credentials (username, account_id, name, password_hash, rate_per_second,
                                    daily_limit, allowed_ips)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (username) DO NOTHING RETURNING *""",
        username,
        account_id,
        name,
        password_hash,
        rate_per_second,
        daily_limit,
        allowed_ips,
    )


async def list_credentials(conn: asyncpg.Connection, account_id: str) -> list[Row]:
    return await conn.fetch(  # type: ignore[no-any-return]
        "SELECT * FROM credentials WHERE account_id = $1 ORDER BY created_at, username", account_id
    )


async def set_credential_disabled(
    conn: asyncpg.Connection, account_id: str, username: str, disabled: bool
) -> Row | None:
    return await conn.fetchrow(  # type: ignore[no-any-return]
        """UPDATE credentials SET disabled = $3 WHERE account_id = $1 AND username = $2
           RETURNING *""",
        account_id,
        username,
        disabled,
    )


# --- messages ----------------------------------------------------------------------------


async def get_message(conn: asyncpg.Connection, mailgate_id: str) -> Row | None:
    return await conn.fetchrow("SELECT * FROM messages WHERE mailgate_id = $1", mailgate_id)  # type: ignore[no-any-return]


async def message_events(conn: asyncpg.Connection, mailgate_id: str) -> list[Row]:
    return await conn.fetch(  # type: ignore[no-any-return]
        """SELECT event_id, subject, name, status_name, status_pending, occurred_at, recorded_at,
                  data
           FROM events WHERE mailgate_id = $1 ORDER BY occurred_at, recorded_at, event_id""",
        mailgate_id,
    )


async def find_messages(
    conn: asyncpg.Connection,
    *,
    external_id: str | None,
    email: str | None,
    campaign_id: str | None,
    postal_id: int | None,
    account_id: str | None,
    status: str | None,
    limit: int,
    cursor: str | None,
) -> list[Row]:
    """Newest first (mailgate ids are ULIDs, so they sort by time); ``cursor`` = last id."""
    return await conn.fetch(  # type: ignore[no-any-return]
        """SELECT * FROM messages
           WHERE ($1::text IS NULL OR external_id = $1)
             AND ($2::text IS NULL OR lower(recipient) = lower($2))
             AND ($3::text IS NULL OR campaign_id = $3)
             AND ($4::bigint IS NULL OR postal_id = $4)
             AND ($5::text IS NULL OR account_id = $5)
             AND ($6::text IS NULL OR status = $6)
             AND ($7::text IS NULL OR mailgate_id < $7)
           ORDER BY mailgate_id DESC LIMIT $8""",
        external_id,
        email,
        campaign_id,
        postal_id,
        account_id,
        status,
        cursor,
        limit,
    )


# --- suppressions ------------------------------------------------------------------------


async def list_suppressions(
    conn: asyncpg.Connection, account_id: str, *, limit: int | None, cursor: str | None
) -> list[Row]:
    return await conn.fetch(  # type: ignore[no-any-return]
        """SELECT account_id, email, reason, created_at FROM suppressions
           WHERE account_id = $1 AND ($2::text IS NULL OR email > $2)
           ORDER BY email LIMIT $3""",
        account_id,
        cursor,
        limit,
    )


async def upsert_suppressions(
    conn: asyncpg.Connection, account_id: str, entries: Sequence[tuple[str, str]]
) -> list[Row]:
    """Add or re-reason ``(email, reason)`` pairs; rows carry ``inserted``."""
    return await conn.fetch(  # type: ignore[no-any-return]
        """INSERT INTO suppressions (account_id, email, reason)
           SELECT $1, e, r FROM unnest($2::text[], $3::text[]) AS t(e, r)
           ON CONFLICT (account_id, email) DO UPDATE SET reason = EXCLUDED.reason
           RETURNING account_id, email, reason, created_at, (xmax = 0) AS inserted""",
        account_id,
        [e for e, _ in entries],
        [r for _, r in entries],
    )


async def delete_suppression(conn: asyncpg.Connection, account_id: str, email: str) -> bool:
    status = await conn.execute(
        "DELETE FROM suppressions WHERE account_id = $1 AND email = $2", account_id, email
    )
    return bool(status.endswith(" 1"))


# --- endpoints ---------------------------------------------------------------------------


async def upsert_endpoint(
    conn: asyncpg.Connection,
    *,
    endpoint_id: str,
    account_id: str,
    url: str,
    secret: str,
    events: list[str],
    batch: bool,
    legacy_complained_spelling: bool,
) -> Row:
    """Create the endpoint, or re-enable and update the account's endpoint with that URL."""
    return await conn.fetchrow(  # type: ignore[no-any-return]
        """INSERT INTO endpoints (id, account_id, url, secret, events, batch,
                                  legacy_complained_spelling)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (account_id, url) DO UPDATE SET
               events = EXCLUDED.events, batch = EXCLUDED.batch,
               legacy_complained_spelling = EXCLUDED.legacy_complained_spelling,
               enabled = true, updated_at = now()
           RETURNING *, (xmax = 0) AS inserted""",
        endpoint_id,
        account_id,
        url,
        secret,
        events,
        batch,
        legacy_complained_spelling,
    )


async def list_endpoints(conn: asyncpg.Connection, account_id: str) -> list[Row]:
    return await conn.fetch(  # type: ignore[no-any-return]
        "SELECT * FROM endpoints WHERE account_id = $1 ORDER BY updated_at DESC, id", account_id
    )


async def disable_endpoint(conn: asyncpg.Connection, account_id: str, url: str) -> Row | None:
    return await conn.fetchrow(  # type: ignore[no-any-return]
        """UPDATE endpoints SET enabled = false, updated_at = now()
           WHERE account_id = $1 AND url = $2 RETURNING *""",
        account_id,
        url,
    )


# --- campaigns ---------------------------------------------------------------------------


async def campaign_statuses(conn: asyncpg.Connection, campaign_id: str) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM messages WHERE campaign_id = $1 GROUP BY status",
        campaign_id,
    )
    return {r["status"]: int(r["n"]) for r in rows}


async def campaign_events(conn: asyncpg.Connection, campaign_id: str) -> dict[str, tuple[int, int]]:
    """Customer event name -> (events, distinct messages) for the campaign."""
    rows = await conn.fetch(
        """SELECT e.status_name AS name, count(*) AS total,
                  count(DISTINCT e.mailgate_id) AS uniq
           FROM events e JOIN messages m ON m.mailgate_id = e.mailgate_id
           WHERE m.campaign_id = $1 AND e.status_name IS NOT NULL AND NOT e.status_pending
           GROUP BY e.status_name""",
        campaign_id,
    )
    return {r["name"]: (int(r["total"]), int(r["uniq"])) for r in rows}


# --- retention ---------------------------------------------------------------------------


async def prune(
    pool: asyncpg.Pool, *, older_than: dt.datetime, chunk: int = 5000
) -> dict[str, int]:
    """Delete facts and messages older than ``older_than`` and outbox rows published a day ago.

    Small chunks keep each statement short, so ingestion never waits long on retention.
    """
    statements = {
        "events": """DELETE FROM events WHERE event_id IN (
                         SELECT event_id FROM events WHERE recorded_at < $1 LIMIT $2)""",
        "messages": """DELETE FROM messages WHERE mailgate_id IN (
                           SELECT mailgate_id FROM messages WHERE updated_at < $1 LIMIT $2)""",
        "outbox": """DELETE FROM outbox WHERE id IN (
                         SELECT id FROM outbox WHERE published_at < $1 LIMIT $2)""",
    }
    cutoffs = {
        "events": older_than,
        "messages": older_than,
        "outbox": dt.datetime.now(dt.UTC) - dt.timedelta(days=1),
    }
    removed = dict.fromkeys(statements, 0)
    for table, sql in statements.items():
        while True:
            status = await pool.execute(sql, cutoffs[table], chunk)
            count = int(status.rsplit(" ", 1)[-1])
            removed[table] += count
            if count < chunk:
                break
    return removed
