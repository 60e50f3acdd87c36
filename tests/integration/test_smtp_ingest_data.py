"""smtp-ingest's own DATA reader and STARTTLS (server.py), byte by byte on a raw socket.

The reader takes the message in large pieces up to the end marker instead of aiosmtpd's
line by line; STARTTLS runs on the event loop's TLS (``loop.start_tls``) instead of
aiosmtpd's. These tests pin what a client sees: where the data ends (however the bytes are
split across TCP segments), dot-stuffing, the size limit at and one byte past it, bare LF
line ends, the idle timeout inside DATA, and that nothing sent in clear after STARTTLS
survives the handshake.
"""

from __future__ import annotations

import asyncio
import base64
import ssl

import pytest
import uvloop
from mailgate_core.schemas import MailAccepted
from mailgate_fakes.testing import eventually
from test_smtp_ingest_service import (  # noqa: F401 - fixtures used by name
    PASSWORD,
    SENDER,
    USER,
    Factory,
    client_context,
    creds,
    start_service,
    stream_events,
)

LIMIT = 4096
#: pytest-asyncio 1.x wants a conftest hook (shared file) for loop factories; until then:
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test on both loops: the service runs on uvloop, whose ``start_tls`` and
    transports differ from asyncio's."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


HEAD = f"From: {SENDER}\r\nSubject: data\r\n\r\n".encode()


