"""mailgate_core.nats_wire against a real nats-server: the direct writes, their fallbacks to
nats-py's public API, and JetStream's error replies mapped as nats-py maps them.

Which path a publish took shows in nats-py's own counter: ``nc.stats["out_msgs"]`` counts the
messages that went through ``Client.publish``; direct writes do not touch it."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import nats.errors
import nats.js.errors
import pytest
from mailgate_core import nats_wire
from mailgate_core.ids import new_ulid
from mailgate_core.schemas import TrackOpen
from mailgate_fakes.testing import eventually
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg


class PublicOnly:
    """A nats-py client seen through its public API only, as if a nats-py release had
    renamed ``_send_command``/``_flush_pending``/``_current_server``."""

    def __init__(self, nc: NatsClient) -> None:
        self.wrapped = nc

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.wrapped, name)


def opened() -> TrackOpen:
    return TrackOpen(mailgate_id=new_ulid())


@pytest.fixture
async def lean(nc):  # type: ignore[no-untyped-def]
    requests = nats_wire.JetStreamRequests(nc, timeout_s=5.0)
    await requests.start()
    yield requests
    await requests.stop()


async def test_direct_writes_bypass_nats_py_publish_and_store_the_same(js, nc, lean) -> None:
    kv = lean.key_value("submissions", await js.key_value("submissions"))
    sent = nc.stats["out_msgs"]
    event = opened()
    seq = await lean.publish_event(event)
    revision = await kv.put("01A", b"v")
    assert (await kv.get("01A")).revision == revision
    assert nc.stats["out_msgs"] == sent  # nothing went through nats-py's publish
    stored = await js.get_msg("TRACK", seq)
    assert stored.headers == {"Nats-Msg-Id": event.event_id}


async def test_without_the_private_members_everything_goes_through_nats_py(js, nc) -> None:
    public = cast(NatsClient, PublicOnly(nc))
    requests = nats_wire.JetStreamRequests(public, timeout_s=5.0)
    await requests.start()
    try:
        assert not await nats_wire.write(public, b"PUB x 0\r\n\r\n")
        kv = requests.key_value("submissions", await js.key_value("submissions"))
        sent = nc.stats["out_msgs"]
        event = opened()
        seq = await requests.publish_event(event)
        assert await requests.publish_event(event) == seq  # de-duplicated, as directly
        await kv.create("01B", b"one")
        assert (await kv.get("01B")).value == b"one"
        assert nc.stats["out_msgs"] - sent == 4  # publish, publish, create, get
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await kv.create("01B", b"two")
        stored = await js.get_msg("TRACK", seq)
        assert stored.headers == {"Nats-Msg-Id": event.event_id}
        # The server version is then read through the public property.
        assert nats_wire.atomic_batches_supported(public) == (
            nats_wire.atomic_batches_supported(nc)
        )
    finally:
        await requests.stop()
    assert requests.in_flight == 0


async def test_a_value_unfit_for_the_wire_is_published_by_nats_py_as_nats_py_would(
    js, nc, lean
) -> None:
    sent = nc.stats["out_msgs"]
    seq = await lean.publish("mail.submitted", b"{}", ("Nats-Msg-Id", " padded id "))
    assert nc.stats["out_msgs"] == sent + 1
    ours = await js.get_msg("MAIL", seq)
    theirs = await js.get_msg(
        "MAIL",
        (await js.publish("mail.submitted", b"{}", headers={"Nats-Msg-Id": " other id "})).seq,
    )
    assert ours.headers == {"Nats-Msg-Id": "padded id"}  # trimmed, as nats-py trims
    assert theirs.headers == {"Nats-Msg-Id": "other id"}


async def test_error_replies_raise_what_nats_py_raises(js, nc, lean) -> None:
    await js.publish("mail.submitted", b"first")
    header = ("Nats-Expected-Last-Subject-Sequence", "7")
    with pytest.raises(nats.js.errors.APIError) as theirs:
        await js.publish("mail.submitted", b"{}", headers=dict([header]))
    with pytest.raises(nats.js.errors.APIError) as ours:
        await lean.publish("mail.submitted", b"{}", header)
    assert type(ours.value) is type(theirs.value) is nats.js.errors.BadRequestError
    assert (ours.value.code, ours.value.err_code) == (theirs.value.code, theirs.value.err_code)
    assert ours.value.err_code == 10071  # wrong last sequence
    with pytest.raises(nats.js.errors.NoStreamResponseError):  # no stream, no responders
        await lean.publish("nowhere.at.all", b"{}")

    # A reply that is not a publish ack at all.
    async def answer(msg: Msg) -> None:
        await msg.respond(b"not json")

    answering = await nc.subscribe("echo.api", cb=answer)
    with pytest.raises(nats.js.errors.APIError, match="unreadable publish ack"):
        await lean.publish("echo.api", b"{}")
    await answering.unsubscribe()
    assert lean.in_flight == 0


async def test_while_reconnecting_nats_py_buffers_the_request(nats_server, nc, js, lean) -> None:
    nats_server.stop()
    await eventually(lambda: not nc.is_connected, what="the client noticed")
    assert not await nats_wire.write(nc, b"PUB x 0\r\n\r\n")  # refused, not half-written
    pending = asyncio.create_task(lean.publish_event(opened(), timeout_s=15.0))
    await asyncio.sleep(0)
    nats_server.start()
    seq = await asyncio.wait_for(pending, 20.0)  # buffered by nats-py, sent on reconnect
    assert seq == 1
    assert (await js.stream_info("TRACK")).state.messages == 1


async def test_expected_replies_resolve_and_a_forgotten_one_is_dropped(nc, lean) -> None:
    reply, future = lean.expect()
    forgotten, late = lean.expect()
    lean.forget(forgotten)
    assert lean.in_flight == 1
    await nc.publish(forgotten, b"late")
    await nc.publish(reply, b"answer")
    answer: Msg = await asyncio.wait_for(future, 5.0)
    assert answer.data == b"answer"
    assert not late.done() and lean.in_flight == 0
    _, expiring = lean.expect(timeout_s=0.05)
    with pytest.raises(nats.errors.TimeoutError):
        await expiring
    assert lean.in_flight == 0
    _, waiting = lean.expect()
    await lean.stop()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await waiting
    assert lean.in_flight == 0
