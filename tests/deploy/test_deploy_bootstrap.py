"""What `docker compose up` relies on, run in-process: `mailgate-ledger bootstrap` makes the
demo credential, the ledger pushes it to KV and smtp-ingest accepts mail with it at once;
plus the metrics the dashboards added (consumer lag, per-campaign status counts)."""

from __future__ import annotations

import asyncio
import re
import smtplib
import ssl
from collections.abc import AsyncIterator
from email.message import EmailMessage
from typing import Any

import asyncpg
import msgspec
import nats.js.errors
import pytest
from mailgate_core import schemas as s
from mailgate_core.config import BaseSettings, ConfigError, Secret, load_settings
from mailgate_core.nats import ConsumerLag, publish_event
from mailgate_core.passwords import verify_password
from mailgate_core.records import CredentialRecord
from mailgate_core.service import ServiceBase
from mailgate_fakes.infra import free_port
from mailgate_fakes.testing import eventually
from mailgate_ledger.app import Settings as LedgerSettings
from mailgate_ledger.app import build as build_ledger
from mailgate_ledger.bootstrap import BootstrapSettings, bootstrap
from mailgate_smtp_ingest.app import Settings as SmtpSettings
from mailgate_smtp_ingest.app import build as build_smtp
from prometheus_client import CollectorRegistry

PASSWORD = "demo-password-0123"
TOKEN = "demo-account-api-token-0123456789"


def _bootstrap_settings(database_url: str, **env: str) -> BootstrapSettings:
    values = {
        "DATABASE_URL": database_url,
        "BOOTSTRAP_SMTP_USERNAME": "demo",
        "BOOTSTRAP_SMTP_PASSWORD": PASSWORD,
        "BOOTSTRAP_API_TOKEN": TOKEN,
        "BOOTSTRAP_SENDER_DOMAINS": "example.com",
    } | env
    return load_settings(BootstrapSettings, values)


