"""A connection's fixed costs, cut without changing what the client sees.

- Replies sent on every connection are ready bytes (greeting, EHLO, 235, 221): the same
  texts as before, EHLO per listener configuration.
- QUIT ends the command loop normally instead of cancelling its task.
- The sessions gauge is read when scraped (the set of open sessions), not counted per
  connection.
- AUTH's memo of verified passwords is keyed by a MAC of the password (never the password)
  and a wrong password never matches a remembered right one.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from mailgate_core.passwords import hash_password
from mailgate_core.records import AccountRecord, CredentialRecord
from mailgate_smtp_ingest import auth as auth_module
from mailgate_smtp_ingest.auth import Authenticator, Principal
from mailgate_smtp_ingest.metrics import Metrics
from mailgate_smtp_ingest.policy import FailureThrottle
from mailgate_smtp_ingest.server import Intake, MailgateSMTP
from mailgate_smtp_ingest.tls import self_signed_pair
from prometheus_client import CollectorRegistry
from test_smtp_ingest_protocol import Transport


class Handler:
    def auth_blocked(self, client_ip: str | None) -> bool:
        return False

    async def handle_exception(self, error: Exception) -> str:
        return "451 4.3.0 Internal error"


async def _say(protocol: MailgateSMTP, transport: Transport, data: bytes) -> bytes:
    transport.written.clear()
    transport.wrote.clear()
    protocol.data_received(data)
    async with asyncio.timeout(5):
        while not transport.written:
            transport.wrote.clear()
            await transport.wrote.wait()
    return b"".join(transport.written)


def _protocol(intake: Intake, handler: Handler, metrics: Metrics, **options: Any) -> MailgateSMTP:
    return MailgateSMTP(
        handler,  # type: ignore[arg-type]
        intake=intake,
        metrics=metrics,
        hostname="mx.example.net",
        max_message_size=1000,
        **{"tls_context": None, **options},
    )


async def _connect(protocol: MailgateSMTP) -> Transport:
    transport = Transport()
    protocol.connection_made(transport)
    async with asyncio.timeout(5):
        await transport.wrote.wait()
    assert transport.written == [b"220 mx.example.net mailgate ESMTP\r\n"]
    return transport


def _tls_context(tmp_path: Path) -> ssl.SSLContext:
    cert, key = self_signed_pair("localhost")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


_BASE = b"250-mx.example.net\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-PIPELINING\r\n"


async def test_ehlo_answers_per_listener_configuration_every_time(tmp_path: Path) -> None:
    context = _tls_context(tmp_path)
    metrics = Metrics.create(CollectorRegistry())
    intake = Intake()
    handler = Handler()
    cases = [
        ({"auth_require_tls": False}, b"250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n"),
        ({"tls_context": context}, b"250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"),
        (
            {"tls_context": context, "auth_require_tls": False},
            b"250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n",
        ),
        (
            {"tls_context": context, "implicit_tls": True},
            b"250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n",
        ),
        ({}, b"250 ENHANCEDSTATUSCODES\r\n"),
    ]
    for _ in range(2):  # the second round answers from the remembered replies
        for options, tail in cases:
            protocol = _protocol(intake, handler, metrics, **options)
            transport = await _connect(protocol)
            assert (await _say(protocol, transport, b"EHLO client.example\r\n")) == _BASE + tail
            protocol.connection_lost(None)
    assert len(intake.ehlo_replies) == 4  # (implicit TLS and plain-with-AUTH: one reply)


async def test_quit_ends_the_command_loop_without_cancelling_it() -> None:
    metrics = Metrics.create(CollectorRegistry())
    intake = Intake()
    protocol = _protocol(intake, Handler(), metrics)
    transport = await _connect(protocol)
    task = protocol._handler_coroutine
    assert task is not None
    assert (await _say(protocol, transport, b"QUIT\r\n")) == b"221 2.0.0 Bye\r\n"
    async with asyncio.timeout(5):
        await asyncio.wait({task})
    assert not task.cancelled() and task.exception() is None
    assert transport.closed
    protocol.connection_lost(None)
    assert protocol._released  # references dropped: nothing left for the cyclic collector
    assert not intake.sessions

    protocol = _protocol(intake, Handler(), metrics)  # QUIT with an argument: no goodbye
    transport = await _connect(protocol)
    assert (await _say(protocol, transport, b"QUIT now\r\n")) == b"501 5.5.4 Syntax: QUIT\r\n"
    assert not transport.closed
    protocol.connection_lost(None)


async def test_the_sessions_gauge_reads_the_open_sessions() -> None:
    registry = CollectorRegistry()
    metrics = Metrics.create(registry)
    intake = Intake()
    intake.count_sessions_in(metrics.sessions)

    def gauge() -> float | None:
        return registry.get_sample_value("mailgate_smtp_sessions")

    assert gauge() == 0
    protocols = [_protocol(intake, Handler(), metrics) for _ in range(3)]
    for protocol in protocols:
        await _connect(protocol)
    assert gauge() == 3
    protocols[0].connection_lost(None)
    assert gauge() == 2
    refused = Intake(max_connections_per_ip=1)  # a refused connection is never counted
    refused.count_sessions_in(Metrics.create(CollectorRegistry()).sessions)
    _protocol(refused, Handler(), metrics).connection_made(Transport())
    extra = _protocol(refused, Handler(), metrics)
    extra.connection_made(Transport())
    assert len(refused.sessions) == 1
    for protocol in protocols[1:]:
        protocol.connection_lost(None)
    assert gauge() == 0


class _Mirror:
    def __init__(self, items: dict[str, Any]) -> None:
        self._items = items

    def get(self, key: str) -> Any:
        return self._items.get(key)


class _Directory:
    """The two mirrors ``Authenticator`` reads (what smtp-ingest's KV watchers fill)."""

    def __init__(self, password_hash: str) -> None:
        self.credentials = _Mirror(
            {"ams": CredentialRecord(username="ams", account_id="acc", password_hash=password_hash)}
        )
        self.accounts = _Mirror({"acc": AccountRecord(id="acc", name="AMS")})

    async def credential(self, username: str) -> CredentialRecord | None:
        return self.credentials.get(username)  # type: ignore[no-any-return]

    async def account(self, account_id: str) -> AccountRecord | None:
        return self.accounts.get(account_id)  # type: ignore[no-any-return]


async def test_the_auth_memo_never_holds_the_password_nor_admits_a_wrong_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    real = auth_module.verify_password

    def counting(password: str, password_hash: str) -> bool:
        calls.append(password)
        return real(password, password_hash)

    monkeypatch.setattr(auth_module, "verify_password", counting)
    directory = _Directory(hash_password("right-password"))
    authenticator = Authenticator(
        directory,  # type: ignore[arg-type]
        FailureThrottle(),
        Metrics.create(CollectorRegistry()),
    )
    expected = Principal(username="ams", account_id="acc")
    assert await authenticator.authenticate("ams", "right-password", "127.0.0.1") == expected
    assert await authenticator.authenticate("ams", "right-password", "127.0.0.1") == expected
    assert calls == ["right-password"]  # the second AUTH: remembered, no scrypt
    assert await authenticator.authenticate("ams", "wrong-password", "127.0.0.1") is None
    assert calls == ["right-password", "wrong-password"]
    (key,) = authenticator._verified
    username, tag, stored = key
    assert (username, stored) == ("ams", directory.credentials.get("ams").password_hash)
    assert b"right-password" not in tag and len(tag) == 32
    other = Authenticator(
        directory,  # type: ignore[arg-type]
        FailureThrottle(),
        Metrics.create(CollectorRegistry()),
    )
    assert await other.authenticate("ams", "right-password", "127.0.0.1") == expected
    assert other._verified.keys() != authenticator._verified.keys()  # a per-process key
