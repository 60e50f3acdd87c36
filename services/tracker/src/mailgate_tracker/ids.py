"""Event ids the tracker derives instead of drawing at random."""

from __future__ import annotations

import hashlib
import os

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_COUNTER_LIMIT = 1 << 20


def _base32(value: int, pairs: int) -> str:
    """``value`` as ``2 * pairs`` Crockford characters."""
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in range(10 * (pairs - 1), -1, -10)])


class EventIds:
    """ULIDs for opens and clicks, cheap enough for every request (``new_ulid`` draws and
    encodes 80 random bits each time; this is a few string concatenations).

    Layout: the 48-bit millisecond time (10 characters, as in every ULID), 60 random bits
    drawn once (12 characters), then a 20-bit counter (4 characters). The counter keeps ids
    of one process unique; when it runs out, new random bits are drawn. Replicas draw their
    own random bits, so their ids do not collide either (a 2**-60 chance per millisecond).
    Within a millisecond the ids of one process increase (a monotonic ULID).
    """

    def __init__(self) -> None:
        self._ms = -1
        self._counter = 0
        self._random = ""
        self._high = -1
        self._high_text = ""
        self._prefix = ""
        """The time and random characters of the current millisecond (22)."""
        self._reseed()

    def _reseed(self) -> None:
        self._random = _base32(int.from_bytes(os.urandom(8), "big") >> 4, 6)
        self._counter = 0
        self._ms = -1  # the prefix is rebuilt with the new random bits

    def __call__(self, now_s: float) -> str:
        ms = int(now_s * 1000)
        counter = self._counter
        if counter >= _COUNTER_LIMIT:
            self._reseed()
            counter = 0
        if ms != self._ms:
            self._ms = ms
            high = ms >> 20  # the first 28 bits (6 characters) change every ~17 minutes
            if high != self._high:
                self._high = high
                self._high_text = _base32(high, 3)
            self._prefix = (
                self._high_text + _PAIRS[(ms >> 10) & 1023] + _PAIRS[ms & 1023] + self._random
            )
        self._counter = counter + 1
        return self._prefix + _PAIRS[counter >> 10] + _PAIRS[counter & 1023]


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
