"""Event ids the tracker derives instead of drawing at random."""

from __future__ import annotations

import hashlib

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

#: Unsubscribes of one message within this window share an event id (under JetStream's
#: 20-minute duplicate window, so the second is dropped by the stream itself).
UNSUBSCRIBE_DEDUPE_WINDOW_S = 600


def unsubscribe_event_id(
    mailgate_id: str, now_s: float, window_s: int = UNSUBSCRIBE_DEDUPE_WINDOW_S
) -> str:
    """A ULID-shaped id fixed per (message, time window): a double click, a retried POST or
    a mail provider's repeated one-click POST becomes one event. A later unsubscribe (after
    the suppression was lifted) falls into another window and counts again."""
    bucket = int(now_s // window_s)
    digest = hashlib.sha256(f"track.unsubscribe:{mailgate_id}:{bucket}".encode()).digest()
    value = (bucket * window_s * 1000) << 80 | int.from_bytes(digest[:10], "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))
