"""The ledger admin API: every route of the OpenAPI document demands its token; one account's
token reaches nothing of another account; SQL injection in every query parameter (and in
path parameters) gives a 4xx or an empty answer, never a 500 and never other rows."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from mailgate_core.ids import new_ulid
from mailgate_core.nats import publish_event
from mailgate_core.schemas import MailAccepted, MessageRef
from mailgate_fakes.testing import eventually
from test_ledger_support import ADMIN_TOKEN, start_ledger

__all__ = ["start_ledger"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
INJECTIONS = [
    "' OR '1'='1",
    "' OR 1=1--",
    '" OR ""="',
    "1; DROP TABLE messages;--",
    "%' OR email LIKE '%",
    "') UNION SELECT * FROM accounts--",
    "\\x00'; SELECT pg_sleep(5)--",
    "$$; SELECT 1; $$",
    "%",
    "_",
]


def routes(document: dict[str, Any]) -> list[tuple[str, str, list[str], list[Any]]]:
    """(method, path, query parameter names, security) of every operation."""
    out = []
    for path, item in document["paths"].items():
        common = item.get("parameters", [])
        for method, op in item.items():
            if method == "parameters":
                continue
            params = [*common, *op.get("parameters", [])]
            query = [p["name"] for p in params if isinstance(p, dict) and p.get("in") == "query"]
            out.append((method.upper(), path, query, op.get("security", document["security"])))
    return out


def concrete(path: str, value: str = "01J0000000000000000000TEST") -> str:
    return re.sub(r"\{[^}]+\}", lambda _m: value, path)


def is_problem(headers: Any, body: Any, status: int) -> bool:
    return (
        headers.get("Content-Type", "").startswith("application/problem+json")
        and isinstance(body, dict)
        and body.get("status") == status
        and bool(body.get("title"))
    )


async def test_every_documented_route_refuses_a_missing_or_wrong_token(start_ledger) -> None:
    ledger = await start_ledger()
    status, served, _ = await ledger.call("GET", "/v1/openapi.json", token=None)
    assert status == 200
    documented = routes(json.loads(DOCS.read_text()))
    live = routes(served)
    assert {(m, p) for m, p, _, _ in documented} <= {(m, p) for m, p, _, _ in live} | {
        (m, p) for m, p, _, _ in documented
    }
    checked = 0
    seen: set[tuple[str, str]] = set()
    for method, path, _query, security in [*documented, *live]:
        if security == [] or (method, path) in seen:
            continue  # the OpenAPI document itself is public
        seen.add((method, path))
        body = {} if method in ("POST", "PATCH", "PUT", "DELETE") else None
        for token in (None, "wrong-token", "Bearer", "x" * 5000):
            status, answer, headers = await ledger.call(method, concrete(path), body, token=token)
            assert status in (401, 403), (method, path, token and token[:10], status)
            assert is_problem(headers, answer, status), (method, path, answer)
        checked += 1
    assert checked >= 25


async def _account(ledger, name: str) -> dict[str, Any]:
    status, account, _ = await ledger.call(
        "POST", "/v1/accounts", {"name": name, "allowed_sender_domains": [f"{name}.example"]}
    )
    assert status == 201, account
    return dict(account)


async def test_one_accounts_token_reaches_nothing_of_another_account(start_ledger) -> None:
    ledger = await start_ledger()
    a, b = await _account(ledger, "alpha"), await _account(ledger, "beta")
    await ledger.call("POST", f"/v1/accounts/{b['id']}/suppressions", {"email": "vip@beta.example"})
    await ledger.call(
        "POST", "/v1/email/webhook", {"url": "http://127.0.0.1:9/beta"}, token=b["api_token"]
    )
    # An account token is not an admin token: no admin route answers it.
    for method, path in (
        ("GET", f"/v1/accounts/{b['id']}"),
        ("GET", f"/v1/accounts/{b['id']}/suppressions"),
        ("GET", f"/v1/accounts/{b['id']}/credentials"),
        ("GET", "/v1/messages?email=vip@beta.example"),
        ("GET", "/v1/accounts"),
        ("POST", f"/v1/accounts/{b['id']}/credentials"),
    ):
        status, answer, headers = await ledger.call(
            method, path, {} if method == "POST" else None, token=a["api_token"]
        )
        assert status in (401, 403) and is_problem(headers, answer, status), (path, answer)
    # Its own webhook routes see only its own endpoints, and cannot remove another's.
    status, mine, _ = await ledger.call("GET", "/v1/email/webhook", token=a["api_token"])
    assert status == 200 and mine["webhooks"] == []
    status, _, _ = await ledger.call(
        "DELETE", "/v1/email/webhook", {"url": "http://127.0.0.1:9/beta"}, token=a["api_token"]
    )
    assert status in (404, 400)
    status, theirs, _ = await ledger.call("GET", "/v1/email/webhook", token=b["api_token"])
    assert [w["url"] for w in theirs["webhooks"]] == ["http://127.0.0.1:9/beta"]


async def test_sql_injection_in_every_query_and_path_parameter(start_ledger, js) -> None:
    ledger = await start_ledger()
    account = await _account(ledger, "gamma")
    await ledger.call(
        "POST", f"/v1/accounts/{account['id']}/suppressions", {"email": "s@gamma.example"}
    )
    for n in range(3):
        mid = new_ulid()
        ref = MessageRef(
            mailgate_id=mid,
            account_id=account["id"],
            recipient=f"r{n}@example.org",
            external_id=f"ext-{n}",
            campaign_id="77",
        )
        await publish_event(
            js,
            MailAccepted(
                message=ref,
                mail_from="a@gamma.example",
                credential="c",
                message_id_header=f"<{mid}@mg.example.net>",
                raw=b"x",
            ),
        )

    async def ingested() -> bool:
        status, page, _ = await ledger.call("GET", "/v1/messages?campaign_id=77")
        return status == 200 and len(page["items"]) == 3

    await eventually(ingested, timeout=20, what="3 messages in the ledger")
    document = json.loads(DOCS.read_text())
    calls = 0
    for method, path, query, security in routes(document):
        if method != "GET" or security == []:
            continue
        token = account["api_token"] if "accountToken" in json.dumps(security) else None
        base = concrete(path, account["id"]) if "{account_id}" in path else concrete(path)
        for payload in INJECTIONS:
            for name in query:
                status, answer, _ = await _get(ledger, base, {name: payload}, token)
                calls += 1
                assert status < 500, (path, name, payload, answer)
                if path == "/v1/messages" and status == 200 and name not in ("limit", "cursor"):
                    assert answer["items"] == [], (name, payload, answer["items"])
            if "{" in path:
                status, answer, _ = await _get(ledger, concrete(path, payload), {}, token)
                calls += 1
                assert status < 500, (path, payload, status, answer)
                if status == 200 and isinstance(answer, dict) and "items" in answer:
                    assert answer["items"] == [], (path, payload, answer)
    assert calls > 100
    status, page, _ = await ledger.call("GET", "/v1/messages?campaign_id=77")
    assert status == 200 and len(page["items"]) == 3  # nothing was dropped


async def _get(ledger, path: str, params: dict[str, str], token: str | None):
    url = "/".join(quote(part, safe="") for part in path.split("/"))
    if params:
        url += "?" + urlencode(params)
    return await ledger.call("GET", url, token=token or ADMIN_TOKEN)


@pytest.mark.parametrize(
    "bomb",
    [b"[" * 20_000 + b"]" * 20_000, b'{"a":' * 8_000 + b"1" + b"}" * 8_000, b"{" * 100_000],
    ids=["deep-array", "deep-object", "unclosed"],
)
async def test_json_bombs_on_write_routes_are_400(start_ledger, bomb: bytes) -> None:
    ledger = await start_ledger()
    account = await _account(ledger, "delta")
    for path, token in (
        ("/v1/accounts", None),
        (f"/v1/accounts/{account['id']}/suppressions", None),
        ("/v1/email/webhook", account["api_token"]),
    ):
        status, answer, headers = await ledger.call(
            "POST", path, raw=bomb, **({"token": token} if token else {})
        )
        assert status == 400 and is_problem(headers, answer, 400), (path, status, answer)
