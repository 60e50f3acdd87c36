"""SMTP intake: campaign-like messages into smtp-ingest vs a bare aiosmtpd server.

Processes besides this one: a nats-server (``sync_interval: always``), smtp-ingest
(``python -m mailgate_smtp_ingest``, a credential in the KV bucket) and a bare aiosmtpd
server that accepts any AUTH and discards every message, so the ratio shows what AUTH
checks, parsing, per-recipient rewrite (signed links, pixel, unsubscribe) and the durable
JetStream publish cost on top of aiosmtpd itself.

The client is a minimal async SMTP client on asyncio streams (STARTTLS with
``StreamWriter.start_tls``): 20 concurrent sessions, one recipient per message, either a new
connection (EHLO, STARTTLS, EHLO, AUTH) per message or one connection reused for all of a
session's messages. Latency is from the end of DATA (the lone dot) to the 250 reply; CPU is
the server process's (user + system) per 1000 messages. Every message has its own MIME
boundaries, Message-ID and X-AMS-Message-ID, as a mailer's campaign has (``Payload``;
``BENCH_SMTP_SAME_MESSAGE=1`` sends one message over and over, as the bench did before).

Method (a run of a few hundred messages lasts half a second and its rate moves by +-8%, so
one run's ratio says little): every case is measured in ``BENCH_SMTP_ROUNDS`` rounds (3; 1 with
``--quick``), each round runs every case once with the servers one after the other, and the
servers' order rotates from round to round (smtp-ingest, bare, Postfix; then bare, Postfix,
smtp-ingest; ...), so no server always runs first or last and slow drift of the machine hits
them alike. A run sends ``COUNTS[case]`` messages (about 2 s of work on the 2-core machine;
``BENCH_SMTP_COUNT`` overrides every case). Each figure of a row (rate, p50, p99, CPU s/1k,
nats-server's and the client's CPU) is the median of its per-round values, and the note lists
the per-round rates in round order ("rates 683/701/744"). The ratios to Postfix and to bare are
paired: each round's smtp-ingest figure over the same round's other server's, the median of
those shown with their range ("1.06x Postfix (rounds 1.00-1.14)"). Postfix's hold queue is
emptied between rounds (its count is added up first), so its queue directory does not grow
from round to round.

Run it alone: ``python bench/run.py --only smtp`` (``BENCH_SMTP_COUNT`` messages per run,
``BENCH_SMTP_ROUNDS`` rounds, ``BENCH_SMTP_CASES`` a part of the row labels to run, e.g.
``2 KB, STARTTLS, reused``, or ``10 MB`` for the memory row alone;
``BENCH_SMTP_INGEST_ONLY=1`` measures smtp-ingest only).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

import msgspec
import nats
from mailgate_core.nats import KV_ACCOUNTS, KV_CREDENTIALS, provision
from mailgate_core.passwords import hash_password
from mailgate_core.records import AccountRecord, CredentialRecord
from mailgate_core.runtime import loop_factory
from mailgate_fakes.infra import NatsServer, free_port, wait_for_port
from postfix import Postfix, ensure_postfix

from common import (
    Options,
    Row,
    Sample,
    median_row,
    paired_ratio,
    peak_rss_bytes,
    percentile,
    process_tree_cpu_s,
    rotated,
    spread_note,
    tree_pids,
)
from common import spawn as _spawn
from common import stop as _stop

SESSIONS = 20
USER = "bench-relay"
PASSWORD = "bench-password-0123456789"  # noqa: S105 - a throwaway bench credential
SENDER = "news@shop.example.com"
DOMAIN = "mg.example.net"
TRACKING_SECRET = "bench-tracking-secret-0123456789"  # noqa: S105 - a throwaway bench key


# --- messages ---------------------------------------------------------------------------------


def campaign_message(target_size: int, *, links: int, attachment: int = 0) -> bytes:
    """An AMS-like campaign: text + HTML alternative (QP), ``links`` links, an optional
    PDF-like attachment, padded with paragraphs to about ``target_size`` bytes."""
    msg = EmailMessage()
    msg["From"] = f"Shop <{SENDER}>"
    msg["To"] = "ivan@example.org"
    msg["Subject"] = "Скидки недели: до -50%"
    msg["X-AMS-Message-ID"] = "ams-bench-1"
    msg["X-AMS-Campaign-ID"] = "73"
    anchors = "".join(
        f'<tr><td><a href="https://shop.example.com/item/{i}?utm_source=ams&amp;utm_campaign=73"'
        f' style="color:#06c">Товар {i}: новая коллекция</a></td></tr>\n'
        for i in range(links)
    )
    html = (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Скидки</title></head>'
        '<body style="margin:0"><table width="600" align="center">\n'
        f"{anchors}"
        '<tr><td><a href="[Unsubscribe]">Отписаться от рассылки</a></td></tr>\n'
        "</table></body></html>\n"
    )
    text = "Скидки недели!\n" + "Подробнее: https://shop.example.com/\n" + "[Unsubscribe]\n"
    msg.set_content(text, cte="quoted-printable")
    msg.add_alternative(html, subtype="html", cte="quoted-printable")
    if attachment:
        msg.add_attachment(
            os.urandom(attachment), maintype="application", subtype="pdf", filename="price.pdf"
        )
    html_part = msg.get_payload()[0].get_payload()[1] if attachment else msg.get_payload()[1]
    filler = "<p>" + "Описание товара и условия акции. " * 2 + "</p>\n"

    def build(paragraphs: int) -> bytes:
        padded = html.replace("</table>", "</table>" + filler * paragraphs)
        html_part.set_content(padded, subtype="html", cte="quoted-printable")
        return msg.as_bytes(policy=SMTP_POLICY)

    bare, ten = len(build(0)), len(build(10))
    return build(max(0, round((target_size - bare) / ((ten - bare) / 10))))


def dot_stuffed(raw: bytes) -> bytes:
    """The message as DATA carries it (RFC 5321 4.5.2), ending in CRLF."""
    data = re.sub(rb"(?m)^\.", b"..", raw)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


class Payload:
    """DATA for one message after another, each with its own MIME boundaries, Message-ID and
    X-AMS-Message-ID, as a mailer sends a campaign: a server that memoises what it parsed
    (header values, boundary patterns) would otherwise see one message over and over.
    ``BENCH_SMTP_SAME_MESSAGE=1``: every message is the same bytes (the old bench)."""

    _RUN = itertools.count()

    def __init__(self, data: bytes, *, fresh: bool = True):
        self.fresh = fresh
        boundaries = list(dict.fromkeys(re.findall(rb'boundary="([^"]+)"', data)))
        data = b"Message-ID: <\x00M\x00@shop.example.com>\r\n" + data
        data = data.replace(b"X-AMS-Message-ID: ams-bench-1", b"X-AMS-Message-ID: \x00A\x00", 1)
        for index, boundary in enumerate(boundaries):
            data = data.replace(boundary, b"\x00%d\x00" % index)
        self._pieces = data.split(b"\x00")  # literal, slot, literal, slot, ..., literal
        self._first = self._fill(next(self._RUN))

    def _fill(self, serial: int) -> bytes:
        unique = b"%06d%013d" % (os.getpid() % 1_000_000, serial)
        values = {b"M": b"bench-" + unique, b"A": b"ams-" + unique}
        pieces = self._pieces[:]
        for i in range(1, len(pieces), 2):
            slot = pieces[i]
            pieces[i] = values.get(slot) or b"=_mg" + slot + b"_" + unique + b"_="
        return b"".join(pieces)

    def next(self) -> bytes:
        return self._fill(next(self._RUN)) if self.fresh else self._first

    def __len__(self) -> int:
        return len(self._first)


# --- a minimal async SMTP client ----------------------------------------------------------------


class SmtpError(Exception):
    pass


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None, *, auth: bool = True) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        await client.expect(220)
        await client.command(b"EHLO bench.example.com", 250)
        if tls is not None:
            await client.command(b"STARTTLS", 220)
            await writer.start_tls(tls, server_hostname="localhost")
            await client.command(b"EHLO bench.example.com", 250)
        if auth:
            plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
            await client.command(b"AUTH PLAIN " + plain, 235)
        return client

    async def expect(self, code: int) -> bytes:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise SmtpError("connection closed")
            lines.append(line)
            if line[3:4] != b"-":
                break
        text = b"".join(lines)
        if int(line[:3]) != code:
            raise SmtpError(f"expected {code}, got {text[:200]!r}")
        return text

    async def command(self, line: bytes, code: int) -> bytes:
        self.writer.write(line + b"\r\n")
        return await self.expect(code)

    async def send(self, recipient: str, data: bytes) -> float:
        """One transaction; seconds from the end of DATA to the 250."""
        await self.command(b"MAIL FROM:<" + SENDER.encode() + b"> SIZE=" + b"%d" % len(data), 250)
        await self.command(b"RCPT TO:<" + recipient.encode() + b">", 250)
        await self.command(b"DATA", 354)
        self.writer.write(data)
        await self.writer.drain()
        self.writer.write(b".\r\n")
        started = time.perf_counter()
        await self.expect(250)
        return time.perf_counter() - started

    async def close(self) -> None:
        with contextlib.suppress(SmtpError, OSError):
            await self.command(b"QUIT", 221)
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


@dataclass
class Load:
    messages: int
    elapsed_s: float
    latencies_s: list[float]


async def drive(
    port: int,
    payload: Payload,
    count: int,
    *,
    tls: ssl.SSLContext | None,
    reuse: bool,
    auth: bool = True,
) -> Load:
    """``count`` messages over ``SESSIONS`` concurrent sessions."""
    latencies: list[float] = []
    per_session = [count // SESSIONS + (i < count % SESSIONS) for i in range(SESSIONS)]

    async def session(index: int, messages: int) -> None:
        client = await Client.open(port, tls, auth=auth) if reuse else None
        for n in range(messages):
            one = client or await Client.open(port, tls, auth=auth)
            latencies.append(await one.send(f"r{index}-{n}@example.org", payload.next()))
            if not reuse:
                await one.close()
        if client is not None:
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(session(i, n) for i, n in enumerate(per_session) if n))
    return Load(len(latencies), time.perf_counter() - started, sorted(latencies))


# --- the servers --------------------------------------------------------------------------------


def bare_server(port: int, cert: str, key: str) -> None:
    """aiosmtpd with STARTTLS, any AUTH accepted, every message discarded (run in a child;
    several children share the port with SO_REUSEPORT, as smtp-ingest's workers do). It runs
    on uvloop like the services (mailgate_core.runtime), so the ratio compares like with like."""
    from aiosmtpd.smtp import SMTP, AuthResult
    from mailgate_core.runtime import loop_factory

    class Discard:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 2.0.0 Ok: discarded"

    def accept_any(*_: object) -> AuthResult:
        return AuthResult(success=True)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(
                Discard(),
                hostname="bare.bench",
                tls_context=context,
                authenticator=accept_any,
                auth_require_tls=False,
                loop=loop,
            ),
            "127.0.0.1",
            port,
            reuse_port=True,
        )
        async with server:
            await server.serve_forever()

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())


def _is_ready(ops_port: int) -> str:
    """``""`` when /readyz answers 200, else why not."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/readyz", timeout=2) as r:
            return "" if r.status == 200 else f"status {r.status}"
    except (urllib.error.URLError, OSError) as exc:
        return str(exc)


