"""The ledger's lean pull worker, its one-write publishes and the outbox's atomic STATUS
batches, against a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from mailgate_core import nats_wire
from mailgate_core import schemas as s
from mailgate_core.nats import Ack, Nak, Outcome, Term, publish_event
from mailgate_fakes.testing import eventually
from mailgate_ledger.outbox import OutboxRow, _AckPipeline
from mailgate_ledger.pull import LeanPullWorker
from nats.aio.msg import Msg


def _worker(js, nc, handle, **options) -> LeanPullWorker:  # type: ignore[no-untyped-def]
    values = {"batch": 8, "fetch_timeout_s": 0.5, "sync_acks": False} | options
    return LeanPullWorker(js, "TRACK", "t", "track.>", handle, nc=nc, **values)


async def _consumer(js):  # type: ignore[no-untyped-def]
    return await js.consumer_info("TRACK", "t")


async def test_a_backlog_is_fetched_in_batches_and_acked_after_each_batch_returns(js, nc) -> None:
    for n in range(20):
        await publish_event(js, s.TrackOpen(mailgate_id=f"m{n}"))
    sizes: list[int] = []
    ids: list[str] = []
    release = asyncio.Event()

    async def handle(msgs: Sequence[Msg]) -> list[Outcome]:
        sizes.append(len(msgs))
        ids.extend(s.decode_subject(m.subject, m.data).mailgate_id for m in msgs)  # type: ignore[attr-defined]
        await release.wait()
        return [Ack()] * len(msgs)

    worker = _worker(js, nc, handle)
    await worker.start()
    try:
        await eventually(lambda: len(sizes) == 1, what="first batch in hand")
        held = await _consumer(js)  # nothing is acked while the handler runs
        assert held.num_ack_pending == 8
        release.set()
        await eventually(lambda: len(ids) == 20, what="the whole backlog")

        async def settled() -> bool:
            info = await _consumer(js)
            return info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(settled, what="every message acked")
    finally:
        await worker.stop()
    assert sizes[:2] == [8, 8] and sum(sizes) == 20
    assert sorted(ids) == sorted(f"m{n}" for n in range(20))


async def test_a_message_published_while_the_fetch_waits_is_handed_over_at_once(js, nc) -> None:
    got: list[float] = []

    async def handle(msgs: Sequence[Msg]) -> list[Outcome]:
        got.extend(time.monotonic() for _ in msgs)
        return [Ack()] * len(msgs)

    worker = _worker(js, nc, handle, fetch_timeout_s=5.0)
    await worker.start()
    try:
        await asyncio.sleep(0.3)  # the worker now waits in a pull request on an empty stream
        sent = time.monotonic()
        await publish_event(js, s.TrackOpen(mailgate_id="late"))
        await eventually(lambda: len(got) == 1, timeout=5, what="the late message")
    finally:
        await worker.stop()
    assert got[0] - sent < 2.0  # not held until the request expires


async def test_naks_and_terms_are_settled_one_by_one_and_a_nak_is_redelivered(js, nc) -> None:
    for n in range(3):
        await publish_event(js, s.TrackOpen(mailgate_id=f"x{n}"))
    deliveries: dict[str, int] = {}

    async def handle(msgs: Sequence[Msg]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for msg in msgs:
            mid = s.decode_subject(msg.subject, msg.data).mailgate_id  # type: ignore[attr-defined]
            deliveries[mid] = deliveries.get(mid, 0) + 1
            if mid == "x1" and deliveries[mid] == 1:
                outcomes.append(Nak(0.05))
            elif mid == "x2":
                outcomes.append(Term("poison"))
            else:
                outcomes.append(Ack())
        return outcomes

    worker = _worker(js, nc, handle)
    await worker.start()
    try:
        await eventually(lambda: deliveries.get("x1") == 2, what="the nak'ed message again")

        async def settled() -> bool:
            info = await _consumer(js)
            return info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(settled, what="all settled")
    finally:
        await worker.stop()
    assert deliveries == {"x0": 1, "x1": 2, "x2": 1}


async def test_stop_settles_the_batch_in_hand(js, nc) -> None:
    for n in range(4):
        await publish_event(js, s.TrackOpen(mailgate_id=f"s{n}"))
    started = asyncio.Event()
    handled: list[int] = []

    async def handle(msgs: Sequence[Msg]) -> list[Outcome]:
        started.set()
        await asyncio.sleep(0.2)
        handled.append(len(msgs))
        return [Ack()] * len(msgs)

    worker = _worker(js, nc, handle)
    await worker.start()
    await asyncio.wait_for(started.wait(), 5)
    await worker.stop()
    assert handled == [4]

    async def acked() -> bool:
        info = await _consumer(js)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(acked, what="the batch in hand acked on stop")


async def test_one_write_publishes_are_stored_once_per_message_id(js, nc) -> None:
    payload = s.encode(s.TrackOpen(mailgate_id="w1"))
    inbox = nc.new_inbox()
    replies: list[Msg] = []

    async def on_reply(msg: Msg) -> None:
        replies.append(msg)

    await nc.subscribe(inbox + ".*", cb=on_reply)
    commands = [
        nats_wire.publish_command("track.open", f"{inbox}.{n}", payload, ("Nats-Msg-Id", "same-id"))
        for n in range(3)
    ]
    commands.append(
        nats_wire.publish_command("track.open", f"{inbox}.9", payload, ("Nats-Msg-Id", "other-id"))
    )
    assert await nats_wire.write(nc, b"".join(commands))
    await eventually(lambda: len(replies) == 4, what="four publish acks")
    info = await js.stream_info("TRACK")
    assert info.state.messages == 2  # the three "same-id" publishes are one message
    stored = await js.get_msg("TRACK", 1)
    assert stored.data == payload
    assert stored.headers is not None and stored.headers["Nats-Msg-Id"] == "same-id"


def test_protocol_commands_are_well_formed() -> None:
    assert nats_wire.ack_command("$JS.ACK.S.c.1.2.3.4.0") == b"PUB $JS.ACK.S.c.1.2.3.4.0 0\r\n\r\n"
    header = b"NATS/1.0\r\nNats-Msg-Id: st-1\r\n\r\n"
    msg_id = ("Nats-Msg-Id", "st-1")
    assert nats_wire.publish_command("status.sent", "_INBOX.a.1", b"{}", msg_id) == (
        b"HPUB status.sent _INBOX.a.1 %d %d\r\n%s{}\r\n" % (len(header), len(header) + 2, header)
    )
    assert nats_wire.is_plain_token("st-01HXYZ") and nats_wire.is_plain_token("status.sent")
    assert not any(nats_wire.is_plain_token(v) for v in ("", "a b", "a\r\nb", "a\tb"))


def _rows(ids: Sequence[str]) -> list[OutboxRow]:
    return [
        OutboxRow(n, "status.sent", f"st-{event_id}", b'{"n":%d}' % n)
        for n, event_id in enumerate(ids)
    ]


async def test_status_events_go_out_as_one_atomic_batch_stored_once(js, nc) -> None:
    pipeline = _AckPipeline(nc)
    rows = _rows([f"a{n}" for n in range(300)])  # two batches (ATOMIC_BATCH_MAX = 256)
    assert await pipeline.publish(rows, timeout_s=5) == [True] * 300
    info = await js.stream_info("STATUS")
    assert info.state.messages == 300
    first = await js.get_msg("STATUS", 1)
    assert first.headers is not None and first.headers["Nats-Msg-Id"] == "st-a0"
    assert "Nats-Batch-Id" in first.headers  # stored through an atomic batch
    # A republish (the outbox loop after a crash) with some ids stored already: JetStream
    # refuses the atomic batch, each event then goes alone and is de-duplicated.
    again = _rows(["a5", "b1", "a7", "b2"])
    assert await pipeline.publish(again, timeout_s=5) == [True] * 4
    info = await js.stream_info("STATUS")
    assert info.state.messages == 302


async def test_without_atomic_publishing_on_the_stream_each_event_is_published(js, nc) -> None:
    from nats.js.api import StreamConfig

    config = (await js.stream_info("STATUS")).config
    await js.delete_stream("STATUS")
    await js.add_stream(
        StreamConfig(
            name="STATUS",
            subjects=config.subjects,
            storage=config.storage,
            duplicate_window=config.duplicate_window,
        )
    )
    pipeline = _AckPipeline(nc)
    assert await pipeline.publish(_rows(["c1", "c2", "c3"]), timeout_s=5) == [True] * 3
    assert await pipeline.publish(_rows(["c1", "c4"]), timeout_s=5) == [True, True]
    info = await js.stream_info("STATUS")
    assert info.state.messages == 4
    stored = await js.get_msg("STATUS", 1)
    assert stored.headers is not None and "Nats-Batch-Id" not in stored.headers
