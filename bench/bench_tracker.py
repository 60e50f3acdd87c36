"""Tracker throughput: pixel and click redirect at 50 connections vs a bare aiohttp handler.

Three processes besides this one: a nats-server (sync_interval always), the tracker
(``python -m mailgate_tracker``) and a plain aiohttp app answering the same GIF (and a bare
302), so the ratio shows what token checking, classification and publishing cost.

The load generator is a minimal HTTP/1.1 keep-alive client on raw asyncio streams, one
request in flight per connection: aiohttp's own client spends more CPU per request than
the server under test, and on a 2-core machine it would measure itself. ``wrk`` is not
required; an nginx column appears only when ``nginx`` is on PATH.

The tracker inherits this process's environment: ``TRACKER_INLINE_ROUTES=false`` measures it
with every request going through its aiohttp ``Application`` (the A/B of docs/tracking.md).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from mailgate_core.ids import new_ulid
from mailgate_core.nats import provision
from mailgate_core.schemas import TrackBatch, decode
from mailgate_core.tracking import TokenSigner
from mailgate_fakes.infra import NatsServer, free_port, wait_for_port

from common import CpuMeter, Options, Row, percentile
from common import spawn as _spawn
from common import stop as _stop

CONNECTIONS = 50
SECRET = "bench-tracking-secret-0123456789"  # noqa: S105 - a throwaway bench key
LANDING = "https://shop.example.com/landing?utm_source=mail&utm_campaign=73"
USER_AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari"

BARE_SERVER = """
import sys
from aiohttp import web
from mailgate_tracker.pages import NO_CACHE_HEADERS, PIXEL_GIF

async def gif(request):
    return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=NO_CACHE_HEADERS)

async def redirect(request):
    return web.Response(status=302, headers={"Location": sys.argv[2], **NO_CACHE_HEADERS})

app = web.Application()
app.add_routes([web.get("/gif", gif), web.get("/redirect", redirect)])
# The same event loop as the services (mailgate_core.runtime): uvloop.
from mailgate_core.runtime import loop_factory
factory = loop_factory()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=factory() if factory else None)
"""

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  server {{
    listen 127.0.0.1:{port};
    location = /gif {{
      add_header Cache-Control "no-store, no-cache, must-revalidate, max-age=0, private";
      default_type image/gif;
      alias {dir}/pixel.gif;
    }}
  }}
}}
"""

_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


@dataclass
class Load:
    requests: int
    elapsed_s: float
    latencies_s: list[float]
    statuses: Counter[int]


