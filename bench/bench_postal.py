"""Postal-facing throughput: submissions per second from ``mail.accepted`` to the Postal sandbox,
and verified webhooks per second through webhook-ingest.

Every piece is its own process, as deployed: nats-server (sync always), the Postal sandbox,
postal-sender / webhook-ingest (``python -m ...``); this process only publishes, posts and
measures. Latency of a submission is ``mail.submitted`` time minus ``mail.accepted`` time;
of a webhook, the HTTP round trip (signature check, publish ack, 200). CPU is the service
process's own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import nats
from mailgate_core.ids import new_ulid
from mailgate_core.nats import provision
from mailgate_core.schemas import MailAccepted, MailSubmitted, MessageRef, decode, encode
from mailgate_fakes.infra import NatsServer, free_port, wait_for_port
from mailgate_fakes.postal import generate_private_key, public_key_b64, signature_headers
from nats.aio.msg import Msg

from common import CpuMeter, Options, Row, percentile, spawn, stop

KEY = "B" * 24
DOMAIN = "bench.example"


def _spawn(
    args: list[str], env: dict[str, str] | None = None, *, profile: str = ""
) -> subprocess.Popen[bytes]:
    """One of our processes; with ``BENCH_PROFILE`` and a ``profile`` name, py-spy records it."""
    return spawn([sys.executable, *args], env, profile=profile)


def _counters(pid: int) -> tuple[float, float, int, int]:
    """user s, system s, read syscalls, write syscalls of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    io = dict(
        line.split(": ", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines() if line
    )
    return (
        int(fields[11]) / ticks,
        int(fields[12]) / ticks,
        int(io.get("syscr", 0)),
        int(io.get("syscw", 0)),
    )


def _breakdown(before: tuple[float, float, int, int], pid: int, count: int) -> str:
    """Where the CPU went per message: user/system ms and read/write syscalls."""
    try:
        after = _counters(pid)
    except (OSError, ValueError):
        return ""
    user, system, reads, writes = (a - b for a, b in zip(after, before, strict=True))
    return (
        f"; per msg user {user / count * 1000:.2f} ms, sys {system / count * 1000:.2f} ms,"
        f" {reads / count:.1f} reads, {writes / count:.1f} writes"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop(proc, timeout_s=20)


async def _ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: process exited with {proc.returncode}")
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready in {timeout_s}s")


def _accepted(body: bytes) -> MailAccepted:
    mailgate_id = new_ulid()
    raw = (
        f"From: news@{DOMAIN}\r\nTo: r@x.com\r\nSubject: bench\r\n"
        f"Message-ID: <{mailgate_id}@{DOMAIN}>\r\n\r\n"
    ).encode() + body
    return MailAccepted(
        message=MessageRef(mailgate_id=mailgate_id, account_id="acc", recipient="r@x.com"),
        mail_from=f"bounces@{DOMAIN}",
        credential="bench",
        message_id_header=f"<{mailgate_id}@{DOMAIN}>",
        raw=raw,
    )


async def _submissions(nats_url: str, tmp: Path, count: int, in_flight: int) -> Row:
    sandbox_port = free_port()
    sandbox = _spawn(
        [
            "-m",
            "mailgate_fakes.postal",
            "--port",
            str(sandbox_port),
            "--api-key",
            KEY,
            "--signing-key",
            str(tmp / "signing.key"),
            "--webhook-delay-ms",
            "0",
        ]
    )
    ops_port = free_port()
    sender = None
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=10)
        await provision(js)
        wait_for_port("127.0.0.1", sandbox_port, timeout_s=20, proc=sandbox)
        sender = _spawn(
            ["-m", "mailgate_postal_sender"],
            {
                "NATS_URL": nats_url,
                "POSTAL_API_URL": f"http://127.0.0.1:{sandbox_port}",
                "POSTAL_API_KEY": KEY,
                "OPS_HOST": "127.0.0.1",
                "OPS_PORT": str(ops_port),
                "POSTAL_MAX_IN_FLIGHT": str(in_flight),
                "RECONCILE_ENABLED": "false",
            },
            profile=f"postal-sender-{in_flight}",
        )
        await _ready(f"http://127.0.0.1:{ops_port}/readyz", sender)
        body = (b"x" * 76 + b"\r\n") * 26  # ~2 KB
        events = [_accepted(body) for _ in range(count)]
        accepted_at: dict[str, float] = {}
        queue: asyncio.Queue[MailAccepted] = asyncio.Queue()
        for event in events:
            queue.put_nowait(event)

        async def publisher() -> None:
            while not queue.empty():
                event = queue.get_nowait()
                accepted_at[event.message.mailgate_id] = time.time()
                await js.publish(
                    "mail.accepted", encode(event), headers={"Nats-Msg-Id": event.event_id}
                )

        latencies: list[float] = []
        all_seen = asyncio.Event()

        async def on_submitted(msg: Msg) -> None:
            done = decode(msg.data, MailSubmitted)
            latencies.append(done.occurred_at - accepted_at[done.message.mailgate_id])
            if len(latencies) >= count:
                all_seen.set()

        # A core subscription sees every publish on the subject, like any JetStream consumer.
        sub = await nc.subscribe("mail.submitted", cb=on_submitted)
        cpu = CpuMeter([sender.pid])
        cpu.start()
        counters = _counters(sender.pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(publisher() for _ in range(20)))
        while True:
            info = await js.consumer_info("MAIL", "postal-sender")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
        cpu_s = cpu.stop()
        breakdown = _breakdown(counters, sender.pid, count)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_seen.wait(), timeout=10)
        await sub.unsubscribe()
        latencies.sort()
        if len(latencies) != count:
            raise RuntimeError(f"{len(latencies)} of {count} submitted")
        return Row(
            benchmark=f"postal-sender mail.accepted -> sandbox, {in_flight} in flight",
            rate_per_s=count / elapsed,
            p50_ms=percentile(latencies, 0.5) * 1000,
            p99_ms=percentile(latencies, 0.99) * 1000,
            cpu_s_per_1k=cpu_s / count * 1000,
            note=f"{count} msgs, 2 KB, latency accepted->submitted{breakdown}",
        )
    finally:
        await nc.close()
        if sender is not None:
            _stop(sender)
        _stop(sandbox)


