"""stats-poller's AMS loop against a real nats-server and the AMS fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from mailgate_core.schemas import AmsMailingProgress, decode
from mailgate_fakes.ams import AmsFake
from mailgate_fakes.infra import free_port
from mailgate_fakes.testing import eventually
from mailgate_stats_poller.app import Settings, StatsPoller, build
from prometheus_client import CollectorRegistry

API_KEY = "ams-test-key"


@pytest.fixture
async def ams() -> AsyncIterator[AmsFake]:
    fake = AmsFake(API_KEY)
    fake.add_mailing(73, name="Spring sale", state="running", total=2400, sent=1200, bad=30)
    fake.add_mailing(74, name="Newsletter", state="idle", total=10)
    fake.url = await fake.start()  # type: ignore[attr-defined]
    yield fake
    await fake.stop()


@pytest.fixture
async def start_poller(nats_url: str) -> AsyncIterator[Any]:
    started: list[StatsPoller] = []

    async def factory(**overrides: Any) -> StatsPoller:
        values: dict[str, Any] = dict(
            nats_url=nats_url,
            ops_host="127.0.0.1",
            ops_port=free_port(),
            ams_poll_interval_s=60.0,
            ams_timeout_s=5.0,
        )
        values.update(overrides)
        service = await build(Settings(**values), registry=CollectorRegistry())
        await service.start()
        started.append(service)
        return service

    yield factory
    for service in started:
        await service.stop()


async def mailing_events(js) -> list[AmsMailingProgress]:
    info = await js.stream_info("STATS", subjects_filter="stats.ams.mailing")
    count = (info.state.subjects or {}).get("stats.ams.mailing", 0)
    if not count:
        return []
    sub = await js.subscribe("stats.ams.mailing", stream="STATS", ordered_consumer=True)
    out = [decode((await sub.next_msg(timeout=2)).data, AmsMailingProgress) for _ in range(count)]
    await sub.unsubscribe()
    return out


async def test_one_poll_publishes_progress_with_relays_and_sets_gauges(
    js, ams, start_poller
) -> None:
    ams.advance(60)
    service = await start_poller(ams_api_url=ams.url, ams_api_key=API_KEY)

    value = service.registry.get_sample_value
    await eventually(lambda: value("mailgate_ams_polls_total", {"result": "ok"}), what="a poll")
    events = {e.mailing_id: e for e in await mailing_events(js)}
    assert set(events) == {"73", "74"}
    spring = events["73"]
    assert (spring.sent, spring.total, spring.bad, spring.state) == (1800, 2400, 30, "running")
    assert spring.approx_speed_per_min == 600.0
    assert [(r.relay, r.sent) for r in spring.relays] == [
        ("relay1.example.net", 300),
        ("relay2.example.net", 300),
    ]
    assert events["74"].relays == []  # relays are read for running mailings only
    assert [c.method for c in ams.calls] == ["getMailings", "getRelaysSendingStates"]
    assert ams.overlaps == 0
    assert value("mailgate_ams_mailing_sent", {"mailing": "73"}) == 1800
    assert value("mailgate_ams_mailing_total", {"mailing": "74"}) == 10
    relay = {"mailing": "73", "relay": "relay1.example.net"}
    assert value("mailgate_ams_relay_sent", relay) == 300
    assert value("mailgate_ams_requests_total", {"method": "getMailings", "outcome": "ok"}) == 1

    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{service.settings.ops_port}/metrics"
        async with http.get(url) as resp:
            assert 'mailgate_ams_mailing_sent{mailing="73"} 1800.0' in await resp.text()


async def test_only_changed_mailings_are_published_again(js, ams, start_poller) -> None:
    service = await start_poller(ams_api_url=ams.url, ams_api_key=API_KEY)
    poller = service.ams_poller
    await eventually(lambda: poller.polled.is_set(), what="first poll")
    assert len(await mailing_events(js)) == 2
    await poller.poll_once()  # nothing changed
    assert len(await mailing_events(js)) == 2
    ams.advance(30)  # the running mailing moves on
    await poller.poll_once()
    events = await mailing_events(js)
    assert [e.mailing_id for e in events[2:]] == ["73"]
    assert events[-1].sent == 1500


async def test_a_busy_ams_is_retried_within_the_poll(js, ams, start_poller) -> None:
    ams.busy_next = 1
    service = await start_poller(ams_api_url=ams.url, ams_api_key=API_KEY)
    value = service.registry.get_sample_value
    await eventually(lambda: value("mailgate_ams_polls_total", {"result": "ok"}), what="a poll")
    assert value("mailgate_ams_requests_total", {"method": "getMailings", "outcome": "busy"}) == 1
    assert len(await mailing_events(js)) == 2


async def test_a_wrong_api_key_counts_a_failed_poll_and_publishes_nothing(
    js, ams, start_poller
) -> None:
    service = await start_poller(ams_api_url=ams.url, ams_api_key="wrong")
    await eventually(
        lambda: service.registry.get_sample_value("mailgate_ams_polls_total", {"result": "error"}),
        what="failed poll counted",
    )
    assert await mailing_events(js) == []
    assert [c.outcome for c in ams.calls] == ["auth"]


async def test_without_ams_settings_the_service_runs_and_is_ready(start_poller) -> None:
    service = await start_poller()
    assert service.ams_poller is None and service.postmaster_poller is None
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.settings.ops_port}"
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
