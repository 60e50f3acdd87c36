"""The cost of durable JetStream acks (sync_interval: always vs nats-server's default).

Every nats-server mailgate runs fsyncs before acknowledging a publish so an SMTP 250
survives a power cut; the default syncs every two minutes and acks before that.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import nats
from mailgate_core.nats import provision
from mailgate_fakes.infra import NatsServer

from common import Options, Row, timed_run


async def _publish_run(url: str, count: int, concurrency: int, size: int) -> Row:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    await provision(js)
    payload = os.urandom(size // 2).hex().encode()
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def publisher() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            await js.publish("mail.accepted", payload, headers={"Nats-Msg-Id": f"b-{i}"})
            latencies.append(time.perf_counter() - t0)

    row = await timed_run(count, latencies, [publisher() for _ in range(concurrency)])
    await nc.close()
    row.note = "client CPU"
    return row


async def _batched_run(url: str, count: int, batch: int, size: int) -> Row:
    """publish_events: ``batch`` events go out back to back, their acks awaited together."""
    from mailgate_core import schemas as s
    from mailgate_core.nats import publish_events

    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    await provision(js)
    events = [s.TrackOpen(mailgate_id=f"m{i}", user_agent="x" * (size - 200)) for i in range(count)]
    latencies: list[float] = []

    async def publisher() -> None:
        for start in range(0, count, batch):
            t = time.perf_counter()
            await publish_events(js, events[start : start + batch])
            latencies.append(time.perf_counter() - t)

    row = await timed_run(count, latencies, [publisher()])
    await nc.close()
    row.benchmark = f"JetStream publish_events 2 KB, sync always, batches of {batch}"
    row.note = "latency per batch; client CPU"
    return row


async def run(opts: Options) -> list[Row]:
    count = 300 if opts.quick else int(os.environ.get("BENCH_COUNT", "3000"))
    size = 2048
    rows: list[Row] = []
    results: dict[tuple[str, int], Row] = {}
    for sync in ("always", "2m"):
        for concurrency in (1, 20):
            with tempfile.TemporaryDirectory(dir=opts.tmp) as tmp:
                server = NatsServer(Path(tmp) / "nats", sync_interval=sync).start()
                try:
                    row = await _publish_run(server.url, count, concurrency, size)
                finally:
                    server.stop()
            row.benchmark = f"JetStream publish 2 KB, sync {sync}, {concurrency} publishers"
            results[(sync, concurrency)] = row
            rows.append(row)
    with tempfile.TemporaryDirectory(dir=opts.tmp) as tmp:
        server = NatsServer(Path(tmp) / "nats", sync_interval="always").start()
        try:
            batched = await _batched_run(server.url, count, 64, size)
        finally:
            server.stop()
    single = results[("always", 20)]
    assert single.rate_per_s and batched.rate_per_s
    batched.note += f"; {batched.rate_per_s / single.rate_per_s:.2f}x of 20 publishers"
    rows.append(batched)
    for concurrency in (1, 20):
        durable, default = results[("always", concurrency)], results[("2m", concurrency)]
        assert durable.rate_per_s and default.rate_per_s
        durable.note = f"{durable.rate_per_s / default.rate_per_s:.2f}x of sync 2m"
    return rows
