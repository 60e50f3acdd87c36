"""Pure rules of the ledger follow-ups: complaint and Unknown facts, Postmaster day rows."""

from __future__ import annotations

import datetime as dt

from mailgate_core import schemas as s
from mailgate_ledger.ingest import postmaster_rows
from mailgate_ledger.status import classify


def test_a_complaint_is_complained_with_its_feedback_type_and_suppresses() -> None:
    fact = classify(
        s.PostalEvent(
            event="Complaint",
            postal_timestamp=1_700_000_000.0,
            mailgate_id="01JABCDEFGHJKMNPQRSTVWXYZ0",
            status="abuse",
            details="abuse report",
        )
    )
    assert (fact.name, fact.status, fact.suppresses) == ("complained", "complained", True)
    assert fact.data == {"feedback_type": "abuse", "details": "abuse report"}
    assert fact.mailgate_id == "01JABCDEFGHJKMNPQRSTVWXYZ0" and fact.timestamp == 1_700_000_000


def test_an_unknown_inbound_event_is_history_only_and_linked_to_no_message() -> None:
    fact = classify(s.PostalEvent(event="Unknown", postal_timestamp=1.0, postal_id=5))
    assert (fact.name, fact.status) == ("postal.Unknown", None)
    assert fact.mailgate_id is None and fact.postal_id is None


def test_unsubscribe_data_has_one_click_user_agent_and_ip() -> None:
    fact = classify(
        s.TrackUnsubscribe(mailgate_id="x", one_click=True, user_agent="UA", ip="1.2.3.4")
    )
    assert fact.data == {"one_click": True, "user_agent": "UA", "ip": "1.2.3.4"}


def test_postmaster_rows_keep_the_newest_poll_per_day_and_skip_bad_dates() -> None:
    events = [
        s.PostmasterDaily(event_id="a", occurred_at=10, domain="Ex.com", date="2026-01-02"),
        s.PostmasterDaily(event_id="b", occurred_at=20, domain="ex.com", date="2026-01-02"),
        s.PostmasterDaily(event_id="c", occurred_at=5, domain="ex.com", date="2026-01-02"),
        s.PostmasterDaily(
            event_id="d", occurred_at=5, domain="ex.com", date="2026-01-02", msgtype="t"
        ),
        s.PostmasterDaily(event_id="e", occurred_at=5, domain="ex.com", date="02.01.2026"),
    ]
    rows = postmaster_rows(events)
    assert [(r[0], r[1], r[2], r[13]) for r in rows] == [
        ("ex.com", "", dt.date(2026, 1, 2), "b"),
        ("ex.com", "t", dt.date(2026, 1, 2), "d"),
    ]
