"""Prometheus metrics of smtp-ingest, registered on the service's own registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class Metrics:
    accepted: Counter
    skipped: Counter
    rejected: Counter
    auth_failures: Counter
    data_to_ack: Histogram
    sessions: Gauge
    rewrite_fallbacks: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        return cls(
            accepted=Counter(
                "mailgate_smtp_messages_accepted",
                "Recipient copies accepted and published as mail.accepted.",
                registry=registry,
            ),
            skipped=Counter(
                "mailgate_smtp_messages_skipped",
                "Recipient copies accepted but suppressed (published as mail.skipped).",
                registry=registry,
            ),
            rejected=Counter(
                "mailgate_smtp_messages_rejected",
                "SMTP commands refused, by reason.",
                ["reason"],
                registry=registry,
            ),
            auth_failures=Counter(
                "mailgate_smtp_auth_failures",
                "Failed AUTH attempts (bad credentials, IP not allowed, throttled).",
                registry=registry,
            ),
            data_to_ack=Histogram(
                "mailgate_smtp_data_to_ack_seconds",
                "From the end of DATA to the 250 reply (rewrite, object store, JetStream acks).",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
                registry=registry,
            ),
            sessions=Gauge(
                "mailgate_smtp_sessions",
                "Open SMTP connections.",
                registry=registry,
            ),
            rewrite_fallbacks=Counter(
                "mailgate_smtp_rewrite_fallbacks",
                "Messages (or recipient copies) whose body could not be rewritten and was "
                "passed through with the headers-only rewrite.",
                registry=registry,
            ),
        )
