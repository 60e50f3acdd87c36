"""A Mail.ru Postmaster API fake, faithful to specs/postmaster.md and the seed's examples.

What it does like Postmaster:

* ``POST /token`` with the form fields ``client_id=postmaster_api_client``,
  ``grant_type=refresh_token``, ``refresh_token=…`` -> ``{"expires_in":3600,"access_token":…}``;
  an unknown refresh token -> ``{"error":"token not found","error_code":6,
  "error_description":"token not found"}``. Access tokens live ``token_ttl_s`` (3600 s) on the
  fake's clock.
* ``GET /ext-api/reg-list/``, ``troubles-list/``, ``stat-list/``, ``stat-list-detailed/`` with the
  token in the header literally named ``Bearer`` (``Authorization: Bearer`` alone is refused
  unless ``accept_authorization_header``); a missing, unknown or expired token -> HTTP 403.
* 10 requests per minute per domain for each group (reg-list + troubles-list) and
  (stat-list + stat-list-detailed), a sliding window on the fake's clock; over it -> HTTP 429
  ``{"detail": "Запрос был проигнорирован. Expected available in N seconds."}``.
* ``{"error": …}`` answers for bad params: ``Wrong param: date_from, older than 1 year``,
  ``Wrong param: date_from > date_to``, an unknown domain, msgtype without domain, no stats.
* Statistics are deterministic per (domain, msgtype, date); today's grow with the time of day
  (so a re-poll sees new numbers), days are answered newest first as in the seed.

The clock is injectable: ``SimClock`` (tests advance it; its ``sleep`` advances it instantly)
or ``ScaledClock`` (standalone, ``--speed 60`` makes an hour pass in a minute).

Test hooks: ``requests`` (every API request with status and rate-limit key),
``token_requests``, ``rate_limited`` (429s answered), ``max_per_window()`` (the busiest
minute per key, recomputed from the log), ``expire_tokens()``, ``troubles``, ``set_day()``.

Run: ``python -m mailgate_fakes.postmaster --port 8091 --refresh-token RT --domain a.ru``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import hashlib
import logging
import math
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiohttp import web

log = logging.getLogger("mailgate_fakes.postmaster")

CLIENT_ID = "postmaster_api_client"
TOKEN_TTL_S = 3600
LIMIT_PER_WINDOW = 10
WINDOW_S = 60.0
MOSCOW_OFFSET_H = 3.0

GROUPS = {
    "reg-list": "reg",
    "troubles-list": "reg",
    "stat-list": "stat",
    "stat-list-detailed": "stat",
}

TOKEN_NOT_FOUND = {
    "error": "token not found",
    "error_code": 6,
    "error_description": "token not found",
}


class SimClock:
    """Simulated time: ``now()`` moves only by ``advance`` or ``sleep`` (which returns at once).

    Share one between the fake and the code under test to run a day in seconds.
    """

    def __init__(self, start: float | None = None) -> None:
        self.t = float(start if start is not None else time.time())
        self.slept_s = 0.0

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += max(0.0, seconds)

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        self.slept_s += max(0.0, seconds)
        await asyncio.sleep(0)


class ScaledClock:
    """Wall time running ``speed`` times faster from now on (standalone demos)."""

    def __init__(self, speed: float = 1.0) -> None:
        self.speed = speed
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def now(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0) * self.speed


@dataclass
class ApiRequest:
    path: str
    params: dict[str, str]
    at: float
    status: int
    key: tuple[str, str] | None = None
    """Rate-limit key ``(group, domain)``; ``None`` when refused before the limiter."""
    headers: dict[str, str] = field(default_factory=dict)


def local_day(ts: float, tz_offset_h: float = MOSCOW_OFFSET_H) -> date:
    """The calendar day Postmaster reports ``ts`` under (Moscow time)."""
    return datetime.fromtimestamp(ts + tz_offset_h * 3600, UTC).date()


def _h(*parts: str) -> int:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


class PostmasterFake:
    """One Postmaster account with its confirmed domains."""

    def __init__(
        self,
        refresh_tokens: Iterable[str] = ("pm-refresh-token",),
        domains: Iterable[str] = ("alphadomain.ru", "betadomain.ru", "gammadomain.ru"),
        *,
        clock: Callable[[], float] = time.time,
        token_ttl_s: float = TOKEN_TTL_S,
        limit: int = LIMIT_PER_WINDOW,
        window_s: float = WINDOW_S,
        tz_offset_h: float = MOSCOW_OFFSET_H,
        msgtypes: dict[str, set[str]] | None = None,
        accept_authorization_header: bool = False,
    ) -> None:
        self.refresh_tokens = set(refresh_tokens)
        self.domains = [d.lower() for d in domains]
        self.clock = clock
        self.token_ttl_s = token_ttl_s
        self.limit = limit
        self.window_s = window_s
        self.tz_offset_h = tz_offset_h
        #: domain -> msgtypes with statistics; ``None``: every msgtype has some.
        self.msgtypes = msgtypes
        self.accept_authorization_header = accept_authorization_header
        #: domain -> errors as troubles-list shows them.
        self.troubles: dict[str, list[dict[str, Any]]] = {}
        #: (domain, msgtype or "", YYYY-MM-DD) -> fields overriding the generated day.
        self.overrides: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.access_tokens: dict[str, float] = {}
        self.requests: list[ApiRequest] = []
        self.token_requests: list[tuple[float, str]] = []
        self.rate_limited = 0
        self._windows: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._runner: web.AppRunner | None = None

    # --- test helpers --------------------------------------------------------------------

    def today(self) -> date:
        return local_day(self.clock(), self.tz_offset_h)

    def expire_tokens(self) -> None:
        """Every access token issued so far is now expired (-> 403)."""
        self.access_tokens.clear()

    def set_day(self, domain: str, day: str, msgtype: str | None = None, **fields: Any) -> None:
        """Override some fields of one day's statistics (a later re-poll sees them)."""
        self.overrides.setdefault((domain, msgtype or "", day), {}).update(fields)

    def api_requests(self, path: str | None = None) -> list[ApiRequest]:
        return [r for r in self.requests if path is None or r.path == path]

    def max_per_window(self) -> dict[tuple[str, str], int]:
        """For each rate-limit key, the most requests the fake counted in any window."""
        by_key: dict[tuple[str, str], list[float]] = defaultdict(list)
        for r in self.requests:
            if r.key is not None and r.status != 429:
                by_key[r.key].append(r.at)
        out: dict[tuple[str, str], int] = {}
        for key, times in by_key.items():
            times.sort()
            out[key] = max(
                bisect.bisect_left(times, t + self.window_s) - i for i, t in enumerate(times)
            )
        return out

    # --- statistics ----------------------------------------------------------------------

    def day_stats(self, domain: str, msgtype: str | None, day: date) -> dict[str, Any]:
        """One day in the seed's ``stat-list-detailed`` shape (deterministic)."""
        iso = day.isoformat()
        h = _h(domain, msgtype or "", iso)
        base = 200 + h % 20000 if msgtype else 5000 + h % 200000
        today = self.today()
        if day == today:
            seconds = (self.clock() + self.tz_offset_h * 3600) % 86400
            base = int(base * seconds / 86400)
        sent = base
        delivered = sent - (h >> 8) % max(1, sent // 200 + 1)
        spam = (h >> 16) % max(1, delivered // 50 + 1)
        probably_spam = (h >> 24) % max(1, delivered // 500 + 1)
        read = delivered * (10 + (h >> 32) % 30) // 100
        stats: dict[str, Any] = {
            "delivered": delivered,
            "messages_sent": sent,
            "deleted_read": read // 4,
            "spam": spam,
            "read": read,
            "spam_percent": round(spam / delivered, 6) if delivered else 0,
            "date": iso,
            "reputation": 0 if msgtype else round(((h >> 40) % 1000) / 1000 - 0.2, 6),
            "complaints": (h >> 44) % max(1, delivered // 1000 + 1),
            "deleted_unread": delivered * ((h >> 48) % 20) // 100,
            "probably_spam": probably_spam,
            "trend": 0 if msgtype else round(((h >> 52) % 2000) / 100 - 10, 4),
            "probably_spam_percent": round(probably_spam / delivered, 8) if delivered else 0,
        }
        stats.update(self.overrides.get((domain, msgtype or "", iso), {}))
        return stats

    # --- token endpoint ------------------------------------------------------------------

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        now = self.clock()
        if form.get("grant_type") != "refresh_token" or form.get("client_id") != CLIENT_ID:
            self.token_requests.append((now, "invalid_request"))
            return 400, {"error": "invalid_request", "error_description": "invalid request"}
        if form.get("refresh_token") not in self.refresh_tokens:
            self.token_requests.append((now, "token not found"))
            return 400, dict(TOKEN_NOT_FOUND)
        access = secrets.token_hex(24)
        self.access_tokens[access] = now + self.token_ttl_s
        self.token_requests.append((now, "ok"))
        return 200, {"expires_in": int(self.token_ttl_s), "access_token": access}

    # --- API -----------------------------------------------------------------------------

    def api(
        self, method: str, params: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """One ``/ext-api/<method>/`` request -> (HTTP status, JSON body)."""
        now = self.clock()
        record = ApiRequest(method, dict(params), now, 0, headers=headers)
        self.requests.append(record)
        token = headers.get("bearer", "").strip()
        if not token and self.accept_authorization_header:
            auth = headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                token = auth[7:].strip()
        expires_at = self.access_tokens.get(token)
        if expires_at is None or expires_at <= now:
            record.status = 403
            return 403, {"detail": "Forbidden"}
        group = GROUPS[method]
        domain = params.get("domain", "").lower() if group == "stat" else ""
        key = (group, domain)
        record.key = key
        window = self._windows[key]
        while window and window[0] <= now - self.window_s:
            window.popleft()
        if len(window) >= self.limit:
            self.rate_limited += 1
            record.status = 429
            wait = max(1, math.ceil(window[0] + self.window_s - now))
            return 429, {
                "detail": f"Запрос был проигнорирован. Expected available in {wait} seconds."
            }
        window.append(now)
        status, body = self._answer(method, params)
        record.status = status
        return status, body

    def _answer(self, method: str, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if method == "reg-list":
            return 200, {"ok": True, "domains": [{"domain": d} for d in self.domains]}
        if method == "troubles-list":
            data = [
                {"domain": d, "errors": list(errors)}
                for d, errors in self.troubles.items()
                if errors and d in self.domains
            ]
            return 200, {"ok": True, "data": data}
        try:
            domains, msgtype, days = self._stat_query(params)
        except ValueError as exc:
            return 400, {"error": str(exc)}
        if method == "stat-list-detailed":
            data = [
                {"domain": d, "data": [self.day_stats(d, msgtype, day) for day in days]}
                for d in domains
            ]
            return 200, {"ok": True, "data": data}
        totals = []
        for d in domains:
            total: dict[str, Any] = {"domain": d}
            for day in days:
                for k, v in self.day_stats(d, msgtype, day).items():
                    if k in ("date", "reputation", "trend") or k.endswith("_percent"):
                        continue
                    total[k] = total.get(k, 0) + v
            delivered = total.get("delivered", 0)
            total["spam_percent"] = round(total.get("spam", 0) / delivered, 6) if delivered else 0.0
            total["probably_spam_percent"] = (
                round(total.get("probably_spam", 0) / delivered, 8) if delivered else 0.0
            )
            totals.append(total)
        return 200, {"ok": True, "data": totals}

    def _stat_query(self, params: dict[str, str]) -> tuple[list[str], str | None, list[date]]:
        today = self.today()
        raw_from = params.get("date_from")
        if not raw_from:
            raise ValueError("Wrong param: date_from is required")
        try:
            date_from = date.fromisoformat(raw_from)
            date_to = date.fromisoformat(params["date_to"]) if params.get("date_to") else today
        except ValueError:
            raise ValueError("Wrong param: date format, expected YYYY-MM-DD") from None
        if date_from < today - timedelta(days=365):
            raise ValueError("Wrong param: date_from, older than 1 year")
        if date_from > date_to:
            raise ValueError("Wrong param: date_from > date_to")
        domain = params.get("domain", "").lower() or None
        msgtype = params.get("msgtype") or None
        if msgtype and not domain:
            raise ValueError("Wrong param: msgtype is allowed only with domain")
        if domain is not None and domain not in self.domains:
            raise ValueError(f"Domain {domain} is not confirmed for this account")
        if (
            msgtype
            and self.msgtypes is not None
            and msgtype not in self.msgtypes.get(domain or "", set())
        ):
            raise ValueError("No statistics for this msgtype")
        last = min(date_to, today)
        days = [last - timedelta(days=i) for i in range((last - date_from).days + 1)]
        return ([domain] if domain else list(self.domains)), msgtype, days

    # --- HTTP ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self._http_token)
        for method in GROUPS:
            app.router.add_get(f"/ext-api/{method}/", self._http_api(method))
            app.router.add_get(f"/ext-api/{method}", self._http_api(method))
        app.router.add_get("/__postmaster/requests", self._http_requests)
        app.router.add_post("/__postmaster/troubles", self._http_troubles)
        app.router.add_post("/__postmaster/expire", self._http_expire)
        return app

    async def _http_token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        status, body = self.token(form)
        return web.json_response(body, status=status)

    def _http_api(self, method: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            headers = {k.lower(): v for k, v in request.headers.items()}
            status, body = self.api(method, dict(request.query), headers)
            return web.json_response(body, status=status)

        return handler

    async def _http_requests(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": [
                    {"path": r.path, "params": r.params, "at": r.at, "status": r.status}
                    for r in self.requests
                ],
                "rate_limited": self.rate_limited,
                "max_per_window": {f"{g}:{d}": n for (g, d), n in self.max_per_window().items()},
            }
        )

    async def _http_troubles(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.troubles = {str(d): list(e) for d, e in body.items()}
        return web.json_response({"ok": True})

    async def _http_expire(self, request: web.Request) -> web.Response:
        self.expire_tokens()
        return web.json_response({"ok": True})

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in this event loop; return the base URL (token URL is ``<base>/token``)."""
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound = self._runner.addresses[0][1]
        return f"http://{host}:{bound}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mailgate-postmaster-fake", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--refresh-token", action="append", default=[])
    parser.add_argument("--domain", action="append", default=[])
    parser.add_argument("--speed", type=float, default=1.0, help="clock speed-up factor")
    parser.add_argument("--token-ttl-s", type=float, default=TOKEN_TTL_S)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s postmaster-fake %(message)s")
    clock = ScaledClock(args.speed)
    fake = PostmasterFake(
        args.refresh_token or ["pm-refresh-token"],
        args.domain or ["alphadomain.ru", "betadomain.ru", "gammadomain.ru"],
        clock=clock.now,
        token_ttl_s=args.token_ttl_s,
    )
    fake.troubles = {fake.domains[0]: [{"msg": "DMARC check failed.", "code": -1}]}

    async def serve() -> None:
        base = await fake.start(args.host, args.port)
        log.info("listening on %s (token URL %s/token), clock x%s", base, base, args.speed)
        try:
            await asyncio.Event().wait()
        finally:
            await fake.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
