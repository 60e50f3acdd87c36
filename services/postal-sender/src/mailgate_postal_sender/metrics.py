"""postal-sender's Prometheus metrics, registered on the service's registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry):
        self._outcomes: dict[str, Any] = {}
        self._durations: dict[str, Any] = {}
        self.requests = Counter(
            "mailgate_postal_requests_total",
            "Postal send/raw requests by outcome",
            ["outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "mailgate_postal_request_duration_seconds",
            "Duration of Postal API requests (answered or not), by endpoint",
            ["endpoint"],
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.in_flight = Gauge(
            "mailgate_postal_requests_in_flight",
            "Postal API requests currently waiting for an answer",
            registry=registry,
        )
        self.errors = Counter(
            "mailgate_postal_errors_total",
            "Postal API failures by code (Postal's error code, HTTPnnn, Timeout, ...)",
            ["code"],
            registry=registry,
        )
        self.circuit_open = Gauge(
            "mailgate_postal_circuit_open",
            "1 while Postal looks dead and only probes are sent",
            registry=registry,
        )
        self.deferred = Counter(
            "mailgate_postal_deferred_total",
            "Requests not sent because the circuit was open (retried later)",
            registry=registry,
        )
        self.submitted = Counter(
            "mailgate_postal_submitted_total", "Messages Postal accepted", registry=registry
        )
        self.failed = Counter(
            "mailgate_postal_failed_total",
            "Messages given up on, by reason",
            ["reason"],
            registry=registry,
        )
        self.ambiguous = Counter(
            "mailgate_postal_ambiguous_retries_total",
            "Retries after a request Postal may have received (possible duplicate)",
            registry=registry,
        )
        self.replayed = Counter(
            "mailgate_postal_replayed_total",
            "Redelivered messages answered from the submissions record without calling Postal",
            registry=registry,
        )
        # --- reconciler -----------------------------------------------------------------
        self.leader = Gauge(
            "mailgate_postal_reconciler_leader",
            "1 while this replica holds the reconciler lock",
            registry=registry,
        )
        self.pending = Gauge(
            "mailgate_postal_pending_final",
            "Submitted messages without a final Postal status (at the last reconcile pass)",
            registry=registry,
        )
        self.checks = Counter(
            "mailgate_postal_reconcile_checks_total",
            "Messages the reconciler looked up in Postal, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.recovered = Counter(
            "mailgate_postal_reconciled_events_total",
            "Delivery facts the reconciler learned from Postal's API and published, by event",
            ["event"],
            registry=registry,
        )
        self.finalized = Counter(
            "mailgate_postal_finalized_total",
            "Submissions marked final from postal.* events",
            registry=registry,
        )

    def request_outcome(self, outcome: str) -> Any:
        """``requests.labels(outcome)``, looked up once per outcome (a handful)."""
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.requests.labels(outcome)
        return child

    def request_duration(self, endpoint: str) -> Any:
        """``duration.labels(endpoint)``, looked up once per endpoint."""
        child = self._durations.get(endpoint)
        if child is None:
            child = self._durations[endpoint] = self.duration.labels(endpoint)
        return child
