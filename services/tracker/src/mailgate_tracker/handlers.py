"""HTTP routes of the tracker: translate requests into ``track.*`` events and answers."""

from __future__ import annotations

from collections.abc import Collection

import msgspec
import structlog
from aiohttp import web
from mailgate_core.nats import PublishError, publish_event
from mailgate_core.schemas import Audience, Event, TrackClick, TrackOpen, TrackUnsubscribe
from mailgate_core.tracking import TokenPayload, TokenSigner
from nats.js import JetStreamContext
from prometheus_client import Counter
from yarl import URL

from .audience import classify_audience
from .pages import (
    INVALID_LINK_TEXT,
    NO_CACHE_HEADERS,
    PIXEL_GIF,
    unsubscribe_confirm_page,
    unsubscribed_page,
)

log = structlog.get_logger()

MAX_PARAM_CHARS = 256
_json = msgspec.json.Encoder()


def problem(
    status: int, title: str, detail: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """An RFC 9457 problem+json response."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.Response(
        status=status,
        body=_json.encode(body),
        content_type="application/problem+json",
        headers=headers,
    )


def _param(request: web.Request, name: str) -> str | None:
    value = request.query.get(name, "").strip()
    return value[:MAX_PARAM_CHARS] or None


def is_redirectable(url: str) -> bool:
    try:
        parsed = URL(url)
    except ValueError:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def legacy_host_allowed(url: str, allowed_hosts: Collection[str]) -> bool:
    """Legacy (unsigned) clicks redirect only to http(s) URLs on an allow-listed host."""
    if not is_redirectable(url):
        return False
    host = (URL(url).host or "").lower().rstrip(".")
    return host in allowed_hosts


class TrackerHandlers:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        signer: TokenSigner,
        legacy_hosts: Collection[str],
        requests: Counter,
        publish_timeout_s: float,
    ) -> None:
        self._js = js
        self._signer = signer
        self._legacy_hosts = frozenset(h.strip().lower().rstrip(".") for h in legacy_hosts)
        self._requests = requests
        self._publish_timeout_s = publish_timeout_s

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/track/o/{token}", self.open_pixel),
            web.get("/track/o", self.legacy_open),
            web.get("/track/c/{token}", self.click),
            web.get("/track/c", self.legacy_click),
            web.get("/u/{token}", self.unsubscribe_page),
            web.post("/u/{token}", self.unsubscribe),
        ]

    # --- helpers -------------------------------------------------------------------------

    def _count(self, kind: str, result: str) -> None:
        self._requests.labels(kind, result).inc()

    def _token(self, request: web.Request, kind: str) -> TokenPayload | None:
        payload = self._signer.verify(request.match_info["token"])
        if payload is None or payload.kind != kind:
            return None
        return payload

    async def _publish(self, event: Event) -> bool:
        try:
            await publish_event(self._js, event, timeout=self._publish_timeout_s)
        except PublishError as exc:
            log.error("track event not published", subject=event.subject(), error=str(exc))
            return False
        return True

    @staticmethod
    def _client(request: web.Request) -> tuple[str | None, str | None, Audience]:
        """(ip, user agent, audience) of the request."""
        agent = request.headers.get("User-Agent")
        return request.remote, agent, classify_audience(request.method, agent)

    @staticmethod
    def _pixel() -> web.Response:
        return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=NO_CACHE_HEADERS)

    @staticmethod
    def _invalid_link() -> web.Response:
        return web.Response(
            status=404, text=INVALID_LINK_TEXT, content_type="text/plain", charset="utf-8"
        )

    # --- opens ---------------------------------------------------------------------------

    async def open_pixel(self, request: web.Request) -> web.Response:
        payload = self._token(request, "open")
        if payload is None:
            self._count("open", "invalid")
            return self._pixel()
        ip, agent, audience = self._client(request)
        event = TrackOpen(
            mailgate_id=payload.mailgate_id, ip=ip, user_agent=agent, audience=audience
        )
        ok = await self._publish(event)
        self._count("open", "ok" if ok else "publish_failed")
        return self._pixel()

    async def legacy_open(self, request: web.Request) -> web.Response:
        external_id = _param(request, "eid")
        campaign_id = _param(request, "cid")
        mailgate_id = _param(request, "mid")
        if not (external_id or campaign_id or mailgate_id):
            self._count("legacy_open", "invalid")
            return self._pixel()
        ip, agent, audience = self._client(request)
        event = TrackOpen(
            legacy=True,
            external_id=external_id,
            campaign_id=campaign_id,
            mailgate_id=mailgate_id,
            ip=ip,
            user_agent=agent,
            audience=audience,
        )
        ok = await self._publish(event)
        self._count("legacy_open", "ok" if ok else "publish_failed")
        return self._pixel()

    # --- clicks --------------------------------------------------------------------------

    async def click(self, request: web.Request) -> web.StreamResponse:
        payload = self._token(request, "click")
        if payload is None or payload.url is None or not is_redirectable(payload.url):
            self._count("click", "invalid")
            return self._invalid_link()
        ip, agent, audience = self._client(request)
        event = TrackClick(
            url=payload.url,
            mailgate_id=payload.mailgate_id,
            ip=ip,
            user_agent=agent,
            audience=audience,
        )
        # The person gets their page even when the click could not be recorded.
        ok = await self._publish(event)
        self._count("click", "ok" if ok else "publish_failed")
        raise web.HTTPFound(payload.url, headers=NO_CACHE_HEADERS)

    async def legacy_click(self, request: web.Request) -> web.StreamResponse:
        url = request.query.get("url", "")
        if not legacy_host_allowed(url, self._legacy_hosts):
            self._count("legacy_click", "forbidden_host")
            return problem(
                400, "Bad Request", "the url parameter is missing or its host is not allowed"
            )
        ip, agent, audience = self._client(request)
        event = TrackClick(
            url=url,
            legacy=True,
            external_id=_param(request, "eid"),
            campaign_id=_param(request, "cid"),
            mailgate_id=_param(request, "mid"),
            ip=ip,
            user_agent=agent,
            audience=audience,
        )
        ok = await self._publish(event)
        self._count("legacy_click", "ok" if ok else "publish_failed")
        raise web.HTTPFound(url, headers=NO_CACHE_HEADERS)

    # --- unsubscribe ---------------------------------------------------------------------

    async def unsubscribe_page(self, request: web.Request) -> web.Response:
        if self._token(request, "unsubscribe") is None:
            self._count("unsubscribe_page", "invalid")
            return self._invalid_link()
        self._count("unsubscribe_page", "ok")
        return web.Response(
            text=unsubscribe_confirm_page(request.path),
            content_type="text/html",
            charset="utf-8",
            headers=NO_CACHE_HEADERS,
        )

    async def unsubscribe(self, request: web.Request) -> web.Response:
        """RFC 8058 one-click (``List-Unsubscribe=One-Click``) or the page's form."""
        payload = self._token(request, "unsubscribe")
        if payload is None:
            self._count("unsubscribe", "invalid")
            return self._invalid_link()
        form = await request.post()
        one_click = form.get("List-Unsubscribe") == "One-Click"
        ip, agent, _ = self._client(request)
        event = TrackUnsubscribe(
            mailgate_id=payload.mailgate_id, one_click=one_click, ip=ip, user_agent=agent
        )
        if not await self._publish(event):
            self._count("unsubscribe", "publish_failed")
            return problem(
                503,
                "Service Unavailable",
                "the unsubscribe could not be recorded; please try again",
                headers={"Retry-After": "5"},
            )
        self._count("unsubscribe", "ok")
        log.info("unsubscribe recorded", mailgate_id=payload.mailgate_id, one_click=one_click)
        return web.Response(text=unsubscribed_page(), content_type="text/html", charset="utf-8")
