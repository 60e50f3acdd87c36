"""postal-sender's cheap paths: unconfirmed acks, the account key cache; libs' eager fetches.

Acks of ``mail.accepted`` go out without waiting for the server's confirmation (after the
message's output is durable). A lost ack must only cost a redelivery that the submission
record answers: Postal once, ``mail.submitted`` once, counted as replayed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
from mailgate_core.config import Secret
from mailgate_core.nats import Ack, PullWorker, publish_event
from mailgate_core.records import AccountRecord
from mailgate_core.schemas import MailAccepted, MailSubmitted
from mailgate_fakes.infra import free_port
from mailgate_fakes.postal import PostalSandbox
from mailgate_fakes.testing import consumer_settled, eventually, mail_accepted, stored_events
from mailgate_postal_sender.app import Settings, build
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

KEY = "F" * 24
ACCOUNT_KEY = "G" * 24
NEW_ACCOUNT_KEY = "H" * 24
DOMAIN = "ours.example"


def accepted(account_id: str = "acc1") -> MailAccepted:
    return mail_accepted(DOMAIN, account_id=account_id, postal_api_key_ref=account_id)


@pytest.fixture
async def sandbox() -> AsyncIterator[PostalSandbox]:
    box = PostalSandbox([KEY, ACCOUNT_KEY, NEW_ACCOUNT_KEY], domains=[DOMAIN])
    async with box.serving():
        yield box


@pytest.fixture
async def service_factory(nats_url: str, sandbox: PostalSandbox) -> AsyncIterator:
    started = []

    async def start(**overrides):
        values = {
            "nats_url": nats_url,
            "postal_api_url": sandbox.base_url,
            "postal_api_key": Secret(KEY),
            "ops_host": "127.0.0.1",
            "ops_port": free_port(),
            "reconcile_enabled": False,
            "retry_base_s": 0.05,
            "postal_timeout_s": 2.0,
            **overrides,
        }
        registry = CollectorRegistry()
        service = await build(Settings(**values), registry=registry)
        await service.start()
        started.append(service)
        return service, registry

    yield start
    for service in started:
        await service.stop()


async def put_account(js, account_id: str, postal_api_key: str) -> None:
    kv = await js.key_value("accounts")
    record = AccountRecord(id=account_id, name=account_id, postal_api_key=postal_api_key)
    await kv.put(account_id, msgspec.json.encode(record))


async def submitted(js) -> list[MailSubmitted]:
    return await stored_events(js, "mail.submitted", "MAIL", MailSubmitted, limit=100)


async def settled(js) -> bool:
    return await consumer_settled(js, "MAIL", "postal-sender")


async def test_a_lost_ack_costs_a_replay_never_a_second_submission(
    js, sandbox: PostalSandbox, service_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ack after a durable ``mail.submitted`` never reaches JetStream (as when the
    process dies right after sending it): the redelivery is answered from the record."""
    await put_account(js, "acc1", ACCOUNT_KEY)
    original = Msg.ack
    dropped: list[str] = []

    async def lossy_ack(self: Msg) -> None:
        if self.subject == "mail.accepted" and not dropped:
            dropped.append(self.subject)  # lost on the way: JetStream never hears of it
            return
        await original(self)

    monkeypatch.setattr(Msg, "ack", lossy_ack)
    event = accepted()
    await publish_event(js, event)
    _service, registry = await service_factory(ack_wait_s=1.0)

    def replayed() -> float:
        return registry.get_sample_value("mailgate_postal_replayed_total") or 0.0

    await eventually(lambda: replayed() >= 1.0, timeout=15, what="redelivery replayed")
    await eventually(lambda: settled(js), timeout=10, what="consumer settled")
    assert dropped == ["mail.accepted"]
    assert [m["message_id"] for m in sandbox.messages] == [f"{event.message.mailgate_id}@{DOMAIN}"]
    assert [r["path"] for r in sandbox.requests] == ["/api/v1/send/raw"]
    (out,) = await submitted(js)
    assert (out.message.mailgate_id, out.postal_id) == (
        event.message.mailgate_id,
        sandbox.messages[0]["id"],
    )
    assert registry.get_sample_value("mailgate_postal_submitted_total") == 1.0
    assert (registry.get_sample_value("mailgate_postal_ambiguous_retries_total") or 0.0) == 0.0


