"""The Postal sandbox over HTTP: envelope, params bodies, faults and signed webhook retries."""

import base64
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from mailgate_fakes.postal import PostalSandbox
from mailgate_fakes.testing import eventually
from mailgate_webhook_ingest.verify import KeyRing

KEY = "A" * 24
RAW = (
    b"From: news@ours.example\r\nTo: a@x.com\r\nSubject: Hi\r\n"
    b"Message-ID: <m-1@ours.example>\r\n\r\nHello\r\n"
)


class Receiver:
    """A webhook endpoint that answers from a scripted list of statuses (then 200)."""

    def __init__(self, statuses: list[int]):
        self.statuses = statuses
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver([])
    yield r
    await r.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def start_sandbox(webhook_url: str | None, **options) -> tuple[PostalSandbox, str]:
    sandbox = PostalSandbox([KEY], webhook_url, retry_factor=0.001, **options)
    return sandbox, await sandbox.start()


def raw_params(rcpt: str = "a@x.com") -> dict:
    return {
        "rcpt_to": [rcpt],
        "mail_from": "b@ours.example",
        "data": base64.b64encode(RAW).decode(),
    }


async def test_errors_are_http_200_with_a_status_envelope(http: aiohttp.ClientSession) -> None:
    sandbox, base = await start_sandbox(None)
    try:
        async with http.post(f"{base}/api/v1/send/raw", json=raw_params()) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert (body["status"], body["data"]["code"]) == ("error", "AccessDenied")
        async with http.put(
            f"{base}/api/v1/send/raw", json=raw_params(), headers={"X-Server-API-Key": "B" * 24}
        ) as resp:
            body = await resp.json()
        assert resp.status == 200
        assert body["data"]["code"] == "InvalidServerAPIKey" and body["data"]["token"] == "B" * 24
        async with http.post(
            f"{base}/api/v1/send/raw",
            json={"mail_from": "x"},
            headers={"X-Server-API-Key": KEY},
        ) as resp:
            body = await resp.json()
        assert body == {
            "status": "parameter-error",
            "time": body["time"],
            "flags": {},
            "data": {"message": "`rcpt_to` parameter is required but is missing"},
        }
    finally:
        await sandbox.stop()


async def test_form_params_and_text_bodies(http: aiohttp.ClientSession) -> None:
    sandbox, base = await start_sandbox(None)
    headers = {"X-Server-API-Key": KEY}
    try:
        async with http.post(
            f"{base}/api/v1/send/raw", data={"params": json.dumps(raw_params())}, headers=headers
        ) as resp:
            body = await resp.json()
        assert body["status"] == "success"
        assert body["data"]["message_id"] == "m-1@ours.example"
        # A body that is neither JSON nor a form reads as {}.
        async with http.post(
            f"{base}/api/v1/send/raw",
            data=json.dumps(raw_params()),
            headers={**headers, "Content-Type": "text/plain"},
        ) as resp:
            body = await resp.json()
        assert body["status"] == "parameter-error"
        async with http.get(f"{base}/__sandbox/messages") as resp:
            listed = await resp.json()
        assert [m["rcpt_to"] for m in listed] == ["a@x.com"]
        assert base64.b64decode(listed[0]["data"]) == RAW
    finally:
        await sandbox.stop()


async def test_fault_endpoint_makes_the_next_requests_fail_with_http_500(
    http: aiohttp.ClientSession,
) -> None:
    sandbox, base = await start_sandbox(None)
    headers = {"X-Server-API-Key": KEY}
    try:
        async with http.post(f"{base}/__sandbox/faults", json={"http_500": 2}) as resp:
            assert (await resp.json())["http_500"] == 2
        statuses = []
        for _ in range(3):
            async with http.post(
                f"{base}/api/v1/send/raw", json=raw_params(), headers=headers
            ) as resp:
                statuses.append(resp.status)
        assert statuses == [500, 500, 200]
        assert len(sandbox.messages) == 1
        async with http.post(f"{base}/__sandbox/faults", json={"bogus": 1}) as resp:
            assert resp.status == 400
    finally:
        await sandbox.stop()


