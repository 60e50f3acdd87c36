"""Tracker throughput: pixel and click redirect at 50 connections vs a bare aiohttp handler.

Three processes besides this one: a nats-server (sync_interval always), the tracker
(``python -m mailgate_tracker``) and a plain aiohttp app answering the same GIF (and a bare
302), so the ratio shows what token checking, classification and publishing cost.

Method (one 10 s run a target moved by +-20% between runs on the 2-core machine, and the
pixel's ratio to the bare GIF read 1.61x, 0.95x and 0.89x in three runs of the same code):
every target (bare GIF, tracker pixel, bare 302, tracker click, nginx) is warmed up once, then
measured in ``BENCH_TRACKER_ROUNDS`` rounds (3; 1 with ``--quick``) of ``BENCH_DURATION_S`` /
rounds seconds each (10 s in all: ~3.3 s a run, 3 s with wrk, which takes whole seconds), the
targets' order rotated by one from round to round so none always runs first or last. A row
shows the medians over the rounds (rate, p50, p99, CPU s/1k) and its note the per-round rates
in round order; the tracker's ratios are the medians of each round's paired ratios (the
tracker's rate over the same round's bare twin's, or nginx's) with their range: "0.97x of bare
GIF (rounds 0.91-1.05)". After every tracker run the bench waits until every answered
request's event is in TRACK, so the next run starts with the tracker's buffer empty.

The load client keeps ``CONNECTIONS`` keep-alive connections with one request in flight on
each, and its CPU per 1000 requests is in every row's note; a row whose client used 0.9 of a
core or more says it is client-bound. It is ``wrk`` (one thread; a Lua hook checks every
answer's status) when installed (``BENCH_INSTALL=1`` as root installs the Debian package), else
a minimal HTTP/1.1 client on raw asyncio streams on a uvloop loop of its own in a thread
(aiohttp's own client spends more CPU per request than the server under test);
``BENCH_TRACKER_CLIENT=python`` or ``wrk`` chooses. Measured on the 2-core machine: the Python
client costs 0.035-0.06 CPU s/1k, wrk 0.015-0.025. The Python client tops out below 30,000
requests/s on its core (client-bound against nginx, which serves ~54,000/s to wrk with its one
worker at one core), and against a bare aiohttp handler (one core, ~15,000/s either way) it
used 0.65-0.9 of a core to wrk's 0.3: the core that nats-server, the tracker's publishing and
the bench's TRACK reader share. An nginx row appears only when ``nginx`` is installed.

The tracker inherits this process's environment: ``TRACKER_INLINE_ROUTES=false`` measures it
with every request going through its aiohttp ``Application`` (the A/B of docs/tracking.md).
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import statistics
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
from mailgate_core.runtime import loop_factory
from mailgate_core.schemas import TrackBatch, decode
from mailgate_core.tracking import TokenSigner
from mailgate_fakes.infra import NatsServer, free_port, wait_for_port

from common import (
    CpuMeter,
    Options,
    Row,
    Sample,
    apt_install,
    median_row,
    paired_ratio,
    percentile,
    process_cpu_s,
    rotated,
    spread_note,
)
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
    p50_s: float
    p99_s: float
    statuses: Counter[int]
    """Answers by status (wrk: the expected status and ``0`` for any other)."""


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
    elapsed = time.perf_counter() - t0
    latencies.sort()
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    return Load(len(latencies), elapsed, p50, p99, statuses)


def _python_load(port: int, path: str, duration_s: float, expect: int) -> tuple[Load, float]:
    """``load`` on a uvloop loop of its own in the calling thread: ``(load, its CPU seconds)``
    (this thread's alone: the TRACK reader runs on the main thread's loop meanwhile)."""
    cpu0 = time.thread_time()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        result = runner.run(load(port, path, duration_s))
    return result, time.thread_time() - cpu0


#: wrk's Lua hooks: count the answers whose status is not the expected one, and print the
#: figures in one line (latency in microseconds, duration too).
WRK_SCRIPT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) unexpected = 0 end
function response(status, headers, body)
  if status ~= EXPECT then unexpected = unexpected + 1 end
end
function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do bad = bad + thread:get("unexpected") end
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), bad, e.connect + e.read + e.write + e.timeout))
end
"""