def _free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free ports: worker ``i`` serves ops on ``first + i``."""
    for _ in range(50):
        first = free_port()
        probes: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return first
    raise RuntimeError(f"no run of {count} free ports found")


async def _ready(ops_port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"smtp-ingest exited with {proc.returncode}")
        last = await asyncio.to_thread(_is_ready, ops_port)
        if not last:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"smtp-ingest not ready after {timeout_s}s: {last}")


async def _put_credential(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=10)
        await provision(js)
        account = AccountRecord(id="acc-bench", name="Bench", tracking=True)
        credential = CredentialRecord(
            username=USER, account_id=account.id, password_hash=hash_password(PASSWORD)
        )
        await (await js.key_value(KV_ACCOUNTS)).put(account.id, msgspec.json.encode(account))
        await (await js.key_value(KV_CREDENTIALS)).put(USER, msgspec.json.encode(credential))
    finally:
        await nc.close()


# --- the benchmark ------------------------------------------------------------------------------


#: Messages per run of each case (size, STARTTLS, reused connection): about 2 s for
#: smtp-ingest and Postfix on the 2-core machine at their latest rates (in the comments, the
#: three servers' range), so a run's rate is not at the mercy of a half-second hiccup, while
#: the whole module (3 rounds) stays within a few minutes.
COUNTS: dict[tuple[str, bool, bool], int] = {
    ("2 KB", True, True): 1500,  # 680-990/s
    ("2 KB", True, False): 600,  # 260-290/s: a TLS handshake per message
    ("2 KB", False, True): 2000,  # 1,050-1,400/s
    ("2 KB", False, False): 1500,  # 700-810/s
    ("50 KB", True, True): 900,  # 290-610/s
    ("50 KB", True, False): 500,  # 180-270/s
    ("50 KB", False, True): 1000,  # 400-860/s
    ("50 KB", False, False): 1000,  # 320-620/s
}
QUICK_COUNT = 40


@dataclass(frozen=True)
class Case:
    size: str
    data: Payload
    tls: bool
    reuse: bool
    count: int
    """Messages per run."""

    @property
    def label(self) -> str:
        tls = "STARTTLS" if self.tls else "plain"
        conn = "reused conn" if self.reuse else "conn per msg"
        return f"{self.size}, {tls}, {conn}"


@dataclass
class Server:
    """One SMTP server under test: its port, how to count its CPU, whether it wants AUTH."""

    name: str
    port: int
    cpu: Callable[[], float]
    auth: bool = True
    storage_cpu: Callable[[], float] | None = None
    """CPU of the server's durable storage in another process (smtp-ingest: nats-server)."""