async def test_webhooks_are_signed_and_retried_with_the_same_uuid(
    http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.statuses = [500, 503]
    sandbox, base = await start_sandbox(await receiver.start())
    try:
        async with http.post(
            f"{base}/api/v1/send/raw",
            json=raw_params("fail@x.com"),
            headers={"X-Server-API-Key": KEY},
        ) as resp:
            sent = (await resp.json())["data"]["messages"]["fail@x.com"]
        await eventually(lambda: len(receiver.requests) == 3, what="three attempts")
        bodies = [body for _headers, body in receiver.requests]
        assert len(set(bodies)) == 1  # same uuid and timestamp on every attempt
        document = json.loads(bodies[0])
        assert set(document) == {"event", "timestamp", "payload", "uuid"}
        assert document["event"] == "MessageDeliveryFailed"
        payload = document["payload"]
        assert (payload["status"], payload["output"]) == ("HardFail", "550 5.1.1 User unknown")
        assert payload["message"]["id"] == sent["id"]
        assert payload["message"]["token"] == sent["token"]
        assert payload["message"]["message_id"] == "m-1@ours.example"
        headers = receiver.requests[0][0]
        assert headers["User-Agent"] == "Postal/3.3.6"
        assert headers["Content-Type"] == "application/json"
        ring = KeyRing.from_setting(sandbox.public_key_b64())
        assert ring.verify(bodies[0], headers).ok
        assert headers["X-Postal-Signature-KID"] == sandbox.key_id()
        assert [a["status"] for a in sandbox.webhook_attempts] == [500, 503, 200]
        async with http.post(
            f"{base}/api/v1/messages/deliveries",
            json={"id": sent["id"]},
            headers={"X-Server-API-Key": KEY},
        ) as resp:
            deliveries = (await resp.json())["data"]
        assert [d["status"] for d in deliveries] == ["HardFail"]
    finally:
        await sandbox.stop()


async def test_a_webhook_is_dropped_after_six_failed_attempts(receiver: Receiver) -> None:
    receiver.statuses = [500] * 10
    sandbox = PostalSandbox([KEY], await receiver.start(), retry_factor=0.0001)
    await sandbox.start()
    try:
        hook = sandbox.emit(
            "SendLimitExceeded", {"server": sandbox.server_hash(), "volume": 9, "limit": 9}
        )
        await sandbox.idle(timeout=10)
        assert [a["attempt"] for a in sandbox.webhook_attempts] == [1, 2, 3, 4, 5, 6]
        assert {a["uuid"] for a in sandbox.webhook_attempts} == {hook.uuid}
        assert len(receiver.requests) == 6
    finally:
        await sandbox.stop()


async def test_outcomes_follow_the_recipient_local_part(receiver: Receiver) -> None:
    sandbox = PostalSandbox([KEY], await receiver.start(), retry_factor=0.001)
    await sandbox.start()
    try:
        data = base64.b64encode(RAW).decode()
        rcpts = ["ok@x.com", "bounce+1@x.com", "delay@x.com", "hold@x.com", "click@x.com"]
        rcpts += ["open@x.com"]
        sandbox.call(
            "send/raw", {"rcpt_to": rcpts, "mail_from": "m@ours.example", "data": data}, KEY
        )
        await sandbox.idle(timeout=10)
        events: dict[str, list[str]] = {}
        for _headers, body in receiver.requests:
            document = json.loads(body)
            payload = document["payload"]
            message = payload.get("message") or payload["original_message"]
            events.setdefault(message["to"], []).append(document["event"])
        # Postal delivers webhooks concurrently: compare without order.
        assert {to: sorted(names) for to, names in events.items()} == {
            "ok@x.com": ["MessageSent"],
            "bounce+1@x.com": ["MessageBounced", "MessageSent"],
            "delay@x.com": ["MessageDelayed", "MessageSent"],
            "hold@x.com": ["MessageHeld"],
            "click@x.com": ["MessageLinkClicked", "MessageSent"],
            "open@x.com": ["MessageLoaded", "MessageSent"],
        }
        clicked = next(m for m in sandbox.messages if m["rcpt_to"] == "click@x.com")
        answer = sandbox.call(
            "messages/message", {"id": clicked["id"], "_expansions": ["activity_entries"]}, KEY
        )
        activity = answer["data"]["activity_entries"]
        assert (len(activity["clicks"]), activity["loads"]) == (1, [])
    finally:
        await sandbox.stop()


@pytest.mark.parametrize(("mode", "status"), [("http_503", 503), ("timeout", 504)])
async def test_an_outage_fails_every_request_for_its_duration(
    http: aiohttp.ClientSession, mode: str, status: int
) -> None:
    sandbox, base = await start_sandbox(None)
    headers = {"X-Server-API-Key": KEY}
    try:
        async with http.post(
            f"{base}/__sandbox/faults", json={"outage_s": 0.5, "outage_mode": mode}
        ) as resp:
            assert (await resp.json())["outage_until"] > 0
        async with http.post(f"{base}/api/v1/send/raw", json=raw_params(), headers=headers) as resp:
            assert resp.status == status
        assert sandbox.messages == []

        async def served() -> bool:
            async with http.post(
                f"{base}/api/v1/send/raw", json=raw_params(), headers=headers
            ) as resp:
                return resp.status == 200

        await eventually(served, timeout=5, what="outage over")
        assert len(sandbox.messages) == 1
    finally:
        await sandbox.stop()


async def test_inbound_mail_is_posted_like_postals_http_endpoint_and_retried(
    receiver: Receiver,
) -> None:
    receiver.statuses = [503]
    sandbox = PostalSandbox([KEY], inbound_url=await receiver.start(), retry_factor=0.0001)
    await sandbox.start()
    raw = b"From: a@x.com\r\nSubject: hi\r\n\r\n" + b"y" * 100 + b"\r\n"
    try:
        message = sandbox.route_inbound(raw, "fbl+tag@ours.example", "a@x.com")
        await sandbox.idle(timeout=10)
        assert [a["status"] for a in sandbox.inbound_attempts] == [503, 200]
        (h1, b1), (_h2, b2) = receiver.requests
        assert b1 == b2
        document = json.loads(b1)
        assert document["id"] == message.id
        assert (document["rcpt_to"], document["mail_from"]) == ("fbl+tag@ours.example", "a@x.com")
        assert (document["base64"], document["size"]) == (True, len(raw))
        lines = document["message"].split("\n")
        assert max(len(line) for line in lines) == 60 and document["message"].endswith("\n")
        assert base64.b64decode(document["message"]) == raw
        assert h1["Content-Type"] == "application/json"
        assert KeyRing.from_setting(sandbox.public_key_b64()).verify(b1, h1).ok
        assert [d.status for d in message.deliveries] == ["SoftFail", "Sent"]
    finally:
        await sandbox.stop()


async def test_an_inbound_4xx_is_a_hard_fail_without_retry(
    http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.statuses = [404]
    sandbox = PostalSandbox([KEY], inbound_url=await receiver.start(), retry_factor=0.0001)
    base = await sandbox.start()
    try:
        async with http.post(
            f"{base}/__sandbox/inbound",
            json={
                "rcpt_to": "x@ours.example",
                "raw": "Subject: a\r\n\r\nb",
                "encoding": "FormData",
            },
        ) as resp:
            ident = (await resp.json())["id"]
        await sandbox.idle(timeout=10)
        assert [a["status"] for a in sandbox.inbound_attempts] == [404]
        assert receiver.requests[0][0]["Content-Type"] == "application/x-www-form-urlencoded"
        assert sandbox.message(ident).status == "HardFail"
    finally:
        await sandbox.stop()
