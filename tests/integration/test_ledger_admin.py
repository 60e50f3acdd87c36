"""ledger admin API, migrations and KV caches against real Postgres and NATS."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgspec
import nats.js.errors
from mailgate_core.passwords import verify_password
from mailgate_core.records import (
    AccountEndpoints,
    AccountRecord,
    CredentialRecord,
    SuppressionRecord,
    suppression_key,
)
from mailgate_fakes.testing import eventually
from test_ledger_support import ADMIN_TOKEN, start_ledger

__all__ = ["start_ledger"]


async def _kv_get(js: Any, bucket: str, key: str, cls: type) -> Any:
    kv = await js.key_value(bucket)
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    if entry.value is None or entry.operation in ("DEL", "PURGE"):
        return None
    return msgspec.json.decode(entry.value, type=cls)


async def _create_account(ledger: Any, **extra: Any) -> dict[str, Any]:
    body = {"name": "acme", "allowed_sender_domains": ["Example.com"], "tracking": True} | extra
    status, account, _ = await ledger.call("POST", "/v1/accounts", body)
    assert status == 201, account
    return dict(account)


async def test_migrations_apply_once_and_a_second_start_is_harmless(
    start_ledger, database_url
) -> None:
    # two replicas racing on an empty database, then a restart against the migrated one
    first, second = await asyncio.gather(start_ledger(), start_ledger())
    third = await start_ledger()
    conn = await asyncpg.connect(database_url)
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
    finally:
        await conn.close()
    assert versions == [1, 2, 3, 4, 5]
    assert {"accounts", "credentials", "endpoints", "messages", "events", "suppressions"} <= tables
    assert {
        "outbox",
        "schema_migrations",
        "event_ids",
        "dead_letters",
        "postmaster_daily",
    } <= tables
    for ledger in (first, second, third):

        async def ready(ledger: Any = ledger) -> bool:
            status, _, _ = await ledger.call("GET", "/readyz", token=None)
            return status == 200

        await eventually(ready, what="readiness")


async def test_account_and_credential_reach_kv_hashed_never_in_plaintext(start_ledger, js) -> None:
    ledger = await start_ledger()
    account = await _create_account(ledger, postal_api_key="postal-key-123")
    assert account["api_token"].startswith("mgt_")
    assert account["allowed_sender_domains"] == ["example.com"]
    assert account["has_postal_api_key"] is True and "postal_api_key" not in account

    status, cred, _ = await ledger.call(
        "POST",
        f"/v1/accounts/{account['id']}/credentials",
        {"name": "AMS main", "rate_per_second": 50, "allowed_ips": ["10.0.0.0/8"]},
    )
    assert status == 201, cred
    assert set(cred) >= {"username", "password"}

    record = await eventually(
        lambda: _kv_get(js, "credentials", cred["username"], CredentialRecord), what="credential"
    )
    assert record.account_id == account["id"]
    assert record.password_hash != cred["password"] and cred["password"] not in record.password_hash
    assert verify_password(cred["password"], record.password_hash)
    assert not verify_password("wrong", record.password_hash)
    assert record.rate_per_second == 50 and record.allowed_ips == ["10.0.0.0/8"]

    acc = await _kv_get(js, "accounts", account["id"], AccountRecord)
    assert acc.allowed_sender_domains == ["example.com"]
    assert acc.has_postal_api_key and acc.postal_api_key == "postal-key-123"

    status, listed, _ = await ledger.call("GET", f"/v1/accounts/{account['id']}/credentials")
    assert status == 200 and [c["username"] for c in listed["items"]] == [cred["username"]]
    assert "password" not in listed["items"][0] and "password_hash" not in listed["items"][0]

    status, disabled, _ = await ledger.call(
        "DELETE", f"/v1/accounts/{account['id']}/credentials/{cred['username']}"
    )
    assert status == 200 and disabled["disabled"] is True
    record = await _kv_get(js, "credentials", cred["username"], CredentialRecord)
    assert record.disabled is True


async def test_wrong_or_missing_admin_token_is_401_problem_json(start_ledger) -> None:
    ledger = await start_ledger()
    for token in ("not-the-token", None):
        status, body, headers = await ledger.call("GET", "/v1/accounts", token=token)
        assert status == 401
        assert headers["Content-Type"].startswith("application/problem+json")
        assert body["status"] == 401 and body["title"] and body["type"]
    status, body, _ = await ledger.call("GET", "/v1/accounts", token=ADMIN_TOKEN)
    assert status == 200 and body["items"] == []


async def test_bad_input_and_unknown_ids_are_problems(start_ledger) -> None:
    ledger = await start_ledger()
    status, body, headers = await ledger.call("POST", "/v1/accounts", raw=b"{not json")
    assert status == 400 and headers["Content-Type"].startswith("application/problem+json")
    status, body, _ = await ledger.call("POST", "/v1/accounts", {"allowed_sender_domains": []})
    assert status == 400 and "name" in body["detail"]
    status, body, _ = await ledger.call("GET", "/v1/accounts/nope")
    assert status == 404 and body["status"] == 404
    status, body, _ = await ledger.call("GET", "/v1/messages/01J0000000000000000000000")
    assert status == 404


async def test_openapi_document_lists_the_admin_routes(start_ledger) -> None:
    ledger = await start_ledger()
    status, doc, _ = await ledger.call("GET", "/v1/openapi.json", token=None)
    assert status == 200
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/accounts", "/v1/messages/{mailgate_id}", "/v1/email/webhook"):
        assert path in doc["paths"]


async def test_webhook_registration_happy_path_and_kv(start_ledger, js) -> None:
    ledger = await start_ledger()
    account = await _create_account(ledger)
    token = account["api_token"]
    url = "http://127.0.0.1:9/hooks"
    status, hook, _ = await ledger.call(
        "POST", "/v1/email/webhook", {"url": url, "events": ["delivered", "complined"]}, token=token
    )
    assert status == 201, hook
    assert hook["url"] == url and hook["secret"].startswith("whsec_")
    assert hook["events"] == ["delivered", "complained"]

    status, again, _ = await ledger.call("POST", "/v1/email/webhook", {"url": url}, token=token)
    assert status == 200 and again["secret"] == hook["secret"] and again["events"] == []

    status, got, _ = await ledger.call("GET", "/v1/email/webhook", token=token)
    assert status == 200 and got["url"] == url
    assert "secret" not in got["webhooks"][0]

    endpoints = await _kv_get(js, "endpoints", account["id"], AccountEndpoints)
    assert [e.url for e in endpoints.endpoints] == [url]
    assert endpoints.endpoints[0].secret == hook["secret"]

    status, gone, _ = await ledger.call("DELETE", "/v1/email/webhook", {"url": url}, token=token)
    assert status == 200 and gone == {"url": url, "enabled": False}
    endpoints = await _kv_get(js, "endpoints", account["id"], AccountEndpoints)
    assert endpoints.endpoints == []
    status, got, _ = await ledger.call("GET", "/v1/email/webhook", token=token)
    assert got["url"] is None


async def test_webhook_registration_refuses_bad_requests(start_ledger) -> None:
    ledger = await start_ledger()
    account = await _create_account(ledger)
    token = account["api_token"]

    status, body, headers = await ledger.call(
        "POST", "/v1/email/webhook", {"url": "https://example.com/h"}, token="mgt_wrong"
    )
    assert status == 401 and headers["Content-Type"].startswith("application/problem+json")
    status, _, _ = await ledger.call(
        "POST", "/v1/email/webhook", {"url": "https://x.io"}, token=None
    )
    assert status == 401
    status, _, _ = await ledger.call("GET", "/v1/email/webhook", token=ADMIN_TOKEN)
    assert status == 401  # the admin token is not an account token

    status, body, _ = await ledger.call("POST", "/v1/email/webhook", raw=b"{", token=token)
    assert status == 400 and body["detail"]
    status, body, _ = await ledger.call(
        "POST", "/v1/email/webhook", {"url": "ftp://example.com/x"}, token=token
    )
    assert status == 400 and "http" in body["detail"]
    status, body, _ = await ledger.call(
        "POST", "/v1/email/webhook", {"url": "https://example.com", "events": ["x"]}, token=token
    )
    assert status == 400 and "unknown event" in body["detail"]


async def test_private_webhook_urls_are_refused_unless_allowed(start_ledger) -> None:
    async def fake_dns(host: str) -> list[str]:
        return {"internal.example": ["10.1.2.3"], "public.example": ["93.184.216.34"]}[host]

    ledger = await start_ledger(webhook_allow_private=False)
    account = await _create_account(ledger)
    token = account["api_token"]
    for url in ("http://127.0.0.1:8080/h", "http://[::1]/h", "http://169.254.169.254/latest"):
        status, body, _ = await ledger.call("POST", "/v1/email/webhook", {"url": url}, token=token)
        assert status == 400, (url, body)
        assert "private" in body["detail"] or "loopback" in body["detail"]
    status, body, _ = await ledger.call(
        "POST", "/v1/email/webhook", {"url": "http://localhost:9/h"}, token=token
    )
    assert status == 400, body

    resolving = await start_ledger(webhook_allow_private=False, resolver=fake_dns)
    status, body, _ = await resolving.call(
        "POST", "/v1/email/webhook", {"url": "https://internal.example/h"}, token=token
    )
    assert status == 400
    status, body, _ = await resolving.call(
        "POST", "/v1/email/webhook", {"url": "https://public.example/h"}, token=token
    )
    assert status == 201, body


async def test_suppressions_add_list_remove_and_csv(start_ledger, js) -> None:
    ledger = await start_ledger()
    account = await _create_account(ledger)
    path = f"/v1/accounts/{account['id']}/suppressions"
    status, added, _ = await ledger.call("POST", path, {"email": " Ivan@Example.org "})
    assert status == 201 and added["email"] == "ivan@example.org" and added["reason"] == "manual"
    key = suppression_key(account["id"], "ivan@example.org")
    record = await _kv_get(js, "suppressions", key, SuppressionRecord)
    assert record.reason == "manual" and record.account_id == account["id"]

    csv_body = b"email,reason\r\nb@example.org,unsubscribed\r\nc@example.org\r\n"
    status, imported, _ = await ledger.call("POST", path, raw=csv_body, content_type="text/csv")
    assert status == 200 and imported == {"imported": 2, "added": 2, "kv": "syncing"}
    status, bad, _ = await ledger.call("POST", path, raw=b"nope\r\n", content_type="text/csv")
    assert status == 400 and "line 1" in bad["detail"]

    status, page, _ = await ledger.call("GET", path + "?limit=2")
    assert status == 200 and [s["email"] for s in page["items"]] == [
        "b@example.org",
        "c@example.org",
    ]
    status, page2, _ = await ledger.call("GET", path + f"?limit=2&cursor={page['next_cursor']}")
    assert [s["email"] for s in page2["items"]] == ["ivan@example.org"]
    status, csv_out, _ = await ledger.call("GET", path + "?format=csv")
    assert status == 200 and b"b@example.org,unsubscribed," in csv_out

    status, removed, _ = await ledger.call("DELETE", path, {"email": "ivan@example.org"})
    assert status == 200 and removed["deleted"] is True
    assert await _kv_get(js, "suppressions", key, SuppressionRecord) is None
    status, _, _ = await ledger.call("DELETE", path, {"email": "ivan@example.org"})
    assert status == 404


async def test_kv_is_rebuilt_from_postgres_on_restart(start_ledger, js) -> None:
    ledger = await start_ledger()
    account = await _create_account(ledger)
    _, cred, _ = await ledger.call(
        "POST", f"/v1/accounts/{account['id']}/credentials", {"name": "ams"}
    )
    await ledger.call(
        "POST", f"/v1/accounts/{account['id']}/suppressions", {"email": "x@example.org"}
    )
    await ledger.service.stop()

    for bucket in ("credentials", "accounts", "suppressions"):
        kv = await js.key_value(bucket)
        for key in await kv.keys():
            await kv.purge(key)
    kv = await js.key_value("credentials")
    # a stale key (not in Postgres) that the rebuild must delete
    await kv.put("ghost-user", msgspec.json.encode({"username": "ghost-user"}))
    assert await _kv_get(js, "credentials", cred["username"], CredentialRecord) is None

    await start_ledger()
    record = await eventually(
        lambda: _kv_get(js, "credentials", cred["username"], CredentialRecord), what="rebuild"
    )
    assert verify_password(cred["password"], record.password_hash)
    assert (await _kv_get(js, "accounts", account["id"], AccountRecord)).name == "acme"
    key = suppression_key(account["id"], "x@example.org")
    assert (await _kv_get(js, "suppressions", key, SuppressionRecord)).email == "x@example.org"

    async def ghost_gone() -> bool:
        return await _kv_get(js, "credentials", "ghost-user", dict) is None

    await eventually(ghost_gone, what="stale key deleted")


def test_migrate_subcommand_applies_pending_migrations_once(database_url) -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ) | {"DATABASE_URL": database_url, "LOG_LEVEL": "warning"}
    runs = [
        subprocess.run(
            [sys.executable, "-m", "mailgate_ledger", "migrate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for _ in range(2)
    ]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert "5 migration(s) applied: [1, 2, 3, 4, 5]" in runs[0].stdout
    assert "0 migration(s) applied" in runs[1].stdout
