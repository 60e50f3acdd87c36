"""Per-endpoint isolation: a circuit breaker and a concurrency limit ("lane") per endpoint.

One dead endpoint must never slow the others down. Two things make sure of it:

* **Concurrency limit.** At most ``limit`` requests to one endpoint are in flight. A delivery
  waits for a free slot at most ``wait_s``, and at most ``max_waiting`` (4 x limit) wait at
  once; beyond either it is deferred to the retry stream. So a slow endpoint holds at most
  5 x limit of the shared consumer's slots, and only for a bounded time.
* **Circuit breaker.** After ``failure_threshold`` consecutive failed attempts the circuit
  opens: no request is made for ``open_s``; deliveries are deferred at once. Then one probe
  is let through (half-open): success closes the circuit, failure opens it again for twice as
  long (up to ``max_open_s``).

State is per process (each replica learns about an endpoint on its own); nothing here does
I/O, and the clock is injected so the rules are tested without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]

#: Value of the ``mailgate_webhook_breaker_state`` gauge per state.
STATE_VALUES: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        open_s: float = 30.0,
        max_open_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.base_open_s = open_s
        self.max_open_s = max_open_s
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._failures = 0
        self._open_s = open_s
        self._open_until = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self._clock() >= self._open_until:
            self._set("half_open")
        return self._state

    def _set(self, state: BreakerState) -> None:
        if state != self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)

    def is_open(self) -> bool:
        """True while no request may be made (open, or half-open with the probe out)."""
        state = self.state
        return state == "open" or (state == "half_open" and self._probe_in_flight)

    def try_admit(self) -> bool:
        """Whether a request may go out now; in half-open, only the single probe may."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def retry_in_s(self) -> float:
        """How long a deferred delivery should wait before it is tried again."""
        state = self.state
        if state == "open":
            return max(0.0, self._open_until - self._clock())
        if state == "half_open":
            return 1.0  # the probe decides soon
        return 0.0

    def record_success(self) -> None:
        self._failures = 0
        self._probe_in_flight = False
        self._open_s = self.base_open_s
        self._set("closed")

    def record_failure(self) -> None:
        self._failures += 1
        was_probe = self._probe_in_flight
        self._probe_in_flight = False
        if self._state == "half_open" or was_probe:
            self._open_s = min(self._open_s * 2, self.max_open_s)
            self._trip()
        elif self._state == "closed" and self._failures >= self.failure_threshold:
            self._trip()

    def release_probe(self) -> None:
        """The admitted probe was not sent after all (no slot): let another one go."""
        self._probe_in_flight = False

    def _trip(self) -> None:
        self._open_until = self._clock() + self._open_s
        self._set("open")


class LaneBusy(Exception):
    """No free slot at the endpoint within the wait."""


@dataclass
class LaneConfig:
    limit: int = 20
    wait_s: float = 5.0
    max_waiting: int = 0
    """Deliveries allowed to wait for a slot at once (0: 4 x limit); beyond that: busy."""
    failure_threshold: int = 5
    open_s: float = 30.0
    max_open_s: float = 600.0


class Lane:
    """One endpoint's breaker, concurrency limit, and last failure (for dead letters)."""

    def __init__(
        self,
        endpoint_id: str,
        config: LaneConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        self.endpoint_id = endpoint_id
        self.config = config
        self.breaker = CircuitBreaker(
            failure_threshold=config.failure_threshold,
            open_s=config.open_s,
            max_open_s=config.max_open_s,
            clock=clock,
            on_change=(lambda s: on_change(endpoint_id, s)) if on_change else None,
        )
        self._slots = asyncio.Semaphore(config.limit)
        self.in_flight = 0
        self.waiting = 0
        self.last_failure = ""
        self.last_http_status: int | None = None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the endpoint's slots; LaneBusy when none frees up in time."""
        cfg = self.config
        max_waiting = cfg.max_waiting or 4 * cfg.limit
        if self._slots.locked() and self.waiting >= max_waiting:
            raise LaneBusy
        self.waiting += 1
        try:
            async with asyncio.timeout(cfg.wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise LaneBusy from None
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()

    def busy_retry_in_s(self) -> float:
        """Delay for a delivery that found the endpoint at its concurrency limit."""
        return random.uniform(0.5, 2.0) * max(1.0, self.config.wait_s)


class Lanes:
    """Lane per endpoint id, made on first use."""

    def __init__(
        self,
        config: LaneConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._on_change = on_change
        self._lanes: dict[str, Lane] = {}

    def get(self, endpoint_id: str) -> Lane:
        lane = self._lanes.get(endpoint_id)
        if lane is None:
            lane = Lane(endpoint_id, self.config, clock=self._clock, on_change=self._on_change)
            self._lanes[endpoint_id] = lane
            if self._on_change is not None:
                self._on_change(endpoint_id, "closed")  # the gauge shows every known endpoint
        return lane

    def __iter__(self) -> Iterator[Lane]:
        return iter(self._lanes.values())
