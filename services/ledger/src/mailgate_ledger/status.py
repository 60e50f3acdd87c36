"""Facts -> customer status events, and the order in which a message's status may move.

Pure: no I/O. The ledger records every fact it consumes; ``classify`` says what a fact means
for the message history (``name``), which customer event it produces (``status``, one of
design.md's vocabulary, or ``None``), the event's ``data`` and whether the recipient is
suppressed for the account from now on.

Postal's delivery events go through ``bounces.classify_bounce`` (``docs/bounces.md``):

* ``postal.MessageSent`` is ``delivered``.
* ``postal.MessageDelayed`` (Postal's SoftFail: it will retry) is ``soft_bounced``.
* ``postal.MessageDeliveryFailed`` (Postal's HardFail: no more retries) is ``hard_bounced``
  when the reply says the address is bad (the address is suppressed), ``soft_bounced`` when
  the remote server refused this message or sender (spam, policy, authentication: the
  address is fine), and otherwise ``failed`` with ``data.reason = "delivery_failed"``
  (temporary failures until Postal gave up, connection failures, Postal's own spam check).
* ``postal.MessageBounced`` (an asynchronous bounce matched to a sent message) is
  ``hard_bounced``: Postal's payload carries no diagnostic to say otherwise.
* ``postal.MessageHeld`` is ``failed`` with ``data.reason = "held"``.
* ``postal.Complaint`` (webhook-ingest's reading of a feedback-loop ARF report; ``status`` is
  the feedback type, e.g. ``abuse``) is ``complained`` with ``data.feedback_type``; the
  address is suppressed with reason ``complained``.
* ``postal.Unknown`` (an inbound message webhook-ingest did not recognise) is history only,
  linked to no message (its Postal id is the inbound message's, not one we sent).
* ``postal.MessageLoaded`` / ``MessageLinkClicked`` are recorded only: mailgate's tracker
  produces ``opened`` / ``clicked``; emitting Postal's too would count them twice.
* ``mail.webhook_dead_lettered`` (ams-reporter gave up on an endpoint) is history only; the
  ledger also keeps it as a replayable dead letter.
* ``mail.webhook_delivered`` (ams-reporter delivered a status event to an endpoint) is
  history only.

A message's status only moves forward by ``STATUS_RANK`` (facts arrive out of order: a
``delivered`` webhook may be consumed before ``mail.submitted``), while every fact still
produces its own customer event.
"""

from __future__ import annotations

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
    StatusName,
    TrackClick,
    TrackOpen,
    TrackUnsubscribe,
    WebhookDeadLettered,
    WebhookDelivered,
)

from .bounces import Bounce, classify_bounce, enhanced_code, smtp_code

__all__ = ["enhanced_code", "smtp_code"]

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

#: Delivery outcomes a message has at most once. Two sources can report the same outcome under
#: different event ids (postal-sender's reconciler, then Postal's late webhook): the ledger
#: records both facts but emits the customer event only for the first.
ONCE_PER_MESSAGE = frozenset({"delivered", "hard_bounced", "failed"})

#: Customer events after which the recipient is suppressed for the account.
SUPPRESSING_STATUSES = frozenset({"hard_bounced", "complained", "unsubscribed"})


@dataclass(frozen=True)
class Fact:
    """What one consumed event means for the ledger."""

    name: str
    """History name shown in the admin API (``accepted``, ``sent``, ``delivered``...)."""
    status: StatusName | None
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


def _compact(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None and v != ""}


