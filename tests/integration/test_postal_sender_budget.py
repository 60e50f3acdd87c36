"""postal-sender's NATS message budget per mail, as nats-server counts it (``/connz`` in + out
on the service's connection).

A submitted mail costs: its delivery, the submission record's get and put, the pending
record's create and the ``mail.submitted`` publish (each a request and its answer), its ack:
ten messages. A final postal.* event costs its delivery, the final marker's put and its
answer, its ack: four. What the pull requests add on top is the part these budgets bound:
below saturation (one mail at a time, the e2e pipeline's usual state) and in a backlog.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator

import pytest
from mailgate_core.config import Secret
from mailgate_core.ids import new_ulid
from mailgate_core.nats import publish_event
from mailgate_core.schemas import MailAccepted, MailSubmitted, PostalEvent
from mailgate_fakes.infra import NatsServer, free_port
from mailgate_fakes.postal import PostalSandbox
from mailgate_fakes.testing import consumer_settled, eventually, mail_accepted, stored_events
from mailgate_postal_sender.app import PostalSenderService, Settings, build
from mailgate_postal_sender.pending import KV_PENDING, decode_record
from prometheus_client import CollectorRegistry

KEY = "K" * 24
DOMAIN = "ours.example"
NAME = "postal-sender-budget"
#: The fixed messages of one submitted mail and of one final postal.* event (docstring).
SEND_FIXED = 10
FINAL_FIXED = 4
#: What pull requests (and their "no messages"/"timeout" answers) may add per mail / event.
TRICKLE_PULL_BUDGET = 0.5
BACKLOG_PULL_BUDGET = 0.5
FINAL_TRICKLE_PULL_BUDGET = 0.5


def accepted() -> MailAccepted:
    return mail_accepted(DOMAIN)


def sent_event(mailgate_id: str, postal_id: int) -> PostalEvent:
    return PostalEvent(
        event_id=new_ulid(),
        event="MessageSent",
        postal_timestamp=time.time(),
        mailgate_id=mailgate_id,
        postal_id=postal_id,
        postal_token="t" * 16,
        status="Sent",
    )


def connection_messages(server: NatsServer) -> int:
    """Messages in + out of the service's connection so far."""
    url = f"http://127.0.0.1:{server.monitor_port}/connz?limit=1024"
    with urllib.request.urlopen(url, timeout=5) as resp:
        conns = json.loads(resp.read())["connections"]
    return sum(int(c["in_msgs"]) + int(c["out_msgs"]) for c in conns if c.get("name") == NAME)


@pytest.fixture
async def sandbox() -> AsyncIterator[PostalSandbox]:
    async with PostalSandbox([KEY], domains=[DOMAIN]).serving() as box:
        yield box


@pytest.fixture
async def service(nats_url: str, sandbox: PostalSandbox) -> AsyncIterator[PostalSenderService]:
    settings = Settings(
        service_name=NAME,
        nats_url=nats_url,
        postal_api_url=sandbox.base_url,
        postal_api_key=Secret(KEY),
        ops_host="127.0.0.1",
        ops_port=free_port(),
        reconcile_enabled=False,
        consumer_lag_interval_s=0.0,  # no consumer-info requests in the counts
        postal_timeout_s=5.0,
    )
    svc = await build(settings, registry=CollectorRegistry())
    await svc.start()
    yield svc
    await svc.stop()


async def _send_settled(js) -> bool:  # type: ignore[no-untyped-def]
    return await consumer_settled(js, "MAIL", "postal-sender")


async def _final_settled(js) -> bool:  # type: ignore[no-untyped-def]
    return await consumer_settled(js, "POSTAL", "postal-sender-final")


async def test_a_mail_costs_ten_messages_plus_a_bounded_share_of_pull_requests(
    js, nats_server: NatsServer, sandbox: PostalSandbox, service: PostalSenderService
) -> None:
    await publish_event(js, accepted())  # warm-up: connections, caches
    await eventually(lambda: len(sandbox.messages) == 1, what="warm-up sent")
    await eventually(lambda: _send_settled(js), what="warm-up acked")

    trickle = 20
    before = connection_messages(nats_server)
    for n in range(trickle):  # one at a time: each handled and acked before the next
        await publish_event(js, accepted())
        await eventually(lambda n=n: len(sandbox.messages) == n + 2, what=f"mail {n} sent")
        await eventually(lambda: _send_settled(js), what=f"mail {n} acked")
    per_mail = (connection_messages(nats_server) - before) / trickle
    assert SEND_FIXED <= per_mail <= SEND_FIXED + TRICKLE_PULL_BUDGET, per_mail

    backlog = 200
    before = connection_messages(nats_server)
    await asyncio.gather(*(publish_event(js, accepted()) for _ in range(backlog)))
    total = 1 + trickle + backlog
    await eventually(lambda: len(sandbox.messages) == total, timeout=30, what="backlog sent")
    await eventually(lambda: _send_settled(js), what="backlog acked")
    per_mail = (connection_messages(nats_server) - before) / backlog
    assert SEND_FIXED <= per_mail <= SEND_FIXED + BACKLOG_PULL_BUDGET, per_mail

    # Nothing was given up for it: each mail sent once and reported once.
    ids = sorted(str(m["message_id"]).split("@")[0] for m in sandbox.messages)
    assert len(ids) == len(set(ids)) == total
    submitted = await stored_events(js, "mail.submitted", "MAIL", MailSubmitted, limit=total + 10)
    assert len(submitted) == total


async def test_a_final_event_costs_four_messages_plus_a_bounded_share_of_pull_requests(
    js, nats_server: NatsServer, service: PostalSenderService
) -> None:
    await publish_event(js, sent_event(new_ulid(), 1))  # warm-up
    await eventually(lambda: _final_settled(js), what="warm-up marked")

    trickle = 20
    ids = [new_ulid() for _ in range(trickle)]
    before = connection_messages(nats_server)
    for n, mailgate_id in enumerate(ids):
        await publish_event(js, sent_event(mailgate_id, n + 2))
        await eventually(lambda: _final_settled(js), what=f"event {n} marked and acked")
    per_event = (connection_messages(nats_server) - before) / trickle
    assert FINAL_FIXED <= per_event <= FINAL_FIXED + FINAL_TRICKLE_PULL_BUDGET, per_event

    pending = await js.key_value(KV_PENDING)
    for mailgate_id in ids:
        record = decode_record((await pending.get(mailgate_id)).value)
        assert record is not None
        assert (record.final, record.final_event) == (True, "MessageSent")
