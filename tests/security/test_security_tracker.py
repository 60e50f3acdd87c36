"""tracker abuse: open redirects through the legacy click form, tampered and enumerated
tokens, and what a tracking URL reveals (nothing but a signed token)."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from mailgate_core.ids import new_ulid
from mailgate_core.tracking import TokenSigner
from mailgate_smtp_ingest.rewrite import HeaderRules, normalize_line_endings, prepare
from mailgate_smtp_ingest.tracking_rewrite import TrackingLinks, plan_message, render_copy
from mailgate_tracker.app import TrackerService
from test_tracker_http import CHROME, MID, SECRET, base_url, make_tracker, stored

__all__ = ["make_tracker"]
signer = TokenSigner([SECRET])


@pytest.fixture
async def tracker(make_tracker) -> TrackerService:
    return await make_tracker()


@pytest.fixture
async def http(tracker: TrackerService) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        base_url=base_url(tracker), headers={"User-Agent": CHROME}
    ) as session:
        yield session


OPEN_REDIRECTS = [
    "https://evil.example.net/",
    "//evil.example.net/",
    "///evil.example.net/",
    "https:evil.example.net",
    "https://shop.example.com@evil.example.net/",
    "https://shop.example.com.evil.example.net/",
    "https://evil.example.net\\@shop.example.com/",
    "https://evil.example.net#@shop.example.com/",
    "\\\\evil.example.net",
    "javascript:alert(1)//shop.example.com",
    "data:text/html,<script>alert(1)</script>",
    "https://shop.example.com%2F@evil.example.net",
    "http://127.0.0.1:8080/v1/accounts",
    " https://evil.example.net",
    "https://evil.example.net\r\nSet-Cookie: a=b",
]


@pytest.mark.parametrize("target", OPEN_REDIRECTS)
async def test_the_legacy_click_form_is_not_an_open_redirect(js, http, target: str) -> None:
    params = {"url": target, "eid": "AMS-7", "cid": "73", "mid": MID}
    async with http.get("/track/c", params=params, allow_redirects=False) as resp:
        location = resp.headers.get("Location", "")
        assert resp.status in (400, 404), (resp.status, location)
        assert location == ""
    assert await stored(js, "track.click") == []


async def test_every_tampered_byte_of_a_token_is_refused(js, http) -> None:
    token = signer.make_click_token(MID, "https://shop.example.com/offer")
    refused = 0
    for i in range(0, len(token), max(1, len(token) // 24)):
        flipped = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
        async with http.get(f"/track/c/{flipped}", allow_redirects=False) as resp:
            refused += resp.status == 404 and "Location" not in resp.headers
    assert refused == len(range(0, len(token), max(1, len(token) // 24)))
    async with http.get(f"/u/{token}") as resp:  # a click token is not an unsubscribe token
        assert resp.status == 404
    assert await stored(js, "track.click") == []


async def test_guessed_tokens_all_look_the_same_and_reveal_nothing(js, http) -> None:
    """Enumeration: sequential ids, random strings and real ids with no signature get the
    same answer, so nothing tells a guesser which ids exist."""
    guesses = [new_ulid() for _ in range(5)] + ["1", "2", "0" * 26, "a" * 200, MID]
    answers = set()
    for guess in guesses:
        for path in (f"/track/c/{guess}", f"/u/{guess}"):
            async with http.get(path, allow_redirects=False) as resp:
                answers.add((path.split("/")[1], resp.status, len(await resp.read())))
    assert {(kind, status) for kind, status, _ in answers} == {("track", 404), ("u", 404)}
    assert len(answers) == 2  # one body per route, whatever was guessed
    assert await stored(js, "track.click") == [] and await stored(js, "track.unsubscribe") == []


def test_tracking_urls_carry_only_a_signed_token_never_the_recipient() -> None:
    """A click token holds the message id and the customer's own link (what the redirect
    needs); nothing we add carries the recipient's address."""
    links = TrackingLinks("https://t.example.net", signer, unsubscribe_mailto="u@mg.example.net")
    email_address = "ivan.petrov@example.org"
    raw = normalize_line_endings(
        f"From: news@shop.example.com\nTo: {email_address}\nContent-Type: text/html\n\n"
        "<a href='https://shop.example.com/offer'>x</a> [Unsubscribe]\n".encode()
    )
    plan = plan_message(prepare(raw, HeaderRules()), links)
    copy, _ = render_copy(plan, links, mailgate_id=MID, domain="mg.example.net", tracking=True)
    urls = re.findall(rb"https://t\.example\.net/[^\s'\"<>]+", copy)
    assert len(urls) >= 3  # click, unsubscribe, pixel (and List-Unsubscribe)
    for url in urls:
        token = url.rsplit(b"/", 1)[1].split(b"?")[0]
        assert re.fullmatch(rb"[A-Za-z0-9_-]+", token), url  # one opaque token, no query
        padded = token + b"=" * (-len(token) % 4)
        decoded = base64.urlsafe_b64decode(padded)
        assert email_address.encode() not in url
        assert b"ivan.petrov" not in decoded
