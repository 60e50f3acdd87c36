"""mailgate_core.nats throughput helpers: publish_events and PullWorker's per-message mode."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from mailgate_core import schemas as s
from mailgate_core.nats import (
    Ack,
    PublishError,
    PullWorker,
    connect,
    per_message,
    provision,
    publish_events,
)
from mailgate_fakes.testing import eventually


async def test_publish_events_stores_every_event_once_and_returns_their_seqs(js) -> None:
    events = [s.TrackOpen(mailgate_id=f"m{i}") for i in range(5)]
    seqs = await publish_events(js, events)
    assert seqs == [1, 2, 3, 4, 5]
    assert await publish_events(js, events) == seqs  # Nats-Msg-Id: a retry adds nothing
    assert (await js.stream_info("TRACK")).state.messages == 5


async def test_publish_events_raises_unless_every_event_is_acknowledged(js) -> None:
    info = await js.stream_info("TRACK")
    info.config.max_msgs = 2  # discard=new: the third is refused
    await js.update_stream(info.config)
    with pytest.raises(PublishError):
        await publish_events(js, [s.TrackOpen(mailgate_id=f"m{i}") for i in range(3)])
    assert js.publish_async_pending() == 0  # nothing left waiting in nats-py


async def test_publish_events_times_out_when_nats_is_gone(nats_url: str, nats_server) -> None:
    nc = await connect(nats_url, "test")
    try:
        js = nc.jetstream()
        await provision(js)
        nats_server.stop()
        events = [s.TrackOpen(mailgate_id=f"m{i}") for i in range(3)]
        with pytest.raises(PublishError):
            await publish_events(js, events, timeout=1)
        assert js.publish_async_pending() == 0
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def test_per_message_mode_settles_each_message_without_waiting_for_a_slow_one(js) -> None:
    release = asyncio.Event()
    done: list[str] = []

    async def handler(msg) -> Ack:
        event = s.decode_subject(msg.subject, msg.data)
        if event.mailgate_id == "slow":
            await release.wait()
        done.append(event.mailgate_id)
        return Ack()

    await publish_events(js, [s.TrackOpen(mailgate_id="slow")])
    worker = PullWorker(
        js,
        "TRACK",
        "flow",
        "track.>",
        per_message(handler),
        handler=handler,
        concurrency=8,
        fetch_timeout_s=0.2,
    )
    await worker.start()
    await eventually(lambda: worker.in_flight == 1, what="the slow message in hand")
    await publish_events(js, [s.TrackOpen(mailgate_id=f"fast{i}") for i in range(20)])

    async def fast_acked() -> bool:
        info = await js.consumer_info("TRACK", "flow")
        return info.num_ack_pending == 1 and info.num_pending == 0

    await eventually(fast_acked, timeout=10, what="fast messages settled past the slow one")
    assert len(done) == 20 and "slow" not in done
    release.set()
    await worker.stop()  # finishes and settles the message in hand
    info = await js.consumer_info("TRACK", "flow")
    assert done[-1] == "slow" and info.num_ack_pending == 0
