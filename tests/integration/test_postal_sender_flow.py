"""postal-sender against a real nats-server and the Postal sandbox on a free port."""

import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import nats.errors
import pytest
from mailgate_core.config import Secret
from mailgate_core.ids import new_ulid
from mailgate_core.nats import publish_event
from mailgate_core.records import AccountRecord
from mailgate_core.schemas import MailAccepted, MailFailed, MailSubmitted, MessageRef, decode
from mailgate_fakes.infra import free_port
from mailgate_fakes.postal import PostalSandbox
from mailgate_fakes.testing import eventually
from mailgate_postal_sender.app import Settings, build
from mailgate_postal_sender.sender import SubmissionRecord
from prometheus_client import CollectorRegistry

KEY = "D" * 24
ACCOUNT_KEY = "E" * 24
DOMAIN = "ours.example"


def raw_message(mailgate_id: str, from_: str = f"news@{DOMAIN}", tag: str = "camp-42") -> bytes:
    return (
        f"From: News <{from_}>\r\nTo: a@x.com\r\nSubject: Hello\r\n"
        f"Message-ID: <{mailgate_id}@{DOMAIN}>\r\nX-Postal-Tag: {tag}\r\n"
        "Content-Type: text/plain\r\n\r\nHello there\r\n"
    ).encode()


_UNSET = b"unset"


def accepted(raw: bytes | None = _UNSET, **overrides) -> MailAccepted:
    mailgate_id = overrides.pop("mailgate_id", new_ulid())
    fields = {
        "message": MessageRef(
            mailgate_id=mailgate_id, account_id="acc1", recipient="a@x.com", campaign_id="42"
        ),
        "mail_from": f"bounces@{DOMAIN}",
        "credential": "user1",
        "message_id_header": f"<{mailgate_id}@{DOMAIN}>",
        "raw": raw_message(mailgate_id) if raw is _UNSET else raw,
    }
    fields.update(overrides)
    return MailAccepted(**fields)


class Harness:
    def __init__(self, js, nats_url: str, sandbox: PostalSandbox):
        self.js = js
        self.nats_url = nats_url
        self.sandbox = sandbox
        self.registry = CollectorRegistry()
        self.service = None

    async def start(self, **settings) -> None:
        base = await self.sandbox.start()
        self.ops_port = free_port()
        values = {
            "nats_url": self.nats_url,
            "postal_api_url": base,
            "postal_api_key": Secret(KEY),
            "ops_host": "127.0.0.1",
            "ops_port": self.ops_port,
            "reconcile_enabled": False,
            "retry_base_s": 0.05,
            "postal_timeout_s": 2.0,
        }
        values.update(settings)
        self.service = await build(Settings(**values), registry=self.registry)
        await self.service.start()

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
        await self.sandbox.stop()

    async def events(self, subject: str, cls):
        sub = await self.js.pull_subscribe(subject, stream="MAIL")
        try:
            msgs = await sub.fetch(100, timeout=0.2)
        except (TimeoutError, nats.errors.TimeoutError):
            msgs = []
        finally:
            await sub.unsubscribe()
        return [decode(m.data, cls) for m in msgs]

    async def settled(self) -> bool:
        info = await self.js.consumer_info("MAIL", "postal-sender")
        return info.num_pending == 0 and info.num_ack_pending == 0

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def readyz(self) -> tuple[int, dict]:
        url = f"http://127.0.0.1:{self.ops_port}/readyz"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def harness(js, nats_url) -> AsyncIterator[Harness]:
    h = Harness(js, nats_url, PostalSandbox([KEY, ACCOUNT_KEY], domains=[DOMAIN]))
    yield h
    await h.stop()


async def test_an_accepted_mail_is_sent_once_and_reported_submitted(harness: Harness) -> None:
    await harness.start()
    event = accepted()
    await publish_event(harness.js, event)

    submitted = await eventually(lambda: harness.events("mail.submitted", MailSubmitted))
    await eventually(harness.settled, what="consumer settled")
    assert len(harness.sandbox.messages) == 1
    sent = harness.sandbox.messages[0]
    assert sent["rcpt_to"] == "a@x.com"
    assert sent["mail_from"] == f"bounces@{DOMAIN}"
    assert sent["raw"] == event.raw
    assert sent["tag"] == "camp-42"
    assert sent["api_key"] == KEY
    assert [r["path"] for r in harness.sandbox.requests] == ["/api/v1/send/raw"]

    (out,) = submitted
    assert out.event_id == f"sub-{event.message.mailgate_id}"
    assert out.message == event.message
    assert (out.postal_id, out.postal_token) == (sent["id"], sent["token"])
    assert out.postal_message_id == f"{event.message.mailgate_id}@{DOMAIN}"

    kv = await harness.js.key_value("submissions")
    record = msgspec.json.decode(
        (await kv.get(event.message.mailgate_id)).value, type=SubmissionRecord
    )
    assert (record.postal_id, record.token) == (sent["id"], sent["token"])
    assert harness.metric("mailgate_postal_submitted_total") == 1
    assert harness.metric("mailgate_postal_requests_total", outcome="success") == 1


