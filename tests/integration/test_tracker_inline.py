"""The tracker's inline routes (mailgate_tracker/inline.py) against the aiohttp Application
they stand in front of: same bytes, same order, same events, nothing lost at shutdown."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from mailgate_core.ids import new_ulid
from mailgate_core.schemas import TrackBatch, decode
from mailgate_core.tracking import TokenSigner
from mailgate_fakes.testing import eventually
from mailgate_tracker.app import TrackerService
from mailgate_tracker.pages import PIXEL_GIF

SECRET = "tracker-inline-secret-0123456789"
MID = new_ulid(int((time.time() - 3600) * 1000))
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"
LANDING = "https://shop.example.com/landing?utm_source=mail&utm_campaign=73"
signer = TokenSigner([SECRET])
OPEN = signer.make_open_token(MID)
CLICK = signer.make_click_token(MID, LANDING)
UNSUB = signer.make_unsub_token(MID)
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.I)
_DATE = re.compile(rb"\r\nDate: [^\r]*")

MakeTracker = Callable[..., Awaitable[TrackerService]]


@pytest.fixture
def make_tracker(start_tracker: MakeTracker) -> MakeTracker:
    async def make(**overrides: Any) -> TrackerService:
        defaults: dict[str, Any] = {"tracking_secret": SECRET, "tracker_early_click_s": 0.0}
        return await start_tracker(**(defaults | overrides))

    return make


def port_of(service: TrackerService) -> int:
    return service.settings.tracker_port  # type: ignore[attr-defined,no-any-return]


def request(method: str, path: str, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: t", f"User-Agent: {CHROME}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(port: int, data: bytes, heads: list[bool]) -> tuple[list[bytes], bool]:
    """Send ``data`` on one connection and read one response per entry of ``heads`` (``True``:
    the answer to a HEAD, no body). Returns the responses (``Date`` blanked) and whether the
    server closed the connection after them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        out = []
        for head_only in heads:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            match = _LENGTH.search(head)
            body = b""
            if match and not head_only:
                body = await asyncio.wait_for(reader.readexactly(int(match.group(1))), 5)
            out.append(_DATE.sub(b"\r\nDate: -", head) + body)
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
        except TimeoutError:
            closed = False
        return out, closed
    finally:
        writer.close()


async def stored_events(js: Any) -> list[Any]:
    """Every open/click event in TRACK (unpacked from track.batch messages)."""
    count = (await js.stream_info("TRACK")).state.messages
    if not count:
        return []
    sub = await js.subscribe("track.>", stream="TRACK", ordered_consumer=True)
    events: list[Any] = []
    for _ in range(count):
        msg = await sub.next_msg(timeout=2)
        if msg.subject == "track.batch":
            events += decode(msg.data, TrackBatch).events()
    await sub.unsubscribe()
    return events


def ok_requests(service: TrackerService, kind: str) -> float:
    labels = {"kind": kind, "result": "ok"}
    return service.registry.get_sample_value("mailgate_tracker_requests_total", labels) or 0.0


async def test_inline_answers_are_byte_for_byte_what_the_app_answers(
    js: Any, make_tracker: MakeTracker
) -> None:
    inline = await make_tracker()
    app_only = await make_tracker(tracker_inline_routes=False)
    assert inline.inline is not None and app_only.inline is None
    cases = [
        (request("GET", f"/track/o/{OPEN}"), False),
        (request("HEAD", f"/track/o/{OPEN}"), True),
        (request("GET", f"/track/c/{CLICK}"), False),
        (request("HEAD", f"/track/c/{CLICK}"), True),
    ]
    for data, head_only in cases:
        want, want_closed = await exchange(port_of(app_only), data, [head_only])
        got, got_closed = await exchange(port_of(inline), data, [head_only])
        assert got == want, data
        assert got_closed is want_closed is False
    closing = request("GET", f"/track/o/{OPEN}", "Connection: close")
    want, want_closed = await exchange(port_of(app_only), closing, [False])
    got, got_closed = await exchange(port_of(inline), closing, [False])
    assert got == want and b"\r\nConnection: close\r\n" in got[0]
    assert got_closed and want_closed
    assert got[0].endswith(PIXEL_GIF)
    assert inline.inline.answered == 5
    assert ok_requests(inline, "open") == ok_requests(app_only, "open") == 3
    assert ok_requests(inline, "click") == ok_requests(app_only, "click") == 2

    async def both_recorded() -> list[Any] | None:
        events = await stored_events(js)
        return events if len(events) == 10 else None

    events = await eventually(both_recorded, timeout=10, what="10 stored events")
    assert {e.mailgate_id for e in events} == {MID}
    audiences = sorted((type(e).__name__, e.audience, e.audience_reason) for e in events)
    assert audiences.count(("TrackOpen", "scanner", "head_request")) == 2
    assert audiences.count(("TrackClick", "human", "")) == 2


