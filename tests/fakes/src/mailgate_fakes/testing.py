"""Waiting helpers for tests: poll with a deadline instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from mailgate_core.schemas import Event, MailAccepted

T = TypeVar("T")
E = TypeVar("E", bound="Event")


async def eventually(
    check: Callable[[], Awaitable[T] | T],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Call ``check`` until it returns a truthy value (returned) or raises no AssertionError.

    On timeout, raises AssertionError with the last value or error seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            if result:
                return result  # type: ignore[return-value]
            last = result
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s; last seen: {last!r}")
        await asyncio.sleep(interval)


async def stored_events(
    js: Any, subject: str, stream: str, schema: type[E], *, limit: int = 1000
) -> list[E]:
    """Every event on ``subject`` stored in ``stream`` (up to ``limit``), decoded, read by a
    throwaway pull consumer: what a service under test has made durable."""
    import nats.errors
    from mailgate_core.schemas import decode

    sub = await js.pull_subscribe(subject, stream=stream)
    try:
        msgs = await sub.fetch(limit, timeout=0.3)
    except (TimeoutError, nats.errors.TimeoutError):
        msgs = []
    finally:
        await sub.unsubscribe()
    return [decode(m.data, schema) for m in msgs]


async def stored_ids(js: Any, stream: str) -> dict[str, list[int]]:
    """Every message stored in ``stream``: its ``Nats-Msg-Id`` and the sequences holding it."""
    found: dict[str, list[int]] = {}
    info = await js.stream_info(stream)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        assert msg.headers is not None
        found.setdefault(msg.headers["Nats-Msg-Id"], []).append(seq)
    return found


async def publish_through_a_server_kill(
    nats_server: Any,
    conn: Any,
    publish: Callable[[list[E]], Awaitable[list[int]]],
    make_batches: list[Callable[[], list[E]]],
    *,
    acks_before: int,
    acks_after: int = 300,
    before_kill: Callable[[], None] = lambda: None,
) -> tuple[dict[str, int], list[E]]:
    """One publisher per ``make_batches`` entry publishing its batches with ``publish`` (a
    ``PublishError`` is recorded and the publisher goes on) while nats-server is SIGKILLed
    (only what was synced survives) and restarted once ``acks_before`` events were acked;
    returns once ``acks_after`` more were acked: every acked event id with its acked stream
    sequence, and the events whose publish failed (for the caller's retry)."""
    from mailgate_core.nats import PublishError

    acked: dict[str, int] = {}
    failed: list[E] = []
    after_restart = 0
    restarted = asyncio.Event()

    async def publisher(make: Callable[[], list[E]]) -> None:
        nonlocal after_restart
        while after_restart < acks_after:
            events = make()
            try:
                seqs = await publish(events)
            except PublishError:
                failed.extend(events)
                await asyncio.sleep(0.05)
                continue
            acked.update((e.event_id, seq) for e, seq in zip(events, seqs, strict=True))
            if restarted.is_set():
                after_restart += len(events)

    def kill_and_restart() -> None:
        nats_server.stop(kill=True)
        nats_server.start()

    publishers = [asyncio.create_task(publisher(make)) for make in make_batches]
    await eventually(lambda: len(acked) >= acks_before, timeout=20, what="acks before the kill")
    before_kill()
    await asyncio.to_thread(kill_and_restart)
    await eventually(lambda: conn.is_connected, timeout=20, what="reconnected")
    restarted.set()
    await asyncio.wait_for(asyncio.gather(*publishers), 60)
    return acked, failed


async def consumer_settled(js: Any, stream: str, durable: str) -> bool:
    """Whether ``durable`` has nothing left to deliver and nothing awaiting an ack."""
    info = await js.consumer_info(stream, durable)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


def mail_accepted(
    domain: str,
    *,
    account_id: str = "acc1",
    recipient: str = "a@x.com",
    from_header: str | None = None,
    extra_headers: str = "",
    postal_api_key_ref: str | None = None,
) -> MailAccepted:
    """A small ``mail.accepted`` for ``domain`` with a fresh mailgate id, as smtp-ingest
    publishes it (``extra_headers``: complete header lines, each ending in CRLF)."""
    from mailgate_core.ids import new_ulid
    from mailgate_core.schemas import MailAccepted, MessageRef

    mailgate_id = new_ulid()
    sender = from_header or f"News <news@{domain}>"
    raw = (
        f"From: {sender}\r\nTo: {recipient}\r\nSubject: Hi\r\n"
        f"Message-ID: <{mailgate_id}@{domain}>\r\n{extra_headers}\r\nHello\r\n"
    ).encode()
    return MailAccepted(
        message=MessageRef(mailgate_id=mailgate_id, account_id=account_id, recipient=recipient),
        mail_from=f"bounces@{domain}",
        credential="user1",
        message_id_header=f"<{mailgate_id}@{domain}>",
        raw=raw,
        postal_api_key_ref=postal_api_key_ref,
    )