def _drive_on_own_loop(port: int, data: Payload, count: int, **options: Any) -> tuple[Load, float]:
    """``drive`` on an event loop of its own in the calling thread: uvloop (as the servers
    run) unless ``BENCH_SMTP_CLIENT_LOOP=asyncio``. ``(load, the client's CPU seconds)``.

    The client shares the 2 cores with the servers: on asyncio's loop and its pure-Python
    TLS it used about a core, starving every column alike and compressing their ratios."""
    factory = loop_factory(os.environ.get("BENCH_SMTP_CLIENT_LOOP", "uvloop"))
    cpu0 = time.thread_time()
    with asyncio.Runner(loop_factory=factory) as runner:
        load = runner.run(drive(port, data, count, **options))
    return load, time.thread_time() - cpu0


async def measure(server: Server, case: Case, tls: ssl.SSLContext) -> Sample:
    """One run of ``case`` against ``server`` (after a warm-up of one message a session)."""
    context = tls if case.tls else None
    options: dict[str, Any] = {"tls": context, "auth": server.auth}
    await asyncio.to_thread(
        _drive_on_own_loop, server.port, case.data, SESSIONS, reuse=True, **options
    )
    cpu0 = server.cpu()
    storage0 = server.storage_cpu() if server.storage_cpu else 0.0
    load, client_cpu = await asyncio.to_thread(
        _drive_on_own_loop, server.port, case.data, case.count, reuse=case.reuse, **options
    )
    cpu = server.cpu() - cpu0
    storage = (server.storage_cpu() - storage0) if server.storage_cpu else None
    per_1k = 1000 / load.messages
    return Sample(
        rate_per_s=load.messages / load.elapsed_s,
        p50_ms=percentile(load.latencies_s, 0.5) * 1000,
        p99_ms=percentile(load.latencies_s, 0.99) * 1000,
        cpu_s_per_1k=cpu * per_1k,
        client_cpu_s_per_1k=client_cpu * per_1k,
        storage_cpu_s_per_1k=None if storage is None else storage * per_1k,
    )


