"""The reconciler's pure part: Postal's messages API answers -> postal.* facts."""

import msgspec
from mailgate_postal_sender.client import Answered, Deferred, NoAnswer
from mailgate_postal_sender.pending import PendingRecord
from mailgate_postal_sender.reconcile import (
    Found,
    NotFound,
    Unavailable,
    facts_from_postal,
    is_same_message,
    read_answer,
)

MID = "01HZY3K9W5B8Q2M4N6P7R8S9T0"
RECORD = PendingRecord(
    mailgate_id=MID,
    postal_id=37171,
    token="Qm3v8d0aZk1L2pXy",
    recipient="a@x.com",
    account_id="acc1",
    submitted_at=1714399990.0,
)


def message(status: str) -> dict:
    return {
        "id": 37171,
        "token": "Qm3v8d0aZk1L2pXy",
        "status": {"status": status, "last_delivery_attempt": 1714400000.1, "held": False},
        "details": {
            "rcpt_to": "a@x.com",
            "mail_from": "bounces@ours.example",
            "subject": "Hi",
            "message_id": f"{MID}@ours.example",
            "timestamp": 1714399990.5,
            "direction": "outgoing",
            "tag": "camp-7",
        },
    }


def delivery(ident: int, status: str, output: str = "", ts: float = 1714400000.0) -> dict:
    return {
        "id": ident,
        "status": status,
        "details": f"{status} details",
        "output": output,
        "sent_with_ssl": True,
        "log_id": "ABCD",
        "time": 0.2,
        "timestamp": ts,
    }


def test_a_sent_message_becomes_one_message_sent_with_a_deterministic_id() -> None:
    deliveries = [
        delivery(1, "SoftFail", "451 later", 1714400000.0),
        delivery(2, "Sent", "250 OK", 1714400300.0),
    ]
    (event,) = facts_from_postal(RECORD, message("Sent"), deliveries, now=1714500000.0)
    assert event.subject() == "postal.MessageSent"
    assert event.event_id == f"rec-{MID}-Sent"
    assert (event.mailgate_id, event.postal_id, event.postal_token) == (
        MID,
        37171,
        "Qm3v8d0aZk1L2pXy",
    )
    assert (event.status, event.output, event.recipient, event.tag) == (
        "Sent",
        "250 OK",
        "a@x.com",
        "camp-7",
    )
    assert event.postal_timestamp == 1714400300.0
    assert event.payload["reconciled"] is True
    assert event.payload["message"]["message_id"] == f"{MID}@ours.example"
    again = facts_from_postal(RECORD, message("Sent"), deliveries, now=1714600000.0)
    assert [e.event_id for e in again] == [event.event_id]


def test_a_hard_fail_keeps_the_smtp_output_for_the_ledger() -> None:
    deliveries = [delivery(1, "HardFail", "550 5.1.1 User unknown")]
    (event,) = facts_from_postal(RECORD, message("HardFail"), deliveries, now=1.0)
    assert event.event == "MessageDeliveryFailed"
    assert event.output == "550 5.1.1 User unknown"
    assert event.payload["output"] == "550 5.1.1 User unknown"


def test_a_bounced_message_yields_the_delivery_and_the_bounce_in_order() -> None:
    deliveries = [delivery(1, "Sent", "250 OK", 10.0), delivery(2, "Bounced", "", 20.0)]
    events = facts_from_postal(RECORD, message("Bounced"), deliveries, now=30.0)
    assert [e.event for e in events] == ["MessageSent", "MessageBounced"]
    assert events[1].payload["original_message"]["id"] == 37171
    assert events[1].event_id == f"rec-{MID}-Bounced"


def test_a_cancelled_hold_is_reported_as_held() -> None:
    deliveries = [delivery(1, "Held"), delivery(2, "HoldCancelled")]
    (event,) = facts_from_postal(RECORD, message("HoldCancelled"), deliveries, now=1.0)
    assert event.event == "MessageHeld"


def test_without_delivery_rows_the_status_expansion_is_used() -> None:
    (event,) = facts_from_postal(RECORD, message("Sent"), [], now=5.0)
    assert (event.event, event.postal_timestamp) == ("MessageSent", 1714400000.1)


def test_a_message_still_in_flight_is_not_final() -> None:
    for status in ("Pending", "SoftFail"):
        assert facts_from_postal(RECORD, message(status), [delivery(1, "SoftFail")], now=1) is None


def test_an_answer_about_another_message_is_recognised() -> None:
    assert is_same_message(RECORD, message("Sent"))
    assert not is_same_message(RECORD, {**message("Sent"), "token": "otherotherother1"})
    no_token = {k: v for k, v in message("Sent").items() if k != "token"}
    assert is_same_message(RECORD, no_token)
    no_token["details"] = {"message_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ@ours.example"}
    assert not is_same_message(RECORD, no_token)


def envelope(status: str, data: object) -> bytes:
    return msgspec.json.encode({"status": status, "time": 0.01, "flags": {}, "data": data})


def test_read_answer_tells_found_not_found_and_unavailable_apart() -> None:
    assert read_answer(Answered(200, envelope("success", {"id": 1}))) == Found({"id": 1})
    not_found = envelope("error", {"code": "MessageNotFound", "message": "No message", "id": 9})
    assert read_answer(Answered(200, not_found)) == NotFound()
    assert read_answer(Answered(502, b"Bad Gateway")) == Unavailable("HTTP502")
    assert read_answer(Answered(200, b"<html>")) == Unavailable("BadResponse", "not JSON")
    assert read_answer(NoAnswer(TimeoutError(), True)).code == "Timeout"
    assert read_answer(Deferred()) == Unavailable("CircuitOpen")
    bad_key = envelope("error", {"code": "InvalidServerAPIKey", "message": "not valid"})
    assert read_answer(Answered(200, bad_key)) == Unavailable("InvalidServerAPIKey", "not valid")
