"""Inbound mail Postal routes to ``POST /api/v1/inbound`` -> events: pure functions.

Postal's route HTTP endpoint (app/senders/http_sender.rb, lib/postal/http.rb) posts each
inbound message signed like a webhook. Configure the endpoint with format ``RawMessage``:

    {"id": 123, "rcpt_to": "...", "mail_from": "...", "message": "<Base64.encode64 of the
     RFC 822 bytes, 60-character lines>", "base64": true, "size": 4567}

as JSON (encoding ``BodyAsJSON``) or as form fields (``FormData``). What it becomes:

* an ARF feedback report (RFC 5965) -> ``postal.Complaint`` (PostalEvent, event
  ``Complaint``, ``status`` = the feedback type, ``mailgate_id`` from the reported message's
  Message-ID, ``postal_token`` from its X-Postal-MsgID), event id ``arf-<mailgate_id>``;
* a reply to our ``List-Unsubscribe`` mailto -> ``track.unsubscribe``, event id
  ``mailto-<mailgate_id>``. The mailto is ``<route>+<token>@<domain>?subject=unsubscribe%20
  <token>`` where ``<token>`` is a tracking unsubscribe token (mailgate_core.tracking, signed
  with TRACKING_SECRET; 60 characters for a ULID) and ``<route>@<domain>`` the address of a
  Postal route to this endpoint (``u`` keeps the local part within RFC 5321's 64 octets).
  Postal routes ``name+tag@domain`` to the route ``name`` and keeps the full address in
  ``rcpt_to``. The token is read from the ``+`` part of ``rcpt_to`` or of a To header, else
  from any word of the Subject (for clients that drop or lower-case the tag); only a token
  that verifies counts;
* anything else (including ``Hash`` format posts and bodies we cannot read) ->
  ``postal.Unknown`` (PostalEvent, event ``Unknown``) keeping the message raw in ``payload``
  (or in the object store when large), event id ``inb-<sha256 prefix>``: never dropped.

Every event id is derived from the content, so Postal's retries of the same post are
absorbed by JetStream de-duplication and the ledger's idempotency.
"""

from __future__ import annotations

import base64
import email.header
import email.parser
import email.policy
import email.utils
import hashlib
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from mailgate_core.schemas import PostalEvent, TrackUnsubscribe

from .arf import FeedbackReport, parse_feedback_report
from .parse import mailgate_id_from

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"

_TOKEN = re.compile(r"[A-Za-z0-9_-]{40,}")
_header_parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_TRUE = {"true", "1", "yes"}

_decoder = msgspec.json.Decoder()

#: A token -> its mailgate_id when it is an authentic unsubscribe token, else None.
TokenCheck = Callable[[str], str | None]


@dataclass(frozen=True)
class InboundPost:
    """What Postal posted. ``raw`` is the RFC 822 message (RawMessage format only)."""

    format: str
    """``RawMessage``, ``Hash`` or ``Unreadable``."""
    body: bytes
    postal_id: int | None = None
    rcpt_to: str | None = None
    mail_from: str | None = None
    raw: bytes | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        """Stable across Postal's retries of this post: id, recipient and content."""
        h = hashlib.sha256(f"{self.postal_id}|{self.rcpt_to}|".encode())
        h.update(self.raw if self.raw is not None else self.body)
        return h.hexdigest()[:32]

    def meta(self) -> dict[str, Any]:
        return {
            "id": self.postal_id,
            "rcpt_to": self.rcpt_to,
            "mail_from": self.mail_from,
            "format": self.format,
            "size": len(self.raw) if self.raw is not None else len(self.body),
        }


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_post(body: bytes, content_type: str) -> InboundPost:
    """Decode the post (never raises: what cannot be read is ``Unreadable``)."""
    params: Any = None
    if content_type == FORM:
        try:
            pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True)
            params = dict(pairs)
        except (UnicodeDecodeError, ValueError):
            params = None
    else:
        try:
            params = _decoder.decode(body)
        except (msgspec.DecodeError, RecursionError):  # RecursionError: a JSON bomb
            params = None
    if not isinstance(params, dict):
        return InboundPost("Unreadable", body)
    common: dict[str, Any] = {
        "postal_id": _int(params.get("id")),
        "rcpt_to": _str(params.get("rcpt_to")),
        "mail_from": _str(params.get("mail_from")),
    }
    message = params.get("message")
    if isinstance(message, str):
        flag = params.get("base64")
        encoded = flag is True or (isinstance(flag, str) and flag.lower() in _TRUE)
        if encoded:
            try:
                raw = base64.b64decode(message)  # skips the newlines of Base64.encode64
            except ValueError:
                return InboundPost("Unreadable", body, params=params, **common)
        else:
            raw = message.encode("utf-8", "surrogateescape")
        return InboundPost("RawMessage", body, raw=raw, params=params, **common)
    if "plain_body" in params or "token" in params:
        return InboundPost("Hash", body, params=params, **common)
    return InboundPost("Unreadable", body, params=params, **common)


