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
the server process's (user + system) per 1000 messages.

Run it alone: ``python bench/run.py --only smtp`` (``BENCH_SMTP_COUNT`` messages per row).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

import msgspec
import nats
from mailgate_core.nats import KV_ACCOUNTS, KV_CREDENTIALS, provision
from mailgate_core.passwords import hash_password
from mailgate_core.records import AccountRecord, CredentialRecord
from mailgate_fakes.infra import NatsServer, free_port, wait_for_port

from common import CpuMeter, Options, Row, percentile
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


# --- a minimal async SMTP client ----------------------------------------------------------------


class SmtpError(Exception):
    pass


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        await client.expect(220)
        await client.command(b"EHLO bench.example.com", 250)
        if tls is not None:
            await client.command(b"STARTTLS", 220)
            await writer.start_tls(tls, server_hostname="localhost")
            await client.command(b"EHLO bench.example.com", 250)
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
    port: int, data: bytes, count: int, *, tls: ssl.SSLContext | None, reuse: bool
) -> Load:
    """``count`` messages over ``SESSIONS`` concurrent sessions."""
    latencies: list[float] = []
    per_session = [count // SESSIONS + (i < count % SESSIONS) for i in range(SESSIONS)]

    async def session(index: int, messages: int) -> None:
        client = await Client.open(port, tls) if reuse else None
        for n in range(messages):
            one = client or await Client.open(port, tls)
            latencies.append(await one.send(f"r{index}-{n}@example.org", data))
            if not reuse:
                await one.close()
        if client is not None:
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(session(i, n) for i, n in enumerate(per_session) if n))
    return Load(len(latencies), time.perf_counter() - started, sorted(latencies))


# --- the servers --------------------------------------------------------------------------------


def bare_server(port: int, cert: str, key: str) -> None:
    """aiosmtpd with STARTTLS, any AUTH accepted, every message discarded (run in a child)."""
    from aiosmtpd.smtp import SMTP, AuthResult

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
        )
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _is_ready(ops_port: int) -> str:
    """``""`` when /readyz answers 200, else why not."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/readyz", timeout=2) as r:
            return "" if r.status == 200 else f"status {r.status}"
    except (urllib.error.URLError, OSError) as exc:
        return str(exc)


async def _ready(ops_port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
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


@dataclass(frozen=True)
class Case:
    size: str
    data: bytes
    tls: bool
    reuse: bool

    @property
    def label(self) -> str:
        tls = "STARTTLS" if self.tls else "plain"
        conn = "reused conn" if self.reuse else "conn per msg"
        return f"{self.size}, {tls}, {conn}"


async def measure(
    name: str, port: int, case: Case, count: int, pid: int, tls: ssl.SSLContext
) -> Row:
    context = tls if case.tls else None
    await drive(port, case.data, SESSIONS, tls=context, reuse=True)  # warm-up
    meter = CpuMeter([pid])
    meter.start()
    load = await drive(port, case.data, count, tls=context, reuse=case.reuse)
    cpu = meter.stop()
    return Row(
        benchmark=f"{name} {case.label}",
        rate_per_s=load.messages / load.elapsed_s,
        p50_ms=percentile(load.latencies_s, 0.5) * 1000,
        p99_ms=percentile(load.latencies_s, 0.99) * 1000,
        cpu_s_per_1k=cpu / load.messages * 1000,
    )


async def run(opts: Options) -> list[Row]:
    count = 40 if opts.quick else int(os.environ.get("BENCH_SMTP_COUNT", "400"))
    small = campaign_message(2048, links=4)
    large = campaign_message(50 * 1024, links=40, attachment=20_000)
    cases = [
        Case(size, dot_stuffed(data), tls, reuse)
        for size, data in (("2 KB", small), ("50 KB", large))
        for tls in (True, False)
        for reuse in (True, False)
    ]
    if opts.quick:  # one row per message size, both with TLS
        cases = [c for c in cases if c.tls and c.reuse == (c.size == "2 KB")]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=opts.tmp) as tmp_name:
        tmp = Path(tmp_name)
        from mailgate_smtp_ingest.tls import self_signed_pair

        cert_pem, key_pem = self_signed_pair("localhost")
        cert, key = tmp / "cert.pem", tmp / "key.pem"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        client_tls = ssl.create_default_context(cadata=cert_pem.decode())
        nats_server = NatsServer(tmp / "nats", sync_interval="always").start()
        ingest = bare = None
        try:
            await _put_credential(nats_server.url)
            smtp_port, ops_port, bare_port = free_port(), free_port(), free_port()
            env = {
                "NATS_URL": nats_server.url,
                "DOMAIN": DOMAIN,
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(smtp_port),
                "SMTPS_PORT": str(free_port()),
                "SMTP_TLS_CERT": str(cert),
                "SMTP_TLS_KEY": str(key),
                "SMTP_AUTH_REQUIRE_TLS": "false",  # the plain rows authenticate too
                "OPS_HOST": "127.0.0.1",
                "OPS_PORT": str(ops_port),
                "ALLOWED_SENDER_DOMAINS": "shop.example.com",
                "TRACKING_BASE_URL": "https://t.mg.example.net",
                "TRACKING_SECRET": TRACKING_SECRET,
                "LOG_LEVEL": "info",
            }
            ingest = _spawn(
                [sys.executable, "-m", "mailgate_smtp_ingest"], env, tmp / "smtp-ingest.log"
            )
            bare = _spawn(
                [sys.executable, __file__, "--bare", str(bare_port), str(cert), str(key)],
                {},
                tmp / "bare.log",
            )
            await _ready(ops_port, ingest)
            wait_for_port("127.0.0.1", bare_port, proc=bare)
            for case in cases:
                ours = await measure("smtp-ingest", smtp_port, case, count, ingest.pid, client_tls)
                theirs = await measure(
                    "aiosmtpd bare", bare_port, case, count, bare.pid, client_tls
                )
                assert ours.rate_per_s and theirs.rate_per_s and theirs.cpu_s_per_1k
                assert ours.cpu_s_per_1k is not None
                ours.note = (
                    f"{ours.rate_per_s / theirs.rate_per_s:.2f}x bare rate, "
                    f"{ours.cpu_s_per_1k / theirs.cpu_s_per_1k:.1f}x its CPU"
                )
                rows += [ours, theirs]
        finally:
            _stop(ingest)
            _stop(bare)
            nats_server.stop()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bare", nargs=3, metavar=("PORT", "CERT", "KEY"), required=True)
    args = parser.parse_args()
    bare_server(int(args.bare[0]), args.bare[1], args.bare[2])