def _ratio_note(
    ours: list[Sample], bare: list[Sample], postfix: list[Sample] | None, workers: int
) -> str:
    parts = [paired_ratio(ours, bare, "bare", f"{workers} procs each")]
    if postfix is not None:
        parts.insert(0, paired_ratio(ours, postfix, "Postfix"))
        if all(s.cpu_s_per_1k for s in postfix):
            cpu = [o.cpu_s_per_1k / t.cpu_s_per_1k for o, t in zip(ours, postfix, strict=True)]
            parts.append(f"{statistics.median(cpu):.1f}x Postfix CPU")
    return ", ".join(parts)


def case_rows(
    case: Case, servers: list[Server], samples: dict[str, list[Sample]], workers: int
) -> list[Row]:
    """The case's rows, one a server in ``servers`` order, from its rounds' ``samples``."""
    rows = [median_row(f"{s.name} {case.label}", samples[s.name]) for s in servers]
    if len(rows) > 1:
        ours, theirs = rows[0], rows[1]
        by_name = [samples[s.name] for s in servers]
        pf = by_name[2] if len(by_name) > 2 else None
        ours.note = f"{_ratio_note(by_name[0], by_name[1], pf, workers)}; {ours.note} CPU s/1k"
        theirs.note = "accepts and discards; same client, same processes"
        if pf is not None:
            rows[2].note = "no AUTH (mynetworks); queue file fsynced before 250"
    elif rows and rows[0].note:
        rows[0].note += " CPU s/1k"  # "+ nats-server 0.300 CPU s/1k"
    for row, server in zip(rows, servers, strict=True):
        row.note = f"{row.note}; {spread_note(samples[server.name])}".lstrip("; ")
    return rows