def _delivery_data(event: PostalEvent, bounce: Bounce | None = None) -> dict[str, Any]:
    return _compact(
        {
            "code": bounce.code if bounce else smtp_code(event.output),
            "enhanced_code": bounce.enhanced_code if bounce else enhanced_code(event.output),
            "bounce_class": bounce.bounce_class if bounce else None,
            "bounce_category": bounce.category if bounce else None,
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
        data: dict[str, Any] = {"postal_id": event.postal_id, "attempts": event.attempts}
        return Fact("sent", "sent", ts, data, event.message.mailgate_id, event.postal_id)
    if isinstance(event, MailFailed):
        data = _compact({"reason": event.reason, "code": event.code, "detail": event.detail})
        data["attempts"] = event.attempts
        return Fact("failed", "failed", ts, data, event.message.mailgate_id)
    if isinstance(event, PostalEvent):
        return _classify_postal(event)
    if isinstance(event, TrackOpen | TrackClick):
        data = _compact(
            {
                "url": event.url if isinstance(event, TrackClick) else None,
                "user_agent": event.user_agent,
                "ip": event.ip,
                "audience": event.audience,
                "audience_reason": getattr(event, "audience_reason", None),
                "automated": _automated(event.audience),
            }
        )
        name: StatusName = "clicked" if isinstance(event, TrackClick) else "opened"
        return Fact(name, name, ts, data, event.mailgate_id)
    if isinstance(event, TrackUnsubscribe):
        data = _compact(
            {"one_click": event.one_click, "user_agent": event.user_agent, "ip": event.ip}
        )
        return Fact("unsubscribed", "unsubscribed", ts, data, event.mailgate_id)
    if isinstance(event, WebhookDeadLettered):
        data = _compact(
            {
                "endpoint_id": event.endpoint_id,
                "url": event.url,
                "status_event": event.status.name,
                "status_event_id": event.status.event_id,
                "attempts": event.attempts,
                "reason": event.reason,
                "http_status": event.http_status,
            }
        )
        return Fact("webhook_dead_lettered", None, ts, data, event.status.message.mailgate_id)
    if isinstance(event, WebhookDelivered):
        data = {
            "endpoint_id": event.endpoint_id,
            "url": event.url,
            "status_event": event.status_name,
            "status_event_id": event.status_event_id,
            "attempts": event.attempts,
            "http_status": event.http_status,
            "duration_ms": event.duration_ms,
        }
        return Fact("webhook_delivered", None, ts, data, event.message.mailgate_id)
    return Fact(event.subject(), None, ts)  # stats.*: history only


def _classify_postal(event: PostalEvent) -> Fact:
    ts = float(event.postal_timestamp) if event.postal_timestamp > 0 else event.occurred_at
    mailgate_id, postal_id = postal_mailgate_id(event), event.postal_id
    name = event.event
    if name == "MessageSent":
        return Fact("delivered", "delivered", ts, _delivery_data(event), mailgate_id, postal_id)
    if name == "MessageDelayed":
        bounce = classify_bounce(event.output, event.details)
        return Fact(
            "soft_bounced",
            "soft_bounced",
            ts,
            _delivery_data(event, bounce),
            mailgate_id,
            postal_id,
        )
    if name == "MessageDeliveryFailed":
        bounce = classify_bounce(event.output, event.details)
        data = _delivery_data(event, bounce)
        if bounce.bounce_class == "hard":
            return Fact("hard_bounced", "hard_bounced", ts, data, mailgate_id, postal_id)
        if bounce.bounce_class == "block":
            return Fact("soft_bounced", "soft_bounced", ts, data, mailgate_id, postal_id)
        return Fact(
            "failed", "failed", ts, {"reason": "delivery_failed", **data}, mailgate_id, postal_id
        )
    if name == "MessageBounced":
        report = event.payload.get("bounce") if isinstance(event.payload, dict) else None
        data = _compact(
            {
                "reason": "bounce",
                "bounce_class": "hard",
                "bounce_category": "async_bounce",
                "bounce_from": report.get("from") if isinstance(report, dict) else None,
                "bounce_subject": report.get("subject") if isinstance(report, dict) else None,
                "details": event.details,
            }
        )
        return Fact("hard_bounced", "hard_bounced", ts, data, mailgate_id, postal_id)
    if name == "Complaint":
        data = _compact({"feedback_type": event.status, "details": event.details})
        return Fact("complained", "complained", ts, data, mailgate_id, postal_id)
    if name == "Unknown":
        return Fact("postal.Unknown", None, ts, {})
    if name == "MessageHeld":
        data = _compact({"reason": "held", "details": event.details, "postal_status": "Held"})
        return Fact("failed", "failed", ts, data, mailgate_id, postal_id)
    return Fact(f"postal.{name}", None, ts, {}, mailgate_id, postal_id)


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