async def test_a_permanent_postal_error_fails_the_mail_without_retry(harness: Harness) -> None:
    await harness.start()
    mailgate_id = new_ulid()
    event = accepted(
        raw_message(mailgate_id, from_="x@not-verified.example"), mailgate_id=mailgate_id
    )
    await publish_event(harness.js, event)

    (failed,) = await eventually(lambda: harness.events("mail.failed", MailFailed))
    await eventually(harness.settled, what="consumer settled")
    assert (failed.reason, failed.code) == ("rejected", "UnauthenticatedFromAddress")
    assert failed.message.mailgate_id == mailgate_id
    assert harness.sandbox.requests == [{"path": "/api/v1/send/raw", "status": "error"}]
    assert harness.sandbox.messages == []
    assert await harness.events("mail.submitted", MailSubmitted) == []
    assert harness.metric("mailgate_postal_failed_total", reason="rejected") == 1


async def test_http_500s_are_retried_until_postal_accepts(harness: Harness) -> None:
    harness.sandbox.faults.update({"http_500": 2})
    await harness.start()
    await publish_event(harness.js, accepted())

    (submitted,) = await eventually(lambda: harness.events("mail.submitted", MailSubmitted))
    await eventually(harness.settled, what="consumer settled")
    assert [r["status"] for r in harness.sandbox.requests] == [500, 500, "success"]
    assert len(harness.sandbox.messages) == 1
    assert submitted.attempts == 3
    assert harness.metric("mailgate_postal_requests_total", outcome="http_error") == 2


async def test_a_stored_submission_is_republished_without_calling_postal(harness: Harness) -> None:
    await harness.start()
    event = accepted()
    kv = await harness.js.key_value("submissions")
    record = SubmissionRecord(
        postal_id=777, token="abcdefghABCDEFGH", message_id="m@x", submitted_at=1.0
    )
    await kv.put(event.message.mailgate_id, msgspec.json.encode(record))
    await publish_event(harness.js, event)

    (submitted,) = await eventually(lambda: harness.events("mail.submitted", MailSubmitted))
    await eventually(harness.settled, what="consumer settled")
    assert (submitted.postal_id, submitted.postal_token) == (777, "abcdefghABCDEFGH")
    assert harness.sandbox.requests == []
    assert harness.metric("mailgate_postal_replayed_total") == 1


async def test_a_large_message_is_read_from_the_object_store(harness: Harness) -> None:
    await harness.start()
    mailgate_id = new_ulid()
    raw = raw_message(mailgate_id) + b"x" * 200_000 + b"\r\n"
    store = await harness.js.object_store("mail-blobs")
    await store.put(f"mail/{mailgate_id}", raw)
    await publish_event(
        harness.js, accepted(raw=None, mailgate_id=mailgate_id, object_name=f"mail/{mailgate_id}")
    )

    await eventually(lambda: harness.events("mail.submitted", MailSubmitted))
    assert harness.sandbox.messages[0]["raw"] == raw


async def test_a_missing_object_fails_the_mail(harness: Harness) -> None:
    await harness.start()
    await publish_event(harness.js, accepted(raw=None, object_name="mail/gone"))
    (failed,) = await eventually(lambda: harness.events("mail.failed", MailFailed))
    assert (failed.reason, failed.code) == ("rejected", "MessageBodyMissing")
    assert harness.sandbox.requests == []


async def test_the_accounts_own_postal_key_is_used(harness: Harness) -> None:
    await harness.start()
    accounts = await harness.js.key_value("accounts")
    record = AccountRecord(id="acc1", name="A", has_postal_api_key=True, postal_api_key=ACCOUNT_KEY)
    await accounts.put("acc1", msgspec.json.encode(record))
    await publish_event(harness.js, accepted(postal_api_key_ref="acc1"))

    await eventually(lambda: harness.events("mail.submitted", MailSubmitted))
    assert harness.sandbox.messages[0]["api_key"] == ACCOUNT_KEY


async def test_transient_failures_past_the_deadline_exhaust_retries(harness: Harness) -> None:
    harness.sandbox.faults.update({"http_500": 100})
    await harness.start(retry_deadline_s=60.0)
    await publish_event(harness.js, accepted(occurred_at=time.time() - 61))

    (failed,) = await eventually(lambda: harness.events("mail.failed", MailFailed))
    assert (failed.reason, failed.code) == ("retries_exhausted", "HTTP500")
    assert harness.metric("mailgate_postal_failed_total", reason="retries_exhausted") == 1


