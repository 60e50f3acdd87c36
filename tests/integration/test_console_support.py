"""Shared helpers for the operator console's tests (holds no tests)."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
from mailgate_core import schemas as s
from mailgate_core.ids import new_ulid
from mailgate_core.nats import publish_event
from mailgate_fakes.testing import eventually

ADMIN_USER = "root-admin"
ADMIN_PASSWORD = "correct horse battery staple"

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found is not None, "no CSRF field in the page"
    return found.group(1)


async def create_operator(ledger: Any, username: str, password: str, **extra: Any) -> Any:
    status, body, _ = await ledger.call(
        "POST", "/v1/operators", {"username": username, "password": password, **extra}
    )
    assert status == 201, body
    return body


async def create_account(ledger: Any, name: str) -> dict[str, Any]:
    status, body, _ = await ledger.call(
        "POST", "/v1/accounts", {"name": name, "allowed_sender_domains": ["example.com"]}
    )
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def accept_message(
    js: Any,
    account_id: str,
    recipient: str,
    *,
    campaign_id: str | None = None,
    external_id: str | None = None,
) -> str:
    mailgate_id = new_ulid()
    await publish_event(
        js,
        s.MailAccepted(
            message=s.MessageRef(
                mailgate_id=mailgate_id,
                account_id=account_id,
                recipient=recipient,
                external_id=external_id,
                campaign_id=campaign_id,
            ),
            mail_from="news@example.com",
            credential="ams",
            message_id_header=f"<{mailgate_id}@mailgate.test>",
            subject_line="Spring sale",
            size=2048,
        ),
    )
    return mailgate_id


async def wait_recorded(ledger: Any, *mailgate_ids: str) -> None:
    async def all_there() -> bool:
        for mailgate_id in mailgate_ids:
            status, _, _ = await ledger.call("GET", f"/v1/messages/{mailgate_id}")
            if status != 200:
                return False
        return True

    await eventually(all_there, timeout=20, what="messages recorded")


class Browserless:
    """A console session driven with plain HTTP (cookie jar, forms, no redirects followed)."""

    def __init__(self, base: str, *, headers: dict[str, str] | None = None) -> None:
        self.base = base
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            timeout=aiohttp.ClientTimeout(total=15),
            headers=headers or {},
        )
        self.csrf = ""

    async def close(self) -> None:
        await self.http.close()

    async def get(self, path: str) -> tuple[int, str, Any]:
        async with self.http.get(self.base + path, allow_redirects=False) as resp:
            text = await resp.text()
            if resp.status == 200 and 'name="csrf"' in text:
                self.csrf = csrf_of(text)
            return resp.status, text, resp.headers

    async def post(
        self, path: str, data: dict[str, Any] | aiohttp.FormData, *, csrf: str | None = "auto"
    ) -> tuple[int, str, Any]:
        if isinstance(data, dict):
            data = dict(data)
            if csrf == "auto":
                data["csrf"] = self.csrf
            elif csrf is not None:
                data["csrf"] = csrf
        async with self.http.post(self.base + path, data=data, allow_redirects=False) as resp:
            return resp.status, await resp.text(), resp.headers

    async def sign_in(self, username: str, password: str) -> tuple[int, str, Any]:
        status, _, _ = await self.get("/console/login")
        assert status == 200
        return await self.post("/console/login", {"username": username, "password": password})


async def seed_demo(js: Any, account_id: str, *, campaign_id: str = "73") -> dict[str, str]:
    """A small, realistic history: a campaign's messages through Postal, opens by a person
    and by an image proxy, a click, a bounce, a dead-lettered webhook, AMS progress, an
    automatic stop and Postmaster days. Returns named mailgate ids."""
    import time

    now = time.time()
    recipients = [
        "ivan@example.ru",
        "olga@example.ru",
        "petr@example.com",
        "anna@example.org",
        "bounce@example.net",
    ]
    ids: dict[str, str] = {}
    for index, recipient in enumerate(recipients):
        mailgate_id = await accept_message(
            js, account_id, recipient, campaign_id=campaign_id, external_id=f"AMS-{1000 + index}"
        )
        ids[recipient] = mailgate_id
        ref = s.MessageRef(
            mailgate_id=mailgate_id,
            account_id=account_id,
            recipient=recipient,
            external_id=f"AMS-{1000 + index}",
            campaign_id=campaign_id,
        )
        postal_id = 5000 + index
        await publish_event(
            js, s.MailSubmitted(message=ref, postal_id=postal_id, postal_token=f"tok{index}")
        )
        event = "MessageDeliveryFailed" if recipient.startswith("bounce") else "MessageSent"
        await publish_event(
            js,
            s.PostalEvent(
                event=event,
                postal_timestamp=now + 1,
                mailgate_id=mailgate_id,
                postal_id=postal_id,
                status="HardFail" if event == "MessageDeliveryFailed" else "Sent",
                output="550 5.1.1 user unknown" if event == "MessageDeliveryFailed" else "250 OK",
                recipient=recipient,
                tag=campaign_id,
            ),
        )
    ivan = ids["ivan@example.ru"]
    await publish_event(
        js,
        s.TrackOpen(
            mailgate_id=ivan, campaign_id=campaign_id, audience="human", user_agent="Firefox"
        ),
    )
    await publish_event(
        js,
        s.TrackOpen(
            mailgate_id=ids["olga@example.ru"],
            campaign_id=campaign_id,
            audience="prefetch",
            user_agent="GoogleImageProxy",
        ),
    )
    await publish_event(
        js,
        s.TrackClick(
            mailgate_id=ivan,
            campaign_id=campaign_id,
            url="https://shop.example.com/sale",
            audience="human",
        ),
    )
    status = s.StatusEvent(
        name="opened",
        timestamp=int(now),
        message=s.MessageRef(mailgate_id=ivan, account_id=account_id, recipient="ivan@example.ru"),
    )
    await publish_event(
        js,
        s.WebhookDeadLettered(
            status=status,
            endpoint_id="01JENDPOINT000000000000000",
            url="https://crm.example.com/hooks/mailgate",
            attempts=12,
            reason="http 503",
            http_status=503,
        ),
    )
    await publish_event(
        js,
        s.AmsMailingProgress(
            mailing_id=campaign_id,
            name="Spring sale",
            state="running",
            percent_done=42.0,
            total=20000,
            sent=8400,
        ),
    )
    await publish_event(
        js,
        s.CampaignAutoStopped(
            event_id=f"autostop-{campaign_id}-1",
            occurred_at=now - 3600,
            campaign_id=campaign_id,
            account_id=account_id,
            mailing_id=campaign_id,
            reason="hard_bounce_rate",
            rate=0.061,
            threshold=0.05,
            min_volume=500,
            sent=800,
            hard_bounced=49,
        ),
    )
    await publish_event(
        js,
        s.CampaignResumed(
            event_id=f"autoresume-{campaign_id}-1",
            occurred_at=now - 1800,
            campaign_id=campaign_id,
            account_id=account_id,
            mailing_id=campaign_id,
            requested_by="alice",
        ),
    )
    import datetime as dt

    for days_ago in range(3):
        day = (dt.date.today() - dt.timedelta(days=days_ago)).isoformat()
        await publish_event(
            js,
            s.PostmasterDaily(
                domain="example.com",
                date=day,
                messages_sent=12000 - days_ago * 900,
                delivered=11800 - days_ago * 900,
                read=4100,
                spam=35,
                complaints=3,
                reputation=0.93,
            ),
        )
    return ids
