"""Console sign-in rules: session tokens, CSRF checks, cookie attributes, login throttling.

Pure apart from the clock: the handlers keep the sessions in Postgres
(``operator_sessions``) and call these to decide.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

SESSION_COOKIE = "mg_session"
LOGIN_CSRF_COOKIE = "mg_login_csrf"
LANG_COOKIE = "mg_lang"
COOKIE_PATH = "/console"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """Session tokens are 256-bit random values: SHA-256 is a safe way to store them."""
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_ok(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison; a missing token on either side fails."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def is_https(*, secure_transport: bool, headers: Mapping[str, str], trust_proxy: bool) -> bool:
    """Served over TLS, or behind a trusted proxy that says it terminated TLS."""
    if secure_transport:
        return True
    if trust_proxy:
        proto = headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        return proto == "https"
    return False


def client_ip(remote: str | None, headers: Mapping[str, str], *, trust_proxy: bool) -> str:
    if trust_proxy:
        forwarded = headers.get("X-Forwarded-For", "").split(",")[0].strip()
        if forwarded:
            return forwarded
    return remote or "unknown"


def cookie_options(*, secure: bool, max_age_s: int | None) -> dict[str, object]:
    """HttpOnly, SameSite=Lax (links from Grafana or mail still arrive signed in; every
    change is a POST with a CSRF token), Secure over HTTPS, scoped to /console."""
    options: dict[str, object] = {
        "httponly": True,
        "samesite": "Lax",
        "secure": secure,
        "path": COOKIE_PATH,
    }
    if max_age_s is not None:
        options["max_age"] = max_age_s
    return options


@dataclass
class LoginThrottle:
    """Failed sign-ins per key (``ip:…``, ``user:…``) in a sliding window.

    In memory, per ledger process: replicas each allow the limit (an attacker spreading
    guesses over N replicas gets N times the budget, still tiny against scrypt-hashed
    passwords of 16+ characters)."""

    max_failures_per_user: int = 5
    max_failures_per_ip: int = 20
    window_s: float = 900.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, key: str) -> deque[float]:
        now = self.clock()
        entries = self._failures.get(key)
        if entries is None:
            return deque()
        while entries and now - entries[0] > self.window_s:
            entries.popleft()
        if not entries:
            del self._failures[key]
        return entries

    def retry_after_s(self, ip: str, username: str) -> float:
        """0 when a sign-in may be tried now, else seconds until one may."""
        waits = []
        for key, limit in (
            (f"ip:{ip}", self.max_failures_per_ip),
            (f"user:{username.lower()}", self.max_failures_per_user),
        ):
            entries = self._recent(key)
            if len(entries) >= limit:
                waits.append(entries[0] + self.window_s - self.clock())
        return max([0.0, *waits])

    def failed(self, ip: str, username: str) -> None:
        now = self.clock()
        for key in (f"ip:{ip}", f"user:{username.lower()}"):
            self._failures.setdefault(key, deque()).append(now)
        if len(self._failures) > 100_000:  # bounded memory under a spray of usernames
            for key in list(self._failures)[:50_000]:
                del self._failures[key]

    def succeeded(self, username: str) -> None:
        self._failures.pop(f"user:{username.lower()}", None)
