"""Postal webhooks in: forged or missing signatures, replays, oversized bodies and JSON
bombs get the right status and publish nothing. (More in tests/integration/
test_webhook_ingest_http.py: tampered bodies, keys of another server, 413, replays.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from mailgate_core.ids import new_ulid
from mailgate_fakes.postal import PostalSandbox
from test_webhook_ingest_http import DOMAIN, KEY, Ingest, signed_body


@pytest.fixture
async def ingest(js, nats_url) -> AsyncIterator[Ingest]:
    running = Ingest(js, nats_url, PostalSandbox([KEY], retry_factor=0.001))
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def signed(ingest: Ingest, body: bytes) -> dict[str, str]:
    return {"Content-Type": "application/json", **ingest.sandbox.sign(body)}


async def post(http: aiohttp.ClientSession, ingest: Ingest, body: bytes, headers) -> int:
    async with http.post(ingest.url, data=body, headers=headers) as resp:
        if resp.status >= 400:
            assert resp.content_type == "application/problem+json"
        return resp.status


async def test_signature_headers_from_another_body_are_refused(ingest: Ingest, http) -> None:
    body, headers = signed_body(ingest, message={"id": 1})
    other, _ = signed_body(ingest, message={"id": 2})
    assert await post(http, ingest, other, headers) == 401
    garbage = {**headers, "X-Postal-Signature-256": "AAAA", "X-Postal-Signature": "!!"}
    assert await post(http, ingest, body, garbage) == 401
    assert await ingest.events() == []


async def test_a_replay_of_a_captured_webhook_publishes_nothing_new(ingest: Ingest, http) -> None:
    """Same uuid: JetStream drops it (Nats-Msg-Id) and the ledger's event_ids table keeps
    the uuid as its idempotency key for good, so a later replay changes no state."""
    mailgate_id = new_ulid()
    body, headers = signed_body(ingest, message={"id": 7, "message_id": f"{mailgate_id}@{DOMAIN}"})
    for _ in range(5):
        assert await post(http, ingest, body, headers) == 200
    assert [e.mailgate_id for e in await ingest.events()] == [mailgate_id]


@pytest.mark.parametrize(
    "bomb",
    [
        b"[" * 20_000 + b"]" * 20_000,  # nesting: a recursive parser's stack
        b'{"a":' * 8_000 + b"1" + b"}" * 8_000,
        b'{"event":"MessageSent","timestamp":1,"uuid":"u","payload":'
        + b"[" * 15_000
        + b"]" * 15_000
        + b"}",
    ],
    ids=["deep-array", "deep-object", "deep-payload"],
)
async def test_json_bombs_signed_correctly_are_400_not_500(ingest: Ingest, http, bomb) -> None:
    assert await post(http, ingest, bomb, signed(ingest, bomb)) == 400
    assert await ingest.events() == []


async def test_wide_json_within_the_size_limit_is_handled(ingest: Ingest, http) -> None:
    payload = {f"k{i}": [i] * 3 for i in range(2000)}
    body = json.dumps(
        {"event": "MessageSent", "timestamp": 1.0, "uuid": new_ulid(), "payload": payload}
    ).encode()
    assert len(body) < 64 * 1024
    assert await post(http, ingest, body, signed(ingest, body)) in (200, 400)


async def test_an_oversized_chunked_body_without_length_is_413(ingest: Ingest, http) -> None:
    async def chunks():
        for _ in range(100):
            yield b" " * 4096

    async with http.post(
        ingest.url, data=chunks(), headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 413
    assert await ingest.events() == []


async def test_a_lying_content_length_cannot_smuggle_a_second_request(ingest: Ingest, http) -> None:
    body, headers = signed_body(ingest, message={"id": 3})
    assert await post(http, ingest, body + b"\r\n\r\nPOST /x HTTP/1.1\r\n\r\n", headers) == 401
    assert await ingest.events() == []


async def test_a_json_bomb_on_the_inbound_route_is_not_a_server_error(ingest: Ingest, http) -> None:
    bomb = b'{"a":' * 8_000 + b"1" + b"}" * 8_000
    url = ingest.url.replace("/api/v1/webhook", "/api/v1/inbound")
    async with http.post(url, data=bomb, headers=signed(ingest, bomb)) as resp:
        assert resp.status < 500