async def _big_message_row(port: int, ingest: subprocess.Popen[bytes]) -> Row:
    """Peak RSS growth of smtp-ingest's processes for one 10 MB message (to the object
    store: over the inline limit), sent on several connections so every worker gets one."""
    big = dot_stuffed(
        campaign_message(2048, links=4).replace(
            b"\r\n\r\n", b"\r\n\r\n" + (b"x" * 998 + b"\r\n") * 10_000, 1
        )
    )
    # Start the high-water marks at the current RSS: memory freed back to the system
    # after earlier rows (below an older peak) would otherwise hide the message's cost.
    reset = all(_reset_peak_rss(pid) for pid in tree_pids(ingest.pid))
    before = {pid: peak_rss_bytes(pid) for pid in tree_pids(ingest.pid)}
    started = time.perf_counter()
    for _ in range(4):
        client = await Client.open(port, None)
        await client.send("big@example.org", big)
        await client.close()
    elapsed = time.perf_counter() - started
    growth = max(peak_rss_bytes(pid) - rss for pid, rss in before.items())
    return Row(
        benchmark="smtp-ingest 10 MB message, peak RSS growth",
        rate_per_s=4 / elapsed,
        note=f"+{growth / 2**20:.0f} MB peak RSS in a worker ({growth / len(big):.1f}x the "
        f"message); baseline {max(before.values()) / 2**20:.0f} MB"
        + ("" if reset else " (peak since start: VmHWM could not be reset)"),
    )


