"""What stats-poller asks Postmaster for and what the answers become (pure)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import msgspec
import pytest
from mailgate_core.ams import Mailing
from mailgate_stats_poller.postmaster import DayStats, DomainTroubles, Trouble
from mailgate_stats_poller.postmaster_poller import PostmasterMetrics
from mailgate_stats_poller.schedule import (
    MAX_AGE_DAYS,
    StatRequest,
    Window,
    active_msgtypes,
    chunks,
    cursor_key,
    daily_event,
    day_range,
    gauge_day,
    local_day,
    plan_cycle,
    trouble_check,
)
from prometheus_client import CollectorRegistry

TODAY = date(2024, 5, 20)
W = Window(repoll_days=3, initial_days=30, chunk_days=31)


def test_a_new_domain_is_backfilled_initial_days() -> None:
    assert day_range(TODAY, None, W) == (TODAY - timedelta(days=29), TODAY)


def test_a_known_domain_repolls_the_recent_days_only() -> None:
    assert day_range(TODAY, TODAY, W) == (TODAY - timedelta(days=2), TODAY)


def test_after_downtime_the_missed_days_are_backfilled() -> None:
    cursor = TODAY - timedelta(days=10)
    assert day_range(TODAY, cursor, W) == (cursor - timedelta(days=2), TODAY)


def test_backfill_never_reaches_past_the_one_year_window() -> None:
    start, _ = day_range(TODAY, TODAY - timedelta(days=900), W)
    assert start == TODAY - timedelta(days=MAX_AGE_DAYS)
    start, _ = day_range(TODAY, None, Window(initial_days=5000))
    assert (TODAY - start).days <= 365


def test_ranges_are_split_into_chunks_oldest_first() -> None:
    parts = chunks(date(2024, 1, 1), date(2024, 3, 1), 31)
    assert parts[0] == (date(2024, 1, 1), date(2024, 1, 31))
    assert parts[-1][1] == date(2024, 3, 1)
    covered = sum((b - a).days + 1 for a, b in parts)
    assert covered == (date(2024, 3, 1) - date(2024, 1, 1)).days + 1
    assert chunks(TODAY, TODAY, 31) == [(TODAY, TODAY)]


def test_a_cycle_polls_every_domain_and_every_msgtype_of_it() -> None:
    cursors = {("a.ru", None): TODAY, ("b.ru", None): TODAY, ("a.ru", "73"): TODAY}
    plan = plan_cycle(["a.ru", "b.ru"], ["73"], cursors, TODAY, W)
    assert [(r.domain, r.msgtype) for r in plan] == [
        ("a.ru", None),
        ("b.ru", None),
        ("a.ru", "73"),
        ("b.ru", "73"),
    ]
    assert plan[0] == StatRequest("a.ru", None, TODAY - timedelta(days=2), TODAY)
    assert plan[3].date_from == TODAY - timedelta(days=29)  # no cursor yet for b.ru/73
    assert plan[0].key == ("stat", "a.ru")


def mailing(mid: int, state: str, started: datetime | None) -> Mailing:
    return Mailing(
        id=mid,
        state=state,
        last_start_date=started.isoformat(timespec="milliseconds") if started else None,
    )


def test_active_msgtypes_are_live_or_recently_started_mailings() -> None:
    now = datetime(2024, 5, 20, 12, tzinfo=UTC)
    mailings = [
        mailing(1, "idle", now - timedelta(days=10)),  # finished long ago
        mailing(2, "idle", now - timedelta(days=1)),  # finished yesterday
        mailing(3, "running", now - timedelta(hours=1)),
        mailing(4, "paused", None),
        mailing(5, "idle", None),
    ]
    got = active_msgtypes(mailings, now.timestamp(), active_days=3, static=["promo"])
    assert got[0] == "promo"
    assert set(got) == {"promo", "2", "3", "4"}
    assert got.index("3") < got.index("2")  # live ones first
    assert active_msgtypes(mailings, now.timestamp(), active_days=3, max_msgtypes=1) == ["3"]


def day(iso: str, **values: float) -> DayStats:
    return msgspec.convert({"date": iso, **values}, DayStats)


def test_a_repolled_unchanged_day_has_the_same_event_id_and_a_revised_one_a_new_one() -> None:
    a = daily_event("Alpha.ru", None, day("2024-05-19", delivered=10, reputation=0.5), 1.0)
    b = daily_event("alpha.ru", None, day("2024-05-19", delivered=10, reputation=0.5), 2.0)
    c = daily_event("alpha.ru", None, day("2024-05-19", delivered=11, reputation=0.5), 3.0)
    d = daily_event("alpha.ru", "73", day("2024-05-19", delivered=10, reputation=0.5), 4.0)
    assert a.event_id == b.event_id
    assert len({a.event_id, c.event_id, d.event_id}) == 3
    assert (a.domain, a.date, a.msgtype, a.delivered, a.reputation) == (
        "alpha.ru",
        "2024-05-19",
        None,
        10,
        0.5,
    )
    assert d.msgtype == "73" and d.subject() == "stats.postmaster.daily"


def test_gauges_show_the_latest_complete_day() -> None:
    days = [day("2024-05-20", delivered=1), day("2024-05-19", delivered=2), day("2024-05-18")]
    assert gauge_day(days, TODAY).date == "2024-05-19"
    assert gauge_day([day("2024-05-20")], TODAY).date == "2024-05-20"
    assert gauge_day([], TODAY) is None


@pytest.mark.parametrize(
    ("message", "check"),
    [
        ("DMARC check failed.", "dmarc"),
        ("DMARC (p=None).", "dmarc"),
        ("DKIM statistics not available", "dkim"),
        ("SPF not found.", "spf"),
        ("Something else", "other"),
    ],
)
def test_troubles_are_named_by_the_dns_check(message: str, check: str) -> None:
    assert trouble_check(message) == check


def test_one_gauge_per_dns_trouble_with_its_code_and_resolved_ones_vanish() -> None:
    registry = CollectorRegistry()
    metrics = PostmasterMetrics(registry)
    metrics.set_troubles(
        [
            DomainTroubles(
                "alphadomain.ru",
                [Trouble("DMARC check failed.", -1), Trouble("DKIM statistics not available", 0)],
            ),
            DomainTroubles("gammadomain.ru", [Trouble("SPF not found.", -2)]),
        ]
    )
    value = registry.get_sample_value
    name = "mailgate_postmaster_dns_trouble"
    assert value(name, {"domain": "alphadomain.ru", "check": "dmarc", "code": "-1"}) == 1
    assert value(name, {"domain": "alphadomain.ru", "check": "dkim", "code": "0"}) == 1
    assert value(name, {"domain": "gammadomain.ru", "check": "spf", "code": "-2"}) == 1
    metrics.set_troubles([DomainTroubles("gammadomain.ru", [Trouble("SPF not found.", -2)])])
    assert value(name, {"domain": "alphadomain.ru", "check": "dmarc", "code": "-1"}) is None
    assert value(name, {"domain": "gammadomain.ru", "check": "spf", "code": "-2"}) == 1


def test_cursor_keys_are_valid_kv_keys_and_never_collide() -> None:
    keys = {
        cursor_key("a.ru", None),
        cursor_key("a.ru", "73"),
        cursor_key("a.ru", "spring sale/ü"),
        cursor_key("m.a.ru", None),
        cursor_key("a.ru.m", None),
    }
    assert len(keys) == 5
    assert all(
        set(k) <= set("-/_=.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        for k in keys
    )


def test_postmaster_days_are_moscow_days() -> None:
    late_utc = datetime(2024, 5, 19, 22, 30, tzinfo=UTC).timestamp()  # 01:30 in Moscow
    assert local_day(late_utc) == date(2024, 5, 20)
    assert local_day(late_utc, 0) == date(2024, 5, 19)
