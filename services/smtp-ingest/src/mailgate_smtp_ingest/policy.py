"""Pure intake rules: address syntax, allowed senders, IP allowlists, throttles and limits.

Clocks are passed in (``now``) so every rule is testable without sleeping.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_LOCAL = rf"(?:{_ATEXT}+(?:\.{_ATEXT}+)*|\"(?:[^\"\\\r\n]|\\[^\r\n])*\")"
_LETDIG = r"[A-Za-z0-9\u0080-\U0010ffff]"
_LABEL = rf"{_LETDIG}(?:[A-Za-z0-9\-\u0080-\U0010ffff]{{0,61}}{_LETDIG})?"
_ADDRESS = re.compile(rf"(?P<local>{_LOCAL})@(?P<domain>{_LABEL}(?:\.{_LABEL})+)")


def is_valid_address(address: str) -> bool:
    """A deliverable mailbox: ``local@domain.tld`` (RFC 5321 dot-atom or quoted local part,
    UTF-8 allowed for SMTPUTF8), no address literals, RFC 5321 length limits."""
    if len(address) > 254:
        return False
    match = _ADDRESS.fullmatch(address)
    if match is None:
        return False
    local, domain = match.group("local"), match.group("domain")
    if len(local.encode("utf-8", "surrogateescape")) > 64 or len(domain) > 253:
        return False
    return not domain.rsplit(".", 1)[-1].isdigit()


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().rstrip(".").lower()


def sender_allowlist(
    account_domains: Sequence[str], global_domains: Sequence[str]
) -> tuple[str, ...]:
    """The account's own list wins; otherwise ALLOWED_SENDER_DOMAINS. Empty means anyone."""
    chosen = account_domains if account_domains else global_domains
    return tuple(d.strip().lower() for d in chosen if d.strip())


def is_sender_allowed(address: str, allowed: Sequence[str]) -> bool:
    """``allowed`` entries: ``example.com`` (that domain), ``*.example.com`` / ``.example.com``
    (its subdomains), or a full address ``news@example.com``. An empty list allows anyone."""
    if not allowed:
        return True
    addr = address.strip().lower()
    if "@" not in addr:
        return False
    domain = domain_of(addr)
    for entry in allowed:
        if "@" in entry:
            if addr == entry:
                return True
        elif entry.startswith(("*.", ".")):
            suffix = entry[entry.index(".") :]
            if domain.endswith(suffix):
                return True
        elif domain == entry.rstrip("."):
            return True
    return False


def is_ip_allowed(ip: str | None, allowed: Iterable[str]) -> bool:
    """Per-credential allowlist of addresses or CIDR networks; empty means any address."""
    entries = [e.strip() for e in allowed if e.strip()]
    if not entries:
        return True
    if ip is None:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for entry in entries:
        try:
            if addr in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def declared_size(mail_options: Iterable[str]) -> int | None:
    """The ``SIZE=`` parameter of MAIL FROM (RFC 1870), if any."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


@dataclass
class FailureThrottle:
    """At most ``limit`` failures per ``window_s`` per key (client IP); then the key is blocked
    until its oldest failure leaves the window."""

    limit: int = 5
    window_s: float = 60.0
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def record_failure(self, key: str, now: float) -> None:
        times = self._recent(key, now)
        times.append(now)
        self._failures[key] = times
        if len(self._failures) > 100_000:  # bound memory under a distributed attack
            self._failures.pop(next(iter(self._failures)))

    def is_blocked(self, key: str, now: float) -> bool:
        if key not in self._failures and self.limit > 0:  # (nearly every AUTH: no failures)
            return False
        return len(self._recent(key, now)) >= self.limit


@dataclass
class SendLimiter:
    """Per-credential messages per second (token bucket) and per UTC day.

    In-process: with several replicas each enforces the limit on its own share.
    """

    rate_per_second: float | None
    daily_limit: int | None
    _tokens: float = -1.0
    _updated: float = 0.0
    _day: int = -1
    _sent_today: int = 0

    def try_acquire(self, now: float) -> str | None:
        """Take one message; ``None`` when allowed, else ``"rate"`` or ``"daily"``."""
        day = int(now // 86400)
        if day != self._day:
            self._day, self._sent_today = day, 0
        if self.daily_limit is not None and self._sent_today >= self.daily_limit:
            return "daily"
        if self.rate_per_second is not None and self.rate_per_second > 0:
            capacity = max(1.0, self.rate_per_second)
            if self._tokens < 0:
                self._tokens = capacity
            else:
                elapsed = max(0.0, now - self._updated)
                self._tokens = min(capacity, self._tokens + elapsed * self.rate_per_second)
            self._updated = now
            if self._tokens < 1.0:
                return "rate"
            self._tokens -= 1.0
        self._sent_today += 1
        return None
