"""Customer webhook registration rules: URL checks, the SSRF guard, event names, secrets.

The guard here refuses, at registration, URLs whose host resolves to a loopback, private,
link-local or otherwise non-public address (``WEBHOOK_ALLOW_PRIVATE=true`` lifts it).
ams-reporter checks the addresses again when it connects (DNS can change).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import secrets
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from mailgate_core.netguard import is_forbidden_ip
from mailgate_core.schemas import STATUS_NAMES

#: The seed API's misspelling of ``complained``, accepted wherever an event name is read.
LEGACY_COMPLAINED = "complined"

MAX_URL_LENGTH = 2048

Resolver = Callable[[str], Awaitable[list[str]]]


class InvalidWebhookRequest(ValueError):
    """The registration cannot be accepted; the message says why (shown to the caller)."""


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def canonical_events(names: list[str]) -> list[str]:
    """Validated, de-duplicated event names (``complined`` -> ``complained``)."""
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if name == LEGACY_COMPLAINED:
            name = "complained"
        if name not in STATUS_NAMES:
            allowed = ", ".join(STATUS_NAMES)
            raise InvalidWebhookRequest(f"unknown event {raw!r}; expected one of: {allowed}")
        if name not in out:
            out.append(name)
    return out


def parse_url(url: str) -> str:
    """The URL's host after checking it is an absolute http(s) URL; raises InvalidWebhookRequest."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidWebhookRequest("url is required")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidWebhookRequest(f"url is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise InvalidWebhookRequest(f"url is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidWebhookRequest("url must start with http:// or https://")
    host = parts.hostname
    if not host:
        raise InvalidWebhookRequest("url has no host")
    if port == 0:
        raise InvalidWebhookRequest("url has an invalid port")
    return host


async def system_resolver(host: str) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def check_public_host(host: str, resolve: Resolver = system_resolver) -> None:
    """Raise InvalidWebhookRequest unless every address of ``host`` is public."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        addresses = [host]
    except ValueError:
        try:
            async with asyncio.timeout(5):
                addresses = await resolve(host)
        except (OSError, TimeoutError):
            raise InvalidWebhookRequest(f"url host {host!r} does not resolve") from None
    if not addresses:
        raise InvalidWebhookRequest(f"url host {host!r} does not resolve")
    if any(is_forbidden_ip(a) for a in addresses):
        raise InvalidWebhookRequest(
            "url resolves to a loopback, private or link-local address, which is not allowed"
        )
