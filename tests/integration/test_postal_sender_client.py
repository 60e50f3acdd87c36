"""postal-sender's Postal client over real sockets: whether a failed request may have reached
Postal (``NoAnswer.request_sent``, which makes a retry "ambiguous") is known without aiohttp's
trace hooks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from mailgate_fakes.infra import free_port
from mailgate_fakes.postal import PostalSandbox
from mailgate_postal_sender.client import Answered, NoAnswer, PostalClient, new_session
from mailgate_postal_sender.metrics import Metrics
from prometheus_client import CollectorRegistry

KEY = "C" * 24


@pytest.fixture
async def client_for() -> AsyncIterator:
    sessions = []

    def make(base_url: str, timeout_s: float = 0.5) -> PostalClient:
        session = new_session(timeout_s, 4)
        sessions.append(session)
        return PostalClient(session, base_url, metrics=Metrics(CollectorRegistry()))

    yield make
    for session in sessions:
        await session.close()


async def test_a_refused_connection_was_not_sent(client_for) -> None:
    client = client_for(f"http://127.0.0.1:{free_port()}")  # nobody listens there
    result, _ = await client.call("send/raw", KEY, {"rcpt_to": []})
    assert isinstance(result, NoAnswer)
    assert result.request_sent is False


async def test_a_request_without_an_answer_may_have_been_sent(client_for) -> None:
    received = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the request arrived; never answer it
        received.set()
        with contextlib.suppress(Exception):
            await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = client_for(f"http://127.0.0.1:{port}", timeout_s=0.3)
        result, _ = await client.call("send/raw", KEY, {"rcpt_to": []})
    finally:
        server.close()
    assert received.is_set()
    assert isinstance(result, NoAnswer)
    assert isinstance(result.error, TimeoutError)
    assert result.request_sent is True


async def test_an_answer_after_an_unsent_failure_is_not_marked_by_it(client_for) -> None:
    """The mark belongs to one request: a later call in the same task starts unmarked."""
    sandbox = PostalSandbox([KEY])
    base = await sandbox.start()
    try:
        refused = client_for(f"http://127.0.0.1:{free_port()}")
        first, _ = await refused.call("send/raw", KEY, {"rcpt_to": []})
        second, _ = await client_for(base).call("send/raw", KEY, {"rcpt_to": []})
        third, _ = await refused.call("send/raw", KEY, {"rcpt_to": []})
    finally:
        await sandbox.stop()
    assert isinstance(first, NoAnswer) and first.request_sent is False
    assert isinstance(second, Answered) and second.status == 200
    assert isinstance(third, NoAnswer) and third.request_sent is False
