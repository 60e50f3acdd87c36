"""ledger admin API for operators: search, timeline, campaign stats, dead letters, credentials,
health, problem details and the checked-in OpenAPI document."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import nats.js.errors
from mailgate_core import schemas as s
from mailgate_core.ids import new_ulid
from mailgate_core.nats import publish_event
from mailgate_core.passwords import verify_password
from mailgate_core.records import CredentialRecord
from mailgate_fakes.testing import eventually
from test_ledger_support import start_ledger, status_events

__all__ = ["start_ledger"]

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "01HACCOUNT000000000000000A"
DAY_MS = 86_400_000


def _ref(mid: str, **extra: Any) -> s.MessageRef:
    values = {"mailgate_id": mid, "account_id": ACCOUNT, "recipient": "Ivan@Example.org"}
    return s.MessageRef(**(values | extra))


def _accepted(mid: str, **extra: Any) -> s.MailAccepted:
    return s.MailAccepted(
        message=_ref(mid, **extra),
        mail_from="news@example.com",
        credential="ams",
        message_id_header=f"<{mid}@mailgate.test>",
    )


async def _wait_message(ledger: Any, mid: str, status: str | None = None) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        code, body, _ = await ledger.call("GET", f"/v1/messages/{mid}")
        if code != 200 or (status is not None and body["status"] != status):
            return None
        return dict(body)

    return await eventually(check, what=f"message {mid} {status or ''}")


async def _ids(ledger: Any, query: str) -> list[str]:
    status, page, _ = await ledger.call("GET", f"/v1/messages?{query}")
    assert status == 200, page
    return [m["mailgate_id"] for m in page["items"]]


async def test_messages_are_found_by_any_id_email_campaign_status_and_time_range(
    start_ledger, js
) -> None:
    ledger = await start_ledger()
    now_ms = int(time.time() * 1000)
    # four messages of one campaign, accepted 40 days, 10 days, an hour and a moment ago
    mids = [new_ulid(now_ms - age) for age in (40 * DAY_MS, 10 * DAY_MS, 3_600_000, 0)]
    for i, mid in enumerate(mids):
        await publish_event(js, _accepted(mid, external_id=f"ams-{i}", campaign_id="c-9"))
    await publish_event(
        js, s.MailSubmitted(message=_ref(mids[2]), postal_id=9101, postal_token="TokenOfPostal01")
    )
    for mid in mids:
        await _wait_message(ledger, mid)
    await _wait_message(ledger, mids[2], "sent")

    newest_first = list(reversed(mids))
    assert await _ids(ledger, "campaign_id=c-9") == newest_first
    assert await _ids(ledger, "email=IVAN@example.org&campaign_id=c-9") == newest_first
    for any_id in ("ams-1", mids[1].lower()):
        assert await _ids(ledger, f"id={any_id}") == [mids[1]]
    for any_id in ("9101", "TokenOfPostal01"):
        assert await _ids(ledger, f"id={any_id}") == [mids[2]]
    assert await _ids(ledger, "campaign_id=c-9&status=sent") == [mids[2]]

    since = quote((dt.datetime.now(dt.UTC) - dt.timedelta(days=15)).isoformat())
    until = int(time.time()) - 60
    assert await _ids(ledger, f"campaign_id=c-9&since={since}") == newest_first[:3]
    assert await _ids(ledger, f"campaign_id=c-9&since={since}&until={until}") == [mids[2], mids[1]]

    # keyset pages: newest first, each page continues where the last one stopped
    status, page, _ = await ledger.call("GET", "/v1/messages?campaign_id=c-9&limit=3")
    assert [m["mailgate_id"] for m in page["items"]] == newest_first[:3]
    status, page, _ = await ledger.call(
        "GET", f"/v1/messages?campaign_id=c-9&limit=3&cursor={page['next_cursor']}"
    )
    assert [m["mailgate_id"] for m in page["items"]] == newest_first[3:]
    assert page["next_cursor"] is None

    bad_queries = ("since=yesterday", "status=lost", "postal_id=x", "cursor=not-an-id")
    for bad in (*bad_queries, f"since={until}&until={until}"):
        status, problem, headers = await ledger.call("GET", f"/v1/messages?{bad}")
        assert status == 400 and headers["Content-Type"] == "application/problem+json", bad
        assert problem["status"] == 400 and problem["detail"]


async def test_timeline_and_campaign_stats_tell_human_from_machine_engagement(
    start_ledger, js
) -> None:
    ledger = await start_ledger()
    first, second = new_ulid(), new_ulid()
    for mid in (first, second):
        await publish_event(js, _accepted(mid, campaign_id="c-7"))
        await publish_event(
            js, s.MailSubmitted(message=_ref(mid), postal_id=hash(mid) % 10**9, postal_token="t")
        )
    # Apple's proxy prefetches both; only the first recipient really opens and clicks
    for mid in (first, second):
        await publish_event(
            js, s.TrackOpen(mailgate_id=mid, audience="prefetch", user_agent="Mozilla/5.0")
        )
    await publish_event(
        js, s.TrackOpen(mailgate_id=first, audience="human", user_agent="Thunderbird/115")
    )
    await publish_event(
        js,
        s.TrackClick(
            mailgate_id=first, url="https://example.com/sale", audience="human", user_agent="UA"
        ),
    )
    await _wait_message(ledger, first, "clicked")
    await _wait_message(ledger, second, "opened")

    status, timeline, _ = await ledger.call("GET", f"/v1/messages/{first}/timeline")
    assert status == 200 and timeline["status"] == "clicked"
    assert [t["name"] for t in timeline["timeline"]] == [
        "accepted",
        "sent",
        "opened",
        "opened",
        "clicked",
    ]
    click = timeline["timeline"][-1]["status_event"]
    assert click["name"] == "clicked" and click["emitted"] is True
    assert click["data"]["url"] == "https://example.com/sale"
    assert click["data"]["audience"] == "human" and click["data"]["user_agent"] == "UA"
    assert timeline["timeline"][0].get("status_event") is None

    status, stats, _ = await ledger.call("GET", "/v1/campaigns/c-7/stats")
    assert status == 200 and stats["messages"] == 2
    opened = stats["events"]["opened"]
    assert (opened["total"], opened["unique"], opened["unique_non_machine"]) == (3, 2, 1)
    assert opened["by_audience"]["machine"] == {"total": 2, "unique": 2}
    assert opened["by_audience"]["human"] == {"total": 1, "unique": 1}
    assert stats["events"]["clicked"]["by_audience"]["human"] == {"total": 1, "unique": 1}
    assert stats["statuses"]["clicked"] == 1 and stats["statuses"]["opened"] == 1


async def test_dead_letters_are_listed_and_replayed_to_their_endpoint_only(
    start_ledger, js
) -> None:
    ledger = await start_ledger()
    mid = new_ulid()
    await publish_event(js, _accepted(mid))
    await publish_event(
        js, s.MailSubmitted(message=_ref(mid), postal_id=424242, postal_token="tok")
    )
    sent = await eventually(lambda: _first_status(js), what="the sent status event")
    dead = s.WebhookDeadLettered(
        event_id=f"dl-{sent.event_id}-ep1",
        status=sent,
        endpoint_id="ep1",
        url="https://hooks.example.com/ams",
        attempts=31,
        reason="http 503",
        http_status=503,
    )
    await publish_event(js, dead)
    await js.publish(dead.subject(), s.encode(dead), headers={"Nats-Msg-Id": "again"})

    async def listed() -> list[dict[str, Any]] | None:
        _, page, _ = await ledger.call("GET", "/v1/dead-letters?state=pending")
        return page["items"] or None

    items = await eventually(listed, what="the dead letter listed")
    assert len(items) == 1  # the repeat was a duplicate fact
    letter = items[0]
    assert letter["endpoint_id"] == "ep1" and letter["status_event"] == "sent"
    assert letter["http_status"] == 503 and letter["mailgate_id"] == mid
    status, one, _ = await ledger.call("GET", f"/v1/dead-letters/{letter['id']}")
    assert status == 200 and one["event"]["event_id"] == sent.event_id
    status, timeline, _ = await ledger.call("GET", f"/v1/messages/{mid}/timeline")
    assert timeline["timeline"][-1]["name"] == "webhook_dead_lettered"
    assert [d["id"] for d in timeline["dead_letters"]] == [letter["id"]]

    before = len(await status_events(js))
    for replay in (1, 2):  # a deliberate second replay is not swallowed by de-duplication
        status, replayed, _ = await ledger.call("POST", f"/v1/dead-letters/{letter['id']}/replay")
        assert status == 202 and replayed["replay_count"] == replay
    events = await eventually(
        lambda: _events_after(js, before, 2), what="two replays on the STATUS stream"
    )
    for event in events:
        assert event.event_id == sent.event_id  # same webhook-id: receivers de-duplicate
        assert event.endpoint_ids == ["ep1"] and event.message == sent.message
        assert event.occurred_at > sent.occurred_at  # a fresh retry window
    status, page, _ = await ledger.call("GET", "/v1/dead-letters?state=pending")
    assert page["items"] == []
    status, bulk, _ = await ledger.call(
        "POST", "/v1/dead-letters/replay", {"endpoint_id": "ep1", "include_replayed": True}
    )
    assert status == 202 and bulk["replayed"] == 1
    status, refused, _ = await ledger.call("POST", "/v1/dead-letters/replay", {})
    assert status == 400 and "endpoint_id" in refused["detail"]
    assert (await ledger.call("POST", "/v1/dead-letters/nope/replay"))[0] == 404


async def _first_status(js: Any) -> s.StatusEvent | None:
    events = await status_events(js)
    return events[0] if events else None


async def _events_after(js: Any, index: int, count: int) -> list[s.StatusEvent] | None:
    events = (await status_events(js))[index:]
    return events if len(events) >= count else None


async def test_credential_passwords_rotate_and_credentials_disable_through_kv(
    start_ledger, js
) -> None:
    ledger = await start_ledger()
    status, account, _ = await ledger.call(
        "POST", "/v1/accounts", {"name": "acme", "allowed_sender_domains": ["example.com"]}
    )
    base = f"/v1/accounts/{account['id']}/credentials"
    status, cred, _ = await ledger.call("POST", base, {"name": "ams", "username": "ams-main"})
    assert status == 201
    status, rotated, _ = await ledger.call("POST", f"{base}/ams-main/password")
    assert status == 200 and rotated["password"] != cred["password"]
    kv = await js.key_value("credentials")

    async def record() -> CredentialRecord | None:
        try:
            entry = await kv.get("ams-main")
        except nats.js.errors.KeyNotFoundError:
            return None
        value = msgspec.json.decode(entry.value, type=CredentialRecord)
        return value if verify_password(rotated["password"], value.password_hash) else None

    current = await eventually(record, what="the new password in KV")
    assert not verify_password(cred["password"], current.password_hash)
    status, off, _ = await ledger.call("PATCH", f"{base}/ams-main", {"disabled": True})
    assert status == 200 and off["disabled"] is True
    entry = await kv.get("ams-main")
    assert msgspec.json.decode(entry.value, type=CredentialRecord).disabled is True
    status, got, _ = await ledger.call("GET", f"{base}/ams-main")
    assert status == 200 and got["disabled"] is True and "password" not in got
    assert (await ledger.call("POST", f"{base}/nobody/password"))[0] == 404


async def test_health_problems_and_the_checked_in_openapi_document(start_ledger) -> None:
    ledger = await start_ledger()

    async def healthy() -> dict[str, Any] | None:
        status, body, _ = await ledger.call("GET", "/v1/health")
        return body if status == 200 else None

    health = await eventually(healthy, what="healthy")
    assert health["status"] == "ok" and health["failing"] == []
    assert health["outbox_pending"] == 0 and health["dead_letters_pending"] == 0
    assert health["partitions"]["messages"]["count"] >= 3
    assert set(health["consumers"]) == {
        "ledger-mail",
        "ledger-postal",
        "ledger-track",
        "ledger-stats",
    }
    assert (await ledger.call("GET", "/v1/health", token=None))[0] == 401

    for method, path in (("GET", "/v1/nothing-here"), ("PUT", "/v1/accounts")):
        status, problem, headers = await ledger.call(method, path)
        assert headers["Content-Type"] == "application/problem+json", path
        assert status in (404, 405) and problem["status"] == status

    status, served, _ = await ledger.call("GET", "/v1/openapi.json", token=None)
    checked_in = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert status == 200 and served == checked_in, "run `make openapi`"
    routes = {
        "/v1/messages/{mailgate_id}/timeline",
        "/v1/dead-letters",
        "/v1/dead-letters/{dead_letter_id}/replay",
        "/v1/accounts/{account_id}/credentials/{username}/password",
        "/v1/health",
    }
    assert routes <= set(served["paths"])
