"""The ledger's pull consumers: ``PullWorker`` with a leaner fetch and standing requests.

nats-py's ``PullSubscription.fetch(n)`` takes each of the n messages with ``next_msg``,
which makes a uuid, a task and an ``asyncio.wait_for`` per message: about a tenth of the
ledger's CPU at full ingest. Here one callback subscription (``<inbox>.*``) collects the
delivered messages into a buffer, and a batch is what the buffer holds when a batch slot is
free (up to ``batch``).

Pull requests stay open (``fetch_timeout_s``, renewed when they end) and ask for as many
messages as the worker has room for: ``batch`` per batch slot, minus the messages buffered,
in hand and already asked for. Below saturation a fact is handed over the moment JetStream
has it and costs no pull request of its own; in a backlog a batch still fills up as a
no-wait request's answer did (``_fetch_batch`` waits for what the stream says it has). One
no-wait request per batch, as before, cost a request and a "no messages" answer per batch:
with the small batches of a ledger that keeps up, about half a NATS message per mail
message, and a pull request for nats-server to queue and end each time.

A new request goes out when half the room is free and not yet asked for, or when nothing is
on its way. JetStream delivers a message with its own subject, not the request's reply
subject, so the worker counts the messages asked for and not yet arrived over all open
requests; a request that ends unfilled says so on its reply subject (408 with
``Nats-Pending-Messages``), a filled one says nothing and is forgotten at its expiry. After a
reconnect, or an answer without that count, the count starts again from zero (at worst a
batch more than the room is asked for; ``max_ack_pending`` still bounds it).

Up to ``batches_in_flight`` batches are handled at once (the ledger's handlers declare two:
the next batch is taken and started while the one ahead waits for Postgres); a batch is
settled after its handler returned (after the commit), as ``PullWorker`` does, but its acks
go out as one write (``mailgate_core.nats_wire``: one ``PUB <ack reply> 0`` per message, not
one nats-py ``publish`` each); naks and terms are sent one by one. The consumer's
configuration is ``PullWorker``'s. A graceful stop asks for nothing more, waits (at most
until their expiry) for the messages its open requests may still bring, lets the batches in
hand finish and be settled, and naks without delay what was delivered but never handed out,
so another replica takes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
import structlog
from mailgate_core import nats_wire
from mailgate_core.flow import LOOP_TICK_S, StandingPulls
from mailgate_core.nats import Ack, Nak, Outcome, PullWorker, backoff_delay, delivery_count
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

log = structlog.get_logger()

#: While a backlog streams in, a batch waits at most this long for its next message.
TOP_UP_S = 0.005
#: A stop waits at most this long for what its open requests may still bring (they end at
#: their expiry, ``fetch_timeout_s``: one second by default).
STOP_WAIT_S = 2.0


def _pending_after(reply: str) -> int:
    """Messages the stream still has for the consumer after this one: ``num_pending`` of a
    JetStream ack subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.
    <pending>``, or the form with a domain and an account hash); 0 when not one."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        pending = tokens[8]
    elif len(tokens) >= 11:
        pending = tokens[10]
    else:
        return 0
    return int(pending) if pending.isdigit() else 0


