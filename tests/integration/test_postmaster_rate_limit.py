"""A simulated day against the Postmaster fake: 30 domains, many campaigns, never over the limit.

The poller, its limiter, the token source and the fake share one ``SimClock`` whose sleep
advances time at once, so a day (with a three-day outage in it) runs in seconds while every
request still goes over HTTP to the fake, which enforces tokens, expiry and the rate limit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from datetime import date, timedelta

import aiohttp
import pytest
from mailgate_core.schemas import PostmasterDaily
from mailgate_fakes.postmaster import PostmasterFake, SimClock
from mailgate_stats_poller.postmaster import PostmasterClient, RateLimiter, TokenSource
from mailgate_stats_poller.postmaster_poller import PostmasterMetrics, PostmasterPoller
from mailgate_stats_poller.schedule import CursorKey, Window
from prometheus_client import CollectorRegistry

REFRESH = "refresh-token"
DOMAINS = [f"shop{i:02d}.example.ru" for i in range(30)]
CAMPAIGNS = [str(100 + i) for i in range(11)]  # 12 requests per domain and cycle: > 10/min
START = 1_716_163_200.0  # 2024-05-20 00:00 UTC
DAY_S = 86400.0


class MemoryCursors:
    def __init__(self) -> None:
        self.days: dict[CursorKey, date] = {}

    async def load(self) -> dict[CursorKey, date]:
        return dict(self.days)

    async def save(self, domain: str, msgtype: str | None, day: date) -> None:
        self.days[(domain, msgtype)] = day


class Rig:
    def __init__(self, base: str, http: aiohttp.ClientSession, clock: SimClock) -> None:
        self.clock = clock
        self.events: list[PostmasterDaily] = []
        self.cursors = MemoryCursors()
        self.registry = CollectorRegistry()
        self.metrics = PostmasterMetrics(self.registry)
        self.base = base
        self.http = http

    def poller(self) -> PostmasterPoller:
        """A fresh process: new token, new limiter, cursors from the store."""
        tokens = TokenSource(f"{self.base}/token", REFRESH, self.http, self.clock.now)
        limiter = RateLimiter(self.clock.now, self.clock.sleep, limit=10)
        client = PostmasterClient(
            self.base, tokens, self.http, limiter, observer=self.metrics.observe_request
        )

        async def publish(event: PostmasterDaily) -> None:
            self.events.append(event)

        return PostmasterPoller(
            client,
            self.cursors,
            publish,
            self.metrics,
            clock=self.clock.now,
            sleep=self.clock.sleep,
            interval_s=7200,
            window=Window(repoll_days=3, initial_days=40, chunk_days=31),
            msgtypes=lambda: CAMPAIGNS,
        )


@pytest.fixture
async def world() -> AsyncIterator[tuple[PostmasterFake, Rig]]:
    clock = SimClock(START)
    fake = PostmasterFake([REFRESH], DOMAINS, clock=clock.now)
    fake.troubles = {DOMAINS[0]: [{"msg": "SPF not found.", "code": -2}]}
    base = await fake.start()
    async with aiohttp.ClientSession() as http:
        yield fake, Rig(base, http, clock)
    await fake.stop()


async def test_a_simulated_day_with_30_domains_never_exceeds_the_limit(world) -> None:
    fake, rig = world
    first = rig.poller()
    await first.run(until=START + 8 * 3600)  # 08:00 UTC, then an outage of three days
    rig.clock.advance(3 * DAY_S)
    before_restart = len(rig.events)
    second = rig.poller()
    await second.run(until=rig.clock.now() + DAY_S)

    # Postmaster never had to refuse anything and no minute held more than 10 per key.
    assert fake.rate_limited == 0
    busiest = fake.max_per_window()
    assert max(busiest.values()) == 10  # the limiter was really needed, and it held
    assert set(busiest) == {("reg", "")} | {("stat", d) for d in DOMAINS}
    assert rig.registry.get_sample_value("mailgate_postmaster_rate_limited_total") == 0

    # Tokens were refreshed before expiry: hourly-ish, never a 403.
    assert all(r.status == 200 for r in fake.requests)
    assert 15 <= len(fake.token_requests) <= 20  # one per cycle: each is 2 h apart

    # Every cycle covered every domain and campaign.
    cycles = first.cycles + second.cycles
    assert cycles >= 15
    polled = Counter(
        (r.params["domain"], r.params.get("msgtype"))
        for r in fake.api_requests("stat-list-detailed")
    )
    assert len(polled) == len(DOMAINS) * (1 + len(CAMPAIGNS))
    assert min(polled.values()) >= cycles

    # Backfill: every day from the first poll's reach to the last day, outage included.
    first_day = date(2024, 5, 20) - timedelta(days=39)
    last_day = fake.today()
    expected = {
        (first_day + timedelta(days=i)).isoformat() for i in range((last_day - first_day).days + 1)
    }
    for domain in (DOMAINS[0], DOMAINS[-1]):
        got = {e.date for e in rig.events if e.domain == domain and e.msgtype is None}
        assert got == expected
    tagged = {e.date for e in rig.events if e.domain == DOMAINS[5] and e.msgtype == CAMPAIGNS[-1]}
    assert tagged == expected

    # A process never publishes an unchanged re-polled day again (after a restart it may:
    # the same event_id then lets JetStream and the ledger drop it).
    for run in (rig.events[:before_restart], rig.events[before_restart:]):
        ids = [e.event_id for e in run]
        assert len(ids) == len(set(ids))

    value = rig.registry.get_sample_value
    assert value("mailgate_postmaster_delivered", {"domain": DOMAINS[3], "msgtype": ""}) > 0
    assert (
        value("mailgate_postmaster_complaints", {"domain": DOMAINS[3], "msgtype": CAMPAIGNS[0]})
        is not None
    )
    assert (
        value(
            "mailgate_postmaster_dns_trouble", {"domain": DOMAINS[0], "check": "spf", "code": "-2"}
        )
        == 1
    )
