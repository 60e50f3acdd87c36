"""Outbound webhook signatures (specs/webhooks-out.md): Standard Webhooks plus a simple HMAC.

Two headers carry a signature of the same body:

``webhook-signature: v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>``
    The Standard Webhooks scheme. As that specification says, a secret of the form
    ``whsec_<base64>`` is used as the *decoded* bytes of ``<base64>``; any other secret (or a
    ``whsec_`` value whose rest is not valid base64) is used as its UTF-8 bytes. So the
    official Standard Webhooks libraries verify our deliveries with the secret as shown.

``X-Mailgate-Signature: sha256=<hex HMAC-SHA256(secret, body)>``
    For simple receivers: the key is the secret string exactly as shown to the customer
    (UTF-8, ``whsec_`` prefix included), i.e. ``hash_hmac('sha256', $body, $secret)``.

``verify_standard`` / ``verify_simple`` are the receiver side of the same rules (used by tests,
the CLI and anyone who wants a reference implementation).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from collections.abc import Mapping

STANDARD_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300
USER_AGENT = "mailgate/0.1"


@functools.lru_cache(maxsize=1024)
def signing_key(secret: str) -> bytes:
    """The HMAC key of the Standard Webhooks signature for ``secret`` (remembered per
    secret: every delivery to an endpoint would otherwise decode it again)."""
    if secret.startswith(STANDARD_PREFIX):
        try:
            return base64.b64decode(secret[len(STANDARD_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode()


def standard_signature(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>`` for the ``webhook-signature`` header."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    mac = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def simple_signature(secret: str, body: bytes) -> str:
    """``sha256=<hex>`` for the ``X-Mailgate-Signature`` header."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signed_headers(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every header of one delivery attempt."""
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_signature(secret, webhook_id, timestamp, body),
        "X-Mailgate-Signature": simple_signature(secret, body),
    }


def verify_standard(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> bool:
    """True when one of the ``v1`` signatures matches and the timestamp is recent enough.

    ``headers`` is looked up case-insensitively for ``webhook-id``, ``webhook-timestamp`` and
    ``webhook-signature`` (which may hold several space-separated signatures, as during a
    secret rotation). ``now=None`` skips the timestamp check.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    webhook_id = lowered.get("webhook-id")
    raw_ts = lowered.get("webhook-timestamp")
    header = lowered.get("webhook-signature")
    if not webhook_id or not raw_ts or not header:
        return False
    try:
        timestamp = int(raw_ts)
    except ValueError:
        return False
    if now is not None and abs(now - timestamp) > tolerance_s:
        return False
    expected = standard_signature(secret, webhook_id, timestamp, body)
    return any(
        hmac.compare_digest(candidate.encode(), expected.encode())
        for candidate in header.split()
        if candidate.startswith("v1,")
    )


def verify_simple(secret: str, header: str, body: bytes) -> bool:
    """True when ``X-Mailgate-Signature`` matches ``body``."""
    return hmac.compare_digest(header.encode(), simple_signature(secret, body).encode())
