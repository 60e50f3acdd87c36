"""webhook-ingest against a real nats-server, fed by the Postal sandbox's signed webhooks."""

import base64
import json
from collections.abc import AsyncIterator

import aiohttp
import nats.errors
import pytest
from mailgate_core.ids import new_ulid
from mailgate_core.schemas import PostalEvent, decode
from mailgate_fakes.infra import free_port
from mailgate_fakes.postal import PostalSandbox, generate_private_key, public_key_b64
from mailgate_fakes.testing import eventually
from mailgate_webhook_ingest.app import Settings, build
from prometheus_client import CollectorRegistry

KEY = "W" * 24
DOMAIN = "ours.example"
JSON = {"Content-Type": "application/json"}


class Ingest:
    def __init__(self, js, nats_url: str, sandbox: PostalSandbox):
        self.js = js
        self.nats_url = nats_url
        self.sandbox = sandbox
        self.registry = CollectorRegistry()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/v1/webhook"
        self.service = None

    async def start(self, public_key: str | None = None, **overrides) -> None:
        values = {
            "nats_url": self.nats_url,
            "webhook_host": "127.0.0.1",
            "webhook_port": self.port,
            "postal_webhook_public_key": public_key or self.sandbox.public_key_b64(),
            "domain": DOMAIN,
            "webhook_max_body": 64 * 1024,
        }
        values.update(overrides)
        settings = Settings(**values)
        self.service = await build(settings, registry=self.registry)
        await self.service.start()
        self.sandbox.webhook_url = self.url
        await self.sandbox.start()

    async def stop(self) -> None:
        await self.sandbox.stop()
        if self.service is not None:
            await self.service.stop()

    async def events(self) -> list[PostalEvent]:
        sub = await self.js.pull_subscribe("postal.>", stream="POSTAL")
        try:
            msgs = await sub.fetch(100, timeout=0.2)
        except (TimeoutError, nats.errors.TimeoutError):
            msgs = []
        finally:
            await sub.unsubscribe()
        return [decode(m.data, PostalEvent) for m in msgs]

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def ingest(js, nats_url) -> AsyncIterator[Ingest]:
    i = Ingest(js, nats_url, PostalSandbox([KEY], retry_factor=0.001))
    yield i
    await i.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def raw_for(mailgate_id: str) -> str:
    raw = (
        f"From: news@{DOMAIN}\r\nTo: a@x.com\r\nSubject: Hi\r\n"
        f"Message-ID: <{mailgate_id}@{DOMAIN}>\r\nX-Postal-Tag: camp-9\r\n\r\nHello\r\n"
    )
    return base64.b64encode(raw.encode()).decode()


def signed_body(
    ingest: Ingest, event: str = "MessageSent", **payload
) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {
            "event": event,
            "timestamp": 1714400000.5,
            "payload": payload,
            "uuid": f"uuid-{new_ulid()}",
        }
    ).encode()
    return body, {"Content-Type": "application/json", **ingest.sandbox.sign(body)}


async def test_a_sandbox_webhook_is_published_with_our_mailgate_id(ingest: Ingest) -> None:
    await ingest.start()
    mailgate_id = new_ulid()
    answer = ingest.sandbox.call(
        "send/raw",
        {"rcpt_to": ["a@x.com"], "mail_from": f"b@{DOMAIN}", "data": raw_for(mailgate_id)},
        KEY,
    )
    sent = answer["data"]["messages"]["a@x.com"]

    (event,) = await eventually(ingest.events, what="postal event")
    assert event.subject() == "postal.MessageSent"
    assert event.mailgate_id == mailgate_id
    assert (event.postal_id, event.postal_token) == (sent["id"], sent["token"])
    assert (event.status, event.recipient, event.tag) == ("Sent", "a@x.com", "camp-9")
    assert event.event_id == ingest.sandbox.webhooks[0].uuid
    assert event.payload["message"]["message_id"] == f"{mailgate_id}@{DOMAIN}"
    await ingest.sandbox.idle()  # the sandbox notes the attempt once it has read the answer
    assert [a["status"] for a in ingest.sandbox.webhook_attempts] == [200]
    assert ingest.metric("mailgate_webhooks_received_total", event="MessageSent") == 1


