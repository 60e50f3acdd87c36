"""The ``mailgate`` CLI doing operators' tasks against a real (in-process) ledger."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mailgate_cli.__main__ import main
from mailgate_core import schemas as s
from mailgate_core.ids import new_ulid
from mailgate_core.nats import publish_event
from mailgate_fakes.testing import eventually
from test_ledger_support import ADMIN_TOKEN, start_ledger, status_events

__all__ = ["start_ledger"]


class Cli:
    """Runs ``mailgate ...`` in a thread (the ledger shares this event loop)."""

    def __init__(self, ledger: Any) -> None:
        self.base = ["--url", ledger.base, "--token", ADMIN_TOKEN]

    async def run(self, *argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(
            main,
            [*self.base, *argv],
            stdin=io.BytesIO(stdin) if stdin is not None else None,
            stdout=out,
            stderr=err,
        )
        return code, out.getvalue(), err.getvalue()

    async def ok(self, *argv: str) -> Any:
        code, out, err = await self.run(*argv)
        assert code == 0, (argv, err)
        return json.loads(out) if out.strip() else None


async def test_accounts_credentials_and_webhooks_from_the_command_line(start_ledger) -> None:
    cli = Cli(await start_ledger())
    account = await cli.ok("accounts", "create", "Acme", "--sender-domain", "acme.example")
    assert account["allowed_sender_domains"] == ["acme.example"] and account["api_token"]
    listed = await cli.ok("accounts", "list")
    assert [a["id"] for a in listed["items"]] == [account["id"]]
    assert (await cli.ok("accounts", "disable", account["id"]))["disabled"] is True
    assert (await cli.ok("accounts", "enable", account["id"]))["disabled"] is False
    rotated = await cli.ok("accounts", "rotate-token", account["id"])
    assert rotated["api_token"] != account["api_token"]

    cred = await cli.ok(
        "credentials",
        "create",
        account["id"],
        "AMS",
        "--username",
        "ams-1",
        "--allow-ip",
        "203.0.113.0/24",
        "--daily-limit",
        "50000",
    )
    assert cred["username"] == "ams-1" and cred["password"] and cred["daily_limit"] == 50000
    new = await cli.ok("credentials", "rotate", account["id"], "ams-1")
    assert new["password"] and new["password"] != cred["password"]
    assert (await cli.ok("credentials", "disable", account["id"], "ams-1"))["disabled"] is True
    creds = await cli.ok("credentials", "list", account["id"])
    assert [(c["username"], c["disabled"]) for c in creds["items"]] == [("ams-1", True)]

    token = rotated["api_token"]
    hook = await cli.ok(
        "webhook",
        "set",
        "https://hooks.example.com/ams",
        "--account-token",
        token,
        "--event",
        "delivered",
        "--event",
        "complined",
    )
    assert hook["secret"].startswith("whsec_") and hook["events"] == ["delivered", "complained"]
    assert (await cli.ok("webhook", "get", "--account-token", token))["url"] == hook["url"]
    gone = await cli.ok("webhook", "delete", hook["url"], "--account-token", token)
    assert gone == {"url": hook["url"], "enabled": False}

    code, _, err = await cli.run("webhook", "get", "--account-token", account["api_token"])
    assert code == 1 and "HTTP 401" in err  # the rotated-away token no longer works
    code, _, err = await cli.run("credentials", "rotate", account["id"], "nobody")
    assert code == 1 and "HTTP 404" in err and "nobody" in err


async def test_suppressions_round_trip_through_csv_files(start_ledger, tmp_path: Path) -> None:
    ledger = await start_ledger()
    cli = Cli(ledger)
    account = await cli.ok("accounts", "create", "Acme")
    aid = account["id"]
    added = await cli.ok("suppressions", "add", aid, "One@Example.org", "--reason", "complained")
    assert added == {**added, "email": "one@example.org", "reason": "complained"}
    source = tmp_path / "in.csv"
    source.write_text(
        "email,reason\n" + "".join(f"user{i:04d}@example.org,unsubscribed\n" for i in range(2000))
    )
    result = await cli.ok("suppressions", "import", aid, str(source))
    assert result["imported"] == 2000 and result["added"] == 2000
    page = await cli.ok("suppressions", "list", aid, "--limit", "2")
    assert [p["email"] for p in page["items"]] == ["one@example.org", "user0000@example.org"]
    target = tmp_path / "out.csv"
    written = await cli.ok("suppressions", "export", aid, "-o", str(target))
    lines = target.read_text().splitlines()
    assert written["bytes"] == target.stat().st_size and len(lines) == 2002
    assert lines[0] == "email,reason,created_at" and lines[1].startswith("one@example.org,")
    removed = await cli.ok("suppressions", "remove", aid, "one@example.org")
    assert removed == {"email": "one@example.org", "deleted": True}

    # the real entry point, reading the CSV from stdin
    env = {**os.environ, "MAILGATE_ADMIN_URL": ledger.base, "ADMIN_TOKEN": ADMIN_TOKEN}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailgate_cli",
        "suppressions",
        "import",
        aid,
        "-",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(b"bad-line\n"), timeout=30)
    assert proc.returncode == 1 and b"CSV rejected" in err and b"line 1" in err, err
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailgate_cli",
        "suppressions",
        "import",
        aid,
        "-",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(b"late@example.org\n"), timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out)["imported"] == 1


async def test_messages_campaigns_dead_letters_and_health(start_ledger, js) -> None:
    ledger = await start_ledger()
    cli = Cli(ledger)
    mid = new_ulid()
    ref = s.MessageRef(
        mailgate_id=mid,
        account_id="acc",
        recipient="ivan@example.org",
        external_id="ams-7",
        campaign_id="c-1",
    )
    await publish_event(
        js,
        s.MailAccepted(message=ref, mail_from="f@x.org", credential="c", message_id_header="<x>"),
    )
    await publish_event(js, s.MailSubmitted(message=ref, postal_id=77, postal_token="tok"))
    await publish_event(js, s.TrackOpen(mailgate_id=mid, audience="human"))

    async def all_recorded() -> Any:
        # MAIL and TRACK are consumed independently: wait for every fact, not just the status.
        detail = await cli.ok("messages", "get", mid)
        return detail if len(detail["events"]) == 3 else None

    detail = await eventually(all_recorded, what="three facts recorded")
    found = await cli.ok("messages", "find", "--email", "IVAN@example.org")
    assert [(m["mailgate_id"], m["status"]) for m in found["items"]] == [(mid, "opened")]
    assert (await cli.ok("messages", "find", "--id", "ams-7"))["items"][0]["mailgate_id"] == mid
    assert [e["name"] for e in detail["events"]] == ["accepted", "sent", "opened"]
    timeline = await cli.ok("messages", "timeline", mid)
    assert timeline["timeline"][-1]["status_event"]["data"]["audience"] == "human"
    stats = await cli.ok("campaigns", "stats", "c-1")
    assert stats["events"]["opened"]["by_audience"]["human"] == {"total": 1, "unique": 1}

    sent = next(e for e in await status_events(js) if e.name == "sent")
    await publish_event(
        js,
        s.WebhookDeadLettered(
            event_id=f"dl-{sent.event_id}-ep9",
            status=sent,
            endpoint_id="ep9",
            attempts=30,
            reason="timeout",
        ),
    )

    async def listed() -> Any:
        page = await cli.ok("dead-letters", "list", "--endpoint-id", "ep9")
        return page["items"] or None

    [letter] = await eventually(listed, what="the dead letter")
    replayed = await cli.ok("dead-letters", "replay", letter["id"])
    assert replayed["replay_count"] == 1
    assert (await cli.ok("dead-letters", "list", "--endpoint-id", "ep9"))["items"] == []
    again = await cli.ok("dead-letters", "replay-all", "--endpoint-id", "ep9", "--include-replayed")
    assert again["replayed"] == 1

    health = await cli.ok("health")
    assert health["status"] == "ok" and health["dead_letters_pending"] == 0
    code, _, err = await cli.run("--token", "wrong-token-000000", "health")
    assert code == 1 and "HTTP 401" in err
