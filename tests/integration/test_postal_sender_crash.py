"""postal-sender as a real process (``python -m mailgate_postal_sender``) that dies between
Postal's answer and the JetStream ack, then restarts: no loss, no second submission.

The crash is the fault-injection switch ``MAILGATE_TEST_CRASH_AFTER_SUBMIT=N``: the process
calls ``os._exit(137)`` (no cleanup, no ack, no NATS drain: what kill -9 leaves behind)
right after the N-th submission record is stored, before ``mail.submitted`` is published.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from mailgate_core.nats import publish_event
from mailgate_core.schemas import MailAccepted, MailSubmitted
from mailgate_fakes.infra import free_port
from mailgate_fakes.postal import PostalSandbox
from mailgate_fakes.testing import consumer_settled, eventually, mail_accepted, stored_events
from mailgate_postal_sender.pending import PendingRecord

KEY = "K" * 24
DOMAIN = "ours.example"


def accepted() -> MailAccepted:
    return mail_accepted(DOMAIN, from_header=f"news@{DOMAIN}")


class SenderProcess:
    """One postal-sender process; its output goes to a log file shown when a test fails."""

    def __init__(self, tmp: Path, env: dict[str, str], name: str):
        self.log_path = tmp / f"{name}.log"
        self.ops_port = int(env["OPS_PORT"])
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailgate_postal_sender"],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def metric(self, line_prefix: str) -> float | None:
        url = f"http://127.0.0.1:{self.ops_port}/metrics"
        try:
            async with aiohttp.ClientSession() as http, http.get(url) as resp:
                text = await resp.text()
        except aiohttp.ClientError:
            return None
        for line in text.splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
async def sandbox() -> AsyncIterator[PostalSandbox]:
    async with PostalSandbox([KEY], domains=[DOMAIN]).serving() as box:
        yield box


@pytest.fixture
def processes() -> Iterator[list[SenderProcess]]:
    started: list[SenderProcess] = []
    yield started
    for proc in started:
        proc.stop()


def env_for(nats_url: str, sandbox: PostalSandbox, **extra: str) -> dict[str, str]:
    return {
        "NATS_URL": nats_url,
        "POSTAL_API_URL": sandbox.base_url,
        "POSTAL_API_KEY": KEY,
        "OPS_HOST": "127.0.0.1",
        "OPS_PORT": str(free_port()),
        "ACK_WAIT_S": "2",
        "RETRY_BASE_S": "0.05",
        "POSTAL_TIMEOUT_S": "1",
        "RECONCILE_ENABLED": "false",
        "LOG_LEVEL": "info",
        **extra,
    }


async def submitted_events(js) -> list[MailSubmitted]:
    return await stored_events(js, "mail.submitted", "MAIL", MailSubmitted)


async def settled(js) -> bool:
    return await consumer_settled(js, "MAIL", "postal-sender")


async def wait_exit(proc: SenderProcess) -> int:
    code = await eventually(lambda: proc.proc.poll() is not None, timeout=30, what="exit")
    assert code
    return proc.proc.returncode


async def test_a_crash_between_postals_answer_and_the_ack_never_submits_twice(
    js, nats_url: str, sandbox: PostalSandbox, processes: list[SenderProcess], tmp_path: Path
) -> None:
    event = accepted()
    mailgate_id = event.message.mailgate_id
    await publish_event(js, event)

    first = SenderProcess(
        tmp_path, env_for(nats_url, sandbox, MAILGATE_TEST_CRASH_AFTER_SUBMIT="1"), "first"
    )
    processes.append(first)
    assert await wait_exit(first) == 137, first.log()
    # Postal has the message and the record is stored, but nothing was published or acked.
    assert [m["message_id"] for m in sandbox.messages] == [f"{mailgate_id}@{DOMAIN}"]
    record = await (await js.key_value("submissions")).get(mailgate_id)
    assert msgspec.json.decode(record.value)["postal_id"] == sandbox.messages[0]["id"]
    assert await submitted_events(js) == []

    second = SenderProcess(tmp_path, env_for(nats_url, sandbox), "second")
    processes.append(second)
    (out,) = await eventually(lambda: submitted_events(js), timeout=30, what=second.log())
    await eventually(lambda: settled(js), timeout=10, what="consumer settled")

    assert (out.message.mailgate_id, out.postal_id) == (mailgate_id, sandbox.messages[0]["id"])
    assert len(sandbox.messages) == 1
    assert [r["path"] for r in sandbox.requests] == ["/api/v1/send/raw"]
    assert len(await submitted_events(js)) == 1
    replayed = await eventually(
        lambda: second.metric("mailgate_postal_replayed_total"), what="metric"
    )
    assert replayed == 1.0
    # The redelivery also wrote the reconciler's record the crash prevented.
    pending = await (await js.key_value("postal-pending")).get(mailgate_id)
    record_p = msgspec.json.decode(pending.value, type=PendingRecord)
    assert (record_p.final, record_p.postal_id) == (False, sandbox.messages[0]["id"])


async def test_a_crash_mid_stream_loses_nothing_and_duplicates_nothing(
    js, nats_url: str, sandbox: PostalSandbox, processes: list[SenderProcess], tmp_path: Path
) -> None:
    events = [accepted() for _ in range(10)]
    for event in events:
        await publish_event(js, event)

    first = SenderProcess(
        tmp_path,
        env_for(nats_url, sandbox, MAILGATE_TEST_CRASH_AFTER_SUBMIT="4", SEND_CONCURRENCY="1"),
        "first",
    )
    processes.append(first)
    assert await wait_exit(first) == 137, first.log()
    assert len(sandbox.messages) == 4
    assert len(await submitted_events(js)) == 3

    second = SenderProcess(tmp_path, env_for(nats_url, sandbox), "second")
    processes.append(second)

    async def all_submitted() -> list[MailSubmitted] | None:
        got = await submitted_events(js)
        return got if len(got) >= 10 else None

    submitted = await eventually(all_submitted, timeout=30, what=second.log())
    await eventually(lambda: settled(js), timeout=10, what="consumer settled")
    ids = [e.message.mailgate_id for e in events]
    per_id = Counter(m["message_id"].split("@")[0] for m in sandbox.messages)
    assert per_id == Counter(ids)  # each exactly once at Postal
    assert sorted(s.message.mailgate_id for s in submitted) == sorted(ids)
