"""webhook-ingest's pure parts for Postal inbound mail and webhooks: ARF reports, route
endpoint posts, mailto unsubscribes, unknown events and the IP allowlist."""

import base64
import json
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailgate_core.tracking import TokenSigner
from mailgate_fakes.postal import ruby_encode64
from mailgate_webhook_ingest.access import is_allowed, parse_networks
from mailgate_webhook_ingest.arf import parse_feedback_report
from mailgate_webhook_ingest.inbound import (
    Complaint,
    MailtoUnsubscribe,
    Unrecognised,
    classify,
    complaint_event,
    parse_post,
    unknown_event,
    unsubscribe_event,
)
from mailgate_webhook_ingest.parse import parse_webhook

DOMAIN = "ours.example"
MID = "01HZY3K9W5B8Q2M4N6P7R8S9T0"
SIGNER = TokenSigner(["s3cret"])


def check_token(token: str) -> str | None:
    payload = SIGNER.verify(token)
    return payload.mailgate_id if payload and payload.kind == "unsubscribe" else None


def arf(original_part: str, feedback_type: str = "abuse") -> bytes:
    return (
        "From: fbl@mail.ru\r\nTo: fbl@ours.example\r\nSubject: FBL report\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report\r\n"
        "--b1\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: Mail.ru-FBL/1.0\r\nVersion: 1\r\n"
        "Original-Rcpt-To: <a@x.com>\r\nArrival-Date: Thu, 25 Apr 2024 14:00:00 +0300\r\n"
        "Source-IP: 192.0.2.1\r\nReported-Domain: ours.example\r\n\r\n"
        f"--b1\r\n{original_part}\r\n--b1--\r\n"
    ).encode()


HEADERS_ONLY = (
    "Content-Type: text/rfc822-headers\r\n\r\n"
    f"Message-ID: <{MID}@ours.example>\r\nX-Postal-MsgID: Qm3v8d0aZk1L2pXy\r\n"
    "From: news@ours.example\r\nTo: a@x.com\r\n"
)
WHOLE_MESSAGE = (
    "Content-Type: message/rfc822\r\n\r\n"
    f"Message-ID: <{MID}@ours.example>\r\nFrom: news@ours.example\r\nTo: a@x.com\r\n"
    "Subject: Sale\r\n\r\nBuy now\r\n"
)


def post_of(raw: bytes, rcpt_to: str = "fbl@ours.example") -> bytes:
    return json.dumps(
        {
            "id": 55,
            "rcpt_to": rcpt_to,
            "mail_from": "fbl@mail.ru",
            "message": ruby_encode64(raw),
            "base64": True,
            "size": len(raw),
        }
    ).encode()


@pytest.mark.parametrize("original", [HEADERS_ONLY, WHOLE_MESSAGE])
def test_an_arf_report_names_our_message(original: str) -> None:
    report = parse_feedback_report(arf(original))
    assert report is not None
    assert report.feedback_type == "abuse"
    assert report.user_agent == "Mail.ru-FBL/1.0"
    assert report.original_rcpt_to == "<a@x.com>"
    assert report.original_message_id == f"<{MID}@ours.example>"


def test_a_forwarded_report_is_found_inside_the_forward() -> None:
    inner = arf(HEADERS_ONLY).decode()
    raw = (
        'From: postmaster@ours.example\r\nContent-Type: multipart/mixed; boundary="f"\r\n\r\n'
        "--f\r\nContent-Type: text/plain\r\n\r\nFYI\r\n"
        f"--f\r\nContent-Type: message/rfc822\r\n\r\n{inner}\r\n--f--\r\n"
    ).encode()
    report = parse_feedback_report(raw)
    assert report is not None and report.original_postal_token == "Qm3v8d0aZk1L2pXy"


