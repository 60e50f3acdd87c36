"""Webhook deliveries: ams-reporter (its own process) -> a local aiohttp receiver, 50 in flight.

A nats-server (sync_interval always), ``python -m mailgate_ams_reporter`` with
``WEBHOOK_ENDPOINT_CONCURRENCY=50``, and the receiver in this process. Rows:

* backlog: status events pre-published, then ams-reporter started; deliveries per second
  from the first to the last arrival; p50/p99 of one HTTP attempt (ams-reporter's
  ``mailgate_webhook_delivery_seconds`` histogram, interpolated within buckets);
* batch backlog: the same to an endpoint with ``batch: true`` (events per second);
* paced: events published at about half the backlog rate while ams-reporter runs; p50/p99
  of the end-to-end delay, publish to arrival at the receiver;
* with automatic stop on (an AMS fake in this process): ``sent`` events, each delivered and
  added to its campaign's counters; ams-reporter's CPU from ready (before the publish) until
  every consumer of STATUS has acked everything, per event.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
from aiohttp import web
from mailgate_core.nats import KV_ENDPOINTS, provision, publish_event
from mailgate_core.records import AccountEndpoints, EndpointRecord
from mailgate_core.schemas import MessageRef, StatusEvent
from mailgate_fakes.ams import AmsFake
from mailgate_fakes.infra import NatsServer, free_port, python_env

from common import Options, Row, percentile, process_cpu_s
from common import stop as _stop

IN_FLIGHT = 50
PUBLISHERS = 32
SECRET = "whsec_YmVuY2gtc2VjcmV0LWJlbmNoLXNlY3JldC0xMjM0NQ=="  # noqa: S105 - bench only


@dataclass
class Receiver:
    """Counts delivered events and notes when each arrived (and the reporter's CPU then)."""

    pid: int = 0
    arrivals: dict[str, float] = field(default_factory=dict)
    posts: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    cpu_first: float = 0.0
    cpu_last: float = 0.0

    def reset(self, pid: int) -> None:
        self.pid = pid
        self.arrivals.clear()
        self.posts = 0
        self.first_at = self.last_at = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        now = time.time()
        items = body if isinstance(body, list) else [body]
        if not self.arrivals and self.pid:
            self.first_at = now
            self.cpu_first = process_cpu_s(self.pid)
        for item in items:
            self.arrivals.setdefault(item["event"]["id"], now)
        self.posts += 1
        self.last_at = now
        return web.Response(text="ok")

    def mark_end(self) -> None:
        self.cpu_last = process_cpu_s(self.pid) if self.pid else 0.0


def _event(account_id: str, i: int, name: str = "delivered") -> StatusEvent:
    return StatusEvent(
        name=name,  # type: ignore[arg-type]
        timestamp=int(time.time()),
        data={"smtp_reply": "250 2.0.0 OK"},
        message=MessageRef(
            mailgate_id=f"01JBENCH{i:018d}",
            account_id=account_id,
            recipient=f"user{i}@example.com",
            external_id=f"AMS-{i}",
            campaign_id="73",
        ),
    )


async def _publish_all(js, events: list[StatusEvent]) -> None:
    queue: asyncio.Queue[StatusEvent] = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)

    async def worker() -> None:
        while not queue.empty():
            await publish_event(js, queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(PUBLISHERS)))


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - lives with the process
    return subprocess.Popen(
        [sys.executable, "-m", "mailgate_ams_reporter"],
        env=python_env(env),
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def _histogram_quantiles(port: int, name: str, qs: tuple[float, ...]) -> list[float | None]:
    """Quantiles of a Prometheus histogram scraped from /metrics (linear within a bucket)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append(
                (float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1]))
            )
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    out: list[float | None] = []
    for q in qs:
        if not total:
            out.append(None)
            continue
        rank, lower, below = q * total, 0.0, 0.0
        value: float | None = None
        for upper, count in buckets:
            if count >= rank:
                if upper == float("inf"):
                    value = lower
                else:
                    inside = count - below
                    value = lower + (upper - lower) * ((rank - below) / inside if inside else 1)
                break
            lower, below = upper, count
        out.append(value)
    return out


async def _wait_for(check, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench_webhooks: {what} not reached within {timeout_s}s")
        await asyncio.sleep(0.02)


async def run(opts: Options) -> list[Row]:
    backlog = 1500 if opts.quick else int(os.environ.get("BENCH_WEBHOOKS", "20000"))
    paced_s = 1.5 if opts.quick else 10.0
    rows: list[Row] = []
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/{name}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port, backlog=1024).start()

    with tempfile.TemporaryDirectory(dir=opts.tmp) as tmp_name:
        tmp = Path(tmp_name)
        server = NatsServer(tmp / "nats").start()
        nc = await nats.connect(server.url)
        js = nc.jetstream(timeout=10)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            await provision(js)
            kv = await js.key_value(KV_ENDPOINTS)
            for account, batch in (("single", False), ("bulk", True), ("counted", False)):
                record = AccountEndpoints(
                    account_id=account,
                    endpoints=[
                        EndpointRecord(
                            id=f"ep-{account}",
                            url=f"http://127.0.0.1:{hook_port}/{account}",
                            secret=SECRET,
                            batch=batch,
                        )
                    ],
                )
                await kv.put(account, msgspec.json.encode(record))
            env = {
                "NATS_URL": server.url,
                "OPS_HOST": "127.0.0.1",
                "WEBHOOK_ALLOW_PRIVATE": "true",
                "WEBHOOK_ENDPOINT_CONCURRENCY": str(IN_FLIGHT),
                "DELIVERY_CONCURRENCY": str(4 * IN_FLIGHT),
                "AUTOSTOP_ENABLED": "false",
                "LOG_LEVEL": "warning",
            }

            async def drain(account: str, label: str) -> tuple[Row, int]:
                events = [_event(account, i) for i in range(backlog)]
                await _publish_all(js, events)
                ops_port = free_port()
                proc = _spawn({**env, "OPS_PORT": str(ops_port)}, tmp / f"{account}.log")
                procs.append(proc)
                receiver.reset(proc.pid)
                await _wait_for(
                    lambda: len(receiver.arrivals) >= backlog, 120, f"{label} delivered"
                )
                receiver.mark_end()
                elapsed = max(receiver.last_at - receiver.first_at, 1e-6)
                p50, p99 = _histogram_quantiles(
                    ops_port, "mailgate_webhook_delivery_seconds", (0.5, 0.99)
                )
                cpu = receiver.cpu_last - receiver.cpu_first
                row = Row(
                    benchmark=label,
                    rate_per_s=backlog / elapsed,
                    p50_ms=p50 * 1000 if p50 is not None else None,
                    p99_ms=p99 * 1000 if p99 is not None else None,
                    cpu_s_per_1k=cpu / backlog * 1000,
                    note="latency = one HTTP attempt; cpu = ams-reporter's",
                )
                return row, ops_port

            # First, while STATUS is empty: an autostop consumer of an older version would
            # otherwise read the other rows' events too.
            counted = await _autostop_row(
                js, env, tmp, receiver, 300 if opts.quick else min(backlog, 5000)
            )
            single, _ = await drain(
                "single", f"webhooks: {backlog} queued -> 1 endpoint, {IN_FLIGHT} in flight"
            )
            rows.append(single)
            _stop(procs.pop())
            bulk, _ = await drain("bulk", f"webhooks: {backlog} queued -> batch endpoint")
            bulk.note = f"events/s; {receiver.posts} POSTs of up to 100 events; latency = one POST"
            rows.append(bulk)

            # Paced, end to end: the bulk reporter keeps running and also serves "single".
            assert single.rate_per_s
            rate = max(50.0, single.rate_per_s / 2)
            receiver.reset(procs[-1].pid)
            published: dict[str, float] = {}
            count = int(rate * paced_s)
            interval = 1.0 / rate
            start = time.perf_counter()

            async def paced(offset: int) -> None:
                for n in range(offset, count, PUBLISHERS):
                    due = start + n * interval
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    event = _event("single", 1_000_000 + n)
                    published[event.event_id] = event.occurred_at
                    await publish_event(js, event)

            await asyncio.gather(*(paced(i) for i in range(PUBLISHERS)))
            sent_s = time.perf_counter() - start
            await _wait_for(lambda: len(receiver.arrivals) >= count, 60, "paced delivered")
            receiver.mark_end()
            delays = sorted(receiver.arrivals[i] - t for i, t in published.items())
            rows.append(
                Row(
                    benchmark=f"webhooks: paced {rate:,.0f}/s, publish -> receiver",
                    rate_per_s=count / sent_s,
                    p50_ms=percentile(delays, 0.5) * 1000,
                    p99_ms=percentile(delays, 0.99) * 1000,
                    cpu_s_per_1k=(receiver.cpu_last - receiver.cpu_first) / count * 1000,
                    note=f"end-to-end delay over {count} events (~half the backlog rate)",
                )
            )
            rows.append(counted)
            _stop(procs.pop())
        finally:
            for proc in procs:
                _stop(proc)
            await nc.close()
            server.stop()
            await runner.cleanup()
    return rows


async def _settled(js, durables: tuple[str, ...]) -> bool:  # type: ignore[no-untyped-def]
    for durable in durables:
        try:
            info = await js.consumer_info("STATUS", durable)
        except Exception:  # noqa: S112 - a consumer this version does not have
            continue
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def _autostop_row(  # type: ignore[no-untyped-def]
    js, env: dict[str, str], tmp: Path, receiver: Receiver, count: int
) -> Row:
    """``sent`` events to one endpoint with automatic stop on: every event is delivered and
    counted (thresholds are never crossed: only ``sent``)."""
    ams = AmsFake("bench-ams-key")
    ams.add_mailing(73, name="Bench", state="running", total=count)
    ams_url = await ams.start()
    ops_port = free_port()
    proc = _spawn(
        {
            **env,
            "OPS_PORT": str(ops_port),
            "AUTOSTOP_ENABLED": "true",
            "AMS_API_URL": ams_url,
            "AMS_API_KEY": "bench-ams-key",
        },
        tmp / "counted.log",
    )
    try:
        await _wait_ready(ops_port)
        receiver.reset(proc.pid)
        cpu0 = process_cpu_s(proc.pid)
        started = time.monotonic()
        await _publish_all(js, [_event("counted", 2_000_000 + i, "sent") for i in range(count)])
        await _wait_for(lambda: len(receiver.arrivals) >= count, 120, "counted delivered")
        deadline = time.monotonic() + 60
        while not await _settled(js, ("ams-reporter", "ams-reporter-autostop")):
            if time.monotonic() > deadline:
                raise RuntimeError("bench_webhooks: STATUS consumers not settled")
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        cpu = process_cpu_s(proc.pid) - cpu0
        counters = await js.key_value("campaign-counters")
        totals = msgspec.json.decode((await counters.get("73")).value)["totals"]
    finally:
        _stop(proc)
        await ams.stop()
    return Row(
        benchmark=f"webhooks + autostop: {count} 'sent' -> 1 endpoint, counted",
        rate_per_s=count / elapsed,
        cpu_s_per_1k=cpu / count * 1000,
        note=(
            f"cpu = ams-reporter's from ready to all STATUS consumers settled; "
            f"campaign counters sent={totals.get('sent', 0)}"
        ),
    )


def _is_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


async def _wait_ready(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not _is_ready(port):
        if time.monotonic() > deadline:
            raise RuntimeError("bench_webhooks: ams-reporter not ready")
        await asyncio.sleep(0.05)
