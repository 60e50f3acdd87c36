"""``python -m mailgate_ledger bootstrap``: migrate, then ensure one account and SMTP credential.

For containers and demos (``docker compose up``): the credential's username and password come
from the environment, so the SMTP port accepts mail as soon as the stack is up, without a
round trip through the admin API (which generates passwords). Idempotent: run again, it
updates the password, sender domains and API token of the same credential's account. The
ledger pushes the rows to the KV buckets smtp-ingest reads when it starts (full resync).
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

import asyncpg
from mailgate_core.config import BaseSettings, ConfigError, Secret
from mailgate_core.ids import new_ulid
from mailgate_core.passwords import hash_password, verify_password

from . import store
from .admin import new_api_token, token_hash
from .migrations import migrate

if TYPE_CHECKING:
    from .db import Conn

_USERNAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class BootstrapSettings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "ledger"
    database_url: Secret
    bootstrap_account_name: str = "demo"
    bootstrap_sender_domains: list[str] = []
    """The account's allowed sender domains (empty: the global ALLOWED_SENDER_DOMAINS)."""
    bootstrap_smtp_username: str = ""
    """Empty: only migrate."""
    bootstrap_smtp_password: Secret = Secret("")
    bootstrap_api_token: Secret = Secret("")
    """The account's bearer for /v1/email/webhook; empty: a new one, printed once."""
    bootstrap_console_admin: str = ""
    """An operator with the admin role for the console (/console/); empty: none."""
    bootstrap_console_password: Secret = Secret("")

    def validate(self) -> None:
        admin = self.bootstrap_console_admin
        if admin and (not _USERNAME.match(admin) or len(admin) > 64):
            raise ConfigError(
                f"config error: BOOTSTRAP_CONSOLE_ADMIN={admin!r} may hold letters, digits, "
                "'-', '_' and inner dots (max 64)"
            )
        if admin and len(Secret(self.bootstrap_console_password).reveal()) < 12:
            raise ConfigError(
                "config error: BOOTSTRAP_CONSOLE_PASSWORD must be at least 12 characters"
            )
        name = self.bootstrap_smtp_username
        if not name:
            return
        if not _USERNAME.match(name) or len(name) > 64:
            raise ConfigError(
                f"config error: BOOTSTRAP_SMTP_USERNAME={name!r} may hold letters, digits, "
                "'-', '_' and inner dots (max 64)"
            )
        if len(Secret(self.bootstrap_smtp_password).reveal()) < 12:
            raise ConfigError(
                "config error: BOOTSTRAP_SMTP_PASSWORD must be at least 12 characters"
            )
        token = Secret(self.bootstrap_api_token).reveal()
        if token and len(token) < 24:
            raise ConfigError("config error: BOOTSTRAP_API_TOKEN must be at least 24 characters")


async def ensure_credential(conn: Conn, settings: BootstrapSettings) -> list[str]:
    """Create or update the account and credential; return what was done (no secrets)."""
    username = settings.bootstrap_smtp_username
    password = Secret(settings.bootstrap_smtp_password).reveal()
    token = Secret(settings.bootstrap_api_token).reveal()
    domains = [d.strip().lower() for d in settings.bootstrap_sender_domains if d.strip()]
    done: list[str] = []
    async with conn.transaction():
        account_id = await conn.fetchval(
            "SELECT account_id FROM credentials WHERE username = $1 FOR UPDATE", username
        )
        if account_id is None:
            new_token = token or new_api_token()
            account = await store.insert_account(
                conn,
                account_id=new_ulid(),
                name=settings.bootstrap_account_name,
                allowed_sender_domains=domains,
                postal_api_key=None,
                tracking=True,
                api_token_hash=token_hash(new_token),
                api_token_prefix=new_token[:12],
            )
            account_id = account["id"]
            await store.insert_credential(
                conn,
                username=username,
                account_id=account_id,
                name=username,
                password_hash=await asyncio.to_thread(hash_password, password),
                rate_per_second=None,
                daily_limit=None,
                allowed_ips=[],
            )
            done.append(f"account {account_id} and credential {username} created")
            if not token:
                done.append(f"account api token (shown once): {new_token}")
            return done
        current = await conn.fetchval(
            "SELECT password_hash FROM credentials WHERE username = $1", username
        )
        if not await asyncio.to_thread(verify_password, password, current):
            await store.set_credential_password(
                conn, account_id, username, await asyncio.to_thread(hash_password, password)
            )
            done.append(f"credential {username}: password updated")
        await conn.execute(
            "UPDATE accounts SET allowed_sender_domains = $2, disabled = false WHERE id = $1",
            account_id,
            domains,
        )
        await conn.execute("UPDATE credentials SET disabled = false WHERE username = $1", username)
        if token:
            await store.set_account_token(conn, account_id, token_hash(token), token[:12])
        done.append(f"account {account_id} and credential {username} up to date")
    return done


async def ensure_console_admin(conn: Conn, settings: BootstrapSettings) -> str:
    """Create the console admin, or bring its password and role back to the configured ones."""
    username = settings.bootstrap_console_admin
    password = Secret(settings.bootstrap_console_password).reveal()
    async with conn.transaction():
        row = await store.operator_by_username(conn, username)
        if row is None:
            await store.insert_operator(
                conn,
                operator_id=new_ulid(),
                username=username,
                password_hash=await asyncio.to_thread(hash_password, password),
                role="admin",
                account_id=None,
            )
            return f"console admin {username} created"
        if row["role"] != "admin":
            raise ConfigError(
                f"config error: BOOTSTRAP_CONSOLE_ADMIN={username!r} is an existing "
                f"{row['role']} operator; choose another name"
            )
        same = await asyncio.to_thread(verify_password, password, row["password_hash"])
        await store.update_operator(
            conn,
            row["id"],
            disabled=False,
            password_hash=None if same else await asyncio.to_thread(hash_password, password),
        )
        return f"console admin {username} " + ("up to date" if same else "password updated")


async def bootstrap(settings: BootstrapSettings) -> list[str]:
    conn = await asyncpg.connect(Secret(settings.database_url).reveal(), timeout=10)
    try:
        applied = await migrate(conn)
        done = [f"{len(applied)} migration(s) applied" + (f": {applied}" if applied else "")]
        if settings.bootstrap_smtp_username:
            done += await ensure_credential(conn, settings)
        if settings.bootstrap_console_admin:
            done.append(await ensure_console_admin(conn, settings))
        return done
    finally:
        await conn.close()