def test_ordinary_mail_is_not_a_report() -> None:
    assert parse_feedback_report(b"From: a@b\r\nSubject: hi\r\n\r\nhello\r\n") is None
    multipart_report_without_fields = arf(HEADERS_ONLY).replace(
        b"message/feedback-report", b"text/plain"
    )
    assert parse_feedback_report(multipart_report_without_fields) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_the_arf_parser_never_raises(raw: bytes) -> None:
    parse_feedback_report(raw)
    parse_feedback_report(b'Content-Type: multipart/report; boundary="b"\r\n\r\n--b\r\n' + raw)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=2000),
    st.sampled_from(["application/json", "application/x-www-form-urlencoded"]),
)
def test_the_post_parser_never_raises(body: bytes, content_type: str) -> None:
    post = parse_post(body, content_type)
    classify(post, DOMAIN, check_token)


def test_a_raw_message_post_decodes_rubys_base64_in_json_and_form() -> None:
    raw = b"From: x@y\r\nSubject: hi\r\n\r\n" + b"long line " * 100
    post = parse_post(post_of(raw), "application/json")
    assert (post.format, post.postal_id, post.rcpt_to, post.raw) == (
        "RawMessage",
        55,
        "fbl@ours.example",
        raw,
    )
    form = urllib.parse.urlencode(
        {
            "id": "7",
            "rcpt_to": "u@ours.example",
            "mail_from": "m@x",
            "message": ruby_encode64(raw),
            "base64": "true",
            "size": str(len(raw)),
        }
    ).encode()
    post = parse_post(form, "application/x-www-form-urlencoded")
    assert (post.format, post.postal_id, post.raw) == ("RawMessage", 7, raw)
    plain = json.dumps({"id": 8, "message": "From: x@y\r\n\r\nhi", "base64": False}).encode()
    assert parse_post(plain, "application/json").raw == b"From: x@y\r\n\r\nhi"


def test_a_complaint_event_carries_the_mailgate_id_and_feedback() -> None:
    post = parse_post(post_of(arf(HEADERS_ONLY)), "application/json")
    kind = classify(post, DOMAIN, check_token)
    assert isinstance(kind, Complaint) and kind.mailgate_id == MID
    event = complaint_event(post, kind, now=1.0)
    assert event.subject() == "postal.Complaint"
    assert event.event_id == f"arf-{MID}"
    assert (event.mailgate_id, event.postal_token, event.status, event.recipient) == (
        MID,
        "Qm3v8d0aZk1L2pXy",
        "abuse",
        "a@x.com",
    )
    assert event.postal_timestamp == 1714042800.0
    assert event.payload["feedback"]["source_ip"] == "192.0.2.1"
    assert event.payload["inbound"]["id"] == 55


def test_a_report_about_someone_elses_message_is_an_uncorrelated_complaint() -> None:
    other = HEADERS_ONLY.replace(f"{MID}@ours.example", "abc@elsewhere.example")
    post = parse_post(post_of(arf(other)), "application/json")
    kind = classify(post, DOMAIN, check_token)
    assert isinstance(kind, Complaint) and kind.mailgate_id is None
    assert complaint_event(post, kind, now=1.0).event_id.startswith("arf-")


def unsubscribe_mail(subject: str = "unsubscribe", to: str = "u@ours.example") -> bytes:
    return f"From: Ivan <ivan@x.com>\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n\r\n".encode()


def test_a_mailto_unsubscribe_is_read_from_the_plus_tag() -> None:
    token = SIGNER.make_unsub_token(MID)
    post = parse_post(
        post_of(unsubscribe_mail(), rcpt_to=f"u+{token}@ours.example"), "application/json"
    )
    kind = classify(post, DOMAIN, check_token)
    assert kind == MailtoUnsubscribe(MID, "rcpt_to")
    event = unsubscribe_event(kind, now=1.0)
    assert (event.subject(), event.event_id, event.mailgate_id, event.one_click) == (
        "track.unsubscribe",
        f"mailto-{MID}",
        MID,
        False,
    )


def test_a_mailto_unsubscribe_falls_back_to_the_subject() -> None:
    token = SIGNER.make_unsub_token(MID)
    raw = unsubscribe_mail(subject=f"Re: unsubscribe {token}")
    post = parse_post(post_of(raw, rcpt_to=f"u+{token.lower()}@ours.example"), "application/json")
    assert classify(post, DOMAIN, check_token) == MailtoUnsubscribe(MID, "subject")


