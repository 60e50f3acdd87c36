"""SMTP AUTH against ledger-owned credentials (hashes only), throttled per IP and per username.

The per-IP throttle (421 and disconnect) stops one client guessing; the per-username throttle
stops many addresses guessing one password: once a username has too many failures in the
window, AUTH for it answers 454 (temporary) without checking the password, so a distributed
guesser learns nothing until the window passes (the price: the real user also waits).

scrypt is deliberately slow (~50 ms, 16 MiB), so it runs in a thread and a successful
verification is remembered: AMS opens many connections with the same credential. The
memo key holds a MAC of the password under a per-process random key (never the password)
and the stored hash, so a password change in the ledger invalidates it at once. The MAC is
keyed BLAKE2b (RFC 7693's keyed mode): a fifth of HMAC-SHA256's cost on every AUTH.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailgate_core.passwords import hash_password, verify_password

from .directory import Directory
from .metrics import Metrics
from .policy import FailureThrottle, is_ip_allowed
from .replies import TransientError


@dataclass(frozen=True)
class Principal:
    """Who an authenticated SMTP session sends as."""

    username: str
    account_id: str


class Authenticator:
    def __init__(
        self,
        directory: Directory,
        throttle: FailureThrottle,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_remembered: int = 10_000,
        user_throttle: FailureThrottle | None = None,
    ):
        self._directory = directory
        self._throttle = throttle
        self._user_throttle = user_throttle
        self._metrics = metrics
        self._clock = clock
        self._max_remembered = max_remembered
        self._pepper = secrets.token_bytes(32)
        self._verified: dict[tuple[str, bytes, str], None] = {}
        self._verifying: dict[tuple[str, bytes, str], asyncio.Future[bool]] = {}
        self._dummy_hash: str | None = None

    def is_blocked(self, client_ip: str | None) -> bool:
        return self._throttle.is_blocked(client_ip or "?", self._clock())

    async def authenticate(
        self, username: str, password: str, client_ip: str | None
    ) -> Principal | None:
        """The principal, or ``None`` (failure recorded). Raises TransientError if KV is down
        or the username is throttled."""
        user_key = username.strip().lower()
        if self._user_throttle is not None and self._user_throttle.is_blocked(
            user_key, self._clock()
        ):
            self._throttle.record_failure(client_ip or "?", self._clock())
            self._metrics.auth_failures.inc()
            raise TransientError(f"too many authentication failures for {user_key!r}")
        principal = await self._check(username, password, client_ip)
        if principal is None:
            now = self._clock()
            self._throttle.record_failure(client_ip or "?", now)
            if self._user_throttle is not None:
                self._user_throttle.record_failure(user_key, now)
            self._metrics.auth_failures.inc()
        return principal

    async def _check(self, username: str, password: str, client_ip: str | None) -> Principal | None:
        directory = self._directory
        credential = None
        if username:  # (the mirrored record when there is one: no coroutine to await)
            credential = directory.credentials.get(username) or await directory.credential(username)
        if credential is None or credential.disabled:
            await self._burn_time(password)  # same cost as a wrong password: no user probing
            return None
        tag = hashlib.blake2b(
            password.encode("utf-8", "replace"), key=self._pepper, digest_size=32
        ).digest()
        key = (username, tag, credential.password_hash)
        if key not in self._verified and not await self._password_ok(key, password):
            return None
        if not is_ip_allowed(client_ip, credential.allowed_ips):
            return None
        account_id = credential.account_id
        account = directory.accounts.get(account_id) or await directory.account(account_id)
        if account is None or account.disabled:
            return None
        return Principal(username=username, account_id=account_id)

    async def _password_ok(self, key: tuple[str, bytes, str], password: str) -> bool:
        """Verify ``password`` against the hash in ``key`` (``(username, MAC of the
        password, stored hash)``) and remember a success under ``key``."""
        if key in self._verified:
            return True
        password_hash = key[2]
        # A burst of connections with one credential (AMS after a restart) waits for one
        # scrypt instead of running one each (CPU, and 16 MiB of memory per scrypt).
        pending = self._verifying.get(key)
        if pending is None:
            pending = asyncio.ensure_future(
                asyncio.to_thread(verify_password, password, password_hash)
            )
            self._verifying[key] = pending
            pending.add_done_callback(lambda _: self._verifying.pop(key, None))
        ok = await asyncio.shield(pending)
        if ok:
            if len(self._verified) >= self._max_remembered:
                self._verified.pop(next(iter(self._verified)))
            self._verified[key] = None
        return ok

    async def _burn_time(self, password: str) -> None:
        if self._dummy_hash is None:
            self._dummy_hash = await asyncio.to_thread(hash_password, secrets.token_hex(8))
        await asyncio.to_thread(verify_password, password, self._dummy_hash)
