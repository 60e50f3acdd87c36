"""postal-sender's rate cap, circuit breaker and retry schedule: pure, with a fake clock."""

import random

from mailgate_core.nats import backoff_delay
from mailgate_postal_sender.limits import Circuit, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_bucket_lets_a_burst_through_then_spaces_requests_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(10.0, clock=clock)
    assert [bucket.reserve() for _ in range(10)] == [0.0] * 10
    waits = [bucket.reserve() for _ in range(3)]
    assert [round(w, 6) for w in waits] == [0.1, 0.2, 0.3]
    clock.now += 10.0  # long idle: refilled, but never beyond the burst
    assert [bucket.reserve() for _ in range(10)] == [0.0] * 10
    assert bucket.reserve() > 0


def test_a_zero_rate_means_no_cap() -> None:
    bucket = TokenBucket(0.0, clock=Clock())
    assert all(bucket.reserve() == 0.0 for _ in range(10_000))


def test_the_circuit_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    circuit = Circuit(3, open_s=1.0, clock=clock)
    for _ in range(2):
        circuit.record(False)
    circuit.record(True)  # a success resets the count
    circuit.record(False)
    circuit.record(False)
    assert not circuit.is_open and circuit.allow()
    circuit.record(False)
    assert circuit.is_open
    assert not circuit.allow()


def test_an_open_circuit_lets_one_probe_through_and_backs_off_when_it_fails() -> None:
    clock = Clock()
    circuit = Circuit(1, open_s=1.0, max_open_s=4.0, clock=clock)
    circuit.record(False)
    assert not circuit.allow()
    clock.now += 1.0
    assert circuit.allow()  # the probe
    assert not circuit.allow()  # only one at a time
    circuit.record(False)
    clock.now += 1.5
    assert not circuit.allow()  # the wait doubled to 2 s
    clock.now += 0.5
    assert circuit.allow()
    circuit.record(False)
    clock.now += 4.0
    assert circuit.allow()
    circuit.record(False)
    clock.now += 4.0  # capped at max_open_s
    assert circuit.allow()
    circuit.record(True)
    assert not circuit.is_open and circuit.allow() and circuit.allow()


def test_a_cancelled_probe_frees_the_slot() -> None:
    clock = Clock()
    circuit = Circuit(1, open_s=1.0, clock=clock)
    circuit.record(False)
    clock.now += 1.0
    assert circuit.allow()
    circuit.abandon()
    assert circuit.allow()


def test_an_hour_of_outage_costs_a_message_few_deliveries() -> None:
    """Naks back off exponentially to 5 minutes: an hour is a couple of dozen redeliveries."""
    random.seed(7)
    elapsed, attempt = 0.0, 0
    while elapsed < 3600:
        attempt += 1
        elapsed += backoff_delay(attempt, base_s=1.0)
    assert attempt <= 30