async def _rows(database_url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


async def test_bootstrap_migrates_and_is_idempotent(database_url: str) -> None:
    first = await bootstrap(_bootstrap_settings(database_url))
    assert re.fullmatch(r"\d+ migration\(s\) applied: \[.+\]", first[0])
    assert any("created" in line for line in first)
    assert not any(PASSWORD in line for line in first)
    second = await bootstrap(
        _bootstrap_settings(database_url, BOOTSTRAP_SMTP_PASSWORD="changed-password-99")
    )
    assert second[0] == "0 migration(s) applied"
    assert "credential demo: password updated" in second
    creds = await _rows(database_url, "SELECT username, password_hash FROM credentials")
    accounts = await _rows(database_url, "SELECT allowed_sender_domains FROM accounts")
    assert len(creds) == 1 and len(accounts) == 1
    assert verify_password("changed-password-99", creds[0]["password_hash"])
    assert list(accounts[0]["allowed_sender_domains"]) == ["example.com"]


async def test_bootstrap_without_a_username_only_migrates(database_url: str) -> None:
    done = await bootstrap(load_settings(BootstrapSettings, {"DATABASE_URL": database_url}))
    assert len(done) == 1
    assert await _rows(database_url, "SELECT 1 FROM credentials") == []


async def test_bootstrap_creates_the_console_admin_and_keeps_it_in_step(
    database_url: str,
) -> None:
    env = {"BOOTSTRAP_CONSOLE_ADMIN": "ops", "BOOTSTRAP_CONSOLE_PASSWORD": "console-pass-0123"}
    first = await bootstrap(_bootstrap_settings(database_url, **env))
    assert "console admin ops created" in first
    assert not any("console-pass-0123" in line for line in first)
    second = await bootstrap(_bootstrap_settings(database_url, **env))
    assert "console admin ops up to date" in second
    env["BOOTSTRAP_CONSOLE_PASSWORD"] = "console-pass-4567"
    third = await bootstrap(_bootstrap_settings(database_url, **env))
    assert "console admin ops password updated" in third
    rows = await _rows(database_url, "SELECT username, role, password_hash FROM operators")
    assert [(r["username"], r["role"]) for r in rows] == [("ops", "admin")]
    assert verify_password("console-pass-4567", rows[0]["password_hash"])
    with pytest.raises(ConfigError, match="BOOTSTRAP_CONSOLE_PASSWORD"):
        _bootstrap_settings(
            database_url, BOOTSTRAP_CONSOLE_ADMIN="ops", BOOTSTRAP_CONSOLE_PASSWORD="short"
        )


def test_bootstrap_refuses_a_short_password() -> None:
    with pytest.raises(ConfigError, match="BOOTSTRAP_SMTP_PASSWORD"):
        load_settings(
            BootstrapSettings,
            {
                "DATABASE_URL": "postgresql://x",
                "BOOTSTRAP_SMTP_USERNAME": "demo",
                "BOOTSTRAP_SMTP_PASSWORD": "short",
            },
        )


@pytest.fixture
async def ledger(database_url: str, nats_url: str, js: Any) -> AsyncIterator[Any]:
    await bootstrap(_bootstrap_settings(database_url))
    settings = LedgerSettings(
        nats_url=nats_url,
        database_url=Secret(database_url),
        admin_token=Secret("admin-token-for-tests-0123456789"),
        admin_host="127.0.0.1",
        admin_port=free_port(),
        outbox_interval_s=0.2,
        consumer_lag_interval_s=0.2,
    )
    service = await build_ledger(settings, registry=CollectorRegistry())
    await service.start()
    yield service
    await service.stop()


def _send(port: int, certificate: bytes) -> str:
    ctx = ssl.create_default_context(cadata=certificate.decode())
    msg = EmailMessage()
    msg["From"] = "news@example.com"
    msg["To"] = "ivan@example.org"
    msg["Subject"] = "hello"
    msg.set_content("Hello Ivan\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("ams.test")
        smtp.starttls(context=ctx)
        smtp.ehlo("ams.test")
        smtp.login("demo", PASSWORD)
        smtp.mail("news@example.com")
        smtp.rcpt("ivan@example.org")
        code, reply = smtp.data(msg.as_bytes())
        return f"{code} {reply.decode()}"


async def test_bootstrapped_credential_is_accepted_by_smtp_ingest(
    ledger: Any, nats_url: str, js: Any
) -> None:
    kv = await js.key_value("credentials")

    async def credential() -> CredentialRecord | None:
        try:
            entry = await kv.get("demo")
        except Exception:
            return None
        return msgspec.json.decode(entry.value, type=CredentialRecord)

    record = await eventually(credential, timeout=15, what="demo credential in KV")
    assert verify_password(PASSWORD, record.password_hash)
    smtp = await build_smtp(
        SmtpSettings(
            nats_url=nats_url,
            domain="mailgate.test",
            smtp_host="127.0.0.1",
            smtp_port=0,
            smtps_port=0,
            ops_host="127.0.0.1",
            ops_port=0,
            shutdown_grace_s=5.0,
        ),
        registry=CollectorRegistry(),
    )
    await smtp.start()
    try:
        assert smtp.certificate_pem is not None
        reply = await asyncio.to_thread(_send, smtp.smtp_port, smtp.certificate_pem)
        assert reply.startswith("250")
    finally:
        await smtp.stop()


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_ledger_exports_consumer_lag_and_campaign_statuses(ledger: Any, js: Any) -> None:
    registry = ledger.registry
    await eventually(
        lambda: (
            _sample(
                registry,
                "mailgate_consumer_pending_messages",
                stream="MAIL",
                consumer="ledger-mail",
            )
            == 0
        ),
        timeout=10,
        what="consumer lag gauge",
    )
    ref = s.MessageRef(
        mailgate_id="01JDEPLOYTEST0000000000000",
        account_id="01HACCOUNT000000000000000A",
        recipient="ivan@example.org",
        external_id="ams-1",
        campaign_id="73",
    )
    await publish_event(
        js,
        s.MailAccepted(
            message=ref,
            mail_from="news@example.com",
            credential="demo",
            message_id_header="<x@mailgate.test>",
            subject_line="x",
            size=10,
            raw=b"x",
        ),
    )
    await publish_event(js, s.MailSubmitted(message=ref, postal_id=1, postal_token="tok"))
    await eventually(
        lambda: (
            _sample(registry, "mailgate_ledger_campaign_status_total", campaign="73", status="sent")
            == 1
        ),
        timeout=15,
        what="per-campaign status counter",
    )


async def test_consumer_lag_counts_pending_and_in_hand(js: Any) -> None:
    sub = await js.pull_subscribe("mail.>", durable="lag-probe", stream="MAIL")
    registry = CollectorRegistry()
    lag = ConsumerLag(js, registry, interval_s=60)
    lag.watch("MAIL", "lag-probe")
    lag.watch("MAIL", "lag-probe")  # several workers on one durable: one series
    for n in range(3):
        await js.publish("mail.accepted", b"{}", headers={"Nats-Msg-Id": f"lag-{n}"})
    await lag.refresh()
    assert (
        _sample(registry, "mailgate_consumer_pending_messages", stream="MAIL", consumer="lag-probe")
        == 3
    )
    (msg,) = await sub.fetch(1, timeout=5)
    await lag.refresh()
    assert (
        _sample(registry, "mailgate_consumer_pending_messages", stream="MAIL", consumer="lag-probe")
        == 2
    )
    assert (
        _sample(
            registry, "mailgate_consumer_ack_pending_messages", stream="MAIL", consumer="lag-probe"
        )
        == 1
    )
    await msg.ack()
    lag.watch("MAIL", "no-such-consumer")  # missing consumers are skipped, not fatal
    await lag.refresh()


async def test_jetstream_replicas_reach_provisioning(nats_url: str) -> None:
    """JETSTREAM_REPLICAS=3 (Kubernetes) asks for R3 streams: one lone server refuses them."""
    settings = load_settings(BaseSettings, {"NATS_URL": nats_url, "JETSTREAM_REPLICAS": "3"})
    assert settings.jetstream_replicas == 3
    service = ServiceBase(settings)
    try:
        with pytest.raises(nats.js.errors.Error, match=r"(?i)replica|cluster"):
            await service.connect()
    finally:
        if service.nc is not None:
            await service.nc.close()
    ok = ServiceBase(load_settings(BaseSettings, {"NATS_URL": nats_url}))
    await ok.connect()
    info = await ok.js.stream_info("MAIL")
    assert info.config.num_replicas == 1
    await ok.nc.close()
