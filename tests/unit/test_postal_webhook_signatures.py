"""webhook-ingest's verification and parsing of Postal webhooks (specs/postal.md §6, §7)."""

import json

import pytest
from mailgate_core.ids import new_ulid
from mailgate_fakes.postal import (
    generate_private_key,
    key_id,
    public_key_b64,
    public_key_pem,
    signature_headers,
)
from mailgate_webhook_ingest.parse import BadWebhook, mailgate_id_from, parse_webhook
from mailgate_webhook_ingest.verify import InvalidKeyError, KeyRing, load_public_keys

KEY = generate_private_key()
OTHER = generate_private_key()
BODY = b'{"event":"MessageSent","timestamp":1.5,"payload":{},"uuid":"u-1"}'


def test_a_sandbox_signature_verifies_with_the_dkim_p_value() -> None:
    ring = KeyRing.from_setting(public_key_b64(KEY))
    verdict = ring.verify(BODY, signature_headers(KEY, BODY))
    assert verdict.ok and verdict.algorithm == "sha256"


def test_the_sandbox_key_is_the_size_postals_installer_makes() -> None:
    assert KEY.key_size == 1024


@pytest.mark.parametrize("bits", [2048, 4096])
def test_a_larger_signing_key_verifies_too(bits: int) -> None:
    """An installation may replace the installer's 1024-bit ``signing.key`` with a larger one."""
    key = generate_private_key(bits)
    ring = KeyRing.from_setting(f"{public_key_b64(KEY)}, {public_key_b64(key)}")
    headers = signature_headers(key, BODY)
    verdict = ring.verify(BODY, headers)
    assert verdict.ok and verdict.algorithm == "sha256"
    assert ring.verify(BODY, {"X-Postal-Signature": headers["X-Postal-Signature"]}).ok
    assert ring.verify(BODY + b" ", headers).reason == "bad_signature"


def test_a_tampered_body_fails() -> None:
    ring = KeyRing.from_setting(public_key_b64(KEY))
    headers = signature_headers(KEY, BODY)
    assert ring.verify(BODY.replace(b"1.5", b"2.5"), headers).reason == "bad_signature"


def test_sha1_only_is_accepted_but_a_bad_sha256_is_not_rescued_by_sha1() -> None:
    ring = KeyRing.from_setting(public_key_pem(KEY))
    headers = signature_headers(KEY, BODY)
    legacy = {"X-Postal-Signature": headers["X-Postal-Signature"]}
    assert ring.verify(BODY, legacy).algorithm == "sha1"
    forged = {
        **headers,
        "X-Postal-Signature-256": signature_headers(OTHER, BODY)["X-Postal-Signature-256"],
    }
    assert not ring.verify(BODY, forged).ok


def test_missing_or_garbled_signatures() -> None:
    ring = KeyRing.from_setting(public_key_b64(KEY))
    assert ring.verify(BODY, {}).reason == "missing_signature"
    assert ring.verify(BODY, {"X-Postal-Signature-256": "%%%"}).reason == "bad_signature"


def test_the_kid_selects_the_key_during_rotation() -> None:
    ring = KeyRing.from_setting(f"{public_key_b64(OTHER)}, {public_key_b64(KEY)}")
    headers = signature_headers(KEY, BODY)
    assert headers["X-Postal-Signature-KID"] == key_id(KEY)
    assert set(ring.by_kid) == {key_id(KEY), key_id(OTHER)}
    assert ring.verify(BODY, headers).ok
    # An unknown KID still tries every trusted key.
    assert ring.verify(BODY, {**headers, "X-Postal-Signature-KID": "0" * 64}).ok


def test_key_formats() -> None:
    dkim = f"v=DKIM1; t=s; h=sha256; p={public_key_b64(KEY)};"
    escaped_pem = public_key_pem(KEY).replace("\n", "\\n")
    for value in (dkim, escaped_pem, public_key_pem(KEY) + public_key_pem(OTHER)):
        keys = load_public_keys(value)
        assert key_id(keys[0]) == key_id(KEY)
    with pytest.raises(InvalidKeyError):
        load_public_keys("not-a-key")
    with pytest.raises(InvalidKeyError):
        load_public_keys(" , ")