def wrk_seconds(duration_s: float) -> int:
    """wrk takes whole seconds: the run's duration rounded, at least one."""
    return max(1, round(duration_s))


def _wrk_load(port: int, path: str, duration_s: float, expect: int) -> tuple[Load, float]:
    """``wrk`` (one thread, ``CONNECTIONS`` keep-alive connections, one request in flight on
    each, as the Python client) for ``wrk_seconds(duration_s)``: ``(load, wrk's CPU seconds)``."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.replace("EXPECT", str(expect)))
    try:
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(  # noqa: S603 - wrk from the system's package
            [
                *(shutil.which("wrk") or "wrk", "-t1", f"-c{CONNECTIONS}"),
                *(f"-d{wrk_seconds(duration_s)}s", "-s", script.name),
                *("-H", f"User-Agent: {USER_AGENT}", "-H", "Accept: */*"),
                f"http://127.0.0.1:{port}{path}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        os.unlink(script.name)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({done.returncode}): {done.stderr[-300:]}{done.stdout[-300:]}"
        )
    requests, duration_us, p50_us, p99_us, bad, errors = (int(x) for x in line.split()[1:])
    if errors:
        raise RuntimeError(f"wrk: {errors} socket errors: {done.stdout[-500:]}")
    cpu = (usage.ru_utime + usage.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    statuses = Counter({expect: requests - bad, 0: bad})
    return Load(requests, duration_us / 1e6, p50_us / 1e6, p99_us / 1e6, +statuses), cpu


LoadClient = Callable[[int, str, float, int], tuple[Load, float]]


def choose_client(install: bool) -> tuple[str, LoadClient]:
    """``BENCH_TRACKER_CLIENT`` (``wrk`` or ``python``); by default wrk when it is installed
    (with ``install``: BENCH_INSTALL=1 as root installs the Debian package), else Python."""
    wanted = os.environ.get("BENCH_TRACKER_CLIENT", "").strip().lower()
    if wanted == "python":
        return "python", _python_load
    if not shutil.which("wrk") and install and os.geteuid() == 0:
        failed = apt_install("wrk")
        if failed:
            print(f"  bench_tracker: wrk {failed}; the Python client instead", flush=True)
    if shutil.which("wrk"):
        return "wrk", _wrk_load
    if wanted == "wrk":
        raise RuntimeError("BENCH_TRACKER_CLIENT=wrk but wrk is not installed")
    return "python", _python_load


#: A run whose load client used this much of a core or more measured the client, not the server.
CLIENT_BOUND_CORES = 0.9


@dataclass(frozen=True)
class Target:
    """One thing the load client requests, and whose CPU its run counts."""

    key: str
    """A key of ``NAMES``: ``bare GIF``, ``pixel``, ``bare 302``, ``click`` or ``nginx``."""
    port: int
    path: str
    pids: tuple[int, ...]
    expect: int
    """The HTTP status every answer must have."""
    tracked: bool = False
    """Its requests become events in TRACK (the tracker's pixel and click)."""
    tree: bool = False
    """Count the pids' children too (nginx's worker)."""

    @property
    def name(self) -> str:
        return NAMES[self.key]


@dataclass(frozen=True)
class TrackerSample(Sample):
    durable_per_s: float | None = None
    """Events per second stored in TRACK during the run (tracker targets)."""


async def warm_up(target: Target, duration_s: float, client: LoadClient) -> None:
    """Load the target briefly (imports, caches, the tracker's first batches)."""
    await asyncio.to_thread(client, target.port, target.path, duration_s, target.expect)


async def measure(
    target: Target,
    duration_s: float,
    stored: Callable[[], Awaitable[int]],
    storage_cpu: Callable[[], float],
    client: LoadClient,
) -> tuple[TrackerSample, Load]:
    """One run: load ``target`` for ``duration_s``. A tracker target's sample also has the
    events made durable per second meanwhile and nats-server's CPU per 1000 requests."""
    before = await stored() if target.tracked else 0
    meter = CpuMeter(list(target.pids), tree=target.tree)
    meter.start()
    storage0 = storage_cpu()
    result, client_cpu = await asyncio.to_thread(
        client, target.port, target.path, duration_s, target.expect
    )
    cpu = meter.stop()
    storage = storage_cpu() - storage0
    durable = (await stored() - before) / result.elapsed_s if target.tracked else None
    bad = result.requests - result.statuses.get(target.expect, 0)
    if bad:
        raise RuntimeError(
            f"{target.name}: {bad} answers were not {target.expect}: {dict(result.statuses)}"
        )
    per_1k = 1000 / result.requests
    sample = TrackerSample(
        rate_per_s=result.requests / result.elapsed_s,
        p50_ms=result.p50_s * 1000,
        p99_ms=result.p99_s * 1000,
        cpu_s_per_1k=cpu * per_1k,
        client_cpu_s_per_1k=client_cpu * per_1k,
        storage_cpu_s_per_1k=storage * per_1k if target.tracked else None,
        durable_per_s=durable,
    )
    return sample, result


#: Each target's row label (", 50 conns" appended).
NAMES = {
    "bare GIF": "bare aiohttp GIF handler",
    "pixel": "tracker open pixel GET /track/o/<token>",
    "bare 302": "bare aiohttp 302 handler",
    "click": "tracker click GET /track/c/<token> -> 302",
    "nginx": "nginx static GIF",
}
FIXED_NOTES = {
    "bare GIF": "same GIF and headers, no token/NATS",
    "bare 302": "same Location and headers, no token/NATS",
    "nginx": "1 worker, static file",
}


def _client_note(samples: list[TrackerSample]) -> str:
    """``client-bound (...)`` when the load client used most of a core (median over rounds)."""
    cores = statistics.median(s.client_cpu_s_per_1k * s.rate_per_s / 1000 for s in samples)
    if cores < CLIENT_BOUND_CORES:
        return ""
    return f"client-bound: the load client used {cores:.2f} of a core"


def target_rows(samples: dict[str, list[TrackerSample]], client: str = "python") -> dict[str, Row]:
    """The rows of the targets measured (keys as in ``NAMES``), each from its rounds' samples:
    medians, the tracker's paired ratios to its bare twin (the pixel's to nginx too) with their
    range, the events made durable, the load client's CPU and the per-round rates."""
    rows: dict[str, Row] = {}
    for key, name in NAMES.items():
        if key not in samples:
            continue
        mine = samples[key]
        row = median_row(f"{name}, {CONNECTIONS} conns", mine)
        parts = [FIXED_NOTES.get(key, "")]
        if key == "pixel":
            ratios = [paired_ratio(mine, samples["bare GIF"], "of bare GIF")]
            if "nginx" in samples:
                ratios.append(paired_ratio(mine, samples["nginx"], "of nginx"))
            parts = [", ".join(ratios)]
        elif key == "click":
            parts = [paired_ratio(mine, samples["bare 302"], "of bare 302")]
        durable = [s.durable_per_s for s in mine if s.durable_per_s is not None]
        if durable:
            parts.append(f"{statistics.median(durable):,.0f} events/s made durable")
        if row.note:  # "+ nats-server 0.020"
            parts.append(f"{row.note} CPU s/1k")
        parts += [f"{client} {spread_note(mine)}", _client_note(mine)]
        row.note = "; ".join(p for p in parts if p)
        rows[key] = row
    return rows


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
    rounds = max(1, int(os.environ.get("BENCH_TRACKER_ROUNDS", "1" if opts.quick else "3")))
    per_run_s = duration_s / rounds
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
            targets = [
                Target("bare GIF", bare_port, "/gif", (bare.pid,), 200),
                Target("pixel", tracker_port, open_path, (tracker.pid,), 200, True),
                Target("bare 302", bare_port, "/redirect", (bare.pid,), 302),
                Target("click", tracker_port, click_path, (tracker.pid,), 302, True),
            ]
            install = os.environ.get("BENCH_INSTALL") == "1"
            client_name, client = choose_client(install)
            nginx_missing = ensure_nginx(install)
            if not nginx_missing:
                nginx, nginx_port = _start_nginx(tmp)
                procs.append(nginx)
                targets.append(Target("nginx", nginx_port, "/gif", (nginx.pid,), 200, tree=True))
                wait_for_port("127.0.0.1", nginx_port, proc=nginx)
            wait_for_port("127.0.0.1", tracker_port, proc=tracker, timeout_s=30)
            wait_for_port("127.0.0.1", bare_port, proc=bare, timeout_s=30)

            nc = await nats.connect(server.url)
            tally = Tally(nc.jetstream())
            await tally.start()
            stored = tally.count
            assert server.proc is not None
            nats_pid = server.proc.pid
            catch_up_s = 3 if opts.quick else 30

            for target in targets:  # once per target, not per round
                await warm_up(target, min(1.0, duration_s / 4), client)
            await _caught_up(stored, tracker_port, catch_up_s)
            samples: dict[str, list[TrackerSample]] = {t.key: [] for t in targets}
            measured_requests = 0
            measuring = time.monotonic()
            for round_index in range(rounds):
                for target in rotated(targets, round_index):
                    sample, result = await measure(
                        target, per_run_s, stored, lambda: process_cpu_s(nats_pid), client
                    )
                    samples[target.key].append(sample)
                    if target.tracked:
                        measured_requests += result.requests
                        # The next run, whichever, starts with the tracker's buffer empty.
                        await _caught_up(stored, tracker_port, catch_up_s)
            measured_s = time.monotonic() - measuring
            by_key = target_rows(samples, client_name)

            # Every answered request should become a stored event (warm-ups included).
            count = await _caught_up(stored, tracker_port, catch_up_s)
            await tally.stop()
            await nc.close()
            answered = _metric(tracker_port, "mailgate_tracker_requests_total")
            dropped = _metric(tracker_port, "mailgate_tracker_events_dropped_total")
            events = Row(
                benchmark="tracker events stored in TRACK after the load",
                rate_per_s=None,
                note=f"{count}/{int(answered)} stored, {int(dropped)} dropped "
                f"({measured_requests} measured requests; {tally.messages} JetStream messages)"
                + ("; the rest still buffered" if count < answered else ""),
            )
            rows += [by_key[k] for k in ("bare GIF", "pixel", "bare 302", "click")] + [events]
            rows.append(by_key["nginx"] if "nginx" in by_key else _no_nginx(nginx_missing))
            print(
                f"  bench_tracker: {len(targets)} targets x {rounds} rounds of "
                f"{wrk_seconds(per_run_s) if client_name == 'wrk' else per_run_s:.1f}s "
                f"({client_name} client) measured in {measured_s:.1f}s",
                flush=True,
            )
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
    return apt_install("nginx-light")


def _start_nginx(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """nginx serving the tracker's GIF at ``/gif`` with one worker: ``(process, port)``."""
    from mailgate_tracker.pages import PIXEL_GIF

    (tmp / "pixel.gif").write_bytes(PIXEL_GIF)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp, port=port))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen(  # noqa: S603 - started before the timed part
        [nginx, "-c", str(conf)], stderr=subprocess.DEVNULL
    )
    return proc, port
