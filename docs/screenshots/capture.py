"""Screenshots of the operator console for the README: ``make screenshots``
(or ``.venv/bin/python docs/screenshots/capture.py``).

Starts NATS and Postgres (wheels, temporary directories) and a ledger in this process, seeds
the same small history the browser tests use, signs in with Debian's Chromium (Playwright,
no browser download) and writes docs/screenshots/*.png.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "screenshot-password"  # noqa: S105 - a throwaway local operator
ADMIN_TOKEN = "screenshot-admin-token-0123456789"  # noqa: S105 - local only

DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


async def _capture(out: Path) -> list[Path]:
    import aiohttp
    from mailgate_core.config import Secret
    from mailgate_core.nats import connect, provision
    from mailgate_fakes.infra import NatsServer, Postgres, free_port
    from mailgate_fakes.testing import eventually
    from mailgate_ledger.app import Settings, build
    from playwright.async_api import async_playwright
    from prometheus_client import CollectorRegistry
    from test_console_support import seed_demo

    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        nats_server = NatsServer(tmp / "nats").start()
        postgres = Postgres(tmp / "pg").start()
        try:
            database_url = postgres.create_database("console_screens")
            settings = Settings(
                nats_url=nats_server.url,
                database_url=Secret(database_url),
                admin_token=Secret(ADMIN_TOKEN),
                admin_host="127.0.0.1",
                admin_port=free_port(),
                domain="mailgate.example.com",
                grafana_url="http://localhost:3000/d/mailgate",
                log_level="warning",
                outbox_interval_s=0.2,
                webhook_allow_private=True,  # no DNS lookups of the demo hostnames
            )
            ledger = await build(settings, registry=CollectorRegistry())
            await ledger.start()
            base = f"http://127.0.0.1:{settings.admin_port}"
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            try:
                async with aiohttp.ClientSession(headers=headers) as http:
                    account = await _post(
                        http,
                        base + "/v1/accounts",
                        {"name": "Acme Retail", "allowed_sender_domains": ["acme.example"]},
                    )
                    await _post(
                        http,
                        base + f"/v1/accounts/{account['id']}/credentials",
                        {"name": "AMS", "daily_limit": 200000, "allowed_ips": ["203.0.113.0/24"]},
                    )
                    await _post(
                        http,
                        base + f"/v1/accounts/{account['id']}/webhooks",
                        {"url": "https://crm.example.com/hooks/mailgate"},
                    )
                    await _post(
                        http,
                        base + f"/v1/accounts/{account['id']}/suppressions",
                        {"email": "former@example.ru", "reason": "unsubscribed"},
                    )
                    await _post(
                        http, base + "/v1/operators", {"username": "alice", "password": PASSWORD}
                    )
                    nc = await connect(nats_server.url, "console-screenshots")
                    js = nc.jetstream()
                    await provision(js)
                    ids = await seed_demo(js, account["id"])
                    await nc.drain()
                    ivan = ids["ivan@example.ru"]

                    async def recorded() -> bool:
                        async with http.get(f"{base}/v1/messages/{ivan}/timeline") as resp:
                            body = await resp.json()
                        return resp.status == 200 and bool(body.get("dead_letters"))

                    await eventually(recorded, timeout=30, what="the demo history")
                pages = {
                    "overview": "/console/",
                    "messages": "/console/messages?campaign_id=73",
                    "message": f"/console/messages/{ivan}",
                    "campaign": "/console/campaigns/73",
                    "account": f"/console/accounts/{account['id']}",
                }
                async with async_playwright() as playwright:
                    browser = await playwright.chromium.launch(
                        executable_path=CHROMIUM, headless=True
                    )
                    try:
                        written += await _shoot(browser, base, pages, out)
                    finally:
                        await browser.close()
            finally:
                await ledger.stop()
        finally:
            nats_server.stop()
            postgres.stop()
    return written


async def _shoot(browser: Any, base: str, pages: dict[str, str], out: Path) -> list[Path]:
    written = []
    for viewport, suffix, lang in (
        (DESKTOP, "", "en"),
        (PHONE, "-phone", "en"),
        (DESKTOP, "-ru", "ru"),
    ):
        context = await browser.new_context(viewport=viewport, device_scale_factor=1)
        page = await context.new_page()
        await page.goto(base + "/console/login")
        await page.fill("input[name=username]", "alice")
        await page.fill("input[name=password]", PASSWORD)
        await page.click("button[type=submit]")
        await page.wait_for_selector(".tiles")
        if lang != "en":
            await page.goto(f"{base}/console/lang?to={lang}&next=/console/")
        names = list(pages) if suffix == "" else ["overview", "message"]
        for name in names:
            await page.goto(base + pages[name])
            path = out / f"{name}{suffix}.png"
            await page.screenshot(path=str(path), full_page=True)
            written.append(path)
        await context.close()
    return written


async def _post(http: Any, url: str, body: dict[str, Any]) -> Any:
    async with http.post(url, json=body) as resp:
        answer = await resp.json()
        assert resp.status in (200, 201), answer
        return answer


def main() -> int:
    if not Path(CHROMIUM).exists():
        print(f"capture: {CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        return 1
    for path in asyncio.run(_capture(HERE)):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
