"""Every SMTP reply smtp-ingest chooses itself, and the errors that carry them.

The 554 texts are a contract AMS users match on (specs/smtp-rules.md, taken from the seed
ESP's documentation): keep them to the letter, the spelling "attachement" included. The
``<...>`` of the spec are placeholders: the reply carries the address or extension itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP reply line; ``reason`` is its low-cardinality metric label."""

    code: int
    enhanced: str
    text: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500


class Rejected(Exception):
    """Raised by a policy step; the SMTP edge answers ``reply`` and counts ``reply.reason``."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


class TransientError(Exception):
    """NATS (KV, object store, stream) did not answer in time: the client must retry (451)."""


# --- the spec's table (554) ---------------------------------------------------------------

MUST_AUTHENTICATE = Reply(554, "5.7.1", "Must authenticate before sending mail", "auth_required")
INTERNAL_ERROR = Reply(554, "5.3.0", "Internal server error", "internal")
TOO_BIG = Reply(554, "5.3.4", "Message exceeds fixed size limit", "size")
#: Not in the spec's table: a MIME tree too deep for the attachment check to walk.
TOO_DEEPLY_NESTED = Reply(554, "5.6.0", "Message structure too deeply nested", "mime_depth")


def forbidden_attachment(extension: str) -> Reply:
    return Reply(554, "5.7.1", f"Not allowed attachement type {extension}", "forbidden_attachment")


def invalid_recipient(address: str) -> Reply:
    return Reply(554, "5.1.3", f"Invalid recipient address: {address}", "invalid_recipient")


def disallowed_sender(address: str) -> Reply:
    return Reply(554, "5.7.1", f"Disallowed source address: {address}", "disallowed_sender")


# --- transient and protocol replies -------------------------------------------------------

TRY_LATER = Reply(451, "4.3.0", "Temporary failure, please retry later", "transient")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients", "too_many_recipients")
RATE_LIMITED = Reply(451, "4.7.1", "Rate limit exceeded, please retry later", "rate_limited")
DAILY_LIMIT = Reply(451, "4.7.1", "Daily sending limit reached, please retry later", "daily_limit")
AUTH_THROTTLED = Reply(421, "4.7.0", "Too many authentication failures", "auth_throttled")
TOO_MANY_CONNECTIONS = Reply(
    421, "4.7.0", "Too many connections from your address, please retry later", "connections"
)
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, please retry later")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")


def queued(mailgate_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {mailgate_id}")


AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure, please retry later")