def _reset_peak_rss(pid: int) -> bool:
    """VmHWM := the current RSS (``/proc/<pid>/clear_refs`` 5, Linux 4.0+)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _pids_cpu(procs: list[subprocess.Popen[bytes]]) -> Callable[[], float]:
    return lambda: sum(process_tree_cpu_s(p.pid) for p in procs)


async def run(opts: Options) -> list[Row]:
    started = time.monotonic()
    count = int(os.environ.get("BENCH_SMTP_COUNT", "0")) or (QUICK_COUNT if opts.quick else 0)
    rounds = max(1, int(os.environ.get("BENCH_SMTP_ROUNDS", "1" if opts.quick else "3")))
    workers = int(os.environ.get("BENCH_SMTP_WORKERS", str(min(2, os.cpu_count() or 1))))
    small = campaign_message(2048, links=4)
    large = campaign_message(50 * 1024, links=40, attachment=20_000)
    fresh = os.environ.get("BENCH_SMTP_SAME_MESSAGE") != "1"
    cases = [
        Case(
            size,
            Payload(dot_stuffed(data), fresh=fresh),
            tls,
            reuse,
            count or COUNTS[size, tls, reuse],
        )
        for size, data in (("2 KB", small), ("50 KB", large))
        for tls in (True, False)
        for reuse in (True, False)
    ]
    if opts.quick:  # one row per server: 2 KB, STARTTLS, reused connection
        cases = cases[:1]
    wanted = os.environ.get("BENCH_SMTP_CASES", "")
    if wanted == "10 MB":  # only the memory row
        cases = []
    elif wanted:  # e.g. "2 KB, STARTTLS, reused"
        cases = [c for c in cases if wanted in c.label] or cases
    rows: list[Row] = []
    postfix_note = ensure_postfix(os.environ.get("BENCH_INSTALL") == "1")
    with tempfile.TemporaryDirectory(dir=opts.tmp) as tmp_name:
        tmp = Path(tmp_name)
        from mailgate_smtp_ingest.tls import self_signed_pair

        cert_pem, key_pem = self_signed_pair("localhost")
        cert, key = tmp / "cert.pem", tmp / "key.pem"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        client_tls = ssl.create_default_context(cadata=cert_pem.decode())
        nats_server = NatsServer(tmp / "nats", sync_interval="always").start()
        ingest: subprocess.Popen[bytes] | None = None
        bare: list[subprocess.Popen[bytes]] = []
        postfix: Postfix | None = None
        try:
            await _put_credential(nats_server.url)
            smtp_port, ops_port, bare_port = free_port(), _free_port_run(workers), free_port()
            env = {
                "NATS_URL": nats_server.url,
                "DOMAIN": DOMAIN,
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(smtp_port),
                "SMTPS_PORT": str(free_port()),
                "SMTP_TLS_CERT": str(cert),
                "SMTP_TLS_KEY": str(key),
                "SMTP_AUTH_REQUIRE_TLS": "false",  # the plain rows authenticate too
                "SMTP_WORKERS": str(workers),
                "OPS_HOST": "127.0.0.1",
                "OPS_PORT": str(ops_port),
                "ALLOWED_SENDER_DOMAINS": "shop.example.com",
                "TRACKING_BASE_URL": "https://t.mg.example.net",
                "TRACKING_SECRET": TRACKING_SECRET,
                "LOG_LEVEL": "warning",
            }
            ingest = _spawn(
                [sys.executable, "-m", "mailgate_smtp_ingest"],
                env,
                tmp / "smtp-ingest.log",
                profile="smtp-ingest",
            )
            bare = [
                _spawn(
                    [sys.executable, __file__, "--bare", str(bare_port), str(cert), str(key)],
                    {},
                    tmp / "bare.log",
                )
                for _ in range(workers)
            ]
            if not postfix_note:
                os.chmod(tmp, 0o755)  # noqa: S103 - Postfix's own users work in there
                postfix = Postfix(tmp / "postfix", free_port(), cert, key).start()
            for index in range(workers):
                await _ready(ops_port + index, ingest)
            for proc in bare:
                wait_for_port("127.0.0.1", bare_port, proc=proc)
            if postfix is not None:
                try:
                    wait_for_port("127.0.0.1", postfix.port, proc=postfix.proc, timeout_s=20)
                except RuntimeError as exc:
                    postfix_note = f"skipped: postfix did not start ({exc}): {postfix.log_tail(5)}"
                    postfix.stop()
                    postfix = None
            ingest_cpu = _pids_cpu([ingest])  # the supervisor and its workers
            servers = [
                Server(
                    f"smtp-ingest x{workers}",
                    smtp_port,
                    ingest_cpu,
                    storage_cpu=_pids_cpu([nats_server.proc]) if nats_server.proc else None,
                ),
                Server(f"aiosmtpd bare x{workers}", bare_port, _pids_cpu(bare)),
            ]
            if postfix is not None:
                servers.append(
                    Server("postfix (hold queue)", postfix.port, postfix.cpu_s, auth=False)
                )
            if os.environ.get("BENCH_SMTP_INGEST_ONLY") == "1":  # quick before/after runs
                servers = servers[:1]
            samples: dict[tuple[str, str], list[Sample]] = {}
            held = 0
            measuring = time.monotonic()
            for round_index in range(rounds):
                round_started = time.monotonic()
                for case in cases:
                    for server in rotated(servers, round_index):
                        sample = await measure(server, case, client_tls)
                        samples.setdefault((case.label, server.name), []).append(sample)
                if postfix is not None:
                    held += postfix.held()
                    if round_index + 1 < rounds:
                        postfix.clear()  # every round's Postfix starts from an empty queue
                print(
                    f"  bench_smtp: round {round_index + 1}/{rounds} in "
                    f"{time.monotonic() - round_started:.1f}s",
                    flush=True,
                )
            measured_s = time.monotonic() - measuring
            for case in cases:
                by_server = {s.name: samples[case.label, s.name] for s in servers}
                rows += case_rows(case, servers, by_server, workers)
            if not opts.quick:
                rows.append(await _big_message_row(smtp_port, ingest))
            postfix_rows = [r for r in rows if r.benchmark.startswith("postfix")]
            if postfix is not None and postfix_rows:
                postfix_rows[-1].note += f"; {held} held"
            elif postfix is None:
                rows.append(Row(benchmark="postfix (hold queue)", note=postfix_note))
            print(
                f"  bench_smtp: {len(cases)} cases x {len(servers)} servers x {rounds} rounds "
                f"measured in {measured_s:.1f}s; {time.monotonic() - started:.1f}s in all",
                flush=True,
            )
        finally:
            _stop(ingest, timeout_s=30)
            for proc in bare:
                _stop(proc)
            if postfix is not None:
                postfix.stop()
            nats_server.stop()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bare", nargs=3, metavar=("PORT", "CERT", "KEY"), required=True)
    args = parser.parse_args()
    bare_server(int(args.bare[0]), args.bare[1], args.bare[2])
