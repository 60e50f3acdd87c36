"""ledger's pure rules: fact classification, status precedence, ids from Message-IDs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailgate_core import schemas as s
from mailgate_core.ids import new_ulid
from mailgate_ledger.ingest import event_history_json, lock_key
from mailgate_ledger.migrations import load_migrations
from mailgate_ledger.status import (
    STATUS_RANK,
    classify,
    enhanced_code,
    mailgate_id_from_message_id,
    rank,
    smtp_code,
)

REF = s.MessageRef(mailgate_id="01J00000000000000000000000", account_id="a", recipient="r@x.org")


def _postal(event: str, **extra: object) -> s.PostalEvent:
    return s.PostalEvent(event=event, postal_timestamp=1714400000.9, mailgate_id="M", **extra)


@pytest.mark.parametrize(
    ("event", "name", "status"),
    [
        (s.MailSubmitted(message=REF, postal_id=1, postal_token="t"), "sent", "sent"),
        (s.MailFailed(message=REF, reason="rejected"), "failed", "failed"),
        (s.MailSkipped(message=REF, mail_from="f", reason="unsubscribed"), "skipped", "skipped"),
        (_postal("MessageSent", output="250 OK"), "delivered", "delivered"),
        (_postal("MessageDelayed", output="451 4.7.1 later"), "soft_bounced", "soft_bounced"),
        (
            _postal("MessageDeliveryFailed", output="550 5.1.1 unknown"),
            "hard_bounced",
            "hard_bounced",
        ),
        (_postal("MessageDeliveryFailed", output="Too many soft fails"), "failed", "failed"),
        (_postal("MessageBounced"), "hard_bounced", "hard_bounced"),
        (_postal("MessageHeld", details="on the suppression list"), "failed", "failed"),
        (_postal("MessageLoaded"), "postal.MessageLoaded", None),
        (s.TrackOpen(mailgate_id="M"), "opened", "opened"),
        (s.TrackClick(mailgate_id="M", url="https://e.com"), "clicked", "clicked"),
        (s.TrackUnsubscribe(mailgate_id="M"), "unsubscribed", "unsubscribed"),
    ],
)
def test_every_fact_maps_to_its_customer_event(event: s.Event, name: str, status: str) -> None:
    fact = classify(event)
    assert (fact.name, fact.status) == (name, status)


def test_mail_accepted_is_history_only() -> None:
    event = s.MailAccepted(message=REF, mail_from="f", credential="c", message_id_header="<x>")
    fact = classify(event)
    assert fact.name == "accepted" and fact.status is None
    assert fact.mailgate_id == REF.mailgate_id


def test_a_webhook_delivery_is_history_only_with_its_http_result() -> None:
    event = s.WebhookDelivered(
        event_id="wd-st-1-ep1",
        occurred_at=1714400000.5,
        status_event_id="st-1",
        status_name="opened",
        message=REF,
        endpoint_id="ep1",
        url="https://crm.example.com/hook",
        http_status=204,
        attempts=3,
        duration_ms=12.5,
    )
    fact = classify(event)
    assert (fact.name, fact.status, fact.timestamp) == ("webhook_delivered", None, 1714400000.5)
    assert fact.mailgate_id == REF.mailgate_id and not fact.suppresses
    assert fact.data == {
        "endpoint_id": "ep1",
        "url": "https://crm.example.com/hook",
        "http_status": 204,
        "attempts": 3,
        "status_event": "opened",
        "status_event_id": "st-1",
        "duration_ms": 12.5,
    }
    assert event.subject() == "mail.webhook_delivered"
    assert s.decode_subject("mail.webhook_delivered", s.encode(event)) == event


def test_held_and_failed_delivery_say_why() -> None:
    assert classify(_postal("MessageHeld", details="held")).data["reason"] == "held"
    fact = classify(_postal("MessageDeliveryFailed", output="connection refused"))
    assert fact.data["reason"] == "delivery_failed" and not fact.suppresses


def test_only_hard_bounces_complaints_and_unsubscribes_suppress() -> None:
    assert classify(_postal("MessageDeliveryFailed", output="550 no")).suppresses
    assert classify(s.TrackUnsubscribe(mailgate_id="M")).suppresses
    assert not classify(_postal("MessageDelayed", output="451")).suppresses
    assert not classify(s.TrackOpen(mailgate_id="M")).suppresses


def test_postal_facts_carry_postal_time_codes_and_automation_flags() -> None:
    fact = classify(_postal("MessageSent", output="250 2.0.0 OK", postal_id=7))
    assert fact.timestamp == 1714400000.9 and fact.postal_id == 7
    assert fact.data["code"] == "250" and fact.data["enhanced_code"] == "2.0.0"
    assert classify(s.TrackOpen(mailgate_id="M", audience="scanner")).data["automated"] is True
    assert classify(s.TrackOpen(mailgate_id="M", audience="human")).data["automated"] is False
    assert classify(s.TrackClick(mailgate_id="M", url="https://e.com/p")).data["url"] == (
        "https://e.com/p"
    )


def test_status_only_moves_forward() -> None:
    order = ["accepted", "sent", "soft_bounced", "failed", "delivered", "hard_bounced"]
    order += ["opened", "clicked", "unsubscribed", "complained", "skipped"]
    assert sorted(STATUS_RANK, key=rank) == order
    assert rank("delivered") > rank("sent") and rank("clicked") > rank("opened")
    assert set(STATUS_RANK) - {"accepted"} == set(s.STATUS_NAMES)


def test_mailgate_id_is_read_from_our_message_id_only() -> None:
    mid = new_ulid()
    assert mailgate_id_from_message_id(f"<{mid}@mailgate.test>") == mid
    assert mailgate_id_from_message_id(f"{mid.lower()}@x") == mid
    assert mailgate_id_from_message_id("6f0c9a2e-uuid@rp.postal.example.com") is None
    assert mailgate_id_from_message_id(None) is None
    payload = {"message": {"message_id": f"{mid}@mailgate.test"}}
    fact = classify(s.PostalEvent(event="MessageSent", postal_timestamp=1.0, payload=payload))
    assert fact.mailgate_id == mid


@given(st.text())
def test_code_parsers_never_raise(text: str) -> None:
    code = smtp_code(text)
    assert code is None or (len(code) == 3 and code[0] in "245")
    enhanced = enhanced_code(text)
    assert enhanced is None or enhanced[0] in "245"


def test_lock_keys_are_stable_signed_64_bit() -> None:
    key = lock_key("m", "01J")
    assert key == lock_key("m", "01J") and key != lock_key("p", "01J")
    assert -(2**63) <= key < 2**63


def test_history_json_drops_the_raw_message_and_nul_bytes() -> None:
    event = s.MailAccepted(
        message=REF,
        mail_from="f",
        credential="c",
        message_id_header="<x>",
        raw=b"x" * 100,
        subject_line="a\x00b",
    )
    text = event_history_json(event)
    assert '"raw"' not in text and "\\u0000" not in text and '"subject_line":"ab"' in text


def test_migrations_are_shipped_in_order() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations][:1] == [1]
    assert "CREATE TABLE messages" in migrations[0].sql
