"""The end-to-end bench starts its paced phase once the flood is worked off: every consumer
that acknowledges has nothing pending and nothing unacknowledged (nats-server's /jsz), KV
watchers (which ack nothing) aside."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import pytest
from mailgate_core.nats import provision
from mailgate_fakes.infra import NatsServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_e2e


async def test_backlog_counts_pending_and_unacked_until_acked(nats_server: NatsServer) -> None:
    stack: Any = SimpleNamespace(nats=nats_server)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await provision(js)
        await js.create_key_value(bucket="drain-probe")
        kv = await js.key_value("drain-probe")
        await kv.put("k", b"v")
        watcher = await kv.watchall()  # an ordered consumer: acks nothing, never counted
        for i in range(3):
            await js.publish("mail.accepted", f"m{i}".encode())
        sub = await js.pull_subscribe("mail.accepted", durable="drain-test", stream="MAIL")
        assert bench_e2e._consumer_backlog(stack) == {"MAIL/drain-test": 3}

        first = await sub.fetch(2, timeout=5)  # delivered, not yet acknowledged: still held
        assert bench_e2e._consumer_backlog(stack) == {"MAIL/drain-test": 3}
        waited, left = await bench_e2e._drained(stack, timeout_s=0.3)
        assert left == {"MAIL/drain-test": 3}
        assert waited >= 0.3
        assert "not drained" in bench_e2e._drain_note(waited, left)

        for msg in first:
            await msg.ack_sync()
        assert bench_e2e._consumer_backlog(stack) == {"MAIL/drain-test": 1}
        for msg in await sub.fetch(1, timeout=5):
            await msg.ack_sync()
        waited, left = await bench_e2e._drained(stack, timeout_s=10)
        assert left == {}
        assert bench_e2e._drain_note(waited, left).startswith("started once every JetStream")
        await watcher.stop()
    finally:
        await nc.close()


async def test_unreadable_monitor_is_said_not_guessed() -> None:
    stack: Any = SimpleNamespace(nats=SimpleNamespace(monitor_port=1))  # nothing listens
    assert bench_e2e._consumer_backlog(stack) is None
    waited, left = await bench_e2e._drained(stack, timeout_s=5)
    assert left == {"?": -1}
    assert waited < 5
    assert "unreadable" in bench_e2e._drain_note(waited, left)


@pytest.mark.parametrize("ack_policy", ["explicit", "all"])
def test_backlog_of_jsz_accounts(ack_policy: str) -> None:
    accounts = [
        {
            "stream_detail": [
                {
                    "name": "STATUS",
                    "consumer_detail": [
                        {
                            "name": "ams-reporter",
                            "num_pending": 5,
                            "num_ack_pending": 2,
                            "config": {"ack_policy": ack_policy},
                        },
                        {"name": "idle", "num_pending": 0, "num_ack_pending": 0, "config": {}},
                        {
                            "name": "watch",
                            "num_pending": 0,
                            "num_ack_pending": 1,
                            "config": {"ack_policy": "none"},
                        },
                    ],
                },
                {"name": "EMPTY", "consumer_detail": None},
            ]
        }
    ]
    assert bench_e2e.backlog_of(accounts) == {"STATUS/ams-reporter": 7}