async def test_a_duplicated_webhook_is_stored_once(ingest: Ingest) -> None:
    ingest.sandbox.faults.update({"webhook_duplicates": 1})
    await ingest.start()
    mailgate_id = new_ulid()
    params = {"rcpt_to": ["a@x.com"], "mail_from": f"b@{DOMAIN}", "data": raw_for(mailgate_id)}
    ingest.sandbox.call("send/raw", params, KEY)
    await ingest.sandbox.idle()
    assert [a["status"] for a in ingest.sandbox.webhook_attempts] == [200, 200]
    events = await ingest.events()
    assert [e.mailgate_id for e in events] == [mailgate_id]


async def test_a_tampered_body_is_refused_and_nothing_published(
    ingest: Ingest, http: aiohttp.ClientSession
) -> None:
    await ingest.start()
    body, headers = signed_body(ingest, message={"id": 1})
    async with http.post(
        ingest.url, data=body.replace(b'"id": 1', b'"id": 2'), headers=headers
    ) as resp:
        assert resp.status == 401
        assert resp.content_type == "application/problem+json"
        problem = await resp.json(content_type=None)
    assert problem["status"] == 401 and problem["title"] == "Unauthorized"
    async with http.post(ingest.url, data=body, headers=JSON) as resp:
        assert resp.status == 401
    assert await ingest.events() == []
    assert ingest.metric("mailgate_webhooks_rejected_total", reason="bad_signature") == 1
    assert ingest.metric("mailgate_webhooks_rejected_total", reason="missing_signature") == 1


async def test_a_sha1_only_signature_is_accepted(
    ingest: Ingest, http: aiohttp.ClientSession
) -> None:
    await ingest.start()
    body, headers = signed_body(ingest, "DomainDNSError", domain=DOMAIN, spf_status="OK")
    legacy = {
        "Content-Type": "application/json",
        "X-Postal-Signature": headers["X-Postal-Signature"],
    }
    async with http.post(ingest.url, data=body, headers=legacy) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    (event,) = await eventually(ingest.events)
    assert (event.event, event.mailgate_id, event.payload["domain"]) == (
        "DomainDNSError",
        None,
        DOMAIN,
    )


async def test_a_rotated_key_list_accepts_both_keys(
    ingest: Ingest, http: aiohttp.ClientSession
) -> None:
    old = generate_private_key()
    await ingest.start(public_key=f"{public_key_b64(old)},{ingest.sandbox.public_key_b64()}")
    body, headers = signed_body(ingest, "SendLimitApproaching", volume=9, limit=10)
    async with http.post(ingest.url, data=body, headers=headers) as resp:
        assert resp.status == 200


async def test_a_signed_body_that_is_not_a_webhook_gets_400(
    ingest: Ingest, http: aiohttp.ClientSession
) -> None:
    await ingest.start()
    for body in (b"{not json", b'{"event":"MessageSent","timestamp":1,"uuid":"u","payload":{}}'):
        headers = {**JSON, **ingest.sandbox.sign(body)}
        async with http.post(ingest.url, data=body, headers=headers) as resp:
            assert resp.status == 400
            assert resp.content_type == "application/problem+json"
    assert await ingest.events() == []


async def test_an_oversized_body_gets_413(ingest: Ingest, http: aiohttp.ClientSession) -> None:
    await ingest.start()
    body = b"{" + b" " * (64 * 1024) + b"}"
    headers = {**JSON, **ingest.sandbox.sign(body)}
    async with http.post(ingest.url, data=body, headers=headers) as resp:
        assert resp.status == 413
    assert ingest.metric("mailgate_webhooks_rejected_total", reason="too_large") == 1


async def test_nats_down_answers_503_so_postal_retries(
    ingest: Ingest, http: aiohttp.ClientSession, nats_server
) -> None:
    await ingest.start()
    nats_server.stop()
    body, headers = signed_body(ingest, message={"id": 1, "message_id": "x@y"})
    async with http.post(ingest.url, data=body, headers=headers) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        assert (await resp.json(content_type=None))["status"] == 503
    assert ingest.metric("mailgate_webhooks_rejected_total", reason="publish_failed") == 1


async def test_ops_routes_are_on_the_webhook_port(
    ingest: Ingest, http: aiohttp.ClientSession
) -> None:
    await ingest.start()
    base = ingest.url.removesuffix("/api/v1/webhook")
    async with http.get(f"{base}/readyz") as resp:
        assert resp.status == 200
    async with http.get(f"{base}/metrics") as resp:
        assert "mailgate_webhooks_rejected_total" in await resp.text()


