"""A command round trip's costs, cut without changing what the client sees.

- Reply texts are turned into wire bytes (enhanced code, UTF-8, CRLF) once per text and
  hostname; the memo is bounded.
- NOOP without a handler hook answers ready bytes.
- Pipelined commands, lines split over reads, over-long lines, size limits per command and
  backpressure behave as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mailgate_smtp_ingest import server as server_module
from mailgate_smtp_ingest.metrics import Metrics
from mailgate_smtp_ingest.server import Intake, MailgateSMTP
from prometheus_client import CollectorRegistry
from test_smtp_ingest_protocol import Handler, Transport


class PausingTransport(Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = 0
        self.resumed = 0

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1


def _protocol(intake: Intake, handler: Any, hostname: str = "mx.example.net") -> MailgateSMTP:
    return MailgateSMTP(
        handler,
        intake=intake,
        metrics=Metrics.create(CollectorRegistry()),
        hostname=hostname,
        max_message_size=1000,
        tls_context=None,
        auth_require_tls=False,
    )


async def _connected(
    handler: Any = None, transport: Transport | None = None, hostname: str = "mx.example.net"
) -> tuple[MailgateSMTP, Transport]:
    intake = Intake()
    _protocol(intake, handler or Handler(), hostname)  # the first one: aiosmtpd's own init
    protocol = _protocol(intake, handler or Handler(), hostname)
    transport = transport or Transport()
    protocol.connection_made(transport)
    await _replies(transport, 1)
    assert transport.written == [f"220 {hostname} mailgate ESMTP\r\n".encode()]
    transport.written.clear()
    return protocol, transport


async def _replies(transport: Transport, count: int) -> list[bytes]:
    async with asyncio.timeout(5):
        while len(transport.written) < count:
            transport.wrote.clear()
            await transport.wrote.wait()
    return list(transport.written)


async def _say(protocol: MailgateSMTP, transport: Transport, *pieces: bytes) -> list[bytes]:
    """Feed ``pieces`` (one data_received each); the replies of the commands they end."""
    transport.written.clear()
    count = b"".join(pieces).count(b"\n")
    for piece in pieces:
        protocol.data_received(piece)
        await asyncio.sleep(0)
    written = await _replies(transport, count)
    await asyncio.sleep(0.01)
    assert transport.written == written  # nothing more than one reply per line
    return written


async def test_reply_texts_become_wire_bytes_once_per_text_and_hostname() -> None:
    server_module._WIRE_REPLIES.clear()
    protocol, transport = await _connected()
    texts = [
        "250 OK",
        "250 2.1.0 Sender OK",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 mx.example.net",  # (naming the host: no enhanced code)
        "550 Ünïcode",
        "500 Error: bad syntax",
    ]
    for _ in range(2):  # the second round from the memo: the same bytes
        for text in texts:
            transport.written.clear()
            await protocol.push(text)
            expected = f"{protocol._with_enhanced_code(text)}\r\n".encode()
            assert transport.written == [expected]
    memo = server_module._WIRE_REPLIES["mx.example.net"]
    assert memo["250 OK"] == b"250 2.0.0 OK\r\n"
    assert memo["250 mx.example.net"] == b"250 mx.example.net\r\n"
    assert memo["550 Ünïcode"] == "550 5.0.0 Ünïcode\r\n".encode()
    assert protocol._wire_replies is memo

    other, other_transport = await _connected(hostname="other.example")
    await other.push("250 mx.example.net")  # another host's name: enhanced
    assert other_transport.written == [b"250 2.0.0 mx.example.net\r\n"]
    await other.push(b"250 raw bytes")  # bytes go out as given
    assert other_transport.written[-1] == b"250 raw bytes\r\n"
    for protocol_ in (protocol, other):
        protocol_.connection_lost(None)


async def test_the_reply_memo_is_bounded() -> None:
    server_module._WIRE_REPLIES.clear()
    protocol, transport = await _connected()
    limit = server_module._WIRE_REPLIES_LIMIT
    for number in range(limit * 3):
        transport.written.clear()
        await protocol.push(f"550 No such user u{number}@example.com")
        assert transport.written == [f"550 5.0.0 No such user u{number}@example.com\r\n".encode()]
        assert len(server_module._WIRE_REPLIES["mx.example.net"]) <= limit
    protocol.connection_lost(None)


async def test_pipelined_and_split_lines_answer_in_order() -> None:
    protocol, transport = await _connected()
    assert await _say(protocol, transport, b"NOOP\r\n") == [b"250 2.0.0 OK\r\n"]
    # Pipelined: three lines in one read, three replies in order, one write each.
    assert await _say(protocol, transport, b"NOOP\r\nRSET\r\nNOOP\r\n") == [
        b"250 2.0.0 OK\r\n",
        b"250 2.0.0 OK\r\n",
        b"250 2.0.0 OK\r\n",
    ]
    # A line split over reads (and a bare LF ending it).
    assert await _say(protocol, transport, b"NO", b"OP", b"\r", b"\n", b"NOOP\n") == [
        b"250 2.0.0 OK\r\n",
        b"250 2.0.0 OK\r\n",
    ]
    assert await _say(protocol, transport, b"\r\n") == [b"500 5.5.2 Error: bad syntax\r\n"]
    protocol.connection_lost(None)


async def test_over_long_lines_and_per_command_limits_as_before() -> None:
    protocol, transport = await _connected()
    too_long = b"500 5.5.2 Command line too long\r\n"
    # Past the reader's line limit (no LF in sight): skipped up to its end, one reply.
    assert await _say(protocol, transport, b"NOOP " + b"x" * 3000 + b"\r\nNOOP\r\n") == [
        too_long,
        b"250 2.0.0 OK\r\n",
    ]
    assert await _say(protocol, transport, b"NOOP " + b"x" * 700 + b"\r\n") == [too_long]
    assert (await _say(protocol, transport, b"EHLO client.example\r\n"))[0].startswith(b"250-")
    # After EHLO, MAIL and RCPT may be longer than other commands (SIZE=, BODY= ...).
    long_mail = b"MAIL FROM:<" + b"a" * 60 + b"@" + b"b" * 600 + b".example>\r\n"
    assert await _say(protocol, transport, long_mail) != [too_long]
    assert await _say(protocol, transport, b"NOOP " + b"x" * 700 + b"\r\n") == [too_long]
    assert await _say(protocol, transport, b"MAIL FROM:<" + b"a" * 1100 + b">\r\n") == [too_long]
    protocol.connection_lost(None)


async def test_pipelined_flood_pauses_and_resumes_reading() -> None:
    transport = PausingTransport()
    protocol, _ = await _connected(transport=transport)
    flood = b"NOOP\r\n" * 600  # 3600 bytes: more than twice the reader's line limit
    replies = await _say(protocol, transport, flood)
    assert replies == [b"250 2.0.0 OK\r\n"] * 600
    assert transport.paused == 1 and transport.resumed == 1
    protocol.connection_lost(None)


async def test_noop_without_a_hook_answers_ready_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    protocol, transport = await _connected()

    async def no_hook_call(*args: Any) -> Any:
        raise AssertionError("no NOOP hook to call")

    monkeypatch.setattr(protocol, "_call_handler_hook", no_hook_call)
    assert await _say(protocol, transport, b"NOOP\r\n") == [b"250 2.0.0 OK\r\n"]
    assert await _say(protocol, transport, b"NOOP anything\r\n") == [b"250 2.0.0 OK\r\n"]
    monkeypatch.undo()
    protocol.connection_lost(None)

    class NoopHandler(Handler):
        async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: Any) -> str:
            return f"250 2.0.0 noop {arg}"

    protocol, transport = await _connected(NoopHandler())
    assert await _say(protocol, transport, b"NOOP x\r\n") == [b"250 2.0.0 noop x\r\n"]
    protocol.connection_lost(None)


async def test_rcpt_and_data_check_helo_and_auth_without_their_coroutines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    protocol, transport = await _connected()
    need_helo = [b"503 5.5.1 Error: send HELO first\r\n"]
    must_auth = [f"{server_module.replies.MUST_AUTHENTICATE}\r\n".encode()]
    assert await _say(protocol, transport, b"RCPT TO:<c@d.example>\r\n") == need_helo
    assert await _say(protocol, transport, b"DATA\r\n") == need_helo
    await _say(protocol, transport, b"EHLO client.example\r\n")
    assert await _say(protocol, transport, b"RCPT TO:<c@d.example>\r\n") == must_auth
    assert await _say(protocol, transport, b"DATA\r\n") == must_auth
    assert protocol.session is not None
    protocol.session.authenticated = True

    async def not_called(*args: Any) -> bool:
        raise AssertionError("checked inline")

    monkeypatch.setattr(protocol, "check_helo_needed", not_called)
    monkeypatch.setattr(protocol, "check_auth_needed", not_called)
    assert await _say(protocol, transport, b"RCPT TO:<c@d.example>\r\n") == [
        b"503 5.5.1 Error: need MAIL command\r\n"
    ]
    assert await _say(protocol, transport, b"DATA\r\n") == [
        b"503 5.5.1 Error: need RCPT command\r\n"
    ]
    protocol.connection_lost(None)
