"""smtp-ingest's throughput features keep its guarantees: batched publish acks (250 only when
every recipient's event is durable) and SMTP_WORKERS (several processes on one port, each
draining on SIGTERM)."""

# ruff: noqa: F811 - the fixtures of test_smtp_ingest_service are imported, then requested

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mailgate_core.schemas import MailAccepted
from mailgate_fakes.infra import free_port, python_env
from mailgate_fakes.testing import eventually
from test_smtp_ingest_service import (  # noqa: F401 - fixtures used by name
    DOMAIN,
    PASSWORD,
    SENDER,
    USER,
    Creds,
    Factory,
    connect,
    creds,
    make_message,
    reply,
    start_service,
    stream_events,
)

TRY_LATER = "451 4.3.0 Temporary failure, please retry later"


async def test_recipients_beyond_one_publish_group_are_all_acked_before_250(
    start_service: Factory, js
) -> None:
    service = await start_service(max_recipients=100)
    recipients = [f"r{i}@example.org" for i in range(70)]  # 64 + 6: two publish groups

    def session() -> str:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            for rcpt in recipients:
                assert smtp.rcpt(rcpt)[0] == 250
            return reply(smtp.data(make_message()))

    answer = await asyncio.to_thread(session)
    events = await stream_events(js)  # read right after the 250: already durable
    assert answer.startswith("250 2.0.0 Ok: queued as ")
    assert sorted(e.message.recipient for e in events) == sorted(recipients)
    assert all(isinstance(e, MailAccepted) for e in events)
    assert service.registry.get_sample_value("mailgate_smtp_messages_accepted_total") == 70


async def test_a_publish_refused_in_the_middle_of_a_batch_answers_451(
    start_service: Factory, js
) -> None:
    service = await start_service()
    info = await js.stream_info("MAIL")
    info.config.max_msgs = 2  # discard=new: the third event of the batch is refused
    await js.update_stream(info.config)

    def session() -> str:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            for rcpt in ("a@example.org", "b@example.org", "c@example.org"):
                smtp.rcpt(rcpt)
            return reply(smtp.data(make_message()))

    assert await asyncio.to_thread(session) == TRY_LATER
    assert (await js.stream_info("MAIL")).state.messages == 2  # two stored, still no 250
    assert service.registry.get_sample_value("mailgate_smtp_messages_accepted_total") == 0


async def test_nats_stopped_during_a_batch_answers_451(start_service: Factory, nats_server) -> None:
    service = await start_service()

    def session() -> tuple[str, str]:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            for i in range(5):
                smtp.rcpt(f"r{i}@example.org")
            nats_server.stop()
            return reply(smtp.data(make_message())), reply(smtp.noop())

    answer, after = await asyncio.to_thread(session)
    assert answer == TRY_LATER
    assert after.startswith("250")
    assert service.registry.get_sample_value("mailgate_smtp_messages_accepted_total") == 0


# --- SMTP_WORKERS ----------------------------------------------------------------------


def _metric(ops_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _ready(ops_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/readyz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _free_port_pair(avoid: int) -> int:
    """A free port whose successor is free too: worker 2 serves its ops routes on OPS_PORT + 1
    (a port only checked by its own bind was sometimes already taken on a busy machine)."""
    while True:
        port = free_port()
        if avoid in (port, port + 1):
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


async def test_two_workers_share_the_port_and_both_drain_on_sigterm(
    nats_url: str, creds: Creds, js, tmp_path: Path
) -> None:
    smtp_port = free_port()
    ops_port = _free_port_pair(avoid=smtp_port)
    env = {
        "NATS_URL": nats_url,
        "DOMAIN": DOMAIN,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SMTPS_PORT": str(free_port()),
        "SMTP_AUTH_REQUIRE_TLS": "false",
        "SMTP_WORKERS": "2",
        "OPS_HOST": "127.0.0.1",
        "OPS_PORT": str(ops_port),
        "ALLOWED_SENDER_DOMAINS": "shop.example.com",
        "SHUTDOWN_GRACE_S": "10",
        "LOG_LEVEL": "warning",
    }
    log = open(tmp_path / "smtp.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailgate_smtp_ingest"],
        env=python_env(env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sessions: list[smtplib.SMTP] = []
    try:
        await eventually(lambda: _ready(ops_port) and _ready(ops_port + 1), timeout=30)
        workers = _children(proc.pid)
        assert len(workers) == 2

        def open_sessions() -> None:
            for _ in range(24):  # SO_REUSEPORT hashes each connection to one worker
                smtp = smtplib.SMTP("127.0.0.1", smtp_port, timeout=30)
                smtp.ehlo("ams.test")
                smtp.login(USER, PASSWORD)
                assert smtp.mail(SENDER)[0] == 250
                assert smtp.rcpt("ivan@example.org")[0] == 250
                sessions.append(smtp)

        await asyncio.to_thread(open_sessions)
        per_worker = [_metric(port, "mailgate_smtp_sessions") for port in (ops_port, ops_port + 1)]
        assert sum(per_worker) == 24 and min(per_worker) > 0, per_worker

        proc.send_signal(signal.SIGTERM)  # forwarded: both workers drain
        await eventually(lambda: not _ready(ops_port) and not _ready(ops_port + 1), timeout=10)

        def finish() -> list[str]:
            return [reply(smtp.data(make_message())) for smtp in sessions]

        answers = await asyncio.to_thread(finish)  # open transactions still complete
        assert all(a.startswith("250 2.0.0 Ok: queued as ") for a in answers), answers
        started = time.monotonic()
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert time.monotonic() - started < 20
        assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
        assert (await js.stream_info("MAIL")).state.messages == 24
    finally:
        for smtp in sessions:
            smtp.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


async def test_a_burst_of_logins_with_one_credential_runs_one_scrypt(
    start_service: Factory, monkeypatch
) -> None:
    import mailgate_smtp_ingest.auth as auth_module

    service = await start_service()
    calls: list[str] = []
    real = auth_module.verify_password

    def counting(password: str, encoded: str) -> bool:
        calls.append(password)
        return real(password, encoded)

    monkeypatch.setattr(auth_module, "verify_password", counting)
    assert service.handler is not None
    principals = await asyncio.gather(
        *(service.handler.authenticate(USER, PASSWORD, "127.0.0.1") for _ in range(8))
    )
    assert all(p is not None and p.username == USER for p in principals)
    assert len(calls) == 1
    assert await service.handler.authenticate(USER, "wrong", "127.0.0.1") is None
    assert len(calls) == 2  # a different password is checked on its own