# --- what an inbound message is ---------------------------------------------------------


@dataclass(frozen=True)
class Complaint:
    report: FeedbackReport
    mailgate_id: str | None


@dataclass(frozen=True)
class MailtoUnsubscribe:
    mailgate_id: str
    found_in: str
    """``rcpt_to``, ``to`` or ``subject``."""


@dataclass(frozen=True)
class Unrecognised:
    reason: str
    """Metric label: ``hash_format``, ``unreadable``, ``not_recognised``."""


Inbound = Complaint | MailtoUnsubscribe | Unrecognised


def _plus_tag(address: str | None) -> str | None:
    if not address:
        return None
    local = address.strip().strip("<>").rpartition("@")[0]
    _, plus, tag = local.partition("+")
    return tag if plus and tag else None


def unsubscribe_candidates(post: InboundPost) -> list[tuple[str, str]]:
    """(where, token) pairs to try, best first."""
    out: list[tuple[str, str]] = []
    tag = _plus_tag(post.rcpt_to)
    if tag:
        out.append(("rcpt_to", tag))
    if post.raw is None:
        return out
    try:
        headers = _header_parser.parsebytes(post.raw)
    except Exception:
        return out
    for _name, address in email.utils.getaddresses([str(v) for v in headers.get_all("To", [])]):
        tag = _plus_tag(address)
        if tag:
            out.append(("to", tag))
    subject = headers.get("Subject")
    if subject:
        text = str(email.header.make_header(email.header.decode_header(str(subject))))
        out.extend(("subject", word) for word in _TOKEN.findall(text))
    return out


def classify(post: InboundPost, domain: str, check_token: TokenCheck | None) -> Inbound:
    if post.format == "Hash":
        return Unrecognised("hash_format")
    if post.raw is None:
        return Unrecognised("unreadable")
    report = parse_feedback_report(post.raw)
    if report is not None:
        return Complaint(report, mailgate_id_from(report.original_message_id, domain))
    if check_token is not None:
        for where, token in unsubscribe_candidates(post):
            mailgate_id = check_token(token)
            if mailgate_id:
                return MailtoUnsubscribe(mailgate_id, where)
    return Unrecognised("not_recognised")


# --- events -------------------------------------------------------------------------------


def _arrival(report: FeedbackReport, now: float) -> float:
    if not report.arrival_date:
        return now
    try:
        return email.utils.parsedate_to_datetime(report.arrival_date).timestamp()
    except (TypeError, ValueError, IndexError):
        return now


def complaint_event(post: InboundPost, complaint: Complaint, *, now: float) -> PostalEvent:
    report = complaint.report
    recipient = report.original_rcpt_to or report.original_to
    if recipient:
        recipient = email.utils.parseaddr(recipient)[1] or recipient
    details = f"{report.feedback_type} report" + (
        f" from {report.user_agent}" if report.user_agent else ""
    )
    return PostalEvent(
        event_id=f"arf-{complaint.mailgate_id or post.digest()}",
        occurred_at=now,
        event="Complaint",
        postal_timestamp=_arrival(report, now),
        mailgate_id=complaint.mailgate_id,
        postal_token=report.original_postal_token,
        status=report.feedback_type,
        details=details[:500],
        recipient=recipient,
        payload={"source": "inbound", "feedback": report.fields(), "inbound": post.meta()},
    )


def unsubscribe_event(unsubscribe: MailtoUnsubscribe, *, now: float) -> TrackUnsubscribe:
    return TrackUnsubscribe(
        event_id=f"mailto-{unsubscribe.mailgate_id}",
        occurred_at=now,
        mailgate_id=unsubscribe.mailgate_id,
        one_click=False,
        user_agent="mailto",
    )


def unknown_event(
    post: InboundPost, reason: str, *, now: float, object_name: str | None = None
) -> PostalEvent:
    """``postal.Unknown`` keeping the message: inline base64, or an object-store name."""
    payload: dict[str, Any] = {"source": "inbound", "reason": reason, "inbound": post.meta()}
    if object_name is not None:
        payload["object_name"] = object_name
    elif post.raw is not None:
        payload["message"] = base64.b64encode(post.raw).decode("ascii")
    else:
        payload["body"] = base64.b64encode(post.body).decode("ascii")
    return PostalEvent(
        event_id=f"inb-{post.digest()}",
        occurred_at=now,
        event="Unknown",
        postal_timestamp=now,
        postal_id=post.postal_id,
        recipient=post.rcpt_to,
        details=f"inbound message not recognised ({reason})",
        payload=payload,
    )


def kept_bytes(post: InboundPost) -> bytes:
    """What an Unknown event keeps: the message, else the body as posted."""
    return post.raw if post.raw is not None else post.body
