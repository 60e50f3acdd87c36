"""The reconciler: webhooks that never arrive are recovered from Postal's messages API; the
leader lock keeps that work on one replica."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import msgspec
import nats.errors
import pytest
from mailgate_core.config import Secret
from mailgate_core.ids import new_ulid
from mailgate_core.nats import publish_event
from mailgate_core.schemas import MailAccepted, MailSubmitted, PostalEvent, decode
from mailgate_fakes.infra import free_port
from mailgate_fakes.postal import PostalSandbox
from mailgate_fakes.testing import eventually, mail_accepted
from mailgate_postal_sender.app import PostalSenderService, Settings, build
from mailgate_postal_sender.leader import LeaderLock
from mailgate_postal_sender.pending import (
    KV_PENDING,
    PendingRecord,
    create_pending,
    ensure_bucket,
    mark_final,
)
from prometheus_client import CollectorRegistry

KEY = "R" * 24
DOMAIN = "ours.example"


def accepted(recipient: str = "a@x.com") -> MailAccepted:
    return mail_accepted(
        DOMAIN,
        recipient=recipient,
        from_header=f"news@{DOMAIN}",
        extra_headers="X-Postal-Tag: camp-1\r\n",
    )


class Replica:
    def __init__(self, service: PostalSenderService, registry: CollectorRegistry):
        self.service = service
        self.registry = registry

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


class Harness:
    def __init__(self, js, nats_url: str, sandbox: PostalSandbox):
        self.js = js
        self.nats_url = nats_url
        self.sandbox = sandbox
        self.base_url = ""
        self.replicas: list[Replica] = []

    async def replica(self, **settings) -> Replica:
        if not self.base_url:
            self.base_url = await self.sandbox.start()
        values = {
            "nats_url": self.nats_url,
            "postal_api_url": self.base_url,
            "postal_api_key": Secret(KEY),
            "ops_host": "127.0.0.1",
            "ops_port": free_port(),
            "retry_base_s": 0.05,
            "postal_timeout_s": 2.0,
            "reconcile_after_s": 0.3,
            "reconcile_interval_s": 0.2,
            "reconcile_lock_ttl_s": 2.0,
        }
        values.update(settings)
        registry = CollectorRegistry()
        service = await build(Settings(**values), registry=registry)
        await service.start()
        replica = Replica(service, registry)
        self.replicas.append(replica)
        return replica

    async def stop(self) -> None:
        for replica in self.replicas:
            await replica.service.stop()
        await self.sandbox.stop()

    async def fetch(self, subject: str, stream: str, cls):
        sub = await self.js.pull_subscribe(subject, stream=stream)
        try:
            msgs = await sub.fetch(1000, timeout=0.2)
        except (TimeoutError, nats.errors.TimeoutError):
            msgs = []
        finally:
            await sub.unsubscribe()
        return [decode(m.data, cls) for m in msgs]

    async def postal_events(self) -> list[PostalEvent]:
        return await self.fetch("postal.>", "POSTAL", PostalEvent)

    async def pending(self, mailgate_id: str) -> PendingRecord | None:
        kv = await self.js.key_value(KV_PENDING)
        try:
            entry = await kv.get(mailgate_id)
        except Exception:
            return None
        return msgspec.json.decode(entry.value, type=PendingRecord)


@pytest.fixture
async def harness(js, nats_url) -> AsyncIterator[Harness]:
    # Webhooks go to a port nobody listens on: webhook-ingest is down the whole time.
    dead = f"http://127.0.0.1:{free_port()}/api/v1/webhook"
    sandbox = PostalSandbox([KEY], dead, domains=[DOMAIN], retry_factor=0.0001)
    h = Harness(js, nats_url, sandbox)
    yield h
    await h.stop()


async def test_a_webhook_outage_is_recovered_from_postals_api(harness: Harness) -> None:
    replica = await harness.replica()
    sent, failed = accepted("a@x.com"), accepted("fail@x.com")
    await publish_event(harness.js, sent)
    await publish_event(harness.js, failed)

    async def recovered() -> dict[str, PostalEvent] | None:
        events = {e.mailgate_id: e for e in await harness.postal_events()}
        return events if len(events) == 2 else None

    events = await eventually(recovered, timeout=15, what="reconciled events")
    delivered = events[sent.message.mailgate_id]
    assert delivered.subject() == "postal.MessageSent"
    assert delivered.event_id == f"rec-{sent.message.mailgate_id}-Sent"
    postal = {m["rcpt_to"]: m for m in harness.sandbox.messages}
    assert (delivered.postal_id, delivered.postal_token) == (
        postal["a@x.com"]["id"],
        postal["a@x.com"]["token"],
    )
    assert (delivered.recipient, delivered.tag, delivered.status) == ("a@x.com", "camp-1", "Sent")
    bounced = events[failed.message.mailgate_id]
    assert bounced.subject() == "postal.MessageDeliveryFailed"
    assert bounced.output == "550 5.1.1 User unknown"

    # Webhook-ingest never answered; the facts came from the messages API.
    assert harness.sandbox.webhook_attempts and all(
        a["status"] < 0 for a in harness.sandbox.webhook_attempts
    )
    paths = {r["path"] for r in harness.sandbox.requests}
    assert {"/api/v1/messages/message", "/api/v1/messages/deliveries"} <= paths
    assert replica.metric("mailgate_postal_reconciled_events_total", event="MessageSent") == 1
    assert (
        replica.metric("mailgate_postal_reconciled_events_total", event="MessageDeliveryFailed")
        == 1
    )
    assert replica.metric("mailgate_postal_reconciler_leader") == 1
    record = await eventually(lambda: harness.pending(sent.message.mailgate_id))
    assert record.final


async def test_reconciling_again_publishes_nothing_new(harness: Harness) -> None:
    replica = await harness.replica()
    event = accepted()
    await publish_event(harness.js, event)
    await eventually(harness.postal_events, timeout=15, what="reconciled event")
    (submitted,) = await harness.fetch("mail.submitted", "MAIL", MailSubmitted)

    # Lose the final marker: the next pass looks the message up and publishes again.
    kv = await harness.js.key_value(KV_PENDING)
    again = PendingRecord(
        mailgate_id=event.message.mailgate_id,
        postal_id=submitted.postal_id,
        token=submitted.postal_token,
        recipient="a@x.com",
        submitted_at=time.time() - 60,
    )
    await kv.put(event.message.mailgate_id, msgspec.json.encode(again))
    await eventually(
        lambda: replica.metric("mailgate_postal_reconcile_checks_total", outcome="final") >= 2,
        what="second lookup",
    )
    events = await harness.postal_events()
    assert [e.event_id for e in events] == [f"rec-{event.message.mailgate_id}-Sent"]


async def test_a_final_webhook_spares_the_lookup(harness: Harness) -> None:
    replica = await harness.replica(reconcile_after_s=1.5)  # the webhook comes well before
    with_webhook, without = accepted(), accepted()
    await publish_event(harness.js, with_webhook)
    (submitted,) = await eventually(
        lambda: harness.fetch("mail.submitted", "MAIL", MailSubmitted), what="submitted"
    )
    # What webhook-ingest publishes when Postal's webhook arrives in time.
    await publish_event(
        harness.js,
        PostalEvent(
            event_id=f"uuid-{new_ulid()}",
            event="MessageSent",
            postal_timestamp=time.time(),
            mailgate_id=with_webhook.message.mailgate_id,
            postal_id=submitted.postal_id,
            status="Sent",
        ),
    )
    await eventually(
        lambda: _final(harness.pending(with_webhook.message.mailgate_id)), what="final marker"
    )
    await publish_event(harness.js, without)

    async def reconciled() -> bool:
        events = await harness.postal_events()
        return any(e.event_id.startswith(f"rec-{without.message.mailgate_id}") for e in events)

    await eventually(reconciled, timeout=15, what="the other message reconciled")
    # The pass publishes the recovered event before it counts its outcomes.
    await eventually(
        lambda: replica.metric("mailgate_postal_reconcile_checks_total", outcome="final") >= 1,
        what="the pass's outcomes counted",
    )
    assert replica.metric("mailgate_postal_reconcile_checks_total", outcome="final") == 1
    assert replica.metric("mailgate_postal_finalized_total") >= 1
    rec_ids = [e.event_id for e in await harness.postal_events() if e.event_id.startswith("rec-")]
    assert rec_ids == [f"rec-{without.message.mailgate_id}-Sent"]


async def _final(record_coro) -> bool:
    record = await record_coro
    return record is not None and record.final


async def test_a_message_postal_does_not_know_is_given_up(harness: Harness) -> None:
    replica = await harness.replica()
    kv = await harness.js.key_value(KV_PENDING)
    mailgate_id = new_ulid()
    lost = PendingRecord(
        mailgate_id=mailgate_id, postal_id=424242, token="x" * 16, submitted_at=time.time() - 60
    )
    await kv.put(mailgate_id, msgspec.json.encode(lost))

    await eventually(
        lambda: replica.metric("mailgate_postal_reconcile_checks_total", outcome="not_found") == 1,
        what="lookup",
    )
    record = await eventually(lambda: _final(harness.pending(mailgate_id)), what="given up")
    assert record
    assert await harness.postal_events() == []


async def test_a_final_marker_written_first_wins_over_the_pending_record(js) -> None:
    kv = await ensure_bucket(js, KV_PENDING, 3600)
    mailgate_id = new_ulid()
    await mark_final(kv, mailgate_id, mailgate_id, "MessageSent")
    created = await create_pending(
        kv, mailgate_id, PendingRecord(mailgate_id=mailgate_id, postal_id=1, submitted_at=1.0)
    )
    assert created is False
    entry = await kv.get(mailgate_id)
    assert msgspec.json.decode(entry.value, type=PendingRecord).final


async def test_one_replica_leads_and_another_takes_over_when_it_stops(harness: Harness) -> None:
    first = await harness.replica(reconcile_interval_s=0.1)
    second = await harness.replica(reconcile_interval_s=0.1)

    def leaders() -> list[Replica]:
        return [r for r in (first, second) if r.metric("mailgate_postal_reconciler_leader") == 1]

    (leader,) = await eventually(lambda: len(leaders()) == 1 and leaders(), what="one leader")
    follower = second if leader is first else first
    await leader.service.stop()
    harness.replicas.remove(leader)
    await eventually(
        lambda: follower.metric("mailgate_postal_reconciler_leader") == 1,
        timeout=10,
        what="takeover",
    )


async def test_a_dead_leaders_lock_expires_and_is_taken(js) -> None:
    kv = await ensure_bucket(js, "postal-sender-locks-test", 1.0)
    dead = LeaderLock(kv, "reconciler", "dead", ttl_s=1.0)
    alive = LeaderLock(kv, "reconciler", "alive", ttl_s=1.0)
    assert await dead.step()
    assert not await alive.step()
    # ``dead`` never renews (as if kill -9'd): its key expires with the bucket TTL.
    await eventually(alive.step, timeout=10, interval=0.2, what="lock taken after expiry")
    assert not await dead.step()  # its compare-and-set fails: it knows it lost
    assert alive.is_leader and not dead.is_leader


async def test_the_whole_path_with_webhooks_flowing_needs_no_reconciliation(js, nats_url) -> None:
    """mail.accepted -> postal-sender -> sandbox -> signed webhook -> webhook-ingest ->
    postal.MessageSent; the final marker then spares the reconciler any lookup."""
    from mailgate_webhook_ingest.app import Settings as IngestSettings
    from mailgate_webhook_ingest.app import build as build_ingest

    port = free_port()
    sandbox = PostalSandbox(
        [KEY], f"http://127.0.0.1:{port}/api/v1/webhook", domains=[DOMAIN], retry_factor=0.001
    )
    ingest = await build_ingest(
        IngestSettings(
            nats_url=nats_url,
            webhook_host="127.0.0.1",
            webhook_port=port,
            postal_webhook_public_key=sandbox.public_key_b64(),
            domain=DOMAIN,
        ),
        registry=CollectorRegistry(),
    )
    await ingest.start()
    h = Harness(js, nats_url, sandbox)
    try:
        replica = await h.replica(reconcile_after_s=2.0)
        events = [accepted("a@x.com"), accepted("bounce@x.com")]
        for event in events:
            await publish_event(js, event)

        async def three() -> list[PostalEvent] | None:
            got = await h.postal_events()
            return got if len(got) == 3 else None

        got = await eventually(three, timeout=15, what="Sent, Sent, Bounced")
        assert sorted(e.event for e in got) == ["MessageBounced", "MessageSent", "MessageSent"]
        assert {e.mailgate_id for e in got} == {e.message.mailgate_id for e in events}
        assert all(not e.event_id.startswith("rec-") for e in got)
        for event in events:
            await eventually(lambda e=event: _final(h.pending(e.message.mailgate_id)))
        await eventually(
            lambda: (
                replica.metric("mailgate_postal_pending_final") == 0
                and replica.metric("mailgate_postal_reconciler_leader") == 1
            ),
            what="a pass with nothing pending",
        )
        assert {r["path"] for r in sandbox.requests} == {"/api/v1/send/raw"}
    finally:
        await h.stop()
        await ingest.stop()
