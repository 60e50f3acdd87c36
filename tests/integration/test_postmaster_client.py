"""The Postmaster client against the Postmaster fake: OAuth, headers, 403, 429, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import aiohttp
import pytest
from mailgate_fakes.postmaster import PostmasterFake, SimClock
from mailgate_stats_poller.postmaster import (
    PostmasterApiError,
    PostmasterClient,
    PostmasterTokenRejected,
    RateLimiter,
    TokenSource,
)

REFRESH = "8d94455cb4f473f2a5801749b0f0fbe1099ca23037363831"


@dataclass
class Rig:
    fake: PostmasterFake
    clock: SimClock
    base: str
    http: aiohttp.ClientSession

    def client(self, refresh: str = REFRESH, *, limit: int = 10) -> PostmasterClient:
        tokens = TokenSource(f"{self.base}/token", refresh, self.http, self.clock.now)
        limiter = RateLimiter(self.clock.now, self.clock.sleep, limit=limit)
        client = PostmasterClient(self.base, tokens, self.http, limiter)
        client.tokens = tokens  # type: ignore[attr-defined]
        return client


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    clock = SimClock(1_716_200_000.0)
    fake = PostmasterFake([REFRESH], clock=clock.now)
    base = await fake.start()
    async with aiohttp.ClientSession() as http:
        yield Rig(fake, clock, base, http)
    await fake.stop()


async def test_the_refresh_token_is_exchanged_and_sent_in_the_bearer_header(rig: Rig) -> None:
    client = rig.client()
    assert await client.reg_list() == ["alphadomain.ru", "betadomain.ru", "gammadomain.ru"]
    assert [outcome for _, outcome in rig.fake.token_requests] == ["ok"]
    (request,) = rig.fake.requests
    token = request.headers["bearer"]
    assert token in rig.fake.access_tokens
    assert request.headers["authorization"] == f"Bearer {token}"


async def test_the_token_is_refreshed_before_it_expires(rig: Rig) -> None:
    client = rig.client()
    await client.reg_list()
    rig.clock.advance(3000)  # still valid for 600 s: kept
    await client.troubles_list()
    assert len(rig.fake.token_requests) == 1
    rig.clock.advance(400)  # 200 s left: inside the refresh margin
    await client.troubles_list()
    assert len(rig.fake.token_requests) == 2
    assert all(r.status == 200 for r in rig.fake.requests)  # never a 403


async def test_a_403_refreshes_the_token_and_repeats_the_request(rig: Rig) -> None:
    client = rig.client()
    await client.reg_list()
    rig.fake.expire_tokens()
    assert len(await client.troubles_list()) == 0
    assert [r.status for r in rig.fake.requests] == [200, 403, 200]
    assert len(rig.fake.token_requests) == 2


async def test_a_wrong_refresh_token_is_token_not_found(rig: Rig) -> None:
    client = rig.client("not-a-real-token")
    with pytest.raises(PostmasterTokenRejected):
        await client.reg_list()
    assert rig.fake.token_requests[-1][1] == "token not found"
    assert rig.fake.requests == []


async def test_a_429_is_waited_out_for_the_announced_seconds(rig: Rig) -> None:
    rig.fake.limit = 2  # the server is stricter than our limiter thinks
    client = rig.client()
    for _ in range(3):
        await client.troubles_list()
    statuses = [r.status for r in rig.fake.requests]
    assert statuses == [200, 200, 429, 200]
    assert rig.clock.slept_s == pytest.approx(60, abs=1)  # "Expected available in 60 seconds"


async def test_stat_list_detailed_returns_days_newest_first(rig: Rig) -> None:
    client = rig.client()
    today = rig.fake.today()
    (block,) = await client.stat_list_detailed(
        today - timedelta(days=2), today, domain="alphadomain.ru"
    )
    assert block.domain == "alphadomain.ru"
    assert [d.date for d in block.data] == [
        (today - timedelta(days=i)).isoformat() for i in range(3)
    ]
    day = block.data[1]
    assert day.delivered > 0 and day.read > 0 and day.reputation is not None
    (totals,) = await client.stat_list(today - timedelta(days=2), today, domain="alphadomain.ru")
    assert totals.delivered == sum(d.delivered for d in block.data)
    tagged = await client.stat_list_detailed(today, domain="alphadomain.ru", msgtype="hotnews")
    assert tagged[0].data[0].trend == 0
    assert rig.fake.requests[-1].params["msgtype"] == "hotnews"


async def test_api_errors_carry_postmasters_text(rig: Rig) -> None:
    client = rig.client()
    today = rig.fake.today()
    with pytest.raises(PostmasterApiError, match="older than 1 year"):
        await client.stat_list_detailed(today - timedelta(days=400), domain="alphadomain.ru")
    with pytest.raises(PostmasterApiError, match="date_from > date_to"):
        await client.stat_list_detailed(today, today - timedelta(days=1), domain="alphadomain.ru")
    with pytest.raises(ValueError):
        await client.stat_list_detailed(today, msgtype="hotnews")
