"""The ledger's pull worker keeps its pull requests open: a fact below saturation costs no
pull request (nor a "no messages" answer) of its own; requests are renewed when they expire
or are lost with a server restart; a stop leaves nothing delivered unsettled."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mailgate_core import schemas as s
from mailgate_core.nats import Ack, Outcome, publish_event
from mailgate_fakes.testing import eventually
from mailgate_ledger.pull import LeanPullWorker
from nats.aio.msg import Msg

NEXT_REQUESTS = "$JS.API.CONSUMER.MSG.NEXT.TRACK.t"


def _worker(js, nc, handle, **options) -> LeanPullWorker:  # type: ignore[no-untyped-def]
    values = {"batch": 16, "fetch_timeout_s": 1.0, "sync_acks": False} | options
    return LeanPullWorker(js, "TRACK", "t", "track.>", handle, nc=nc, **values)


async def _watch(nc, subject: str) -> list[Msg]:  # type: ignore[no-untyped-def]
    seen: list[Msg] = []

    async def note(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe(subject, cb=note)
    await nc.flush()
    return seen


async def _all_acked(js, last_seq: int) -> bool:  # type: ignore[no-untyped-def]
    info = await js.consumer_info("TRACK", "t")
    return bool(
        info.num_ack_pending == 0
        and info.num_pending == 0
        and info.ack_floor.stream_seq == last_seq
    )


async def test_a_trickle_of_facts_costs_no_pull_request_and_no_answer_each(js, nc) -> None:
    handled: list[str] = []

    async def handle(msgs: Sequence[Msg]) -> list[Outcome]:
        handled.extend(s.decode_subject(m.subject, m.data).mailgate_id for m in msgs)  # type: ignore[attr-defined]
        return [Ack()] * len(msgs)

    requests = await _watch(nc, NEXT_REQUESTS)
    worker = _worker(js, nc, handle, batch=64)
    await worker.start()
    answers = await _watch(nc, f"{worker._inbox}.*")  # the worker's inbox: messages + statuses
    try:
        for n in range(30):  # one at a time, each handled before the next is published
            await publish_event(js, s.TrackOpen(mailgate_id=f"m{n}"))
            await eventually(lambda n=n: len(handled) == n + 1, timeout=5, what=f"fact {n}")
        await eventually(lambda: _all_acked(js, 30), what="all acked")
    finally:
        await worker.stop()
    assert handled == [f"m{n}" for n in range(30)]
    # A no-wait request per batch cost 30 requests and 30 "no messages" answers here.
    assert len(requests) <= 2, [r.data for r in requests]
    assert worker.requests_sent == len(requests)
    statuses = [m for m in answers if m.headers and "Status" in m.headers]
    assert len(statuses) <= 2, [m.headers for m in statuses]


async def test_a_backlog_asks_for_the_batch_slots_and_no_more(js, nc) -> None:
    for n in range(100):
        await publish_event(js, s.TrackOpen(mailgate_id=f"b{n}"))
    release = asyncio.Event()
    sizes: list[int] = []

    async def handle(msgs: Sequence[Msg]) -> list[Outcome]:
        sizes.append(len(msgs))
        await release.wait()
        return [Ack()] * len(msgs)

    handle.batches_in_flight = 2  # type: ignore[attr-defined]
    worker = _worker(js, nc, handle)
    await worker.start()
    try:
        await eventually(lambda: len(sizes) == 2, what="two batches in hand")
        info = await js.consumer_info("TRACK", "t")
        assert info.num_ack_pending == 32  # two batches of 16, nothing prefetched beyond
        release.set()
        await eventually(lambda: _all_acked(js, 100), what="the backlog acked")
    finally:
        await worker.stop()
    assert sum(sizes) == 100 and sizes[:2] == [16, 16]
    assert worker.requests_sent <= 100 // 16 + 2


async def test_an_expired_request_is_renewed_and_still_hands_a_fact_over(js, nc) -> None:
    handled: list[str] = []

    async def handle(msgs: Sequence[Msg]) -> list[Outcome]:
        handled.extend(s.decode_subject(m.subject, m.data).mailgate_id for m in msgs)  # type: ignore[attr-defined]
        return [Ack()] * len(msgs)

    requests = await _watch(nc, NEXT_REQUESTS)
    worker = _worker(js, nc, handle, fetch_timeout_s=0.2)
    await worker.start()
    try:
        await eventually(lambda: len(requests) >= 3, timeout=5, what="renewed requests")
        await publish_event(js, s.TrackOpen(mailgate_id="late"))
        await eventually(lambda: handled == ["late"], timeout=3, what="handled after expiries")
    finally:
        await worker.stop()


async def test_requests_lost_with_a_server_restart_are_asked_for_again(js, nc, nats_server) -> None:
    handled: list[str] = []

    async def handle(msgs: Sequence[Msg]) -> list[Outcome]:
        handled.extend(s.decode_subject(m.subject, m.data).mailgate_id for m in msgs)  # type: ignore[attr-defined]
        return [Ack()] * len(msgs)

    worker = _worker(js, nc, handle, fetch_timeout_s=30.0)  # lost, not expired, here
    await worker.start()
    try:
        await publish_event(js, s.TrackOpen(mailgate_id="before"))
        await eventually(lambda: handled == ["before"], what="before the restart")
        nats_server.restart()

        async def published() -> bool:
            try:
                await publish_event(js, s.TrackOpen(mailgate_id="after"))
            except Exception:  # reconnecting, JetStream not ready yet
                return False
            return True

        await eventually(published, timeout=20, what="published after the restart")
        await eventually(lambda: "after" in handled, timeout=10, what="after the restart")
    finally:
        await worker.stop()


async def test_a_stop_settles_the_batch_in_hand_and_naks_what_was_never_handed_out(js, nc) -> None:
    for n in range(40):
        await publish_event(js, s.TrackOpen(mailgate_id=f"s{n}"))
    started = asyncio.Event()
    handled: list[int] = []

    async def handle(msgs: Sequence[Msg]) -> list[Outcome]:
        started.set()
        await asyncio.sleep(0.2)
        handled.append(len(msgs))
        return [Ack()] * len(msgs)

    handle.batches_in_flight = 1  # type: ignore[attr-defined]
    worker = _worker(js, nc, handle, batch=16)
    await worker.start()
    await asyncio.wait_for(started.wait(), 5)
    await worker.stop()
    assert handled == [16]

    async def settled() -> bool:
        info = await js.consumer_info("TRACK", "t")
        # 16 acked; whatever else was delivered was nak'ed (pending again), not held.
        return info.num_ack_pending == 0 and info.ack_floor.stream_seq == 16

    await eventually(settled, what="the batch in hand acked, the rest released")
