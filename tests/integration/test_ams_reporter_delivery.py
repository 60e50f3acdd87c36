"""ams-reporter against a real nats-server and an aiohttp receiver on loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import pytest
from aiohttp import web
from mailgate_ams_reporter.app import AmsReporter, Settings, build
from mailgate_core.nats import KV_ENDPOINTS, publish_event
from mailgate_core.records import AccountEndpoints, EndpointRecord
from mailgate_core.schemas import MessageRef, StatusEvent
from mailgate_fakes.infra import free_port
from mailgate_fakes.testing import eventually
from prometheus_client import CollectorRegistry

RAW_KEY = b"k" * 32
SECRET = "whsec_" + base64.b64encode(RAW_KEY).decode()


@dataclass
class Receiver:
    """A webhook receiver that answers with scripted statuses (then 200) and records calls."""

    port: int
    script: dict[str, list[int]] = field(default_factory=dict)
    """Per path, the statuses of the next answers (then 200)."""
    calls: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def bodies(self, path: str) -> list[dict]:
        return [json.loads(body) for p, _, body in self.calls if p == path]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(port=free_port())

    async def hook(request: web.Request) -> web.Response:
        rec.calls.append((request.path, dict(request.headers), await request.read()))
        queue = rec.script.get(request.path, [])
        status = queue.pop(0) if queue else 200
        return web.Response(status=status, text="ok")

    app = web.Application()
    app.router.add_post("/{name}", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", rec.port).start()
    yield rec
    await runner.cleanup()


Factory = Callable[..., Awaitable[AmsReporter]]


@pytest.fixture
async def start_reporter(nats_url: str) -> AsyncIterator[Factory]:
    started: list[AmsReporter] = []

    async def factory(**overrides) -> AmsReporter:
        values = dict(
            nats_url=nats_url,
            ops_host="127.0.0.1",
            ops_port=free_port(),
            webhook_allow_private=True,
            webhook_timeout_s=2.0,
            retry_base_s=0.05,
            retry_max_delay_s=0.2,
        )
        values.update(overrides)
        service = await build(Settings(**values), registry=CollectorRegistry())
        await service.start()
        started.append(service)
        return service

    yield factory
    for service in started:
        await service.stop()


def status_event(name: str = "delivered", account_id: str = "acc1", **data) -> StatusEvent:
    return StatusEvent(
        name=name,
        timestamp=1700000000,
        data=data,
        message=MessageRef(
            mailgate_id="01JMAILGATE000000000000000",
            account_id=account_id,
            recipient="user@example.com",
            external_id="AMS-42",
            campaign_id="73",
        ),
    )


async def put_endpoints(js, account_id: str, *endpoints: EndpointRecord) -> None:
    kv = await js.key_value(KV_ENDPOINTS)
    record = AccountEndpoints(account_id=account_id, endpoints=list(endpoints))
    await kv.put(account_id, msgspec.json.encode(record))


def outcome(service: AmsReporter, name: str) -> float:
    value = service.registry.get_sample_value(
        "mailgate_webhook_deliveries_total", {"outcome": name}
    )
    return value or 0.0


async def settled(js) -> bool:
    info = await js.consumer_info("STATUS", "ams-reporter")
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_an_event_reaches_the_endpoint_with_the_exact_body_and_valid_signatures(
    js, receiver: Receiver, start_reporter: Factory
) -> None:
    service = await start_reporter()
    # Registered after start: the KV watch must pick it up live.
    await put_endpoints(js, "acc1", EndpointRecord(id="ep1", url=receiver.url(), secret=SECRET))
    await eventually(lambda: service.endpoints.endpoints("acc1"), what="endpoint watched")
    event = status_event("clicked", url="https://example.com/x")
    await publish_event(js, event)

    await eventually(lambda: len(receiver.calls) == 1, what="one delivery")
    _, headers, body = receiver.calls[0]
    assert json.loads(body) == {
        "message": {
            "id": "AMS-42",
            "mailgate_id": "01JMAILGATE000000000000000",
            "campaign_id": "73",
            "email": "user@example.com",
        },
        "event": {
            "name": "clicked",
            "timestamp": 1700000000,
            "data": {"url": "https://example.com/x"},
        },
    }
    assert headers["webhook-id"] == event.event_id
    timestamp = headers["webhook-timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    signed = f"{event.event_id}.{timestamp}.".encode() + body
    expected_v1 = base64.b64encode(hmac.new(RAW_KEY, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected_v1}"
    expected_hex = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Mailgate-Signature"] == f"sha256={expected_hex}"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "mailgate/0.1"
    await eventually(lambda: settled(js), what="message acked")
    assert outcome(service, "delivered") == 1


async def test_a_500_is_retried_and_then_delivered_once(
    js, receiver: Receiver, start_reporter: Factory
) -> None:
    await put_endpoints(js, "acc1", EndpointRecord(id="ep1", url=receiver.url(), secret=SECRET))
    receiver.script = {"/hook": [500]}
    service = await start_reporter()
    event = status_event("delivered")
    await publish_event(js, event)

    await eventually(lambda: len(receiver.calls) == 2, what="retry")
    assert {c[1]["webhook-id"] for c in receiver.calls} == {event.event_id}
    await eventually(lambda: settled(js), what="message acked")
    assert outcome(service, "failed") == 1
    assert outcome(service, "delivered") == 1
    assert len(receiver.calls) == 2


async def test_a_retry_resends_only_to_the_endpoint_that_failed(
    js, receiver: Receiver, start_reporter: Factory
) -> None:
    await put_endpoints(
        js,
        "acc1",
        EndpointRecord(id="ok", url=receiver.url("/ok"), secret=SECRET),
        EndpointRecord(id="flaky", url=receiver.url("/flaky"), secret=SECRET),
    )
    receiver.script = {"/flaky": [503]}
    service = await start_reporter()
    await publish_event(js, status_event("opened"))

    await eventually(lambda: len(receiver.bodies("/flaky")) == 2, what="flaky retried")
    await eventually(lambda: settled(js), what="message acked")
    assert len(receiver.bodies("/ok")) == 1
    assert outcome(service, "delivered") == 2  # /ok once, /flaky on the retry
    assert outcome(service, "failed") == 1


async def test_the_events_filter_is_respected(
    js, receiver: Receiver, start_reporter: Factory
) -> None:
    await put_endpoints(
        js,
        "acc1",
        EndpointRecord(id="only", url=receiver.url("/only"), secret=SECRET, events=["delivered"]),
        EndpointRecord(id="all", url=receiver.url("/all"), secret=SECRET),
    )
    await start_reporter()
    await publish_event(js, status_event("opened"))
    await publish_event(js, status_event("delivered"))

    await eventually(lambda: len(receiver.bodies("/all")) == 2, what="both to /all")
    await eventually(lambda: settled(js), what="both acked")
    assert [b["event"]["name"] for b in receiver.bodies("/only")] == ["delivered"]


async def test_private_addresses_are_refused_unless_allowed(
    js, receiver: Receiver, start_reporter: Factory
) -> None:
    await put_endpoints(
        js,
        "acc1",
        EndpointRecord(id="ip", url=receiver.url("/ip"), secret=SECRET),
        EndpointRecord(id="name", url=receiver.url("/name", host="localhost"), secret=SECRET),
    )
    service = await start_reporter(webhook_allow_private=False)
    await publish_event(js, status_event("delivered"))

    await eventually(lambda: outcome(service, "refused") == 2, what="both refused")
    await eventually(lambda: settled(js), what="message settled")
    assert receiver.calls == []
    assert outcome(service, "delivered") == 0


async def test_an_event_past_the_retry_deadline_is_dead_lettered(
    js, receiver: Receiver, start_reporter: Factory
) -> None:
    await put_endpoints(js, "acc1", EndpointRecord(id="ep1", url=receiver.url(), secret=SECRET))
    receiver.script = {"/hook": [500, 500, 500]}
    service = await start_reporter(retry_deadline_s=0.0)
    await publish_event(js, status_event("failed"))

    await eventually(lambda: outcome(service, "dead_letter") == 1, what="dead letter")
    await eventually(lambda: settled(js), what="message terminated")
    assert len(receiver.calls) == 1


async def test_accounts_without_endpoints_are_acked_and_ops_routes_answer(
    js, start_reporter: Factory
) -> None:
    import aiohttp

    service = await start_reporter()
    await publish_event(js, status_event("sent", account_id="nobody"))
    await eventually(lambda: settled(js), what="acked")
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.settings.ops_port}"
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/metrics") as resp:
            assert "mailgate_webhook_delivery_seconds" in await resp.text()
