"""ams-reporter's pull worker (``FlowWorker``): standing pull requests, one per several
messages, renewed when they expire or are lost with a server restart; a graceful stop
settles what is in hand."""

from __future__ import annotations

import asyncio

from mailgate_ams_reporter.worker import FlowWorker
from mailgate_core.nats import Ack, Outcome, per_message
from mailgate_fakes.testing import eventually
from nats.aio.msg import Msg

NEXT_REQUESTS = "$JS.API.CONSUMER.MSG.NEXT.TRACK.flow"


def _worker(js, handler, **options) -> FlowWorker:  # type: ignore[no-untyped-def]
    return FlowWorker(
        js,
        "TRACK",
        "flow",
        "track.>",
        per_message(handler),
        handler=handler,
        batch=64,
        concurrency=64,
        **options,
    )


async def _all_acked(js, last_seq: int) -> bool:  # type: ignore[no-untyped-def]
    info = await js.consumer_info("TRACK", "flow")
    return bool(
        info.num_ack_pending == 0
        and info.num_pending == 0
        and info.ack_floor.stream_seq == last_seq
    )


async def _count_pull_requests(nc) -> list[bytes]:  # type: ignore[no-untyped-def]
    seen: list[bytes] = []

    async def note(msg: Msg) -> None:
        seen.append(msg.data)

    await nc.subscribe(NEXT_REQUESTS, cb=note)
    await nc.flush()
    return seen


async def test_a_trickle_of_messages_costs_no_pull_request_each(js, nc) -> None:
    handled: list[bytes] = []

    async def handler(msg: Msg) -> Outcome:
        handled.append(msg.data)
        return Ack()

    requests = await _count_pull_requests(nc)
    worker = _worker(js, handler)
    await worker.start()
    try:
        for i in range(30):  # one at a time, each handled before the next is published
            await js.publish(f"track.t.{i}", str(i).encode())
            await eventually(lambda n=i: len(handled) == n + 1, timeout=5, what=f"message {i}")
        # One standing request served them all (nats-py's fetch asked once or more each).
        assert len(requests) <= 3, requests
        await eventually(lambda: worker.in_flight == 0, what="settled")
    finally:
        await worker.stop()
    assert handled == [str(i).encode() for i in range(30)]
    await eventually(lambda: _all_acked(js, 30), what="all acked")  # acks are not confirmed


async def test_an_expired_request_is_renewed(js, nc) -> None:
    handled: list[bytes] = []

    async def handler(msg: Msg) -> Outcome:
        handled.append(msg.data)
        return Ack()

    requests = await _count_pull_requests(nc)
    worker = _worker(js, handler, pull_expires_s=0.2)
    await worker.start()
    try:
        await eventually(lambda: len(requests) >= 3, timeout=5, what="renewed requests")
        await js.publish("track.t.late", b"late")
        await eventually(lambda: handled == [b"late"], timeout=2, what="handled after expiries")
    finally:
        await worker.stop()


async def test_requests_lost_with_a_server_restart_are_asked_for_again(js, nats_server) -> None:
    handled: list[bytes] = []

    async def handler(msg: Msg) -> Outcome:
        handled.append(msg.data)
        return Ack()

    worker = _worker(js, handler, pull_expires_s=30.0)  # lost, not expired, in this test
    await worker.start()
    try:
        await js.publish("track.t.before", b"before")
        await eventually(lambda: handled == [b"before"], what="before the restart")
        nats_server.restart()

        async def published() -> bool:
            try:
                await js.publish("track.t.after", b"after", timeout=1)
            except Exception:  # reconnecting, JetStream not ready yet
                return False
            return True

        await eventually(published, timeout=20, what="published after the restart")
        await eventually(lambda: b"after" in handled, timeout=10, what="after the restart")
    finally:
        await worker.stop()


async def test_stop_settles_the_messages_in_hand(js) -> None:
    release = asyncio.Event()
    started: list[bytes] = []

    async def handler(msg: Msg) -> Outcome:
        started.append(msg.data)
        await release.wait()
        return Ack()

    worker = _worker(js, handler)
    await worker.start()
    for i in range(3):
        await js.publish(f"track.t.{i}", str(i).encode())
    await eventually(lambda: len(started) == 3, what="in hand")
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # waits for the handlers
    release.set()
    await asyncio.wait_for(stopping, timeout=10)
    assert worker.in_flight == 0
    await eventually(lambda: _all_acked(js, 3), what="all three acked")


async def test_acks_linger_to_share_a_write_and_stop_sends_them(js) -> None:
    handled: list[bytes] = []

    async def handler(msg: Msg) -> Outcome:
        handled.append(msg.data)
        return Ack()

    worker = _worker(js, handler, ack_linger_s=60.0)
    await worker.start()
    for i in range(3):
        await js.publish(f"track.t.{i}", str(i).encode())
    await eventually(lambda: len(handled) == 3 and worker.in_flight == 0, what="handled")
    info = await js.consumer_info("TRACK", "flow")
    assert info.num_ack_pending == 3  # held back together, not one write each
    await worker.stop()
    await eventually(lambda: _all_acked(js, 3), timeout=5, what="sent by the stop")
