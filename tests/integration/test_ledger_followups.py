"""ledger follow-ups: feedback-loop complaints, inbound Unknown facts, Postmaster daily
statistics (upserted by day, served by the admin API) and tracking data on status events."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import msgspec
import nats.js.errors
from mailgate_core import schemas as s
from mailgate_core.ids import new_ulid
from mailgate_core.nats import publish_event
from mailgate_core.records import SuppressionRecord, suppression_key
from mailgate_fakes.testing import eventually
from test_ledger_support import start_ledger, status_events

__all__ = ["start_ledger"]

ACCOUNT = "01HACCOUNT000000000000000F"


def _accepted(mid: str) -> s.MailAccepted:
    return s.MailAccepted(
        message=s.MessageRef(
            mailgate_id=mid,
            account_id=ACCOUNT,
            recipient="Olga@Example.org",
            external_id="ams-7",
            campaign_id="88",
        ),
        mail_from="news@example.com",
        credential="ams",
        message_id_header=f"<{mid}@mailgate.test>",
        subject_line="Hello",
        size=100,
        raw=b"Subject: x\r\n\r\nbody",
    )


async def _wait_status(js: Any, expected: int) -> list[s.StatusEvent]:
    async def check() -> list[s.StatusEvent] | None:
        events = await status_events(js)
        return events if len(events) >= expected else None

    return await eventually(check, what=f"{expected} status events")


async def _fetch(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def test_a_feedback_loop_complaint_is_complained_and_suppresses_the_recipient(
    start_ledger, js, database_url
) -> None:
    ledger = await start_ledger()
    mid = new_ulid()
    unknown = s.PostalEvent(
        event_id="inb-test-unknown",
        event="Unknown",
        postal_timestamp=time.time(),
        postal_id=999,
        recipient="fbl@mailgate.test",
        details="inbound message not recognised (not_a_report)",
        payload={"source": "inbound", "reason": "not_a_report"},
    )
    complaint = s.PostalEvent(
        event_id=f"arf-{mid}",
        event="Complaint",
        postal_timestamp=time.time() + 1,
        mailgate_id=mid,
        status="abuse",
        details="abuse report from Mail.ru FBL",
        recipient="olga@example.org",
        payload={"source": "inbound", "feedback": {"feedback_type": "abuse"}},
    )
    await publish_event(js, _accepted(mid))
    await publish_event(js, unknown)
    await publish_event(js, complaint)

    async def complained() -> dict[str, Any] | None:
        code, body, _ = await ledger.call("GET", f"/v1/messages/{mid}")
        return dict(body) if code == 200 and body["status"] == "complained" else None

    detail = await eventually(complained, what="message complained")
    assert [e["name"] for e in detail["events"]] == ["accepted", "complained"]

    events = await _wait_status(js, 1)
    assert [e.name for e in events] == ["complained"]
    assert events[0].subject() == "status.complained"
    assert events[0].data["feedback_type"] == "abuse"
    assert events[0].message.recipient == "Olga@Example.org"
    assert events[0].source_event_id == f"arf-{mid}"

    rows = await _fetch(database_url, "SELECT * FROM suppressions WHERE account_id = $1", ACCOUNT)
    assert [(r["email"], r["reason"]) for r in rows] == [("olga@example.org", "complained")]

    kv = await js.key_value("suppressions")

    async def in_kv() -> SuppressionRecord | None:
        try:
            entry = await kv.get(suppression_key(ACCOUNT, "olga@example.org"))
        except nats.js.errors.KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value, type=SuppressionRecord)

    record = await eventually(in_kv, what="suppression in KV")
    assert record.reason == "complained" and record.account_id == ACCOUNT

    # postal.Unknown: in history, no customer event, linked to no message.
    history = await _fetch(
        database_url, "SELECT * FROM events WHERE event_id = $1", "inb-test-unknown"
    )
    assert len(history) == 1
    assert history[0]["name"] == "postal.Unknown" and history[0]["status_name"] is None
    assert history[0]["mailgate_id"] is None and not history[0]["status_pending"]
    assert len(await status_events(js)) == 1


async def test_open_click_and_unsubscribe_status_data_carry_the_tracking_details(
    start_ledger, js
) -> None:
    await start_ledger()
    mid = new_ulid()
    await publish_event(js, _accepted(mid))
    await publish_event(
        js,
        s.TrackOpen(
            mailgate_id=mid,
            audience="prefetch",
            audience_reason="apple_mpp",
            user_agent="Mozilla/5.0 (AppleMail)",
            ip="17.58.0.1",
        ),
    )
    await publish_event(
        js,
        s.TrackClick(
            mailgate_id=mid,
            url="https://example.com/p?x=1",
            audience="human",
            audience_reason="user_agent",
            user_agent="Mozilla/5.0 (Windows)",
            ip="198.51.100.7",
        ),
    )
    await publish_event(
        js, s.TrackUnsubscribe(mailgate_id=mid, one_click=True, user_agent="Gmail", ip="192.0.2.9")
    )
    by_name = {e.name: e.data for e in await _wait_status(js, 3)}
    assert by_name["opened"] == {
        "audience": "prefetch",
        "audience_reason": "apple_mpp",
        "user_agent": "Mozilla/5.0 (AppleMail)",
        "ip": "17.58.0.1",
        "automated": True,
    }
    assert by_name["clicked"] == {
        "url": "https://example.com/p?x=1",
        "audience": "human",
        "audience_reason": "user_agent",
        "user_agent": "Mozilla/5.0 (Windows)",
        "ip": "198.51.100.7",
        "automated": False,
    }
    assert by_name["unsubscribed"] == {"one_click": True, "user_agent": "Gmail", "ip": "192.0.2.9"}


def _day(event_id: str, polled_at: float, **values: Any) -> s.PostmasterDaily:
    fields: dict[str, Any] = {"domain": "example.com", "date": "2026-11-20"} | values
    return s.PostmasterDaily(event_id=event_id, occurred_at=polled_at, **fields)


async def _recorded(database_url: str, event_id: str) -> bool:
    rows = await _fetch(database_url, "SELECT 1 FROM event_ids WHERE event_id = $1", event_id)
    return bool(rows)


async def test_a_revised_postmaster_day_replaces_its_row_and_is_served_by_the_admin_api(
    start_ledger, js, database_url
) -> None:
    t = time.time()
    # Published before the ledger starts, so the three land in one batch.
    await publish_event(js, _day("pm-first", t, messages_sent=100, delivered=90))
    await publish_event(js, _day("pm-revised", t + 10, messages_sent=120, delivered=115, spam=3))
    await publish_event(js, _day("pm-stale", t - 10, messages_sent=1))
    ledger = await start_ledger()

    async def day_rows() -> list[asyncpg.Record] | None:
        rows = await _fetch(database_url, "SELECT * FROM postmaster_daily ORDER BY msgtype")
        return rows or None

    rows = await eventually(day_rows, what="postmaster row")
    assert len(rows) == 1
    assert rows[0]["event_id"] == "pm-revised" and rows[0]["msgtype"] == ""
    assert (rows[0]["messages_sent"], rows[0]["delivered"], rows[0]["spam"]) == (120, 115, 3)

    # A late, older poll of the same day changes nothing; a newer one replaces the values.
    await publish_event(js, _day("pm-late", t + 5, messages_sent=7))
    await eventually(lambda: _recorded(database_url, "pm-late"), what="late poll recorded")
    rows = await _fetch(database_url, "SELECT event_id, messages_sent FROM postmaster_daily")
    assert [tuple(r) for r in rows] == [("pm-revised", 120)]
    await publish_event(
        js, _day("pm-newest", t + 20, messages_sent=130, reputation=0.9, trend=-0.1)
    )
    await publish_event(js, _day("pm-promo", t, msgtype="promo", messages_sent=50))
    await publish_event(js, _day("pm-other", t, domain="other.org", date="2026-11-25"))
    await eventually(lambda: _recorded(database_url, "pm-other"), what="other day recorded")
    rows = await _fetch(
        database_url, "SELECT * FROM postmaster_daily WHERE domain = 'example.com' ORDER BY 2"
    )
    assert [(r["msgtype"], r["event_id"], r["messages_sent"]) for r in rows] == [
        ("", "pm-newest", 130),
        ("promo", "pm-promo", 50),
    ]

    code, body, _ = await ledger.call(
        "GET", "/v1/postmaster/daily?domain=Example.com&date_from=2026-11-20&date_to=2026-11-20"
    )
    assert code == 200
    items = body["items"]
    assert [(i["msgtype"], i["messages_sent"]) for i in items] == [(None, 130), ("promo", 50)]
    assert items[0]["date"] == "2026-11-20" and items[0]["event_id"] == "pm-newest"
    assert items[0]["reputation"] == 0.9 and items[0]["trend"] == -0.1

    code, body, _ = await ledger.call("GET", "/v1/postmaster/daily?msgtype=promo")
    assert [i["event_id"] for i in body["items"]] == ["pm-promo"]
    code, body, _ = await ledger.call("GET", "/v1/postmaster/daily?date_from=2026-11-21")
    assert [i["domain"] for i in body["items"]] == ["other.org"]

    code, body, headers = await ledger.call("GET", "/v1/postmaster/daily?date_from=20-11-2026")
    assert code == 400 and headers["Content-Type"].startswith("application/problem+json")
    assert "date_from" in body["detail"]
    code, body, _ = await ledger.call(
        "GET", "/v1/postmaster/daily?date_from=2026-11-21&date_to=2026-11-20"
    )
    assert code == 400
    code, _, _ = await ledger.call("GET", "/v1/postmaster/daily", token=None)
    assert code == 401