@dataclass
class LeanPullWorker(PullWorker):
    """``PullWorker`` fetching through one callback subscription with standing pull requests
    (see the module doc)."""

    nc: NatsClient | None = None
    batches_in_flight: int | None = None
    """Batches handled at once: the next batch is taken and handled while the one ahead
    waits (for Postgres: round trips, its commit's flush). ``None``: what the handler
    declares in its ``batches_in_flight`` attribute (the ledger's ``CONCURRENT_BATCHES``:
    its batches keep their stream's order themselves), else one."""
    _inbox: str = field(default="", init=False)
    _pulls: StandingPulls | None = field(default=None, init=False)
    _buffer: deque[Msg] = field(default_factory=deque, init=False)
    _in_hand: int = field(default=0, init=False)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _asker: asyncio.Task[None] | None = field(default=None, init=False)

    @property
    def requests_sent(self) -> int:
        """Pull requests sent so far (a figure for tests and benchmarks)."""
        return 0 if self._pulls is None else self._pulls.sent

    def _asked(self) -> int:
        return 0 if self._pulls is None else self._pulls.asked

    async def start(self) -> None:
        if self.nc is None:
            raise ValueError("LeanPullWorker needs the NATS connection (nc)")
        try:  # as nats-py's pull_subscribe: an existing consumer is used as it is
            await self.js.consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(self.stream, config=self.consumer_config())
        self._inbox = self.nc.new_inbox()
        self._pulls = StandingPulls(
            self.nc,
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
            self._inbox,
            self.durable,
            max(0.001, self.fetch_timeout_s),
            self._deliver,
            self._room,
            self._stopping,
            ended=self._arrived.set,  # a stop may be waiting for the open requests to end
            ignore_forgotten=True,
            refill_once_arrived=True,
            quiet_stop=True,
        )
        self._sub = await self.nc.subscribe(
            self._inbox + ".*", cb=self._pulls.on_message, pending_msgs_limit=-1
        )
        self._asker = asyncio.create_task(self._ask_loop(), name=f"pull-ask:{self.durable}")
        self._task = asyncio.create_task(self._run(), name=f"pull:{self.durable}")

    def _deliver(self, msg: Msg) -> None:
        self._buffer.append(msg)
        self._arrived.set()

    def _capacity(self) -> int:
        return self.batch * self.batch_slots()

    def _wanted(self) -> int:
        """Messages to ask for: the room not yet filled, buffered, in hand or asked for."""
        return self._capacity() - len(self._buffer) - self._in_hand - self._asked()

    async def _ask_loop(self) -> None:
        assert self._pulls is not None
        # Renew when half the room is free: in a backlog that is a batch per request (two
        # slots); below saturation a request lasts for half the room's facts. Nothing on its
        # way (no request open, or the open ones filled): ask for any room.
        await self._pulls.run(self._wanted, max(1, self._capacity() // 2))

    def _take(self, size: int) -> list[Msg]:
        buffer = self._buffer
        if len(buffer) <= size:
            msgs = list(buffer)
            buffer.clear()
            return msgs
        return [buffer.popleft() for _ in range(size)]

    async def _fetch_batch(self) -> list[Msg]:
        """What the buffer holds (up to ``batch``) once it holds something and nothing more
        is on its way for this batch; ``[]`` when the worker stops first.

        As a no-wait request did (JetStream delivers what is available, then says "no
        more"): while the newest message says the stream has more for this consumer
        (``num_pending`` in its ack subject) and more has been asked for, the batch waits
        for them, each at most ``TOP_UP_S`` (another replica's request may take them).

        While another batch is in hand, a batch of fewer than ``batch // 4`` facts waits for
        more until that batch ends: it could not commit before it anyway (a stream's batches
        commit in the order they were taken), and a trickle otherwise alternates one batch of
        what came in meanwhile with one of a single fact, a transaction each."""
        buffer = self._buffer
        fill = max(1, self.batch // 4)
        while not self._stopping.is_set():
            if buffer:
                if len(buffer) >= self.batch or self._asked() == 0:
                    return self._take(self.batch)
                more_on_the_way = _pending_after(buffer[-1].reply) > 0
                if not more_on_the_way and (self._in_hand == 0 or len(buffer) >= fill):
                    return self._take(self.batch)
                self._arrived.clear()
                if more_on_the_way:
                    try:
                        async with asyncio.timeout(TOP_UP_S):
                            await self._arrived.wait()
                    except TimeoutError:
                        return self._take(self.batch)
                    continue
            self._arrived.clear()
            await self._arrived.wait()  # a message, a batch ended, or the stop
        return []

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
                self._in_hand += len(msgs)
                task = asyncio.create_task(self._handle(msgs))
                handling.add(task)
                task.add_done_callback(handling.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            if handling:  # the graceful stop: the batches in hand are handled and settled
                await asyncio.gather(*handling, return_exceptions=True)

    async def _handle(self, msgs: list[Msg]) -> None:
        try:
            try:
                outcomes: Sequence[Outcome] = await self.handle_batch(msgs)
            except Exception:
                log.exception("batch handler crashed", durable=self.durable, size=len(msgs))
                outcomes = [Nak(backoff_delay(delivery_count(m))) for m in msgs]
            await self._settle(msgs, outcomes)
        finally:
            self._in_hand -= len(msgs)
            self._room.set()
            self._arrived.set()  # a batch waiting for this one to end may go now

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

    async def _await_open_requests(self) -> None:
        """Wait (at most until their expiry) for what the open requests may still bring."""
        pulls = self._pulls
        if pulls is None or not pulls.open:
            return
        deadline = min(max(pulls.open.values()), time.monotonic() + STOP_WAIT_S)
        while pulls.asked > 0 and pulls.open:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, LOOP_TICK_S)):
                    await self._arrived.wait()

    async def stop(self) -> None:
        self._stopping.set()
        self._room.set()
        self._arrived.set()
        if self._asker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._asker
        await self._await_open_requests()
        await super().stop()
        leftover = list(self._buffer)
        self._buffer.clear()
        for msg in leftover:  # fetched, never handled: redeliver now rather than after ack_wait
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.nak()
