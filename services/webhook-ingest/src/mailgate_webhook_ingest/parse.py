"""Verified webhook body -> ``PostalEvent``: a pure mapping (specs/postal.md §6).

Message events carry Postal's ``M`` hash under ``message`` (``original_message`` for
MessageBounced). Its ``message_id`` is the Message-ID we set, ``<mailgate_id@DOMAIN>``
without brackets, which names our message with no lookup. When it is not ours (a message
sent around mailgate, a Message-ID rewritten on the way) the event still carries Postal's
id and token, which the ledger maps to the message from ``mail.submitted``.

An event name Postal may add in a later version is not dropped: it is published as
``postal.Unknown`` (event ``Unknown``) with ``payload = {"source": "webhook", "event":
<Postal's name>, "payload": <Postal's payload>}``.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from mailgate_core.ids import is_ulid
from mailgate_core.schemas import POSTAL_EVENT_NAMES, PostalEvent

#: Events whose payload is ``D`` = {message: M, status, details, output, ...}.
DELIVERY_EVENTS = frozenset(
    {"MessageSent", "MessageDelayed", "MessageDeliveryFailed", "MessageHeld"}
)
#: Events with a ``message`` but no delivery fields.
TRACKING_EVENTS = frozenset({"MessageLinkClicked", "MessageLoaded"})
#: Published for webhook events we do not know (and inbound mail we do not recognise).
UNKNOWN_EVENT = "Unknown"

# An event name becomes a NATS subject token; a uuid becomes the Nats-Msg-Id header.
_EVENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}$")
_UUID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class BadWebhook(ValueError):
    """The body is not a Postal webhook we understand (answered 400)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Envelope(msgspec.Struct, frozen=True):
    event: str
    timestamp: float
    payload: dict[str, Any]
    uuid: str


_decoder = msgspec.json.Decoder(Envelope)


def mailgate_id_from(message_id: Any, domain: str) -> str | None:
    """``01H...@ours.com`` (or ``<01H...@ours.com>``) -> ``01H...`` when it is ours."""
    if not isinstance(message_id, str):
        return None
    text = message_id.strip().removeprefix("<").removesuffix(">")
    local, at, host = text.rpartition("@")
    if not at or host.lower() != domain.lower() or not is_ulid(local):
        return None
    return local.upper()


def _optional_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _optional_str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def parse_webhook(body: bytes, domain: str) -> PostalEvent:
    """Decode a verified body; raise BadWebhook when it is not a Postal webhook."""
    try:
        envelope = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadWebhook("bad_shape", f"not a Postal webhook: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadWebhook("bad_json", f"body is not JSON: {exc}") from None
    except RecursionError:  # a JSON bomb: thousands of nested objects
        raise BadWebhook("bad_json", "body is nested too deeply") from None
    if not _EVENT_NAME.match(envelope.event):
        raise BadWebhook("bad_shape", "event is not an event name")
    if not _UUID.match(envelope.uuid):
        raise BadWebhook("bad_shape", "uuid is not an identifier")
    payload = envelope.payload
    name = envelope.event
    known = name in POSTAL_EVENT_NAMES

    fields: dict[str, Any] = {}
    message_key = "original_message" if name == "MessageBounced" else "message"
    message = payload.get(message_key)
    needs_message = name in DELIVERY_EVENTS or name in TRACKING_EVENTS or name == "MessageBounced"
    if not known and not isinstance(message, dict):
        message = None
    if message is not None or needs_message:
        if not isinstance(message, dict):
            raise BadWebhook("bad_shape", f"{name} payload has no {message_key} object")
        fields.update(
            mailgate_id=mailgate_id_from(message.get("message_id"), domain),
            postal_id=_optional_int(message.get("id")),
            postal_token=_optional_str(message.get("token")),
            recipient=_optional_str(message.get("to")),
            tag=_optional_str(message.get("tag")),
        )
    if name in DELIVERY_EVENTS:
        fields.update(
            status=_optional_str(payload.get("status")),
            output=_optional_str(payload.get("output")),
            details=_optional_str(payload.get("details")),
        )
    elif name == "MessageBounced":
        fields["status"] = "Bounced"
        bounce = payload.get("bounce")
        if isinstance(bounce, dict) and bounce.get("id") is not None:
            fields["details"] = f"bounce message {bounce.get('id')}"

    if not known:
        return PostalEvent(
            event_id=envelope.uuid,
            event=UNKNOWN_EVENT,
            postal_timestamp=envelope.timestamp,
            details=f"unknown Postal event {name}",
            payload={"source": "webhook", "event": name, "payload": payload},
            **fields,
        )
    return PostalEvent(
        event_id=envelope.uuid,
        event=name,
        postal_timestamp=envelope.timestamp,
        payload=payload,
        **fields,
    )
