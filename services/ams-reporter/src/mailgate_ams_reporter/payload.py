"""The outbound webhook body (specs/webhooks-out.md) and which endpoints want an event."""

from __future__ import annotations

from typing import Any

import msgspec
from mailgate_core.records import EndpointRecord
from mailgate_core.schemas import StatusEvent

#: The seed's misspelling of "complained"; accepted wherever it is read.
LEGACY_COMPLAINED = "complined"

_encoder = msgspec.json.Encoder()


def canonical_event_name(name: str) -> str:
    """``complined`` (the seed's spelling) -> ``complained``; other names unchanged."""
    name = name.strip().lower()
    return "complained" if name == LEGACY_COMPLAINED else name


def wants(endpoint: EndpointRecord, event_name: str) -> bool:
    """Whether ``endpoint`` is enabled and subscribed to ``event_name`` (empty list = all)."""
    if not endpoint.enabled:
        return False
    if not endpoint.events:
        return True
    wanted = {canonical_event_name(e) for e in endpoint.events}
    return canonical_event_name(event_name) in wanted


def outbound_name(event_name: str, endpoint: EndpointRecord) -> str:
    if event_name == "complained" and endpoint.legacy_complained_spelling:
        return LEGACY_COMPLAINED
    return event_name


def build_body(event: StatusEvent, endpoint: EndpointRecord) -> bytes:
    """The JSON body for one endpoint; key order as in the spec's example."""
    ref = event.message
    body: dict[str, Any] = {
        "message": {
            "id": ref.external_id or ref.mailgate_id,
            "mailgate_id": ref.mailgate_id,
            "campaign_id": ref.campaign_id,
            "email": ref.recipient,
        },
        "event": {
            "name": outbound_name(event.name, endpoint),
            "timestamp": event.timestamp,
            "data": event.data,
        },
    }
    return _encoder.encode(body)
