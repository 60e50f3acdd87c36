"""Durable event publishes (``mailgate_core.nats.publish_event``/``publish_events``) through
the connection's shared ``nats_wire.JetStreamRequests``, against a real nats-server: one reply
subscription per connection, nats-py's exceptions and texts, a server paused, killed and
restarted mid-stream, and a service stop that lets the acks in flight come in.

Which path a publish took shows in nats-py's own counter: ``nc.stats["out_msgs"]`` counts the
messages that went through ``Client.publish``; direct writes do not touch it."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import nats
import nats.js.errors
import pytest
from mailgate_core import nats_wire
from mailgate_core.config import BaseSettings
from mailgate_core.ids import new_ulid
from mailgate_core.nats import (
    PublishError,
    _ensure_stream,
    connect,
    provision,
    publish_event,
    publish_events,
)
from mailgate_core.schemas import TrackOpen, encode
from mailgate_core.service import ServiceBase
from mailgate_fakes.infra import NatsServer
from mailgate_fakes.testing import eventually, publish_through_a_server_kill, stored_ids
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig


def opened(user_agent: str = "") -> TrackOpen:
    return TrackOpen(mailgate_id=new_ulid(), user_agent=user_agent)


@pytest.fixture
async def conn(nats_server: NatsServer) -> AsyncIterator[nats.NATS]:
    """A connection to the test's own nats-server (these tests pause and kill it)."""
    nc = await connect(nats_server.url, "test")
    await provision(nc.jetstream())
    yield nc
    await nc.close()


def reply_subscriptions(server: NatsServer) -> list[str]:
    """The wildcard inbox subscriptions the server holds (``_INBOX.<id>.*``): nats-py's own
    request subscription and ours."""
    url = f"http://127.0.0.1:{server.monitor_port}/connz?subs=1"
    with urllib.request.urlopen(url, timeout=5) as answer:
        connz: dict[str, Any] = json.load(answer)
    return [
        subject
        for conn in connz.get("connections") or []
        for subject in conn.get("subscriptions_list") or []
        if subject.startswith("_INBOX.") and subject.endswith(".*")
    ]


@contextmanager
def paused(server: NatsServer) -> Iterator[None]:
    """The server process stopped (SIGSTOP): the socket stays open, nothing is answered."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)


async def native_error(js: JetStreamContext, event: TrackOpen, timeout: float = 5.0) -> str:
    """The PublishError text nats-py's ``js.publish`` gives for ``event`` (the old path)."""
    with pytest.raises(Exception) as theirs:
        await js.publish(
            event.subject(), encode(event), timeout=timeout, headers={"Nats-Msg-Id": event.event_id}
        )
    return f"{type(theirs.value).__name__}: {theirs.value}"


async def test_every_context_of_a_connection_shares_one_reply_subscription(
    nats_server: NatsServer, conn: nats.NATS
) -> None:
    first, second = conn.jetstream(), conn.jetstream(timeout=3)
    before = reply_subscriptions(nats_server)  # nats-py's own, made by provision's requests
    sent = conn.stats["out_msgs"]
    seqs = [await publish_event(first, opened()), await publish_event(second, opened())]
    seqs += await publish_events(first, [opened(), opened(), opened()])
    assert seqs == [1, 2, 3, 4, 5]
    assert conn.stats["out_msgs"] == sent  # none went through nats-py's publish
    requests = nats_wire.connection_requests(first)
    assert requests is not None and requests is nats_wire.connection_requests(second)
    ours = set(reply_subscriptions(nats_server)) - set(before)
    assert len(ours) == 1  # one for both contexts

    await nats_wire.close_connection_requests(conn)
    await conn.flush()  # the server has seen the UNSUB
    await eventually(
        lambda: ours.isdisjoint(reply_subscriptions(nats_server)), what="ours unsubscribed"
    )
    # Later publishes still work, through nats-py, and make no new subscription.
    assert await publish_event(first, opened()) == 6
    assert conn.stats["out_msgs"] == sent + 1
    assert nats_wire.connection_requests(first) is None
    await conn.flush()
    assert set(reply_subscriptions(nats_server)) <= set(before)  # none made again


async def test_a_duplicate_returns_the_stored_seq_on_either_path(conn: nats.NATS) -> None:
    js = conn.jetstream()
    event = opened()
    seq = await publish_event(js, event)
    assert await publish_event(js, event) == seq
    assert await publish_events(js, [opened(), event]) == [seq + 1, seq]
    assert (
        await js.publish(event.subject(), encode(event), headers={"Nats-Msg-Id": event.event_id})
    ).seq == seq
    stored = await js.get_msg("TRACK", seq)
    assert stored.headers == {"Nats-Msg-Id": event.event_id}
    assert (await js.stream_info("TRACK")).state.messages == 2


async def test_jetstream_errors_raise_publish_error_with_nats_py_texts(conn: nats.NATS) -> None:
    js = conn.jetstream()
    # A full stream (discard new) refuses with a JetStream API error.
    await _ensure_stream(
        js,
        StreamConfig(
            name="TRACK",
            subjects=["track.>"],
            max_bytes=4096,
            discard=DiscardPolicy.NEW,
            storage=StorageType.FILE,
            duplicate_window=60,
        ),
    )
    await publish_event(js, opened("x" * 3000))
    with pytest.raises(PublishError) as ours:
        await publish_event(js, opened("x" * 3000))
    assert str(ours.value) == await native_error(js, opened("x" * 3000))
    assert "maximum bytes exceeded" in str(ours.value)
    assert isinstance(ours.value.__cause__, nats.js.errors.APIError)
    # No stream for the subject: no responders.
    await js.delete_stream("TRACK")
    with pytest.raises(PublishError) as ours:
        await publish_events(js, [opened(), opened()])
    assert str(ours.value) == await native_error(js, opened())
    assert str(ours.value).startswith("NoStreamResponseError: ")
    requests = nats_wire.connection_requests(js)
    assert requests is not None and requests.in_flight == 0


