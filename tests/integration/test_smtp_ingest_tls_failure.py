"""A STARTTLS whose handshake fails: the connection is closed once and cleanly (nothing for
the event loop's exception handler: the protocol reports that loss itself and must not
trip over the transport's own later report) and its slot is released. On asyncio's loop
and on uvloop (the service's)."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import pytest
from mailgate_core.runtime import loop_factory
from mailgate_smtp_ingest.metrics import Metrics
from mailgate_smtp_ingest.server import Intake, MailgateSMTP
from mailgate_smtp_ingest.tls import context_from_pem, self_signed_pair
from prometheus_client import CollectorRegistry


class Handler:
    async def handle_exception(self, error: Exception) -> str:
        return "454 4.7.0 TLS not available"


async def _failed_starttls() -> tuple[list[dict[str, Any]], Intake, list[Any]]:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    intake, metrics, handler = Intake(), Metrics.create(CollectorRegistry()), Handler()
    context = context_from_pem(*self_signed_pair("localhost"))
    refs: list[Any] = []

    def protocol() -> MailgateSMTP:
        made = MailgateSMTP(
            handler,  # type: ignore[arg-type]
            intake=intake,
            metrics=metrics,
            hostname="mx.example.net",
            max_message_size=1000,
            tls_context=context,
        )
        refs.append(weakref.ref(made))
        return made

    server = await loop.create_server(protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(2):  # the first connection runs aiosmtpd's own __init__
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(10):
                assert (await reader.readline()).startswith(b"220 ")
                writer.write(b"EHLO client.example\r\n")
                while (await reader.readline())[3:4] == b"-":
                    pass
                writer.write(b"STARTTLS\r\n")
                assert (await reader.readline()).startswith(b"220 ")
                writer.write(b"this is not a TLS ClientHello\r\n" * 20)
                await reader.read()  # the server closes the connection
            writer.close()
            async with asyncio.timeout(10):
                while intake.sessions:
                    await asyncio.sleep(0.01)
            for _ in range(5):
                await asyncio.sleep(0.01)  # a late second loss report would come now
    finally:
        server.close()
        await server.wait_closed()
    return errors, intake, refs


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_failed_starttls_handshake_closes_cleanly_and_frees_the_connection(
    loop_name: str,
) -> None:
    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        errors, intake, refs = runner.run(_failed_starttls())
    assert errors == []
    assert len(refs) == 2
    assert not intake.sessions and not intake._per_ip  # type: ignore[attr-defined]
