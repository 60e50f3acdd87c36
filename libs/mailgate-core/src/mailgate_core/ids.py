"""Identifiers: ULIDs for mailgate ids and event ids.

A ULID sorts by creation time (48-bit milliseconds) and carries 80 random bits, so ids
made on several replicas never collide and list in time order in Postgres and logs.
"""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: Every pair of characters by its 10-bit value: a ULID is 13 pairs (130 bits, top 2 zero).
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_PAIR_SHIFTS = range(120, -1, -10)


def new_ulid(now_ms: int | None = None) -> str:
    """A new 26-character ULID (Crockford base32, upper case)."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _PAIR_SHIFTS])


def is_ulid(text: str) -> bool:
    return len(text) == 26 and all(c in _CROCKFORD for c in text.upper())


def ulid_time_ms(ulid: str) -> int:
    """Milliseconds since the epoch encoded in a ULID."""
    value = 0
    for c in ulid[:10].upper():
        value = value * 32 + _CROCKFORD.index(c)
    return value