async def test_pipelined_requests_are_answered_in_order_whichever_path_answers_them(
    make_tracker: MakeTracker,
) -> None:
    tracker = await make_tracker()
    data = b"".join(
        [
            request("GET", f"/track/o/{OPEN}"),  # inline
            request("GET", f"/u/{UNSUB}"),  # the app's confirmation page
            request("GET", f"/track/c/{CLICK}"),  # queued behind it: the app answers
            request("GET", "/track/c/not-a-valid-token"),  # 404 from the app
            request("GET", "/healthz"),
        ]
    )
    answers, closed = await exchange(port_of(tracker), data, [False] * 5)
    statuses = [a.split(b" ", 2)[1] for a in answers]
    assert statuses == [b"200", b"200", b"302", b"404", b"200"]
    assert answers[0].endswith(PIXEL_GIF)
    assert b"text/html" in answers[1]
    assert f"\r\nLocation: {LANDING}\r\n".encode() in answers[2]
    assert answers[4].endswith(b'{"status":"ok"}')
    assert not closed
    assert ok_requests(tracker, "open") == 1 and ok_requests(tracker, "click") == 1
    # Then, with the connection idle again, the inline path answers the next ones.
    more, _ = await exchange(port_of(tracker), request("GET", f"/track/o/{OPEN}"), [False])
    assert more[0].endswith(PIXEL_GIF)
    assert tracker.inline is not None and tracker.inline.answered >= 2


async def test_more_pipelined_opens_than_the_parser_queues_are_all_answered(
    js: Any, make_tracker: MakeTracker
) -> None:
    tracker = await make_tracker()
    count = 150  # aiohttp's parser stops at 32 queued messages and keeps the rest
    answers, closed = await exchange(
        port_of(tracker), request("GET", f"/track/o/{OPEN}") * count, [False] * count
    )
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") and a.endswith(PIXEL_GIF) for a in answers)
    assert not closed
    assert tracker.inline is not None and tracker.inline.answered == count

    async def recorded() -> int | None:
        n = len(await stored_events(js))
        return n if n == count else None

    await eventually(recorded, timeout=10, what=f"{count} opens stored")


async def test_requests_the_inline_path_leaves_to_the_app_are_answered_as_before(
    make_tracker: MakeTracker,
) -> None:
    tracker = await make_tracker()
    port = port_of(tracker)
    cases = [
        request("GET", f"/track/o/{OPEN}", version="1.0"),
        request("GET", f"/track/o/{OPEN}?utm=1"),
        request("GET", f"/track/o/{OPEN[:10]}%{ord(OPEN[10]):02X}{OPEN[11:]}"),
        request("GET", f"/track/o/{OPEN}", "Content-Length: 3") + b"abc",
        request("POST", f"/track/o/{OPEN}", "Content-Length: 0"),
        request("GET", "/track/o/bm90LWEtdG9rZW4"),  # base64url but not a token: the pixel
        request("GET", f"/track/o/{UNSUB}"),  # a token of another kind: the pixel
    ]
    answers = []
    for data in cases:
        got, _ = await exchange(port, data, [False])
        answers.append(got[0])
    assert answers[0].startswith(b"HTTP/1.0 200 OK\r\n") and answers[0].endswith(PIXEL_GIF)
    for answer in answers[1:4] + answers[5:]:
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(PIXEL_GIF)
    assert answers[4].startswith(b"HTTP/1.1 405 ")
    expecting, _ = await exchange(
        port, request("GET", f"/track/o/{OPEN}", "Expect: 100-continue"), [False, False]
    )
    assert expecting[0].startswith(b"HTTP/1.1 100 Continue\r\n")  # as the app answers it
    assert expecting[1].startswith(b"HTTP/1.1 200 OK\r\n") and expecting[1].endswith(PIXEL_GIF)
    assert tracker.inline is not None and tracker.inline.answered == 0
    assert ok_requests(tracker, "open") == 5  # 1.0, query, quoted, with a body, Expect
    invalid = tracker.registry.get_sample_value(
        "mailgate_tracker_invalid_tokens_total", {"kind": "open"}
    )
    assert invalid == 2


