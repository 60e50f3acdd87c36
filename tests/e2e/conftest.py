from __future__ import annotations

from collections.abc import Iterator

import pytest
from mailgate_fakes.stack import Stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Every service as its own process, as `make run` starts them, on free ports."""
    running = Stack.with_free_ports(
        tmp_path_factory.mktemp("stack"), sender_domains=("example.com",)
    )
    try:
        running.start()
    except Exception:
        for name in ["ledger", "smtp-ingest", "postal-sender", "webhook-ingest", "postal-sandbox"]:
            print(f"--- {name} log ---\n{running.tail_log(name)}")
        running.stop()
        raise
    yield running
    running.stop()
