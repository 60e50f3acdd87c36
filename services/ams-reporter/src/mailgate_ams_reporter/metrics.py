"""ams-reporter's Prometheus metrics (on the service's own registry).

``endpoint`` labels carry the endpoint id: bounded by the endpoints customers registered,
never a message id or an address.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .breaker import STATE_VALUES, BreakerState

LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.outcomes = Counter(
            "mailgate_webhook_deliveries",
            "Webhook deliveries by outcome: delivered, failed (attempt failed), refused (URL "
            "not allowed), deferred (not attempted: circuit open or endpoint busy), "
            "dead_letter, dropped (endpoint gone).",
            ["outcome"],
            registry=registry,
        )
        self.attempts = Counter(
            "mailgate_webhook_attempts",
            "HTTP delivery attempts per endpoint (a batch counts once).",
            ["endpoint"],
            registry=registry,
        )
        self.failures = Counter(
            "mailgate_webhook_failures",
            "Failed HTTP delivery attempts per endpoint (non-2xx, timeout, connection error).",
            ["endpoint"],
            registry=registry,
        )
        self.deferred = Counter(
            "mailgate_webhook_deferred",
            "Deliveries put off without an attempt, per endpoint and reason (circuit_open, busy).",
            ["endpoint", "reason"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "mailgate_webhook_dead_letters",
            "Deliveries given up after the retry deadline, per endpoint.",
            ["endpoint"],
            registry=registry,
        )
        self.delivery_records_failed = Counter(
            "mailgate_webhook_delivery_records_failed",
            "Successful deliveries whose mail.webhook_delivered fact could not be published "
            "(the webhook is not sent again; the message history lacks that row).",
            registry=registry,
        )
        self.retries_queued = Counter(
            "mailgate_webhook_retries_queued",
            "Deliveries moved to the retry stream after their first try.",
            registry=registry,
        )
        self.breaker_state = Gauge(
            "mailgate_webhook_breaker_state",
            "Circuit breaker per endpoint: 0 closed, 1 half-open, 2 open.",
            ["endpoint"],
            registry=registry,
        )
        self.duration = Histogram(
            "mailgate_webhook_delivery_seconds",
            "Duration of one webhook HTTP attempt.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.lag = Histogram(
            "mailgate_webhook_lag_seconds",
            "Time from the status event (occurred_at) to its successful delivery.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.endpoint_lag = Gauge(
            "mailgate_webhook_endpoint_lag_seconds",
            "Lag (status event occurred_at to the 2xx) of the latest successful delivery, "
            "per endpoint.",
            ["endpoint"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "mailgate_webhook_batch_items",
            "Events per batched delivery.",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=registry,
        )

    def breaker_changed(self, endpoint_id: str, state: BreakerState) -> None:
        self.breaker_state.labels(endpoint_id).set(STATE_VALUES[state])


class AutostopMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.counted = Counter(
            "mailgate_autostop_events_counted",
            "Status events added to the per-campaign counters, by status.",
            ["status"],
            registry=registry,
        )
        self.dropped = Counter(
            "mailgate_autostop_events_dropped",
            "Status events left out of the campaign counters after counting failed on every"
            " delivery (a quarter of an hour), by status.",
            ["status"],
            registry=registry,
        )
        self.stops = Counter(
            "mailgate_autostop_campaigns_stopped",
            "AMS mailings stopped automatically, by the rate that crossed its threshold.",
            ["reason"],
            registry=registry,
        )
        self.stop_failures = Counter(
            "mailgate_autostop_stop_failures",
            "stopMailing calls that failed (retried until AUTOSTOP_MAX_ATTEMPTS).",
            registry=registry,
        )
        self.resumes = Counter(
            "mailgate_autostop_campaigns_resumed",
            "Automatically stopped mailings resumed through ams.control.resume.",
            registry=registry,
        )
        self.stopped_now = Gauge(
            "mailgate_autostop_campaigns_stopped_now",
            "Campaigns currently stopped automatically (not resumed yet).",
            registry=registry,
        )