def test_a_forged_or_wrong_kind_of_token_is_not_an_unsubscribe() -> None:
    forged = TokenSigner(["other"]).make_unsub_token(MID)
    open_token = SIGNER.make_open_token(MID)
    for token in (forged, open_token):
        post = parse_post(
            post_of(unsubscribe_mail(), rcpt_to=f"u+{token}@ours.example"), "application/json"
        )
        assert classify(post, DOMAIN, check_token) == Unrecognised("not_recognised")
    post = parse_post(
        post_of(unsubscribe_mail(), rcpt_to=f"u+{SIGNER.make_unsub_token(MID)}@ours.example"),
        "application/json",
    )
    assert classify(post, DOMAIN, None) == Unrecognised("not_recognised")


def test_anything_else_is_kept_raw_as_unknown() -> None:
    raw = b"From: someone@x.com\r\nSubject: hello?\r\n\r\nIs anyone there?\r\n"
    post = parse_post(post_of(raw), "application/json")
    kind = classify(post, DOMAIN, check_token)
    assert kind == Unrecognised("not_recognised")
    event = unknown_event(post, kind.reason, now=1.0)
    assert event.subject() == "postal.Unknown"
    assert event.event_id == unknown_event(post, kind.reason, now=2.0).event_id
    assert base64.b64decode(event.payload["message"]) == raw
    assert event.payload["source"] == "inbound"
    hash_post = parse_post(
        json.dumps({"id": 3, "token": "t", "plain_body": "x"}).encode(), "application/json"
    )
    assert classify(hash_post, DOMAIN, check_token) == Unrecognised("hash_format")
    junk = parse_post(b"not json at all", "application/json")
    assert classify(junk, DOMAIN, check_token) == Unrecognised("unreadable")
    assert (
        base64.b64decode(unknown_event(junk, "unreadable", now=1.0).payload["body"])
        == b"not json at all"
    )


def webhook(event: str, payload: dict) -> bytes:
    return json.dumps(
        {"event": event, "timestamp": 1.5, "payload": payload, "uuid": "u-1"}
    ).encode()


def test_an_unknown_webhook_event_is_kept_under_postal_unknown() -> None:
    body = webhook(
        "MessageTeleported",
        {"message": {"id": 9, "token": "tok", "message_id": f"{MID}@{DOMAIN}"}, "x": 1},
    )
    event = parse_webhook(body, DOMAIN)
    assert (event.subject(), event.event_id, event.mailgate_id, event.postal_id) == (
        "postal.Unknown",
        "u-1",
        MID,
        9,
    )
    assert event.payload == {
        "source": "webhook",
        "event": "MessageTeleported",
        "payload": json.loads(body)["payload"],
    }
    server_event = parse_webhook(webhook("ServerExploded", {"server": {"uuid": "s"}}), DOMAIN)
    assert server_event.event == "Unknown" and server_event.mailgate_id is None


def test_a_foreign_message_id_still_carries_postals_id_and_token() -> None:
    payload = {
        "status": "Sent",
        "message": {"id": 41, "token": "Tok41", "message_id": "x@elsewhere", "to": "a@x.com"},
    }
    event = parse_webhook(webhook("MessageSent", payload), DOMAIN)
    assert (event.mailgate_id, event.postal_id, event.postal_token) == (None, 41, "Tok41")


def test_the_allowlist_matches_cidrs_and_mapped_ipv4() -> None:
    nets = parse_networks(["10.0.0.0/8", " 2001:db8::/32", "192.0.2.7"])
    assert is_allowed("10.1.2.3", nets)
    assert is_allowed("::ffff:10.1.2.3", nets)
    assert is_allowed("2001:db8::1", nets)
    assert is_allowed("192.0.2.7", nets)
    assert not is_allowed("192.0.2.8", nets)
    assert not is_allowed(None, nets)
    assert not is_allowed("not-an-ip", nets)
    assert is_allowed("203.0.113.1", [])
    with pytest.raises(ValueError, match=r"10\.0\.0\.300"):
        parse_networks(["10.0.0.300/8"])
