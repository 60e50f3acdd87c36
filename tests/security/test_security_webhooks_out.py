"""Outbound customer webhooks (ams-reporter) cannot be aimed at our own network: private and
special ranges, names that resolve (or re-resolve: DNS rebinding) to them, and redirects to
127.0.0.1 are refused. The resolver is a fake DNS; the "internal" services are real local
HTTP servers that must never see a request."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from mailgate_ams_reporter.delivery import Delivered, Deliverer, Failed, Refused
from mailgate_ams_reporter.ssrf import GuardedResolver
from mailgate_core.netguard import is_forbidden_ip
from mailgate_core.records import EndpointRecord
from mailgate_fakes.infra import free_port


class FakeDns(AbstractResolver):
    """Answers from a table; a list of answers is served in turn (rebinding)."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        answers = self.table[host]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in addresses
        ]

    async def close(self) -> None:
        return None


class Internal:
    """A local HTTP server standing in for an internal service (counts hits)."""

    def __init__(self, host: str = "127.0.0.1", redirect_to: str | None = None) -> None:
        self.host, self.port, self.hits = host, free_port(), 0
        self.redirect_to = redirect_to

    async def handle(self, _request: web.Request) -> web.Response:
        self.hits += 1
        if self.redirect_to:
            raise web.HTTPFound(self.redirect_to)
        return web.json_response({"secret": "internal"})

    async def __aenter__(self) -> Internal:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port).start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.runner.cleanup()


def deliverer(dns: AbstractResolver, *, allow_private: bool = False) -> Deliverer:
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(allow_private=allow_private, inner=dns), use_dns_cache=False
    )
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5))
    return Deliverer(session, allow_private=allow_private)


def endpoint(url: str) -> EndpointRecord:
    return EndpointRecord(id="ep1", url=url, secret="whsec_" + "A" * 32)


@pytest.fixture
async def internal() -> AsyncIterator[Internal]:
    async with Internal() as server:
        yield server


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "::1",
        "fc00::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
        "198.18.0.1",
        "240.0.0.1",
        "not-an-ip",
    ],
)
def test_every_non_public_address_is_forbidden(address: str) -> None:
    assert is_forbidden_ip(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700::6810:85e5", "8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert not is_forbidden_ip(address)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/",
        "http://[::1]:{port}/",
        "http://0x7f.0.0.1:{port}/",
        "http://2130706433:{port}/",
        "http://localhost:{port}/",
        "http://internal.test:{port}/",
        "http://mixed.test:{port}/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:{port}/",
    ],
)
async def test_private_targets_literal_named_or_encoded_are_refused(
    internal: Internal, url: str
) -> None:
    dns = FakeDns(
        {
            "localhost": [["127.0.0.1"]],
            "internal.test": [["10.0.0.5"]],
            "mixed.test": [["93.184.216.34", "127.0.0.1"]],
            "0x7f.0.0.1": [["127.0.0.1"]],
            "2130706433": [["127.0.0.1"]],
        }
    )
    sender = deliverer(dns)
    try:
        outcome = await sender.attempt(endpoint(url.format(port=internal.port)), "wh1", b"{}")
    finally:
        await sender._session.close()
    # Refused (never retried) - or, for a host aiohttp cannot even parse, a failure before
    # any connection; in no case did a request reach the internal server.
    assert isinstance(outcome, Refused) or (
        isinstance(outcome, Failed) and outcome.status is None and "InvalidUrl" in outcome.reason
    ), outcome
    assert internal.hits == 0


async def test_dns_rebinding_is_caught_at_connect_time(internal: Internal) -> None:
    """Registration saw a public address; at delivery the name answers 127.0.0.1. The
    address checked is the address connected to (the guard is the connector's resolver)."""
    dns = FakeDns({"rebind.test": [["93.184.216.34"], ["127.0.0.1"]]})
    assert not is_forbidden_ip((await dns.resolve("rebind.test"))[0]["host"])  # registration
    sender = deliverer(dns)
    try:
        outcome = await sender.attempt(
            endpoint(f"http://rebind.test:{internal.port}/hook"), "wh1", b"{}"
        )
    finally:
        await sender._session.close()
    assert isinstance(outcome, Refused) and outcome.reason == "non-public address"
    assert dns.asked == ["rebind.test", "rebind.test"]
    assert internal.hits == 0


async def test_a_redirect_to_127_0_0_1_is_never_followed(internal: Internal) -> None:
    """Even an endpoint we may call (here: private addresses allowed, as in development)
    cannot bounce the request to another address with a 30x."""
    bouncer = Internal(host="127.0.0.2", redirect_to=f"http://127.0.0.1:{internal.port}/admin")
    async with bouncer:
        sender = deliverer(FakeDns({}), allow_private=True)
        try:
            outcome = await sender.attempt(
                endpoint(f"http://127.0.0.2:{bouncer.port}/hook"), "wh1", b"{}"
            )
        finally:
            await sender._session.close()
    assert bouncer.hits == 1
    assert isinstance(outcome, Failed) and outcome.status == 302
    assert not isinstance(outcome, Delivered)
    assert internal.hits == 0
