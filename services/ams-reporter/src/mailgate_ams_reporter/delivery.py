"""One HTTP delivery attempt to one endpoint, and which endpoints already got an event.

An attempt's result is a value (``Delivered``/``Failed``/``Refused``); the handler decides
what to do with the JetStream message from the results of all the account's endpoints.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

import aiohttp
import structlog
from mailgate_core.records import EndpointRecord
from prometheus_client import Histogram
from yarl import URL

from .signing import signed_headers
from .ssrf import ForbiddenAddressError, GuardedResolver, is_forbidden_host

log = structlog.get_logger()


@dataclass(frozen=True)
class Delivered:
    status: int


@dataclass(frozen=True)
class Failed:
    """Retry later: non-2xx answer, timeout or connection error."""

    reason: str
    status: int | None = None


@dataclass(frozen=True)
class Refused:
    """Never retried: the URL is unusable (SSRF guard, bad scheme)."""

    reason: str


AttemptResult = Delivered | Failed | Refused


def make_session(
    *, timeout_s: float, allow_private: bool, concurrency: int
) -> aiohttp.ClientSession:
    """The client session of all deliveries (SSRF-guarded resolver, no proxies from env)."""
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(allow_private=allow_private),
        limit=max(concurrency * 2, 10),
        limit_per_host=0,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        trust_env=False,
        raise_for_status=False,
    )


class Deliverer:
    def __init__(
        self, session: aiohttp.ClientSession, *, allow_private: bool, duration: Histogram
    ) -> None:
        self._session = session
        self._allow_private = allow_private
        self._duration = duration

    async def attempt(
        self, endpoint: EndpointRecord, webhook_id: str, body: bytes
    ) -> AttemptResult:
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
                await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ForbiddenAddressError):
                return Refused("non-public address")
            return Failed(f"connection error: {type(exc).__name__}")
        except TimeoutError:
            return Failed("timeout")
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            return Failed(f"http error: {type(exc).__name__}")
        finally:
            self._duration.observe(time.monotonic() - started)
        if 200 <= status < 300:
            return Delivered(status)
        return Failed("non-2xx answer", status)


class DeliveryProgress:
    """Which endpoints already got an event, so a redelivery re-sends only to the others.

    In-process only and bounded (oldest entries dropped past ``max_events``): after a restart,
    or when another replica receives the redelivery, endpoints that already got the event get
    it again. Receivers de-duplicate on ``webhook-id`` (at-least-once, specs/webhooks-out.md).
    """

    def __init__(self, max_events: int = 100_000) -> None:
        self._done: OrderedDict[str, set[str]] = OrderedDict()
        self._max = max_events

    def done(self, event_id: str) -> set[str]:
        return set(self._done.get(event_id, ()))

    def mark(self, event_id: str, endpoint_id: str) -> None:
        self._done.setdefault(event_id, set()).add(endpoint_id)
        self._done.move_to_end(event_id)
        while len(self._done) > self._max:
            self._done.popitem(last=False)

    def forget(self, event_id: str) -> None:
        self._done.pop(event_id, None)

    def __len__(self) -> int:
        return len(self._done)
