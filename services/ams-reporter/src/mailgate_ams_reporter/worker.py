"""A pull worker without head-of-line blocking: up to ``concurrency`` messages in hand, each
settled as soon as its own handling ends, and a new fetch as soon as a slot frees up.

``PullWorker`` handles a fetched batch as a unit (the next fetch waits for the slowest
message of the batch); for webhook deliveries, where one attempt may take the whole HTTP
timeout, that would let one slow endpoint delay every other delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import nats.errors
import structlog
from mailgate_core.nats import (
    Ack,
    MessageHandler,
    Nak,
    Outcome,
    PullWorker,
    backoff_delay,
    delivery_count,
)
from nats.aio.msg import Msg

log = structlog.get_logger()


@dataclass
class FlowWorker(PullWorker):
    """Calls ``handler`` per message (``handle_batch``, unused, is there for the base class:
    pass ``per_message(handler)``)."""

    handler: MessageHandler | None = None
    concurrency: int = 100
    _room: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _in_flight: int = field(default=0, init=False)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def _run(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        # Fetch in chunks: a pull request per freed slot would cost a round trip per message.
        chunk = max(1, min(self.batch, self.concurrency) // 4)
        while not self._stopping.is_set():
            free = self.concurrency - self._in_flight
            if free < chunk:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                msgs = await self._sub.fetch(min(free, self.batch), timeout=self.fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.DrainTimeoutError):
                if self._stopping.is_set():
                    break
                await asyncio.sleep(0.5)
                continue
            except Exception as exc:  # reconnecting, consumer deleted, ...
                log.warning("fetch failed", durable=self.durable, error=str(exc))
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                self._in_flight += 1
                task = asyncio.create_task(self._one(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if tasks:  # graceful stop: finish and settle what is in hand
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, msg: Msg) -> None:
        try:
            outcome: Outcome
            if self.handler is None:
                (outcome,) = await self.handle_batch([msg])
            else:
                try:
                    outcome = await self.handler(msg)
                except Exception:
                    log.exception("message handler crashed", subject=msg.subject)
                    outcome = Nak(backoff_delay(delivery_count(msg)))
            await settle(msg, outcome)
        finally:
            self._in_flight -= 1
            if self.concurrency - self._in_flight >= max(1, min(self.batch, self.concurrency) // 4):
                self._room.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._room.set()
        await super().stop()


async def settle(msg: Msg, outcome: Outcome) -> None:
    """Acks are not waited for: the delivery is already done (2xx, retry task or dead letter
    durable), and a lost ack only means a redelivery, which receivers de-duplicate."""
    try:
        if isinstance(outcome, Ack):
            await msg.ack()
        elif isinstance(outcome, Nak):
            await msg.nak(delay=outcome.delay_s)
        else:
            await msg.term()
    except Exception as exc:
        # Not settled: JetStream redelivers after ack_wait; the handlers are idempotent.
        with contextlib.suppress(Exception):
            log.warning("settle failed", subject=msg.subject, error=str(exc))
