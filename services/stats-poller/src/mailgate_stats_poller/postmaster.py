"""Mail.ru Postmaster API client (specs/postmaster.md): OAuth refresh, client-side rate limit.

* ``TokenSource`` exchanges the refresh token at ``POSTMASTER_TOKEN_URL`` with the form fields
  ``client_id=postmaster_api_client&grant_type=refresh_token&refresh_token=…`` for an access
  token (``expires_in`` 3600 s), refreshes it ``refresh_margin_s`` before expiry and whenever
  the API answers 403. Concurrent callers share one refresh.
* Every request carries the token twice: the header literally named ``Bearer`` (as the seed
  shows) and ``Authorization: Bearer <token>``.
* ``RateLimiter`` keeps to ``limit`` requests per ``window_s`` per (group, domain), groups
  being (reg-list, troubles-list) and (stat-list, stat-list-detailed): it waits for a free
  slot before sending instead of provoking 429s. A 429 "Expected available in N seconds"
  blocks that key for N seconds and the request is retried after it.

Clock and sleep are injected so a simulated day runs in seconds.

Errors::

    PostmasterError
    ├── PostmasterTransportError   HTTP 5xx/unexpected status, connection, timeout, not JSON
    ├── PostmasterAuthError        403 even with a freshly exchanged token
    │   └── PostmasterTokenRejected   "token not found" (error_code 6): the refresh token is
    │                                 wrong; permanent until POSTMASTER_REFRESH_TOKEN changes
    ├── PostmasterRateLimited      429 again after waiting (retry_after_s)
    └── PostmasterApiError         an {"error": "..."} answer (bad params, unknown domain, no stats)
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any, Literal, TypeVar

import aiohttp
import msgspec
import structlog

log = structlog.get_logger()

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Group = Literal["reg", "stat"]
T = TypeVar("T")

CLIENT_ID = "postmaster_api_client"
GROUP_OF: dict[str, Group] = {
    "reg-list": "reg",
    "troubles-list": "reg",
    "stat-list": "stat",
    "stat-list-detailed": "stat",
}
_EXPECTED_IN = re.compile(r"Expected available in\s+(\d+(?:\.\d+)?)\s*second", re.I)


class PostmasterError(Exception):
    pass


class PostmasterTransportError(PostmasterError):
    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PostmasterAuthError(PostmasterError):
    pass


class PostmasterTokenRejected(PostmasterAuthError):
    """The refresh token is wrong ("token not found", error_code 6)."""


class PostmasterRateLimited(PostmasterError):
    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PostmasterApiError(PostmasterError):
    """``{"error": "..."}``: wrong params, unknown domain, no statistics."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error

    @property
    def is_no_data(self) -> bool:
        text = self.error.lower()
        return "no stat" in text or "not found" in text or "нет данных" in text


def retry_after_s(body: Any, default: float = 60.0) -> float:
    """Seconds from a 429 body ``{"detail": "… Expected available in N seconds."}``."""
    detail = body.get("detail", "") if isinstance(body, dict) else str(body or "")
    match = _EXPECTED_IN.search(str(detail))
    return float(match.group(1)) if match else default


# --- shapes (the seed's examples) ----------------------------------------------------------


class RegDomain(msgspec.Struct):
    domain: str


class RegList(msgspec.Struct):
    ok: bool = False
    domains: list[RegDomain] = msgspec.field(default_factory=list)


class Trouble(msgspec.Struct):
    msg: str = ""
    code: int = 0


class DomainTroubles(msgspec.Struct):
    domain: str
    errors: list[Trouble] = msgspec.field(default_factory=list)


class TroublesList(msgspec.Struct):
    ok: bool = False
    data: list[DomainTroubles] = msgspec.field(default_factory=list)


class DayStats(msgspec.Struct, kw_only=True):
    """One day of ``stat-list-detailed`` (also a ``stat-list`` total, without date/rep/trend)."""

    date: str = ""
    delivered: int = 0
    messages_sent: int = 0
    read: int = 0
    deleted_read: int = 0
    deleted_unread: int = 0
    spam: int = 0
    probably_spam: int = 0
    spam_percent: float = 0.0
    probably_spam_percent: float = 0.0
    complaints: int = 0
    reputation: float | None = None
    trend: float | None = None


class DomainTotals(DayStats, kw_only=True):
    domain: str = ""


class DomainDays(msgspec.Struct):
    domain: str
    data: list[DayStats] = msgspec.field(default_factory=list)


