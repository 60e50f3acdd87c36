"""MailgateSMTP's cheaper per-connection and per-command paths, pinned against aiosmtpd's own.

- A connection after the first skips aiosmtpd's introspection (``inspect.getmembers`` of the
  protocol and handler on every connection) but must end up in the very state aiosmtpd's
  ``__init__`` gives: compared attribute by attribute, so an aiosmtpd upgrade that adds
  state fails here.
- The command loop and idle timer are driven through an in-memory transport: replies,
  their order, and an idle connection being closed.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from typing import Any

from mailgate_smtp_ingest import replies
from mailgate_smtp_ingest.metrics import Metrics
from mailgate_smtp_ingest.server import Intake, MailgateSMTP
from mailgate_smtp_ingest.tls import self_signed_pair
from prometheus_client import CollectorRegistry


class Handler:
    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return f"250 2.0.0 Ok: queued {len(envelope.content)} bytes"

    async def handle_exception(self, error: Exception) -> str:
        return "451 4.3.0 Internal error"

    def auth_blocked(self, client_ip: str | None) -> bool:
        return False


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.wrote = asyncio.Event()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))
        self.wrote.set()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4242) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def _protocol(intake: Intake, handler: Handler, **options: Any) -> MailgateSMTP:
    return MailgateSMTP(
        handler,  # type: ignore[arg-type]
        intake=intake,
        metrics=Metrics.create(CollectorRegistry()),
        hostname="mx.example.net",
        max_message_size=1000,
        **{"tls_context": None, **options},
    )


def _comparable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # _AuthMechAttr
        return type(value)(*(_comparable(v) for v in value))
    if hasattr(value, "__func__"):  # a bound method: the function and whose it is
        return ("method", value.__func__, type(value.__self__))
    if isinstance(value, weakref.ref):
        return ("weakref", _comparable(value()))
    if isinstance(value, asyncio.StreamReader):
        return ("reader", value._limit)  # type: ignore[attr-defined]
    if isinstance(value, asyncio.Future):
        return ("future", value.done())
    if isinstance(value, Metrics):
        return "metrics"
    return value


async def test_later_connections_get_the_state_aiosmtpds_init_gives() -> None:
    cert, key = self_signed_pair("localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*_write(cert, key))
    for options in ({}, {"tls_context": context}, {"tls_context": context, "implicit_tls": True}):
        handler = Handler()
        first = _protocol(Intake(), handler, **options)  # a fresh intake: aiosmtpd's init
        intake = Intake()
        _protocol(intake, handler, **options)
        later = _protocol(intake, handler, **options)  # from the remembered tables
        assert intake.method_tables
        assert later.__dict__.keys() == first.__dict__.keys()
        for name, value in first.__dict__.items():
            if name == "intake":
                continue  # (ours, a different one on purpose)
            assert _comparable(getattr(later, name)) == _comparable(value), name
        assert later._smtp_methods["MAIL"].__self__ is later
        assert later._handle_hooks["DATA"].__self__ is handler


def _write(cert: bytes, key: bytes) -> tuple[str, str]:
    import tempfile

    folder = tempfile.mkdtemp(prefix="smtp-protocol-")
    paths = (f"{folder}/cert.pem", f"{folder}/key.pem")
    for path, data in zip(paths, (cert, key), strict=True):
        with open(path, "wb") as out:
            out.write(data)
    return paths


async def _say(protocol: MailgateSMTP, transport: Transport, data: bytes) -> bytes:
    transport.written.clear()
    transport.wrote.clear()
    protocol.data_received(data)
    async with asyncio.timeout(5):
        while not transport.written:
            transport.wrote.clear()
            await transport.wrote.wait()
    return b"".join(transport.written)


async def test_the_command_loop_answers_as_aiosmtpd_with_our_texts() -> None:
    intake = Intake()
    _protocol(intake, Handler())
    protocol = _protocol(intake, Handler())
    transport = Transport()
    protocol.connection_made(transport)
    async with asyncio.timeout(5):
        await transport.wrote.wait()
    assert transport.written == [b"220 mx.example.net mailgate ESMTP\r\n"]
    assert (await _say(protocol, transport, b"\r\n")) == b"500 5.5.2 Error: bad syntax\r\n"
    assert (await _say(protocol, transport, b"MAIL FROM:<a@b.example>\r\n")).startswith(
        b"503 5.5.1 Error: send HELO first"
    )
    assert (await _say(protocol, transport, b"FOO bar\r\n")) == (
        b'500 5.5.2 Error: command "FOO" not recognized\r\n'
    )
    assert (await _say(protocol, transport, b"NOOP " + b"x" * 600 + b"\r\n")) == (
        b"500 5.5.2 Command line too long\r\n"
    )
    assert (await _say(protocol, transport, b"ehlo client.example\r\n")).startswith(
        b"250-mx.example.net\r\n"
    )
    assert (await _say(protocol, transport, b"MAIL FROM:<a@b.example>\r\n")) == (
        f"{replies.MUST_AUTHENTICATE}\r\n".encode()
    )
    assert protocol.session is not None
    protocol.session.authenticated = True
    assert (await _say(protocol, transport, b"MAIL FROM:<a@b.example>\r\n")) == (
        b"250 2.1.0 Sender OK\r\n"
    )
    assert (await _say(protocol, transport, b"RCPT TO:<c@d.example>\r\n")) == (
        b"250 2.1.5 Recipient OK\r\n"
    )
    assert (await _say(protocol, transport, b"DATA\r\n")).startswith(b"354 ")
    assert (await _say(protocol, transport, b"Subject: x\r\n\r\n..hi\r\n.\r\n")) == (
        b"250 2.0.0 Ok: queued 19 bytes\r\n"  # dot-stuffing undone
    )
    assert (await _say(protocol, transport, b"QUIT\r\n")).startswith(b"221 ")
    protocol.connection_lost(None)


async def test_an_idle_connection_is_closed_after_the_timeout_from_its_last_command() -> None:
    intake = Intake()
    _protocol(intake, Handler())
    protocol = _protocol(intake, Handler(), timeout_s=0.3)
    transport = Transport()
    protocol.connection_made(transport)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(4):  # busy for longer than the timeout: never closed meanwhile
        await asyncio.sleep(0.1)
        await _say(protocol, transport, b"NOOP\r\n")
        assert not transport.closed
    async with asyncio.timeout(5):
        while not transport.closed:
            await asyncio.sleep(0.02)
    idle_for = loop.time() - started
    assert idle_for >= 0.4 + 0.3 - 0.05
    protocol.connection_lost(None)


def test_the_copied_command_loop_matches_the_installed_aiosmtpd() -> None:
    """``MailgateSMTP._handle_client`` restates aiosmtpd 1.4's command loop (same checks,
    replies and order). An upgrade must re-read aiosmtpd's loop before this pin moves."""
    import inspect

    import aiosmtpd
    from aiosmtpd.smtp import SMTP

    assert aiosmtpd.__version__.startswith("1.4."), aiosmtpd.__version__
    source = inspect.getsource(SMTP._handle_client)
    for text in (
        "500 Command line too long",
        "500 Error: bad syntax",
        "554 Command refused due to lack of security",
        "502 5.5.1 Too many unrecognized commands, goodbye.",
    ):
        assert text in source, text
