"""Abuse Reporting Format (RFC 5965) feedback reports: a pure parser over raw RFC 822 bytes.

A report is ``multipart/report; report-type=feedback-report`` with three parts: a human
readable text, a ``message/feedback-report`` block of fields (Feedback-Type, User-Agent,
Version, Original-Mail-From, Original-Rcpt-To, Arrival-Date, Source-IP, Reported-Domain...)
and the reported message, whole (``message/rfc822``) or headers only
(``text/rfc822-headers``). Its Message-ID is the one we set, ``<mailgate_id@DOMAIN>``; the
``X-Postal-MsgID`` header Postal stamps into every message carries Postal's token.

Reports forwarded as an attachment (the report inside a ``message/rfc822``) are found too.
The parser never raises: anything it cannot read is simply not a report (``None``).
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from dataclasses import dataclass
from email.message import Message
from typing import Any

_parser = email.parser.BytesParser(policy=email.policy.compat32)
_header_parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_MESSAGE_ID = re.compile(r"^message-id:\s*(<?[^\s>]+>?)", re.IGNORECASE | re.MULTILINE)

MAX_DEPTH = 5


@dataclass(frozen=True)
class FeedbackReport:
    feedback_type: str
    """``abuse``, ``fraud``, ``virus``, ``other``, ``not-spam`` (RFC 5965), lower case."""
    user_agent: str | None = None
    version: str | None = None
    original_mail_from: str | None = None
    original_rcpt_to: str | None = None
    arrival_date: str | None = None
    source_ip: str | None = None
    reported_domain: str | None = None
    reporting_mta: str | None = None
    original_message_id: str | None = None
    original_postal_token: str | None = None
    original_to: str | None = None

    def fields(self) -> dict[str, str]:
        """The report's fields without the empty ones (event payload)."""
        return {k: v for k, v in self.__dict__.items() if v}


def _clean(value: object) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def _fields_of(part: Message) -> Message | None:
    """The feedback fields: the email package parses a ``message/*`` body as a message."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    raw = part.get_payload(decode=True)
    if isinstance(raw, bytes):
        return _header_parser.parsebytes(raw.strip() + b"\r\n\r\n")
    return None


def _original_headers(part: Message) -> Message | None:
    if part.get_content_type() == "message/rfc822":
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return payload[0]
    raw = part.get_payload(decode=True)
    if isinstance(raw, bytes):
        return _header_parser.parsebytes(raw.lstrip())
    return None


def _report_in(message: Message, depth: int = 0) -> FeedbackReport | None:
    if depth > MAX_DEPTH:
        return None
    if message.get_content_type() == "multipart/report":
        parts = message.get_payload()
        if isinstance(parts, list):
            report = _from_parts(parts)
            if report is not None:
                return report
    if message.is_multipart():
        for sub in message.get_payload() or []:
            if isinstance(sub, Message):
                found = _report_in(sub, depth + 1)
                if found is not None:
                    return found
    return None


def _from_parts(parts: list[Any]) -> FeedbackReport | None:
    fields: Message | None = None
    original: Message | None = None
    original_text = ""
    for index, part in enumerate(parts):
        if not isinstance(part, Message):
            continue
        ctype = part.get_content_type()
        if ctype == "message/feedback-report" and fields is None:
            fields = _fields_of(part)
            for later in parts[index + 1 :]:
                if isinstance(later, Message) and later.get_content_type() in (
                    "message/rfc822",
                    "text/rfc822-headers",
                ):
                    original = _original_headers(later)
                    raw = later.get_payload(decode=True)
                    original_text = raw.decode("latin-1") if isinstance(raw, bytes) else ""
                    break
    if fields is None:
        return None
    feedback_type = _clean(fields.get("Feedback-Type"))
    if not feedback_type:
        return None
    message_id = _clean(original.get("Message-ID")) if original is not None else None
    if not message_id and original_text:
        match = _MESSAGE_ID.search(original_text)
        message_id = match.group(1) if match else None
    return FeedbackReport(
        feedback_type=feedback_type.lower(),
        user_agent=_clean(fields.get("User-Agent")),
        version=_clean(fields.get("Version")),
        original_mail_from=_clean(fields.get("Original-Mail-From")),
        original_rcpt_to=_clean(fields.get("Original-Rcpt-To")),
        arrival_date=_clean(fields.get("Arrival-Date") or fields.get("Received-Date")),
        source_ip=_clean(fields.get("Source-IP")),
        reported_domain=_clean(fields.get("Reported-Domain")),
        reporting_mta=_clean(fields.get("Reporting-MTA")),
        original_message_id=message_id,
        original_postal_token=(
            _clean(original.get("X-Postal-MsgID")) if original is not None else None
        ),
        original_to=_clean(original.get("To")) if original is not None else None,
    )


def parse_feedback_report(raw: bytes) -> FeedbackReport | None:
    """The ARF report in ``raw``, or ``None`` when it holds none (never raises)."""
    try:
        return _report_in(_parser.parsebytes(raw))
    except Exception:  # malformed MIME is "not a report", not a crash
        return None
