"""Group commit of durable publishes (``publish_events(..., group=True)``,
``nats_wire.GroupCommit``) against a real nats-server: concurrent callers' events coalesced
into JetStream atomic batches, each caller acked only with its events stored at the acked
sequences, a duplicate message id that fails nobody, a SIGKILL of the server mid-stream,
the plain path where atomic batches are not available, and the MAIL stream provisioned
with ``allow_atomic``. Tests that need batches with few callers shrink the group's window
(``group_of(js, window=...)``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from mailgate_core import nats_wire
from mailgate_core.ids import new_ulid
from mailgate_core.nats import (
    PublishError,
    _ensure_stream,
    atomic_stream_of,
    connect,
    provision,
    publish_event,
    publish_events,
)
from mailgate_core.schemas import MailSkipped, MessageRef, TrackOpen
from mailgate_fakes.infra import NatsServer
from mailgate_fakes.testing import publish_through_a_server_kill, stored_ids
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig


def skipped() -> MailSkipped:
    return MailSkipped(
        message=MessageRef(mailgate_id=new_ulid(), account_id="acc", recipient="r@example.org"),
        mail_from="s@example.org",
        reason="manual",
    )


@pytest.fixture
async def conn(nats_server: NatsServer) -> AsyncIterator[nats.NATS]:
    nc = await connect(nats_server.url, "test")
    await provision(nc.jetstream())
    yield nc
    await nc.close()


def group_of(js: JetStreamContext, *, window: int | None = None) -> nats_wire.GroupCommit:
    """The connection's group commit of MAIL; with ``window``: callers queue beyond that
    many publishes in flight and any two queued messages make an atomic batch."""
    group = nats_wire.connection_group_commit(js, "MAIL")
    assert group is not None
    if window is not None:
        group.window, group.atomic_min = window, 2
    return group


async def test_mail_events_go_to_mail_only_streams_with_allow_atomic_are_grouped() -> None:
    assert atomic_stream_of([skipped(), skipped()]) == "MAIL"
    assert atomic_stream_of([TrackOpen(mailgate_id="m")]) is None  # TRACK: no allow_atomic
    assert atomic_stream_of([skipped(), TrackOpen(mailgate_id="m")]) is None


async def test_concurrent_publishers_are_coalesced_and_each_is_stored_at_its_seq(
    conn: nats.NATS,
) -> None:
    js = conn.jetstream()
    sizes: list[int] = []
    nats_wire.observe_group_commits(conn, sizes.append)
    callers = [[skipped() for _ in range(1 + i % 3)] for i in range(200)]
    results = await asyncio.gather(
        *(publish_events(js, events, timeout=10.0, group=True) for events in callers)
    )
    group = group_of(js)
    published = sum(len(events) for events in callers)
    assert sum(sizes) == published
    assert group.batches >= 1 and group.commits == len(sizes)
    # The first window's worth went alone, the rest as atomic batches: far fewer commits
    # (each one PubAck) than callers.
    assert len(sizes) < len(callers) / 3
    assert max(sizes) >= group.atomic_min
    stored = await stored_ids(js, "MAIL")
    assert len(stored) == published and all(len(seqs) == 1 for seqs in stored.values())
    for events, seqs in zip(callers, results, strict=True):
        assert [stored[e.event_id][0] for e in events] == seqs
    assert group.in_flight == 0 and group.queued == 0
    assert nats_wire.connection_requests(js).in_flight == 0  # type: ignore[union-attr]


async def test_a_lone_publisher_goes_alone_without_waiting(conn: nats.NATS) -> None:
    js = conn.jetstream()
    sizes: list[int] = []
    nats_wire.observe_group_commits(conn, sizes.append)
    group_of(js, window=1)  # even the smallest window has room for one caller at a time
    for _ in range(5):
        assert len(await publish_events(js, [skipped()], group=True)) == 1
    assert await publish_events(js, [skipped(), skipped()], group=True) == [6, 7]
    assert sizes == [1, 1, 1, 1, 1, 2]
    assert group_of(js).batches == 0  # nothing to group with: the plain publishes


async def test_a_duplicate_in_a_batch_fails_nobody_and_is_stored_once(conn: nats.NATS) -> None:
    js = conn.jetstream()
    old = skipped()
    old_seq = await publish_event(js, old)
    group = group_of(js, window=1)
    callers = [[skipped()] for _ in range(30)]
    callers[17] = [skipped(), old]  # a retry of a stored event, in the middle of a batch
    blocker = asyncio.create_task(publish_events(js, [skipped()], group=True))
    results = await asyncio.gather(
        *(publish_events(js, events, timeout=10.0, group=True) for events in callers)
    )
    await blocker
    assert group.one_by_one >= 1  # the batch holding it was refused and republished
    assert results[17][1] == old_seq
    stored = await stored_ids(js, "MAIL")
    assert all(len(seqs) == 1 for seqs in stored.values())
    for events, seqs in zip(callers, results, strict=True):
        assert [stored[e.event_id][0] for e in events] == seqs
    assert len(stored) == 1 + 1 + sum(len(events) for events in callers) - 1


async def test_a_refused_batch_fails_every_caller_with_the_single_publish_error(
    conn: nats.NATS,
) -> None:
    js = conn.jetstream()
    info = await js.stream_info("MAIL")
    info.config.max_msgs = 1  # discard new: every batch after the first message is refused
    await js.update_stream(info.config)
    group = group_of(js, window=1)
    blocker = asyncio.create_task(publish_events(js, [skipped()], group=True))
    outcomes = await asyncio.gather(
        *(publish_events(js, [skipped()], timeout=5.0, group=True) for _ in range(20)),
        return_exceptions=True,
    )
    await blocker
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert group.batches == 0 and 1 < group.commits < 1 + 20  # batches, all refused
    assert len(failures) == 20 and all(isinstance(f, PublishError) for f in failures)
    assert all("maximum messages exceeded" in str(f) for f in failures), failures[:2]
    assert len({id(f) for f in failures}) == 20  # each caller its own exception
    assert (await js.stream_info("MAIL")).state.messages == 1  # the blocker's alone


async def test_without_atomic_batches_on_the_server_publishes_go_one_by_one(
    conn: nats.NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    js = conn.jetstream()
    monkeypatch.setattr(nats_wire, "atomic_batches_supported", lambda nc: False)
    group_of(js, window=1)
    results = await asyncio.gather(
        *(publish_events(js, [skipped()], group=True) for _ in range(40))
    )
    group = group_of(js)
    assert group.commits == 0 and group.batches == 0
    assert sorted(seq for seqs in results for seq in seqs) == list(range(1, 41))


async def test_a_stream_without_allow_atomic_falls_back_and_stays_there(conn: nats.NATS) -> None:
    js = conn.jetstream()
    await js.delete_stream("MAIL")
    await js.add_stream(  # as provisioned before MAIL had allow_atomic
        StreamConfig(
            name="MAIL",
            subjects=["mail.>"],
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            duplicate_window=1200,
        )
    )
    group = group_of(js, window=1)
    blocker = asyncio.create_task(publish_events(js, [skipped()], group=True))
    results = await asyncio.gather(
        *(publish_events(js, [skipped()], group=True) for _ in range(20))
    )
    await blocker
    assert not group.atomic and 1 <= group.one_by_one <= group.max_batches
    assert group.batches == 0
    assert len({seq for seqs in results for seq in seqs}) == 20
    commits = group.commits
    await asyncio.gather(*(publish_events(js, [skipped()], group=True) for _ in range(20)))
    assert group.commits == commits  # not tried again
    assert (await js.stream_info("MAIL")).state.messages == 41


async def test_provision_adds_allow_atomic_to_an_existing_mail_stream_and_keeps_the_rest(
    conn: nats.NATS,
) -> None:
    js = conn.jetstream()
    await js.delete_stream("MAIL")
    await _ensure_stream(
        js,
        StreamConfig(
            name="MAIL",
            subjects=["mail.>"],
            storage=StorageType.FILE,
            max_age=7 * 24 * 3600.0,
            discard=DiscardPolicy.NEW,
            duplicate_window=1200.0,
            num_replicas=1,
        ),
    )
    seq = await publish_event(js, skipped())
    before = (await js.stream_info("MAIL")).config
    assert not before.allow_atomic
    await provision(js)
    after = await js.stream_info("MAIL")
    assert after.config.allow_atomic is True
    assert after.state.messages == 1 and after.state.last_seq == seq
    # The server's own metadata (``_nats.req.level``: the API level the stream now needs)
    # is the server's bookkeeping, not our config.
    old, new = before.as_dict(), after.config.as_dict()
    for config in (old, new):
        config["metadata"] = {
            k: v for k, v in (config.get("metadata") or {}).items() if not k.startswith("_nats.")
        }
    changed = {name for name in old.keys() | new.keys() if old.get(name) != new.get(name)}
    assert changed == {"allow_atomic"}


async def test_a_server_kill_mid_stream_acks_nothing_unstored_and_nothing_twice(
    nats_server: NatsServer, conn: nats.NATS
) -> None:
    js = conn.jetstream()
    group = group_of(js, window=4)
    batches_before: list[int] = []
    acked, failed = await publish_through_a_server_kill(
        nats_server,
        conn,
        lambda events: publish_events(js, events, timeout=2.0, group=True),
        [lambda size=1 + i % 2: [skipped() for _ in range(size)] for i in range(20)],
        acks_before=300,
        before_kill=lambda: batches_before.append(group.batches),
    )
    # batched before the kill and after the restart
    assert batches_before[0] > 0 and group.batches > batches_before[0]
    for event in failed:  # the client's retry (same ids): stored at most once
        acked[event.event_id] = (await publish_events(js, [event], group=True))[0]
    stored = await stored_ids(js, "MAIL")
    assert all(len(seqs) == 1 for seqs in stored.values()), "a message id stored twice"
    missing = {i: seq for i, seq in acked.items() if stored.get(i) != [seq]}
    assert not missing, f"acked but not stored at its seq: {list(missing.items())[:5]}"
    assert group.in_flight == 0 and group.queued == 0
