"""HTTP routes of the tracker: translate requests into ``track.*`` events and answers.

Opens and clicks never wait for NATS: their events go into the ``EventBuffer`` and the answer
goes out at once. An unsubscribe waits (briefly) for the JetStream ack, because the person
must never be told they are unsubscribed when nothing was recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from aiohttp import web
from mailgate_core.nats import PublishError
from mailgate_core.schemas import Event, TrackClick, TrackOpen, TrackUnsubscribe
from mailgate_core.tracking import TokenPayload, TokenSigner
from prometheus_client import CollectorRegistry, Counter
from yarl import URL

from .audience import ClickHistory, Rules, Verdict, classify_click, classify_open
from .ids import unsubscribe_event_id
from .pages import (
    INVALID_LINK_TEXT,
    NO_CACHE_HEADERS,
    PIXEL_GIF,
    unsubscribe_confirm_page,
    unsubscribe_failed_page,
    unsubscribed_page,
)
from .publisher import EventBuffer

log = structlog.get_logger()

MAX_PARAM_CHARS = 256
MAX_USER_AGENT_CHARS = 512
RETRY_AFTER_S = "5"
_json = msgspec.json.Encoder()
_PIXEL_HEADERS = {**NO_CACHE_HEADERS, "Content-Type": "image/gif"}


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


def redirect_location(url: str) -> str | None:
    """The ``Location`` for an http(s) URL with a host; ``None`` for anything else.

    Printable ASCII goes out exactly as signed; anything else (non-ASCII, spaces, control
    characters: no header injection) is percent-encoded.
    """
    if not url.startswith(("https://", "http://")):
        return None
    try:
        parsed = URL(url)
    except ValueError:
        return None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return None
    if url.isascii() and url.isprintable() and " " not in url:
        return url
    return str(parsed)


def is_redirectable(url: str) -> bool:
    return redirect_location(url) is not None


def legacy_host_allowed(url: str, allowed_hosts: Collection[str]) -> bool:
    """Legacy (unsigned) clicks redirect only to http(s) URLs on an allow-listed host."""
    if not is_redirectable(url):
        return False
    host = (URL(url).host or "").lower().rstrip(".")
    return host in allowed_hosts


@dataclass(frozen=True)
class TrackerMetrics:
    requests: Counter
    invalid_tokens: Counter
    audience: Counter
    _children: dict[tuple[int, tuple[str, ...]], Any] = field(default_factory=dict, repr=False)

    def child(self, counter: Counter, *labels: str) -> Any:
        """``counter.labels(*labels)``, looked up once (labels() costs ~5 us per call)."""
        key = (id(counter), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = counter.labels(*labels)
        return found

    @classmethod
    def create(cls, registry: CollectorRegistry) -> TrackerMetrics:
        return cls(
            requests=Counter(
                "mailgate_tracker_requests",
                "Tracking requests by kind (open, click, legacy_*, unsubscribe*) and result "
                "(ok, dropped, invalid, forbidden_host, unavailable).",
                ["kind", "result"],
                registry=registry,
            ),
            invalid_tokens=Counter(
                "mailgate_tracker_invalid_tokens",
                "Requests with a missing, tampered, unsigned or wrong-kind token.",
                ["kind"],
                registry=registry,
            ),
            audience=Counter(
                "mailgate_tracker_audience",
                "Opens and clicks by audience class and the rule that decided it.",
                ["kind", "audience", "reason"],
                registry=registry,
            ),
        )


class TrackerHandlers:
    def __init__(
        self,
        *,
        buffer: EventBuffer,
        signer: TokenSigner,
        legacy_hosts: Collection[str],
        rules: Rules,
        history: ClickHistory,
        metrics: TrackerMetrics,
        unsubscribe_wait_s: float,
        buffer_wait_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._buffer = buffer
        self._signer = signer
        self._legacy_hosts = frozenset(h.strip().lower().rstrip(".") for h in legacy_hosts)
        self._rules = rules
        self._history = history
        self._metrics = metrics
        self._unsubscribe_wait_s = unsubscribe_wait_s
        self._buffer_wait_s = buffer_wait_s
        self._clock = clock

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
        self._metrics.child(self._metrics.requests, kind, result).inc()

    def _invalid(self, kind: str) -> None:
        self._metrics.child(self._metrics.invalid_tokens, kind).inc()
        self._count(kind, "invalid")

    def _token(self, request: web.Request, kind: str) -> TokenPayload | None:
        payload = self._signer.verify(request.match_info["token"])
        if payload is None or payload.kind != kind:
            return None
        return payload

    async def _emit(self, kind: str, event: Event, verdict: Verdict) -> None:
        """Hand ``event`` to the buffer (waits only while it is full and NATS connected)."""
        metrics = self._metrics
        metrics.child(metrics.audience, kind, verdict.audience, verdict.reason).inc()
        accepted = await self._buffer.put(event, max_wait_s=self._buffer_wait_s)
        self._count(kind, "ok" if accepted else "dropped")

    @staticmethod
    def _agent(request: web.Request) -> str | None:
        agent = request.headers.get("User-Agent")
        return agent[:MAX_USER_AGENT_CHARS] if agent else None

    @staticmethod
    def _pixel() -> web.Response:
        return web.Response(body=PIXEL_GIF, headers=_PIXEL_HEADERS)

    @staticmethod
    def _redirect(location: str) -> web.Response:
        return web.Response(status=302, headers={"Location": location, **NO_CACHE_HEADERS})

    @staticmethod
    def _invalid_link() -> web.Response:
        return web.Response(
            status=404,
            text=INVALID_LINK_TEXT,
            content_type="text/plain",
            charset="utf-8",
            headers=NO_CACHE_HEADERS,
        )

    # --- opens ---------------------------------------------------------------------------

    async def open_pixel(self, request: web.Request) -> web.Response:
        payload = self._token(request, "open")
        if payload is None:
            self._invalid("open")
            return self._pixel()  # the pixel in all cases: a broken image helps nobody
        agent, ip = self._agent(request), request.remote
        verdict = classify_open(self._rules, request.method, agent, ip)
        event = TrackOpen(
            mailgate_id=payload.mailgate_id,
            ip=ip,
            user_agent=agent,
            audience=verdict.audience,
            audience_reason=verdict.reason,
        )
        await self._emit("open", event, verdict)
        return self._pixel()

    async def legacy_open(self, request: web.Request) -> web.Response:
        external_id = _param(request, "eid")
        campaign_id = _param(request, "cid")
        mailgate_id = _param(request, "mid")
        if not (external_id or campaign_id or mailgate_id):
            self._count("legacy_open", "invalid")
            return self._pixel()
        agent, ip = self._agent(request), request.remote
        verdict = classify_open(self._rules, request.method, agent, ip)
        event = TrackOpen(
            legacy=True,
            external_id=external_id,
            campaign_id=campaign_id,
            mailgate_id=mailgate_id,
            ip=ip,
            user_agent=agent,
            audience=verdict.audience,
            audience_reason=verdict.reason,
        )
        await self._emit("legacy_open", event, verdict)
        return self._pixel()

    # --- clicks --------------------------------------------------------------------------

    def _classify_click(
        self, request: web.Request, key: str | None, url: str, mailgate_id: str | None
    ) -> tuple[str | None, str | None, Verdict]:
        agent, ip = self._agent(request), request.remote
        now = self._clock()
        others = self._history.record(key, url, now) if key else 0
        verdict = classify_click(
            self._rules,
            request.method,
            agent,
            ip,
            mailgate_id=mailgate_id,
            now_s=now,
            other_links_clicked=others,
        )
        return agent, ip, verdict

    async def click(self, request: web.Request) -> web.Response:
        payload = self._token(request, "click")
        location = redirect_location(payload.url) if payload and payload.url else None
        if payload is None or payload.url is None or location is None:
            self._invalid("click")
            return self._invalid_link()  # never a redirect we did not sign
        agent, ip, verdict = self._classify_click(
            request, payload.mailgate_id, payload.url, payload.mailgate_id
        )
        event = TrackClick(
            url=payload.url,
            mailgate_id=payload.mailgate_id,
            ip=ip,
            user_agent=agent,
            audience=verdict.audience,
            audience_reason=verdict.reason,
        )
        await self._emit("click", event, verdict)
        return self._redirect(location)

    async def legacy_click(self, request: web.Request) -> web.Response:
        url = request.query.get("url", "")
        location = redirect_location(url)
        if location is None or not legacy_host_allowed(url, self._legacy_hosts):
            self._count("legacy_click", "forbidden_host")
            return problem(
                400,
                "Bad Request",
                "the url parameter is missing or its host is not allowed",
                headers=NO_CACHE_HEADERS,
            )
        external_id, mailgate_id = _param(request, "eid"), _param(request, "mid")
        agent, ip, verdict = self._classify_click(
            request, mailgate_id or external_id, url, mailgate_id
        )
        event = TrackClick(
            url=url,
            legacy=True,
            external_id=external_id,
            campaign_id=_param(request, "cid"),
            mailgate_id=mailgate_id,
            ip=ip,
            user_agent=agent,
            audience=verdict.audience,
            audience_reason=verdict.reason,
        )
        await self._emit("legacy_click", event, verdict)
        return self._redirect(location)

    # --- unsubscribe ---------------------------------------------------------------------

    async def unsubscribe_page(self, request: web.Request) -> web.Response:
        """The confirmation page: nothing happens until the person presses the button
        (scanners follow links; they don't submit forms)."""
        if self._token(request, "unsubscribe") is None:
            self._invalid("unsubscribe_page")
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
            self._invalid("unsubscribe")
            return self._invalid_link()
        form = await request.post()
        one_click = form.get("List-Unsubscribe") == "One-Click"
        event = TrackUnsubscribe(
            event_id=unsubscribe_event_id(payload.mailgate_id, self._clock()),
            mailgate_id=payload.mailgate_id,
            one_click=one_click,
            ip=request.remote,
            user_agent=self._agent(request),
        )
        if not await self._recorded(event):
            self._count("unsubscribe", "unavailable")
            return self._unsubscribe_unavailable(request)
        self._count("unsubscribe", "ok")
        log.info("unsubscribe recorded", mailgate_id=payload.mailgate_id, one_click=one_click)
        return web.Response(
            text=unsubscribed_page(),
            content_type="text/html",
            charset="utf-8",
            headers=NO_CACHE_HEADERS,
        )

    async def _recorded(self, event: TrackUnsubscribe) -> bool:
        """Whether JetStream acknowledged ``event`` within the wait. When not, the event
        stays buffered and may still be recorded later: that errs on the safe side."""
        done = self._buffer.submit_durable(event)
        if done is None:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(done), self._unsubscribe_wait_s)
        except (TimeoutError, PublishError):
            log.warning("unsubscribe not recorded in time", mailgate_id=event.mailgate_id)
            return False
        return True

    @staticmethod
    def _unsubscribe_unavailable(request: web.Request) -> web.Response:
        headers = {"Retry-After": RETRY_AFTER_S, **NO_CACHE_HEADERS}
        if "text/html" in request.headers.get("Accept", ""):
            return web.Response(
                status=503,
                text=unsubscribe_failed_page(),
                content_type="text/html",
                charset="utf-8",
                headers=headers,
            )
        return problem(
            503,
            "Service Unavailable",
            "the unsubscribe could not be recorded; please try again",
            headers=headers,
        )
