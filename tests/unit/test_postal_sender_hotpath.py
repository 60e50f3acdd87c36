"""postal-sender's per-message shortcuts: the ack-subject delivery count, the lazily bound
message logger, and the HTTP answer parser fed in arbitrary fragments."""

from __future__ import annotations

import pytest
import structlog
from mailgate_postal_sender.sender import MessageLog, _delivery_count
from nats.aio.msg import Msg


def _msg(reply: str) -> Msg:
    return Msg(_client=None, subject="mail.accepted", reply=reply, data=b"")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("$JS.ACK.MAIL.postal-sender.1.10.10.1732400000000000000.0", 1),
        ("$JS.ACK.MAIL.postal-sender.7.11.25.1732400000000000000.3", 7),
        # The form with a domain and an account hash goes through nats-py's parser.
        ("$JS.ACK.hub.ACCHASH.MAIL.postal-sender.4.12.30.1732400000000000000.0.tok", 4),
    ],
)
def test_the_delivery_count_is_read_from_the_ack_subject(reply: str, expected: int) -> None:
    assert _delivery_count(_msg(reply)) == expected


def test_a_message_without_ack_subject_counts_as_a_first_delivery() -> None:
    assert _delivery_count(_msg("")) == 1


def test_the_message_logger_binds_the_ids_only_when_used() -> None:
    quiet = MessageLog("01ID", "acc", "camp", 2)
    assert quiet._bound is None
    noisy = MessageLog("01ID", "acc", None, 3)
    with structlog.testing.capture_logs() as logs:
        noisy.warning("transient failure; retrying", code="Timeout")
    assert logs == [
        {
            "event": "transient failure; retrying",
            "log_level": "warning",
            "code": "Timeout",
            "mailgate_id": "01ID",
            "account_id": "acc",
            "campaign_id": None,
            "attempt": 3,
        }
    ]
