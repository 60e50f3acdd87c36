"""postal-sender's lean JetStream requests (mailgate_core.nats_wire) against a real
nats-server: the same answers and errors as nats-py's KV and publish, which they replace on the
hot path."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest
from mailgate_core.ids import new_ulid
from mailgate_core.nats import PublishError
from mailgate_core.nats_wire import JetStreamRequests
from mailgate_core.schemas import MailSubmitted, MessageRef, decode


def submitted(event_id: str | None = None) -> MailSubmitted:
    mailgate_id = new_ulid()
    return MailSubmitted(
        event_id=event_id or f"sub-{mailgate_id}",
        message=MessageRef(mailgate_id=mailgate_id, account_id="acc", recipient="r@x.com"),
        postal_id=7,
        postal_token="t" * 16,
    )


@pytest.fixture
async def requests(nc, js):
    lean = JetStreamRequests(nc, timeout_s=2.0)
    await lean.start()
    yield lean
    await lean.stop()


async def test_kv_get_put_and_a_missing_key_match_nats_py(js, requests) -> None:
    native = await js.key_value("submissions")
    kv = requests.key_value("submissions", native)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("01MISSING")
    revision = await kv.put("01A", b'{"postal_id": 1}')
    entry = await kv.get("01A")
    assert (entry.value, entry.revision) == (b'{"postal_id": 1}', revision)
    assert (await native.get("01A")).value == b'{"postal_id": 1}'  # nats-py reads our write
    await native.put("01B", b"")  # an empty value (nats-py's write) reads back empty
    assert (await kv.get("01B")).value == b""
    await native.delete("01A")
    with pytest.raises(nats.js.errors.KeyNotFoundError):  # a delete marker is "not found"
        await kv.get("01A")
    assert requests.in_flight == 0


async def test_kv_create_refuses_an_existing_key_and_recreates_a_deleted_one(js, requests) -> None:
    native = await js.key_value("submissions")
    kv = requests.key_value("submissions", native)
    first = await kv.create("01C", b"one")
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await kv.create("01C", b"two")
    assert (await kv.get("01C")).value == b"one"
    await native.delete("01C")
    assert await kv.create("01C", b"three") > first
    assert (await kv.get("01C")).value == b"three"


async def test_publish_event_sets_the_message_id_and_is_deduplicated(js, requests) -> None:
    event = submitted()
    seq = await requests.publish_event(event)
    assert await requests.publish_event(event) == seq  # JetStream dropped the duplicate
    stored = await js.get_msg("MAIL", seq)
    assert stored.headers == {"Nats-Msg-Id": event.event_id}
    assert decode(stored.data, MailSubmitted) == event
    info = await js.stream_info("MAIL")
    assert info.state.messages == 1


async def test_a_message_id_unfit_for_the_wire_goes_through_nats_py(js, requests) -> None:
    event = submitted(event_id="sub-with space")  # valid in a header, not as a token
    seq = await requests.publish_event(event)
    stored = await js.get_msg("MAIL", seq)
    assert stored.headers == {"Nats-Msg-Id": "sub-with space"}


async def test_failures_raise_what_the_sender_treats_as_transient(nc, js, requests) -> None:
    with pytest.raises(nats.js.errors.NoStreamResponseError):  # no stream stores the subject
        await requests.publish("nowhere.at.all", b"{}")
    silent = await nc.subscribe("silent.api")  # someone listens, nobody answers
    with pytest.raises(nats.errors.TimeoutError):
        await requests.request("silent.api", b"{}", timeout_s=0.2)
    await silent.unsubscribe()
    assert requests.in_flight == 0
    with pytest.raises(nats.js.errors.NotFoundError) as missing:  # no such bucket
        await requests.key_value("no-such-bucket", None).get("k")
    # Not "no such key": the sender would take that for "never sent" and call Postal.
    assert not isinstance(missing.value, nats.js.errors.KeyNotFoundError)
    await js.delete_stream("MAIL")
    with pytest.raises(PublishError, match="NoStreamResponseError"):
        await requests.publish_event(submitted())
