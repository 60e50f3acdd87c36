"""The outbox publishes STATUS in JetStream atomic batches only to servers that have them.

nats-server before 2.12 ignores the batch headers: it stores each message alone and answers
only the last, so a refused message in the middle would be taken as published.
"""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
from mailgate_core.nats_wire import atomic_batches_supported
from nats.aio.client import Client, Srv


def connected_to(version: str | None) -> Client:
    nc = Client()
    server = Srv(urlparse("nats://127.0.0.1:4222"))
    server.server_version = version
    nc._current_server = server
    return nc


@pytest.mark.parametrize(
    ("version", "atomic"),
    [
        ("2.15.1", True),
        ("2.12.0", True),
        ("3.0.0", True),
        ("2.11.9", False),
        ("2.10.22", False),
        ("2.12.0-RC.1", True),
        ("nonsense", False),
        (None, False),
    ],
)
def test_atomic_batches_follow_the_server_version(version: str | None, atomic: bool) -> None:
    assert atomic_batches_supported(connected_to(version)) is atomic


def test_no_server_yet_means_no_atomic_batches() -> None:
    assert atomic_batches_supported(Client()) is False
