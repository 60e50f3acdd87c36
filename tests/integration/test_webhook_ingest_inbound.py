"""``POST /api/v1/inbound``: inbound mail the Postal sandbox routes to webhook-ingest, signed
and encoded as Postal's route HTTP endpoints post it."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import aiohttp
import nats.errors
import pytest
from mailgate_core.ids import new_ulid
from mailgate_core.schemas import PostalEvent, TrackUnsubscribe, decode
from mailgate_core.tracking import TokenSigner
from mailgate_fakes.infra import free_port
from mailgate_fakes.postal import PostalSandbox
from mailgate_fakes.testing import eventually
from mailgate_webhook_ingest.app import Settings, build
from prometheus_client import CollectorRegistry

KEY = "I" * 24
DOMAIN = "ours.example"
SECRET = "tracking-secret-for-tests"


class Ingest:
    def __init__(self, js, nats_url: str):
        self.js = js
        self.nats_url = nats_url
        self.registry = CollectorRegistry()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/v1/inbound"
        self.sandbox = PostalSandbox([KEY], inbound_url=self.url, retry_factor=0.0001)
        self.service = None

    async def start(self) -> None:
        settings = Settings(
            nats_url=self.nats_url,
            webhook_host="127.0.0.1",
            webhook_port=self.port,
            postal_webhook_public_key=self.sandbox.public_key_b64(),
            domain=DOMAIN,
            inbound_max_body=4 * 1024 * 1024,
            tracking_secret=SECRET,
        )
        self.service = await build(settings, registry=self.registry)
        await self.service.start()
        await self.sandbox.start()

    async def stop(self) -> None:
        await self.sandbox.stop()
        if self.service is not None:
            await self.service.stop()

    async def fetch(self, subject: str, stream: str, cls):
        sub = await self.js.pull_subscribe(subject, stream=stream)
        try:
            msgs = await sub.fetch(100, timeout=0.2)
        except (TimeoutError, nats.errors.TimeoutError):
            msgs = []
        finally:
            await sub.unsubscribe()
        return [decode(m.data, cls) for m in msgs]

    async def postal_events(self) -> list[PostalEvent]:
        return await self.fetch("postal.>", "POSTAL", PostalEvent)

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def ingest(js, nats_url) -> AsyncIterator[Ingest]:
    i = Ingest(js, nats_url)
    yield i
    await i.stop()


def arf_report(mailgate_id: str, feedback_type: str = "abuse") -> bytes:
    return (
        "From: fbl@feedback.mail.ru\r\nTo: fbl@ours.example\r\nSubject: Abuse report\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="=b="\r\n\r\n'
        "--=b=\r\nContent-Type: text/plain\r\n\r\nA user marked this message as spam.\r\n"
        "--=b=\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: Mail.ru-FBL/1.0\r\nVersion: 1\r\n"
        "Original-Rcpt-To: ivan@mail.ru\r\nArrival-Date: Thu, 25 Apr 2024 14:00:00 +0300\r\n\r\n"
        "--=b=\r\nContent-Type: message/rfc822\r\n\r\n"
        f"Message-ID: <{mailgate_id}@{DOMAIN}>\r\nX-Postal-MsgID: Qm3v8d0aZk1L2pXy\r\n"
        f"From: news@{DOMAIN}\r\nTo: ivan@mail.ru\r\nSubject: Sale\r\n\r\nBuy now\r\n"
        "--=b=--\r\n"
    ).encode()


async def test_an_arf_report_becomes_a_complaint_for_our_message(ingest: Ingest) -> None:
    await ingest.start()
    mailgate_id = new_ulid()
    routed = ingest.sandbox.route_inbound(
        arf_report(mailgate_id), "fbl@ours.example", "fbl@feedback.mail.ru"
    )

    (event,) = await eventually(ingest.postal_events, what="complaint")
    assert event.subject() == "postal.Complaint"
    assert event.event_id == f"arf-{mailgate_id}"
    assert (event.mailgate_id, event.status, event.recipient, event.postal_token) == (
        mailgate_id,
        "abuse",
        "ivan@mail.ru",
        "Qm3v8d0aZk1L2pXy",
    )
    assert event.payload["feedback"]["user_agent"] == "Mail.ru-FBL/1.0"
    assert event.payload["inbound"]["id"] == routed.id
    await ingest.sandbox.idle()
    assert [a["status"] for a in ingest.sandbox.inbound_attempts] == [200]
    assert ingest.metric("mailgate_inbound_messages_total", kind="complaint") == 1


async def test_a_mailto_unsubscribe_reply_becomes_track_unsubscribe(ingest: Ingest) -> None:
    await ingest.start()
    mailgate_id = new_ulid()
    token = TokenSigner([SECRET]).make_unsub_token(mailgate_id)
    address = f"u+{token}@{DOMAIN}"
    raw = (
        f"From: Ivan <ivan@mail.ru>\r\nTo: {address}\r\nSubject: unsubscribe {token}\r\n\r\n\r\n"
    ).encode()
    ingest.sandbox.route_inbound(raw, address, "ivan@mail.ru", encoding="FormData")

    (event,) = await eventually(
        lambda: ingest.fetch("track.unsubscribe", "TRACK", TrackUnsubscribe),
        what="unsubscribe",
    )
    assert (event.mailgate_id, event.event_id, event.one_click) == (
        mailgate_id,
        f"mailto-{mailgate_id}",
        False,
    )
    assert await ingest.postal_events() == []
    assert ingest.metric("mailgate_inbound_messages_total", kind="unsubscribe") == 1


async def test_other_inbound_mail_is_kept_raw_on_postal_unknown(ingest: Ingest) -> None:
    await ingest.start()
    raw = b"From: someone@x.com\r\nTo: u@ours.example\r\nSubject: hello?\r\n\r\nAnyone?\r\n"
    ingest.sandbox.route_inbound(raw, "u@ours.example", "someone@x.com")
    ingest.sandbox.route_inbound(raw, "info@ours.example", "someone@x.com", format="Hash")

    async def two() -> list[PostalEvent] | None:
        events = await ingest.postal_events()
        return events if len(events) == 2 else None

    events = await eventually(two, what="two unknown events")
    assert {e.subject() for e in events} == {"postal.Unknown"}
    by_reason = {e.payload["reason"]: e for e in events}
    assert base64.b64decode(by_reason["not_recognised"].payload["message"]) == raw
    assert by_reason["not_recognised"].recipient == "u@ours.example"
    assert "body" in by_reason["hash_format"].payload
    assert ingest.metric("mailgate_inbound_unrecognised_total", reason="hash_format") == 1
    assert ingest.metric("mailgate_inbound_messages_total", kind="unknown") == 2


async def test_a_large_unknown_message_goes_to_the_object_store(ingest: Ingest) -> None:
    await ingest.start()
    raw = b"From: someone@x.com\r\nSubject: big\r\n\r\n" + b"x" * 600_000 + b"\r\n"
    ingest.sandbox.route_inbound(raw, "u@ours.example", "someone@x.com")

    (event,) = await eventually(ingest.postal_events, what="unknown event")
    name = event.payload["object_name"]
    store = await ingest.js.object_store("mail-blobs")
    assert (await store.get(name)).data == raw


async def test_a_redelivered_post_is_stored_once(
    ingest: Ingest,
) -> None:
    await ingest.start()
    message = ingest.sandbox.route_inbound(arf_report(new_ulid()), "fbl@ours.example", "x@y")
    await eventually(ingest.postal_events, what="first delivery")
    body, headers = ingest.sandbox.inbound_request(message)
    async with (
        aiohttp.ClientSession() as http,
        http.post(ingest.url, data=body, headers=headers) as resp,
    ):
        assert resp.status == 200
    assert len(await ingest.postal_events()) == 1


async def test_a_forged_or_mistyped_post_is_refused(ingest: Ingest) -> None:
    await ingest.start()
    message = ingest.sandbox.route_inbound(arf_report(new_ulid()), "fbl@ours.example", "x@y")
    await eventually(ingest.postal_events, what="genuine post")
    body, headers = ingest.sandbox.inbound_request(message)
    forged = body.replace(b"fbl@ours.example", b"fbl@evil.example")
    async with aiohttp.ClientSession() as http:
        async with http.post(ingest.url, data=forged, headers=headers) as resp:
            assert resp.status == 401
        async with http.post(
            ingest.url, data=body, headers={**headers, "Content-Type": "text/plain"}
        ) as resp:
            assert resp.status == 415
    assert len(await ingest.postal_events()) == 1
    assert ingest.metric("mailgate_inbound_rejected_total", reason="bad_signature") == 1


async def test_nats_down_makes_postal_retry_the_inbound_post(ingest: Ingest, nats_server) -> None:
    await ingest.start()
    nats_server.stop()
    ingest.sandbox.route_inbound(arf_report(new_ulid()), "fbl@ours.example", "x@y")
    await eventually(
        lambda: any(a["status"] == 503 for a in ingest.sandbox.inbound_attempts),
        what="503 answered",
    )
    assert ingest.metric("mailgate_inbound_rejected_total", reason="publish_failed") >= 1
