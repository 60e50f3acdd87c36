"""Bounce classification: what a remote server's refusal says about the recipient address.

Pure: text in, a ``Bounce`` out. The input is what Postal reports for a delivery attempt:
``output`` (the remote server's SMTP reply, up to 512 characters, possibly multi-line like
Gmail's ``550-5.1.1 ...``) and ``details`` (Postal's own sentence, e.g. ``Permanent SMTP
delivery error when sending to mx.example.org``). ``docs/bounces.md`` documents the rules and
how each class maps to a customer event.

Three classes:

* ``hard`` - the address is bad (unknown user, disabled mailbox, domain without mail):
  suppressing it protects the sender's reputation.
* ``soft`` - a temporary condition (4xx replies, full mailbox, rate limits, connection
  failures): the address is fine, a later message may be delivered.
* ``block`` - this message or this sender was refused (spam verdict, policy, authentication,
  reputation, size): the address is fine, so it is never suppressed, but the campaign may be
  in trouble.

Text beats codes: servers pick codes loosely (Yandex answers ``550 5.7.1 No such user!`` for
an unknown address, Microsoft ``550 5.4.1 Recipient address rejected``), so known phrases are
matched first, then the enhanced status code (RFC 3463), then the basic reply code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

BounceClass = Literal["hard", "soft", "block", "undetermined"]

_BASIC_AT_START = re.compile(r"^\s*([245]\d\d)(?:[\s-]|$)")
_BASIC_ANYWHERE = re.compile(r"(?<![\d.])([245]\d\d)(?=[\s-]|$)")
_ENHANCED = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")


@dataclass(frozen=True)
class Bounce:
    bounce_class: BounceClass
    category: str
    """Finer reason: ``unknown_user``, ``bad_domain``, ``mailbox_disabled``, ``mailbox_full``,
    ``throttled``, ``temporary``, ``connection``, ``too_many_attempts``, ``spam``, ``policy``,
    ``authentication``, ``sender_rejected``, ``message_too_large``, ``invalid_address``,
    ``other``."""
    code: str | None = None
    enhanced_code: str | None = None

    @property
    def is_hard(self) -> bool:
        return self.bounce_class == "hard"


def smtp_code(text: str | None) -> str | None:
    """The SMTP reply code (``550``) of a remote server's output: the leading one, else the
    first one followed by a space or dash."""
    if not text:
        return None
    match = _BASIC_AT_START.match(text) or _BASIC_ANYWHERE.search(text)
    return match.group(1) if match else None


def enhanced_code(text: str | None) -> str | None:
    """The first enhanced status code (``5.1.1``) in a remote server's output, if any."""
    if not text:
        return None
    match = _ENHANCED.search(text)
    return match.group(1) if match else None


def _any(*phrases: str) -> re.Pattern[str]:
    return re.compile("|".join(phrases), re.IGNORECASE)


# Order matters: the first matching rule wins (see classify_bounce).
_SENDER = _any(
    r"sender (?:address )?(?:rejected|denied|verify failed|domain|not allowed)",
    r"\b5\.1\.[78]\b",
)
_MAILBOX_FULL = _any(
    r"mailbox (?:is )?full",
    r"over ?quota",
    r"quota (?:exceeded|exceed)",
    r"exceeded (?:the )?(?:storage|quota)",
    r"out of storage",
    r"insufficient (?:system )?storage",
    r"mailbox size limit",
    r"mailbox size exceeded",
    r"user is over",
    r"переполнен",
)
_UNKNOWN_USER = _any(
    r"no such (?:user|mailbox|recipient|account)",
    r"user (?:unknown|not found|doesn'?t exist|does not exist)",
    r"unknown (?:user|recipient|mailbox|local part)",
    r"(?:recipient|address|mailbox|account) (?:not found|unknown)",
    r"does not exist",
    r"doesn'?t exist",
    r"invalid (?:mailbox|recipient|address)",
    r"recipient address rejected",
    r"mailbox unavailable",
    r"mailbox not found",
    r"not our customer",
    r"no mailbox here",
    r"user not local",
    r"address rejected",
    r"bad destination mailbox",
    r"nosuchuser",
    r"не существует",
    r"не найден",
)
_DISABLED = _any(
    r"(?:account|mailbox|user) (?:is )?(?:disabled|deactivated|inactive|suspended|blocked|locked)",
    r"disabled (?:account|mailbox|user)",
    r"inactive (?:account|mailbox|user)",
    r"account has been (?:disabled|deleted|suspended)",
    r"заблокирован",
)
_BAD_DOMAIN = _any(
    r"domain (?:not found|does not exist|doesn'?t exist)",
    r"no such domain",
    r"host (?:or domain name )?not found",
    r"unrouteable address",
    r"nxdomain",
    r"does not accept mail",
    r"null mx",
)
_TOO_LARGE = _any(
    r"message (?:size )?(?:exceeds|too (?:big|large))",
    r"message is too (?:big|large)",
    r"size limit exceeded",
    r"message length exceeds",
)
_SPAM = _any(
    r"\bspam\b",
    r"unsolicited",
    r"bulk mail",
    r"junk",
    r"phishing",
    r"\bvirus\b",
    r"malware",
    r"suspicious",
    r"content rejected",
    r"спам",
)
_AUTH = _any(
    r"\bdmarc\b",
    r"\bspf\b",
    r"\bdkim\b",
    r"unauthenticated",
    r"authentication (?:failed|required)",
    r"not authenticated",
    r"ptr record",
    r"reverse dns",
)
_POLICY = _any(
    r"\bpolicy\b",
    r"blocked",
    r"blacklist",
    r"blocklist",
    r"block ?list",
    r"\brbl\b",
    r"spamhaus",
    r"reputation",
    r"denied",
    r"refused",
    r"rejected",
    r"not allowed",
    r"banned",
)
_THROTTLED = _any(
    r"rate limit",
    r"ratelimit",
    r"too many (?:messages|connections|recipients|emails|requests)",
    r"try again later",
    r"temporarily (?:deferred|rate limited|blocked)",
    r"throttl",
    r"greylist",
    r"graylist",
    r"come back later",
    r"unusual rate",
)
_CONNECTION = _any(
    r"connection (?:refused|reset|timed out|closed)",
    r"execution expired",
    r"timed? ?out",
    r"no smtp servers were available",
    r"name or service not known",
    r"network is unreachable",
    r"no route to host",
    r"ssl_connect",
    r"end of file reached",
)
_TOO_MANY_ATTEMPTS = _any(
    r"maximum number of delivery attempts",
    r"too many soft fails",
)
_POSTAL_SPAM_CHECK = _any(r"message is likely spam")

