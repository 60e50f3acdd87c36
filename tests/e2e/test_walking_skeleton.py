"""One message through every service, each running as its own process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import smtplib
import ssl
import subprocess
import sys
import urllib.request
from email.message import EmailMessage
from typing import Any

import pytest
from aiohttp import web
from mailgate_fakes.infra import free_port
from mailgate_fakes.stack import Stack
from mailgate_fakes.testing import eventually

pytestmark = pytest.mark.e2e


def _send(stack: Stack, username: str, password: str, msg: EmailMessage) -> tuple[int, bytes]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", stack.ports["smtp"], timeout=30) as smtp:
        smtp.ehlo("ams.example.com")
        smtp.starttls(context=context)
        smtp.ehlo("ams.example.com")
        smtp.login(username, password)
        smtp.mail(msg["From"])
        smtp.rcpt("ivan@example.org")
        return smtp.data(msg.as_bytes())


def _account(stack: Stack, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tracked account sending from example.com, and an SMTP credential of it."""
    account = stack.admin(
        "POST",
        "/v1/accounts",
        {"name": name, "allowed_sender_domains": ["example.com"], "tracking": True},
    )
    cred = stack.admin("POST", f"/v1/accounts/{account['id']}/credentials", {"name": "ams"})
    return account, cred


def _campaign_message(external_id: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "News <news@example.com>"
    msg["To"] = "ivan@example.org"
    msg["Subject"] = "Скидки недели"
    msg["X-AMS-Message-ID"] = external_id
    msg["X-AMS-Campaign-ID"] = "73"
    msg.set_content("Привет!")
    msg.add_alternative("<html><body><p>Привет!</p></body></html>", subtype="html")
    return msg


def _get_json(url: str, token: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def _standard_webhooks_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


async def test_one_message_travels_smtp_to_postal_to_a_signed_customer_webhook(
    stack: Stack,
) -> None:
    received: list[tuple[dict[str, str], bytes]] = []

    async def receiver(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hooks/mailgate", receiver)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        account, cred = await asyncio.to_thread(_account, stack, "acme")
        hook = await asyncio.to_thread(
            stack.admin,
            "POST",
            "/v1/email/webhook",
            {"url": f"http://127.0.0.1:{port}/hooks/mailgate"},
            account["api_token"],
        )
        assert hook["url"].endswith("/hooks/mailgate") and hook["secret"].startswith("whsec_")

        msg = _campaign_message("ams-42")
        code, reply = await asyncio.to_thread(_send, stack, cred["username"], cred["password"], msg)
        assert code == 250, reply

        # 1. Postal (the sandbox) received exactly one submission with our Message-ID.
        def submitted() -> list[dict[str, Any]]:
            with urllib.request.urlopen(  # noqa: S310 - loopback
                f"{stack.postal_api_url}/__sandbox/messages", timeout=5
            ) as resp:
                return list(json.loads(resp.read()))

        postal_messages = await eventually(submitted, timeout=30, what="Postal submission")
        assert len(postal_messages) == 1
        postal = postal_messages[0]
        assert postal["rcpt_to"] == "ivan@example.org"
        mailgate_id = postal["message_id"].split("@")[0]
        assert postal["message_id"] == f"{mailgate_id}@{stack.domain}"
        assert postal["tag"] == "73"

        # 2. A signed `delivered` webhook reached the customer endpoint.
        def delivered() -> list[tuple[dict[str, str], bytes]]:
            return [r for r in received if json.loads(r[1])["event"]["name"] == "delivered"]

        (headers, body), *rest = await eventually(delivered, timeout=30, what="delivered hook")
        assert rest == []
        event = json.loads(body)
        assert event["message"] == {
            "id": "ams-42",
            "mailgate_id": mailgate_id,
            "campaign_id": "73",
            "email": "ivan@example.org",
        }
        assert isinstance(event["event"]["timestamp"], int)
        expected_simple = hmac.new(hook["secret"].encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Mailgate-Signature"] == f"sha256={expected_simple}"
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        mac = hmac.new(_standard_webhooks_key(hook["secret"]), signed, hashlib.sha256).digest()
        assert headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()

        # 3. The ledger holds the three-way id mapping and the history.
        page = await asyncio.to_thread(
            _get_json, f"{stack.url('ledger')}/v1/messages?external_id=ams-42", stack.admin_token
        )
        (row,) = page["items"]
        assert row["mailgate_id"] == mailgate_id
        assert row["postal_id"] == postal["id"]
        assert row["external_id"] == "ams-42" and row["campaign_id"] == "73"

        # 'sent' comes on the MAIL stream, 'delivered' on POSTAL: the ledger may commit them in
        # either order, so the history is complete only eventually.
        async def history() -> dict[str, Any]:
            detail = await asyncio.to_thread(
                _get_json, f"{stack.url('ledger')}/v1/messages/{mailgate_id}", stack.admin_token
            )
            assert detail["status"] == "delivered"
            names = [e["name"] for e in detail["events"]]
            assert {"accepted", "sent", "delivered"} <= set(names), names
            return detail

        await eventually(history, timeout=30, what="full history in the ledger")
    finally:
        await runner.cleanup()


def test_every_service_exposes_metrics_health_and_readiness(stack: Stack) -> None:
    for service in (
        "ledger",
        "smtp-ingest",
        "postal-sender",
        "webhook-ingest",
        "tracker",
        "ams-reporter",
        "stats-poller",
    ):
        base = stack.ops_url(service)
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(base + path, timeout=5) as resp:  # noqa: S310
                assert resp.status == 200, (service, path)
        with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:  # noqa: S310
            text = resp.read().decode()
        assert "mailgate_" in text, service


async def test_the_mailgate_cli_reads_the_ledger_and_reports_errors(stack: Stack) -> None:
    _, cred = await asyncio.to_thread(_account, stack, "cli")
    msg = _campaign_message("ams-cli-1")
    code, reply = await asyncio.to_thread(_send, stack, cred["username"], cred["password"], msg)
    assert code == 250, reply

    def recorded() -> list[Any]:
        page = _get_json(
            f"{stack.url('ledger')}/v1/messages?external_id=ams-cli-1", stack.admin_token
        )
        return list(page["items"])

    await eventually(lambda: asyncio.to_thread(recorded), timeout=30, what="message in ledger")
    await asyncio.to_thread(_run_cli, stack)


def _run_cli(stack: Stack) -> None:
    env = {
        **os.environ,
        "MAILGATE_ADMIN_URL": stack.url("ledger"),
        "ADMIN_TOKEN": stack.admin_token,
    }
    cli = [sys.executable, "-m", "mailgate_cli"]
    found = subprocess.run(
        [*cli, "messages", "find", "--external-id", "ams-cli-1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["items"][0]["external_id"] == "ams-cli-1"
    denied = subprocess.run(
        [*cli, "accounts", "list"],
        env={**env, "ADMIN_TOKEN": "wrong"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert denied.returncode == 1 and "HTTP 401" in denied.stderr


def test_sigterm_drains_and_every_service_exits_zero(stack: Stack) -> None:
    """Runs last: stop intake, finish in-flight work, ack, exit 0 on SIGTERM."""
    for service in (
        "smtp-ingest",
        "postal-sender",
        "webhook-ingest",
        "tracker",
        "ams-reporter",
        "stats-poller",
        "ledger",
    ):
        code = stack.stop_service(service, timeout_s=30)
        assert code == 0, f"{service} exited {code}:\n{stack.tail_log(service)}"