async def test_a_body_that_is_not_json_content_gets_415(
    ingest: Ingest, http: aiohttp.ClientSession
) -> None:
    await ingest.start()
    body, headers = signed_body(ingest, message={"id": 1})
    headers["Content-Type"] = "text/plain"
    async with http.post(ingest.url, data=body, headers=headers) as resp:
        assert resp.status == 415
        assert resp.content_type == "application/problem+json"
        assert (await resp.json(content_type=None))["title"] == "Unsupported Media Type"
    assert await ingest.events() == []
    assert ingest.metric("mailgate_webhooks_rejected_total", reason="unsupported_media_type") == 1


async def test_a_replayed_webhook_is_stored_once(
    ingest: Ingest, http: aiohttp.ClientSession
) -> None:
    await ingest.start()
    mailgate_id = new_ulid()
    body, headers = signed_body(ingest, message={"id": 5, "message_id": f"{mailgate_id}@{DOMAIN}"})
    for _ in range(2):  # Postal's retry after a lost 200, or a replay: same uuid
        async with http.post(ingest.url, data=body, headers=headers) as resp:
            assert resp.status == 200
    (event,) = await ingest.events()
    assert event.mailgate_id == mailgate_id
    info = await ingest.js.stream_info("POSTAL")
    assert info.state.messages == 1


async def test_a_webhook_signed_by_another_key_is_forged(
    ingest: Ingest, http: aiohttp.ClientSession
) -> None:
    await ingest.start()
    forger = PostalSandbox([KEY], private_key=generate_private_key())
    body = json.dumps(
        {"event": "MessageSent", "timestamp": 1.0, "payload": {"message": {"id": 1}}, "uuid": "f"}
    ).encode()
    headers = {"Content-Type": "application/json", **forger.sign(body)}
    async with http.post(ingest.url, data=body, headers=headers) as resp:
        assert resp.status == 401
    assert await ingest.events() == []
    assert ingest.metric("mailgate_webhooks_rejected_total", reason="bad_signature") == 1


async def test_an_unknown_event_is_published_raw_on_postal_unknown(ingest: Ingest) -> None:
    await ingest.start()
    hook = ingest.sandbox.emit("MessageTeleported", {"message": {"id": 3}, "where": "Mars"})
    (event,) = await eventually(ingest.events, what="unknown event")
    assert event.subject() == "postal.Unknown"
    assert event.event_id == hook.uuid
    assert event.payload["event"] == "MessageTeleported"
    assert event.payload["payload"]["where"] == "Mars"
    assert event.postal_id == 3
    assert ingest.metric("mailgate_webhooks_received_total", event="Unknown") == 1


async def test_clicks_and_loads_from_the_sandbox_are_published(ingest: Ingest) -> None:
    await ingest.start()
    for recipient in ("click@x.com", "open@x.com"):
        mailgate_id = new_ulid()
        ingest.sandbox.call(
            "send/raw",
            {"rcpt_to": [recipient], "mail_from": f"b@{DOMAIN}", "data": raw_for(mailgate_id)},
            KEY,
        )

    async def four() -> list[PostalEvent] | None:
        events = await ingest.events()
        return events if len(events) == 4 else None

    events = await eventually(four, what="sent, clicked, sent, loaded")
    names = sorted(e.event for e in events)
    assert names == ["MessageLinkClicked", "MessageLoaded", "MessageSent", "MessageSent"]
    click = next(e for e in events if e.event == "MessageLinkClicked")
    assert click.payload["url"] and click.payload["ip_address"] == "203.0.113.9"
    assert click.mailgate_id is not None


async def test_a_client_outside_the_allowlist_gets_403(
    ingest: Ingest, http: aiohttp.ClientSession
) -> None:
    await ingest.start(postal_webhook_allowed_ips=["192.0.2.0/24"])
    body, headers = signed_body(ingest, message={"id": 1})
    async with http.post(ingest.url, data=body, headers=headers) as resp:
        assert resp.status == 403
        assert (await resp.json(content_type=None))["status"] == 403
    assert ingest.metric("mailgate_webhooks_rejected_total", reason="ip_not_allowed") == 1
    assert await ingest.events() == []


async def test_a_client_inside_the_allowlist_is_served(
    ingest: Ingest, http: aiohttp.ClientSession
) -> None:
    await ingest.start(postal_webhook_allowed_ips=["10.0.0.0/8", "127.0.0.1/32"])
    body, headers = signed_body(ingest, message={"id": 1})
    async with http.post(ingest.url, data=body, headers=headers) as resp:
        assert resp.status == 200
