"""Values the ledger publishes to NATS KV buckets (a cache of Postgres) for other services.

Keys: KV allows ``[-/_=.a-zA-Z0-9]``, so addresses are hashed (``suppression_key``).
Postgres is the truth; the ledger rewrites every key on start.
"""

from __future__ import annotations

import hashlib

import msgspec


class CredentialRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An SMTP credential (bucket ``credentials``, key = username)."""

    username: str
    account_id: str
    password_hash: str
    """``scrypt$n$r$p$salt_b64$hash_b64`` (see passwords.py); never the password."""
    rate_per_second: float | None = None
    daily_limit: int | None = None
    allowed_ips: list[str] = []
    disabled: bool = False


class AccountRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An account (bucket ``accounts``, key = account id)."""

    id: str
    name: str
    allowed_sender_domains: list[str] = []
    tracking: bool = True
    has_postal_api_key: bool = False
    postal_api_key: str | None = None
    """The account's own Postal server key, for postal-sender (bucket access is internal)."""
    disabled: bool = False


class SuppressionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A suppressed recipient (bucket ``suppressions``, key = ``suppression_key``)."""

    account_id: str
    email: str
    reason: str
    """``unsubscribed``, ``complained``, ``hard_bounced`` or ``manual``."""
    created_at: float


class EndpointRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One customer webhook endpoint."""

    id: str
    url: str
    secret: str
    events: list[str] = []
    """Empty means every event."""
    batch: bool = False
    legacy_complained_spelling: bool = False
    enabled: bool = True


class AccountEndpoints(msgspec.Struct, frozen=True, kw_only=True):
    """Every endpoint of an account (bucket ``endpoints``, key = account id)."""

    account_id: str
    endpoints: list[EndpointRecord] = []


def normalize_email(email: str) -> str:
    """Lower-cased, whitespace-trimmed address: how suppressions are matched."""
    return email.strip().lower()


def suppression_key(account_id: str, email: str) -> str:
    digest = hashlib.sha256(normalize_email(email).encode()).hexdigest()
    return f"{account_id}.{digest}"
