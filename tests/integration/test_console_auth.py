"""Operator console without a browser: operators, sign-in, cookies, CSRF, roles, viewer
isolation, throttling and sign-out, against a real ledger (NATS + Postgres)."""

from __future__ import annotations

import asyncio
import io
import json
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import asyncpg
from mailgate_core import schemas as s
from mailgate_core.nats import publish_event
from mailgate_fakes.testing import eventually
from test_ams_reporter_support import start_reporter
from test_console_support import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    Browserless,
    accept_message,
    create_account,
    create_operator,
    csrf_of,
    seed_demo,
    wait_recorded,
)
from test_ledger_support import ADMIN_TOKEN, start_ledger, status_events

__all__ = ["start_ledger", "start_reporter"]


async def _cli(ledger: Any, *argv: str) -> tuple[int, str, str]:
    from mailgate_cli.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    argv_full = ["--url", ledger.base, "--token", ADMIN_TOKEN, *argv]
    code = await asyncio.to_thread(main, argv_full, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _set_cookie(headers: Any, name: str) -> Any:
    for raw in headers.getall("Set-Cookie", []):
        cookie = SimpleCookie()
        cookie.load(raw)
        if name in cookie:
            return cookie[name]
    return None


async def test_operators_are_created_through_the_admin_api(start_ledger, database_url) -> None:
    ledger = await start_ledger()
    created = await create_operator(ledger, "alice", ADMIN_PASSWORD)
    assert created["role"] == "admin" and "password" not in created
    status, body, _ = await ledger.call(
        "POST", "/v1/operators", {"username": "ALICE", "password": ADMIN_PASSWORD}
    )
    assert status == 409, body  # usernames are case-insensitive
    generated = await create_operator(ledger, "bob", None)  # type: ignore[arg-type]
    assert len(generated["password"]) >= 20
    status, body, _ = await ledger.call(
        "POST", "/v1/operators", {"username": "carol", "role": "viewer"}
    )
    assert status == 400 and "account_id" in body["detail"]
    status, body, _ = await ledger.call(
        "POST", "/v1/operators", {"username": "dave", "password": "short"}
    )
    assert status == 400
    status, body, _ = await ledger.call("POST", "/v1/operators", {"username": "x"}, token=None)
    assert status == 401
    # the same from the command line (how the first admin is made)
    code, out, err = await _cli(ledger, "operators", "create", "erin")
    assert code == 0, err
    erin = json.loads(out)
    assert erin["role"] == "admin" and len(erin["password"]) >= 20
    code, out, err = await _cli(ledger, "operators", "disable", erin["id"])
    assert code == 0 and json.loads(out)["disabled"] is True
    code, out, err = await _cli(ledger, "operators", "create", "erin")
    assert code == 1 and "409" in err
    status, listing, _ = await ledger.call("GET", "/v1/operators")
    assert [o["username"] for o in listing["items"]] == ["alice", "bob", "erin"]
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval("SELECT password_hash FROM operators WHERE username='alice'")
    finally:
        await conn.close()
    assert stored.startswith("scrypt$") and ADMIN_PASSWORD not in stored


async def test_sign_in_sets_a_safe_session_cookie_and_pages_need_it(start_ledger) -> None:
    ledger = await start_ledger()
    await create_operator(ledger, ADMIN_USER, ADMIN_PASSWORD)
    web = Browserless(ledger.base)
    try:
        status, _, headers = await web.get("/console/messages")
        assert status == 303 and headers["Location"].startswith("/console/login?next=")

        status, html, _ = await web.sign_in(ADMIN_USER, "wrong password!!")
        assert status == 401 and "Wrong username or password." in html
        status, _, headers = await web.sign_in(ADMIN_USER, ADMIN_PASSWORD)
        assert status == 303 and headers["Location"] == "/console/"
        cookie = _set_cookie(headers, "mg_session")
        assert cookie is not None
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Lax"
        assert cookie["path"] == "/console"
        assert not cookie["secure"]  # plain HTTP here
        status, html, _ = await web.get("/console/")
        assert status == 200 and ADMIN_USER in html
        assert "Messages today by status" in html
    finally:
        await web.close()


async def _sign_in_via_proxy(base: str) -> Any:
    """Sign in as a TLS-terminating proxy would forward it (cookies sent by hand: a client
    keeps Secure cookies off plain HTTP)."""
    headers = {"X-Forwarded-Proto": "https"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base + "/console/login", headers=headers) as resp:
            html = await resp.text()
            login_cookie = _set_cookie(resp.headers, "mg_login_csrf")
        form = {"username": ADMIN_USER, "password": ADMIN_PASSWORD, "csrf": csrf_of(html)}
        async with http.post(
            base + "/console/login",
            data=form,
            headers={**headers, "Cookie": f"mg_login_csrf={login_cookie.value}"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303, await resp.text()
            return login_cookie, _set_cookie(resp.headers, "mg_session")


async def test_the_cookie_is_secure_behind_a_trusted_https_proxy(start_ledger) -> None:
    ledger = await start_ledger(console_trust_proxy=True)
    await create_operator(ledger, ADMIN_USER, ADMIN_PASSWORD)
    login_cookie, session = await _sign_in_via_proxy(ledger.base)
    assert login_cookie["secure"] is True and session["secure"] is True
    assert session["httponly"] is True

    untrusted = await start_ledger()  # same database; the header alone proves nothing
    _, session = await _sign_in_via_proxy(untrusted.base)
    assert not session["secure"]


async def test_every_form_needs_its_csrf_token(start_ledger, js) -> None:
    ledger = await start_ledger()
    await create_operator(ledger, ADMIN_USER, ADMIN_PASSWORD)
    web = Browserless(ledger.base)
    try:
        await web.get("/console/login")
        status, _, _ = await web.post(
            "/console/login", {"username": ADMIN_USER, "password": ADMIN_PASSWORD}, csrf=None
        )
        assert status == 403
        assert (await web.sign_in(ADMIN_USER, ADMIN_PASSWORD))[0] == 303
        await web.get("/console/accounts")
        for token in (None, "forged-token"):
            status, html, _ = await web.post("/console/accounts", {"name": "Evil"}, csrf=token)
            assert status == 403 and "CSRF" in html
        status, listing, _ = await ledger.call("GET", "/v1/accounts")
        assert listing["items"] == []
        status, html, _ = await web.post("/console/accounts", {"name": "Acme", "tracking": "on"})
        assert status == 200 and "Shown once" in html and "mgt_" in html
        status, listing, _ = await ledger.call("GET", "/v1/accounts")
        assert [a["name"] for a in listing["items"]] == ["Acme"]
        account_id = listing["items"][0]["id"]
        page = f"/console/accounts/{account_id}"

        # an SMTP credential: created with limits, then limits changed and the password rotated
        status, html, _ = await web.post(
            f"{page}/credentials",
            {"name": "AMS", "daily_limit": "500", "allowed_ips": "203.0.113.0/24"},
        )
        assert status == 200 and "Shown once" in html
        status, creds, _ = await ledger.call("GET", f"/v1/accounts/{account_id}/credentials")
        cred = creds["items"][0]
        assert (cred["daily_limit"], cred["allowed_ips"]) == (500, ["203.0.113.0/24"])
        status, _, headers = await web.post(
            f"{page}/credentials/{cred['username']}/limits",
            {"rate_per_second": "5", "daily_limit": "", "allowed_ips": "198.51.100.7"},
        )
        assert status == 303 and "notice=Saved." in headers["Location"]
        status, creds, _ = await ledger.call("GET", f"/v1/accounts/{account_id}/credentials")
        cred = creds["items"][0]
        assert (cred["rate_per_second"], cred["daily_limit"]) == (5.0, None)
        assert cred["allowed_ips"] == ["198.51.100.7/32"]
        status, html, _ = await web.post(f"{page}/credentials/{cred['username']}/rotate", {})
        assert status == 200 and "Shown once" in html

        # a webhook endpoint, and a test event for it alone (ams-reporter delivers it)
        status, html, _ = await web.post(
            f"{page}/webhooks", {"url": "http://127.0.0.1:9/hooks/mailgate"}
        )
        assert status == 200 and "Shown once" in html
        status, hooks, _ = await ledger.call("GET", f"/v1/accounts/{account_id}/webhooks")
        endpoint_id = hooks["items"][0]["id"]
        status, _, headers = await web.post(f"{page}/webhooks/{endpoint_id}/test", {})
        assert status == 303 and "Test+event+queued" in headers["Location"]
        sent = [e for e in await status_events(js) if e.data.get("test")]
        assert [(e.name, e.endpoint_ids, e.message.account_id) for e in sent] == [
            ("delivered", [endpoint_id], account_id)
        ]

        # suppressions: add one, import a CSV, export it again
        status, _, _ = await web.post(f"{page}/suppressions", {"email": "Ivan@Example.ru"})
        assert status == 303
        form = aiohttp.FormData()
        form.add_field("csrf", web.csrf)
        form.add_field("file", b"email,reason\r\na@example.org,complained\r\n", filename="list.csv")
        status, _, headers = await web.post(f"{page}/suppressions/import", form)
        assert status == 303 and "Imported" in headers["Location"]
        status, csv_text, _ = await web.get(f"{page}/suppressions.csv")
        assert status == 200
        assert "a@example.org,complained" in csv_text and "ivan@example.ru,manual" in csv_text
    finally:
        await web.close()


async def test_a_viewer_sees_only_its_own_account(start_ledger, js) -> None:
    ledger = await start_ledger()
    mine = await create_account(ledger, "Mine")
    theirs = await create_account(ledger, "Theirs")
    own_id = await accept_message(js, mine["id"], "ivan@example.ru", campaign_id="73")
    other_id = await accept_message(js, theirs["id"], "petr@example.ru", campaign_id="73")
    secret_campaign = await accept_message(js, theirs["id"], "anna@example.ru", campaign_id="99")
    await wait_recorded(ledger, own_id, other_id, secret_campaign)
    await create_operator(ledger, "viewer1", ADMIN_PASSWORD, role="viewer", account_id=mine["id"])
    web = Browserless(ledger.base)
    try:
        assert (await web.sign_in("viewer1", ADMIN_PASSWORD))[0] == 303

        def listed(html: str, mailgate_id: str) -> bool:
            return f'href="/console/messages/{mailgate_id}"' in html

        status, html, _ = await web.get("/console/messages")
        assert status == 200 and listed(html, own_id) and not listed(html, other_id)
        # asking for the other account's messages explicitly changes nothing
        status, html, _ = await web.get(
            f"/console/messages?email=petr@example.ru&account_id={theirs['id']}"
        )
        assert not listed(html, other_id)
        status, html, _ = await web.get(f"/console/messages?id={other_id}")
        assert status == 200 and not listed(html, other_id) and "Nothing found." in html
        assert (await web.get(f"/console/messages/{own_id}"))[0] == 200
        assert (await web.get(f"/console/messages/{other_id}"))[0] == 404
        # campaign 73 is shared: the viewer's page counts its own message only
        status, html, _ = await web.get("/console/campaigns/73")
        assert status == 200 and "<small>(1)</small>" in html
        assert (await web.get("/console/campaigns/99"))[0] == 404
        status, html, _ = await web.get("/console/campaigns")
        assert "/console/campaigns/73" in html and "/console/campaigns/99" not in html
        status, _, headers = await web.get("/console/accounts")
        assert status == 303 and headers["Location"] == f"/console/accounts/{mine['id']}"
        assert (await web.get(f"/console/accounts/{mine['id']}"))[0] == 200
        assert (await web.get(f"/console/accounts/{theirs['id']}"))[0] == 404
        assert (await web.get(f"/console/accounts/{theirs['id']}/suppressions"))[0] == 404
        assert (await web.get("/console/operators"))[0] == 403
        assert (await web.get("/console/postmaster"))[0] == 403
        status, html, _ = await web.get("/console/")
        assert status == 200 and "<small>(1)</small>" in html  # today's messages: its own
        # read-only: a valid CSRF token does not make a viewer an admin
        status, _, _ = await web.post(
            f"/console/accounts/{mine['id']}/suppressions", {"email": "x@example.com"}
        )
        assert status == 403
        status, _, _ = await web.post("/console/campaigns/73/stop", {})
        assert status == 403
    finally:
        await web.close()


async def test_the_message_page_lists_delivered_webhooks_next_to_dead_letters(
    start_ledger, js
) -> None:
    ledger = await start_ledger()
    await create_operator(ledger, ADMIN_USER, ADMIN_PASSWORD)
    mid = await accept_message(js, "01HACCOUNT000000000000000A", "ivan@example.ru")
    ref = s.MessageRef(
        mailgate_id=mid, account_id="01HACCOUNT000000000000000A", recipient="ivan@example.ru"
    )
    status = s.StatusEvent(name="opened", timestamp=1700000000, message=ref)
    await publish_event(
        js,
        s.WebhookDelivered(
            event_id=f"wd-{status.event_id}-ep-ok",
            status_event_id=status.event_id,
            status_name="opened",
            message=ref,
            endpoint_id="ep-ok",
            url="https://ok.example.com/hook",
            http_status=202,
            attempts=2,
            duration_ms=31.0,
        ),
    )
    await publish_event(
        js,
        s.WebhookDeadLettered(
            status=status,
            endpoint_id="ep-bad",
            url="https://bad.example.com/hook",
            attempts=12,
            reason="http 503",
            http_status=503,
        ),
    )

    async def both_recorded() -> bool:
        code, body, _ = await ledger.call("GET", f"/v1/messages/{mid}/timeline")
        return code == 200 and len(body["webhook_deliveries"]) == len(body["dead_letters"]) == 1

    await eventually(both_recorded, what="delivery and dead letter recorded")
    web = Browserless(ledger.base)
    try:
        assert (await web.sign_in(ADMIN_USER, ADMIN_PASSWORD))[0] == 303
        status_code, html, _ = await web.get(f"/console/messages/{mid}")
        assert status_code == 200
        table = html[html.index('id="deliveries"') :]
        rows = table.split("<tr")[2:]  # after the header row
        delivered = next(r for r in rows if "https://ok.example.com/hook" in r)
        dead = next(r for r in rows if "https://bad.example.com/hook" in r)
        assert 'class="delivered"' in delivered
        assert "<td>2</td><td>202</td>" in delivered and "/replay" not in delivered
        assert "<td>12</td><td>503</td>" in dead and "/replay" in dead
    finally:
        await web.close()


async def test_sign_in_is_throttled_per_username(start_ledger) -> None:
    ledger = await start_ledger(console_login_max_failures=3)
    await create_operator(ledger, ADMIN_USER, ADMIN_PASSWORD)
    web = Browserless(ledger.base)
    try:
        for _ in range(3):
            assert (await web.sign_in(ADMIN_USER, "not the password"))[0] == 401
        status, html, headers = await web.sign_in(ADMIN_USER, ADMIN_PASSWORD)
        assert status == 429 and int(headers["Retry-After"]) > 0
        assert "Too many attempts" in html
        # another username from the same address is still allowed (until the IP limit)
        await create_operator(ledger, "other-admin", ADMIN_PASSWORD)
        assert (await web.sign_in("other-admin", ADMIN_PASSWORD))[0] == 303
    finally:
        await web.close()


async def test_sign_out_ends_the_session_on_the_server(start_ledger) -> None:
    ledger = await start_ledger()
    await create_operator(ledger, ADMIN_USER, ADMIN_PASSWORD)
    web = Browserless(ledger.base)
    try:
        await web.sign_in(ADMIN_USER, ADMIN_PASSWORD)
        stolen = web.http.cookie_jar.filter_cookies(aiohttp.client.URL(ledger.base + "/console/"))
        token = stolen["mg_session"].value
        await web.get("/console/")
        status, _, headers = await web.post("/console/logout", {})
        assert status == 303 and headers["Location"] == "/console/login"
    finally:
        await web.close()
    replay = aiohttp.ClientSession(cookies={"mg_session": token})
    try:
        async with replay.get(ledger.base + "/console/", allow_redirects=False) as resp:
            assert resp.status == 303  # the old cookie no longer signs anyone in
    finally:
        await replay.close()


async def test_disabling_an_operator_ends_its_sessions(start_ledger) -> None:
    ledger = await start_ledger()
    bob = await create_operator(ledger, "bob", ADMIN_PASSWORD)
    web = Browserless(ledger.base)
    try:
        await web.sign_in("bob", ADMIN_PASSWORD)
        assert (await web.get("/console/"))[0] == 200
        status, body, _ = await ledger.call(
            "PATCH", f"/v1/operators/{bob['id']}", {"disabled": True}
        )
        assert status == 200 and body["disabled"] is True
        assert (await web.get("/console/"))[0] == 303
        assert (await web.sign_in("bob", ADMIN_PASSWORD))[0] == 401
    finally:
        await web.close()


async def test_stop_without_ams_reporter_is_503_problem(start_ledger) -> None:
    ledger = await start_ledger()
    status, body, headers = await ledger.call("POST", "/v1/campaigns/73/stop", {})
    assert status == 503, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["detail"] == "ams-reporter unavailable"


async def test_stop_and_resume_go_through_ams_reporter_to_ams(start_ledger, start_reporter) -> None:
    from mailgate_fakes.ams import AmsFake

    fake = AmsFake("ams-key")
    fake.add_mailing(73, name="Spring sale", state="running", total=100)
    url = await fake.start()
    try:
        ledger = await start_ledger()
        await start_reporter(ams_api_url=url, ams_api_key="ams-key", ams_timeout_s=5.0)
        status, body, _ = await ledger.call(
            "POST", "/v1/campaigns/73/stop", {"requested_by": "alice"}
        )
        assert status == 200, body
        assert (body["state"], body["reason"], body["requested_by"]) == (
            "stopped",
            "manual",
            "alice",
        )
        assert len(fake.received("stopMailing", id=73)) == 1
        assert fake.mailings[73]["state"] == "paused"
        status, body, _ = await ledger.call("POST", "/v1/campaigns/73/resume", {})
        assert status == 200 and body["state"] == "resumed", body
        assert len(fake.received("startMailing", id=73)) == 1
        status, body, _ = await ledger.call("POST", "/v1/campaigns/404/stop", {})
        assert status == 502, body  # AMS does not know the mailing: its error is passed on
        assert "stopMailing" in body["detail"]
    finally:
        await fake.stop()


async def test_overview_and_campaign_list_count_the_history(start_ledger, js) -> None:
    ledger = await start_ledger()
    account = await create_account(ledger, "Acme")
    ids = await seed_demo(js, account["id"])

    async def settled() -> Any:
        status, body, _ = await ledger.call("GET", f"/v1/messages/{ids['ivan@example.ru']}")
        if status != 200 or body["status"] != "clicked":
            return None
        status, overview, _ = await ledger.call("GET", "/v1/overview")
        return overview if overview["statuses"]["delivered"] == 2 else None

    overview = await eventually(settled, timeout=20, what="the seeded history")
    assert overview["messages"] == 5
    assert {k: v for k, v in overview["statuses"].items() if v} == {
        "delivered": 2,
        "opened": 1,
        "clicked": 1,
        "hard_bounced": 1,
    }
    rates = overview["rates"]
    assert (rates["open_rate"], rates["human_open_rate"]) == (0.5, 0.25)  # one proxy open
    assert (rates["click_rate"], rates["hard_bounce_rate"]) == (0.25, 0.2)
    assert "ledger-mail" in {p["consumer"] for p in overview["pipeline"]}
    status, other, _ = await ledger.call("GET", "/v1/overview?account_id=nobody")
    assert status == 200 and other["messages"] == 0 and other["events"] == {}

    status, campaigns, _ = await ledger.call("GET", "/v1/campaigns")
    assert status == 200
    assert [
        (c["campaign_id"], c["messages"], c["bounced"], c["engaged"]) for c in campaigns["items"]
    ] == [("73", 5, 1, 2)]
    status, stats, _ = await ledger.call(
        "GET", f"/v1/campaigns/73/stats?account_id={account['id']}"
    )
    assert stats["messages"] == 5
    status, stats, _ = await ledger.call("GET", "/v1/campaigns/73/stats?account_id=nobody")
    assert stats["messages"] == 0 and stats["events"] == {}
