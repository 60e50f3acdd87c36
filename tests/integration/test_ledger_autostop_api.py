"""ledger admin API over ams-reporter's automatic campaign stops: the history the ledger
recorded from stats.campaign.*, and resume through the ams.control.resume request/reply."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from mailgate_core.nats import publish_event
from mailgate_core.schemas import CampaignAutoStopped, CampaignResumed
from mailgate_fakes.testing import eventually
from nats.aio.msg import Msg
from test_ledger_support import start_ledger

__all__ = ["start_ledger"]


async def test_autostops_lists_the_stop_and_the_resume_newest_first(start_ledger, js) -> None:
    ledger = await start_ledger()
    now = time.time()
    await publish_event(
        js,
        CampaignAutoStopped(
            event_id="autostop-73-1",
            occurred_at=now - 60,
            campaign_id="73",
            account_id="acc_1",
            mailing_id="73",
            reason="hard_bounce_rate",
            rate=0.08,
            threshold=0.05,
            min_volume=500,
            sent=600,
            hard_bounced=48,
        ),
    )
    await publish_event(
        js,
        CampaignResumed(
            event_id="autoresume-73-1",
            occurred_at=now,
            campaign_id="73",
            account_id="acc_1",
            mailing_id="73",
            requested_by="alice",
        ),
    )
    # another campaign's stop stays out of campaign 73's list
    await publish_event(
        js, CampaignAutoStopped(event_id="autostop-74-1", campaign_id="74", reason="failure_rate")
    )

    async def both_listed() -> list[dict[str, Any]] | None:
        status, body, _ = await ledger.call("GET", "/v1/campaigns/73/autostops")
        assert status == 200, body
        return body["items"] if len(body["items"]) == 2 else None

    items = await eventually(both_listed, timeout=20, what="autostop history")
    assert [i["kind"] for i in items] == ["resumed", "autostopped"]
    assert [i["event_id"] for i in items] == ["autoresume-73-1", "autostop-73-1"]
    assert items[0]["data"]["requested_by"] == "alice"
    assert items[1]["data"]["reason"] == "hard_bounce_rate"
    assert items[1]["data"]["hard_bounced"] == 48 and items[1]["generation"] == 1

    # (published last, it may commit in a later batch than campaign 73's two)
    async def other_listed() -> list[str] | None:
        status, body, _ = await ledger.call("GET", "/v1/campaigns/74/autostops")
        assert status == 200, body
        return [i["event_id"] for i in body["items"]] or None

    assert await eventually(other_listed, what="campaign 74's stop") == ["autostop-74-1"]
    status, _, _ = await ledger.call("GET", "/v1/campaigns/73/autostops", token=None)
    assert status == 401


async def test_resume_asks_ams_reporter_and_passes_its_answer_on(start_ledger, nc) -> None:
    ledger = await start_ledger()
    seen: list[dict[str, Any]] = []

    async def responder(msg: Msg) -> None:  # replies like ams-reporter's Control
        request = msgspec.json.decode(msg.data)
        seen.append(request)
        if request["campaign_id"] == "73":
            reply = {"campaign_id": "73", "state": "resumed", "generation": 1}
        else:
            reply = {
                "error": {
                    "type": "about:blank",
                    "title": "Not found",
                    "status": 404,
                    "detail": f"campaign {request['campaign_id']} was not stopped automatically",
                }
            }
        await msg.respond(msgspec.json.encode(reply))

    await nc.subscribe("ams.control.resume", queue="ams-reporter", cb=responder)
    await nc.flush()

    status, body, _ = await ledger.call(
        "POST", "/v1/campaigns/73/resume", {"requested_by": "alice"}
    )
    assert status == 200, body
    assert body == {"campaign_id": "73", "state": "resumed", "generation": 1}
    assert seen == [{"campaign_id": "73", "requested_by": "alice"}]

    status, body, headers = await ledger.call("POST", "/v1/campaigns/99/resume")  # no body
    assert status == 404, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["detail"] == "campaign 99 was not stopped automatically"
    assert seen[-1] == {"campaign_id": "99", "requested_by": ""}


async def test_resume_without_ams_reporter_is_503(start_ledger) -> None:
    ledger = await start_ledger()
    started = time.monotonic()
    status, body, headers = await ledger.call("POST", "/v1/campaigns/73/resume", {})
    assert status == 503, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == 503 and body["detail"] == "ams-reporter unavailable"
    assert time.monotonic() - started < 5  # no responders is retried quickly, not waited out