async def _connection(
    port: int, request: bytes, stop_at: float, latencies: list[float], statuses: Counter[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            match = _LENGTH.search(head)
            if match is None:
                raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
            await reader.readexactly(int(match.group(1)))
            latencies.append(time.perf_counter() - t0)
            statuses[int(head[9:12])] += 1
    finally:
        writer.close()


async def load(port: int, path: str, duration_s: float) -> Load:
    """``CONNECTIONS`` keep-alive connections requesting ``path`` for ``duration_s``."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    t0 = time.perf_counter()
    stop_at = t0 + duration_s
    await asyncio.gather(
        *(_connection(port, request, stop_at, latencies, statuses) for _ in range(CONNECTIONS))
    )
    return Load(len(latencies), time.perf_counter() - t0, sorted(latencies), statuses)


async def measure(
    name: str,
    port: int,
    path: str,
    duration_s: float,
    pids: list[int],
    expect: int,
    stored: Callable[[], Awaitable[int]] | None = None,
) -> tuple[Row, Load]:
    """Warm up, then load ``path`` for ``duration_s``. With ``stored`` (events stored in the
    TRACK stream), the note gets how many events per second became durable meanwhile."""
    await load(port, path, min(1.0, duration_s / 4))  # warm-up (imports, caches)
    before = await stored() if stored else 0
    meter = CpuMeter(pids)
    meter.start()
    result = await load(port, path, duration_s)
    cpu = meter.stop()
    durable = (await stored() - before) / result.elapsed_s if stored else None
    bad = result.requests - result.statuses.get(expect, 0)
    if bad:
        raise RuntimeError(f"{name}: {bad} answers were not {expect}: {dict(result.statuses)}")
    row = Row(
        benchmark=f"{name}, {CONNECTIONS} conns",
        rate_per_s=result.requests / result.elapsed_s,
        p50_ms=percentile(result.latencies_s, 0.5) * 1000,
        p99_ms=percentile(result.latencies_s, 0.99) * 1000,
        cpu_s_per_1k=cpu / result.requests * 1000,
        note=f"{durable:,.0f} events/s made durable" if durable is not None else "",
    )
    return row, result


class Tally:
    """Events stored in TRACK, read back as they are stored (an ordered consumer in this
    process): a ``track.batch`` message counts its events, any other message one. Counts
    distinct event ids, so a duplicate would show as ``stored < answered``."""

    def __init__(self, js: Any) -> None:
        self.js = js
        self.event_ids: set[str] = set()
        self.messages = 0
        self.last_seq = 0
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.js.subscribe(
            "track.>", stream="TRACK", ordered_consumer=True, cb=self._on_msg
        )

    async def _on_msg(self, msg: Any) -> None:
        self.messages += 1
        self.last_seq = msg.metadata.sequence.stream
        if msg.subject == "track.batch":
            self.event_ids.update(e.event_id for e in decode(msg.data, TrackBatch).events())
        else:
            self.event_ids.add((msg.headers or {}).get("Nats-Msg-Id", str(self.last_seq)))

    async def count(self, timeout_s: float = 10.0) -> int:
        """Events stored so far (waits until every message stored by now was read)."""
        last = (await self.js.stream_info("TRACK")).state.last_seq
        deadline = time.monotonic() + timeout_s
        while self.last_seq < last and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return len(self.event_ids)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _caught_up(stored: Callable[[], Awaitable[int]], port: int, timeout_s: float) -> int:
    """Wait (up to ``timeout_s``) until every answered request's event is in TRACK."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = await stored()
        answered = _metric(port, "mailgate_tracker_requests_total")
        if count >= answered or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.1)


async def run(opts: Options) -> list[Row]:
    duration_s = 0.5 if opts.quick else float(os.environ.get("BENCH_DURATION_S", "10"))
    signer = TokenSigner([SECRET])
    mailgate_id = new_ulid(int((time.time() - 3600) * 1000))  # accepted an hour ago
    open_path = f"/track/o/{signer.make_open_token(mailgate_id)}"
    click_path = f"/track/c/{signer.make_click_token(mailgate_id, LANDING)}"
    rows: list[Row] = []
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(dir=opts.tmp) as tmp_name:
        tmp = Path(tmp_name)
        server = NatsServer(tmp / "nats").start()
        try:
            nc = await nats.connect(server.url)
            await provision(nc.jetstream())
            await nc.close()
            tracker_port, bare_port = free_port(), free_port()
            tracker = _spawn(
                [sys.executable, "-m", "mailgate_tracker"],
                {
                    "NATS_URL": server.url,
                    "TRACKER_HOST": "127.0.0.1",
                    "TRACKER_PORT": str(tracker_port),
                    "TRACKING_SECRET": SECRET,
                    "LOG_LEVEL": "warning",
                },
                tmp / "tracker.log",
                profile="tracker",
            )
            procs.append(tracker)
            bare = _spawn(
                [sys.executable, "-c", BARE_SERVER, str(bare_port), LANDING], {}, tmp / "bare.log"
            )
            procs.append(bare)
            wait_for_port("127.0.0.1", tracker_port, proc=tracker, timeout_s=30)
            wait_for_port("127.0.0.1", bare_port, proc=bare, timeout_s=30)

            nc = await nats.connect(server.url)
            tally = Tally(nc.jetstream())
            await tally.start()
            stored = tally.count

            bare_gif, _ = await measure(
                "bare aiohttp GIF handler", bare_port, "/gif", duration_s, [bare.pid], 200
            )
            pixel, pixel_load = await measure(
                "tracker open pixel GET /track/o/<token>",
                tracker_port,
                open_path,
                duration_s,
                [tracker.pid],
                200,
                stored,
            )
            bare_302, _ = await measure(
                "bare aiohttp 302 handler", bare_port, "/redirect", duration_s, [bare.pid], 302
            )
            if not opts.quick:
                await _caught_up(stored, tracker_port, 30)  # start with an empty buffer
            click, click_load = await measure(
                "tracker click GET /track/c/<token> -> 302",
                tracker_port,
                click_path,
                duration_s,
                [tracker.pid],
                302,
                stored,
            )
            assert bare_gif.rate_per_s and bare_302.rate_per_s
            assert pixel.rate_per_s and click.rate_per_s
            pixel.note = f"{pixel.rate_per_s / bare_gif.rate_per_s:.2f}x of bare GIF; {pixel.note}"
            click.note = f"{click.rate_per_s / bare_302.rate_per_s:.2f}x of bare 302; {click.note}"
            bare_gif.note = "same GIF and headers, no token/NATS"

            # Every answered request should become a stored event (warm-ups included).
            count = await _caught_up(stored, tracker_port, 3 if opts.quick else 30)
            await tally.stop()
            await nc.close()
            answered = _metric(tracker_port, "mailgate_tracker_requests_total")
            dropped = _metric(tracker_port, "mailgate_tracker_events_dropped_total")
            events = Row(
                benchmark="tracker events stored in TRACK after the load",
                rate_per_s=None,
                note=f"{count}/{int(answered)} stored, {int(dropped)} dropped "
                f"({pixel_load.requests + click_load.requests} measured requests; "
                f"{tally.messages} JetStream messages)"
                + ("; the rest still buffered" if count < answered else ""),
            )
            rows += [bare_gif, pixel, bare_302, click, events]
            nginx_missing = ensure_nginx(os.environ.get("BENCH_INSTALL") == "1")
            if nginx_missing:
                rows.append(_no_nginx(nginx_missing))
            else:
                nginx_row = await _nginx_row(tmp, duration_s)
                if nginx_row.rate_per_s:
                    pixel.note += f"; {pixel.rate_per_s / nginx_row.rate_per_s:.2f}x of nginx"
                rows.append(nginx_row)
        finally:
            for proc in procs:
                _stop(proc)
            server.stop()
    return rows


def _no_nginx(why: str) -> Row:
    return Row(benchmark=f"nginx static GIF, {CONNECTIONS} conns", note=why)


def ensure_nginx(install: bool) -> str:
    """``""`` when nginx can run, else why not (the skip note). With ``install``
    (BENCH_INSTALL=1, as root) the Debian package ``nginx-light`` is installed."""
    if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
        return ""
    if not install:
        return "skipped: nginx not installed (BENCH_INSTALL=1 as root installs it)"
    if os.geteuid() != 0:
        return "skipped: nginx not installed and BENCH_INSTALL=1 needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "nginx-light"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            return f"skipped: {' '.join(argv)} failed: {done.stderr.strip()[-200:]}"
    return ""


async def _nginx_row(tmp: Path, duration_s: float) -> Row:
    from mailgate_tracker.pages import PIXEL_GIF

    (tmp / "pixel.gif").write_bytes(PIXEL_GIF)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp, port=port))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen(  # noqa: S603, ASYNC220 - started before the timed part
        [nginx, "-c", str(conf)], stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        row, _ = await measure("nginx static GIF", port, "/gif", duration_s, [proc.pid], 200)
    finally:
        _stop(proc)
    return row
