"""The two hot routes (``GET``/``HEAD /track/o/<token>`` and ``/track/c/<token>``) answered
inside aiohttp's protocol, before a request object exists.

aiohttp spends most of a pixel's CPU on machinery the pixel does not need: a task per
request, ``BaseRequest``, routing, ``Response``, header serialisation and the stream writer.
``TrackingRequestHandler`` is aiohttp's own ``RequestHandler`` (its llhttp parser, keep-alive
timer and shutdown); only ``data_received`` looks at each parsed message first. A message it
can answer completely is answered there with prebuilt bytes (byte for byte what the
``Application`` answers, pinned by tests/integration/test_tracker_inline.py); every other
message goes to the ``Application`` exactly as before. It answers inline only:

- ``GET``/``HEAD`` over HTTP/1.1 with no body, no upgrade and no ``Expect``, on a path made
  of the route prefix and a token of base64url characters (nothing to unquote, no query:
  ``TokenSigner.verify_details`` refuses any other character);
- while the connection is idle (no earlier request still being answered, nothing queued)
  and its transport takes writes (a client that stops reading gets aiohttp's flow control);
- with a valid token of the route's kind, a redirect target already in printable ASCII, and
  room in the event buffer (a full buffer means waiting, which the ``Application`` does).

The event goes into the same ``EventBuffer`` and counters as the ``Application``'s: a request
answered inline is recorded, published and drained at shutdown exactly like any other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE, RequestHandler, _ErrInfo

from .handlers import TrackerHandlers
from .pages import NO_CACHE_HEADERS, PIXEL_GIF

log = structlog.get_logger()

OPEN_PREFIX = "/track/o/"
CLICK_PREFIX = "/track/c/"
_PREFIX_CHARS = len(OPEN_PREFIX)
_LOCATION_MEMO_SIZE = 1024


def _headers(pairs: list[tuple[str, str]]) -> bytes:
    return "".join(f"{name}: {value}\r\n" for name, value in pairs).encode("latin-1")


_NO_CACHE = list(NO_CACHE_HEADERS.items())
#: Up to ``Date: ``; then the date, ``_TAIL`` (+ ``Connection: close``) and the body.
_PIXEL_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    + _headers([*_NO_CACHE, ("Content-Type", "image/gif"), ("Content-Length", str(len(PIXEL_GIF)))])
    + b"Date: "
)
_REDIRECT_START = b"HTTP/1.1 302 Found\r\nLocation: "
_REDIRECT_REST = b"\r\n" + _headers([*_NO_CACHE, ("Content-Length", "0")]) + b"Date: "
_REDIRECT_REST_HEAD = b"\r\n" + _headers(_NO_CACHE) + b"Date: "  # aiohttp: no length on HEAD
_TAIL = f"\r\nServer: {SERVER_SOFTWARE}\r\n".encode("latin-1")
_CLOSE = b"Connection: close\r\n"


class InlineRoutes:
    """Answers (response bytes) for the hot routes; ``None``: the ``Application`` answers."""

    def __init__(self, handlers: TrackerHandlers, clock: Callable[[], float] = time.time) -> None:
        self._handlers = handlers
        self._clock = clock
        self._second = -1.0
        self._second_end = -1.0
        #: (keep-alive, close) x (GET, HEAD) answers of the current second
        self._pixel: dict[tuple[bool, bool], bytes] = {}
        self._date_tail: tuple[bytes, bytes] = (b"", b"")
        #: Location -> the answer's start, for GET and for HEAD
        self._redirects: dict[str, bytes] = {}
        self._head_redirects: dict[str, bytes] = {}
        self.answered = 0
        """Requests answered here (the rest went to the ``Application``)."""

    def _tick(self, now: float) -> None:
        """The answers of the second of ``now`` (the caller checked it is another one)."""
        second = int(now)
        self._second, self._second_end = second, second + 1.0
        date = rfc822_formatted_time().encode("latin-1")
        keep, close = date + _TAIL + b"\r\n", date + _TAIL + _CLOSE + b"\r\n"
        self._date_tail = (keep, close)
        self._pixel = {
            (False, False): _PIXEL_HEAD + keep + PIXEL_GIF,
            (False, True): _PIXEL_HEAD + keep,
            (True, False): _PIXEL_HEAD + close + PIXEL_GIF,
            (True, True): _PIXEL_HEAD + close,
        }

    def answer(self, msg: Any, payload: Any, ip: str | None) -> bytes | None:
        """The whole response to ``msg`` when it is a hot-route request this path answers
        (its event is then taken), else ``None``."""
        method = msg.method
        path = msg.path
        if (
            (method != "GET" and method != "HEAD")
            or payload is not EMPTY_PAYLOAD
            or msg.version != HttpVersion11
            or msg.upgrade
        ):
            return None
        headers = msg.headers
        if hdrs.EXPECT in headers:  # the app may answer "100 Continue" first
            return None
        handlers = self._handlers
        user_agent = headers.get(hdrs.USER_AGENT)  # istr names: no case folding per request
        if path.startswith(OPEN_PREFIX):
            if not handlers.open_inline(path[_PREFIX_CHARS:], method, user_agent, ip):
                return None
            now = self._clock()
            if not self._second <= now < self._second_end:
                self._tick(now)
            self.answered += 1
            return self._pixel[(bool(msg.should_close), method == "HEAD")]
        if path.startswith(CLICK_PREFIX):
            location = handlers.click_inline(path[_PREFIX_CHARS:], method, user_agent, ip)
            if location is None:
                return None
            now = self._clock()
            if not self._second <= now < self._second_end:
                self._tick(now)
            self.answered += 1
            head = method == "HEAD"
            redirects = self._head_redirects if head else self._redirects
            start = redirects.get(location)
            if start is None:
                if len(redirects) >= _LOCATION_MEMO_SIZE:
                    redirects.clear()
                rest = _REDIRECT_REST_HEAD if head else _REDIRECT_REST
                start = redirects[location] = _REDIRECT_START + location.encode("ascii") + rest
            return start + self._date_tail[1 if msg.should_close else 0]
        return None


class TrackingRequestHandler(RequestHandler):
    """aiohttp's ``RequestHandler`` answering ``InlineRoutes`` requests in ``data_received``
    (see the module docstring); everything else is aiohttp's own code path."""

    __slots__ = ("_inline", "_peer_ip")

    def __init__(self, manager: web.Server, *, inline: InlineRoutes, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._inline = inline
        self._peer_ip: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")  # what request.remote reports
        if isinstance(peer, (list, tuple)):
            self._peer_ip = str(peer[0])
        elif peer is not None:
            self._peer_ip = str(peer)

    def _idle(self) -> bool:
        """No request of this connection is being answered or waiting: an answer written
        now is in order."""
        waiter = self._waiter
        return (
            waiter is not None
            and not waiter.done()
            and not self._messages
            and not self._paused
            and not self._close
            and not self._force_close
        )

    def data_received(self, data: bytes) -> None:
        if self._payload_parser is not None or self._upgraded or not self._idle():
            super().data_received(data)
            return
        parser = self._parser
        assert parser is not None
        # As RequestHandler.data_received, answering what InlineRoutes takes on the way.
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            messages = [(_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD)]
            upgraded, tail = False, b""
        queue = self._messages
        for msg, payload in messages:
            self._request_count += 1
            answer = None
            if not queue and not self._paused and not isinstance(msg, _ErrInfo):
                try:
                    answer = self._inline.answer(msg, payload, self._peer_ip)
                except Exception:  # a bug here must not cost the request: the app answers
                    log.exception("inline tracking answer failed")
            if answer is None:
                queue.append((msg, payload))
                continue
            parser.message_consumed()
            if not self._answered(answer, bool(msg.should_close)):
                return  # Connection: close: what follows on this connection is ignored
        waiter = self._waiter
        if queue and waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self._buffer_paused and len(queue) >= self._max_msg_queue_size:
            self._pause_reading_for_buffer()
        self._upgraded = upgraded
        if upgraded and tail:
            self._message_tail = tail
        if len(messages) >= MAX_MSG_QUEUE_SIZE and not queue and not upgraded:
            # The parser stopped at its queue limit and kept the rest; every message was
            # answered, so go on parsing it (aiohttp resumes from start() instead).
            self.data_received(b"")

    def _answered(self, answer: bytes, close: bool) -> bool:
        """Write ``answer``; ``False`` when the connection closes after it."""
        transport = self.transport
        manager = self._manager
        if transport is None or manager is None:
            return False
        manager.requests_count += 1
        transport.write(answer)
        if close:
            self.force_close()  # flushes the answer, then closes (as aiohttp does)
            return False
        # the keep-alive timer, as RequestHandler.start does after each answer
        loop = self._loop
        close_time = loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
        return True


class TrackingServer(web.Server):
    """aiohttp's low-level ``Server`` whose connections are ``TrackingRequestHandler``s."""

    def __init__(self, handler: Any, *, inline: InlineRoutes, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._inline = inline

    def __call__(self) -> RequestHandler:
        return TrackingRequestHandler(self, loop=self._loop, inline=self._inline, **self._kwargs)


class TrackingAppRunner(web.AppRunner):
    """``web.AppRunner`` serving the ``Application`` through a ``TrackingServer``: same
    port, same app (it still has every route, the hot ones included), same shutdown."""

    def __init__(self, app: web.Application, *, inline: InlineRoutes, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._inline = inline

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's startup and its Server settings
        return TrackingServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            inline=self._inline,
            **plain._kwargs,
        )