async def test_many_messages_with_unconfirmed_acks_are_each_sent_once(
    js, sandbox: PostalSandbox, service_factory
) -> None:
    await put_account(js, "acc1", ACCOUNT_KEY)
    events = [accepted() for _ in range(60)]
    for event in events:
        await publish_event(js, event)
    await service_factory()

    async def all_done() -> bool:
        return len(sandbox.messages) >= len(events) and await settled(js)

    await eventually(all_done, timeout=30, what="all sent and acked")
    ids = sorted(m["message_id"].split("@")[0] for m in sandbox.messages)
    assert ids == sorted(e.message.mailgate_id for e in events)
    assert len(await submitted(js)) == len(events)


async def test_the_account_key_is_cached_for_account_cache_s(
    js, sandbox: PostalSandbox, service_factory
) -> None:
    await put_account(js, "acc1", ACCOUNT_KEY)
    await service_factory(account_cache_s=1.0)
    await publish_event(js, accepted())
    await eventually(lambda: len(sandbox.messages) == 1, timeout=10, what="first sent")
    await put_account(js, "acc1", NEW_ACCOUNT_KEY)
    changed_at = time.monotonic()
    await publish_event(js, accepted())
    await eventually(lambda: len(sandbox.messages) == 2, timeout=10, what="second sent")
    if time.monotonic() - changed_at < 0.9:  # within the cache period: the key read before
        assert sandbox.messages[1]["api_key"] == ACCOUNT_KEY
    await asyncio.sleep(1.1)  # the cache period is the behaviour under test
    await publish_event(js, accepted())
    await eventually(lambda: len(sandbox.messages) == 3, timeout=10, what="third sent")
    assert [m["api_key"] for m in sandbox.messages][0::2] == [ACCOUNT_KEY, NEW_ACCOUNT_KEY]


async def test_a_missing_account_is_not_cached(js, sandbox: PostalSandbox, service_factory) -> None:
    await service_factory(account_cache_s=60.0)
    await publish_event(js, accepted("acc-late"))

    async def retried() -> bool:
        info = await js.consumer_info("MAIL", "postal-sender")
        return (info.num_redelivered or 0) >= 1

    await eventually(retried, timeout=10, what="retried while the account is unknown")
    assert not sandbox.messages
    await put_account(js, "acc-late", ACCOUNT_KEY)  # the ledger wrote it late
    await eventually(lambda: len(sandbox.messages) == 1, timeout=15, what="sent once known")
    assert sandbox.messages[0]["api_key"] == ACCOUNT_KEY


async def test_eager_fetches_hand_over_one_message_at_once_and_top_up_a_backlog(js) -> None:
    """``PullWorker(eager=True)`` (postal-sender's fetches before its standing pull requests,
    ``mailgate_core.flow``): a lone message is handled at once although the batch is 64, and
    a backlog still comes in batches."""
    handled: list[tuple[float, int]] = []

    async def handle(msgs):
        handled.extend((time.monotonic(), len(msgs)) for _ in msgs)
        return [Ack() for _ in msgs]

    def eager_worker() -> PullWorker:
        return PullWorker(
            js,
            stream="MAIL",
            durable="eager-test",
            filter_subject="mail.accepted",
            handle_batch=handle,
            batch=64,
            fetch_timeout_s=5.0,
            eager=True,
        )

    worker = eager_worker()
    await worker.start()
    try:
        published = time.monotonic()
        await publish_event(js, accepted())
        await eventually(lambda: len(handled) == 1, timeout=10, what="handled")
        assert handled[0][0] - published < 1.0
        await worker.stop()  # a backlog builds up while nobody fetches
        events = [accepted() for _ in range(40)]
        await asyncio.gather(*(publish_event(js, e) for e in events))
        worker = eager_worker()
        await worker.start()
        await eventually(lambda: len(handled) == 41, timeout=10, what="backlog handled")
        assert max(size for _, size in handled[1:]) > 1  # the top-up took the rest
        info = await js.consumer_info("MAIL", "eager-test")
        assert (info.num_pending, info.num_redelivered) == (0, 0)
    finally:
        await worker.stop()
