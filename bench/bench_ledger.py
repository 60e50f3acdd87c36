"""The ledger: facts committed per second from a pre-filled stream, and message lookups.

1. Ingest: the MAIL, POSTAL and TRACK streams are filled first with a realistic mix for N
   messages (``mail.accepted``, ``mail.submitted``, ``postal.MessageSent``, ``track.open``),
   then a ledger is started in this process and the clock runs until every fact is committed
   (``events`` row count). Run with the normal batch size and with batches of one (one
   transaction and one set of round trips per fact), which is what batching saves.
2. Lookups: ``messages`` is filled with COPY (1M rows in the full run, spread over four
   months of ULIDs, so over several partitions), then the admin API answers lookups by
   mailgate id, by AMS external id and by recipient address; p50/p99 per kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import nats
from mailgate_core import schemas as s
from mailgate_core.config import Secret
from mailgate_core.ids import new_ulid
from mailgate_core.nats import provision
from mailgate_fakes.infra import NatsServer, free_port
from mailgate_ledger.app import Settings, build
from prometheus_client import CollectorRegistry

from common import CpuMeter, Options, Row, percentile

ADMIN_TOKEN = secrets.token_urlsafe(24)
ACCOUNT = "01HBENCHACCOUNT00000000000"
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _ulid_at(ms: int, rng: random.Random) -> str:
    head = "".join(_CROCKFORD[(ms >> (45 - 5 * i)) & 31] for i in range(10))
    return head + "".join(rng.choice(_CROCKFORD) for _ in range(16))


def _facts(count: int) -> list[s.Event]:
    """Four facts per message, in the order the services publish them."""
    out: list[s.Event] = []
    raw = b"Subject: bench\r\n\r\n" + b"x" * 1024
    for i in range(count):
        mid = new_ulid()
        ref = s.MessageRef(
            mailgate_id=mid,
            account_id=ACCOUNT,
            recipient=f"user{i}@example.org",
            external_id=f"ams-{i}",
            campaign_id=str(i % 20),
        )
        out.append(
            s.MailAccepted(
                message=ref,
                mail_from="news@example.com",
                credential="bench",
                message_id_header=f"<{mid}@bench.test>",
                subject_line="Weekly news",
                size=len(raw),
                raw=raw,
            )
        )
        out.append(s.MailSubmitted(message=ref, postal_id=100_000 + i, postal_token=f"tok{i:013d}"))
        out.append(
            s.PostalEvent(
                event="MessageSent",
                postal_timestamp=time.time(),
                mailgate_id=mid,
                postal_id=100_000 + i,
                status="Sent",
                output="250 2.0.0 OK 1714400000 a1b2c3 - gsmtp",
                details="Message for user accepted by mx.example.org",
                recipient=ref.recipient,
                payload={"status": "Sent", "message": {"id": 100_000 + i}},
            )
        )
        out.append(
            s.TrackOpen(
                mailgate_id=mid,
                user_agent="Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
                ip="203.0.113.9",
                audience="human",
            )
        )
    return out


async def _prefill(url: str, facts: list[s.Event]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    await provision(js)
    queue: asyncio.Queue[s.Event] = asyncio.Queue()
    for fact in facts:
        queue.put_nowait(fact)

    async def publisher() -> None:
        while not queue.empty():
            fact = queue.get_nowait()
            await js.publish(fact.subject(), s.encode(fact), headers={"Nats-Msg-Id": fact.event_id})

    await asyncio.gather(*(publisher() for _ in range(32)))
    await nc.close()


def _settings(nats_url: str, database_url: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "database_url": Secret(database_url),
        "admin_token": Secret(ADMIN_TOKEN),
        "admin_host": "127.0.0.1",
        "admin_port": free_port(),
        "log_level": "warning",
        "retention_days": 365,
    }
    values.update(extra)
    return Settings(**values)


async def _create_database(root_url: str, name: str) -> str:
    conn = await asyncpg.connect(root_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    head, sep, tail = root_url.partition("?")
    return f"{head.rsplit('/', 1)[0]}/{name}{sep}{tail}"


async def _postmaster_pid(conn: asyncpg.Connection) -> int | None:
    """The Postgres server's main process (its CPU, with its backends', is counted too)."""
    data_dir = await conn.fetchval("SHOW data_directory")
    try:
        return int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _committed(registry: CollectorRegistry) -> float:
    """Facts the ledger has committed so far (``mailgate_ledger_events_total``)."""
    only = registry.restricted_registry(["mailgate_ledger_events_total"])
    return sum(
        sample.value
        for family in only.collect()
        for sample in family.samples
        if sample.name == "mailgate_ledger_events_total"
    )


async def _status_stored(url: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("STATUS")
        return int(info.state.messages)
    finally:
        await nc.close()


async def _ingest_run(
    tmp: Path, pg_url: str, messages: int, batch: int | None, label: str
) -> list[Row]:
    """Two rows: facts committed (``events`` rows; the clock stops at the last commit) and
    the customer status events of those facts stored in STATUS (the outbox drained)."""
    facts = _facts(messages)
    sizes = {} if batch is None else {"batch_size": batch}  # None: the default BATCH_SIZE
    statuses = sum(1 for f in facts if not isinstance(f, s.MailAccepted))
    server = NatsServer(tmp / f"nats-{label}").start()
    database_url = await _create_database(pg_url, f"bench_{label}")
    try:
        await _prefill(server.url, facts)
        settings = _settings(server.url, database_url, **sizes)
        what = f"batch {settings.batch_size}" + ("" if batch else " (default)")
        ledger = await build(settings, registry=CollectorRegistry())
        conn = await asyncpg.connect(database_url)
        try:
            postmaster = await _postmaster_pid(conn)
            others = CpuMeter([p for p in (postmaster,) if p], tree=True)
            nats_cpu = CpuMeter([server.proc.pid] if server.proc else [])
            with _profiled(f"ledger-ingest-{label}"):
                others.start()
                nats_cpu.start()
                cpu0 = time.process_time()
                t0 = time.perf_counter()
                await ledger.start()
                deadline = time.monotonic() + 600
                # The ledger's own counter of facts committed (a count(*) of events every few
                # milliseconds would cost Postgres more than the ingestion it measures).
                while _committed(ledger.registry) < len(facts):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the ledger did not commit every fact in time")
                    await asyncio.sleep(0.02)
                elapsed = time.perf_counter() - t0
                cpu = time.process_time() - cpu0
                pg_cpu = others.stop()
                nats_s = nats_cpu.stop()
            while await _status_stored(server.url) < statuses:
                if time.monotonic() > deadline:
                    raise TimeoutError("the outbox did not publish every status event in time")
                await asyncio.sleep(0.05)
            drained = time.perf_counter() - t0
            unpublished = await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            )
            delivered = await conn.fetchval("SELECT count(*) FROM messages WHERE status = 'opened'")
            recorded = await conn.fetchval("SELECT count(*) FROM events")
        finally:
            await conn.close()
            await ledger.stop()
        stored = await _status_stored(server.url)
    finally:
        server.stop()
    assert delivered == messages, f"{delivered} of {messages} messages reached 'opened'"
    assert recorded == len(facts), f"{recorded} events rows, {len(facts)} facts"
    assert stored == statuses, f"{stored} status events in STATUS, {statuses} expected"
    per_1k = 1000 / len(facts)
    return [
        Row(
            benchmark=f"ledger ingest, mixed facts, {what}",
            rate_per_s=len(facts) / elapsed,
            cpu_s_per_1k=cpu * per_1k,
            note=(
                f"{len(facts)} facts committed (events rows); ledger in-process CPU; + Postgres"
                f" {pg_cpu * per_1k:.3f}, nats-server {nats_s * per_1k:.3f} CPU s/1k"
            ),
        ),
        Row(
            benchmark=f"ledger ingest -> STATUS published, {what}",
            rate_per_s=statuses / drained,
            note=(
                f"{statuses} status events (one per fact but mail.accepted) stored in STATUS"
                f" after {drained:.1f}s (facts committed after {elapsed:.1f}s);"
                f" {unpublished} outbox rows not yet marked published"
            ),
        ),
    ]


#: The ``messages`` columns of ``_message_rows`` tuples, in order (for COPY).
MESSAGE_COLUMNS = [
    "mailgate_id",
    "external_id",
    "campaign_id",
    "postal_id",
    "postal_token",
    "account_id",
    "recipient",
    "sender",
    "subject",
    "size",
    "status",
    "accepted_at",
    "updated_at",
]


def _message_rows(count: int, rng: random.Random) -> list[tuple[Any, ...]]:
    import datetime as dt

    now_ms = int(time.time() * 1000)
    span_ms = 100 * 86_400_000  # about four months: several partitions
    rows = []
    statuses = ("sent", "delivered", "opened", "soft_bounced", "hard_bounced")
    for i in range(count):
        ms = now_ms - int(span_ms * i / count)
        rows.append(
            (
                _ulid_at(ms, rng),
                f"ams-{i}",
                str(i % 500),
                1_000_000 + i,
                f"tok{i:013d}",
                ACCOUNT,
                f"user{i}@example.org",
                "news@example.com",
                "Weekly news",
                2048,
                statuses[i % len(statuses)],
                dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC),
                dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC),
            )
        )
    return rows


async def _lookup_run(tmp: Path, pg_url: str, count: int, samples: int) -> list[Row]:
    rng = random.Random(7)
    server = NatsServer(tmp / "nats-lookup").start()
    database_url = await _create_database(pg_url, "bench_lookup")
    rows: list[Row] = []
    try:
        ledger = await build(_settings(server.url, database_url), registry=CollectorRegistry())
        data = _message_rows(count, rng)
        if ledger.partitions is not None:  # COPY bypasses ingestion: make the months first
            await ledger.partitions.ensure_for(row[0] for row in data[:: max(1, count // 200)])
        conn = await asyncpg.connect(database_url)
        try:
            t0 = time.perf_counter()
            await conn.copy_records_to_table("messages", records=data, columns=MESSAGE_COLUMNS)
            await conn.execute("ANALYZE messages")
            fill_s = time.perf_counter() - t0
        finally:
            await conn.close()
        await ledger.start()
        base = f"http://127.0.0.1:{ledger.settings.admin_port}"
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        picks = [rng.randrange(count) for _ in range(samples)]
        kinds = {
            "mailgate id": lambda i: f"/v1/messages/{data[i][0]}",
            "external id": lambda i: f"/v1/messages?external_id=ams-{i}",
            "email": lambda i: f"/v1/messages?email=user{i}@example.org",
        }
        async with aiohttp.ClientSession(headers=headers) as http:
            for kind, path in kinds.items():
                latencies: list[float] = []
                for i in picks:
                    t0 = time.perf_counter()
                    async with http.get(base + path(i)) as resp:
                        body = await resp.json()
                    latencies.append(time.perf_counter() - t0)
                    assert resp.status == 200, body
                    found = body if "mailgate_id" in body else body["items"][0]
                    assert found["mailgate_id"] == data[i][0]
                latencies.sort()
                rows.append(
                    Row(
                        benchmark=f"ledger lookup by {kind}, {count:,} messages",
                        rate_per_s=len(latencies) / sum(latencies),
                        p50_ms=percentile(latencies, 0.5) * 1000,
                        p99_ms=percentile(latencies, 0.99) * 1000,
                        note=f"admin API, sequential; COPY fill {fill_s:.0f}s",
                    )
                )
        await ledger.stop()
    finally:
        server.stop()
    return rows


@contextlib.contextmanager
def _profiled(name: str) -> Iterator[None]:
    """``BENCH_PROFILE=<dir>``: py-spy records this process (the ledger runs in it) while
    the block runs; collapsed stacks in ``<dir>/<name>.txt`` (``bench/profile_summary.py``)."""
    directory = os.environ.get("BENCH_PROFILE", "")
    if not directory:
        yield
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    proc = subprocess.Popen(  # noqa: S603 - py-spy from our venv
        [
            *(str(py_spy), "record", "--format", "raw", "-r", "250", "--nonblocking"),
            *("-o", str(Path(directory) / f"{name}.txt"), "--pid", str(os.getpid())),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)  # let py-spy attach
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def run(opts: Options) -> list[Row]:
    """Env knobs (full run only): ``BENCH_LEDGER_MESSAGES`` (messages per ingest run, four
    facts each), ``BENCH_LEDGER_RUNS`` (comma list of batch sizes, ``default`` = BATCH_SIZE;
    default ``default,1024,1``), ``BENCH_LEDGER_ROWS`` (lookup fill; 0 skips the lookups)."""
    import pgserver

    messages = 250 if opts.quick else int(os.environ.get("BENCH_LEDGER_MESSAGES", "5000"))
    lookup_rows = 20_000 if opts.quick else int(os.environ.get("BENCH_LEDGER_ROWS", "1000000"))
    samples = 100 if opts.quick else 1000
    runs = ["default", "1"] if opts.quick else ["default", "1024", "1"]
    if not opts.quick and os.environ.get("BENCH_LEDGER_RUNS"):
        runs = [r.strip() for r in os.environ["BENCH_LEDGER_RUNS"].split(",") if r.strip()]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=opts.tmp) as tmp_name:
        tmp = Path(tmp_name)
        pg = pgserver.get_server(str(tmp / "pg"), cleanup_mode="stop")
        try:
            pg_url = str(pg.get_uri())
            for n, size in enumerate(runs):
                if size == "default":
                    label, batch, count = "batched", None, messages
                elif size == "1":  # one transaction and one set of round trips per fact
                    label, batch, count = "single", 1, max(50, messages // 10)
                else:  # e.g. 1024: fewer round trips and pull requests per fact
                    label, batch, count = f"batched{size}", int(size), messages
                label += f"_{n}" if runs.count(size) > 1 else ""
                rows += await _ingest_run(tmp, pg_url, count, batch, label)
            if lookup_rows > 0:
                rows.extend(await _lookup_run(tmp, pg_url, lookup_rows, samples))
        finally:
            pg.cleanup()
    return rows
