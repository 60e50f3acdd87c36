"""AMS getMailings/getRelaysSendingStates -> progress events and gauges (pure)."""

import msgspec
import pytest
from mailgate_core.ams import Mailing, RelaySendingState
from mailgate_stats_poller.poller import AmsMetrics
from mailgate_stats_poller.progress import same_progress, speed_per_minute, to_event
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
RELAYS = [
    RelaySendingState(id=1, name="relay1.example.net", state="active", sent=3000, errors=4),
    RelaySendingState(id=2, name="", state="disabled", enabled=False, sent=1250, errors=0),
]


def mailings(result: list[dict]) -> list[Mailing]:
    return msgspec.convert(result, list[Mailing], strict=False)


def test_get_mailings_result_becomes_progress_events() -> None:
    first, second = (to_event(m) for m in mailings(RESULT))
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
    assert second.mailing_id == "74" and second.sent == 0 and second.relays == []


def test_relay_states_travel_in_the_event_named_by_relay() -> None:
    event = to_event(mailings(RESULT)[0], RELAYS)
    assert [(r.relay, r.sent, r.errors, r.enabled) for r in event.relays] == [
        ("relay1.example.net", 3000, 4, True),
        ("2", 1250, 0, False),
    ]


def test_only_a_changed_mailing_counts_as_new_progress() -> None:
    a = to_event(mailings(RESULT)[0])
    b = to_event(mailings(RESULT)[0])
    assert a.event_id != b.event_id and same_progress(a, b)
    moved = to_event(mailings([{**RESULT[0], "approxSpeed": "10/min"}])[0])
    assert not same_progress(a, moved)


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
    running, idle = mailings(RESULT)
    metrics.update([to_event(running, RELAYS), to_event(idle)])
    value = registry.get_sample_value
    assert value("mailgate_ams_mailing_sent", {"mailing": "73"}) == 4250
    assert value("mailgate_ams_mailing_progress_ratio", {"mailing": "73"}) == 0.425
    assert value("mailgate_ams_mailing_speed_per_second", {"mailing": "73"}) == 20.0
    assert value("mailgate_ams_mailing_state", {"mailing": "73", "state": "running"}) == 1
    relay = {"mailing": "73", "relay": "relay1.example.net"}
    assert value("mailgate_ams_relay_sent", relay) == 3000
    assert value("mailgate_ams_relay_errors", relay) == 4
    assert value("mailgate_ams_relay_enabled", {"mailing": "73", "relay": "2"}) == 0

    paused = mailings([{**RESULT[0], "state": "paused"}])
    metrics.update([to_event(paused[0])])
    assert value("mailgate_ams_mailing_state", {"mailing": "73", "state": "running"}) is None
    assert value("mailgate_ams_mailing_state", {"mailing": "73", "state": "paused"}) == 1
    assert value("mailgate_ams_mailing_sent", {"mailing": "74"}) is None
    assert value("mailgate_ams_relay_sent", relay) is None
