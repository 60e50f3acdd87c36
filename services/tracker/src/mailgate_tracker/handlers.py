"""HTTP routes of the tracker: translate requests into ``track.*`` events and answers.

Opens and clicks never wait for NATS: their events go into the ``EventBuffer`` and the answer
goes out at once. An unsubscribe waits (briefly) for the JetStream ack, because the person
must never be told they are unsubscribed when nothing was recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from aiohttp import web
from aiohttp.web_urldispatcher import DynamicResource
from mailgate_core.nats import PublishError
from mailgate_core.schemas import Event, TrackClick, TrackOpen, TrackUnsubscribe
from mailgate_core.tracking import TokenPayload, TokenSigner
from prometheus_client import CollectorRegistry
from yarl import URL

from .audience import ClickHistory, Rules, Verdict, classify_click, classify_open
from .counters import FastCounter
from .ids import EventIds, unsubscribe_event_id
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
#: Distinct signed URLs whose ``Location`` is remembered (a campaign's recipients click the
#: same few links, each through their own token).
LOCATION_MEMO_SIZE = 1024
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


def clean_text(value: str) -> str:
    """``value`` as valid UTF-8 text: aiohttp keeps undecodable header bytes as lone
    surrogates (``surrogateescape``), which no JSON encoder accepts; they become U+FFFD."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def agent_text(agent: str | None) -> str | None:
    """The ``User-Agent`` header as the events carry it (cut, valid UTF-8), or ``None``."""
    if not agent:
        return None
    if len(agent) <= MAX_USER_AGENT_CHARS and agent.isascii():
        return agent  # what nearly every client sends, as it is
    return clean_text(agent[:MAX_USER_AGENT_CHARS])


def _param(request: web.Request, name: str) -> str | None:
    value = clean_text(request.query.get(name, "").strip())
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