async def _webhooks(nats_url: str, count: int, concurrency: int) -> Row:
    key = generate_private_key()
    port = free_port()
    ingest = _spawn(
        ["-m", "mailgate_webhook_ingest"],
        {
            "NATS_URL": nats_url,
            "WEBHOOK_HOST": "127.0.0.1",
            "WEBHOOK_PORT": str(port),
            "POSTAL_WEBHOOK_PUBLIC_KEY": public_key_b64(key),
            "DOMAIN": DOMAIN,
        },
    )
    try:
        signed: list[tuple[bytes, dict[str, str]]] = []
        for i in range(count):
            body = json.dumps(
                {
                    "event": "MessageSent",
                    "timestamp": time.time(),
                    "uuid": f"bench-{new_ulid()}",
                    "payload": {
                        "status": "Sent",
                        "details": "Message for r@x.com accepted by 192.0.2.25:25",
                        "output": "250 2.0.0 Ok: queued",
                        "sent_with_ssl": True,
                        "timestamp": time.time(),
                        "time": 0.1,
                        "message": {
                            "id": i + 1,
                            "token": base64.b32encode(os.urandom(10)).decode()[:16],
                            "direction": "outgoing",
                            "message_id": f"{new_ulid()}@{DOMAIN}",
                            "to": "r@x.com",
                            "from": f"bounces@{DOMAIN}",
                            "subject": "bench",
                            "timestamp": time.time(),
                            "spam_status": "NotChecked",
                            "tag": "bench",
                        },
                    },
                }
            ).encode()
            signed.append(
                (body, {"Content-Type": "application/json", **signature_headers(key, body)})
            )
        base = f"http://127.0.0.1:{port}"
        await _ready(f"{base}/readyz", ingest)
        latencies: list[float] = []
        statuses: list[int] = []
        queue: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()
        for item in signed:
            queue.put_nowait(item)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def poster() -> None:
                while not queue.empty():
                    body, headers = queue.get_nowait()
                    t = time.perf_counter()
                    async with http.post(f"{base}/api/v1/webhook", data=body, headers=headers) as r:
                        await r.read()
                        statuses.append(r.status)
                    latencies.append(time.perf_counter() - t)

            cpu = CpuMeter([ingest.pid])
            cpu.start()
            t0 = time.perf_counter()
            await asyncio.gather(*(poster() for _ in range(concurrency)))
            elapsed = time.perf_counter() - t0
            cpu_s = cpu.stop()
        if statuses.count(200) != count:
            raise RuntimeError(f"only {statuses.count(200)} of {count} webhooks answered 200")
        latencies.sort()
        return Row(
            benchmark=f"webhook-ingest verify+publish, {concurrency} concurrent posts",
            rate_per_s=count / elapsed,
            p50_ms=percentile(latencies, 0.5) * 1000,
            p99_ms=percentile(latencies, 0.99) * 1000,
            cpu_s_per_1k=cpu_s / count * 1000,
            note=f"{count} signed MessageSent (RSA-{key.key_size} SHA-256, Postal's default)",
        )
    finally:
        _stop(ingest)


async def run(opts: Options) -> list[Row]:
    submissions = 200 if opts.quick else int(os.environ.get("BENCH_POSTAL_COUNT", "2000"))
    webhooks = 200 if opts.quick else int(os.environ.get("BENCH_WEBHOOK_COUNT", "3000"))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=opts.tmp) as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            for in_flight in (16,) if opts.quick else (16, 4):
                rows.append(await _submissions(server.url, Path(tmp), submissions, in_flight))
            rows.append(await _webhooks(server.url, webhooks, 20))
        finally:
            server.stop()
    return rows
