"""The suppression index (suppression_index.py): a Bloom filter of the ``suppressions``
bucket's keys that spares a KV get for recipients who are certainly not suppressed.

It must never rule out a key that is in the bucket: not one from the snapshot, not one put
later, not after NATS restarted (then it is distrusted until a new snapshot is complete)."""

from __future__ import annotations

import asyncio

from mailgate_core.nats import KV_SUPPRESSIONS
from mailgate_core.records import SuppressionRecord, suppression_key
from mailgate_core.schemas import MailAccepted, MailSkipped
from mailgate_fakes.testing import eventually
from mailgate_smtp_ingest.suppression_index import BloomFilter, SuppressionIndex
from test_smtp_ingest_service import (  # noqa: F401 - fixtures used by name
    ACCOUNT,
    PASSWORD,
    SENDER,
    USER,
    Factory,
    _put,
    connect,
    creds,
    make_message,
    reply,
    start_service,
    stream_events,
)


def record(email: str) -> SuppressionRecord:
    return SuppressionRecord(account_id=ACCOUNT, email=email, reason="unsubscribed", created_at=1)


def test_the_bloom_filter_has_no_false_negatives_and_few_false_positives() -> None:
    bloom = BloomFilter(10_000)
    keys = [f"acc.user{i}@example.org" for i in range(10_000)]
    for key in keys:
        bloom.add(key)
    assert all(key in bloom for key in keys)
    false_positives = sum(f"acc.other{i}@example.org" in bloom for i in range(10_000))
    assert false_positives < 300  # ~1% by design


async def test_the_index_rules_out_only_keys_it_knows_are_absent(nc, nats_server, js) -> None:
    kv = await js.key_value(KV_SUPPRESSIONS)
    early = suppression_key(ACCOUNT, "early@example.org")
    await kv.put(early, b"{}")
    index = SuppressionIndex(
        js, KV_SUPPRESSIONS, resync_s=300, reconnects=lambda: nc.stats["reconnects"]
    )
    assert not index.rules_out("acc.nobody@example.org")  # not started: no opinion
    await index.start()
    try:
        await eventually(lambda: index.trusted, timeout=10)
        assert index.rules_out(suppression_key(ACCOUNT, "nobody@example.org"))
        assert not index.rules_out(early)  # from the snapshot
        late = suppression_key(ACCOUNT, "late@example.org")
        await kv.put(late, b"{}")
        await eventually(lambda: not index.rules_out(late), timeout=10)  # a live update
        await kv.delete(early)
        assert not index.rules_out(early)  # deleted keys stay (a get answers for them)

        nats_server.restart()  # the watcher may not survive: distrusted at once
        await eventually(lambda: nc.stats["reconnects"] > 0, timeout=20)
        assert not index.trusted
        assert not index.rules_out(suppression_key(ACCOUNT, "nobody@example.org"))
    finally:
        await index.stop()


async def test_a_suppression_put_while_the_service_runs_skips_the_next_message(
    start_service: Factory,  # noqa: F811
    js,
) -> None:
    service = await start_service()
    index = service.directory.suppression_index if service.directory else None
    assert index is not None
    await eventually(lambda: index.trusted, timeout=10)
    key = suppression_key(ACCOUNT, "gone@example.org")
    assert index.rules_out(key)
    await _put(js, KV_SUPPRESSIONS, key, record("gone@example.org"))
    await eventually(lambda: not index.rules_out(key), timeout=10)

    def session() -> str:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            smtp.rcpt("gone@example.org")
            smtp.rcpt("ivan@example.org")
            return reply(smtp.data(make_message()))

    assert (await asyncio.to_thread(session)).startswith("250 2.0.0 Ok: queued as ")
    events = await stream_events(js)
    assert [e.message.recipient for e in events if isinstance(e, MailSkipped)] == [
        "gone@example.org"
    ]
    assert [e.message.recipient for e in events if isinstance(e, MailAccepted)] == [
        "ivan@example.org"
    ]