_ENHANCED_RULES: tuple[tuple[str, BounceClass, str], ...] = (
    ("5.1.1", "hard", "unknown_user"),
    ("5.1.2", "hard", "bad_domain"),
    ("5.1.3", "hard", "invalid_address"),
    ("5.1.10", "hard", "bad_domain"),
    ("5.1.", "hard", "unknown_user"),
    ("5.2.1", "hard", "mailbox_disabled"),
    ("5.2.2", "soft", "mailbox_full"),
    ("5.2.3", "block", "message_too_large"),
    ("5.3.4", "block", "message_too_large"),
    ("5.4.4", "hard", "bad_domain"),
    ("5.4.1", "hard", "unknown_user"),
    ("5.7.1", "block", "policy"),
    ("5.7.2", "block", "policy"),
    ("5.7.", "block", "policy"),
    ("5.6.", "block", "policy"),
    ("4.2.2", "soft", "mailbox_full"),
    ("4.7.", "soft", "throttled"),
)
_ENHANCED_AUTH = frozenset({"5.7.23", "5.7.25", "5.7.26", "5.7.27", "5.7.7", "5.7.9"})

_BASIC_RULES: dict[str, tuple[BounceClass, str]] = {
    "550": ("hard", "other"),
    "551": ("hard", "unknown_user"),
    "553": ("hard", "invalid_address"),
    "552": ("soft", "mailbox_full"),
    "554": ("block", "policy"),
    "541": ("block", "spam"),
    "521": ("hard", "bad_domain"),
    "556": ("hard", "bad_domain"),
    "421": ("soft", "throttled"),
}


def _temporary_category(text: str) -> str:
    if _SENDER.search(text):
        return "sender_rejected"
    if _MAILBOX_FULL.search(text):
        return "mailbox_full"
    if _THROTTLED.search(text) or _POLICY.search(text) or _SPAM.search(text):
        return "throttled"
    return "temporary"


def _permanent_by_text(text: str) -> tuple[BounceClass, str] | None:
    if _SENDER.search(text):
        return ("block", "sender_rejected")
    if _MAILBOX_FULL.search(text):
        return ("soft", "mailbox_full")
    if _DISABLED.search(text):
        return ("hard", "mailbox_disabled")
    if _BAD_DOMAIN.search(text):
        return ("hard", "bad_domain")
    if _UNKNOWN_USER.search(text) and not _SPAM.search(text):
        return ("hard", "unknown_user")
    if _TOO_LARGE.search(text):
        return ("block", "message_too_large")
    if _SPAM.search(text):
        return ("block", "spam")
    if _AUTH.search(text):
        return ("block", "authentication")
    if _POLICY.search(text):
        return ("block", "policy")
    return None


def _permanent_by_code(enhanced: str | None, basic: str | None) -> tuple[BounceClass, str]:
    if enhanced is not None and enhanced.startswith("5."):
        if enhanced in _ENHANCED_AUTH:
            return ("block", "authentication")
        for prefix, bounce_class, category in _ENHANCED_RULES:
            if enhanced == prefix or (prefix.endswith(".") and enhanced.startswith(prefix)):
                return (bounce_class, category)
    if basic is not None and basic in _BASIC_RULES:
        return _BASIC_RULES[basic]
    return ("hard", "other")


def classify_bounce(output: str | None, details: str | None = None) -> Bounce:
    """Classify a failed delivery from Postal's ``output`` and ``details``."""
    reply = output or ""
    basic = smtp_code(reply)
    enhanced = enhanced_code(reply)
    status_class = (enhanced or basic or " ")[0]
    text = f"{reply}\n{details or ''}"

    if status_class == "4":
        return Bounce("soft", _temporary_category(reply), basic, enhanced)
    if status_class == "5":
        found = _permanent_by_text(reply)
        bounce_class, category = found or _permanent_by_code(enhanced, basic)
        return Bounce(bounce_class, category, basic, enhanced)
    # No SMTP code: Postal's own verdicts, connection problems, or nothing we know.
    if _POSTAL_SPAM_CHECK.search(text):
        return Bounce("block", "spam", basic, enhanced)
    if _TOO_MANY_ATTEMPTS.search(text):
        return Bounce("soft", "too_many_attempts", basic, enhanced)
    if _CONNECTION.search(text):
        return Bounce("soft", "connection", basic, enhanced)
    found = _permanent_by_text(reply)
    if found is not None and found[0] == "hard":
        return Bounce("hard", found[1], basic, enhanced)
    return Bounce("undetermined", "other", basic, enhanced)
