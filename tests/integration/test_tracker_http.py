"""tracker over HTTP against a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from mailgate_core.schemas import TrackClick, TrackOpen, TrackUnsubscribe, decode
from mailgate_core.service import ServiceBase
from mailgate_core.tracking import TokenSigner
from mailgate_fakes.infra import free_port
from mailgate_fakes.testing import eventually
from mailgate_tracker.app import Settings, build
from mailgate_tracker.pages import PIXEL_GIF
from prometheus_client import CollectorRegistry

SECRET = "tracker-test-secret-0123456789"
MID = "01JABCDEFGHJKMNPQRSTVWXYZ0"
signer = TokenSigner([SECRET])


@pytest.fixture
async def tracker(nats_url: str) -> AsyncIterator[ServiceBase]:
    settings = Settings(
        nats_url=nats_url,
        tracker_host="127.0.0.1",
        tracker_port=free_port(),
        tracking_secret=f"{SECRET},older-secret",
        tracking_legacy_hosts=["shop.example.com"],
        publish_timeout_s=0.5,
    )
    service = await build(settings, registry=CollectorRegistry())
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def http(tracker: ServiceBase) -> AsyncIterator[aiohttp.ClientSession]:
    base = f"http://127.0.0.1:{tracker.settings.tracker_port}"  # type: ignore[attr-defined]
    async with aiohttp.ClientSession(base_url=base) as session:
        yield session


async def stored(js, subject: str) -> list[bytes]:
    """Every message on ``subject`` in the TRACK stream."""
    info = await js.stream_info("TRACK", subjects_filter=subject)
    if not info.state.subjects:
        return []
    sub = await js.subscribe(subject, stream="TRACK", ordered_consumer=True)
    count = info.state.subjects.get(subject, 0)
    out = [(await sub.next_msg(timeout=2)).data for _ in range(count)]
    await sub.unsubscribe()
    return out


def requests(tracker: ServiceBase, kind: str, result: str) -> float:
    value = tracker.registry.get_sample_value(
        "mailgate_tracker_requests_total", {"kind": kind, "result": result}
    )
    return value or 0.0


async def test_the_pixel_is_an_uncached_gif_and_publishes_track_open(js, http, tracker) -> None:
    token = signer.make_open_token(MID)
    async with http.get(f"/track/o/{token}", headers={"User-Agent": "Mozilla/5.0"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/gif"
        assert await resp.read() == PIXEL_GIF
        assert "no-store" in resp.headers["Cache-Control"]
    [data] = await stored(js, "track.open")
    event = decode(data, TrackOpen)
    assert event.mailgate_id == MID
    assert event.user_agent == "Mozilla/5.0"
    assert event.audience == "unknown"
    assert event.ip == "127.0.0.1"
    assert requests(tracker, "open", "ok") == 1


async def test_a_bad_pixel_token_still_gets_the_gif_but_publishes_nothing(js, http) -> None:
    async with http.get("/track/o/garbage-token") as resp:
        assert resp.status == 200 and await resp.read() == PIXEL_GIF
    # a click token is not an open token
    async with http.get(f"/track/o/{signer.make_click_token(MID, 'https://x.org/')}") as resp:
        assert resp.status == 200
    assert await stored(js, "track.open") == []


async def test_a_head_request_on_the_pixel_is_classified_as_scanner(js, http) -> None:
    async with http.head(f"/track/o/{signer.make_open_token(MID)}") as resp:
        assert resp.status == 200
    [data] = await stored(js, "track.open")
    assert decode(data, TrackOpen).audience == "scanner"


async def test_a_click_redirects_and_publishes_track_click(js, http, tracker) -> None:
    url = "https://example.com/landing?utm=1"
    token = signer.make_click_token(MID, url)
    async with http.get(f"/track/c/{token}", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == url
    [data] = await stored(js, "track.click")
    event = decode(data, TrackClick)
    assert (event.mailgate_id, event.url, event.legacy) == (MID, url, False)
    assert requests(tracker, "click", "ok") == 1


async def test_a_click_token_signed_with_the_second_secret_is_accepted(js, http) -> None:
    token = TokenSigner(["older-secret"]).make_click_token(MID, "https://example.com/")
    async with http.get(f"/track/c/{token}", allow_redirects=False) as resp:
        assert resp.status == 302


async def test_a_tampered_click_is_404_and_publishes_nothing(js, http, tracker) -> None:
    token = signer.make_click_token(MID, "https://example.com/")
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    async with http.get(f"/track/c/{tampered}", allow_redirects=False) as resp:
        assert resp.status == 404
        text = await resp.text()
        assert "invalid" in text and "недействительна" in text
    assert await stored(js, "track.click") == []
    assert requests(tracker, "click", "invalid") == 1


async def test_legacy_open_publishes_with_the_query_ids(js, http) -> None:
    async with http.get("/track/o", params={"eid": "AMS-7", "cid": "73", "mid": MID}) as resp:
        assert resp.status == 200 and await resp.read() == PIXEL_GIF
    [data] = await stored(js, "track.open")
    event = decode(data, TrackOpen)
    assert (event.external_id, event.campaign_id, event.mailgate_id) == ("AMS-7", "73", MID)
    assert event.legacy is True


async def test_legacy_click_redirects_only_to_allow_listed_hosts(js, http) -> None:
    allowed = "https://shop.example.com/item/1"
    params = {"url": allowed, "eid": "AMS-7", "cid": "73"}
    async with http.get("/track/c", params=params, allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == allowed
    params["url"] = "https://evil.example.net/phish"
    async with http.get("/track/c", params=params, allow_redirects=False) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/problem+json"
        assert (await resp.json())["status"] == 400
    [data] = await stored(js, "track.click")
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
    assert await stored(js, "track.unsubscribe") == []

    async with http.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"}) as resp:
        assert resp.status == 200
        assert "отписаны" in await resp.text()
    async with http.post(f"/u/{token}", data={"confirm": "yes"}) as resp:
        assert resp.status == 200
    events = [decode(d, TrackUnsubscribe) for d in await stored(js, "track.unsubscribe")]
    assert [(e.mailgate_id, e.one_click) for e in events] == [(MID, True), (MID, False)]


async def test_unsubscribe_with_a_bad_token_is_404(js, http) -> None:
    open_token = signer.make_open_token(MID)
    async with http.post(f"/u/{open_token}", data={"List-Unsubscribe": "One-Click"}) as resp:
        assert resp.status == 404
    async with http.get("/u/nonsense") as resp:
        assert resp.status == 404
    assert await stored(js, "track.unsubscribe") == []


async def test_when_nats_is_down_unsubscribe_is_503_and_the_pixel_still_answers(
    nats_server, http, tracker
) -> None:
    nats_server.stop()
    await eventually(lambda: not tracker.nc.is_connected, what="disconnected")
    async with http.post(
        f"/u/{signer.make_unsub_token(MID)}", data={"List-Unsubscribe": "One-Click"}
    ) as resp:
        assert resp.status == 503
        assert resp.content_type == "application/problem+json"
    async with http.get(f"/track/o/{signer.make_open_token(MID)}") as resp:
        assert resp.status == 200 and await resp.read() == PIXEL_GIF
    assert requests(tracker, "unsubscribe", "publish_failed") == 1
    assert requests(tracker, "open", "publish_failed") == 1


async def test_ops_routes_are_served_on_the_tracker_port(http) -> None:
    async with http.get("/readyz") as resp:
        assert resp.status == 200
    async with http.get("/metrics") as resp:
        assert "mailgate_tracker_requests_total" in await resp.text()
