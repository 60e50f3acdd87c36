"""``FlowWorker``: ``PullWorker``'s per-message mode fed by standing pull requests, with
lingering acks (ams-reporter's webhook deliveries, postal-sender's sends and final markers).

Messages must not wait for each other (one slow endpoint or Postal call may hold a message for
a whole HTTP timeout), so each message is settled as soon as its own handling ends. Acks are
not waited for: the consumers using this worker are idempotent (their output is durable before
the ack, and a lost ack only means a redelivery their records or receivers answer).

Messages come from pull requests that stay open (``PULL_EXPIRES_S``) and ask for as many
messages as there are free slots: below saturation each message is handed over the moment
JetStream has it, and costs no request of its own. (``fetch`` asks again for every few
messages, and nats-py's fetch of several sends a no-wait probe and then a waiting request:
for messages coming one at a time that was about one pull request and one "no
messages"/"timeout" answer each, messages for nats-server to handle and, with nats-py's fetch
machinery, about half of ams-reporter's CPU.) A new request goes out when a quarter of the
slots is free and not yet asked for, as ``PullWorker`` fetches.

Acks linger ``ACK_LINGER_S`` so that those of messages settled close together leave in one
socket write (one read for nats-server); a stop sends the lingering ones before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from .nats import Ack, MessageHandler, Outcome, PullWorker, _settle

log = structlog.get_logger()

#: How long one pull request waits for messages on the server (it is renewed when it ends).
PULL_EXPIRES_S = 2.0
#: Past its expiry plus this, a request that never said it ended counts as gone (lost in a
#: reconnect or a server restart) and its slots are asked for again.
PULL_GRACE_S = 0.5
#: The longest the request loop sleeps between looks at expiries and reconnects.
LOOP_TICK_S = 0.5
#: After an error answer (consumer deleted, ...), the next request waits this long.
ERROR_PAUSE_S = 0.5
#: How long a settled message's ack waits for others to go out in the same write.
ACK_LINGER_S = 0.005
#: Answers that end a pull request without an error (no messages, expired).
_ENDED = frozenset({"404", "408"})


class _PullRequest(msgspec.Struct):
    batch: int
    expires: int


_encode = msgspec.json.Encoder().encode


@dataclass
class StandingPulls:
    """The bookkeeping of standing pull requests on one consumer, shared by ``FlowWorker`` and
    the ledger's ``LeanPullWorker``: the requests open (reply subject -> when it counts as
    gone), the messages asked for and not yet arrived (``asked``), the end and refusal answers
    on the reply subjects, reconnects, and the loop that asks (``run``). The worker says how
    much room it has (``run``'s ``wanted``), in what chunks it asks, and what becomes of a
    message (``deliver``).

    JetStream delivers a message with its own subject, not the request's reply subject, so
    a message does not say which request brought it: ``asked`` counts over all open requests.
    A request that ends unfilled says so on its reply subject (404/408 with
    ``Nats-Pending-Messages``); a filled one says nothing and is forgotten at its expiry.
    When no request is open, or after a reconnect or an answer without that count, the count
    starts again from zero: at worst one batch more than the room is asked for."""

    nc: Client
    next_subject: str
    inbox: str
    durable: str
    expires_s: float
    deliver: Callable[[Msg], None]
    """Takes each message (not a status answer); ``asked`` already counts it as arrived."""
    room: asyncio.Event
    """Set by the worker when it has more room; the loop waits on it between looks."""
    stopping: asyncio.Event
    ended: Callable[[], None] | None = None
    """Called after each end or refusal answer (after ``room`` is set)."""
    ignore_forgotten: bool = False
    """An end answer of a request no longer open (gone, or before a reconnect) is ignored;
    else its unfilled count still comes off ``asked``."""
    refill_once_arrived: bool = False
    """Below a chunk, any room is asked for as soon as everything asked for has arrived;
    else only once no request is open."""
    quiet_stop: bool = False
    """A request not sent while stopping is not logged."""
    open: dict[str, float] = field(default_factory=dict, init=False)
    """Reply subject of each request that may still bring messages -> when it counts as gone."""
    asked: int = field(default=0, init=False)
    pause_until: float = field(default=0.0, init=False)
    sent: int = field(default=0, init=False)
    """Pull requests sent so far (a figure for tests and benchmarks)."""
    _tokens: itertools.count[int] = field(default_factory=itertools.count, init=False)

    def forget_all(self) -> None:
        self.open.clear()
        self.asked = 0

    async def on_message(self, msg: Msg) -> None:
        """The callback of the subscription to ``<inbox>.*``."""
        headers = msg.headers
        if headers and not msg.reply:
            status = headers.get("Status")
            if status is not None:
                if status != "100":  # not an idle heartbeat / flow control
                    self._ended(msg.subject, status, headers)
                return
        if self.asked > 0:
            self.asked -= 1
        self.deliver(msg)

    def _ended(self, reply: str, status: str, headers: dict[str, str]) -> None:
        """A request's end (or refusal) answer on its reply subject."""
        if self.open.pop(reply, None) is None and self.ignore_forgotten:
            return
        unfilled = headers.get("Nats-Pending-Messages", "")
        if unfilled.isdigit():
            self.asked = max(0, self.asked - int(unfilled))
        else:
            self.forget_all()
        if not self.open:
            self.asked = 0
        if status not in _ENDED:  # refused: consumer deleted, too many requests...
            log.warning(
                "pull request refused",
                durable=self.durable,
                status=status,
                description=headers.get("Description", ""),
            )
            self.pause_until = time.monotonic() + ERROR_PAUSE_S
        self.room.set()
        if self.ended is not None:
            self.ended()

    async def run(self, wanted: Callable[[], int], chunk: int) -> None:
        """Ask for ``wanted()`` messages whenever that is a ``chunk`` or more, or there is
        room and nothing on its way, until ``stopping``."""
        nc = self.nc
        reconnects = nc.stats["reconnects"]
        while not self.stopping.is_set():
            now = time.monotonic()
            if nc.stats["reconnects"] != reconnects:  # requests may be gone with the link
                reconnects = nc.stats["reconnects"]
                self.forget_all()
            for reply, gone_at in list(self.open.items()):
                if gone_at <= now:  # filled, or lost without an answer
                    del self.open[reply]
            if not self.open:
                self.asked = 0
            want = wanted()
            idle = self.asked == 0 if self.refill_once_arrived else not self.open
            if now >= self.pause_until and (want >= chunk or (want > 0 and idle)):
                await self._ask(want)
                continue
            self.room.clear()
            wake_in = min(
                [LOOP_TICK_S, max(0.0, self.pause_until - now)]
                + [max(0.0, gone_at - now) for gone_at in self.open.values()]
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wake_in or LOOP_TICK_S):
                    await self.room.wait()

    async def _ask(self, batch: int) -> None:
        reply = f"{self.inbox}.{next(self._tokens)}"
        request = _PullRequest(batch=batch, expires=int(self.expires_s * 1e9))
        try:
            await self.nc.publish(self.next_subject, _encode(request), reply=reply)
        except (nats.errors.Error, OSError) as exc:
            if not (self.quiet_stop and self.stopping.is_set()):
                log.warning("pull request not sent", durable=self.durable, error=str(exc))
            self.pause_until = time.monotonic() + ERROR_PAUSE_S
            return
        self.sent += 1
        self.open[reply] = time.monotonic() + self.expires_s + PULL_GRACE_S
        self.asked += batch


@dataclass
class FlowWorker(PullWorker):
    """``PullWorker(..., handler=..., concurrency=...)`` with standing pull requests and
    unconfirmed acks (pass ``per_message(handler)`` as ``handle_batch``; it is not used).
    The requests' bookkeeping is ``StandingPulls``'s; the worker asks for its free slots (at
    most ``batch``), a quarter of the slots at a time or any once no request is open."""

    sync_acks: bool = False
    pull_expires_s: float = PULL_EXPIRES_S
    ack_linger_s: float = ACK_LINGER_S
    """Acks of messages settled within this long of each other go out in one write (one
    socket write here and one read for nats-server instead of one per message)."""
    _acks: list[Msg] = field(default_factory=list, init=False)
    _ack_timer: asyncio.TimerHandle | None = field(default=None, init=False)
    _ack_tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _pulls: StandingPulls | None = field(default=None, init=False)

    def requested(self) -> int:
        """Messages asked for and not yet arrived (all open requests)."""
        return 0 if self._pulls is None else self._pulls.asked

    async def _settle_one(self, msg: Msg, outcome: Outcome) -> None:
        if isinstance(outcome, Ack) and not self.sync_acks:
            self._queue_ack(msg)
        else:
            await _settle(msg, outcome, sync=self.sync_acks)

    def _queue_ack(self, msg: Msg) -> None:
        self._acks.append(msg)
        if self._ack_timer is None:
            loop = asyncio.get_running_loop()
            self._ack_timer = loop.call_later(self.ack_linger_s, self._send_acks_now)

    def _send_acks_now(self) -> None:
        self._ack_timer = None
        acks, self._acks = self._acks, []
        if acks:
            task = asyncio.create_task(self._send_acks(acks))
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)

    @staticmethod
    async def _send_acks(acks: list[Msg]) -> None:
        # Each ack only adds its command to nats-py's pending buffer and kicks the flusher
        # (nothing here waits for the socket), so the lot leaves in one write.
        for msg in acks:
            try:
                await msg.ack()
            except Exception as exc:  # redelivered after ack_wait; handlers are idempotent
                log.warning("settle failed", subject=msg.subject, error=str(exc))

    async def _flush_acks(self) -> None:
        """Send the acks still lingering and wait for every ack write in hand."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        self._send_acks_now()
        if self._ack_tasks:
            await asyncio.gather(*self._ack_tasks, return_exceptions=True)

    async def _run_each(self, handler: MessageHandler) -> None:
        nc: Client = self.js._nc
        tasks: set[asyncio.Task[None]] = set()

        def deliver(msg: Msg) -> None:
            self._in_flight += 1
            task = asyncio.create_task(self._one(handler, msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        pulls = self._pulls = StandingPulls(
            nc,
            self._sub._nms,
            nc.new_inbox(),
            self.durable,
            self.pull_expires_s,
            deliver,
            self._room,
            self._stopping,
        )

        def wanted() -> int:
            return min(self.concurrency - self._in_flight - pulls.asked, self.batch)

        sub = await nc.subscribe(f"{pulls.inbox}.*", cb=pulls.on_message)
        try:
            await pulls.run(wanted, self._chunk())
        finally:
            # Graceful stop: no more requests; what is on its way is still handled (drain),
            # then what is in hand finishes and is settled.
            try:
                await asyncio.wait_for(sub.drain(), timeout=5.0)  # type: ignore[no-untyped-call]
            except Exception as exc:  # closed or draining connection: nothing more comes
                log.debug("pull inbox not drained", durable=self.durable, error=str(exc))
            pulls.forget_all()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await self._flush_acks()
