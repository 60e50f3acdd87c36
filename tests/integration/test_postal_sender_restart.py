"""postal-sender across a nats-server restart (file storage): its pull requests are lost with
the connection and asked for again; nothing accepted is lost, nothing is sent twice, and the
final-marker consumer keeps working."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from mailgate_core.config import Secret
from mailgate_core.ids import new_ulid
from mailgate_core.nats import publish_event
from mailgate_core.schemas import Event, MailAccepted, MailSubmitted, PostalEvent
from mailgate_fakes.infra import NatsServer, free_port
from mailgate_fakes.postal import PostalSandbox
from mailgate_fakes.testing import consumer_settled, eventually, mail_accepted, stored_events
from mailgate_postal_sender.app import PostalSenderService, Settings, build
from mailgate_postal_sender.pending import KV_PENDING, decode_record
from prometheus_client import CollectorRegistry

KEY = "N" * 24
DOMAIN = "ours.example"


def accepted() -> MailAccepted:
    return mail_accepted(DOMAIN)


@pytest.fixture
async def sandbox() -> AsyncIterator[PostalSandbox]:
    async with PostalSandbox([KEY], domains=[DOMAIN]).serving() as box:
        yield box


@pytest.fixture
async def service(nats_url: str, sandbox: PostalSandbox) -> AsyncIterator[PostalSenderService]:
    settings = Settings(
        nats_url=nats_url,
        postal_api_url=sandbox.base_url,
        postal_api_key=Secret(KEY),
        ops_host="127.0.0.1",
        ops_port=free_port(),
        reconcile_enabled=False,
        retry_base_s=0.05,
        postal_timeout_s=5.0,
    )
    svc = await build(settings, registry=CollectorRegistry())
    await svc.start()
    yield svc
    await svc.stop()


async def _published(js, event: Event) -> bool:  # type: ignore[no-untyped-def]
    try:
        await publish_event(js, event, timeout=1.0)
    except Exception:  # reconnecting, JetStream not ready yet
        return False
    return True


async def test_a_nats_restart_loses_nothing_and_sends_nothing_twice(
    js, nats_server: NatsServer, sandbox: PostalSandbox, service: PostalSenderService
) -> None:
    before = [accepted() for _ in range(10)]
    for event in before:
        await publish_event(js, event)
    await eventually(lambda: len(sandbox.messages) == 10, timeout=15, what="sent before")

    nats_server.restart()

    after = [accepted() for _ in range(10)]
    for event in after:
        await eventually(lambda e=event: _published(js, e), timeout=30, what="published after")
    everything = before + after
    await eventually(
        lambda: len(sandbox.messages) >= len(everything), timeout=30, what="sent after restart"
    )
    await eventually(
        lambda: consumer_settled(js, "MAIL", "postal-sender"), timeout=30, what="all acked"
    )
    ids = sorted(str(m["message_id"]).split("@")[0] for m in sandbox.messages)
    assert ids == sorted(e.message.mailgate_id for e in everything)  # each exactly once
    submitted = await stored_events(js, "mail.submitted", "MAIL", MailSubmitted)
    assert sorted(s.message.mailgate_id for s in submitted) == ids

    # The final-marker consumer came back too.
    mailgate_id = after[0].message.mailgate_id
    final = PostalEvent(
        event_id=new_ulid(),
        event="MessageSent",
        postal_timestamp=time.time(),
        mailgate_id=mailgate_id,
        status="Sent",
    )
    await eventually(lambda: _published(js, final), timeout=10, what="postal event published")

    async def marked() -> bool:
        pending = await js.key_value(KV_PENDING)
        record = decode_record((await pending.get(mailgate_id)).value)
        return record is not None and record.final

    await eventually(marked, timeout=15, what="final marker after the restart")
