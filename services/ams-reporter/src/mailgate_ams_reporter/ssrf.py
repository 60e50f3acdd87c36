"""SSRF guard: never deliver a webhook to loopback, private, link-local or otherwise
non-public addresses unless ``WEBHOOK_ALLOW_PRIVATE`` is set.

The check runs on the addresses the connection actually uses: ``GuardedResolver`` is the
aiohttp connector's resolver, so a host name that resolves to a public address at
registration and to 127.0.0.1 later (DNS rebinding) is still refused. aiohttp does not call
the resolver for literal IP hosts, so ``is_forbidden_host`` checks those before connecting.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from mailgate_core.netguard import is_forbidden_ip

__all__ = ["ForbiddenAddressError", "GuardedResolver", "is_forbidden_host", "is_forbidden_ip"]


class ForbiddenAddressError(OSError):
    """The endpoint resolves to an address we refuse to connect to."""


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


def is_forbidden_host(host: str, *, allow_private: bool) -> bool:
    """For a literal IP host (resolver bypassed): whether it is refused. Names -> False."""
    if allow_private or not is_ip_literal(host):
        return False
    return is_forbidden_ip(host.strip("[]"))


class GuardedResolver(AbstractResolver):
    """Wraps a resolver and fails when any resolved address is forbidden."""

    def __init__(self, *, allow_private: bool, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else DefaultResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self._allow_private:
            bad = [r["host"] for r in results if is_forbidden_ip(r["host"])]
            if bad:
                raise ForbiddenAddressError(f"{host} resolves to a non-public address")
        return results

    async def close(self) -> None:
        await self._inner.close()
