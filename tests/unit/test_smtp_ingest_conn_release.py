"""A closed SMTP connection is freed by reference counting, not left to the garbage collector.

aiosmtpd's protocol keeps bound methods of itself in its command tables, its command loop's
task (whose CancelledError's traceback holds the loop's frame) and a stream writer pointing
back at it: every closed connection used to become ~65 objects of cyclic garbage. Once the
connection is closed and its command loop has ended, MailgateSMTP drops those references.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from mailgate_smtp_ingest.metrics import Metrics
from mailgate_smtp_ingest.server import Intake, MailgateSMTP
from prometheus_client import CollectorRegistry
from test_smtp_ingest_protocol import Transport as MemoryTransport


class Handler:
    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address
        return "250 2.1.0 Ok"

    async def handle_exception(self, error: Exception) -> str:
        return "451 4.3.0 Internal error"


class Transport(MemoryTransport):
    """``test_smtp_ingest_protocol``'s in-memory transport whose ``close`` reports the loss to
    the protocol on the next loop turn, as a socket transport does."""

    def __init__(self, protocol: MailgateSMTP) -> None:
        super().__init__()
        self.protocol: MailgateSMTP | None = protocol

    def is_closing(self) -> bool:
        return self.protocol is None

    def close(self) -> None:
        self.lose(None)

    def lose(self, error: Exception | None) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            asyncio.get_running_loop().call_soon(protocol.connection_lost, error)


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _reply(transport: Transport, data: bytes | None = None) -> bytes:
    transport.written.clear()
    transport.wrote.clear()
    if data is not None:
        assert transport.protocol is not None
        transport.protocol.data_received(data)
    async with asyncio.timeout(5):
        while not transport.written:
            transport.wrote.clear()
            await transport.wrote.wait()
    return b"".join(transport.written)


async def _connection(intake: Intake, metrics: Metrics, handler: Handler, *, quit: bool) -> Any:
    """One connection: greeting, EHLO, MAIL, then QUIT or a dropped connection; returns a
    weak reference to the protocol."""
    protocol = MailgateSMTP(
        handler,  # type: ignore[arg-type]
        intake=intake,
        metrics=metrics,
        hostname="mx.example.net",
        max_message_size=1000,
        tls_context=None,
    )
    transport = Transport(protocol)
    protocol.connection_made(transport)
    assert (await _reply(transport)).startswith(b"220 ")
    assert (await _reply(transport, b"EHLO client.example\r\n")).startswith(b"250-")
    assert protocol.session is not None
    protocol.session.authenticated = True
    assert (await _reply(transport, b"MAIL FROM:<a@b.example>\r\n")).startswith(b"250 ")
    if quit:
        assert (await _reply(transport, b"QUIT\r\n")).startswith(b"221 ")
    else:
        transport.lose(ConnectionResetError())
    ref = weakref.ref(protocol)
    del protocol, transport
    for _ in range(5):  # the loss, the loop's cancellation, the task's done callbacks
        await asyncio.sleep(0)
    return ref


@pytest.mark.parametrize("quit", [True, False], ids=["quit", "dropped"])
async def test_a_closed_connection_is_freed_without_the_garbage_collector(
    no_gc: None, quit: bool
) -> None:
    intake, metrics, handler = Intake(), Metrics.create(CollectorRegistry()), Handler()
    await _connection(intake, metrics, handler, quit=quit)  # the first: aiosmtpd's own init
    ref = await _connection(intake, metrics, handler, quit=quit)
    assert not intake.sessions
    assert ref() is None, gc.get_referrers(ref())
