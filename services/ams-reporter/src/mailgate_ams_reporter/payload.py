"""The outbound webhook body (specs/webhooks-out.md) and which endpoints want an event.

The body is the seed's format with fields added, never removed: ``message.mailgate_id`` and
``event.id`` (the status event id, equal to the ``webhook-id`` header of a single delivery, so
a receiver of a batch can de-duplicate each item too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
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


def targets(endpoints: Sequence[EndpointRecord], event: StatusEvent) -> list[EndpointRecord]:
    """The endpoints ``event`` goes to: those that want it, or on a replay from the dead
    letters (``endpoint_ids`` set) exactly those endpoints, if still enabled."""
    if event.endpoint_ids:
        wanted = set(event.endpoint_ids)
        return [e for e in endpoints if e.id in wanted and e.enabled]
    return [e for e in endpoints if wants(e, event.name)]


def build_body(event: StatusEvent, endpoint: EndpointRecord) -> bytes:
    """The JSON body for one endpoint; key order as in the spec's example."""
    return _encoder.encode(body_object(event, endpoint))


def body_object(event: StatusEvent, endpoint: EndpointRecord) -> dict[str, Any]:
    ref = event.message
    return {
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
            "id": event.event_id,
        },
    }


def batch_body(items: Sequence[bytes]) -> bytes:
    """A batch: a JSON array of the single-delivery bodies (already encoded)."""
    return b"[" + b",".join(items) + b"]"


def batch_webhook_id(event_ids: Sequence[str]) -> str:
    """A stable ``webhook-id`` for a batch: the same events in the same order, the same id."""
    digest = hashlib.sha256("\n".join(event_ids).encode()).hexdigest()
    return f"batch_{digest[:32]}"
