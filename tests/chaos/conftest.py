"""The chaos suite's stack: every service as a process, fast retry settings, a customer
endpoint. ``MAILGATE_CHAOS=full`` (``make chaos``) runs every fault with longer outages;
otherwise the short form runs inside ``make test``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from chaos_harness import FULL, SANDBOX_ARGS, SERVICE_ENV, Chaos, Receiver, RowResult, table
from mailgate_fakes.stack import Stack

ROWS: list[RowResult] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: faults against the whole stack (tests/chaos)")


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    stack = Stack.with_free_ports(
        tmp_path_factory.mktemp("chaos"),
        sender_domains=("example.com",),
        service_env=SERVICE_ENV,
        sandbox_args=SANDBOX_ARGS,
    )
    receiver = Receiver().start()
    try:
        stack.start()
        running = Chaos(stack, receiver)
    except Exception:
        for name in ["ledger", "smtp-ingest", "postal-sender", "webhook-ingest", "ams-reporter"]:
            print(f"--- {name} log ---\n{stack.tail_log(name)}")
        stack.stop()
        receiver.stop()
        raise
    yield running
    ROWS.extend(running.rows)
    stack.stop()
    receiver.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if ROWS:
        mode = "full" if FULL else "short"
        terminalreporter.write_sep("=", f"chaos table ({mode} form)")
        terminalreporter.write_line(table(ROWS))
