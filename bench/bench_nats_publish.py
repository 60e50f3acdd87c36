"""Client CPU of a durable event publish: ``publish_event``/``publish_events`` through the
connection's ``nats_wire.JetStreamRequests`` against nats-py's ``js.publish`` (the path they
take once ``close_connection_requests`` closed the shared instance, and the path they took
before). Same server, same events; the two paths alternate, the median round is reported.

The group-commit rows (``publish_events(..., group=True)``, ``nats_wire.GroupCommit``): 100
concurrent publishers of one 2 KB ``mail.skipped`` each on one connection, with and without
group commit, alternating; the note has nats-server's CPU per 1,000 messages and the mean
messages per commit.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import nats
from mailgate_core import nats_wire
from mailgate_core import schemas as s
from mailgate_core.ids import new_ulid
from mailgate_core.nats import provision, publish_event, publish_events
from mailgate_fakes.infra import NatsServer

from common import Options, Row, process_tree_cpu_s, timed_run

SIZE = 2048


async def _connect(url: str, *, wire: bool) -> nats.NATS:
    nc = await nats.connect(url)
    if not wire:
        await nats_wire.close_connection_requests(nc)  # publishes then take js.publish
    return nc


def _events(tag: str, count: int) -> list[s.TrackOpen]:
    return [
        s.TrackOpen(mailgate_id=f"{tag}-{i}", user_agent="x" * (SIZE - 200)) for i in range(count)
    ]


async def _single(url: str, count: int, concurrency: int, *, wire: bool, tag: str) -> Row:
    nc = await _connect(url, wire=wire)
    js = nc.jetstream(timeout=10)
    events = _events(tag, count)
    latencies: list[float] = []
    queue: asyncio.Queue[s.TrackOpen] = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)

    async def publisher() -> None:
        while True:
            try:
                event = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            await publish_event(js, event)
            latencies.append(time.perf_counter() - t0)

    row = await timed_run(count, latencies, [publisher() for _ in range(concurrency)])
    await nc.close()
    return row


async def _batched(
    url: str, count: int, batch: int, concurrency: int, *, wire: bool, tag: str
) -> Row:
    nc = await _connect(url, wire=wire)
    js = nc.jetstream(timeout=10)
    events = _events(tag, count)
    batches = [events[i : i + batch] for i in range(0, count, batch)]
    latencies: list[float] = []

    async def publisher(mine: list[list[s.TrackOpen]]) -> None:
        for chunk in mine:
            t0 = time.perf_counter()
            await publish_events(js, chunk)
            latencies.append(time.perf_counter() - t0)

    mine = [batches[i::concurrency] for i in range(concurrency)]
    row = await timed_run(count, latencies, [publisher(chunks) for chunks in mine])
    await nc.close()
    return row


def _skipped(count: int) -> list[s.MailSkipped]:
    return [
        s.MailSkipped(
            message=s.MessageRef(mailgate_id=new_ulid(), account_id="a", recipient="r@x.org"),
            mail_from="s@x.org",
            reason="manual",
            subject_line="x" * (SIZE - 200),
        )
        for _ in range(count)
    ]


async def _grouped(server: NatsServer, count: int, concurrency: int, *, group: bool) -> Row:
    """``concurrency`` callers publishing one event at a time, with or without group commit."""
    assert server.proc is not None
    nc = await nats.connect(server.url)
    js = nc.jetstream(timeout=10)
    sizes: list[int] = []
    nats_wire.observe_group_commits(nc, sizes.append)
    events = _skipped(count)
    latencies: list[float] = []

    async def publisher() -> None:
        while events:
            event = events.pop()
            t0 = time.perf_counter()
            await publish_events(js, [event], group=group)
            latencies.append(time.perf_counter() - t0)

    server0 = process_tree_cpu_s(server.proc.pid)
    row = await timed_run(count, latencies, [publisher() for _ in range(concurrency)])
    server_cpu = process_tree_cpu_s(server.proc.pid) - server0
    await nc.close()
    commits = (
        f"{sum(sizes) / len(sizes):.1f} msgs/commit (largest {max(sizes)})"
        if sizes
        else "no group commit"
    )
    row.note = f"nats-server {server_cpu / count * 1000:.3f} CPU s/1k; {commits}"
    return row


def _median_row(rows: list[Row], name: str, note: str) -> Row:
    cpu = [r.cpu_s_per_1k or 0.0 for r in rows]
    middle = sorted(rows, key=lambda r: r.cpu_s_per_1k or 0.0)[len(rows) // 2]
    middle.benchmark = name
    middle.note = (
        f"{note}; client CPU, median of {len(rows)} (spread {min(cpu):.3f}-{max(cpu):.3f})"
    )
    return middle


async def run(opts: Options) -> list[Row]:
    count = 300 if opts.quick else int(os.environ.get("BENCH_COUNT", "3000"))
    rounds = 1 if opts.quick else int(os.environ.get("BENCH_ROUNDS", "3"))
    cases = (("publish_event, 1 publisher", 1, 1), ("publish_event, 20 publishers", 1, 20))
    cases += (("publish_events of 4, 5 publishers", 4, 5),)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=opts.tmp) as tmp:
        server = NatsServer(Path(tmp) / "nats", sync_interval="always").start()
        try:
            nc = await nats.connect(server.url)
            await provision(nc.jetstream(timeout=10))
            await nc.close()
            for name, batch, concurrency in cases:
                runs: dict[bool, list[Row]] = {False: [], True: []}
                for r in range(rounds):
                    for wire in (False, True):
                        tag = f"{name}-{r}-{wire}"
                        if batch == 1:
                            row = await _single(server.url, count, concurrency, wire=wire, tag=tag)
                        else:
                            row = await _batched(
                                server.url, count, batch, concurrency, wire=wire, tag=tag
                            )
                        runs[wire].append(row)
                before = _median_row(runs[False], f"{name}: js.publish", "nats-py")
                after = _median_row(runs[True], f"{name}: JetStreamRequests", "nats_wire")
                assert before.cpu_s_per_1k and after.cpu_s_per_1k
                after.note += f"; {after.cpu_s_per_1k / before.cpu_s_per_1k:.2f}x the CPU"
                rows += [before, after]
            for concurrency in (1, 100):
                grouped: dict[bool, list[Row]] = {False: [], True: []}
                for _ in range(rounds):
                    for group in (False, True):
                        grouped[group].append(
                            await _grouped(server, count, concurrency, group=group)
                        )
                name = f"publish_events, {concurrency} publisher{'s' if concurrency > 1 else ''}"
                for group in (False, True):
                    row = sorted(grouped[group], key=lambda r: r.rate_per_s or 0.0)[rounds // 2]
                    row.benchmark = f"{name}: group commit {'on' if group else 'off'}"
                    row.note += f"; median rate of {rounds}"
                    rows.append(row)
        finally:
            server.stop()
    return rows
