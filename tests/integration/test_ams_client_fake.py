"""The shared AMS client (mailgate_core.ams) against the AMS fake over HTTP."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from mailgate_core import ams
from mailgate_core.ams import (
    AmsAuthError,
    AmsBusyError,
    AmsClient,
    AmsMethodNotFoundError,
    AmsRpcError,
    AmsTimeoutError,
    AmsTransportError,
    RetryPolicy,
    method_attribute,
)
from mailgate_fakes.ams import AmsFake
from mailgate_fakes.infra import free_port

KEY = "ams-test-key"
FAST = RetryPolicy(attempts=4, initial_s=0.01, max_s=0.02, total_s=5)


@pytest.fixture
async def fake() -> AsyncIterator[AmsFake]:
    fake = AmsFake(KEY)
    fake.add_mailing(73, name="Spring sale", state="running", total=2000)
    fake.add_mailing(74, name="Newsletter", state="idle", total=10)
    fake.add_mailing(75, name="Resets", type="transactional", total=0)
    fake.url = await fake.start()  # type: ignore[attr-defined]
    yield fake
    await fake.stop()


@pytest.fixture
async def client(fake: AmsFake) -> AsyncIterator[AmsClient]:
    outcomes: list[tuple[str, str]] = []
    async with AmsClient(
        fake.url,  # type: ignore[attr-defined]
        KEY,
        timeout_s=5,
        retry=FAST,
        observer=lambda method, outcome, _s: outcomes.append((method, outcome)),
    ) as c:
        c.outcomes = outcomes  # type: ignore[attr-defined]
        yield c


async def test_get_mailings_returns_the_documented_shape(client: AmsClient) -> None:
    mailings = {m.id: m for m in await client.get_mailings()}
    assert set(mailings) == {73, 74, 75}
    spring = mailings[73]
    assert (spring.name, spring.state, spring.approx_speed) == ("Spring sale", "running", "600/min")
    assert spring.progress_info.total == 2000 and spring.progress_info.not_sent == 2000
    assert [m.id for m in await client.get_transactional_mailings()] == [75]


async def test_the_api_key_travels_in_params_and_the_numeric_answer_id_is_accepted(
    fake: AmsFake,
) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"jsonrpc": "2.0", "method": "getMailing", "params": {"apiKey": KEY, "id": 74}}
        async with http.post(fake.url, json={**body, "id": "7"}) as resp:  # type: ignore[attr-defined]
            answer = await resp.json()
    assert answer["id"] == 7 and answer["result"]["name"] == "Newsletter"
    async with AmsClient(fake.url, KEY) as c:  # type: ignore[attr-defined]
        assert (await c.get_mailing(74)).name == "Newsletter"
    assert fake.received("getMailing", id=74)


async def test_stop_and_start_change_the_mailing_state(fake: AmsFake, client: AmsClient) -> None:
    await client.stop_mailing(73)
    assert (await client.get_mailing(73)).state == "paused"
    assert fake.received("stopMailing", id=73)
    await client.start_mailing(73)
    assert (await client.get_mailing(73)).state == "running"
    with pytest.raises(AmsRpcError, match="not found"):
        await client.stop_mailing(999)


async def test_relay_states_of_a_running_mailing(fake: AmsFake, client: AmsClient) -> None:
    fake.advance(60)
    relays = await client.get_relays_sending_states(73)
    assert [r.name for r in relays] == ["relay1.example.net", "relay2.example.net"]
    assert sum(r.sent for r in relays) == 600
    await client.change_relay_sending_option(id=73, relayID=2, enabled=False)
    relays = await client.get_relays_sending_states(73)
    assert [r.enabled for r in relays] == [True, False]
    with pytest.raises(AmsRpcError, match="not active"):
        await client.get_relays_sending_states(74)


async def test_a_transactional_job_reports_each_recipient(client: AmsClient) -> None:
    job = await client.post_sending_job(
        mailingID=75, recipients=[{"email": "ok@example.com"}, {"email": "bad@example.com"}]
    )
    results = await client.get_sending_job_result(job["jobID"], 75)
    assert [(r.email, r.send_result, r.fail_category) for r in results] == [
        ("ok@example.com", "sent", None),
        ("bad@example.com", "failed", "bad email"),
    ]
    assert results[1].last_reply.startswith("550")


NO_PARAMS = {
    "getMailings",
    "getTransactionalMailings",
    "restartRunningMailings",
    "isSchedulerRunning",
    "runScheduler",
}


def arguments(method: str, ids: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Plausible arguments for ``method``'s coroutine."""
    group = next(g for g, ms in ams.METHOD_GROUPS.items() if method in ms)
    signature = inspect.signature(getattr(AmsClient, method_attribute(method)))
    if "mailing_id" in signature.parameters:
        return (73,), {}
    if method in NO_PARAMS:
        return (), {}
    special: dict[str, dict[str, Any]] = {
        "addContacts": {"listID": ids.get("mailing_lists"), "contacts": ["a@example.com"]},
        "editContact": {"listID": ids.get("mailing_lists"), "email": "a@example.com"},
        "deleteContacts": {"listID": ids.get("mailing_lists"), "emails": ["a@example.com"]},
        "postSendingJob": {"mailingID": 75, "recipients": ["x@example.com"]},
        "changeRelaySendingOption": {"id": 73, "relayID": 1, "enabled": True},
        "changeProxySendingOption": {"id": 73, "proxyID": 1, "enabled": True},
    }
    if method in special:
        return (), special[method]
    if method.startswith("add"):
        return (), {"name": f"new {method}"}
    return (), {"id": ids.get(group, 74)}


