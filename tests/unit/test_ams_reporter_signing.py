"""Webhook signing, body and SSRF rules of ams-reporter (pure)."""

import base64
import hashlib
import hmac
import json

import pytest
from mailgate_ams_reporter.delivery import DeliveryProgress
from mailgate_ams_reporter.endpoints import EndpointCache
from mailgate_ams_reporter.payload import build_body, wants
from mailgate_ams_reporter.retry import RetryPolicy
from mailgate_ams_reporter.signing import (
    signed_headers,
    signing_key,
    verify_simple,
    verify_standard,
)
from mailgate_ams_reporter.ssrf import is_forbidden_host, is_forbidden_ip
from mailgate_core.records import AccountEndpoints, EndpointRecord
from mailgate_core.schemas import MessageRef, StatusEvent

RAW_KEY = b"0123456789abcdef0123456789abcdef"
WHSEC = "whsec_" + base64.b64encode(RAW_KEY).decode()


def event(name="clicked", external_id="AMS-1", data=None) -> StatusEvent:
    return StatusEvent(
        event_id="01JEVENT000000000000000000",
        name=name,
        timestamp=1539062173,
        data=data if data is not None else {"url": "https://example.com"},
        message=MessageRef(
            mailgate_id="01JMAILGATE000000000000000",
            account_id="acc1",
            recipient="user@example.com",
            external_id=external_id,
            campaign_id="73",
        ),
    )


def endpoint(**kw) -> EndpointRecord:
    return EndpointRecord(id=kw.pop("id", "ep1"), url="https://h.example/hook", secret=WHSEC, **kw)


def test_standard_signature_uses_the_decoded_whsec_key_and_verifies_independently() -> None:
    body = b'{"a":1}'
    headers = signed_headers(WHSEC, "evt1", 1700000000, body)
    expected = base64.b64encode(
        hmac.new(RAW_KEY, b"evt1.1700000000." + body, hashlib.sha256).digest()
    ).decode()
    assert headers["webhook-signature"] == "v1," + expected
    assert headers["webhook-id"] == "evt1"
    assert headers["webhook-timestamp"] == "1700000000"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "mailgate/0.1"


def test_simple_signature_is_the_hex_hmac_of_the_body_with_the_secret_as_shown() -> None:
    body = b'{"a":1}'
    headers = signed_headers(WHSEC, "evt1", 1700000000, body)
    expected = hmac.new(WHSEC.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Mailgate-Signature"] == "sha256=" + expected
    assert verify_simple(WHSEC, headers["X-Mailgate-Signature"], body)
    assert not verify_simple(WHSEC, headers["X-Mailgate-Signature"], body + b" ")


def test_a_secret_without_the_whsec_prefix_is_used_as_utf8_bytes() -> None:
    assert signing_key("plain-secret") == b"plain-secret"
    assert signing_key("whsec_not base64!") == b"whsec_not base64!"
    assert signing_key(WHSEC) == RAW_KEY


def test_verify_standard_accepts_rotation_lists_and_rejects_tampering_and_old_timestamps() -> None:
    body = b'{"x":"y"}'
    headers = signed_headers(WHSEC, "evt2", 1700000000, body)
    assert verify_standard(WHSEC, headers, body, now=1700000010)
    rotated = dict(headers, **{"webhook-signature": "v1,bm9wZQ== " + headers["webhook-signature"]})
    assert verify_standard(WHSEC, rotated, body)
    assert not verify_standard(WHSEC, headers, b'{"x":"z"}')
    assert not verify_standard("whsec_" + base64.b64encode(b"other").decode(), headers, body)
    assert not verify_standard(WHSEC, headers, body, now=1700000000 + 301)
    assert not verify_standard(WHSEC, dict(headers, **{"webhook-id": "evt3"}), body)


def test_body_is_the_spec_shape_plus_ids_and_prefers_the_external_id() -> None:
    body = json.loads(build_body(event(), endpoint()))
    assert body == {
        "message": {
            "id": "AMS-1",
            "mailgate_id": "01JMAILGATE000000000000000",
            "campaign_id": "73",
            "email": "user@example.com",
        },
        "event": {
            "name": "clicked",
            "timestamp": 1539062173,
            "data": {"url": "https://example.com"},
            "id": "01JEVENT000000000000000000",
        },
    }
    without_external = json.loads(build_body(event(external_id=None), endpoint()))
    assert without_external["message"]["id"] == "01JMAILGATE000000000000000"


def test_complained_uses_the_seed_spelling_only_when_the_endpoint_asks() -> None:
    complaint = event(name="complained", data={})
    assert json.loads(build_body(complaint, endpoint()))["event"]["name"] == "complained"
    legacy = endpoint(legacy_complained_spelling=True)
    assert json.loads(build_body(complaint, legacy))["event"]["name"] == "complined"


def test_events_filter_empty_means_all_and_accepts_the_seed_spelling() -> None:
    assert wants(endpoint(), "opened")
    assert wants(endpoint(events=["delivered"]), "delivered")
    assert not wants(endpoint(events=["delivered"]), "opened")
    assert wants(endpoint(events=["complined"]), "complained")
    assert not wants(endpoint(enabled=False), "delivered")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "172.16.5.5",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
        "fc00::1",
        "224.0.0.1",
    ],
)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    assert is_forbidden_ip(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert not is_forbidden_ip(address)


def test_literal_hosts_are_checked_and_names_left_to_the_resolver() -> None:
    assert is_forbidden_host("127.0.0.1", allow_private=False)
    assert is_forbidden_host("[::1]", allow_private=False)
    assert not is_forbidden_host("127.0.0.1", allow_private=True)
    assert not is_forbidden_host("hooks.example.com", allow_private=False)


def test_progress_remembers_done_endpoints_and_stays_bounded() -> None:
    progress = DeliveryProgress(max_events=2)
    progress.mark("e1", "a")
    progress.mark("e1", "b")
    assert progress.done("e1") == {"a", "b"}
    progress.mark("e2", "a")
    progress.mark("e3", "a")
    assert progress.done("e1") == set() and len(progress) == 2
    progress.forget("e3")
    assert progress.done("e3") == set()


def test_retry_delay_grows_and_never_overshoots_the_deadline_much() -> None:
    policy = RetryPolicy(deadline_s=86400, base_s=1.0, max_delay_s=900.0)
    assert 0.5 <= policy.delay_s(1, 1e9) <= 1.0
    assert 256 <= policy.delay_s(10, 1e9) <= 900
    assert policy.delay_s(20, 5.0) <= 5.0


def test_endpoint_cache_applies_puts_deletes_and_ignores_bad_values() -> None:
    cache = EndpointCache(js=None)  # type: ignore[arg-type]
    record = AccountEndpoints(account_id="acc1", endpoints=[endpoint()])
    import msgspec

    cache.apply("acc1", None, msgspec.json.encode(record))
    assert [e.id for e in cache.endpoints("acc1")] == ["ep1"]
    cache.apply("acc1", "DEL", None)
    assert cache.endpoints("acc1") == []
    cache.apply("acc2", None, b"not json")
    assert cache.endpoints("acc2") == [] and len(cache) == 0