def test_mailgate_id_is_read_from_our_message_id_only() -> None:
    mid = new_ulid()
    assert mailgate_id_from(f"{mid}@ours.example", "ours.example") == mid
    assert mailgate_id_from(f"<{mid.lower()}@OURS.example>", "ours.example") == mid
    assert mailgate_id_from(f"{mid}@theirs.example", "ours.example") is None
    assert mailgate_id_from("abc@ours.example", "ours.example") is None
    assert mailgate_id_from(None, "ours.example") is None


def delivery_body(event: str, message_id: str) -> bytes:
    message = {
        "id": 37,
        "token": "Qm3v8d0aZk1L2pXy",
        "direction": "outgoing",
        "message_id": message_id,
        "to": "a@x.com",
        "from": "app@ours.example",
        "subject": "Hi",
        "timestamp": 1.0,
        "spam_status": "NotChecked",
        "tag": "camp-1",
    }
    payload = {
        "message": message,
        "status": "HardFail",
        "details": "d",
        "output": "550 5.1.1 User unknown",
        "sent_with_ssl": True,
        "timestamp": 2.0,
        "time": 0.3,
    }
    return json.dumps(
        {"event": event, "timestamp": 3.0, "payload": payload, "uuid": "uuid-1"}
    ).encode()


def test_a_delivery_event_becomes_a_postal_event() -> None:
    mid = new_ulid()
    event = parse_webhook(
        delivery_body("MessageDeliveryFailed", f"{mid}@ours.example"), "ours.example"
    )
    assert (event.event_id, event.event, event.postal_timestamp) == (
        "uuid-1",
        "MessageDeliveryFailed",
        3.0,
    )
    assert (event.mailgate_id, event.postal_id, event.postal_token) == (mid, 37, "Qm3v8d0aZk1L2pXy")
    assert (event.status, event.output, event.recipient, event.tag) == (
        "HardFail",
        "550 5.1.1 User unknown",
        "a@x.com",
        "camp-1",
    )
    assert event.subject() == "postal.MessageDeliveryFailed"
    assert event.payload["message"]["id"] == 37


def test_a_bounce_names_the_original_message() -> None:
    mid = new_ulid()
    body = json.dumps(
        {
            "event": "MessageBounced",
            "timestamp": 1.0,
            "uuid": "u2",
            "payload": {
                "original_message": {
                    "id": 9,
                    "token": "t",
                    "message_id": f"{mid}@ours.example",
                    "to": "a@x.com",
                },
                "bounce": {"id": 10, "direction": "incoming", "tag": None},
            },
        }
    ).encode()
    event = parse_webhook(body, "ours.example")
    assert (event.mailgate_id, event.postal_id, event.status) == (mid, 9, "Bounced")


def test_server_events_have_no_message() -> None:
    body = (
        b'{"event":"SendLimitExceeded","timestamp":1,"uuid":"u3",'
        b'"payload":{"server":{},"volume":5,"limit":5}}'
    )
    event = parse_webhook(body, "ours.example")
    assert event.mailgate_id is None and event.postal_id is None and event.payload["limit"] == 5


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "bad_json"),
        (b"[]", "bad_shape"),
        (b'{"event":"MessageSent","timestamp":1,"uuid":"u"}', "bad_shape"),
        (b'{"event":"MessageSent","timestamp":1,"uuid":"u","payload":{}}', "bad_shape"),
        (b'{"event":"a.b","timestamp":1,"uuid":"u","payload":{}}', "bad_shape"),
        (b'{"event":"X","timestamp":1,"uuid":"a\\r\\nb","payload":{}}', "bad_shape"),
    ],
)
def test_bodies_that_are_not_postal_webhooks(body: bytes, reason: str) -> None:
    with pytest.raises(BadWebhook) as info:
        parse_webhook(body, "ours.example")
    assert info.value.reason == reason