class TokenResource(DynamicResource):
    """``<prefix>/{token}`` matched by a prefix test instead of aiohttp's regex match and
    dict comprehension (routing is a visible share of a pixel's cost); the same paths
    match, with the same unquoting (tests/unit/test_tracker_routes.py)."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix + "/{token}")
        self._token_prefix = prefix + "/"
        self._token_start = len(self._token_prefix)

    def _match(self, path: str) -> dict[str, str] | None:
        if not path.startswith(self._token_prefix):
            return None
        token = path[self._token_start :]
        if not token or "/" in token or "{" in token or "}" in token:
            return None
        if "%" in token:  # as aiohttp's own match does
            token = token.replace("%2F", "/").replace("%25", "%")
        return {"token": token}


@dataclass(frozen=True)
class TrackerMetrics:
    """Counted on every request: plain counters (``counters.FastCounter``), exported like
    prometheus_client's."""

    requests: FastCounter
    invalid_tokens: FastCounter
    audience: FastCounter

    def child(self, counter: FastCounter, *labels: str) -> Any:
        """``counter.labels(*labels)`` (kept for callers of the earlier cached lookup)."""
        return counter.labels(*labels)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> TrackerMetrics:
        return cls(
            requests=FastCounter(
                "mailgate_tracker_requests",
                "Tracking requests by kind (open, click, legacy_*, unsubscribe*) and result "
                "(ok, dropped, invalid, forbidden_host, unavailable).",
                ["kind", "result"],
                registry=registry,
            ),
            invalid_tokens=FastCounter(
                "mailgate_tracker_invalid_tokens",
                "Requests with a missing, tampered, unsigned or wrong-kind token.",
                ["kind"],
                registry=registry,
            ),
            audience=FastCounter(
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
        self._locations: dict[str, str | None] = {}
        #: URL -> its ``Location`` when that is printable ASCII (the inline path's check)
        self._inline_locations: dict[str, str] = {}
        self._ids = EventIds()
        requests = metrics.requests
        self._ok = {kind: requests.labels(kind, "ok") for kind in ("open", "click")}

    def add_to(self, app: web.Application) -> None:
        """Register the routes; the two hot ones (pixel, click) as ``TokenResource``."""
        for prefix, handler in (("/track/o", self.open_pixel), ("/track/c", self.click)):
            resource = TokenResource(prefix)
            app.router.register_resource(resource)
            resource.add_route("GET", handler)
            resource.add_route("HEAD", handler)  # as web.get() does
        app.add_routes(
            [
                web.get("/track/o", self.legacy_open),
                web.get("/track/c", self.legacy_click),
                web.get("/u/{token}", self.unsubscribe_page),
                web.post("/u/{token}", self.unsubscribe),
            ]
        )

    def routes(self) -> list[web.RouteDef]:
        """Every route as plain route definitions (``add_to`` registers faster ones)."""
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
        self._metrics.requests.labels(kind, result).inc()

    def _invalid(self, kind: str) -> None:
        self._metrics.invalid_tokens.labels(kind).inc()
        self._count(kind, "invalid")

    def _location(self, url: str) -> str | None:
        """``redirect_location(url)``, remembered per URL."""
        try:
            return self._locations[url]
        except KeyError:
            pass
        location = redirect_location(url)
        if len(self._locations) >= LOCATION_MEMO_SIZE:
            self._locations.clear()
        self._locations[url] = location
        return location

    def _token(self, request: web.Request, kind: str) -> TokenPayload | None:
        payload = self._signer.verify(request.match_info["token"])
        if payload is None or payload.kind != kind:
            return None
        return payload

    def _emit(self, kind: str, event: Event, verdict: Verdict) -> bool:
        """Hand ``event`` to the buffer if it has room (``True``); ``False``: it is full, the
        caller awaits ``_emit_wait`` (no coroutine per request for the common case)."""
        metrics = self._metrics
        metrics.audience.labels(kind, verdict.audience, verdict.reason).inc()
        if self._buffer.full:
            return False
        metrics.requests.labels(kind, "ok" if self._buffer.submit(event) else "dropped").inc()
        return True

    def _take(self, kind: str, event: TrackOpen | TrackClick, verdict: Verdict) -> None:
        """``_emit`` for a caller that checked ``buffer.full`` already (the inline path);
        the counters' children are bumped directly (``inc()`` is a call per request)."""
        metrics = self._metrics
        metrics.audience.labels(kind, verdict.audience, verdict.reason).value += 1.0
        if self._buffer.submit_batched(event):
            self._ok[kind].value += 1.0
        else:
            metrics.requests.labels(kind, "dropped").value += 1.0

    async def _emit_wait(self, kind: str, event: Event) -> None:
        """Wait for room (only while NATS is connected: backpressure), else drop."""
        accepted = await self._buffer.put(event, max_wait_s=self._buffer_wait_s)
        self._metrics.requests.labels(kind, "ok" if accepted else "dropped").inc()

    @staticmethod
    def _agent(request: web.Request) -> str | None:
        return agent_text(request.headers.get("User-Agent"))

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

    def _open_event(
        self, mailgate_id: str, method: str, agent: str | None, ip: str | None
    ) -> tuple[TrackOpen, Verdict]:
        verdict = classify_open(self._rules, method, agent, ip)
        now = time.time()
        event = TrackOpen(
            event_id=self._ids(now),
            occurred_at=now,
            mailgate_id=mailgate_id,
            ip=ip,
            user_agent=agent,
            audience=verdict.audience,
            audience_reason=verdict.reason,
        )
        return event, verdict

    async def open_pixel(self, request: web.Request) -> web.Response:
        payload = self._token(request, "open")
        if payload is None:
            self._invalid("open")
            return self._pixel()  # the pixel in all cases: a broken image helps nobody
        event, verdict = self._open_event(
            payload.mailgate_id, request.method, self._agent(request), request.remote
        )
        if not self._emit("open", event, verdict):
            await self._emit_wait("open", event)
        return self._pixel()

    def open_inline(self, token: str, method: str, user_agent: str | None, ip: str | None) -> bool:
        """``open_pixel`` for the inline path (``inline.py``): ``True`` when the open was
        taken and the pixel is the answer; ``False`` leaves the request to ``open_pixel``
        (a bad token, or a full buffer, where the request must wait for room)."""
        if self._buffer.full:
            return False
        found = self._signer.verify_details(token)  # strict: only a path aiohttp routes as is
        if found is None or found[0] != "open":
            return False
        event, verdict = self._open_event(found[1], method, agent_text(user_agent), ip)
        self._take("open", event, verdict)
        return True

    async def legacy_open(self, request: web.Request) -> web.Response:
        external_id = _param(request, "eid")
        campaign_id = _param(request, "cid")
        mailgate_id = _param(request, "mid")
        if not (external_id or campaign_id or mailgate_id):
            self._count("legacy_open", "invalid")
            return self._pixel()
        agent, ip = self._agent(request), request.remote
        verdict = classify_open(self._rules, request.method, agent, ip)
        now = time.time()
        event = TrackOpen(
            event_id=self._ids(now),
            occurred_at=now,
            legacy=True,
            external_id=external_id,
            campaign_id=campaign_id,
            mailgate_id=mailgate_id,
            ip=ip,
            user_agent=agent,
            audience=verdict.audience,
            audience_reason=verdict.reason,
        )
        if not self._emit("legacy_open", event, verdict):
            await self._emit_wait("legacy_open", event)
        return self._pixel()

    # --- clicks --------------------------------------------------------------------------

    def _classify_click(
        self, request: web.Request, key: str | None, url: str, mailgate_id: str | None
    ) -> tuple[str | None, str | None, Verdict]:
        agent, ip = self._agent(request), request.remote
        return agent, ip, self._click_verdict(request.method, agent, ip, key, url, mailgate_id)

    def _click_verdict(
        self,
        method: str,
        agent: str | None,
        ip: str | None,
        key: str | None,
        url: str,
        mailgate_id: str | None,
        accepted_ms: int | None = None,
    ) -> Verdict:
        now = self._clock()
        others = self._history.record(key, url, now) if key else 0
        return classify_click(
            self._rules,
            method,
            agent,
            ip,
            mailgate_id=mailgate_id,
            now_s=now,
            other_links_clicked=others,
            accepted_ms=accepted_ms,
        )

    def _click_event(
        self,
        mailgate_id: str,
        url: str,
        method: str,
        agent: str | None,
        ip: str | None,
        accepted_ms: int | None = None,
    ) -> tuple[TrackClick, Verdict]:
        # _click_verdict, spelled out (one call fewer per click)
        now = time.time()
        verdict_now = now if self._clock is time.time else self._clock()
        verdict = classify_click(
            self._rules,
            method,
            agent,
            ip,
            mailgate_id=mailgate_id,
            now_s=verdict_now,
            other_links_clicked=(
                self._history.record(mailgate_id, url, verdict_now) if mailgate_id else 0
            ),
            accepted_ms=accepted_ms,
        )
        event = TrackClick(
            event_id=self._ids(now),
            occurred_at=now,
            url=url,
            mailgate_id=mailgate_id,
            ip=ip,
            user_agent=agent,
            audience=verdict.audience,
            audience_reason=verdict.reason,
        )
        return event, verdict

    async def click(self, request: web.Request) -> web.Response:
        payload = self._token(request, "click")
        location = self._location(payload.url) if payload and payload.url else None
        if payload is None or payload.url is None or location is None:
            self._invalid("click")
            return self._invalid_link()  # never a redirect we did not sign
        event, verdict = self._click_event(
            payload.mailgate_id, payload.url, request.method, self._agent(request), request.remote
        )
        if not self._emit("click", event, verdict):
            await self._emit_wait("click", event)
        return self._redirect(location)

    def click_inline(
        self, token: str, method: str, user_agent: str | None, ip: str | None
    ) -> str | None:
        """``click`` for the inline path (``inline.py``): the ``Location`` to redirect to
        once the click was taken; ``None`` leaves the request to ``click`` (a bad token, a
        target ``click`` answers with 404, a full buffer)."""
        if self._buffer.full:
            return None
        found = self._signer.verify_details(token)  # strict: only a path aiohttp routes as is
        if found is None or found[0] != "click":
            return None
        _, mailgate_id, url, accepted_ms = found
        assert url is not None  # a click token always has its URL
        locations = self._inline_locations
        location = locations.get(url)
        if location is None:
            location = self._location(url)
            if location is None or not (location.isascii() and location.isprintable()):
                return None  # None: click answers 404; else never reached (redirect_location
                # encodes), left to aiohttp's checks
            if len(locations) >= LOCATION_MEMO_SIZE:
                locations.clear()
            locations[url] = location
        event, verdict = self._click_event(
            mailgate_id, url, method, agent_text(user_agent), ip, accepted_ms
        )
        self._take("click", event, verdict)
        return location

    async def legacy_click(self, request: web.Request) -> web.Response:
        url = clean_text(request.query.get("url", ""))
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
        now = time.time()
        event = TrackClick(
            event_id=self._ids(now),
            occurred_at=now,
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
        if not self._emit("legacy_click", event, verdict):
            await self._emit_wait("legacy_click", event)
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
