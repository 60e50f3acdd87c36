"""AMS getMailings parsing and progress events (pure)."""

import pytest
from mailgate_stats_poller.ams_client import AmsRpcError, parse_mailings
from mailgate_stats_poller.poller import AmsMetrics
from mailgate_stats_poller.progress import speed_per_minute, to_event
from prometheus_client import CollectorRegistry

RESULT = [
    {
        "id": 73,
        "name": "Spring sale",
        "type": "regular",
        "state": "running",
        "createDate": "2024-03-01 10:00:00",
        "lastStartDate": "2024-03-02 09:00:00",
        "approxSpeed": "1200/min",
        "progressInfo": {
            "percentDone": "42.5",
            "total": 10000,
            "sent": 4250,
            "notSent": 5700,
            "bad": 30,
            "refused": 20,
            "excluded": 0,
            "opened": 800,
            "clicks": 95,
        },
    },
    {"id": "74", "name": "Idle one", "state": "idle", "approxSpeed": "0/min"},
]


def test_get_mailings_result_becomes_progress_events() -> None:
    events = [to_event(m) for m in parse_mailings(RESULT)]
    first, second = events
    assert first.mailing_id == "73" and first.state == "running"
    assert first.percent_done == 42.5 and first.total == 10000 and first.sent == 4250
    assert (first.not_sent, first.bad, first.refused, first.opened, first.clicks) == (
        5700,
        30,
        20,
        800,
        95,
    )
    assert first.approx_speed_per_min == 1200.0
    assert first.subject() == "stats.ams.mailing"
    assert second.mailing_id == "74" and second.sent == 0


def test_a_wrapped_list_is_tolerated_and_garbage_is_an_error() -> None:
    assert [m.id for m in parse_mailings({"mailings": RESULT})] == [73, "74"]
    with pytest.raises(AmsRpcError):
        parse_mailings([{"name": "no id"}])


@pytest.mark.parametrize(
    ("text", "per_min"),
    [
        ("0/min", 0.0),
        ("120/min", 120.0),
        ("2/sec", 120.0),
        ("1,5/min", 1.5),
        ("60/hour", 1.0),
        ("", 0.0),
        ("fast", 0.0),
    ],
)
def test_speed_is_read_as_messages_per_minute(text: str, per_min: float) -> None:
    assert speed_per_minute(text) == per_min


def test_gauges_follow_the_current_poll_and_forget_vanished_mailings() -> None:
    registry = CollectorRegistry()
    metrics = AmsMetrics(registry)
    events = [to_event(m) for m in parse_mailings(RESULT)]
    metrics.update(events)
    value = registry.get_sample_value
    assert value("mailgate_ams_mailing_sent", {"mailing": "73"}) == 4250
    assert value("mailgate_ams_mailing_progress_ratio", {"mailing": "73"}) == 0.425
    assert value("mailgate_ams_mailing_speed_per_second", {"mailing": "73"}) == 20.0
    assert value("mailgate_ams_mailing_state", {"mailing": "73", "state": "running"}) == 1

    paused = [to_event(m) for m in parse_mailings([{**RESULT[0], "state": "paused"}])]
    metrics.update(paused)
    assert value("mailgate_ams_mailing_state", {"mailing": "73", "state": "running"}) is None
    assert value("mailgate_ams_mailing_state", {"mailing": "73", "state": "paused"}) == 1
    assert value("mailgate_ams_mailing_sent", {"mailing": "74"}) is None
