"""Every metric a dashboard or an alert rule uses exists in the code (or is a recording rule
defined in deploy/prometheus/rules)."""

from __future__ import annotations

import json

import pytest
from deploy_support import (
    DEPLOY,
    code_metric_families,
    code_sample_names,
    dashboard_exprs,
    literal_metric_names,
    promql_metric_names,
    recorded_names,
    rule_exprs,
    unknown_metrics,
)

DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))


def test_metric_classes_cover_every_literal_metric() -> None:
    """The registry the other tests read holds every metric named in the source."""
    missing = literal_metric_names() - set(code_metric_families())
    assert not missing, f"add their metrics class to deploy_support._metric_objects: {missing}"


def test_code_sample_names_follow_prometheus_suffixes() -> None:
    names = code_sample_names()
    assert "mailgate_smtp_messages_accepted_total" in names
    assert "mailgate_smtp_messages_accepted" not in names  # counters are stored with _total
    assert {
        "mailgate_smtp_data_to_ack_seconds_bucket",
        "mailgate_smtp_data_to_ack_seconds_count",
    } <= names
    assert "mailgate_consumer_pending_messages" in names
    assert "mailgate_ledger_campaign_status_total" in names
    assert "mailgate_webhook_endpoint_lag_seconds" in names


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_metrics_exist_in_code(path) -> None:
    exprs = dashboard_exprs(json.loads(path.read_text()))
    assert exprs, "a dashboard without queries"
    assert not unknown_metrics(exprs, code_sample_names(), recorded_names())


def test_alert_and_recording_rule_metrics_exist_in_code() -> None:
    exprs = rule_exprs()
    assert len(exprs) > 20
    assert not unknown_metrics(exprs, code_sample_names(), recorded_names())


def test_checker_reports_a_metric_the_code_does_not_have() -> None:
    dashboard = {
        "panels": [
            {
                "type": "row",
                "panels": [{"targets": [{"expr": "rate(mailgate_no_such_total[5m])"}]}],
            },
            {
                "targets": [
                    {"expr": 'sum(rate(mailgate_smtp_messages_accepted_total{x="mailgate_y"}[5m]))'}
                ]
            },
            {"targets": [{"expr": "mailgate:not_recorded:rate5m"}]},
            {"targets": [{"expr": "mailgate_smtp_messages_accepted"}]},  # counter without _total
        ]
    }
    bad = unknown_metrics(dashboard_exprs(dashboard), code_sample_names(), recorded_names())
    assert sorted(n for names in bad.values() for n in names) == [
        "mailgate:not_recorded:rate5m",
        "mailgate_no_such_total",
        "mailgate_smtp_messages_accepted",
    ]


def test_promql_names_ignore_labels_and_strings() -> None:
    expr = (
        'sum by (mailgate_label) (rate(mailgate_a_total{consumer="mailgate_b"}[5m]))'
        " / on () group_left mailgate:c:rate5m"
    )
    assert promql_metric_names(expr) == {"mailgate_a_total", "mailgate:c:rate5m"}
