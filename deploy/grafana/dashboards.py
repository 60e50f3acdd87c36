# ruff: noqa: E501 - PromQL queries read better unbroken
"""Generates the Grafana dashboards in deploy/grafana/dashboards/ (JSON, schemaVersion 39).

    python deploy/grafana/dashboards.py            # rewrite the JSON files
    python deploy/grafana/dashboards.py --check    # exit 1 when they are stale (tests do this)

Dashboards as code keep panel ids unique, the datasource uid in one place and every query in
a reviewable diff; tests check each metric a query names exists in the services' code.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASOURCE_UID = "mailgate-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
OUT_DIR = Path(__file__).resolve().parent / "dashboards"


@dataclass
class Board:
    uid: str
    title: str
    description: str
    variables: list[dict[str, Any]] = field(default_factory=list)
    panels: list[dict[str, Any]] = field(default_factory=list)
    _y: int = 0
    _x: int = 0
    _row_h: int = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
                "panels": [],
            }
        )
        self._y += 1

    def _newline(self) -> None:
        if self._x:
            self._y += self._row_h
            self._x = 0
            self._row_h = 0

    def add(self, panel: dict[str, Any], w: int = 12, h: int = 8) -> None:
        if self._x + w > 24:
            self._newline()
        panel["gridPos"] = {"h": h, "w": w, "x": self._x, "y": self._y}
        self._x += w
        self._row_h = max(self._row_h, h)
        self.panels.append(panel)

    def render(self) -> dict[str, Any]:
        for number, panel in enumerate(self.panels, start=1):
            panel["id"] = number
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["mailgate"],
            "timezone": "browser",
            "editable": False,
            "graphTooltip": 1,
            "refresh": "30s",
            "schemaVersion": 39,
            "version": 1,
            "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": self.variables},
            "annotations": {"list": []},
            "links": [
                {
                    "type": "dashboards",
                    "tags": ["mailgate"],
                    "asDropdown": True,
                    "title": "mailgate",
                    "includeVars": False,
                    "keepTime": True,
                }
            ],
            "panels": self.panels,
        }


def target(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "refId": ref,
    }
    if instant:
        out |= {"instant": True, "range": False, "format": "table"}
    return out


def _targets(queries: list[tuple[str, str]], *, instant: bool = False) -> list[dict[str, Any]]:
    return [
        target(expr, legend, chr(ord("A") + i), instant=instant)
        for i, (expr, legend) in enumerate(queries)
    ]


def timeseries(
    title: str,
    queries: list[tuple[str, str]],
    unit: str = "short",
    description: str = "",
    *,
    stack: bool = False,
    thresholds: list[tuple[str, float | None]] | None = None,
) -> dict[str, Any]:
    custom: dict[str, Any] = {"fillOpacity": 10, "lineWidth": 1, "showPoints": "never"}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults: dict[str, Any] = {"unit": unit, "custom": custom}
    if thresholds:
        defaults["thresholds"] = _thresholds(thresholds)
        custom["thresholdsStyle"] = {"mode": "line"}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _targets(queries),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def _thresholds(steps: list[tuple[str, float | None]]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


def stat(
    title: str,
    expr: str,
    unit: str = "short",
    description: str = "",
    thresholds: list[tuple[str, float | None]] | None = None,
) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [target(expr)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": _thresholds(thresholds or [("green", None)]),
            },
            "overrides": [],
        },
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"},
    }


def table(title: str, queries: list[tuple[str, str]], description: str = "") -> dict[str, Any]:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": _targets(queries, instant=True),
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
        "transformations": [{"id": "merge", "options": {}}],
    }


def variable(name: str, label: str, query: str, *, include_all: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": include_all,
        "allValue": ".*",
        "current": {},
        "sort": 1,
    }


def q(quantile: float, metric: str, by: str = "", matcher: str = "") -> str:
    group = f"le, {by}" if by else "le"
    return (
        f"histogram_quantile({quantile}, sum by ({group}) "
        f"(rate({metric}_bucket{matcher}[$__rate_interval])))"
    )


# --- dashboards ---------------------------------------------------------------------------


def pipeline() -> Board:
    b = Board(
        "mailgate-pipeline",
        "mailgate / Pipeline",
        "Throughput and latency per stage: SMTP in, Postal out, Postal webhooks, ledger, "
        "customer webhooks; queue lag per JetStream consumer.",
    )
    b.row("Throughput per stage")
    b.add(
        timeseries(
            "Messages through each stage",
            [
                (
                    "sum(rate(mailgate_smtp_messages_accepted_total[$__rate_interval]))",
                    "1 smtp accepted",
                ),
                (
                    "sum(rate(mailgate_smtp_messages_skipped_total[$__rate_interval]))",
                    "1 smtp skipped (suppressed)",
                ),
                (
                    "sum(rate(mailgate_postal_submitted_total[$__rate_interval]))",
                    "2 postal submitted",
                ),
                ("sum(rate(mailgate_postal_failed_total[$__rate_interval]))", "2 postal failed"),
                (
                    "sum(rate(mailgate_webhooks_received_total[$__rate_interval]))",
                    "3 postal webhooks",
                ),
                (
                    "sum(rate(mailgate_tracker_events_published_total[$__rate_interval]))",
                    "3 tracking events",
                ),
                ("sum(rate(mailgate_ledger_events_total[$__rate_interval]))", "4 ledger facts"),
                (
                    "sum(rate(mailgate_ledger_status_published_total[$__rate_interval]))",
                    "5 status events",
                ),
                (
                    'sum(rate(mailgate_webhook_deliveries_total{outcome="delivered"}[$__rate_interval]))',
                    "6 webhooks delivered",
                ),
            ],
            "ops",
            "Per second, all replicas. Numbers are the pipeline order.",
        ),
        w=24,
        h=9,
    )
    b.add(
        timeseries(
            "Customer status events by name",
            [
                (
                    "sum by (name) (rate(mailgate_ledger_status_published_total[$__rate_interval]))",
                    "{{name}}",
                )
            ],
            "ops",
            stack=True,
        )
    )
    b.add(
        timeseries(
            "Postal webhooks by event",
            [
                (
                    "sum by (event) (rate(mailgate_webhooks_received_total[$__rate_interval]))",
                    "{{event}}",
                )
            ],
            "ops",
            stack=True,
        )
    )
    b.row("Latency per stage")
    b.add(
        timeseries(
            "SMTP end of DATA to 250",
            [
                (q(0.5, "mailgate_smtp_data_to_ack_seconds"), "p50"),
                (q(0.95, "mailgate_smtp_data_to_ack_seconds"), "p95"),
                (q(0.99, "mailgate_smtp_data_to_ack_seconds"), "p99"),
            ],
            "s",
            "Rewrite, object store and the JetStream ack of mail.accepted.",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Postal API request duration (p95)",
            [(q(0.95, "mailgate_postal_request_duration_seconds", "endpoint"), "{{endpoint}}")],
            "s",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Ledger batch duration (p95)",
            [(q(0.95, "mailgate_ledger_batch_seconds", "stream"), "{{stream}}")],
            "s",
            "Decode, Postgres transaction and status publish of one batch.",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Customer webhook attempt duration",
            [
                (q(0.5, "mailgate_webhook_delivery_seconds"), "p50"),
                (q(0.95, "mailgate_webhook_delivery_seconds"), "p95"),
            ],
            "s",
        ),
        w=12,
    )
    b.add(
        timeseries(
            "Status event to customer webhook (lag)",
            [
                (q(0.5, "mailgate_webhook_lag_seconds"), "p50"),
                (q(0.95, "mailgate_webhook_lag_seconds"), "p95"),
                (q(0.99, "mailgate_webhook_lag_seconds"), "p99"),
            ],
            "s",
        ),
        w=12,
    )
    b.row("Queue lag per consumer (JetStream)")
    b.add(
        timeseries(
            "Pending (not yet delivered) per consumer",
            [
                (
                    "max by (stream, consumer) (mailgate_consumer_pending_messages)",
                    "{{stream}} / {{consumer}}",
                )
            ],
            "short",
            "num_pending of each durable consumer; KEDA scales the consumers on this backlog.",
            thresholds=[("green", None), ("red", 10000)],
        )
    )
    b.add(
        timeseries(
            "Ack pending (in hand) per consumer",
            [
                (
                    "max by (stream, consumer) (mailgate_consumer_ack_pending_messages)",
                    "{{stream}} / {{consumer}}",
                )
            ],
            "short",
            "Delivered to a replica, not yet acknowledged (retries waiting count here too).",
        )
    )
    b.add(
        timeseries(
            "Ledger outbox and tracker buffer",
            [
                ("max(mailgate_ledger_outbox_pending)", "ledger outbox pending"),
                ("sum(mailgate_tracker_events_buffered)", "tracker events buffered"),
            ],
        )
    )
    b.add(
        table(
            "Services up",
            [('up{job="mailgate"}', "")],
            "1 = the replica answers /metrics.",
        )
    )
    b.row("SMTP intake and tracking")
    b.add(
        timeseries(
            "SMTP refusals by reason",
            [
                (
                    "sum by (reason) (rate(mailgate_smtp_messages_rejected_total[$__rate_interval]))",
                    "{{reason}}",
                )
            ],
            "ops",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "SMTP sessions and auth failures",
            [
                ("sum(mailgate_smtp_sessions)", "open sessions"),
                (
                    "sum(rate(mailgate_smtp_auth_failures_total[$__rate_interval]))",
                    "auth failures/s",
                ),
            ],
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Tracker requests",
            [
                (
                    "sum by (kind, result) (rate(mailgate_tracker_requests_total[$__rate_interval]))",
                    "{{kind}} {{result}}",
                ),
                (
                    "sum by (reason) (rate(mailgate_tracker_events_dropped_total[$__rate_interval]))",
                    "dropped: {{reason}}",
                ),
            ],
            "ops",
        ),
        w=8,
    )
    return b


def postal() -> Board:
    b = Board(
        "mailgate-postal",
        "mailgate / Postal",
        "postal-sender's requests to Postal and webhook-ingest's webhooks from Postal.",
    )
    b.row("Submissions (postal-sender)")
    b.add(
        stat(
            "Circuit open",
            "max(mailgate_postal_circuit_open)",
            thresholds=[("green", None), ("red", 1)],
        ),
        w=4,
        h=5,
    )
    b.add(stat("Requests in flight", "sum(mailgate_postal_requests_in_flight)"), w=4, h=5)
    b.add(stat("Submitted without final status", "max(mailgate_postal_pending_final)"), w=4, h=5)
    b.add(
        stat(
            "Reconciler leader replicas",
            "sum(mailgate_postal_reconciler_leader)",
            thresholds=[("red", None), ("green", 1)],
        ),
        w=4,
        h=5,
    )
    b.add(
        stat(
            "Failed share (1h)",
            "sum(increase(mailgate_postal_failed_total[1h])) / clamp_min(sum(increase(mailgate_postal_failed_total[1h])) + sum(increase(mailgate_postal_submitted_total[1h])), 1)",
            "percentunit",
            thresholds=[("green", None), ("orange", 0.02), ("red", 0.05)],
        ),
        w=8,
        h=5,
    )
    b.add(
        timeseries(
            "Requests by outcome",
            [
                (
                    "sum by (outcome) (rate(mailgate_postal_requests_total[$__rate_interval]))",
                    "{{outcome}}",
                )
            ],
            "ops",
            stack=True,
        )
    )
    b.add(
        timeseries(
            "Postal errors by code",
            [("sum by (code) (rate(mailgate_postal_errors_total[$__rate_interval]))", "{{code}}")],
            "ops",
            "Postal's error code (e.g. ValidationError), HTTPnnn or Timeout.",
        )
    )
    b.add(
        timeseries(
            "Failed messages by reason",
            [
                (
                    "sum by (reason) (rate(mailgate_postal_failed_total[$__rate_interval]))",
                    "{{reason}}",
                )
            ],
            "ops",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Deferred, ambiguous retries, replays",
            [
                (
                    "sum(rate(mailgate_postal_deferred_total[$__rate_interval]))",
                    "deferred (circuit open)",
                ),
                (
                    "sum(rate(mailgate_postal_ambiguous_retries_total[$__rate_interval]))",
                    "ambiguous retries",
                ),
                (
                    "sum(rate(mailgate_postal_replayed_total[$__rate_interval]))",
                    "replayed from record",
                ),
            ],
            "ops",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Reconciler",
            [
                (
                    "sum by (outcome) (rate(mailgate_postal_reconcile_checks_total[$__rate_interval]))",
                    "check {{outcome}}",
                ),
                (
                    "sum by (event) (rate(mailgate_postal_reconciled_events_total[$__rate_interval]))",
                    "learned {{event}}",
                ),
            ],
            "ops",
        ),
        w=8,
    )
    b.row("Webhooks from Postal (webhook-ingest)")
    b.add(
        timeseries(
            "Webhooks received by event",
            [
                (
                    "sum by (event) (rate(mailgate_webhooks_received_total[$__rate_interval]))",
                    "{{event}}",
                )
            ],
            "ops",
            stack=True,
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Webhooks refused by reason",
            [
                (
                    "sum by (reason) (rate(mailgate_webhooks_rejected_total[$__rate_interval]))",
                    "{{reason}}",
                )
            ],
            "ops",
            "Bad signature, not allowed address, malformed: check POSTAL_WEBHOOK_PUBLIC_KEY.",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Inbound mail (feedback loops, mailto unsubscribes)",
            [
                (
                    "sum by (kind) (rate(mailgate_inbound_messages_total[$__rate_interval]))",
                    "{{kind}}",
                ),
                (
                    "sum by (reason) (rate(mailgate_inbound_rejected_total[$__rate_interval]))",
                    "refused: {{reason}}",
                ),
            ],
            "ops",
        ),
        w=8,
    )
    return b


def webhooks() -> Board:
    b = Board(
        "mailgate-webhooks",
        "mailgate / Customer webhooks",
        "ams-reporter's deliveries to customer endpoints: lag, failures, retries and dead "
        "letters per endpoint (endpoint = its id in the admin API).",
        variables=[
            variable(
                "endpoint", "Endpoint", "label_values(mailgate_webhook_attempts_total, endpoint)"
            )
        ],
    )
    sel = '{endpoint=~"$endpoint"}'
    b.row("All endpoints")
    b.add(
        timeseries(
            "Deliveries by outcome",
            [
                (
                    "sum by (outcome) (rate(mailgate_webhook_deliveries_total[$__rate_interval]))",
                    "{{outcome}}",
                )
            ],
            "ops",
            stack=True,
        )
    )
    b.add(
        timeseries(
            "Delivery lag (status event to 2xx)",
            [
                (q(0.5, "mailgate_webhook_lag_seconds"), "p50"),
                (q(0.95, "mailgate_webhook_lag_seconds"), "p95"),
                (q(0.99, "mailgate_webhook_lag_seconds"), "p99"),
            ],
            "s",
        )
    )
    b.row("Per endpoint")
    b.add(
        timeseries(
            "Lag of the latest successful delivery",
            [(f"max by (endpoint) (mailgate_webhook_endpoint_lag_seconds{sel})", "{{endpoint}}")],
            "s",
            thresholds=[("green", None), ("red", 900)],
        )
    )
    b.add(
        timeseries(
            "Failure ratio of attempts",
            [
                (
                    f"sum by (endpoint) (rate(mailgate_webhook_failures_total{sel}[$__rate_interval]))"
                    f" / clamp_min(sum by (endpoint) (rate(mailgate_webhook_attempts_total{sel}[$__rate_interval])), 1e-9)",
                    "{{endpoint}}",
                )
            ],
            "percentunit",
            thresholds=[("green", None), ("red", 0.5)],
        )
    )
    b.add(
        timeseries(
            "Attempts and failures",
            [
                (
                    f"sum by (endpoint) (rate(mailgate_webhook_attempts_total{sel}[$__rate_interval]))",
                    "{{endpoint}} attempts",
                ),
                (
                    f"sum by (endpoint) (rate(mailgate_webhook_failures_total{sel}[$__rate_interval]))",
                    "{{endpoint}} failures",
                ),
            ],
            "ops",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Deferred (circuit open, busy)",
            [
                (
                    f"sum by (endpoint, reason) (rate(mailgate_webhook_deferred_total{sel}[$__rate_interval]))",
                    "{{endpoint}} {{reason}}",
                )
            ],
            "ops",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Dead letters",
            [
                (
                    f"sum by (endpoint) (increase(mailgate_webhook_dead_letters_total{sel}[$__rate_interval]))",
                    "{{endpoint}}",
                )
            ],
            "short",
            "Given up after RETRY_DEADLINE_S; replay with `mailgate dead-letters replay-all`.",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Circuit breaker state (0 closed, 1 half-open, 2 open)",
            [(f"max by (endpoint) (mailgate_webhook_breaker_state{sel})", "{{endpoint}}")],
        )
    )
    b.add(
        timeseries(
            "Retry stream and batches",
            [
                (
                    "sum(rate(mailgate_webhook_retries_queued_total[$__rate_interval]))",
                    "moved to retry stream/s",
                ),
                (
                    'max(mailgate_consumer_pending_messages{consumer="ams-reporter-retry"})',
                    "retry backlog",
                ),
                (q(0.95, "mailgate_webhook_batch_items"), "batch size p95"),
            ],
        )
    )
    return b


def campaigns() -> Board:
    b = Board(
        "mailgate-campaigns",
        "mailgate / Campaigns",
        "Bounce, complaint and unsubscribe rates per campaign (AMS mailing id), automatic "
        "stops, AMS mailing progress.",
        variables=[
            variable(
                "campaign",
                "Campaign",
                "label_values(mailgate_ledger_campaign_status_total, campaign)",
            )
        ],
    )
    sel = '{campaign=~"$campaign"}'
    b.row("Rates per campaign (last hour)")
    b.add(
        timeseries(
            "Hard bounce rate (hard_bounced / sent)",
            [(f"mailgate:campaign_hard_bounce_ratio:1h{sel}", "{{campaign}}")],
            "percentunit",
            "Auto-stop default: 5% once 500 were sent.",
            thresholds=[("green", None), ("red", 0.05)],
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Complaint rate (complained / delivered)",
            [(f"mailgate:campaign_complaint_ratio:1h{sel}", "{{campaign}}")],
            "percentunit",
            "Auto-stop default: 0.3% once 1000 were sent.",
            thresholds=[("green", None), ("red", 0.003)],
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Unsubscribe rate (unsubscribed / delivered)",
            [(f"mailgate:campaign_unsubscribe_ratio:1h{sel}", "{{campaign}}")],
            "percentunit",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Status events per campaign",
            [
                (
                    f"sum by (campaign, status) (rate(mailgate_ledger_campaign_status_total{sel}[$__rate_interval]))",
                    "{{campaign}} {{status}}",
                )
            ],
            "ops",
        ),
        w=24,
    )
    b.add(
        table(
            "Campaign totals (since the ledger replicas started)",
            [(f"sum by (campaign, status) (mailgate_ledger_campaign_status_total{sel})", "")],
            "Cumulative per ledger process; exact totals: GET /v1/campaigns/{id}/stats.",
        ),
        w=24,
    )
    b.row("Automatic stops")
    b.add(
        stat(
            "Campaigns stopped now",
            "max(mailgate_autostop_campaigns_stopped_now)",
            thresholds=[("green", None), ("orange", 1)],
        ),
        w=6,
        h=5,
    )
    b.add(
        stat("Stops (24h)", "sum(increase(mailgate_autostop_campaigns_stopped_total[24h]))"),
        w=6,
        h=5,
    )
    b.add(
        stat(
            "Stop call failures (24h)",
            "sum(increase(mailgate_autostop_stop_failures_total[24h]))",
            thresholds=[("green", None), ("red", 1)],
        ),
        w=6,
        h=5,
    )
    b.add(
        stat("Resumes (24h)", "sum(increase(mailgate_autostop_campaigns_resumed_total[24h]))"),
        w=6,
        h=5,
    )
    b.add(
        timeseries(
            "Automatic stops by reason",
            [
                (
                    "sum by (reason) (increase(mailgate_autostop_campaigns_stopped_total[$__rate_interval]))",
                    "{{reason}}",
                )
            ],
        )
    )
    b.add(
        timeseries(
            "Events counted for auto-stop",
            [
                (
                    "sum by (status) (rate(mailgate_autostop_events_counted_total[$__rate_interval]))",
                    "{{status}}",
                )
            ],
            "ops",
        )
    )
    b.row("AMS mailings (stats-poller)")
    msel = '{mailing=~"$campaign"}'
    b.add(
        timeseries(
            "Progress",
            [(f"max by (mailing) (mailgate_ams_mailing_progress_ratio{msel})", "{{mailing}}")],
            "percentunit",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Speed",
            [(f"max by (mailing) (mailgate_ams_mailing_speed_per_second{msel})", "{{mailing}}")],
            "ops",
        ),
        w=8,
    )
    b.add(
        timeseries(
            "AMS bad / sent",
            [
                (
                    f"max by (mailing) (mailgate_ams_mailing_bad{msel}) / clamp_min(max by (mailing) (mailgate_ams_mailing_sent{msel}), 1)",
                    "{{mailing}}",
                )
            ],
            "percentunit",
        ),
        w=8,
    )
    return b


def postmaster() -> Board:
    b = Board(
        "mailgate-postmaster",
        "mailgate / Mail.ru Postmaster",
        "Reputation, spam, complaints and trend per DKIM domain (msgtype = campaign; empty = "
        "the whole domain), DNS troubles, polling health. Values are of the latest complete "
        "Postmaster day.",
        variables=[
            variable("domain", "Domain", "label_values(mailgate_postmaster_delivered, domain)"),
            variable(
                "msgtype",
                "Msgtype",
                'label_values(mailgate_postmaster_delivered{domain=~"$domain"}, msgtype)',
            ),
        ],
    )
    dsel = '{domain=~"$domain", msgtype=""}'
    msel = '{domain=~"$domain", msgtype=~"$msgtype"}'
    b.row("Per domain")
    b.add(
        timeseries(
            "Reputation",
            [(f"max by (domain) (mailgate_postmaster_reputation{dsel})", "{{domain}}")],
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Trend",
            [(f"max by (domain) (mailgate_postmaster_trend{dsel})", "{{domain}}")],
            description="Below zero: reputation is falling.",
            thresholds=[("red", None), ("green", 0)],
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Spam share (spam / delivered)",
            [
                (
                    f"max by (domain) (mailgate_postmaster_spam{dsel}) / clamp_min(max by (domain) (mailgate_postmaster_delivered{dsel}), 1)",
                    "{{domain}} spam",
                ),
                (
                    f"max by (domain) (mailgate_postmaster_probably_spam{dsel}) / clamp_min(max by (domain) (mailgate_postmaster_delivered{dsel}), 1)",
                    "{{domain}} probably spam",
                ),
            ],
            "percentunit",
            thresholds=[("green", None), ("red", 0.05)],
        ),
        w=8,
    )
    b.add(
        timeseries(
            "Sent, delivered, read",
            [
                (f"max by (domain) (mailgate_postmaster_messages_sent{dsel})", "{{domain}} sent"),
                (f"max by (domain) (mailgate_postmaster_delivered{dsel})", "{{domain}} delivered"),
                (f"max by (domain) (mailgate_postmaster_read{dsel})", "{{domain}} read"),
            ],
        )
    )
    b.add(
        timeseries(
            "Complaints",
            [(f"max by (domain) (mailgate_postmaster_complaints{dsel})", "{{domain}}")],
        )
    )
    b.row("DNS troubles")
    b.add(
        table(
            "Current DNS troubles (SPF/DKIM/DMARC)",
            [
                (
                    'max by (domain, check, code) (mailgate_postmaster_dns_trouble{domain=~"$domain"}) > 0',
                    "",
                )
            ],
            "One row per trouble Postmaster reports; none is good.",
        ),
        w=16,
    )
    b.add(
        stat(
            "Domains with DNS trouble",
            'count(count by (domain) (mailgate_postmaster_dns_trouble{domain=~"$domain"} > 0)) or vector(0)',
            thresholds=[("green", None), ("red", 1)],
        ),
        w=8,
    )
    b.row("Per campaign (msgtype)")
    b.add(
        timeseries(
            "Spam share per campaign",
            [
                (
                    f"max by (domain, msgtype) (mailgate_postmaster_spam{msel}) / clamp_min(max by (domain, msgtype) (mailgate_postmaster_delivered{msel}), 1)",
                    "{{domain}} {{msgtype}}",
                )
            ],
            "percentunit",
        )
    )
    b.add(
        timeseries(
            "Read share per campaign",
            [
                (
                    f"max by (domain, msgtype) (mailgate_postmaster_read{msel}) / clamp_min(max by (domain, msgtype) (mailgate_postmaster_delivered{msel}), 1)",
                    "{{domain}} {{msgtype}}",
                )
            ],
            "percentunit",
        )
    )
    b.row("Polling health")
    b.add(
        stat(
            "Since the last complete poll",
            "time() - max(mailgate_postmaster_last_success_timestamp_seconds)",
            "s",
            thresholds=[("green", None), ("orange", 7200), ("red", 21600)],
        ),
        w=6,
        h=5,
    )
    b.add(
        stat(
            "Refresh token rejected",
            "max(mailgate_postmaster_auth_failed)",
            thresholds=[("green", None), ("red", 1)],
        ),
        w=6,
        h=5,
    )
    b.add(stat("Domains polled", "max(mailgate_postmaster_domains)"), w=6, h=5)
    b.add(
        stat(
            "Rate-limited answers (24h)",
            "sum(increase(mailgate_postmaster_rate_limited_total[24h]))",
            thresholds=[("green", None), ("orange", 1)],
        ),
        w=6,
        h=5,
    )
    b.add(
        timeseries(
            "Postmaster requests by status",
            [
                (
                    "sum by (method, status) (rate(mailgate_postmaster_requests_total[$__rate_interval]))",
                    "{{method}} {{status}}",
                )
            ],
            "ops",
        )
    )
    b.add(
        timeseries(
            "Cycles and failed requests",
            [
                (
                    "sum by (result) (increase(mailgate_postmaster_cycles_total[$__rate_interval]))",
                    "cycle {{result}}",
                ),
                (
                    "sum by (reason) (increase(mailgate_postmaster_failed_requests_total[$__rate_interval]))",
                    "failed {{reason}}",
                ),
            ],
        )
    )
    return b


BOARDS = {
    "mailgate-pipeline.json": pipeline,
    "mailgate-postal.json": postal,
    "mailgate-webhooks.json": webhooks,
    "mailgate-campaigns.json": campaigns,
    "mailgate-postmaster.json": postmaster,
}


def render_all() -> dict[str, str]:
    return {
        name: json.dumps(make().render(), indent=2, ensure_ascii=False) + "\n"
        for name, make in BOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when the files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render_all().items():
        path = OUT_DIR / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale dashboards (run python {__file__}): {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
