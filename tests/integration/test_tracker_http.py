"""tracker over HTTP against a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from mailgate_core.ids import new_ulid
from mailgate_core.schemas import (
    TrackBatch,
    TrackClick,
    TrackOpen,
    TrackUnsubscribe,
    decode,
    encode,
)
from mailgate_core.tracking import TokenSigner
from mailgate_fakes.testing import eventually
from mailgate_tracker.app import TrackerService
from mailgate_tracker.pages import PIXEL_GIF

SECRET = "tracker-test-secret-0123456789"
MID = new_ulid(int((time.time() - 3600) * 1000))  # accepted an hour ago
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"
GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
signer = TokenSigner([SECRET])

MakeTracker = Callable[..., Awaitable[TrackerService]]


@pytest.fixture
def make_tracker(start_tracker: MakeTracker) -> MakeTracker:
    async def make(**overrides: Any) -> TrackerService:
        defaults: dict[str, Any] = {
            "tracking_secret": f"{SECRET},older-secret",
            "tracking_legacy_hosts": ["shop.example.com"],
            "tracker_unsubscribe_wait_s": 0.5,
        }
        return await start_tracker(**(defaults | overrides))

    return make


@pytest.fixture
async def tracker(make_tracker: MakeTracker) -> TrackerService:
    return await make_tracker()


def base_url(service: TrackerService) -> str:
    return f"http://127.0.0.1:{service.settings.tracker_port}"  # type: ignore[attr-defined]


@pytest.fixture
async def http(tracker: TrackerService) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"User-Agent": CHROME}
    async with aiohttp.ClientSession(base_url=base_url(tracker), headers=headers) as session:
        yield session


async def stored(js, subject: str) -> list[bytes]:
    """Every event of ``subject`` in the TRACK stream (now): messages on the subject and
    the events of that subject inside ``track.batch`` messages (re-encoded alone)."""
    count = (await js.stream_info("TRACK")).state.messages
    if not count:
        return []
    sub = await js.subscribe("track.>", stream="TRACK", ordered_consumer=True)
    out: list[bytes] = []
    for _ in range(count):
        msg = await sub.next_msg(timeout=2)
        if msg.subject == "track.batch":
            events = decode(msg.data, TrackBatch).events()
            out += [encode(e) for e in events if e.subject() == subject]
        elif msg.subject == subject:
            out.append(msg.data)
    await sub.unsubscribe()
    return out


async def wait_stored(js, subject: str, count: int, timeout: float = 10.0) -> list[bytes]:
    """Wait until ``subject`` holds ``count`` messages (publishing is asynchronous)."""

    async def check() -> list[bytes] | None:
        got = await stored(js, subject)
        assert len(got) <= count, f"{len(got)} messages on {subject}, expected {count}"
        return got if len(got) == count else None

    return await eventually(check, timeout=timeout, what=f"{count} on {subject}")


def metric(tracker: TrackerService, name: str, **labels: str) -> float:
    return tracker.registry.get_sample_value(name, labels) or 0.0


def requests(tracker: TrackerService, kind: str, result: str) -> float:
    return metric(tracker, "mailgate_tracker_requests_total", kind=kind, result=result)


async def test_the_pixel_is_an_uncached_gif_and_publishes_track_open(js, http, tracker) -> None:
    token = signer.make_open_token(MID)
    async with http.get(f"/track/o/{token}") as resp:
        assert resp.status == 200
        assert resp.content_type == "image/gif"
        assert await resp.read() == PIXEL_GIF
        assert "no-store" in resp.headers["Cache-Control"]
        assert resp.headers["Expires"] == "Thu, 01 Jan 1970 00:00:00 GMT"
    [data] = await wait_stored(js, "track.open", 1)
    event = decode(data, TrackOpen)
    assert event.mailgate_id == MID
    assert event.user_agent == CHROME
    assert (event.audience, event.audience_reason) == ("human", "")
    assert event.ip == "127.0.0.1"
    assert requests(tracker, "open", "ok") == 1
    assert metric(tracker, "mailgate_tracker_events_published_total", subject="track.open") == 1


async def test_image_proxies_and_head_requests_are_not_human_opens(js, http, tracker) -> None:
    token = signer.make_open_token(MID)
    async with http.get(f"/track/o/{token}", headers={"User-Agent": GMAIL}) as resp:
        assert resp.status == 200 and await resp.read() == PIXEL_GIF
    async with http.head(f"/track/o/{token}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "image/gif"
    events = [decode(d, TrackOpen) for d in await wait_stored(js, "track.open", 2)]
    verdicts = sorted((e.audience, e.audience_reason) for e in events)
    assert verdicts == [("prefetch", "gmail_proxy"), ("scanner", "head_request")]
    labels = {"kind": "open", "audience": "prefetch", "reason": "gmail_proxy"}
    assert metric(tracker, "mailgate_tracker_audience_total", **labels) == 1


async def test_a_bad_pixel_token_still_gets_the_uncached_gif_but_no_event(js, http, tracker):
    async with http.get("/track/o/garbage-token") as resp:
        assert resp.status == 200 and await resp.read() == PIXEL_GIF
        assert "no-store" in resp.headers["Cache-Control"]
    # a click token is not an open token
    async with http.get(f"/track/o/{signer.make_click_token(MID, 'https://x.org/')}") as resp:
        assert resp.status == 200 and await resp.read() == PIXEL_GIF
    async with http.get(f"/track/o/{signer.make_open_token(MID)}") as resp:
        assert resp.status == 200
    [data] = await wait_stored(js, "track.open", 1)  # only the good one
    assert decode(data, TrackOpen).mailgate_id == MID
    assert metric(tracker, "mailgate_tracker_invalid_tokens_total", kind="open") == 2


async def test_a_click_redirects_and_publishes_track_click(js, http, tracker) -> None:
    url = "https://example.com/landing?utm=1"
    token = signer.make_click_token(MID, url)
    async with http.get(f"/track/c/{token}", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == url
        assert "no-store" in resp.headers["Cache-Control"]
    [data] = await wait_stored(js, "track.click", 1)
    event = decode(data, TrackClick)
    assert (event.mailgate_id, event.url, event.legacy) == (MID, url, False)
    assert (event.audience, event.audience_reason) == ("human", "")
    assert requests(tracker, "click", "ok") == 1


async def test_scanner_clicks_are_marked_by_timing_and_bursts(js, http) -> None:
    fresh = new_ulid()  # accepted just now: a click now is a link checker's
    async with http.get(
        f"/track/c/{signer.make_click_token(fresh, 'https://example.com/a')}",
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302
    burst = new_ulid(int((time.time() - 3600) * 1000))
    for link in ("https://example.com/1", "https://example.com/2", "https://example.com/3"):
        token = signer.make_click_token(burst, link)
        async with http.get(f"/track/c/{token}", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == link
    events = [decode(d, TrackClick) for d in await wait_stored(js, "track.click", 4)]
    by_url = {e.url: (e.audience, e.audience_reason) for e in events}
    assert by_url == {
        "https://example.com/a": ("scanner", "early_click"),
        # the first click of a burst cannot be told apart yet; the rest are marked
        "https://example.com/1": ("human", ""),
        "https://example.com/2": ("scanner", "click_burst"),
        "https://example.com/3": ("scanner", "click_burst"),
    }


async def test_a_click_token_signed_with_the_second_secret_is_accepted(js, http) -> None:
    token = TokenSigner(["older-secret"]).make_click_token(MID, "https://example.com/")
    async with http.get(f"/track/c/{token}", allow_redirects=False) as resp:
        assert resp.status == 302


async def test_tampered_or_unsigned_clicks_are_404_and_never_redirect(js, http, tracker) -> None:
    token = signer.make_click_token(MID, "https://example.com/")
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    unsigned = TokenSigner(["attacker"]).make_click_token(MID, "https://evil.example.net/")
    for bad in (tampered, unsigned, "x", signer.make_open_token(MID)):
        async with http.get(f"/track/c/{bad}", allow_redirects=False) as resp:
            assert resp.status == 404
            assert "Location" not in resp.headers
            text = await resp.text()
            assert "invalid" in text and "недействительна" in text
    async with http.get(f"/track/c/{token}", allow_redirects=False) as resp:
        assert resp.status == 302
    await wait_stored(js, "track.click", 1)  # only the good one
    assert requests(tracker, "click", "invalid") == 4
    assert metric(tracker, "mailgate_tracker_invalid_tokens_total", kind="click") == 4


async def test_legacy_open_publishes_with_the_query_ids(js, http) -> None:
    async with http.get("/track/o", params={"eid": "AMS-7", "cid": "73", "mid": MID}) as resp:
        assert resp.status == 200 and await resp.read() == PIXEL_GIF
    [data] = await wait_stored(js, "track.open", 1)
    event = decode(data, TrackOpen)
    assert (event.external_id, event.campaign_id, event.mailgate_id) == ("AMS-7", "73", MID)
    assert event.legacy is True


async def test_legacy_click_redirects_only_to_allow_listed_hosts(js, http) -> None:
    allowed = "https://shop.example.com/item/1"
    params = {"url": "https://evil.example.net/phish", "eid": "AMS-7", "cid": "73"}
    async with http.get("/track/c", params=params, allow_redirects=False) as resp:
        assert resp.status == 400
        assert "Location" not in resp.headers
        assert resp.content_type == "application/problem+json"
        assert (await resp.json())["status"] == 400
    params["url"] = allowed
    async with http.get("/track/c", params=params, allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == allowed
    [data] = await wait_stored(js, "track.click", 1)
    event = decode(data, TrackClick)
    assert (event.url, event.legacy, event.external_id) == (allowed, True, "AMS-7")


async def test_unsubscribe_page_is_bilingual_and_only_post_unsubscribes(js, http) -> None:
    token = signer.make_unsub_token(MID)
    async with http.get(f"/u/{token}") as resp:
        assert resp.status == 200
        page = await resp.text()
    assert "Отписаться" in page and "Unsubscribe" in page
    assert 'method="post"' in page and f'action="/u/{token}"' in page
    assert "http://" not in page and "https://" not in page  # no external assets
    assert "<script" not in page
    assert await stored(js, "track.unsubscribe") == []  # the GET itself records nothing

    async with http.post(f"/u/{token}", data={"confirm": "yes"}) as resp:
        assert resp.status == 200
        assert "отписаны" in await resp.text()
    [data] = await wait_stored(js, "track.unsubscribe", 1)
    event = decode(data, TrackUnsubscribe)
    assert (event.mailgate_id, event.one_click) == (MID, False)


async def test_one_click_unsubscribe_is_recorded_before_the_answer(js, http) -> None:
    token = signer.make_unsub_token(MID)
    form = aiohttp.FormData({"List-Unsubscribe": "One-Click"})
    async with http.post(f"/u/{token}", data=form) as resp:
        assert resp.status == 200
    [data] = await stored(js, "track.unsubscribe")  # no waiting: durable before the 200
    assert decode(data, TrackUnsubscribe).one_click is True


async def test_repeated_unsubscribes_are_harmless_and_recorded_once(js, http, tracker) -> None:
    token = signer.make_unsub_token(MID)
    multipart = aiohttp.FormData({"List-Unsubscribe": "One-Click"}, default_to_multipart=True)
    async with http.post(f"/u/{token}", data=multipart) as resp:
        assert resp.status == 200
    for _ in range(2):  # the person also presses the button, twice
        async with http.post(f"/u/{token}", data={"confirm": "yes"}) as resp:
            assert resp.status == 200
    [data] = await stored(js, "track.unsubscribe")
    assert decode(data, TrackUnsubscribe).one_click is True  # the first one
    assert requests(tracker, "unsubscribe", "ok") == 3


async def test_unsubscribe_with_a_bad_token_is_404(js, http, tracker) -> None:
    open_token = signer.make_open_token(MID)
    async with http.post(f"/u/{open_token}", data={"List-Unsubscribe": "One-Click"}) as resp:
        assert resp.status == 404
    async with http.get("/u/nonsense") as resp:
        assert resp.status == 404
    assert await stored(js, "track.unsubscribe") == []  # answered only after a publish
    assert metric(tracker, "mailgate_tracker_invalid_tokens_total", kind="unsubscribe") == 1


async def test_while_nats_is_down_pixels_and_redirects_are_served_and_events_arrive_later(
    nats_server, js, http, tracker
) -> None:
    nats_server.stop()
    await eventually(lambda: not tracker.nc.is_connected, what="disconnected")
    url = "https://example.com/after"
    t0 = time.monotonic()
    async with http.get(f"/track/o/{signer.make_open_token(MID)}") as resp:
        assert resp.status == 200 and await resp.read() == PIXEL_GIF
    async with http.get(
        f"/track/c/{signer.make_click_token(MID, url)}", allow_redirects=False
    ) as resp:
        assert resp.status == 302 and resp.headers["Location"] == url
    assert time.monotonic() - t0 < 0.5  # nobody waited for NATS
    async with http.get("/readyz") as resp:
        assert resp.status == 200  # keep taking clicks: events wait in the buffer

    # Unsubscribe must not claim success while nothing is recorded.
    token = signer.make_unsub_token(MID)
    async with http.post(
        f"/u/{token}", data={"confirm": "yes"}, headers={"Accept": "text/html"}
    ) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "5"
        assert "повторите" in await resp.text()
    async with http.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"}) as resp:
        assert resp.status == 503
        assert resp.content_type == "application/problem+json"
    # open, click and both unsubscribes (they share one event id: JetStream keeps one)
    assert metric(tracker, "mailgate_tracker_events_buffered") == 4
    assert requests(tracker, "unsubscribe", "unavailable") == 2

    nats_server.start()  # same port and store
    [opened] = await wait_stored(js, "track.open", 1, timeout=15)
    [clicked] = await wait_stored(js, "track.click", 1)
    assert decode(opened, TrackOpen).mailgate_id == MID
    assert decode(clicked, TrackClick).url == url
    # the unsubscribes that got 503 are recorded once NATS is back (the safe direction)
    [unsub] = await wait_stored(js, "track.unsubscribe", 1)
    assert decode(unsub, TrackUnsubscribe).mailgate_id == MID
    assert metric(tracker, "mailgate_tracker_events_buffered") == 0
    assert metric(tracker, "mailgate_tracker_events_dropped_total", reason="buffer_full") == 0


async def test_a_full_buffer_drops_and_counts_but_still_serves(nats_server, make_tracker) -> None:
    tracker = await make_tracker(tracker_buffer_size=2, tracker_flush_timeout_s=0.2)
    nats_server.stop()
    await eventually(lambda: not tracker.nc.is_connected, what="disconnected")
    async with aiohttp.ClientSession(base_url=base_url(tracker)) as http:
        for _ in range(3):
            async with http.get(f"/track/o/{signer.make_open_token(MID)}") as resp:
                assert resp.status == 200 and await resp.read() == PIXEL_GIF
        # an unsubscribe still gets in (a reserve beyond the capacity), though not confirmed
        token = signer.make_unsub_token(MID)
        async with http.post(f"/u/{token}", data={"confirm": "yes"}) as resp:
            assert resp.status == 503
    assert metric(tracker, "mailgate_tracker_events_dropped_total", reason="buffer_full") == 1
    assert metric(tracker, "mailgate_tracker_events_buffered") == 3
    assert requests(tracker, "open", "ok") == 2
    assert requests(tracker, "open", "dropped") == 1


async def test_a_full_buffer_with_nats_up_slows_requests_instead_of_dropping(
    js, make_tracker
) -> None:
    tracker = await make_tracker(tracker_buffer_size=1, tracker_publish_concurrency=1)
    token = signer.make_open_token(MID)
    async with aiohttp.ClientSession(base_url=base_url(tracker)) as http:

        async def fetch() -> bytes:
            async with http.get(f"/track/o/{token}") as resp:
                return await resp.read()

        bodies = await asyncio.gather(*(fetch() for _ in range(20)))
    assert bodies == [PIXEL_GIF] * 20
    await wait_stored(js, "track.open", 20)
    assert requests(tracker, "open", "ok") == 20
    assert metric(tracker, "mailgate_tracker_events_dropped_total", reason="buffer_full") == 0


async def test_graceful_stop_flushes_the_buffer_once_nats_is_back(
    nats_server, js, make_tracker
) -> None:
    tracker = await make_tracker()
    nats_server.stop()
    await eventually(lambda: not tracker.nc.is_connected, what="disconnected")
    async with aiohttp.ClientSession(base_url=base_url(tracker)) as http:
        for _ in range(3):
            async with http.get(f"/track/o/{signer.make_open_token(MID)}") as resp:
                assert resp.status == 200
    nats_server.start()
    await tracker.stop()  # waits (up to TRACKER_FLUSH_TIMEOUT_S) for the reconnect and flush
    assert len(await stored(js, "track.open")) == 3
    assert metric(tracker, "mailgate_tracker_events_dropped_total", reason="shutdown") == 0


async def test_graceful_stop_gives_up_after_the_flush_timeout_and_counts(
    nats_server, make_tracker
) -> None:
    tracker = await make_tracker(tracker_flush_timeout_s=0.3)
    nats_server.stop()
    await eventually(lambda: not tracker.nc.is_connected, what="disconnected")
    async with aiohttp.ClientSession(base_url=base_url(tracker)) as http:
        for _ in range(2):
            async with http.get(f"/track/o/{signer.make_open_token(MID)}") as resp:
                assert resp.status == 200
    t0 = time.monotonic()
    await tracker.stop()
    assert time.monotonic() - t0 < 3
    assert metric(tracker, "mailgate_tracker_events_dropped_total", reason="shutdown") == 2


async def test_ops_routes_are_served_on_the_tracker_port(http) -> None:
    async with http.get("/readyz") as resp:
        assert resp.status == 200
    async with http.get("/metrics") as resp:
        text = await resp.text()
    for name in (
        "mailgate_tracker_requests_total",
        "mailgate_tracker_events_dropped_total",
        "mailgate_tracker_events_buffered",
        "mailgate_tracker_invalid_tokens_total",
    ):
        assert name in text
