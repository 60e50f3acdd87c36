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

from common import Options, Row, percentile


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

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(publisher() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    await nc.close()
    latencies.sort()
    return Row(
        benchmark="",
        rate_per_s=count / elapsed,
        p50_ms=percentile(latencies, 0.5) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        cpu_s_per_1k=cpu / count * 1000,
        note="client CPU",
    )


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
    for concurrency in (1, 20):
        durable, default = results[("always", concurrency)], results[("2m", concurrency)]
        assert durable.rate_per_s and default.rate_per_s
        durable.note = f"{durable.rate_per_s / default.rate_per_s:.2f}x of sync 2m"
    return rows
