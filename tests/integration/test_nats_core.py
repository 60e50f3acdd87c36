"""mailgate_core.nats against a real nats-server."""

import asyncio

import pytest
from mailgate_core import schemas as s
from mailgate_core.nats import STREAMS, Ack, Nak, PullWorker, per_message, provision, publish_event
from mailgate_fakes.testing import eventually


async def test_provision_is_idempotent_and_file_backed(js) -> None:
    await provision(js)  # second time: no error, same config
    for spec in STREAMS:
        info = await js.stream_info(spec.name)
        assert str(getattr(info.config.storage, "value", info.config.storage)) == "file"
        assert info.config.duplicate_window == spec.duplicate_window_s


async def test_a_republished_event_is_stored_once(js) -> None:
    event = s.TrackOpen(mailgate_id="m1")
    first = await publish_event(js, event)
    again = await publish_event(js, event)
    assert first == again
    info = await js.stream_info("TRACK")
    assert info.state.messages == 1


async def test_pull_worker_redelivers_a_nak_and_acks_after_success(js) -> None:
    seen: list[int] = []

    async def handler(msg):
        seen.append(msg.metadata.num_delivered)
        return Nak(0.05) if len(seen) == 1 else Ack()

    await publish_event(js, s.TrackOpen(mailgate_id="m2"))
    worker = PullWorker(js, "TRACK", "t", "track.>", per_message(handler), fetch_timeout_s=0.2)
    await worker.start()
    await eventually(lambda: seen == [1, 2], what="redelivery")
    await worker.stop()
    info = await js.consumer_info("TRACK", "t")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_full_stream_refuses_the_publish(js) -> None:
    from mailgate_core.nats import PublishError, _ensure_stream
    from nats.js.api import DiscardPolicy, StorageType, StreamConfig

    await _ensure_stream(
        js,
        StreamConfig(
            name="TRACK",
            subjects=["track.>"],
            max_bytes=2048,
            discard=DiscardPolicy.NEW,
            storage=StorageType.FILE,
            duplicate_window=60,
        ),
    )
    with pytest.raises(PublishError):
        for _ in range(100):
            await publish_event(js, s.TrackClick(url="https://example.com/" + "x" * 100))
    await asyncio.sleep(0)