async def test_an_oversized_event_is_refused_and_the_connection_survives(conn: nats.NATS) -> None:
    js = conn.jetstream()
    huge = opened("x" * (conn.max_payload + 10))
    with pytest.raises(PublishError) as ours:
        await publish_event(js, huge)
    assert str(ours.value) == await native_error(js, huge)
    assert str(ours.value).startswith("MaxPayloadError: ")
    # Just under the limit once the headers are counted: refused by nats-py the same way or
    # sent, never written directly over the limit (the server would close the connection).
    with pytest.raises(PublishError):
        await publish_events(js, [opened(), huge])
    assert conn.is_connected
    assert await publish_event(js, opened()) > 0


async def test_no_answer_is_a_timeout_and_a_retry_is_deduplicated(
    nats_server: NatsServer, conn: nats.NATS
) -> None:
    js = conn.jetstream(timeout=0.3)
    event = opened()
    with paused(nats_server):
        started = time.monotonic()
        with pytest.raises(PublishError) as ours:
            await publish_event(js, event, timeout=None)  # the context's 0.3 s
        waited = time.monotonic() - started
        assert str(ours.value) == "TimeoutError: nats: timeout"
        assert await native_error(js, opened(), timeout=0.3) == str(ours.value)
        with pytest.raises(PublishError, match=r"^TimeoutError: nats: timeout$"):
            await publish_events(js, [opened(), opened()], timeout=0.2)
    assert 0.25 < waited < 2.0
    # The server stored the timed-out publish after all: the retry finds it.
    seq = await publish_event(js, event, timeout=5.0)
    assert (await js.get_msg("TRACK", seq)).headers == {"Nats-Msg-Id": event.event_id}
    requests = nats_wire.connection_requests(js)
    assert requests is not None and requests.in_flight == 0


@pytest.mark.parametrize("timeout", [0, -1.0])
async def test_a_timeout_that_cannot_be_met_sends_nothing(conn: nats.NATS, timeout: float) -> None:
    js = conn.jetstream()
    with pytest.raises(PublishError, match="publish timeout must be positive"):
        await publish_event(js, opened(), timeout=timeout)
    with pytest.raises(PublishError, match="publish timeout must be positive"):
        await publish_events(js, [opened(), opened()], timeout=timeout)
    assert (await js.stream_info("TRACK")).state.messages == 0


async def test_a_closed_connection_raises_publish_error_at_once(nats_server: NatsServer) -> None:
    nc = await connect(nats_server.url, "test")
    js = nc.jetstream()
    await provision(js)
    await publish_event(js, opened())
    await nc.close()
    started = time.monotonic()
    with pytest.raises(PublishError) as ours:
        await publish_event(js, opened())
    assert str(ours.value) == await native_error(js, opened())
    assert str(ours.value).startswith("ConnectionClosedError: ")
    with pytest.raises(PublishError, match=r"^ConnectionClosedError: "):
        await publish_events(js, [opened(), opened()])
    assert time.monotonic() - started < 1.0


async def test_publishes_resume_after_a_server_kill_and_none_is_acked_unstored(
    nats_server: NatsServer, conn: nats.NATS
) -> None:
    js = conn.jetstream()
    requests = nats_wire.connection_requests(js)
    acked, failed = await publish_through_a_server_kill(
        nats_server,
        conn,
        lambda events: publish_events(js, events, timeout=2.0),
        [lambda size=1 + i % 3: [opened() for _ in range(size)] for i in range(8)],
        acks_before=200,
    )
    # publishes resumed on the same shared instance
    assert nats_wire.connection_requests(js) is requests
    for event in failed:  # the caller's retry: stored at most once
        acked[event.event_id] = await publish_event(js, event)
    stored = await stored_ids(js, "TRACK")
    assert all(len(seqs) == 1 for seqs in stored.values()), "a message id stored twice"
    missing = {event_id: seq for event_id, seq in acked.items() if stored.get(event_id) != [seq]}
    assert not missing, f"acked but not stored: {list(missing.items())[:5]}"
    assert requests is not None and requests.in_flight == 0


async def test_service_stop_lets_the_acks_in_flight_come_in_before_the_drain(
    nats_server: NatsServer,
) -> None:
    settings = BaseSettings(
        nats_url=nats_server.url, service_name="publisher", consumer_lag_interval_s=0
    )
    service = ServiceBase(settings)
    await service.connect()
    await service.start()
    js = service.js
    events = [opened() for _ in range(400)]
    tasks = [asyncio.create_task(publish_event(js, e, timeout=10.0)) for e in events]
    requests = nats_wire.connection_requests(js)
    assert requests is not None
    await eventually(lambda: requests.in_flight > 0, what="publishes in flight")
    await service.stop()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failures, failures[:3]
    assert service.nc is not None and service.nc.is_closed and requests.closed
    check = await nats.connect(nats_server.url)
    try:
        assert (await check.jetstream().stream_info("TRACK")).state.messages == len(events)
    finally:
        await check.close()
