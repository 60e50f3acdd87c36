"""The operator console in a real browser (Debian's Chromium driven by Playwright) against a
real ledger, a real ams-reporter and the AMS fake: sign in, find a message, read its
timeline, stop a campaign (AMS receives stopMailing), CSRF, viewers, throttling, sign-out."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mailgate_cli.__main__ import main as mailgate
from mailgate_fakes.ams import AmsFake
from mailgate_fakes.testing import eventually
from test_ams_reporter_support import start_reporter
from test_console_support import (
    ADMIN_PASSWORD,
    accept_message,
    create_account,
    create_operator,
    seed_demo,
    wait_recorded,
)
from test_ledger_support import ADMIN_TOKEN, start_ledger

__all__ = ["start_ledger", "start_reporter"]

CHROMIUM = "/usr/bin/chromium"
AMS_KEY = "ams-console-key"


def _require_chromium() -> None:
    if os.path.exists(CHROMIUM):
        return
    reason = f"{CHROMIUM} is missing (Debian package chromium; tools/system-packages.sh)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    _require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def ams() -> AsyncIterator[AmsFake]:
    fake = AmsFake(AMS_KEY)
    fake.add_mailing(73, name="Spring sale", state="running", total=20000)
    fake.url = await fake.start()  # type: ignore[attr-defined]
    yield fake
    await fake.stop()


async def _cli(ledger: Any, *argv: str, stdin: bytes = b"") -> str:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(
        mailgate,
        ["--url", ledger.base, "--token", ADMIN_TOKEN, *argv],
        stdin=io.BytesIO(stdin),
        stdout=out,
        stderr=err,
    )
    assert code == 0, err.getvalue()
    return out.getvalue()


async def _sign_in(page: Any, base: str, username: str, password: str) -> None:
    await page.goto(base + "/console/")
    assert "/console/login" in page.url
    await page.fill("input[name=username]", username)
    await page.fill("input[name=password]", password)
    await page.click("button[type=submit]")


async def test_an_admin_finds_a_message_and_stops_its_campaign(
    start_ledger, start_reporter, js, ams: AmsFake, browser: Any
) -> None:
    ledger = await start_ledger()
    await start_reporter(ams_api_url=ams.url, ams_api_key=AMS_KEY, ams_timeout_s=5.0)
    # the first admin, as the README says: from the command line
    await _cli(
        ledger,
        "operators",
        "create",
        "alice",
        "--password-stdin",
        stdin=b"%b\n" % ADMIN_PASSWORD.encode(),
    )
    account = await create_account(ledger, "Acme")
    ids = await seed_demo(js, account["id"])
    ivan = ids["ivan@example.ru"]

    async def history_complete() -> bool:
        status, body, _ = await ledger.call("GET", f"/v1/messages/{ivan}/timeline")
        return status == 200 and body["status"] == "clicked" and bool(body["dead_letters"])

    await eventually(history_complete, timeout=20, what="the seeded history recorded")

    page = await browser.new_page()
    await _sign_in(page, ledger.base, "alice", ADMIN_PASSWORD)
    await page.wait_for_selector("text=Messages today by status")
    assert await page.locator(".tile.status-clicked .n").inner_text() == "1"

    await page.click("nav >> text=Messages")
    await page.fill("input[name=email]", "ivan@example.ru")
    await page.click("#search button[type=submit]")
    results = page.locator("#results tbody tr")
    assert await results.count() == 1
    await results.first.locator("a").first.click()
    await page.wait_for_selector("#timeline")
    assert await page.locator("#mailgate-id").inner_text() == ivan
    assert f"Message-ID: <{ivan}@localhost>" in await page.locator("pre.headers").inner_text()
    assert "X-Postmaster-Msgtype: 73" in await page.locator("pre.headers").inner_text()
    timeline = await page.locator("#timeline").inner_text()
    for fact in ("accepted", "sent", "delivered", "opened", "clicked"):
        assert fact in timeline, fact
    deliveries = page.locator("#deliveries tbody tr")
    assert await deliveries.count() == 1
    delivery = await deliveries.first.inner_text()
    assert "crm.example.com" in delivery and "503" in delivery and "http 503" in delivery

    await page.click("a[href='/console/campaigns/73']")
    await page.wait_for_selector("#ams-mailing")
    assert "Spring sale" in await page.locator("#ams-mailing").inner_text()
    assert "hard_bounce_rate" in await page.locator("#autostops").inner_text()

    # a form whose CSRF token was tampered with is refused, and AMS hears nothing
    await page.evaluate(
        "document.querySelectorAll('input[name=csrf]').forEach(i => i.value = 'forged')"
    )
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    async with page.expect_navigation():
        await page.click("#stop-campaign")
    assert "CSRF" in await page.content()
    assert ams.received("stopMailing") == []

    await page.goto(ledger.base + "/console/campaigns/73")
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    async with page.expect_navigation():
        await page.click("#stop-campaign")
    await page.wait_for_selector("text=Campaign stopped in AMS.")
    assert len(ams.received("stopMailing", id=73)) == 1
    assert ams.mailings[73]["state"] == "paused"

    async with page.expect_navigation():
        await page.click("#resume-campaign")
    await page.wait_for_selector("text=Campaign resumed in AMS.")
    assert len(ams.received("startMailing", id=73)) == 1

    # Russian, then sign out: the session is gone
    await page.click("a[hreflang=ru]")
    await page.wait_for_selector("text=Кампания 73")
    await page.click("#logout")
    await page.wait_for_selector("input[name=username]")
    await page.goto(ledger.base + "/console/messages")
    assert "/console/login" in page.url


async def test_a_viewer_sees_its_account_and_guessing_passwords_is_throttled(
    start_ledger, js, browser: Any
) -> None:
    ledger = await start_ledger(console_login_max_failures=2)
    mine = await create_account(ledger, "Mine")
    theirs = await create_account(ledger, "Theirs")
    own = await accept_message(js, mine["id"], "ivan@example.ru", campaign_id="73")
    other = await accept_message(js, theirs["id"], "petr@example.ru", campaign_id="99")
    await wait_recorded(ledger, own, other)
    await create_operator(ledger, "viewer", ADMIN_PASSWORD, role="viewer", account_id=mine["id"])

    page = await browser.new_page()
    for _ in range(2):
        await _sign_in(page, ledger.base, "viewer", "a wrong password")
        await page.wait_for_selector("text=Wrong username or password.")
    await _sign_in(page, ledger.base, "viewer", ADMIN_PASSWORD)
    await page.wait_for_selector("text=Too many attempts. Try again later.")

    ledger = await start_ledger()  # a fresh process: its own throttle, same database
    await _sign_in(page, ledger.base, "viewer", ADMIN_PASSWORD)
    await page.wait_for_selector("text=Messages today by status")
    await page.click("nav >> text=Messages")
    listed = await page.locator("#results").inner_text()
    assert "ivan@example.ru" in listed and "petr@example.ru" not in listed
    response = await page.goto(f"{ledger.base}/console/messages/{other}")
    assert response is not None and response.status == 404
    await page.goto(f"{ledger.base}/console/campaigns/73")
    assert await page.locator("#stop-campaign").count() == 0  # read-only
    response = await page.goto(f"{ledger.base}/console/accounts/{theirs['id']}")
    assert response is not None and response.status == 404
    response = await page.goto(f"{ledger.base}/console/operators")
    assert response is not None and response.status == 403


async def test_the_pages_fit_a_phone_screen(start_ledger, js, browser: Any) -> None:
    ledger = await start_ledger()
    await create_operator(ledger, "alice", ADMIN_PASSWORD)
    account = await create_account(ledger, "Acme")
    ids = await seed_demo(js, account["id"])
    ivan = ids["ivan@example.ru"]

    async def dead_letter_recorded() -> bool:
        status, body, _ = await ledger.call("GET", f"/v1/messages/{ivan}/timeline")
        return status == 200 and bool(body["dead_letters"])

    await eventually(dead_letter_recorded, timeout=20, what="the seeded history recorded")
    context = await browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = await context.new_page()
    await _sign_in(page, ledger.base, "alice", ADMIN_PASSWORD)
    await page.wait_for_selector(".tiles")
    for path in (
        "/console/",
        "/console/messages",
        f"/console/messages/{ivan}",
        "/console/campaigns/73",
        f"/console/accounts/{account['id']}",
    ):
        await page.goto(ledger.base + path)
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, (path, width)  # wide tables scroll inside their card
    await context.close()