class StatList(msgspec.Struct):
    ok: bool = False
    data: list[DomainTotals] = msgspec.field(default_factory=list)


class StatListDetailed(msgspec.Struct):
    ok: bool = False
    data: list[DomainDays] = msgspec.field(default_factory=list)


# --- rate limiter --------------------------------------------------------------------------


class RateLimiter:
    """At most ``limit`` sends per sliding ``window_s`` per key, on an injected clock.

    ``window_s`` defaults a second above Postmaster's minute so clock skew and request latency
    can never put an 11th request into the server's window.
    """

    def __init__(
        self, clock: Clock, sleep: Sleep, *, limit: int = 10, window_s: float = 61.0
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.limit = limit
        self.window_s = window_s
        self._sent: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._blocked_until: dict[tuple[str, str], float] = {}

    def available_at(self, key: tuple[str, str]) -> float:
        """When a request for ``key`` may be sent (now or later)."""
        now = self._clock()
        sent = self._sent[key]
        while sent and sent[0] <= now - self.window_s:
            sent.popleft()
        at = now
        if len(sent) >= self.limit:
            at = sent[len(sent) - self.limit] + self.window_s
        return max(at, self._blocked_until.get(key, now))

    def block(self, key: tuple[str, str], seconds: float) -> None:
        """The server said "Expected available in N seconds": send nothing for ``key`` until."""
        until = self._clock() + seconds
        self._blocked_until[key] = max(until, self._blocked_until.get(key, until))

    async def acquire(self, key: tuple[str, str]) -> float:
        """Wait for a slot and take it; return the seconds waited."""
        waited = 0.0
        while True:
            at = self.available_at(key)
            now = self._clock()
            if at <= now:
                self._sent[key].append(now)
                return waited
            await self._sleep(at - now)
            waited += at - now


# --- OAuth ---------------------------------------------------------------------------------


class _TokenAnswer(msgspec.Struct):
    access_token: str | None = None
    expires_in: float = 3600.0
    error: str | None = None
    error_code: int | None = None
    error_description: str | None = None


class TokenSource:
    """The current access token, exchanged from the refresh token when needed."""

    def __init__(
        self,
        token_url: str,
        refresh_token: str,
        session: aiohttp.ClientSession,
        clock: Clock,
        *,
        client_id: str = CLIENT_ID,
        refresh_margin_s: float = 300.0,
        timeout_s: float = 30.0,
        on_refresh: Callable[[], None] | None = None,
    ) -> None:
        self._url = token_url
        self._on_refresh = on_refresh
        self._refresh_token = refresh_token
        self._session = session
        self._clock = clock
        self._client_id = client_id
        self._margin_s = refresh_margin_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.refreshes = 0

    @property
    def expires_at(self) -> float:
        return self._expires_at

    def invalidate(self, token: str) -> None:
        """The API refused ``token`` (403): the next ``get`` exchanges a new one."""
        if self._token == token:
            self._token = None

    async def get(self) -> str:
        async with self._lock:
            if self._token is None or self._clock() >= self._expires_at - self._margin_s:
                await self._refresh()
            assert self._token is not None
            return self._token

    async def _refresh(self) -> None:
        form = {
            "client_id": self._client_id,
            "grant_type": "refresh_token",
            "refresh_token": self._refresh_token,
        }
        try:
            async with self._session.post(self._url, data=form, timeout=self._timeout) as resp:
                status = resp.status
                content = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PostmasterTransportError(f"token: {type(exc).__name__}: {exc}") from exc
        try:
            answer = msgspec.json.decode(content, type=_TokenAnswer, strict=False)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise PostmasterTransportError(
                f"token: HTTP {status}, not JSON", status=status
            ) from None
        if answer.error_code == 6 or (answer.error or "").lower() == "token not found":
            raise PostmasterTokenRejected("postmaster refresh token rejected: token not found")
        if status != 200 or not answer.access_token:
            if status >= 500 or status == 429:
                raise PostmasterTransportError(f"token: HTTP {status}", status=status)
            raise PostmasterAuthError(f"token: HTTP {status}: {answer.error or 'no access_token'}")
        self._token = answer.access_token.strip()
        self._expires_at = self._clock() + float(answer.expires_in)
        self.refreshes += 1
        if self._on_refresh is not None:
            self._on_refresh()
        log.info("postmaster token refreshed", expires_in_s=answer.expires_in)


# --- the client ----------------------------------------------------------------------------

RequestObserver = Callable[[str, int, float], None]
"""``(method, HTTP status or 0 on transport error, seconds)`` for metrics."""


class PostmasterClient:
    def __init__(
        self,
        api_url: str,
        tokens: TokenSource,
        session: aiohttp.ClientSession,
        limiter: RateLimiter,
        *,
        timeout_s: float = 30.0,
        max_429_retries: int = 2,
        observer: RequestObserver | None = None,
    ) -> None:
        self._base = api_url.rstrip("/")
        self._tokens = tokens
        self._session = session
        self.limiter = limiter
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_429_retries = max_429_retries
        self._observer = observer

    @staticmethod
    def key(method: str, domain: str | None) -> tuple[str, str]:
        """The rate-limit key of a request: (group, domain); "" when no domain is given."""
        group = GROUP_OF[method]
        return (group, (domain or "").lower() if group == "stat" else "")

    async def reg_list(self) -> list[str]:
        body = await self.get("reg-list", {})
        return [d.domain for d in _convert(body, RegList).domains]

    async def troubles_list(self) -> list[DomainTroubles]:
        return _convert(await self.get("troubles-list", {}), TroublesList).data

    async def stat_list(
        self,
        date_from: date,
        date_to: date | None = None,
        *,
        domain: str | None = None,
        msgtype: str | None = None,
    ) -> list[DomainTotals]:
        params = _stat_params(date_from, date_to, domain, msgtype)
        return _convert(await self.get("stat-list", params), StatList).data

    async def stat_list_detailed(
        self,
        date_from: date,
        date_to: date | None = None,
        *,
        domain: str | None = None,
        msgtype: str | None = None,
    ) -> list[DomainDays]:
        params = _stat_params(date_from, date_to, domain, msgtype)
        return _convert(await self.get("stat-list-detailed", params), StatListDetailed).data

    async def get(self, method: str, params: dict[str, str]) -> Any:
        """GET ``/ext-api/<method>/`` within the limit; refresh on 403; wait out 429s."""
        key = self.key(method, params.get("domain"))
        refreshed = False
        limited = 0
        while True:
            await self.limiter.acquire(key)
            token = await self._tokens.get()
            status, body = await self._send(method, params, token)
            if status == 403 and not refreshed:
                refreshed = True
                self._tokens.invalidate(token)
                log.info("postmaster token refused, refreshing", method=method)
                continue
            if status == 403:
                raise PostmasterAuthError(f"{method}: HTTP 403 with a fresh token")
            if status == 429:
                wait_s = retry_after_s(body)
                self.limiter.block(key, wait_s)
                log.warning("postmaster rate limited", method=method, key=key, wait_s=wait_s)
                limited += 1
                if limited > self._max_429_retries:
                    raise PostmasterRateLimited(f"{method}: HTTP 429", retry_after_s=wait_s)
                continue
            if isinstance(body, dict) and body.get("error"):
                raise PostmasterApiError(str(body["error"]))
            if status != 200 or body is None:
                raise PostmasterTransportError(f"{method}: HTTP {status}", status=status)
            return body

    async def _send(self, method: str, params: dict[str, str], token: str) -> tuple[int, Any]:
        url = f"{self._base}/ext-api/{method}/"
        headers = {"Bearer": token, "Authorization": f"Bearer {token}"}
        started = time.monotonic()
        status = 0
        try:
            async with self._session.get(
                url, params=params, headers=headers, timeout=self._timeout
            ) as resp:
                status = resp.status
                content = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PostmasterTransportError(f"{method}: {type(exc).__name__}: {exc}") from exc
        finally:
            if self._observer is not None:
                self._observer(method, status, time.monotonic() - started)
        try:
            return status, msgspec.json.decode(content)
        except msgspec.DecodeError:
            return status, None


def _stat_params(
    date_from: date, date_to: date | None, domain: str | None, msgtype: str | None
) -> dict[str, str]:
    if msgtype and not domain:
        raise ValueError("msgtype needs a domain")
    params = {"date_from": date_from.isoformat()}
    if date_to is not None:
        params["date_to"] = date_to.isoformat()
    if domain:
        params["domain"] = domain
    if msgtype:
        params["msgtype"] = msgtype
    return params


def _convert(body: Any, type_: type[T]) -> T:
    try:
        return msgspec.convert(body, type_, strict=False)
    except msgspec.ValidationError as exc:
        raise PostmasterTransportError(f"unexpected answer: {exc}") from exc
