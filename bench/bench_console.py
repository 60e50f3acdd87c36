"""The operator console: p50/p99 page times with 1M messages in the ledger.

``messages`` is filled with COPY exactly as bench_ledger does (1M rows in the full run over
about four months of ULIDs, 500 campaigns), ``events`` with one customer event for every
fourth message (opens split between people and image proxies), then an admin signs in and
each page is fetched in turn (sequential, over loopback, HTML rendered). A viewer's overview
is timed too: its queries join the account's messages.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from bench_ledger import (
    ACCOUNT,
    ADMIN_TOKEN,
    MESSAGE_COLUMNS,
    _create_database,
    _message_rows,
    _settings,
)
from mailgate_fakes.infra import NatsServer
from mailgate_ledger.app import build
from prometheus_client import CollectorRegistry

from common import Options, Row, percentile

PASSWORD = "bench-console-password"  # noqa: S105 - a throwaway benchmark operator
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
EVENT_COLUMNS = [
    "event_id",
    "mailgate_id",
    "campaign_id",
    "subject",
    "name",
    "status_name",
    "status_data",
    "occurred_at",
    "recorded_at",
    "data",
]


def _event_rows(messages: list[tuple[Any, ...]], rng: random.Random) -> list[tuple[Any, ...]]:
    rows = []
    for index, m in enumerate(messages[::4]):
        status = m[10]
        at = m[11]
        audience = rng.choice(("human", "prefetch", "unknown"))
        data = {"audience": audience} if status in ("opened", "clicked") else {}
        rows.append(
            (
                f"bench-{index}",
                m[0],
                m[2],
                "track.open" if status == "opened" else f"bench.{status}",
                status,
                status,
                json.dumps(data),
                at,
                at,
                "{}",
            )
        )
    return rows


async def _fill(database_url: str, count: int) -> tuple[list[tuple[Any, ...]], float]:
    rng = random.Random(11)
    messages = _message_rows(count, rng)
    events = _event_rows(messages, rng)
    conn = await asyncpg.connect(database_url)
    try:
        t0 = time.perf_counter()
        await conn.copy_records_to_table("messages", records=messages, columns=MESSAGE_COLUMNS)
        await conn.copy_records_to_table("events", records=events, columns=EVENT_COLUMNS)
        await conn.execute(
            """INSERT INTO postmaster_daily (domain, date, messages_sent, delivered, read, spam,
                                             complaints, reputation, event_id, occurred_at)
               SELECT 'example.com', d::date, 10000, 9800, 4000, 20, 2, 0.9, 'pm-' || d, now()
               FROM generate_series(now() - interval '30 days', now(), interval '1 day') d"""
        )
        await conn.execute("ANALYZE messages")
        await conn.execute("ANALYZE events")
        fill_s = time.perf_counter() - t0
    finally:
        await conn.close()
    return messages, fill_s


async def _sign_in(http: aiohttp.ClientSession, base: str, username: str) -> None:
    async with http.get(base + "/console/login") as resp:
        csrf = _CSRF.search(await resp.text())
    assert csrf is not None
    form = {"username": username, "password": PASSWORD, "csrf": csrf.group(1)}
    async with http.post(base + "/console/login", data=form, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()


async def _time_pages(
    base: str, username: str, pages: dict[str, str], samples: int, count: int, label: str
) -> list[Row]:
    rows: list[Row] = []
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        await _sign_in(http, base, username)
        for name, path in pages.items():
            latencies: list[float] = []
            for _ in range(samples + 2):
                t0 = time.perf_counter()
                async with http.get(base + path, allow_redirects=False) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - t0)
                assert resp.status == 200, (path, resp.status)
            latencies = sorted(latencies[2:])  # the first two warm caches and plans
            rows.append(
                Row(
                    benchmark=f"console {name}{label}, {count:,} messages",
                    rate_per_s=len(latencies) / sum(latencies),
                    p50_ms=percentile(latencies, 0.5) * 1000,
                    p99_ms=percentile(latencies, 0.99) * 1000,
                    note="HTML page, sequential, loopback",
                )
            )
    return rows


async def run(opts: Options) -> list[Row]:
    import pgserver

    count = 10_000 if opts.quick else int(os.environ.get("BENCH_CONSOLE_ROWS", "1000000"))
    samples = 3 if opts.quick else 20
    with tempfile.TemporaryDirectory(dir=opts.tmp) as tmp_name:
        tmp = Path(tmp_name)
        pg = pgserver.get_server(str(tmp / "pg"), cleanup_mode="stop")
        server = NatsServer(tmp / "nats").start()
        try:
            database_url = await _create_database(str(pg.get_uri()), "bench_console")
            ledger = await build(_settings(server.url, database_url), registry=CollectorRegistry())
            try:
                assert ledger.partitions is not None
                now_ms = int(time.time() * 1000)
                await ledger.partitions.ensure_for(
                    _ulid_months(now_ms - d * 86_400_000) for d in range(0, 101, 10)
                )
                messages, fill_s = await _fill(database_url, count)
                await ledger.start()
                base = f"http://127.0.0.1:{ledger.settings.admin_port}"
                headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                async with aiohttp.ClientSession(headers=headers) as http:
                    await _post(http, base + "/v1/accounts", {"name": "bench"})
                    await _post(
                        http, base + "/v1/operators", {"username": "admin", "password": PASSWORD}
                    )
                    conn = await asyncpg.connect(database_url)
                    try:  # a viewer of the benchmark's (only) account
                        await conn.execute(
                            "INSERT INTO accounts (id, name, api_token_hash, api_token_prefix) "
                            "VALUES ($1, 'bench messages', 'x', 'x')",
                            ACCOUNT,
                        )
                    finally:
                        await conn.close()
                    await _post(
                        http,
                        base + "/v1/operators",
                        {
                            "username": "viewer",
                            "password": PASSWORD,
                            "role": "viewer",
                            "account_id": ACCOUNT,
                        },
                    )
                pick = messages[len(messages) // 3]
                pages = {
                    "overview": "/console/",
                    "messages (latest)": "/console/messages",
                    "messages by email": f"/console/messages?email={pick[6]}",
                    "messages by campaign+status": "/console/messages?campaign_id=7&status=opened",
                    "messages by time range": "/console/messages?since="
                    + (dt.datetime.now(dt.UTC) - dt.timedelta(days=3)).strftime("%Y-%m-%dT%H:%M"),
                    "message page": f"/console/messages/{pick[0]}",
                    "campaigns": "/console/campaigns",
                    "campaign page": "/console/campaigns/7",
                    "account page": f"/console/accounts/{ACCOUNT}",
                    "suppressions": f"/console/accounts/{ACCOUNT}/suppressions",
                    "postmaster": "/console/postmaster",
                }
                rows = await _time_pages(base, "admin", pages, samples, count, "")
                viewer_pages = {"overview": "/console/", "campaign page": "/console/campaigns/7"}
                rows += await _time_pages(base, "viewer", viewer_pages, samples, count, " (viewer)")
                for row in rows:
                    row.note += f"; COPY fill {fill_s:.0f}s"
            finally:
                await ledger.stop()
        finally:
            server.stop()
            pg.cleanup()
    return rows


def _ulid_months(ms: int) -> str:
    crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    return "".join(crockford[(ms >> (45 - 5 * i)) & 31] for i in range(10)) + "0" * 16


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    async with http.post(url, json=body) as resp:
        assert resp.status in (200, 201), await resp.text()
