"""Bounce classification from real remote replies as Postal reports them (docs/bounces.md)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailgate_core import schemas as s
from mailgate_ledger.bounces import classify_bounce, enhanced_code, smtp_code
from mailgate_ledger.status import classify

PERMANENT = "Permanent SMTP delivery error when sending to mx.example.org (203.0.113.25:25)"
TEMPORARY = "Temporary SMTP delivery error when sending to mx.example.org (203.0.113.25:25)"

GMAIL_NO_SUCH_USER = (
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\n"
    "550-5.1.1 double-checking the recipient's email address for typos or\n"
    "550-5.1.1 unnecessary spaces. For more information, go to\n"
    "550 5.1.1  https://support.google.com/mail/?p=NoSuchUser "
    "a640c23a62f3a-a9a0b2b1c3dsi123456766b.150 - gsmtp"
)
GMAIL_DISABLED = (
    "550-5.2.1 The email account that you tried to reach is inactive. For more\n"
    "550 5.2.1 information, go to https://support.google.com/mail/?p=DisabledUser "
    "5b1f17b1804b1-4311b4a8f9fsi1234567f9.65 - gsmtp"
)
GMAIL_OVER_QUOTA = (
    "452-4.2.2 The recipient's inbox is out of storage space. Please direct the\n"
    "452-4.2.2 recipient to\n"
    "452 4.2.2  https://support.google.com/mail/?p=OverQuotaTemp "
    "d75a77b69052e-45ff1d8f7c2si1234567cf.12 - gsmtp"
)
GMAIL_SPAM = (
    "550-5.7.1 [203.0.113.25      12] Our system has detected that this message is\n"
    "550-5.7.1 likely unsolicited mail. To reduce the amount of spam sent to Gmail,\n"
    "550-5.7.1 this message has been blocked. For more information, go to\n"
    "550 5.7.1  https://support.google.com/mail/?p=UnsolicitedMessageError "
    "41be03b00d2f7-7e6c9f2a1b0si123456a12.301 - gsmtp"
)
GMAIL_UNAUTHENTICATED = (
    "550-5.7.26 This mail has been blocked because the sender is unauthenticated.\n"
    "550-5.7.26 Gmail requires all senders to authenticate with either SPF or DKIM.\n"
    "550 5.7.26 https://support.google.com/mail/answer/81126#authentication - gsmtp"
)
GMAIL_RATE_LIMITED = (
    "421-4.7.0 [203.0.113.25      15] Our system has detected an unusual rate of\n"
    "421-4.7.0 unsolicited mail originating from your IP address. To protect our\n"
    "421 4.7.0 users from spam, mail sent from your IP address has been temporarily "
    "rate limited. - gsmtp"
)
MAILRU_NO_USER = (
    "550 Message was not accepted -- invalid mailbox.  Local mailbox ivan@mail.ru is "
    "unavailable: user not found"
)
MAILRU_DISABLED = (
    "550 Message was not accepted -- invalid mailbox.  Local mailbox ivan@mail.ru is "
    "unavailable: account is disabled"
)
MAILRU_SPAM = (
    "550 spam message rejected. Please visit https://help.mail.ru/notspam-support/id?c="
    "AbCdEf123 or report details to abuse@corp.mail.ru. Error code: 7B1F0E9C. ID: 000000F1."
)
MAILRU_FULL = "552 5.2.2 Mailbox size limit exceeded: ivan@mail.ru"
MAILRU_RATELIMIT = "421 4.7.0 Try again later, too many connections from your IP"
YANDEX_NO_USER = "550 5.7.1 No such user!"
YANDEX_SPAM = (
    "554 5.7.1 [2] Message rejected under suspicion of SPAM; https://ya.cc/1IrBc "
    "1714400000-AbCdEfGhIj-1"
)
YANDEX_DMARC = "550 5.7.1 Email rejected per DMARC policy for example.com 1714400000-Ab-1"
YANDEX_GREYLIST = "451 4.7.1 Sorry, the service is currently unavailable. Please come back later."
YANDEX_FULL = "452 4.2.2 Mailbox size exceeded"
OUTLOOK_ACCESS_DENIED = (
    "550 5.4.1 Recipient address rejected: Access denied. For more information see "
    "https://aka.ms/EXOSmtpErrors [DB5PEPF00014B9B.eurprd02.prod.outlook.com]"
)
POSTFIX_SENDER_REJECTED = "450 4.1.8 <news@example.com>: Sender address rejected: Domain not found"
POSTFIX_SENDER_REJECTED_5 = (
    "550 5.1.8 <news@example.com>: Sender address rejected: Domain not found"
)
SPAMHAUS = (
    "554 5.7.1 Service unavailable; Client host [203.0.113.25] blocked using "
    "zen.spamhaus.org; https://www.spamhaus.org/query/ip/203.0.113.25"
)
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"


@pytest.mark.parametrize(
    ("output", "bounce_class", "category"),
    [
        (GMAIL_NO_SUCH_USER, "hard", "unknown_user"),
        (GMAIL_DISABLED, "hard", "mailbox_disabled"),
        (GMAIL_OVER_QUOTA, "soft", "mailbox_full"),
        (GMAIL_SPAM, "block", "spam"),
        (GMAIL_UNAUTHENTICATED, "block", "authentication"),
        (GMAIL_RATE_LIMITED, "soft", "throttled"),
        (MAILRU_NO_USER, "hard", "unknown_user"),
        (MAILRU_DISABLED, "hard", "mailbox_disabled"),
        (MAILRU_SPAM, "block", "spam"),
        (MAILRU_FULL, "soft", "mailbox_full"),
        (MAILRU_RATELIMIT, "soft", "throttled"),
        (YANDEX_NO_USER, "hard", "unknown_user"),  # 5.7.1, but the text says who is wrong
        (YANDEX_SPAM, "block", "spam"),
        (YANDEX_DMARC, "block", "authentication"),
        (YANDEX_GREYLIST, "soft", "throttled"),
        (YANDEX_FULL, "soft", "mailbox_full"),
        (OUTLOOK_ACCESS_DENIED, "hard", "unknown_user"),
        (POSTFIX_SENDER_REJECTED, "soft", "sender_rejected"),
        (POSTFIX_SENDER_REJECTED_5, "block", "sender_rejected"),
        (SPAMHAUS, "block", "policy"),
        (TOO_BIG, "block", "message_too_large"),
        (
            "550 5.1.2 Host unknown (Name server: example.invalid: host not found)",
            "hard",
            "bad_domain",
        ),
        ("550 Requested action not taken: mailbox unavailable", "hard", "unknown_user"),
        ("550 5.0.0 Rejected", "block", "policy"),
        ("553 5.1.3 Bad recipient address syntax", "hard", "invalid_address"),
        ("550 5.7.9 Something we cannot parse", "block", "authentication"),
        ("554 Transaction failed", "block", "policy"),
        ("450 Requested mail action not taken: mailbox busy", "soft", "temporary"),
        ("550", "hard", "other"),
    ],
)
def test_remote_replies_are_classified(output: str, bounce_class: str, category: str) -> None:
    bounce = classify_bounce(output, PERMANENT)
    assert (bounce.bounce_class, bounce.category) == (bounce_class, category)


@pytest.mark.parametrize(
    ("output", "details", "bounce_class", "category"),
    [
        (
            "",
            "Message is likely spam. Threshold is 5.0 and the message scored 8.4.",
            "block",
            "spam",
        ),
        (
            "",
            "Maximum number of delivery attempts (18) has been reached. Added "
            "ivan@example.org to suppression list because delivery has failed 18 times.",
            "soft",
            "too_many_attempts",
        ),
        (
            "Connection refused - connect(2) for 203.0.113.25:25",
            "No SMTP servers were available for example.org. Tried mx.example.org.",
            "soft",
            "connection",
        ),
        ("", "Message's domain no longer exist", "undetermined", "other"),
        (None, None, "undetermined", "other"),
    ],
)
def test_postal_outcomes_without_an_smtp_reply(
    output: str | None, details: str | None, bounce_class: str, category: str
) -> None:
    bounce = classify_bounce(output, details)
    assert (bounce.bounce_class, bounce.category) == (bounce_class, category)


def test_codes_are_read_from_multi_line_replies() -> None:
    bounce = classify_bounce(GMAIL_NO_SUCH_USER, PERMANENT)
    assert (bounce.code, bounce.enhanced_code) == ("550", "5.1.1")
    assert smtp_code("Connection reset, then 421 later") == "421"
    assert enhanced_code("[203.0.113.25] blocked") is None  # an IP is not a status code
    assert smtp_code("id 12345 - gsmtp") is None


def _failed(output: str, event: str = "MessageDeliveryFailed") -> s.PostalEvent:
    return s.PostalEvent(
        event=event,
        postal_timestamp=1714400000.0,
        mailgate_id="01J00000000000000000000000",
        output=output,
        details=PERMANENT if event == "MessageDeliveryFailed" else TEMPORARY,
        status="HardFail" if event == "MessageDeliveryFailed" else "SoftFail",
    )


@pytest.mark.parametrize(
    ("output", "event", "status", "suppresses"),
    [
        (GMAIL_NO_SUCH_USER, "MessageDeliveryFailed", "hard_bounced", True),
        (YANDEX_NO_USER, "MessageDeliveryFailed", "hard_bounced", True),
        (MAILRU_SPAM, "MessageDeliveryFailed", "soft_bounced", False),
        (GMAIL_UNAUTHENTICATED, "MessageDeliveryFailed", "soft_bounced", False),
        (MAILRU_FULL, "MessageDeliveryFailed", "failed", False),
        (GMAIL_RATE_LIMITED, "MessageDelayed", "soft_bounced", False),
        (GMAIL_NO_SUCH_USER, "MessageDelayed", "soft_bounced", False),  # Postal will retry
    ],
)
def test_bounce_classes_map_to_customer_events(
    output: str, event: str, status: str, suppresses: bool
) -> None:
    fact = classify(_failed(output, event))
    assert fact.status == status and fact.suppresses is suppresses
    assert fact.data["bounce_class"] in ("hard", "soft", "block")
    assert fact.data["diagnostic"] == output and fact.data["details"]


def test_a_mailbox_full_hard_fail_says_why_it_failed() -> None:
    fact = classify(_failed(MAILRU_FULL))
    assert fact.data["reason"] == "delivery_failed"
    assert (fact.data["bounce_class"], fact.data["bounce_category"]) == ("soft", "mailbox_full")
    assert (fact.data["code"], fact.data["enhanced_code"]) == ("552", "5.2.2")


@given(st.text(), st.one_of(st.none(), st.text()))
def test_classification_never_raises(output: str, details: str | None) -> None:
    bounce = classify_bounce(output, details)
    assert bounce.bounce_class in ("hard", "soft", "block", "undetermined")
