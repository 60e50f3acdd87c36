"""AMS mailing progress -> ``stats.ams.mailing`` events (pure)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from mailgate_core.ams import Mailing, RelaySendingState
from mailgate_core.schemas import AmsMailingProgress, AmsRelayState

_SPEED = re.compile(r"^\s*([0-9]+(?:[.,][0-9]+)?)\s*/\s*(sec|s|min|m|hour|h)\w*\s*$", re.I)
_PER_MINUTE = {"s": 60.0, "m": 1.0, "h": 1 / 60.0}


def speed_per_minute(approx_speed: str) -> float:
    """``"120/min"`` -> 120.0; ``"2/sec"`` -> 120.0; anything unreadable -> 0.0."""
    match = _SPEED.match(approx_speed or "")
    if not match:
        return 0.0
    value = float(match.group(1).replace(",", "."))
    return value * _PER_MINUTE[match.group(2)[0].lower()]


def relay_name(relay: RelaySendingState) -> str:
    return relay.name or str(relay.id if relay.id is not None else "?")


def to_event(mailing: Mailing, relays: Sequence[RelaySendingState] = ()) -> AmsMailingProgress:
    p = mailing.progress_info
    return AmsMailingProgress(
        mailing_id=str(mailing.id),
        name=mailing.name,
        state=mailing.state,
        approx_speed_per_min=speed_per_minute(mailing.approx_speed),
        percent_done=p.percent_done,
        total=p.total,
        sent=p.sent,
        not_sent=p.not_sent,
        bad=p.bad,
        refused=p.refused,
        excluded=p.excluded,
        opened=p.opened,
        clicks=p.clicks,
        relays=[
            AmsRelayState(
                relay=relay_name(r), state=r.state, enabled=r.enabled, sent=r.sent, errors=r.errors
            )
            for r in relays
        ],
    )


def same_progress(a: AmsMailingProgress, b: AmsMailingProgress) -> bool:
    """True when two observations differ only in event id and time (nothing to publish)."""
    skip = {"event_id", "occurred_at"}
    return all(getattr(a, f) == getattr(b, f) for f in a.__struct_fields__ if f not in skip)
