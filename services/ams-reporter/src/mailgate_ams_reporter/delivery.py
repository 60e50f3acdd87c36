"""One HTTP delivery attempt to one endpoint, and what came of it.

An attempt's result is a value (``Delivered``/``Failed``/``Refused``/``Deferred``); the
handlers decide from it what happens to the JetStream message.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import aiohttp
import structlog
from mailgate_core.records import EndpointRecord
from yarl import URL

from .signing import signed_headers
from .ssrf import ForbiddenAddressError, GuardedResolver, is_forbidden_host

log = structlog.get_logger()

#: Most of a response body read (enough for a log snippet; the rest is discarded).
MAX_RESPONSE_READ = 64 * 1024
#: Longest response snippet that goes to a log line or a dead letter.
SNIPPET_CHARS = 200


@dataclass(frozen=True)
class Delivered:
    status: int
    duration_s: float = field(default=0.0, compare=False)
    """How long the successful POST took (a batch's whole POST)."""


@dataclass(frozen=True)
class Failed:
    """Retry later: non-2xx answer, timeout or connection error."""

    reason: str
    status: int | None = None
    retry_after_s: float | None = None
    """The endpoint's ``Retry-After`` (seconds), when it sent one with a 429/503."""
    snippet: str = ""
    """The start of the response body (at most ``SNIPPET_CHARS``), for logs only."""


@dataclass(frozen=True)
class Refused:
    """Never retried: the URL is unusable (SSRF guard, bad scheme)."""

    reason: str


@dataclass(frozen=True)
class Deferred:
    """Not attempted (circuit open, endpoint at its concurrency limit): try again later."""

    reason: str
    retry_in_s: float


AttemptResult = Delivered | Failed | Refused | Deferred


def snippet(body: bytes, limit: int = SNIPPET_CHARS) -> str:
    """A printable, bounded excerpt of a response body for a log line."""
    text = body[: limit * 4].decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_retry_after(value: str | None, *, cap_s: float = 3600.0) -> float | None:
    """``Retry-After`` in seconds (the delta-seconds form only), capped."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return min(max(seconds, 0.0), cap_s) if seconds == seconds else None


def make_session(
    *, timeout_s: float, allow_private: bool, concurrency: int
) -> aiohttp.ClientSession:
    """The client session of all deliveries (SSRF-guarded resolver, no proxies from env)."""
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(allow_private=allow_private),
        limit=max(concurrency, 10),
        limit_per_host=0,
        ttl_dns_cache=60,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 5.0)),
        trust_env=False,
        raise_for_status=False,
    )


class Deliverer:
    """POSTs a signed body; never raises for anything the far side does."""

    def __init__(self, session: aiohttp.ClientSession, *, allow_private: bool) -> None:
        self._session = session
        self._allow_private = allow_private

    async def attempt(
        self, endpoint: EndpointRecord, webhook_id: str, body: bytes
    ) -> Delivered | Failed | Refused:
        try:
            url = URL(endpoint.url)
        except ValueError:
            return Refused("bad url")
        if url.scheme not in ("http", "https") or not url.host:
            return Refused("bad url")
        if is_forbidden_host(url.host, allow_private=self._allow_private):
            return Refused("non-public address")
        headers = signed_headers(endpoint.secret, webhook_id, int(time.time()), body)
        started = time.monotonic()
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                content = await resp.content.read(MAX_RESPONSE_READ)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ForbiddenAddressError):
                return Refused("non-public address")
            return Failed(f"connection error: {type(exc.os_error or exc).__name__}")
        except TimeoutError:
            return Failed("timeout")
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            return Failed(f"http error: {type(exc).__name__}")
        if 200 <= status < 300:
            return Delivered(status, time.monotonic() - started)
        return Failed(
            f"http {status}",
            status,
            retry_after_s=parse_retry_after(retry_after) if status in (429, 503) else None,
            snippet=snippet(content),
        )


class DeliveryProgress:
    """Endpoints already served for a status message that is being redelivered because its
    retry tasks could not be queued (NATS trouble): in-process and bounded, an optimisation
    only. The durable record of what is left to do is the retry stream."""

    def __init__(self, max_events: int = 10_000) -> None:
        self._done: OrderedDict[str, set[str]] = OrderedDict()
        self._max = max_events

    def done(self, key: str) -> set[str]:
        return set(self._done.get(key, ()))

    def mark(self, key: str, endpoint_id: str) -> None:
        self._done.setdefault(key, set()).add(endpoint_id)
        self._done.move_to_end(key)
        while len(self._done) > self._max:
            self._done.popitem(last=False)

    def forget(self, key: str) -> None:
        self._done.pop(key, None)

    def __len__(self) -> int:
        return len(self._done)
