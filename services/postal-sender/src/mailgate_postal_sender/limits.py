"""Rate cap and circuit breaker for the Postal API: pure state machines over an injected clock.

``TokenBucket`` spreads requests to ``POSTAL_RATE_PER_S``; ``Circuit`` stops calling a Postal
that looks dead (``POSTAL_CIRCUIT_FAILURES`` consecutive transport failures) and lets one
probe through after a wait that doubles up to ``max_open_s``, so an hour-long outage costs a
few requests a minute instead of one per queued message.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up; a rate of 0 means no cap."""

    def __init__(
        self, rate_per_s: float, burst: float | None = None, *, clock: Clock = time.monotonic
    ):
        self.rate_per_s = rate_per_s
        self.capacity = burst if burst and burst > 0 else max(1.0, rate_per_s)
        self._clock = clock
        self._tokens = self.capacity
        self._updated = clock()

    def reserve(self) -> float:
        """Take one token; return how long the caller must wait before using it (0 = now).

        Tokens may go negative: each caller reserves its own slot in the future, so waiters
        leave in arrival order at exactly the configured rate.
        """
        if self.rate_per_s <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate_per_s


class Circuit:
    """Closed -> open after ``failure_threshold`` consecutive failures -> one probe at a time.

    ``allow()`` says whether a request may go out; every allowed request must end with
    ``record(ok)``. A success closes the circuit; a failed probe doubles the wait.
    """

    def __init__(
        self,
        failure_threshold: int,
        open_s: float,
        max_open_s: float = 60.0,
        *,
        clock: Clock = time.monotonic,
    ):
        self.failure_threshold = max(1, failure_threshold)
        self.open_s = open_s
        self.max_open_s = max(open_s, max_open_s)
        self._clock = clock
        self.failures = 0
        self.is_open = False
        self._wait_s = open_s
        self._retry_at = 0.0
        self._probe_until = 0.0
        """While a probe is out, others wait; a probe that never reports expires here."""
        self.opened_count = 0

    def allow(self) -> bool:
        if not self.is_open:
            return True
        now = self._clock()
        if now < self._retry_at or now < self._probe_until:
            return False
        self._probe_until = now + self._wait_s + self.open_s
        return True

    def abandon(self) -> None:
        """An allowed request ended with nothing to judge (cancelled): free the probe slot."""
        self._probe_until = 0.0

    def record(self, ok: bool) -> None:
        now = self._clock()
        if ok:
            self.failures = 0
            self.is_open = False
            self._wait_s = self.open_s
            self._probe_until = 0.0
            return
        self.failures += 1
        if self.is_open:
            if self._probe_until:  # the probe failed: wait longer before the next one
                self._wait_s = min(self.max_open_s, self._wait_s * 2)
                self._retry_at = now + self._wait_s
                self._probe_until = 0.0
            return
        if self.failures >= self.failure_threshold:
            self.is_open = True
            self.opened_count += 1
            self._wait_s = self.open_s
            self._retry_at = now + self._wait_s
            self._probe_until = 0.0
