"""What a Postal send/raw answer means for one recipient: a pure mapping (specs/postal.md §3).

Submitted  Postal created the message: store the ids, publish ``mail.submitted``.
Rejected   Postal refused it for good (parameter-error, validation codes, bad key):
           publish ``mail.failed`` with ``reason="rejected"``.
Retry      Nothing durable happened, or we cannot tell (timeout, connection error,
           HTTP non-200 from a proxy, ServerSuspended): redeliver later. ``ambiguous``
           is set when Postal may have created the message although we saw no answer;
           a retry may then send the message twice (Postal has no idempotency key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

#: Error codes Postal answers with ``status: "error"`` that retrying cannot fix.
PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidServerAPIKey",
        "UnauthenticatedFromAddress",
        "NoRecipients",
        "NoContent",
        "TooManyToAddresses",
        "TooManyCCAddresses",
        "TooManyBCCAddresses",
        "FromAddressMissing",
        "AttachmentMissingName",
        "AttachmentMissingData",
        "MessageNotFound",
    }
)
#: "Hold and alert": the server is suspended; mail waits until an operator lifts it.
SUSPENDED_CODE = "ServerSuspended"


@dataclass(frozen=True)
class Submitted:
    postal_id: int
    token: str
    message_id: str | None

    outcome: str = "success"


@dataclass(frozen=True)
class Rejected:
    code: str
    detail: str = ""

    outcome: str = "permanent"


@dataclass(frozen=True)
class Retry:
    code: str
    detail: str = ""
    ambiguous: bool = False
    outcome: str = "transient"
    """Metric label: ``suspended``, ``http_error``, ``timeout``, ``connection_error``, or
    ``deferred`` (not sent at all: the circuit is open)."""


Classification = Submitted | Rejected | Retry

_decoder = msgspec.json.Decoder()


def classify_response(http_status: int, body: bytes, recipient: str) -> Classification:
    """Classify Postal's answer to a send/raw for ``recipient`` (HTTP status and raw body)."""
    if http_status != 200:
        # Postal itself always answers 200; anything else is a proxy or a crash in front of it.
        return Retry(f"HTTP{http_status}", f"HTTP {http_status} from Postal", outcome="http_error")
    try:
        document = _decoder.decode(body)
    except msgspec.DecodeError:
        return Retry(
            "BadResponse", "Postal answered 200 with a body that is not JSON", outcome="http_error"
        )
    if not isinstance(document, dict):
        return Retry(
            "BadResponse", "Postal answered JSON that is not an object", outcome="http_error"
        )
    status = document.get("status")
    data = document.get("data")
    data = data if isinstance(data, dict) else {}
    if status == "success":
        return _success(data, recipient)
    if status == "parameter-error":
        return Rejected("ParameterError", _text(data.get("message")))
    if status == "error":
        code = _text(data.get("code")) or "UnknownError"
        detail = _text(data.get("message"))
        if code == SUSPENDED_CODE:
            return Retry(code, detail or "The Postal server is suspended", outcome="suspended")
        # Every other code is a refusal of this request (the list in PERMANENT_CODES is
        # Postal's; an unknown one is treated the same: retrying the same request repeats it).
        return Rejected(code, detail)
    return Retry("BadResponse", f"unexpected Postal status {status!r}", outcome="http_error")


def _success(data: dict[str, Any], recipient: str) -> Classification:
    messages = data.get("messages")
    entry: Any = None
    if isinstance(messages, dict) and messages:
        entry = messages.get(recipient)
        if entry is None:
            lowered = {str(k).lower(): v for k, v in messages.items()}
            entry = lowered.get(recipient.lower())
        if entry is None and len(messages) == 1:
            entry = next(iter(messages.values()))
    if not isinstance(entry, dict):
        # Postal says it worked but we cannot read the ids: the message probably exists.
        return Retry(
            "BadResponse",
            "success without a message for the recipient",
            ambiguous=True,
            outcome="http_error",
        )
    postal_id, token = entry.get("id"), entry.get("token")
    if isinstance(postal_id, bool) or not isinstance(postal_id, int) or not isinstance(token, str):
        return Retry(
            "BadResponse",
            "success with malformed message ids",
            ambiguous=True,
            outcome="http_error",
        )
    message_id = data.get("message_id")
    return Submitted(postal_id, token, message_id if isinstance(message_id, str) else None)


def transport_failure(exc: BaseException, *, request_sent: bool) -> Retry:
    """A request that got no HTTP answer. ``request_sent``: Postal may have received it."""
    detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if isinstance(exc, TimeoutError):
        return Retry("Timeout", detail, ambiguous=request_sent, outcome="timeout")
    return Retry("ConnectionError", detail, ambiguous=request_sent, outcome="connection_error")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)
