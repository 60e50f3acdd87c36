"""stats-poller against a real nats-server and a tiny AMS JSON-RPC fake."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from mailgate_core.schemas import AmsMailingProgress, decode
from mailgate_fakes.infra import free_port
from mailgate_fakes.testing import eventually
from mailgate_stats_poller.ams_client import AmsClient, AmsRpcError
from mailgate_stats_poller.app import Settings, StatsPoller, build
from prometheus_client import CollectorRegistry

API_KEY = "ams-test-key"
MAILINGS = [
    {
        "id": 73,
        "name": "Spring sale",
        "type": "regular",
        "state": "running",
        "createDate": "2024-03-01 10:00:00",
        "lastStartDate": "2024-03-02 09:00:00",
        "approxSpeed": "600/min",
        "progressInfo": {
            "percentDone": 50,
            "total": 2400,
            "sent": 1200,
            "notSent": 1150,
            "bad": 30,
            "refused": 20,
            "excluded": 0,
            "opened": 300,
            "clicks": 40,
        },
    },
    {
        "id": 74,
        "name": "Newsletter",
        "type": "regular",
        "state": "idle",
        "approxSpeed": "0/min",
        "progressInfo": {"percentDone": 0, "total": 10, "sent": 0},
    },
]


@dataclass
class FakeAms:
    """AMS as the spec describes it: apiKey in params, one command at a time."""

    port: int
    calls: list[str] = field(default_factory=list)
    busy: bool = False
    delay_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        rid = int(body["id"])  # AMS answers with a number although we send a string

        def error(code: int, message: str) -> web.Response:
            return web.json_response(
                {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": rid}
            )

        if body.get("params", {}).get("apiKey") != API_KEY:
            return error(-32001, "invalid api key")
        if self.busy:
            return error(-32603, "another command is being executed")
        self.busy = True
        try:
            self.calls.append(body["method"])
            await asyncio.sleep(self.delay_s)
            if body["method"] != "getMailings":
                return error(-32601, "method not found")
            return web.json_response({"jsonrpc": "2.0", "result": MAILINGS, "id": rid})
        finally:
            self.busy = False


@pytest.fixture
async def ams() -> AsyncIterator[FakeAms]:
    fake = FakeAms(port=free_port())
    app = web.Application()
    app.router.add_post("/api/v1", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", fake.port).start()
    yield fake
    await runner.cleanup()


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


async def test_one_poll_publishes_progress_events_and_sets_gauges(js, ams, start_poller) -> None:
    service = await start_poller(ams_api_url=ams.url, ams_api_key=API_KEY)

    value = service.registry.get_sample_value
    await eventually(lambda: value("mailgate_ams_polls_total", {"result": "ok"}), what="a poll")
    events = await mailing_events(js)
    assert sorted(e.mailing_id for e in events) == ["73", "74"]
    spring = next(e for e in events if e.mailing_id == "73")
    assert (spring.sent, spring.total, spring.state, spring.approx_speed_per_min) == (
        1200,
        2400,
        "running",
        600.0,
    )
    assert value("mailgate_ams_mailing_sent", {"mailing": "73"}) == 1200
    assert value("mailgate_ams_mailing_total", {"mailing": "74"}) == 10
    assert value("mailgate_ams_polls_total", {"result": "ok"}) == 1
    assert ams.calls == ["getMailings"]

    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{service.settings.ops_port}/metrics"
        async with http.get(url) as resp:
            assert 'mailgate_ams_mailing_sent{mailing="73"} 1200.0' in await resp.text()


async def test_a_wrong_api_key_counts_a_failed_poll_and_publishes_nothing(
    js, ams, start_poller
) -> None:
    service = await start_poller(ams_api_url=ams.url, ams_api_key="wrong")
    await eventually(
        lambda: service.registry.get_sample_value("mailgate_ams_polls_total", {"result": "error"}),
        what="failed poll counted",
    )
    assert await mailing_events(js) == []


async def test_without_ams_settings_the_service_runs_and_is_ready(start_poller) -> None:
    service = await start_poller()
    assert service.ams_poller is None
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.settings.ops_port}"
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200


async def test_the_client_serialises_concurrent_calls(ams) -> None:
    ams.delay_s = 0.05
    async with aiohttp.ClientSession() as http:
        client = AmsClient(ams.url, API_KEY, http, timeout_s=5)
        results = await asyncio.gather(*(client.get_mailings() for _ in range(4)))
        assert all(len(r) == 2 for r in results)
        with pytest.raises(AmsRpcError) as info:
            await client.call("noSuchMethod")
        assert info.value.code == -32601
