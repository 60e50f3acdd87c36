"""ledger admin API rules that need no server: validation, webhooks, campaign rates, CSV."""

from __future__ import annotations

import asyncio

import pytest
from mailgate_ledger.admin import (
    Problem,
    campaign_stats_view,
    clean_domains,
    clean_email,
    clean_reason,
    parse_suppression_csv,
    token_hash,
    username_for,
)
from mailgate_ledger.openapi import openapi_document
from mailgate_ledger.webhooks import (
    InvalidWebhookRequest,
    canonical_events,
    check_public_host,
    is_forbidden_ip,
    new_secret,
    parse_url,
)


@pytest.mark.parametrize(
    "url", ["ftp://example.com", "example.com/hook", "https://", "javascript:alert(1)", ""]
)
def test_non_http_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidWebhookRequest):
        parse_url(url)


def test_http_urls_give_their_host() -> None:
    assert parse_url("https://Hooks.Example.com:8443/x?y=1") == "hooks.example.com"
    assert parse_url("http://[::1]:80/") == "::1"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
        "fc00::1",
    ],
)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    assert is_forbidden_ip(address)


def test_public_addresses_are_allowed() -> None:
    assert not is_forbidden_ip("93.184.216.34") and not is_forbidden_ip("2606:2800:220:1::1")


def test_a_host_resolving_to_any_private_address_is_refused() -> None:
    async def dns(host: str) -> list[str]:
        return {"mixed.example": ["93.184.216.34", "10.0.0.5"], "ok.example": ["1.1.1.1"]}[host]

    async def run() -> None:
        with pytest.raises(InvalidWebhookRequest, match="private"):
            await check_public_host("mixed.example", dns)
        with pytest.raises(InvalidWebhookRequest, match="private"):
            await check_public_host("127.0.0.1", dns)
        await check_public_host("ok.example", dns)

        async def broken(host: str) -> list[str]:
            raise OSError("no such host")

        with pytest.raises(InvalidWebhookRequest, match="does not resolve"):
            await check_public_host("nx.example", broken)

    asyncio.run(run())


def test_event_names_accept_the_seed_spelling_and_refuse_unknown_ones() -> None:
    assert canonical_events(["Delivered", "complined", "complained"]) == ["delivered", "complained"]
    with pytest.raises(InvalidWebhookRequest):
        canonical_events(["bounced"])


def test_secrets_follow_standard_webhooks() -> None:
    import base64

    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    assert new_secret() != secret


def test_input_cleaning() -> None:
    assert clean_domains(["Example.COM.", "example.com", "mail.example.org"]) == [
        "example.com",
        "mail.example.org",
    ]
    assert clean_email(" Ivan@Example.ORG ") == "ivan@example.org"
    assert clean_reason("complined") == "complained"
    for bad in (lambda: clean_domains(["not a domain"]), lambda: clean_email("nope")):
        with pytest.raises(Problem) as info:
            bad()
        assert info.value.status == 400


def test_usernames_are_kv_safe_and_unique() -> None:
    names = {username_for("AMS main / Прод") for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith("ams-main-") and n.replace("-", "").isalnum() for n in names)
    assert username_for("Прод").startswith("smtp-")


def test_token_hash_is_sha256_hex() -> None:
    assert len(token_hash("mgt_x")) == 64 and token_hash("a") != token_hash("b")


def test_campaign_rates_and_human_versus_machine_engagement() -> None:
    stats = campaign_stats_view(
        "73",
        {"delivered": 6, "opened": 2, "hard_bounced": 1, "skipped": 1},
        {
            ("sent", None): (9, 9),
            ("delivered", None): (8, 8),
            ("opened", None): (5, 2),
            ("opened", "human"): (2, 1),
            ("opened", "machine"): (3, 2),
            ("hard_bounced", None): (1, 1),
            ("hard_bounced", "unknown"): (1, 1),
            ("skipped", None): (1, 1),
        },
        {"opened": 1},
    )
    assert stats["messages"] == 10 and stats["statuses"]["clicked"] == 0
    assert stats["rates"]["delivery_rate"] == round(8 / 9, 4)
    assert stats["rates"]["open_rate"] == 0.25 and stats["rates"]["hard_bounce_rate"] == 0.1111
    assert stats["rates"]["human_open_rate"] == 0.125
    opened = stats["events"]["opened"]
    assert (opened["total"], opened["unique"], opened["unique_non_machine"]) == (5, 2, 1)
    assert opened["by_audience"]["machine"] == {"total": 3, "unique": 2}
    assert opened["by_audience"]["unknown"] == {"total": 0, "unique": 0}
    assert "by_audience" not in stats["events"]["hard_bounced"]
    empty = campaign_stats_view("none", {}, {})
    assert empty["messages"] == 0 and empty["rates"]["delivery_rate"] is None


def test_suppression_csv_import_rows() -> None:
    text = "email,reason\r\nA@x.org,unsubscribed\r\n\r\nb@x.org\r\na@x.org,complined\r\n"
    assert parse_suppression_csv(text) == [("a@x.org", "complained"), ("b@x.org", "manual")]
    with pytest.raises(Problem, match="line 2"):
        parse_suppression_csv("a@x.org\r\nbroken\r\n")


def test_openapi_document_is_json_and_covers_the_contract() -> None:
    import json

    doc = json.loads(json.dumps(openapi_document()))
    assert {
        "/v1/accounts",
        "/v1/accounts/{account_id}/credentials",
        "/v1/messages",
        "/v1/accounts/{account_id}/suppressions",
        "/v1/campaigns/{campaign_id}/stats",
        "/v1/email/webhook",
    } <= set(doc["paths"])
