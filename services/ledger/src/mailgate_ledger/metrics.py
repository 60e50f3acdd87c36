"""The ledger's Prometheus metrics (registered on the service's registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class LedgerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "mailgate_ledger_events_total",
            "Facts recorded in Postgres (duplicates excluded), by subject kind.",
            ["subject_kind"],
            registry=registry,
        )
        self.duplicates = Counter(
            "mailgate_ledger_duplicate_events_total",
            "Facts consumed again with an event_id already recorded.",
            registry=registry,
        )
        self.repeated_outcomes = Counter(
            "mailgate_ledger_repeated_outcomes_total",
            "Delivery outcomes reported again for a message (reconciler and late webhook): "
            "recorded, not emitted twice.",
            ["status"],
            registry=registry,
        )
        self.rejected = Counter(
            "mailgate_ledger_rejected_messages_total",
            "Messages terminated because they did not decode as their subject's event.",
            ["stream"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "mailgate_ledger_batch_seconds",
            "Time to record one batch (decode, transaction, publish).",
            ["stream"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch_failures = Counter(
            "mailgate_ledger_batch_failures_total",
            "Batches not committed (Postgres unavailable...), negatively acknowledged.",
            ["stream"],
            registry=registry,
        )
        self.status_published = Counter(
            "mailgate_ledger_status_published_total",
            "Customer status events published to the STATUS stream.",
            ["name"],
            registry=registry,
        )
        self.outbox_pending = Gauge(
            "mailgate_ledger_outbox_pending",
            "Status events committed but not yet published.",
            registry=registry,
        )
        self.suppressions_added = Counter(
            "mailgate_ledger_suppressions_added_total",
            "Recipients suppressed, by reason.",
            ["reason"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "mailgate_ledger_dead_letters_total",
            "Webhook deliveries ams-reporter dead-lettered, recorded for replay.",
            registry=registry,
        )
        self.dead_letter_replays = Counter(
            "mailgate_ledger_dead_letter_replays_total",
            "Dead letters republished to the STATUS stream by an operator.",
            registry=registry,
        )
        self.partitions_created = Counter(
            "mailgate_ledger_partitions_created_total",
            "Monthly partitions of messages/events created.",
            registry=registry,
        )
        self.partitions_dropped = Counter(
            "mailgate_ledger_partitions_dropped_total",
            "Monthly partitions of messages/events dropped by retention.",
            registry=registry,
        )
        self.retention_deleted = Counter(
            "mailgate_ledger_retention_deleted_rows_total",
            "Rows deleted by retention outside the partitions, by table.",
            ["table"],
            registry=registry,
        )
        self.campaign_status = Counter(
            "mailgate_ledger_campaign_status_total",
            "Customer status events published, per campaign (AMS mailing id: bounded by the "
            "mailings sent, like stats-poller's mailing label) and status name.",
            ["campaign", "status"],
            registry=registry,
        )
