"""The ledger's pull consumers: ``PullWorker`` with a leaner fetch.

nats-py's ``PullSubscription.fetch(n)`` takes each of the n messages with ``next_msg``,
which makes a uuid, a task and an ``asyncio.wait_for`` per message: about a tenth of the
ledger's CPU at full ingest. Here one callback subscription (``<inbox>.*``) collects the
messages of a pull request into a list, and the fetch waits on one event per request.

A request is ``{"batch": n, "expires": fetch_timeout, "no_wait": true}``: JetStream then
waits for a first message (up to ``expires``), delivers what is available up to ``n`` and
ends the request with a ``404`` status when it has no more (``408`` on expiry), so a
request never lingers holding messages for later. One request is out at a time; messages
delivered after a request was given up (a reconnect) are kept for the next fetch. Each
request's reply subject carries its own token, so a late status of an earlier request
does not end the current one.

Up to ``batches_in_flight`` batches are handled at once (the ledger's handlers declare two:
the next batch is fetched and started while the one ahead waits for Postgres); a batch is
settled after its handler returned (after the commit), as ``PullWorker`` does, but its acks
go out as one write (``mailgate_core.nats_wire``: one ``PUB <ack reply> 0`` per message, not
one nats-py ``publish`` each); naks and terms are sent one by one. The graceful stop and the
consumer's configuration are ``PullWorker``'s; messages fetched but not handed out when the
worker stops are nak'ed without delay, so another replica takes them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import nats.errors
import nats.js.errors
import structlog
from mailgate_core import nats_wire
from mailgate_core.nats import Ack, Nak, Outcome, PullWorker, backoff_delay, delivery_count
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

log = structlog.get_logger()

#: Statuses that end a pull request without an error: no messages, request expired.
_END_STATUSES = frozenset({"404", "408"})
_STATUS = "Status"


class _PullRequest(msgspec.Struct):
    batch: int
    expires: int
    no_wait: bool


_encode_request = msgspec.json.Encoder().encode


@dataclass
class LeanPullWorker(PullWorker):
    """``PullWorker`` fetching through one callback subscription (see the module doc)."""

    nc: NatsClient | None = None
    batches_in_flight: int | None = None
    """Batches handled at once: the next batch is fetched and handled while the one ahead
    waits (for Postgres: round trips, its commit's flush). ``None``: what the handler
    declares in its ``batches_in_flight`` attribute (the ledger's ``CONCURRENT_BATCHES``:
    its batches keep their stream's order themselves), else one."""
    _inbox: str = field(default="", init=False)
    _next_subject: str = field(default="", init=False)
    _tokens: itertools.count[int] = field(default_factory=itertools.count, init=False)
    _buffer: deque[Msg] = field(default_factory=deque, init=False)
    _reply: str = field(default="", init=False)
    _wanted: int = field(default=0, init=False)
    _received: int = field(default=0, init=False)
    _status: str = field(default="", init=False)
    _answered: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    async def start(self) -> None:
        if self.nc is None:
            raise ValueError("LeanPullWorker needs the NATS connection (nc)")
        try:  # as nats-py's pull_subscribe: an existing consumer is used as it is
            await self.js.consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(self.stream, config=self.consumer_config())
        self._inbox = self.nc.new_inbox()
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"
        self._sub = await self.nc.subscribe(
            self._inbox + ".*", cb=self._on_message, pending_msgs_limit=-1
        )
        self._task = asyncio.create_task(self._run(), name=f"pull:{self.durable}")

    async def _on_message(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(_STATUS) if headers else None
        if status is None:
            self._buffer.append(msg)
            self._received += 1
            if self._received >= self._wanted:
                self._answered.set()
            return
        if msg.subject == self._reply:
            self._status = status
            self._answered.set()  # the request ended: no more messages, expired, or refused

    def _take(self, size: int) -> list[Msg]:
        buffer = self._buffer
        if len(buffer) <= size:
            msgs = list(buffer)
            buffer.clear()
            return msgs
        return [buffer.popleft() for _ in range(size)]

    async def _pull(self, size: int) -> list[Msg]:
        if self._buffer:
            return self._take(size)
        assert self.nc is not None
        self._reply = f"{self._inbox}.{next(self._tokens)}"
        self._wanted = size
        self._received = 0
        self._status = ""
        self._answered.clear()
        expires_ns = max(1, int(self.fetch_timeout_s * 1e9) - 100_000)
        await self.nc.publish(
            self._next_subject,
            _encode_request(_PullRequest(batch=size, expires=expires_ns, no_wait=True)),
            reply=self._reply,
        )
        with contextlib.suppress(TimeoutError):
            # The request ends itself by ``expires``; the margin covers a lost answer.
            async with asyncio.timeout(self.fetch_timeout_s + 1.0):
                await self._answered.wait()
        if not self._buffer and self._status and self._status not in _END_STATUSES:
            # Refused (consumer deleted, no responders...): do not spin on it.
            log.warning("pull request refused", durable=self.durable, status=self._status)
            await asyncio.sleep(0.5)
        return self._take(size)

    def batch_slots(self) -> int:
        """Batches this worker handles at once."""
        if self.batches_in_flight is not None:
            return max(1, self.batches_in_flight)
        declared = getattr(self.handle_batch, "batches_in_flight", 1)
        return max(1, declared) if isinstance(declared, int) else 1

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.batch_slots())
        handling: set[asyncio.Task[None]] = set()
        try:
            while not self._stopping.is_set():
                await slots.acquire()
                if self._stopping.is_set():
                    slots.release()
                    break
                msgs = await self._fetch_batch()
                if not msgs:
                    slots.release()
                    continue
                # Started now: batches begin in the order they were fetched.
                task = asyncio.create_task(self._handle(msgs))
                handling.add(task)
                task.add_done_callback(handling.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            if handling:  # the graceful stop: the batches in hand are handled and settled
                await asyncio.gather(*handling, return_exceptions=True)

    async def _fetch_batch(self) -> list[Msg]:
        try:
            return await self._pull(self.batch)
        except (nats.errors.ConnectionClosedError, nats.errors.DrainTimeoutError):
            if not self._stopping.is_set():
                await asyncio.sleep(0.5)
        except Exception as exc:  # reconnecting, ...
            log.warning("fetch failed", durable=self.durable, error=str(exc))
            await asyncio.sleep(0.5)
        return []

    async def _handle(self, msgs: list[Msg]) -> None:
        try:
            outcomes: Sequence[Outcome] = await self.handle_batch(msgs)
        except Exception:
            log.exception("batch handler crashed", durable=self.durable, size=len(msgs))
            outcomes = [Nak(backoff_delay(delivery_count(m))) for m in msgs]
        await self._settle(msgs, outcomes)

    async def _settle(self, msgs: Sequence[Msg], outcomes: Sequence[Outcome]) -> None:
        """Acks in one write; naks and terms one by one. A settle that does not reach the
        server means a redelivery after ``ack_wait``, which the ledger's idempotency makes
        harmless."""
        assert self.nc is not None
        acked: list[Msg] = []
        others: list[tuple[Msg, Outcome]] = []
        for msg, outcome in zip(msgs, outcomes, strict=True):
            if isinstance(outcome, Ack) and msg.reply:
                acked.append(msg)
            else:
                others.append((msg, outcome))
        try:
            if acked and not await nats_wire.write(
                self.nc, b"".join([nats_wire.ack_command(m.reply) for m in acked])
            ):
                for msg in acked:
                    await msg.ack()
        except Exception as exc:
            log.warning("settle failed", durable=self.durable, count=len(acked), error=str(exc))
        for msg, outcome in others:
            try:
                if isinstance(outcome, Nak):
                    await msg.nak(delay=outcome.delay_s)
                elif isinstance(outcome, Ack):
                    await msg.ack()
                else:
                    await msg.term()
            except Exception as exc:
                log.warning("settle failed", subject=msg.subject, error=str(exc))

    async def stop(self) -> None:
        await super().stop()
        leftover = list(self._buffer)
        self._buffer.clear()
        for msg in leftover:  # fetched, never handled: redeliver now rather than after ack_wait
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.nak()
