"""Reading a JetStream ack subject's ``num_pending`` (how a batch knows more is coming)."""

from __future__ import annotations

from mailgate_ledger.pull import _pending_after


def test_pending_is_read_from_both_ack_subject_forms() -> None:
    assert _pending_after("$JS.ACK.MAIL.ledger-mail.1.2041.2041.1764000000000000000.17") == 17
    assert _pending_after("$JS.ACK.MAIL.ledger-mail.1.2041.2041.1764000000000000000.0") == 0
    v2 = "$JS.ACK.hub.ACCHASH.MAIL.ledger-mail.1.2041.2041.1764000000000000000.5.r4nd0m"
    assert _pending_after(v2) == 5


def test_anything_else_counts_as_nothing_pending() -> None:
    assert _pending_after("") == 0
    assert _pending_after("_INBOX.abc.1") == 0
    assert _pending_after("$JS.ACK.MAIL.ledger-mail.1.2.3.4.x") == 0
