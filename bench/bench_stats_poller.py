"""stats-poller's external APIs: AMS JSON-RPC through the shared (serialised) client, and a
simulated Postmaster day (30 domains, 11 campaigns each) through the rate-limited scheduler.

AMS runs one command at a time, so the AMS figure is the ceiling of one AMS instance as seen
through ``mailgate_core.ams`` (4 concurrent callers queue on the per-instance lock). The
Postmaster figure is how fast a simulated day completes, with its request count, 429s and the
busiest minute per domain as the fake counted them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import date

import aiohttp
import structlog
from mailgate_core.ams import AmsClient
from mailgate_core.schemas import PostmasterDaily
from mailgate_fakes.ams import AmsFake
from mailgate_fakes.postmaster import PostmasterFake, SimClock
from mailgate_stats_poller.postmaster import PostmasterClient, RateLimiter, TokenSource
from mailgate_stats_poller.postmaster_poller import PostmasterMetrics, PostmasterPoller
from mailgate_stats_poller.schedule import CursorKey, Window
from prometheus_client import CollectorRegistry

from common import Options, Row, percentile


async def _ams(calls: int) -> Row:
    fake = AmsFake("k")
    for i in range(100):
        fake.add_mailing(1000 + i, state="running" if i % 10 == 0 else "idle")
    url = await fake.start()
    latencies: list[float] = []
    try:
        async with AmsClient(url, "k") as client:

            async def caller(n: int) -> None:
                for _ in range(n):
                    t0 = time.perf_counter()
                    await client.get_mailings()
                    latencies.append(time.perf_counter() - t0)

            cpu0 = time.process_time()
            t0 = time.perf_counter()
            await asyncio.gather(*(caller(calls // 4) for _ in range(4)))
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
    finally:
        await fake.stop()
    assert fake.overlaps == 0
    latencies.sort()
    return Row(
        benchmark="AMS getMailings (100 mailings), 4 callers, one at a time",
        rate_per_s=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 0.5) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        cpu_s_per_1k=cpu / len(latencies) * 1000,
        note=f"client+fake CPU; overlaps at AMS: {fake.overlaps}",
    )


class _Cursors:
    def __init__(self) -> None:
        self.days: dict[CursorKey, date] = {}

    async def load(self) -> dict[CursorKey, date]:
        return dict(self.days)

    async def save(self, domain: str, msgtype: str | None, day: date) -> None:
        self.days[(domain, msgtype)] = day


async def _postmaster_day(hours: float) -> Row:
    clock = SimClock(1_716_163_200.0)
    domains = [f"shop{i:02d}.example.ru" for i in range(30)]
    campaigns = [str(100 + i) for i in range(11)]
    fake = PostmasterFake(["rt"], domains, clock=clock.now)
    base = await fake.start()
    published: list[PostmasterDaily] = []

    async def publish(event: PostmasterDaily) -> None:
        published.append(event)

    try:
        async with aiohttp.ClientSession() as http:
            tokens = TokenSource(f"{base}/token", "rt", http, clock.now)
            limiter = RateLimiter(clock.now, clock.sleep)
            client = PostmasterClient(base, tokens, http, limiter)
            poller = PostmasterPoller(
                client,
                _Cursors(),
                publish,
                PostmasterMetrics(CollectorRegistry()),
                clock=clock.now,
                sleep=clock.sleep,
                interval_s=3600,
                window=Window(repoll_days=3, initial_days=30),
                msgtypes=lambda: campaigns,
            )
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            await poller.run(until=clock.now() + hours * 3600)
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
    finally:
        await fake.stop()
    requests = len(fake.requests)
    busiest = max(fake.max_per_window().values())
    return Row(
        benchmark=f"Postmaster simulated {hours:g} h, 30 domains x 12 stat series",
        rate_per_s=requests / elapsed,
        cpu_s_per_1k=cpu / requests * 1000,
        note=(
            f"{requests} requests, {fake.rate_limited} x 429, busiest minute {busiest}/10, "
            f"{len(published)} days published, {elapsed:.1f} s wall"
        ),
    )


async def run(opts: Options) -> list[Row]:
    # The pollers log a line per cycle; the table is what this run is for.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return [
        await _ams(200 if opts.quick else 4000),
        await _postmaster_day(3 if opts.quick else 24),
    ]