async def test_a_malformed_request_still_gets_aiohttps_400(make_tracker: MakeTracker) -> None:
    tracker = await make_tracker()
    answers, closed = await exchange(
        port_of(tracker), b"GET /track/o/x HTTP/1.1\r\nBad\r\n\r\n", [False]
    )
    assert answers[0].startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert closed


async def test_every_open_answered_inline_is_stored_when_the_tracker_stops_at_once(
    js: Any, make_tracker: MakeTracker
) -> None:
    # A long linger: the events are still buffered when stop() begins; stop must publish them.
    tracker = await make_tracker(tracker_batch_linger_s=30.0, tracker_batch_max_events=10_000)
    per_connection, connections = 40, 5
    data = request("GET", f"/track/o/{OPEN}") * per_connection
    results = await asyncio.gather(
        *(exchange(port_of(tracker), data, [False] * per_connection) for _ in range(connections))
    )
    answered = sum(len(answers) for answers, _ in results)
    assert answered == per_connection * connections
    assert tracker.inline is not None and tracker.inline.answered == answered
    assert len(await stored_events(js)) == 0  # still lingering in the buffer
    await tracker.stop()
    events = await stored_events(js)
    assert len(events) == answered
    assert len({e.event_id for e in events}) == answered
    dropped = tracker.registry.get_sample_value(
        "mailgate_tracker_events_dropped_total", {"reason": "shutdown"}
    )
    assert not dropped


async def test_a_stopping_tracker_takes_no_new_inline_requests(make_tracker: MakeTracker) -> None:
    tracker = await make_tracker()
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tracker))
    try:
        writer.write(request("GET", f"/track/o/{OPEN}"))
        await reader.readuntil(PIXEL_GIF)
        await tracker.stop()
        writer.write(request("GET", f"/track/o/{OPEN}"))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    finally:
        writer.close()
    assert tracker.inline is not None and tracker.inline.answered == 1
    assert ok_requests(tracker, "open") == 1


async def test_a_client_that_reads_slowly_gets_every_answer_in_order(
    make_tracker: MakeTracker,
) -> None:
    # Thousands of pipelined requests read through a tiny receive buffer: the server's
    # transport pauses writing, requests then go through aiohttp's flow-controlled path (the
    # inline one waits for an idle connection), and every answer comes back in order.
    tracker = await make_tracker(tracker_buffer_size=100_000)
    pairs = 12_000
    pair = request("GET", f"/track/o/{OPEN}") + request("GET", f"/track/c/{CLICK}")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port_of(tracker)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)

    async def read_all() -> list[bytes]:
        statuses = []
        for _ in range(2 * pairs):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            match = _LENGTH.search(head)
            await reader.readexactly(int(match.group(1)) if match else 0)
            statuses.append(head[9:12])
        return statuses

    try:
        reading = asyncio.create_task(read_all())
        writer.write(pair * pairs)
        await writer.drain()
        statuses = await reading
    finally:
        writer.close()
    assert statuses == [b"200", b"302"] * pairs
    assert ok_requests(tracker, "open") == ok_requests(tracker, "click") == pairs
    assert tracker.inline is not None
    assert 0 < tracker.inline.answered < 2 * pairs  # both paths answered
