"""Signed tracking tokens: what goes into open-pixel, click and unsubscribe URLs.

A token is ``base64url_nopad(data || mac)`` where::

    data = version || kind (b"o" open, b"c" click, b"u" unsubscribe) || id || target URL
           (UTF-8, clicks only)
    id   = version 2: the mailgate id as its 16-byte binary ULID (canonical upper-case ULIDs)
           version 1: len(mailgate_id) (1 byte) || mailgate_id (UTF-8) (any other id)
    mac  = HMAC-SHA256(secret, b"mailgate-track\\x00" || data)[:16]

Version 2 saves 10 bytes (13 URL characters) on every link of every message; version 1
tokens still verify. The MAC is truncated to 16 bytes (128 bits: far beyond online
guessing). The secret is the UTF-8 bytes of one ``TRACKING_SECRET`` entry; with several
(comma-separated) the first signs and every one verifies, so a secret can be rotated without
breaking links already sent. smtp-ingest makes the links and tracker verifies them, both
through this module.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import importlib
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, Protocol

TokenKind = Literal["open", "click", "unsubscribe"]

VERSION = 2
"""The version new tokens get when the mailgate id is a ULID (else ``VERSION_TEXT_ID``)."""
VERSION_TEXT_ID = 1
MAC_BYTES = 16
ULID_BYTES = 16
MAX_TOKEN_CHARS = 4096
_DOMAIN = b"mailgate-track\x00"
_KIND_BYTE: dict[str, bytes] = {"open": b"o", "click": b"c", "unsubscribe": b"u"}
_BYTE_KIND: dict[int, TokenKind] = {ord("o"): "open", ord("c"): "click", ord("u"): "unsubscribe"}
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: Every pair of characters <-> its 10-bit value: a ULID is 13 pairs (130 bits, top 2 zero).
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_PAIR_VALUE = {pair: i for i, pair in enumerate(_PAIRS)}
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_URLSAFE_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: ``_URLSAFE_TO_STANDARD`` for ``verify_details``: every byte that is not base64url (``+``,
#: ``/`` and ``=`` included) becomes ``!``, which strict base64 decoding refuses.
_URLSAFE_STRICT = bytes(
    b"+"[0] if i == b"-"[0] else b"/"[0] if i == b"_"[0] else i if i in _URLSAFE_CHARS else 33
    for i in range(256)
)
#: The ``=`` padding a base64 text of ``len % 4`` characters lacks.
_PADDING = (b"", b"===", b"==", b"=")
_compare_digest = hmac.compare_digest
_b2a_base64 = binascii.b2a_base64
_STANDARD_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_VERSION_BYTE = bytes([VERSION])


class _MacState(Protocol):
    def copy(self) -> _MacState: ...
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


def _keyed(key: bytes) -> _MacState:
    """HMAC-SHA256 under ``key`` with the domain prefix already absorbed; copied per MAC
    instead of re-keyed (the key schedule is done once). OpenSSL's HMAC object itself when
    there is one: ``hmac.HMAC.copy`` adds a Python layer costing more than the MAC."""
    try:
        from _hashlib import hmac_new
    except ImportError:  # pragma: no cover - CPython built without OpenSSL
        return hmac.new(key, _DOMAIN, hashlib.sha256)
    return hmac_new(key, _DOMAIN, "sha256")


_SHA256_BLOCK = 64
_IPAD = bytes(i ^ 0x36 for i in range(256))
_OPAD = bytes(i ^ 0x5C for i in range(256))


def _signing_pads(key: bytes) -> tuple[_MacState, _MacState]:
    """HMAC-SHA256 (RFC 2104) under ``key`` as its two padded hash states, the inner one
    with the domain prefix absorbed: ``HMAC(key, _DOMAIN || data)`` is
    ``outer.copy().update(inner.copy().update(data).digest()).digest()``. The hash is
    CPython's own SHA-256 where there is one: copying its state is a struct copy, where
    copying an OpenSSL HMAC (``_keyed``) allocates and wipes contexts, the larger part of
    signing a token (a campaign copy signs one per link)."""
    plain_sha256: Callable[[bytes], _MacState] = hashlib.sha256
    for name in ("_sha256", "_sha2"):  # CPython 3.11, 3.12+
        try:
            plain_sha256 = importlib.import_module(name).sha256
            break
        except (ImportError, AttributeError):  # pragma: no cover - other builds
            continue
    if len(key) > _SHA256_BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_SHA256_BLOCK, b"\0")
    inner = plain_sha256(key.translate(_IPAD))
    inner.update(_DOMAIN)
    return inner, plain_sha256(key.translate(_OPAD))


def _ulid_bytes(mailgate_id: str) -> bytes | None:
    """The 16 bytes of a canonical (upper-case, 26-char, <= 128-bit) ULID, else ``None``."""
    if len(mailgate_id) != 26:
        return None
    value = 0
    for i in range(0, 26, 2):
        pair = _PAIR_VALUE.get(mailgate_id[i : i + 2])
        if pair is None:
            return None
        value = (value << 10) | pair
    if value >> 128:
        return None
    return value.to_bytes(ULID_BYTES, "big")


def _spread_step(lane_bits: int, half_bits: int) -> tuple[int, int]:
    """(mask of the upper half of the low ``2 * half_bits`` of every ``lane_bits`` lane of
    256 bits, the factor that moves those bits up to the next half lane: ``x + h * f`` is
    ``x - h + (h << lane_bits // 2 - half_bits)``)."""
    upper = ((1 << half_bits) - 1) << half_bits
    mask = sum(upper << (lane_bits * i) for i in range(256 // lane_bits))
    return mask, (1 << (lane_bits // 2 - half_bits)) - 1


#: Spreads 32 groups of 5 bits into 32 bytes, one group per byte, in five steps (160 bits
#: into two 128-bit lanes, 80 into 64-bit lanes, ... 10 bits into two bytes).
_SPREAD = tuple(_spread_step(lane, lane * 5 // 16) for lane in (256, 128, 64, 32, 16))
_GROUP_TO_CROCKFORD = _CROCKFORD.encode().ljust(256, b"!")


def _ulid_text(raw: bytes) -> str:
    """The 26 characters of a 16-byte ULID (130 bits, the top 2 zero)."""
    return _ulid_text_of(int.from_bytes(raw, "big"))


def _ulid_text_of(x: int) -> str:
    """``_ulid_text`` of the ULID's value: every 5-bit group moved into its own byte by a few
    whole-integer steps, then one ``translate``."""
    (m1, f1), (m2, f2), (m3, f3), (m4, f4), (m5, f5) = _SPREAD
    x += (x & m1) * f1
    x += (x & m2) * f2
    x += (x & m3) * f3
    x += (x & m4) * f4
    x += (x & m5) * f5
    return x.to_bytes(32, "big")[6:].translate(_GROUP_TO_CROCKFORD).decode("ascii")


class TokenPayload(NamedTuple):
    """What a verified token says (a named tuple: made on every tracked request)."""

    kind: TokenKind
    mailgate_id: str
    url: str | None = None


#: ``TokenPayload(...)`` without the named tuple's Python-level ``__new__``.
_new_tuple = tuple.__new__

TokenDetails = tuple[TokenKind, str, str | None, int | None]
"""What ``TokenSigner.verify_details`` returns: (kind, mailgate id, URL (clicks) or ``None``,
the acceptance time in unix milliseconds from a version-2 token's ULID, else ``None``)."""


class TokenError(ValueError):
    """A token cannot be made from these values."""


def _b64decode(token: str) -> bytes | None:
    try:
        raw = token.encode("ascii")
        # base64.urlsafe_b64decode without its Python layers (same result, same errors)
        return binascii.a2b_base64(raw.translate(_URLSAFE_TO_STANDARD) + b"=" * (-len(raw) % 4))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None


class TokenSigner:
    """Makes and verifies tokens with the first of ``secrets`` signing, all verifying."""

    def __init__(self, secrets: Sequence[str | bytes]) -> None:
        keys = [s.encode() if isinstance(s, str) else bytes(s) for s in secrets]
        keys = [k for k in keys if k]
        if not keys:
            raise ValueError("at least one non-empty tracking secret is required")
        self._states = [_keyed(k) for k in keys]
        self._signing = _signing_pads(keys[0])
        self._packed_for: tuple[str, bytes | None] = ("", None)

    @staticmethod
    def _mac(keyed: _MacState, data: bytes) -> bytes:
        """``HMAC-SHA256(key, _DOMAIN || data)[:MAC_BYTES]``."""
        mac = keyed.copy()
        mac.update(data)
        return mac.digest()[:MAC_BYTES]

    def _packed(self, mailgate_id: str) -> bytes | None:
        """``_ulid_bytes`` of the id, remembered for the last id: a copy's tokens (pixel,
        unsubscribe, every link) are all made for one recipient's id in a row."""
        last_id, last = self._packed_for
        if mailgate_id == last_id and last_id:
            return last
        packed = _ulid_bytes(mailgate_id)
        self._packed_for = (mailgate_id, packed)
        return packed

    def _make(self, kind: TokenKind, mailgate_id: str, url: str = "") -> str:
        return self._make_bytes(_KIND_BYTE[kind], mailgate_id, url.encode()).decode("ascii")

    def _make_bytes(self, kind: bytes, mailgate_id: str, url: bytes) -> bytes:
        """The token as ASCII bytes: ``base64.urlsafe_b64encode(data || mac)`` without its
        ``=`` padding, with the ``base64`` module's Python layers left out (the same C
        calls)."""
        packed = self._packed(mailgate_id)
        if packed is not None:
            data = _VERSION_BYTE + kind + packed + url
        else:
            mid = mailgate_id.encode()
            if not mid or len(mid) > 255:
                raise TokenError("mailgate_id must be 1..255 bytes")
            data = bytes([VERSION_TEXT_ID]) + kind + bytes([len(mid)]) + mid + url
        inner_pad, outer_pad = self._signing
        inner = inner_pad.copy()
        inner.update(data)
        outer = outer_pad.copy()
        outer.update(inner.digest())
        raw = data + outer.digest()[:MAC_BYTES]
        return _b2a_base64(raw, newline=False).translate(_STANDARD_TO_URLSAFE).rstrip(b"=")

    def sign_clicks(self, mailgate_id: str, urls: Sequence[bytes]) -> list[bytes]:
        """``[click_token_bytes(mailgate_id, url.decode()) for url in urls]`` for UTF-8
        ``urls``, in one loop: a campaign copy signs tens of links for one id."""
        packed = self._packed(mailgate_id)
        if packed is None or not all(urls):
            return [self.click_token_bytes(mailgate_id, url.decode()) for url in urls]
        head = _VERSION_BYTE + b"c" + packed
        inner_pad, outer_pad = self._signing
        tokens = []
        for url in urls:
            data = head + url
            inner = inner_pad.copy()
            inner.update(data)
            outer = outer_pad.copy()
            outer.update(inner.digest())
            raw = data + outer.digest()[:MAC_BYTES]
            tokens.append(
                _b2a_base64(raw, newline=False).translate(_STANDARD_TO_URLSAFE).rstrip(b"=")
            )
        return tokens

    def click_token_bytes(self, mailgate_id: str, url: str) -> bytes:
        """``make_click_token(mailgate_id, url).encode()`` (what a rendered body holds),
        without the text round trip: a campaign message makes one per link per copy."""
        if not url:
            raise TokenError("a click token needs a URL")
        return self._make_bytes(b"c", mailgate_id, url.encode())

    def make_open_token(self, mailgate_id: str) -> str:
        return self._make("open", mailgate_id)

    def make_click_token(self, mailgate_id: str, url: str) -> str:
        if not url:
            raise TokenError("a click token needs a URL")
        return self._make("click", mailgate_id, url)

    def make_unsub_token(self, mailgate_id: str) -> str:
        return self._make("unsubscribe", mailgate_id)

    def verify(self, token: str) -> TokenPayload | None:
        """The payload of an authentic token; ``None`` for anything else (never raises).
        Characters that are not base64 are skipped, as ``base64.urlsafe_b64decode`` does."""
        found = self.verify_details(token, strict=False)
        if found is None:
            return None
        return _new_tuple(TokenPayload, found[:3])

    def verify_details(self, token: str, *, strict: bool = True) -> TokenDetails | None:
        """``verify`` for the tracker's hot routes: the ``TokenDetails`` of an authentic token,
        else ``None`` (never raises). ``strict``: a token with any character that is not
        base64url (``+``, ``/``, ``=``, ``%`` ... which ``verify`` skips) is refused, so the text
        is exactly the path segment that was signed."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        try:  # _b64decode, spelled out: this runs on every tracked request
            ascii_token = token.encode("ascii")
            if strict:
                raw = binascii.a2b_base64(
                    ascii_token.translate(_URLSAFE_STRICT) + _PADDING[len(ascii_token) & 3],
                    strict_mode=True,
                )
            else:
                raw = binascii.a2b_base64(
                    ascii_token.translate(_URLSAFE_TO_STANDARD) + _PADDING[len(ascii_token) & 3]
                )
        except (UnicodeEncodeError, binascii.Error, ValueError):
            return None
        if len(raw) < 3 + 1 + MAC_BYTES:
            return None
        data, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        states = self._states
        if len(states) == 1:
            keyed = states[0].copy()
            keyed.update(data)
            valid = _compare_digest(mac, keyed.digest()[:MAC_BYTES])
        else:
            valid = False
            for state in states:  # no early exit: time does not tell which key matched
                valid |= _compare_digest(mac, self._mac(state, data))
        if not valid:
            return None
        kind = _BYTE_KIND.get(data[1])
        if kind is None:
            return None
        accepted_ms: int | None
        if data[0] == VERSION and len(data) >= 2 + ULID_BYTES:
            value = int.from_bytes(data[2 : 2 + ULID_BYTES], "big")
            mailgate_id = _ulid_text_of(value)
            accepted_ms = value >> 80  # a ULID's top 48 bits: its time in milliseconds
            rest_raw = data[2 + ULID_BYTES :]
        elif data[0] == VERSION_TEXT_ID and data[2] and len(data) >= 3 + data[2]:
            try:
                mailgate_id = data[3 : 3 + data[2]].decode()
            except UnicodeDecodeError:
                return None
            accepted_ms = None
            rest_raw = data[3 + data[2] :]
        else:
            return None
        if kind == "click":
            if not rest_raw:
                return None
            try:
                rest = rest_raw.decode()
            except UnicodeDecodeError:
                return None
            return (kind, mailgate_id, rest, accepted_ms)
        if rest_raw:
            return None
        return (kind, mailgate_id, None, accepted_ms)
