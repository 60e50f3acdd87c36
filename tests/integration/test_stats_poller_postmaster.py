"""stats-poller's Postmaster loop against a real nats-server and the Postmaster fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import msgspec
import pytest
from mailgate_core.schemas import PostmasterDaily, decode
from mailgate_fakes.ams import AmsFake
from mailgate_fakes.infra import free_port
from mailgate_fakes.postmaster import PostmasterFake
from mailgate_fakes.testing import eventually
from mailgate_stats_poller.app import Settings, StatsPoller, build, ensure_bucket
from mailgate_stats_poller.schedule import Cursor, cursor_key
from prometheus_client import CollectorRegistry

REFRESH = "pm-refresh-token"
DOMAINS = ["alphadomain.ru", "betadomain.ru"]


@pytest.fixture
async def postmaster() -> AsyncIterator[PostmasterFake]:
    fake = PostmasterFake([REFRESH], DOMAINS)
    fake.troubles = {
        "alphadomain.ru": [
            {"msg": "DMARC check failed.", "code": -1},
            {"msg": "DKIM statistics not available", "code": 0},
        ]
    }
    fake.base = await fake.start()  # type: ignore[attr-defined]
    yield fake
    await fake.stop()


@pytest.fixture
async def start_poller(nats_url: str, postmaster: PostmasterFake) -> AsyncIterator[Any]:
    started: list[StatsPoller] = []

    async def factory(**overrides: Any) -> StatsPoller:
        values: dict[str, Any] = dict(
            nats_url=nats_url,
            ops_host="127.0.0.1",
            ops_port=free_port(),
            postmaster_refresh_token=REFRESH,
            postmaster_api_url=postmaster.base,  # type: ignore[attr-defined]
            postmaster_token_url=f"{postmaster.base}/token",  # type: ignore[attr-defined]
            postmaster_backfill_days=5,
            postmaster_poll_interval_s=3600.0,
        )
        values.update(overrides)
        service = await build(Settings(**values), registry=CollectorRegistry())
        await service.start()
        started.append(service)
        return service

    yield factory
    for service in started:
        await service.stop()


async def daily_events(js) -> list[PostmasterDaily]:
    info = await js.stream_info("STATS", subjects_filter="stats.postmaster.daily")
    count = (info.state.subjects or {}).get("stats.postmaster.daily", 0)
    if not count:
        return []
    sub = await js.subscribe("stats.postmaster.daily", stream="STATS", ordered_consumer=True)
    out = [decode((await sub.next_msg(timeout=2)).data, PostmasterDaily) for _ in range(count)]
    await sub.unsubscribe()
    return out


def cycles(service: StatsPoller) -> float:
    return service.registry.get_sample_value("mailgate_postmaster_cycles_total", {"result": "ok"})


async def test_a_cycle_publishes_every_day_sets_gauges_and_saves_cursors(
    js, postmaster, start_poller
) -> None:
    service = await start_poller()
    await eventually(lambda: cycles(service), what="a postmaster cycle")
    today = postmaster.today()

    events = await daily_events(js)
    days = {(today - timedelta(days=i)).isoformat() for i in range(5)}
    for domain in DOMAINS:
        assert {e.date for e in events if e.domain == domain} == days
    yesterday = (today - timedelta(days=1)).isoformat()
    event = next(e for e in events if e.domain == "alphadomain.ru" and e.date == yesterday)
    truth = postmaster.day_stats("alphadomain.ru", None, today - timedelta(days=1))
    assert (event.delivered, event.read, event.spam, event.complaints) == (
        truth["delivered"],
        truth["read"],
        truth["spam"],
        truth["complaints"],
    )
    assert event.reputation == truth["reputation"] and event.trend == truth["trend"]
    assert event.event_id.startswith("pm-") and event.msgtype is None

    value = service.registry.get_sample_value
    labels = {"domain": "alphadomain.ru", "msgtype": ""}
    assert value("mailgate_postmaster_delivered", labels) == truth["delivered"]
    assert value("mailgate_postmaster_reputation", labels) == truth["reputation"]
    assert value("mailgate_postmaster_trend", labels) == truth["trend"]
    trouble = "mailgate_postmaster_dns_trouble"
    assert value(trouble, {"domain": "alphadomain.ru", "check": "dmarc", "code": "-1"}) == 1
    assert value(trouble, {"domain": "alphadomain.ru", "check": "dkim", "code": "0"}) == 1
    assert value("mailgate_postmaster_token_refreshes_total") == 1

    kv = await js.key_value("stats-poller")
    entry = await kv.get(cursor_key("betadomain.ru", None))
    cursor = msgspec.json.decode(entry.value, type=Cursor)
    assert (cursor.domain, cursor.msgtype, cursor.last_date) == (
        "betadomain.ru",
        None,
        today.isoformat(),
    )

    headers = postmaster.requests[-1].headers
    assert headers["bearer"] and headers["authorization"] == f"Bearer {headers['bearer']}"


async def test_a_revised_day_is_published_again_and_unchanged_days_are_not(
    js, postmaster, start_poller
) -> None:
    service = await start_poller(postmaster_domains=["alphadomain.ru"])
    await eventually(lambda: cycles(service), what="a postmaster cycle")
    before = await daily_events(js)
    yesterday = (postmaster.today() - timedelta(days=1)).isoformat()
    postmaster.set_day("alphadomain.ru", yesterday, delivered=999_999, complaints=7)

    await service.postmaster_poller.run_cycle()

    new = (await daily_events(js))[len(before) :]
    assert {e.date for e in new} <= {yesterday, postmaster.today().isoformat()}
    revised = next(e for e in new if e.date == yesterday)
    old = next(e for e in before if e.date == yesterday)
    assert (revised.delivered, revised.complaints) == (999_999, 7)
    assert revised.event_id != old.event_id  # the ledger upserts on (domain, msgtype, date)
    labels = {"domain": "alphadomain.ru", "msgtype": ""}
    assert service.registry.get_sample_value("mailgate_postmaster_delivered", labels) == 999_999


async def test_after_downtime_the_missed_days_are_backfilled(js, postmaster, start_poller) -> None:
    today = postmaster.today()
    kv = await ensure_bucket(js)
    last = today - timedelta(days=10)
    await kv.put(
        cursor_key("alphadomain.ru", None),
        msgspec.json.encode(Cursor(domain="alphadomain.ru", last_date=last.isoformat())),
    )
    service = await start_poller(postmaster_domains=["alphadomain.ru"])
    await eventually(lambda: cycles(service), what="a postmaster cycle")

    (request,) = postmaster.api_requests("stat-list-detailed")
    assert request.params["date_from"] == (last - timedelta(days=2)).isoformat()
    assert request.params["date_to"] == today.isoformat()
    assert len(await daily_events(js)) == 13


async def test_active_ams_campaigns_are_polled_as_msgtypes(js, postmaster, start_poller) -> None:
    ams = AmsFake("k")
    ams.add_mailing(73, state="running")
    ams.add_mailing(74, state="idle")
    url = await ams.start()
    try:
        service = await start_poller(
            ams_api_url=url, ams_api_key="k", postmaster_domains=["alphadomain.ru"]
        )
        # The first cycle waits for the first AMS poll, so it already knows mailing 73.
        await eventually(lambda: cycles(service), what="a postmaster cycle")
    finally:
        await ams.stop()
    tagged = [r for r in postmaster.api_requests("stat-list-detailed") if r.params.get("msgtype")]
    assert {r.params["msgtype"] for r in tagged} == {"73"}
    assert all(r.params["domain"] == "alphadomain.ru" for r in tagged)
    events = await daily_events(js)
    assert {e.msgtype for e in events} == {None, "73"}
    labels = {"domain": "alphadomain.ru", "msgtype": "73"}
    assert service.registry.get_sample_value("mailgate_postmaster_delivered", labels) > 0


async def test_a_wrong_refresh_token_stops_polling_and_raises_the_alert(
    js, postmaster, start_poller
) -> None:
    service = await start_poller(postmaster_refresh_token="wrong-token")
    value = service.registry.get_sample_value
    await eventually(lambda: value("mailgate_postmaster_auth_failed") == 1, what="auth alert")
    assert service.postmaster_poller.halted
    await eventually(lambda: not service.postmaster_poller.running, what="poller ended")
    assert [outcome for _, outcome in postmaster.token_requests] == ["token not found"]
    assert postmaster.requests == []
    assert await daily_events(js) == []
    assert await service.health.failing() == []  # still ready: the alert is the metric