async def test_every_method_of_the_seed_reaches_ams(fake: AmsFake, client: AmsClient) -> None:
    """Each coroutine calls AMS with the method name the seed lists."""
    ids: dict[str, Any] = {}
    ok = set()
    last = ("delete", "stopMailing")  # keep what later calls need
    for method in sorted(ams.METHODS, key=lambda m: m.startswith(last)):
        if method == "getSendingJobResult":
            continue  # needs a job id: covered above
        args, kwargs = arguments(method, ids)
        try:
            result = await getattr(client, method_attribute(method))(*args, **kwargs)
        except AmsRpcError:
            continue
        ok.add(method)
        if method.startswith("add") and isinstance(result, dict) and "id" in result:
            ids[next(g for g, ms in ams.METHOD_GROUPS.items() if method in ms)] = result["id"]
    assert {c.method for c in fake.calls} == set(ams.METHODS) - {"getSendingJobResult"}
    refused = set(ams.METHODS) - ok - {"getSendingJobResult"}
    # AMS does not implement deleteMailingList; the running mailing has no proxies.
    assert refused == {"deleteMailingList", "changeProxySendingOption"}


async def test_concurrent_calls_are_serialised_one_at_a_time(fake: AmsFake) -> None:
    fake.call_delay_s = 0.03
    url = fake.url  # type: ignore[attr-defined]
    async with AmsClient(url, KEY) as first, AmsClient(url, KEY) as second:
        results = await asyncio.gather(
            *(c.get_mailings() for c in (first, second, first, second, first, second))
        )
    assert all(len(r) == 3 for r in results)
    assert fake.overlaps == 0
    assert [c.outcome for c in fake.calls] == ["ok"] * 6


async def test_the_fake_refuses_a_second_concurrent_call(fake: AmsFake) -> None:
    """Without the client's lock AMS answers "busy": what the serialisation prevents."""
    fake.call_delay_s = 0.1
    body = {"jsonrpc": "2.0", "method": "getMailings", "params": {"apiKey": KEY}, "id": "1"}
    async with aiohttp.ClientSession() as http:

        async def raw() -> dict[str, Any]:
            async with http.post(fake.url, data=json.dumps(body)) as resp:  # type: ignore[attr-defined]
                return await resp.json()

        answers = await asyncio.gather(raw(), raw())
    errors = [a["error"]["message"] for a in answers if "error" in a]
    assert len(errors) == 1 and "busy" in errors[0]
    assert fake.overlaps == 1


async def test_busy_answers_are_retried_with_backoff(fake: AmsFake, client: AmsClient) -> None:
    fake.busy_next = 2
    await client.stop_mailing(73)
    assert [c.outcome for c in fake.calls] == ["busy", "busy", "ok"]
    assert client.outcomes == [  # type: ignore[attr-defined]
        ("stopMailing", "busy"),
        ("stopMailing", "busy"),
        ("stopMailing", "ok"),
    ]


async def test_a_mailing_open_in_the_ui_stays_busy_until_retries_run_out(
    fake: AmsFake, client: AmsClient
) -> None:
    fake.open_in_ui = {73}
    with pytest.raises(AmsBusyError, match="opened by a user"):
        await client.stop_mailing(73)
    assert len(fake.calls) == FAST.attempts
    assert (await client.get_mailing(73)).state == "running"


async def test_a_wrong_api_key_fails_at_once(fake: AmsFake) -> None:
    async with AmsClient(fake.url, "wrong", retry=FAST) as c:  # type: ignore[attr-defined]
        with pytest.raises(AmsAuthError):
            await c.get_mailings()
    assert [c.outcome for c in fake.calls] == ["auth"]


async def test_an_unknown_method_is_method_not_found(client: AmsClient) -> None:
    with pytest.raises(AmsMethodNotFoundError):
        await client.call("noSuchMethod")


async def test_a_slow_answer_times_out_and_reads_are_retried(fake: AmsFake) -> None:
    fake.method_delay_s["getMailings"] = 0.5
    async with AmsClient(
        fake.url,
        KEY,
        timeout_s=0.1,
        retry=RetryPolicy(attempts=2, initial_s=0.6, max_s=0.6),  # type: ignore[attr-defined]
    ) as c:
        with pytest.raises(AmsTimeoutError):
            await c.get_mailings()
    attempts = [c.outcome for c in fake.calls if c.method == "getMailings"]
    assert len(attempts) == 2  # the read was retried once


async def test_a_non_json_answer_is_a_transport_error() -> None:
    from aiohttp import web

    async def broken(_request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>bad gateway</html>")

    app = web.Application()
    app.router.add_post("/api/v1", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with AmsClient(f"http://127.0.0.1:{port}/api/v1", KEY, retry=FAST) as c:
            with pytest.raises(AmsTransportError) as info:
                await c.stop_mailing(1)
        assert info.value.status == 502
    finally:
        await runner.cleanup()
