"""Facts -> customer status events, and the order in which a message's status may move.

Pure: no I/O. The ledger records every fact it consumes; ``classify`` says what a fact means
for the message history (``name``), which customer event it produces (``status``, one of
design.md's vocabulary, or ``None``), the event's ``data`` and whether the recipient is
suppressed for the account from now on.

Decisions (documented here because Postal's events do not map one to one):

* ``postal.MessageDeliveryFailed`` is Postal's HardFail. When the remote server's output
  carries a 5xx SMTP reply it is ``hard_bounced`` (and the address is suppressed); otherwise
  (too many soft fails, a spam verdict without a 5xx, a connection failure) it is ``failed``
  with ``data.reason = "delivery_failed"``: we could not deliver, but the address is not
  known to be bad.
* ``postal.MessageBounced`` (an asynchronous bounce matched to a sent message) is
  ``hard_bounced``.
* ``postal.MessageHeld`` is ``failed`` with ``data.reason = "held"``.
* ``postal.MessageLoaded`` / ``MessageLinkClicked`` are recorded only: mailgate's tracker
  produces ``opened`` / ``clicked``; emitting Postal's too would count them twice.

A message's status only moves forward by ``STATUS_RANK`` (facts arrive out of order: a
``delivered`` webhook may be consumed before ``mail.submitted``), while every fact still
produces its own customer event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mailgate_core.ids import is_ulid
from mailgate_core.schemas import (
    Event,
    MailAccepted,
    MailFailed,
    MailSkipped,
    MailSubmitted,
    PostalEvent,
    TrackClick,
    TrackOpen,
    TrackUnsubscribe,
)

#: The status a message row has before any customer event applies.
INITIAL_STATUS = "accepted"

#: Precedence of message statuses: a status replaces the current one only when its rank is
#: higher. Delivery outcomes sit above ``sent``; engagement above delivery; ``skipped`` is
#: terminal (a skipped message is never sent). ``failed`` ranks below ``delivered`` because a
#: ``delivered`` webhook is proof from the remote side, whatever our own retries concluded.
STATUS_RANK: dict[str, int] = {
    INITIAL_STATUS: 0,
    "sent": 10,
    "soft_bounced": 20,
    "failed": 25,
    "delivered": 30,
    "hard_bounced": 50,
    "opened": 60,
    "clicked": 70,
    "unsubscribed": 80,
    "complained": 90,
    "skipped": 100,
}

#: Customer events after which the recipient is suppressed for the account.
SUPPRESSING_STATUSES = frozenset({"hard_bounced", "complained", "unsubscribed"})

_SMTP_CODE = re.compile(r"(?<!\d)([245]\d\d)(?!\d)")
_ENHANCED_CODE = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")


@dataclass(frozen=True)
class Fact:
    """What one consumed event means for the ledger."""

    name: str
    """History name shown in the admin API (``accepted``, ``sent``, ``delivered``...)."""
    status: str | None
    """Customer event (``status.<name>``) this fact produces, or ``None``."""
    timestamp: float
    """Unix seconds of the fact (the customer event's ``timestamp``)."""
    data: dict[str, Any] = field(default_factory=dict)
    mailgate_id: str | None = None
    postal_id: int | None = None

    @property
    def suppresses(self) -> bool:
        return self.status in SUPPRESSING_STATUSES


def rank(status: str) -> int:
    return STATUS_RANK.get(status, 0)


def smtp_code(text: str | None) -> str | None:
    """The first SMTP reply code (``550``) in a remote server's output, if any."""
    if not text:
        return None
    match = _SMTP_CODE.search(text)
    return match.group(1) if match else None


def enhanced_code(text: str | None) -> str | None:
    """The first enhanced status code (``5.1.1``) in a remote server's output, if any."""
    if not text:
        return None
    match = _ENHANCED_CODE.search(text)
    return match.group(1) if match else None


def _compact(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None and v != ""}


def _delivery_data(event: PostalEvent) -> dict[str, Any]:
    return _compact(
        {
            "code": smtp_code(event.output),
            "enhanced_code": enhanced_code(event.output),
            "diagnostic": event.output,
            "details": event.details,
            "postal_status": event.status,
        }
    )


def _automated(audience: str) -> bool:
    return audience in ("prefetch", "scanner")


def classify(event: Event) -> Fact:
    """The meaning of ``event`` (any decoded event the ledger consumes)."""
    ts = float(event.occurred_at)
    if isinstance(event, MailAccepted):
        return Fact("accepted", None, ts, {}, event.message.mailgate_id)
    if isinstance(event, MailSkipped):
        return Fact("skipped", "skipped", ts, {"reason": event.reason}, event.message.mailgate_id)
    if isinstance(event, MailSubmitted):
        data = {"postal_id": event.postal_id, "attempts": event.attempts}
        return Fact("sent", "sent", ts, data, event.message.mailgate_id, event.postal_id)
    if isinstance(event, MailFailed):
        data = _compact({"reason": event.reason, "code": event.code, "detail": event.detail})
        data["attempts"] = event.attempts
        return Fact("failed", "failed", ts, data, event.message.mailgate_id)
    if isinstance(event, PostalEvent):
        return _classify_postal(event)
    if isinstance(event, TrackOpen):
        data = _compact(
            {
                "user_agent": event.user_agent,
                "ip": event.ip,
                "audience": event.audience,
                "automated": _automated(event.audience),
            }
        )
        return Fact("opened", "opened", ts, data, event.mailgate_id)
    if isinstance(event, TrackClick):
        data = _compact(
            {
                "url": event.url,
                "user_agent": event.user_agent,
                "ip": event.ip,
                "audience": event.audience,
                "automated": _automated(event.audience),
            }
        )
        return Fact("clicked", "clicked", ts, data, event.mailgate_id)
    if isinstance(event, TrackUnsubscribe):
        data = _compact({"one_click": event.one_click, "user_agent": event.user_agent})
        return Fact("unsubscribed", "unsubscribed", ts, data, event.mailgate_id)
    return Fact(event.subject(), None, ts)  # stats.*: history only


def _classify_postal(event: PostalEvent) -> Fact:
    ts = float(event.postal_timestamp) if event.postal_timestamp > 0 else event.occurred_at
    ids = {"mailgate_id": postal_mailgate_id(event), "postal_id": event.postal_id}
    name = event.event
    if name == "MessageSent":
        return Fact("delivered", "delivered", ts, _delivery_data(event), **ids)
    if name == "MessageDelayed":
        return Fact("soft_bounced", "soft_bounced", ts, _delivery_data(event), **ids)
    if name == "MessageDeliveryFailed":
        data = _delivery_data(event)
        code = data.get("code")
        if code is not None and code.startswith("5"):
            return Fact("hard_bounced", "hard_bounced", ts, data, **ids)
        return Fact("failed", "failed", ts, {"reason": "delivery_failed", **data}, **ids)
    if name == "MessageBounced":
        bounce = event.payload.get("bounce") if isinstance(event.payload, dict) else None
        data = _compact(
            {
                "reason": "bounce",
                "bounce_from": bounce.get("from") if isinstance(bounce, dict) else None,
                "bounce_subject": bounce.get("subject") if isinstance(bounce, dict) else None,
                "details": event.details,
            }
        )
        return Fact("hard_bounced", "hard_bounced", ts, data, **ids)
    if name == "MessageHeld":
        data = _compact({"reason": "held", "details": event.details, "postal_status": "Held"})
        return Fact("failed", "failed", ts, data, **ids)
    return Fact(f"postal.{name}", None, ts, {}, **ids)


def mailgate_id_from_message_id(message_id: object) -> str | None:
    """Our id from a Message-ID we set (``<mailgate_id@DOMAIN>``, brackets optional)."""
    if not isinstance(message_id, str):
        return None
    local, at, _host = message_id.strip().strip("<>").rpartition("@")
    if not at or not is_ulid(local):
        return None
    return local.upper()


def postal_mailgate_id(event: PostalEvent) -> str | None:
    """``event.mailgate_id``, else read from the payload's message (or original message)."""
    if event.mailgate_id:
        return event.mailgate_id
    payload = event.payload if isinstance(event.payload, dict) else {}
    for key in ("message", "original_message"):
        message = payload.get(key)
        if isinstance(message, dict):
            found = mailgate_id_from_message_id(message.get("message_id"))
            if found:
                return found
    return None
