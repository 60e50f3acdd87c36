"""The client-side Postmaster rate limiter on a simulated clock (pure)."""

from __future__ import annotations

import asyncio
import bisect

from hypothesis import given, settings
from hypothesis import strategies as st
from mailgate_fakes.postmaster import SimClock
from mailgate_stats_poller.postmaster import RateLimiter, retry_after_s

KEY = ("stat", "alphadomain.ru")


def test_ten_requests_go_at_once_and_the_eleventh_waits_for_the_window() -> None:
    clock = SimClock(1000.0)
    limiter = RateLimiter(clock.now, clock.sleep, limit=10, window_s=61.0)

    async def burst() -> list[float]:
        sent = []
        for _ in range(11):
            await limiter.acquire(KEY)
            sent.append(clock.now())
        return sent

    sent = asyncio.run(burst())
    assert sent[:10] == [1000.0] * 10
    assert sent[10] == 1061.0
    assert limiter.available_at(("stat", "other.ru")) == clock.now()  # keys are independent


def test_a_429_blocks_the_key_for_the_announced_seconds() -> None:
    clock = SimClock(0.0)
    limiter = RateLimiter(clock.now, clock.sleep)
    limiter.block(KEY, 37)
    asyncio.run(limiter.acquire(KEY))
    assert clock.now() == 37.0


def test_the_wait_is_read_from_the_429_detail() -> None:
    body = {"detail": "Запрос был проигнорирован. Expected available in 42 seconds."}
    assert retry_after_s(body) == 42.0
    assert retry_after_s({"detail": "nothing useful"}, default=60.0) == 60.0
    assert retry_after_s(None) == 60.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=30), min_size=1, max_size=60))
def test_no_window_ever_holds_more_than_the_limit(gaps: list[float]) -> None:
    clock = SimClock(0.0)
    limiter = RateLimiter(clock.now, clock.sleep, limit=10, window_s=60.0)

    async def run() -> list[float]:
        sent = []
        for gap in gaps:
            clock.advance(gap)
            await limiter.acquire(KEY)
            sent.append(clock.now())
        return sent

    sent = asyncio.run(run())
    for i, t in enumerate(sent):
        in_window = bisect.bisect_left(sent, t + 60.0) - i
        assert in_window <= 10
