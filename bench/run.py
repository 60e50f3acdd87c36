"""mailgate benchmarks: `make bench`. Bounded in time, loopback only, prints one table.

Now: the cost of durable JetStream acks. Every nats-server mailgate runs has
``sync_interval: always`` (fsync before the publish ack) so an SMTP 250 survives a power cut;
nats-server's default syncs every two minutes and acks before that. This measures both
settings on this machine for a 2 KB event: msgs/s and ack latency, with 1 and with 20
concurrent publishers (SMTP sessions publish concurrently). Later benchmarks join this table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats
from mailgate_core.nats import provision
from mailgate_fakes.infra import NatsServer


async def _publish_run(url: str, count: int, concurrency: int, size: int) -> dict[str, float]:
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
    return {
        "msgs_s": count / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "client_cpu_s_per_1k": cpu / count * 1000,
    }


async def bench_sync_interval(count: int, size: int) -> list[tuple[str, dict[str, float]]]:
    rows: list[tuple[str, dict[str, float]]] = []
    for sync in ("always", "2m"):
        for concurrency in (1, 20):
            with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
                server = NatsServer(Path(tmp) / "nats", sync_interval=sync).start()
                try:
                    result = await _publish_run(server.url, count, concurrency, size)
                finally:
                    server.stop()
            label = (
                f"JetStream publish {size // 1024} KB, sync {sync:<6}, {concurrency:>2} publishers"
            )
            rows.append((label, result))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=int(os.environ.get("BENCH_COUNT", "3000")))
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"messages per row: {args.count}\n")
    rows = asyncio.run(bench_sync_interval(args.count, args.size))
    header = f"{'benchmark':<58} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cpu s/1k':>9}"
    print(header)
    print("-" * len(header))
    for label, r in rows:
        print(
            f"{label:<58} {r['msgs_s']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
            f" {r['client_cpu_s_per_1k']:>9.3f}"
        )
    base = {label.split(", ")[-1]: r for label, r in rows if "sync 2m" in label}
    print()
    for label, r in rows:
        if "sync always" in label:
            other = base[label.split(", ")[-1]]
            print(
                f"cost of sync_interval always ({label.split(', ')[-1]}): "
                f"{r['msgs_s'] / other['msgs_s']:.2f}x throughput, "
                f"p50 {r['p50_ms'] - other['p50_ms']:+.2f} ms"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