async def test_a_suspended_server_holds_mail_until_lifted(harness: Harness) -> None:
    harness.sandbox.faults.update({"suspended": True})
    await harness.start()
    await publish_event(harness.js, accepted())
    await eventually(
        lambda: harness.metric("mailgate_postal_requests_total", outcome="suspended") >= 2,
        what="suspended retries",
    )
    assert await harness.events("mail.failed", MailFailed) == []
    harness.sandbox.faults.update({"suspended": False})
    await eventually(lambda: harness.events("mail.submitted", MailSubmitted))


async def test_a_lost_reply_is_retried_and_counted_as_ambiguous(harness: Harness) -> None:
    harness.sandbox.faults.update({"timeout_s": 1.0})
    await harness.start(postal_timeout_s=0.3)
    await publish_event(harness.js, accepted())

    await eventually(lambda: harness.events("mail.submitted", MailSubmitted))
    assert harness.metric("mailgate_postal_ambiguous_retries_total") == 1
    assert harness.metric("mailgate_postal_requests_total", outcome="timeout") == 1
    # Postal has no idempotency key: the first request created a message too.
    assert len(harness.sandbox.messages) == 2


async def test_requests_reuse_connections_and_stay_under_the_in_flight_cap(
    harness: Harness,
) -> None:
    harness.sandbox.faults.update({"latency_s": 0.05})
    await harness.start(postal_max_in_flight=3, send_concurrency=16)
    for _ in range(24):
        await publish_event(harness.js, accepted())

    await eventually(lambda: len(harness.sandbox.messages) == 24, what="24 submissions")
    await eventually(harness.settled, what="consumer settled")
    assert harness.sandbox.peak_concurrency == 3
    # One keep-alive connection per slot, reused: 24 requests over at most 3 connections.
    assert len(set(harness.sandbox.peers)) <= 3
    assert harness.metric("mailgate_postal_requests_in_flight") == 0
    assert (
        harness.metric("mailgate_postal_request_duration_seconds_count", endpoint="send/raw") == 24
    )


async def test_the_rate_cap_spaces_requests_to_postal(harness: Harness) -> None:
    await harness.start(postal_rate_per_s=20.0)
    for _ in range(30):
        await publish_event(harness.js, accepted())

    await eventually(lambda: len(harness.sandbox.messages) == 30, what="30 submissions")
    stamps = sorted(m["timestamp"] for m in harness.sandbox.messages)
    # A burst of 20, then 10 more at 20 per second: at least half a second.
    assert stamps[-1] - stamps[0] >= 0.45


async def test_a_postal_outage_loses_nothing_and_costs_few_requests(harness: Harness) -> None:
    harness.sandbox.faults.start_outage(2.0, "http_503")
    await harness.start(postal_circuit_failures=3, postal_circuit_open_s=0.2)
    events = [accepted() for _ in range(5)]
    for event in events:
        await publish_event(harness.js, event)

    async def not_ready() -> bool:
        status, body = await harness.readyz()
        return status == 503 and "postal" in body["failing"]

    await eventually(not_ready, what="/readyz failing on postal")
    assert harness.metric("mailgate_postal_circuit_open") == 1
    submitted = await eventually(
        lambda: _count(harness.events("mail.submitted", MailSubmitted), 5),
        timeout=20,
        what="all 5 submitted after the outage",
    )
    assert sorted(s.message.mailgate_id for s in submitted) == sorted(
        e.message.mailgate_id for e in events
    )
    assert len(harness.sandbox.messages) == 5
    refused = [r for r in harness.sandbox.requests if r["status"] == 503]
    # Without the circuit every message would retry on its own (~6 times each in 2 s).
    assert 3 <= len(refused) <= 10
    assert harness.metric("mailgate_postal_errors_total", code="HTTP503") == len(refused)
    assert harness.metric("mailgate_postal_deferred_total") >= 1
    assert await harness.events("mail.failed", MailFailed) == []
    status, _ = await harness.readyz()
    assert status == 200


async def test_hanging_requests_time_out_and_are_retried_without_duplicates(
    harness: Harness,
) -> None:
    harness.sandbox.faults.start_outage(1.0, "timeout")
    await harness.start(postal_timeout_s=0.3, postal_circuit_failures=2, postal_circuit_open_s=0.2)
    await publish_event(harness.js, accepted())

    await eventually(lambda: _count(harness.events("mail.submitted", MailSubmitted), 1), timeout=15)
    assert len(harness.sandbox.messages) == 1
    assert harness.metric("mailgate_postal_requests_total", outcome="timeout") >= 1
    assert harness.metric("mailgate_postal_errors_total", code="Timeout") >= 1


async def _count(events, n: int):
    got = await events
    return got if len(got) >= n else None
