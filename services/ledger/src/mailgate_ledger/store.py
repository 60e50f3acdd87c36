"""Postgres access for the admin API: one function per question, rows in, plain values out."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncpg import Record

    from .db import Conn


# --- accounts ----------------------------------------------------------------------------


async def insert_account(
    conn: Conn,
    *,
    account_id: str,
    name: str,
    allowed_sender_domains: list[str],
    postal_api_key: str | None,
    tracking: bool,
    api_token_hash: str,
    api_token_prefix: str,
) -> Record:
    row = await conn.fetchrow(
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
    assert row is not None, "INSERT ... RETURNING returns the row"
    return row


async def get_account(conn: Conn, account_id: str) -> Record | None:
    return await conn.fetchrow("SELECT * FROM accounts WHERE id = $1", account_id)


async def account_by_token_hash(conn: Conn, token_hash: str) -> Record | None:
    return await conn.fetchrow(
        "SELECT * FROM accounts WHERE api_token_hash = $1 AND NOT disabled", token_hash
    )


async def list_accounts(conn: Conn, *, limit: int, cursor: str | None) -> list[Record]:
    return await conn.fetch(
        """SELECT * FROM accounts WHERE ($1::text IS NULL OR id > $1)
           ORDER BY id LIMIT $2""",
        cursor,
        limit,
    )


_ACCOUNT_COLUMNS = ("name", "allowed_sender_domains", "postal_api_key", "tracking", "disabled")


async def update_account(conn: Conn, account_id: str, changes: dict[str, Any]) -> Record | None:
    sets = [c for c in _ACCOUNT_COLUMNS if c in changes]
    if not sets:
        return await get_account(conn, account_id)
    assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(sets, start=2))
    return await conn.fetchrow(
        f"UPDATE accounts SET {assignments} WHERE id = $1 RETURNING *",  # noqa: S608 - fixed names
        account_id,
        *(changes[c] for c in sets),
    )


async def set_account_token(
    conn: Conn, account_id: str, token_hash: str, prefix: str
) -> Record | None:
    return await conn.fetchrow(
        """UPDATE accounts SET api_token_hash = $2, api_token_prefix = $3
           WHERE id = $1 RETURNING *""",
        account_id,
        token_hash,
        prefix,
    )


# --- credentials -------------------------------------------------------------------------


async def insert_credential(
    conn: Conn,
    *,
    username: str,
    account_id: str,
    name: str,
    password_hash: str,
    rate_per_second: float | None,
    daily_limit: int | None,
    allowed_ips: list[str],
) -> Record | None:
    """The new row, or ``None`` when the username is taken."""
    return await conn.fetchrow(
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


async def list_credentials(conn: Conn, account_id: str) -> list[Record]:
    return await conn.fetch(
        "SELECT * FROM credentials WHERE account_id = $1 ORDER BY created_at, username", account_id
    )


async def get_credential(conn: Conn, account_id: str, username: str) -> Record | None:
    return await conn.fetchrow(
        "SELECT * FROM credentials WHERE account_id = $1 AND username = $2", account_id, username
    )


async def set_credential_password(
    conn: Conn, account_id: str, username: str, password_hash: str
) -> Record | None:
    return await conn.fetchrow(
        """UPDATE credentials SET password_hash = $3 WHERE account_id = $1 AND username = $2
           RETURNING *""",
        account_id,
        username,
        password_hash,
    )


_CREDENTIAL_LIMITS = ("rate_per_second", "daily_limit", "allowed_ips")


async def update_credential(
    conn: Conn, account_id: str, username: str, changes: dict[str, Any]
) -> Record | None:
    sets = [c for c in _CREDENTIAL_LIMITS if c in changes]
    if not sets:
        return await get_credential(conn, account_id, username)
    assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(sets, start=3))
    return await conn.fetchrow(
        f"UPDATE credentials SET {assignments} WHERE account_id = $1 AND username = $2 "  # noqa: S608 - fixed names
        "RETURNING *",
        account_id,
        username,
        *(changes[c] for c in sets),
    )


async def set_credential_disabled(
    conn: Conn, account_id: str, username: str, disabled: bool
) -> Record | None:
    return await conn.fetchrow(
        """UPDATE credentials SET disabled = $3 WHERE account_id = $1 AND username = $2
           RETURNING *""",
        account_id,
        username,
        disabled,
    )


# --- messages ----------------------------------------------------------------------------


async def get_message(conn: Conn, mailgate_id: str) -> Record | None:
    return await conn.fetchrow("SELECT * FROM messages WHERE mailgate_id = $1", mailgate_id)


async def message_events(
    conn: Conn, mailgate_id: str, *, recorded_since: dt.datetime | None = None
) -> list[Record]:
    """The message's facts in the order they happened. ``recorded_since`` (the message's
    ULID time less a margin) lets Postgres skip the older monthly partitions."""
    return await conn.fetch(
        """SELECT event_id, subject, name, status_name, status_pending, occurred_at, recorded_at,
                  data, status_data
           FROM events
           WHERE mailgate_id = $1 AND ($2::timestamptz IS NULL OR recorded_at >= $2)
           ORDER BY occurred_at, recorded_at, event_id""",
        mailgate_id,
        recorded_since,
    )


async def find_messages(
    conn: Conn,
    *,
    any_id: str | None = None,
    any_postal_id: int | None = None,
    external_id: str | None = None,
    email: str | None = None,
    campaign_id: str | None = None,
    postal_id: int | None = None,
    account_id: str | None = None,
    status: str | None = None,
    min_id: str | None = None,
    max_id: str | None = None,
    limit: int,
    cursor: str | None = None,
) -> list[Record]:
    """Newest first (mailgate ids are ULIDs, so they sort by time); ``cursor`` = last id.

    ``min_id``/``max_id`` are a time range turned into ULID bounds: Postgres then reads only
    the monthly partitions in range. Postgres plans these ``($n IS NULL OR ...)`` filters
    with the actual values (a generic plan of them would scan every partition and cost far
    more, so the plan cache keeps custom plans): each filter given uses its index.
    """
    return await conn.fetch(
        """SELECT * FROM messages
           WHERE ($1::text IS NULL OR mailgate_id = $1 OR external_id = $1
                  OR postal_token = $1 OR postal_id = $2)
             AND ($3::text IS NULL OR external_id = $3)
             AND ($4::text IS NULL OR lower(recipient) = lower($4))
             AND ($5::text IS NULL OR campaign_id = $5)
             AND ($6::bigint IS NULL OR postal_id = $6)
             AND ($7::text IS NULL OR account_id = $7)
             AND ($8::text IS NULL OR status = $8)
             AND ($9::text IS NULL OR mailgate_id >= $9)
             AND ($10::text IS NULL OR mailgate_id < $10)
             AND ($11::text IS NULL OR mailgate_id < $11)
           ORDER BY mailgate_id DESC LIMIT $12""",
        any_id,
        any_postal_id,
        external_id,
        email,
        campaign_id,
        postal_id,
        account_id,
        status,
        min_id,
        max_id,
        cursor,
        limit,
    )


# --- suppressions ------------------------------------------------------------------------


async def list_suppressions(
    conn: Conn,
    account_id: str,
    *,
    limit: int | None,
    cursor: str | None,
    prefix: str | None = None,
) -> list[Record]:
    """In email order; ``prefix`` keeps the addresses starting with it."""
    return await conn.fetch(
        """SELECT account_id, email, reason, created_at FROM suppressions
           WHERE account_id = $1 AND ($2::text IS NULL OR email > $2)
             AND ($4::text IS NULL OR (email >= $4 AND starts_with(email, $4)))
           ORDER BY email LIMIT $3""",
        account_id,
        cursor,
        limit,
        prefix,
    )


async def upsert_suppressions(
    conn: Conn, account_id: str, entries: Sequence[tuple[str, str]]
) -> list[Record]:
    """Add or re-reason ``(email, reason)`` pairs; rows carry ``inserted``."""
    return await conn.fetch(
        """INSERT INTO suppressions (account_id, email, reason)
           SELECT $1, e, r FROM unnest($2::text[], $3::text[]) AS t(e, r)
           ON CONFLICT (account_id, email) DO UPDATE SET reason = EXCLUDED.reason,
                                                         updated_at = now()
           RETURNING account_id, email, reason, created_at, (xmax = 0) AS inserted""",
        account_id,
        [e for e, _ in entries],
        [r for _, r in entries],
    )


async def import_suppressions(
    conn: Conn, account_id: str, entries: Sequence[tuple[str, str]]
) -> tuple[int, int]:
    """Add or re-reason ``(email, reason)`` pairs (each email once); (written, new) counts."""
    row = await conn.fetchrow(
        """WITH up AS (
               INSERT INTO suppressions (account_id, email, reason)
               SELECT $1, e, r FROM unnest($2::text[], $3::text[]) AS t(e, r)
               ON CONFLICT (account_id, email) DO UPDATE SET reason = EXCLUDED.reason,
                                                             updated_at = now()
               RETURNING (xmax = 0) AS inserted)
           SELECT count(*) AS written, count(*) FILTER (WHERE inserted) AS added FROM up""",
        account_id,
        [e for e, _ in entries],
        [r for _, r in entries],
    )
    assert row is not None
    return int(row["written"]), int(row["added"])


async def delete_suppression(conn: Conn, account_id: str, email: str) -> bool:
    status = await conn.execute(
        "DELETE FROM suppressions WHERE account_id = $1 AND email = $2", account_id, email
    )
    return bool(status.endswith(" 1"))


# --- endpoints ---------------------------------------------------------------------------


async def upsert_endpoint(
    conn: Conn,
    *,
    endpoint_id: str,
    account_id: str,
    url: str,
    secret: str,
    events: list[str],
    batch: bool,
    legacy_complained_spelling: bool,
) -> Record:
    """Create the endpoint, or re-enable and update the account's endpoint with that URL."""
    row = await conn.fetchrow(
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
    assert row is not None, "an upsert ... RETURNING returns the row"
    return row


async def list_endpoints(conn: Conn, account_id: str) -> list[Record]:
    return await conn.fetch(
        "SELECT * FROM endpoints WHERE account_id = $1 ORDER BY updated_at DESC, id", account_id
    )


async def disable_endpoint(conn: Conn, account_id: str, url: str) -> Record | None:
    return await conn.fetchrow(
        """UPDATE endpoints SET enabled = false, updated_at = now()
           WHERE account_id = $1 AND url = $2 RETURNING *""",
        account_id,
        url,
    )


# --- campaigns ---------------------------------------------------------------------------


async def campaign_statuses(
    conn: Conn, campaign_id: str, *, account_id: str | None = None
) -> dict[str, int]:
    rows = await conn.fetch(
        """SELECT status, count(*) AS n FROM messages
           WHERE campaign_id = $1 AND ($2::text IS NULL OR account_id = $2) GROUP BY status""",
        campaign_id,
        account_id,
    )
    return {r["status"]: int(r["n"]) for r in rows}


async def campaign_events(
    conn: Conn, campaign_id: str, *, account_id: str | None = None
) -> dict[tuple[str, str | None], tuple[int, int]]:
    """(customer event, audience or None for all) -> (events, distinct messages).

    Audience is ``human``, ``machine`` (prefetch/scanner: image proxies, link scanners) or
    ``unknown``, as the tracker judged it (``status_data.audience``).
    """
    rows = await conn.fetch(
        """SELECT name, audience, GROUPING(audience) AS all_audiences,
                  count(*) AS total, count(DISTINCT mailgate_id) AS uniq
           FROM (SELECT status_name AS name, mailgate_id,
                        CASE WHEN status_data->>'audience' IN ('prefetch', 'scanner')
                                  THEN 'machine'
                             WHEN status_data->>'audience' = 'human' THEN 'human'
                             ELSE 'unknown' END AS audience
                 FROM events
                 WHERE campaign_id = $1 AND status_name IS NOT NULL
                   AND NOT status_pending
                   AND ($2::text IS NULL OR mailgate_id IN (
                        SELECT mailgate_id FROM messages
                        WHERE campaign_id = $1 AND account_id = $2))) AS e
           GROUP BY GROUPING SETS ((name), (name, audience))""",
        campaign_id,
        account_id,
    )
    out: dict[tuple[str, str | None], tuple[int, int]] = {}
    for r in rows:
        audience = None if r["all_audiences"] else r["audience"]
        out[(r["name"], audience)] = (int(r["total"]), int(r["uniq"]))
    return out


CAMPAIGN_CONTROL_SUBJECTS = ("stats.campaign.autostopped", "stats.campaign.resumed")


async def campaign_autostops(conn: Conn, campaign_id: str, *, limit: int) -> list[Record]:
    """The campaign's automatic stops and resumes as ams-reporter published them, newest
    first (``events_campaign`` index: the ledger files these facts under their campaign)."""
    return await conn.fetch(
        """SELECT event_id, subject, occurred_at, recorded_at, data
           FROM events
           WHERE campaign_id = $1 AND status_name IS NULL AND subject = ANY($2::text[])
           ORDER BY occurred_at DESC, recorded_at DESC, event_id DESC
           LIMIT $3""",
        campaign_id,
        list(CAMPAIGN_CONTROL_SUBJECTS),
        limit,
    )


async def campaign_unique_non_machine(
    conn: Conn,
    campaign_id: str,
    names: Sequence[str],
    *,
    account_id: str | None = None,
) -> dict[str, int]:
    """Per event name: distinct messages with at least one event not judged automated."""
    rows = await conn.fetch(
        """SELECT status_name AS name, count(DISTINCT mailgate_id) AS uniq
           FROM events
           WHERE campaign_id = $1 AND status_name = ANY($2::text[]) AND NOT status_pending
             AND coalesce(status_data->>'audience', 'unknown') NOT IN ('prefetch', 'scanner')
             AND ($3::text IS NULL OR mailgate_id IN (
                  SELECT mailgate_id FROM messages WHERE campaign_id = $1 AND account_id = $3))
           GROUP BY status_name""",
        campaign_id,
        list(names),
        account_id,
    )
    return {r["name"]: int(r["uniq"]) for r in rows}


# --- dead letters ------------------------------------------------------------------------


async def list_dead_letters(
    conn: Conn,
    *,
    account_id: str | None,
    endpoint_id: str | None,
    mailgate_id: str | None,
    replayed: bool | None,
    limit: int,
    cursor: str | None,
) -> list[Record]:
    """Newest first; ``cursor`` = the last id of the previous page."""
    return await conn.fetch(
        """SELECT * FROM dead_letters
           WHERE ($1::text IS NULL OR account_id = $1)
             AND ($2::text IS NULL OR endpoint_id = $2)
             AND ($3::text IS NULL OR mailgate_id = $3)
             AND ($4::bool IS NULL OR (replay_count > 0) = $4)
             AND ($5::text IS NULL OR id < $5)
           ORDER BY id DESC LIMIT $6""",
        account_id,
        endpoint_id,
        mailgate_id,
        replayed,
        cursor,
        limit,
    )


async def get_dead_letter(conn: Conn, dead_letter_id: str) -> Record | None:
    return await conn.fetchrow("SELECT * FROM dead_letters WHERE id = $1", dead_letter_id)


async def mark_replayed(conn: Conn, dead_letter_id: str) -> Record | None:
    return await conn.fetchrow(
        """UPDATE dead_letters SET replay_count = replay_count + 1, replayed_at = now()
           WHERE id = $1 RETURNING *""",
        dead_letter_id,
    )


# --- health --------------------------------------------------------------------------------


async def health_counts(conn: Conn) -> dict[str, int]:
    row = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS outbox_pending,
                  (SELECT count(*) FROM dead_letters WHERE replay_count = 0)
                      AS dead_letters_pending,
                  (SELECT count(*) FROM messages_default) AS messages_outside_partitions,
                  (SELECT count(*) FROM events_default) AS events_outside_partitions"""
    )
    assert row is not None
    return {k: int(v) for k, v in row.items()}


# --- postmaster ----------------------------------------------------------------------------


async def postmaster_daily(
    conn: Conn,
    *,
    domain: str | None,
    msgtype: str | None,
    date_from: dt.date | None,
    date_to: dt.date | None,
    limit: int,
) -> list[Record]:
    """Days in order (then domain, msgtype); ``msgtype`` '' is the whole-domain row."""
    return await conn.fetch(
        """SELECT * FROM postmaster_daily
           WHERE ($1::text IS NULL OR domain = $1)
             AND ($2::text IS NULL OR msgtype = $2)
             AND ($3::date IS NULL OR date >= $3)
             AND ($4::date IS NULL OR date <= $4)
           ORDER BY date, domain, msgtype LIMIT $5""",
        domain,
        msgtype,
        date_from,
        date_to,
        limit,
    )


# --- overview and campaign lists -----------------------------------------------------------


async def message_statuses(
    conn: Conn, *, min_id: str, account_id: str | None = None
) -> dict[str, int]:
    """Messages accepted since ``min_id`` (a ULID time bound) by status."""
    rows = await conn.fetch(
        """SELECT status, count(*) AS n FROM messages
           WHERE mailgate_id >= $1 AND ($2::text IS NULL OR account_id = $2)
           GROUP BY status""",
        min_id,
        account_id,
    )
    return {r["status"]: int(r["n"]) for r in rows}


async def recent_events(
    conn: Conn,
    *,
    recorded_since: dt.datetime,
    account_id: str | None = None,
    min_id: str | None = None,
) -> dict[tuple[str, str | None], tuple[int, int]]:
    """Customer events recorded since a time, in the shape of ``campaign_events``.

    For one account, only events of its messages accepted since ``min_id`` count (the join
    stays within the recent partitions)."""
    rows = await conn.fetch(
        """SELECT name, audience, GROUPING(audience) AS all_audiences,
                  count(*) AS total, count(DISTINCT mailgate_id) AS uniq
           FROM (SELECT e.status_name AS name, e.mailgate_id,
                        CASE WHEN e.status_data->>'audience' IN ('prefetch', 'scanner')
                                  THEN 'machine'
                             WHEN e.status_data->>'audience' = 'human' THEN 'human'
                             ELSE 'unknown' END AS audience
                 FROM events e
                 WHERE e.recorded_at >= $1 AND e.status_name IS NOT NULL
                   AND NOT e.status_pending
                   AND ($2::text IS NULL OR e.mailgate_id IN (
                        SELECT m.mailgate_id FROM messages m
                        WHERE m.account_id = $2 AND m.mailgate_id >= $3))) AS e
           GROUP BY GROUPING SETS ((name), (name, audience))""",
        recorded_since,
        account_id,
        min_id or "",
    )
    out: dict[tuple[str, str | None], tuple[int, int]] = {}
    for r in rows:
        audience = None if r["all_audiences"] else r["audience"]
        out[(r["name"], audience)] = (int(r["total"]), int(r["uniq"]))
    return out


async def list_campaigns(
    conn: Conn, *, min_id: str, account_id: str | None = None, limit: int
) -> list[Record]:
    """Campaigns with messages accepted since ``min_id``, the most recently active first."""
    return await conn.fetch(
        """SELECT campaign_id, count(*) AS messages, max(mailgate_id) AS last_mailgate_id,
                  count(*) FILTER (WHERE status IN ('soft_bounced', 'hard_bounced'))
                      AS bounced,
                  count(*) FILTER (WHERE status = 'complained') AS complained,
                  count(*) FILTER (WHERE status IN ('opened', 'clicked')) AS engaged
           FROM messages
           WHERE mailgate_id >= $1 AND campaign_id IS NOT NULL
             AND ($2::text IS NULL OR account_id = $2)
           GROUP BY campaign_id ORDER BY max(mailgate_id) DESC LIMIT $3""",
        min_id,
        account_id,
        limit,
    )


async def campaign_accounts(conn: Conn, campaign_id: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT account_id FROM messages WHERE campaign_id = $1", campaign_id
    )
    return [r["account_id"] for r in rows]


AMS_PROGRESS_SUBJECT = "stats.ams.mailing"


async def ams_mailing_state(conn: Conn, campaign_id: str) -> Record | None:
    """The newest AMS progress stats-poller published for the campaign's mailing."""
    return await conn.fetchrow(
        """SELECT event_id, occurred_at, recorded_at, data FROM events
           WHERE campaign_id = $1 AND status_name IS NULL AND subject = $2
           ORDER BY occurred_at DESC, recorded_at DESC LIMIT 1""",
        campaign_id,
        AMS_PROGRESS_SUBJECT,
    )


async def dead_letter_summary(
    conn: Conn, *, since: dt.datetime, account_id: str | None = None
) -> list[Record]:
    """Per endpoint: dead letters since a time, pending ones, the newest reason."""
    return await conn.fetch(
        """SELECT endpoint_id, account_id, max(url) AS url, count(*) AS total,
                  count(*) FILTER (WHERE replay_count = 0) AS pending,
                  max(created_at) AS last_at,
                  (array_agg(reason ORDER BY id DESC))[1] AS last_reason,
                  (array_agg(http_status ORDER BY id DESC))[1] AS last_http_status
           FROM dead_letters
           WHERE created_at >= $1 AND ($2::text IS NULL OR account_id = $2)
           GROUP BY endpoint_id, account_id ORDER BY max(created_at) DESC LIMIT 50""",
        since,
        account_id,
    )


async def postmaster_domains(conn: Conn) -> list[str]:
    rows = await conn.fetch("SELECT DISTINCT domain FROM postmaster_daily ORDER BY domain")
    return [r["domain"] for r in rows]


# --- operators (console sign-in) -----------------------------------------------------------


async def insert_operator(
    conn: Conn,
    *,
    operator_id: str,
    username: str,
    password_hash: str,
    role: str,
    account_id: str | None,
) -> Record | None:
    """The new row, or ``None`` when the username is taken (case-insensitively)."""
    return await conn.fetchrow(
        """INSERT INTO operators (id, username, password_hash, role, account_id)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (lower(username)) DO NOTHING RETURNING *""",
        operator_id,
        username,
        password_hash,
        role,
        account_id,
    )


async def operator_by_username(conn: Conn, username: str) -> Record | None:
    return await conn.fetchrow(
        "SELECT * FROM operators WHERE lower(username) = lower($1)", username
    )


async def list_operators(conn: Conn) -> list[Record]:
    return await conn.fetch("SELECT * FROM operators ORDER BY lower(username)")


async def update_operator(
    conn: Conn,
    operator_id: str,
    *,
    disabled: bool | None = None,
    password_hash: str | None = None,
) -> Record | None:
    """Change an operator; disabling or a new password ends the operator's sessions."""
    async with conn.transaction():
        row = await conn.fetchrow(
            """UPDATE operators SET disabled = coalesce($2, disabled),
                                    password_hash = coalesce($3, password_hash)
               WHERE id = $1 RETURNING *""",
            operator_id,
            disabled,
            password_hash,
        )
        if row is not None and (disabled or password_hash is not None):
            await conn.execute("DELETE FROM operator_sessions WHERE operator_id = $1", operator_id)
    return row


async def insert_session(
    conn: Conn,
    *,
    token_hash: str,
    operator_id: str,
    csrf_token: str,
    expires_at: dt.datetime,
    user_agent: str,
    ip: str,
) -> None:
    await conn.execute(
        """WITH touched AS (UPDATE operators SET last_login_at = now() WHERE id = $2)
           INSERT INTO operator_sessions (token_hash, operator_id, csrf_token, expires_at,
                                          user_agent, ip)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        token_hash,
        operator_id,
        csrf_token,
        expires_at,
        user_agent[:300],
        ip[:64],
    )


async def session_operator(conn: Conn, token_hash: str) -> Record | None:
    """The signed-in operator of an unexpired session (and the session's CSRF token)."""
    return await conn.fetchrow(
        """SELECT o.id, o.username, o.role, o.account_id, s.csrf_token, s.expires_at
           FROM operator_sessions s JOIN operators o ON o.id = s.operator_id
           WHERE s.token_hash = $1 AND s.expires_at > now() AND NOT o.disabled""",
        token_hash,
    )


async def delete_session(conn: Conn, token_hash: str) -> None:
    await conn.execute("DELETE FROM operator_sessions WHERE token_hash = $1", token_hash)


async def delete_expired_sessions(conn: Conn) -> int:
    status = await conn.execute("DELETE FROM operator_sessions WHERE expires_at <= now()")
    return int(status.rsplit(" ", 1)[-1])