class Wire:
    """A plain SMTP connection with exact control over every byte written."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Wire:
        wire = cls(*await asyncio.open_connection("127.0.0.1", port))
        assert (await wire.reply()).startswith("220 ")
        return wire

    async def reply(self) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            if not line:
                return "".join(lines) + "<closed>"
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "".join(lines).rstrip("\r\n")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def start_transaction(self) -> None:
        assert (await self.cmd("EHLO client.test")).startswith("250")
        plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        assert (await self.cmd(f"AUTH PLAIN {plain}")).startswith("235")
        assert (await self.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        assert (await self.cmd("RCPT TO:<ivan@example.org>")).startswith("250")
        assert (await self.cmd("DATA")).startswith("354")

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def plain_service(start_service: Factory):  # noqa: F811
    return await start_service(smtp_auth_require_tls=False, max_message_size=LIMIT)


async def accepted_raw(js, count: int = 1) -> list[bytes]:
    async def check() -> list[MailAccepted]:
        events = await stream_events(js)
        assert len(events) == count
        return events

    events = await eventually(check, timeout=10)
    return [e.raw for e in events if isinstance(e, MailAccepted)]


async def test_the_end_marker_split_over_many_segments_and_dots_inside(plain_service, js):
    wire = await Wire.open(plain_service.smtp_port)
    await wire.start_transaction()
    stuffed = b"line one\r\n..starts with a dot\r\nends with a dot.\r\n..\r\n"  # a lone dot
    pieces = (HEAD, stuffed[:5], stuffed[5:21], stuffed[21:], b"last\r", b"\n", b".", b"\r")
    for piece in pieces:
        await wire.send(piece)
        await asyncio.sleep(0.02)  # separate segments for the reader
    # the last byte of the end marker and a pipelined command in one segment
    await wire.send(b"\nNOOP\r\n")
    assert (await wire.reply()).startswith("250 2.0.0 Ok: queued as ")
    assert await wire.reply() == "250 2.0.0 OK"  # NOOP was read as a command, not as data
    wire.close()
    (raw,) = await accepted_raw(js)
    assert raw.endswith(
        b"\r\n\r\nline one\r\n.starts with a dot\r\nends with a dot.\r\n.\r\nlast\r\n"
    )


async def test_size_exactly_at_the_limit_is_accepted_one_byte_more_is_554(plain_service, js):
    wire = await Wire.open(plain_service.smtp_port)
    await wire.start_transaction()
    at_limit = HEAD + b"y" * (LIMIT - len(HEAD) - 2) + b"\r\n"  # the CRLF before the dot counts
    assert len(at_limit) == LIMIT
    await wire.send(at_limit + b".\r\n")
    assert (await wire.reply()).startswith("250 2.0.0 Ok: queued as ")
    assert (await wire.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
    assert (await wire.cmd("RCPT TO:<ivan@example.org>")).startswith("250")
    assert (await wire.cmd("DATA")).startswith("354")
    await wire.send(b"y" + at_limit + b".\r\n")
    assert await wire.reply() == "554 5.3.4 Message exceeds fixed size limit"
    assert await wire.cmd("RSET") == "250 2.0.0 OK"  # the session goes on after the 554
    wire.close()
    (raw,) = await accepted_raw(js)
    assert raw.endswith(b"y" * 50 + b"\r\n")


async def test_bare_lf_lines_are_stored_with_crlf_and_lf_dot_lf_is_not_the_end(plain_service, js):
    wire = await Wire.open(plain_service.smtp_port)
    await wire.start_transaction()
    await wire.send(b"From: " + SENDER.encode() + b"\nSubject: lf\n\nbody\n.\nmore\r\n.\r\n")
    assert (await wire.reply()).startswith("250 2.0.0 Ok: queued as ")
    wire.close()
    (raw,) = await accepted_raw(js)
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert raw.endswith(b"\r\n\r\nbody\r\n.\r\nmore\r\n")  # ".\n" stayed data


async def test_an_idle_client_inside_data_is_disconnected_and_nothing_is_published(
    start_service: Factory,  # noqa: F811
    js,
):
    # 2 s, not less: the same timeout covers the client's own turns before DATA (AUTH, MAIL,
    # RCPT), and on a loaded machine one of those turns alone has taken more than 0.5 s
    service = await start_service(smtp_auth_require_tls=False, smtp_timeout_s=2.0)
    wire = await Wire.open(service.smtp_port)
    await wire.start_transaction()
    await wire.send(HEAD + b"half a message\r\n")
    assert (await wire.reply()).endswith("<closed>")  # closed, no 250
    assert (await js.stream_info("MAIL")).state.messages == 0
    assert service.intake.in_data == 0


async def test_plain_text_pipelined_after_starttls_is_discarded(start_service: Factory, js):  # noqa: F811
    service = await start_service()
    wire = await Wire.open(service.smtp_port)
    assert "STARTTLS" in await wire.cmd("EHLO client.test")
    # RFC 3207 4.2: a command injected in clear right behind STARTTLS must not be run
    await wire.send(b"STARTTLS\r\nRSET\r\n")
    assert (await wire.reply()).startswith("220 ")
    await wire.writer.start_tls(client_context(service), server_hostname="127.0.0.1")
    # a fresh session: EHLO needed again, AUTH now offered, the injected RSET never answered
    assert "AUTH PLAIN LOGIN" in await wire.cmd("EHLO client.test")
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    assert (await wire.cmd(f"AUTH PLAIN {plain}")).startswith("235")
    assert (await wire.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
    assert (await wire.cmd("RCPT TO:<ivan@example.org>")).startswith("250")
    assert (await wire.cmd("DATA")).startswith("354")
    await wire.send(HEAD + b"over tls\r\n.\r\n")
    assert (await wire.reply()).startswith("250 2.0.0 Ok: queued as ")
    assert (await wire.cmd("QUIT")).startswith("221 ")
    wire.close()
    (raw,) = await accepted_raw(js)
    assert raw.endswith(b"over tls\r\n")


async def test_a_failed_tls_handshake_closes_only_that_connection(start_service: Factory):  # noqa: F811
    service = await start_service()
    wire = await Wire.open(service.smtp_port)
    assert (await wire.cmd("EHLO client.test")).startswith("250")
    assert (await wire.cmd("STARTTLS")).startswith("220 ")
    await wire.send(b"this is not a TLS client hello\r\n" * 4)
    assert (await wire.reply()).endswith("<closed>")
    wire.close()
    # the service still serves STARTTLS to the next client
    ok = await Wire.open(service.smtp_port)
    assert (await ok.cmd("EHLO client.test")).startswith("250")
    assert (await ok.cmd("STARTTLS")).startswith("220 ")
    context = client_context(service)
    await ok.writer.start_tls(context, server_hostname="127.0.0.1")
    assert "AUTH PLAIN LOGIN" in await ok.cmd("EHLO client.test")
    ok.close()
    assert isinstance(context, ssl.SSLContext)
    await eventually(lambda: len(service.intake.sessions) <= 1, timeout=10)
