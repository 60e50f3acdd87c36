"""Every event that crosses NATS, one `msgspec.Struct` per subject.

Rules for changing a schema (msgspec's schema-evolution guide): new fields get defaults, a
field's type never changes, fields are never renamed or removed, and decoders ignore unknown
fields. ``schema_version`` goes up when the meaning of a subject changes; consumers accept
every version they know.

Each event's ``event_id`` is unique: it is sent as ``Nats-Msg-Id`` (JetStream drops a
duplicate publish within the stream's duplicate window) and it is the ledger's idempotency key.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal, TypeVar

import msgspec

from .ids import new_ulid

SCHEMA_VERSION = 1


def _now() -> float:
    return time.time()


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Fields every event has. ``occurred_at`` is unix seconds (float)."""

    event_id: str = msgspec.field(default_factory=new_ulid)
    occurred_at: float = msgspec.field(default_factory=_now)
    schema_version: int = SCHEMA_VERSION

    subject_prefix: ClassVar[str] = ""

    def subject(self) -> str:
        return self.subject_prefix


class MessageRef(msgspec.Struct, frozen=True, kw_only=True):
    """Who a message belongs to and how the outside world names it."""

    mailgate_id: str
    account_id: str
    recipient: str
    external_id: str | None = None
    campaign_id: str | None = None


# --- mail.* (smtp-ingest, postal-sender) -------------------------------------------------


class MailAccepted(Event, frozen=True, kw_only=True):
    """smtp-ingest accepted one recipient's copy of a message (SMTP 250 follows the ack)."""

    subject_prefix: ClassVar[str] = "mail.accepted"

    message: MessageRef
    mail_from: str
    credential: str
    message_id_header: str
    subject_line: str = ""
    size: int = 0
    raw: bytes | None = None
    """Rewritten RFC 5322 message; ``None`` when it is in the object store."""
    object_name: str | None = None
    """Object-store name holding the message when it is too large for one NATS message."""
    tracking: bool = True
    postal_api_key_ref: str | None = None
    """Account whose Postal API key to use; ``None`` means the default key."""
    client_ip: str | None = None


class MailSkipped(Event, frozen=True, kw_only=True):
    """A recipient was accepted at SMTP level but not sent (suppressed)."""

    subject_prefix: ClassVar[str] = "mail.skipped"

    message: MessageRef
    mail_from: str
    reason: str
    """``unsubscribed``, ``complained``, ``hard_bounced`` or ``manual``."""
    subject_line: str = ""


class MailSubmitted(Event, frozen=True, kw_only=True):
    """Postal accepted the message (send/raw success)."""

    subject_prefix: ClassVar[str] = "mail.submitted"

    message: MessageRef
    postal_id: int
    postal_token: str
    postal_message_id: str | None = None
    attempts: int = 1


class MailFailed(Event, frozen=True, kw_only=True):
    """Postal refused the message for good, or retries ran out."""

    subject_prefix: ClassVar[str] = "mail.failed"

    message: MessageRef
    reason: str
    """``rejected`` (permanent Postal error) or ``retries_exhausted``."""
    code: str | None = None
    detail: str = ""
    attempts: int = 1


# --- postal.<EventName> (webhook-ingest) ---------------------------------------------------

PostalEventName = Literal[
    "MessageSent",
    "MessageDelayed",
    "MessageDeliveryFailed",
    "MessageHeld",
    "MessageBounced",
    "MessageLinkClicked",
    "MessageLoaded",
    "DomainDNSError",
    "SendLimitApproaching",
    "SendLimitExceeded",
]
POSTAL_EVENT_NAMES: tuple[str, ...] = PostalEventName.__args__  # type: ignore[attr-defined]


class PostalEvent(Event, frozen=True, kw_only=True):
    """A verified Postal webhook. ``event_id`` is Postal's webhook ``uuid`` (stable on retry)."""

    subject_prefix: ClassVar[str] = "postal"

    event: str
    postal_timestamp: float
    mailgate_id: str | None = None
    """Read from the Message-ID we set (``<mailgate_id@DOMAIN>``), when it is ours."""
    postal_id: int | None = None
    postal_token: str | None = None
    status: str | None = None
    output: str | None = None
    details: str | None = None
    recipient: str | None = None
    tag: str | None = None
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    """Postal's payload, kept whole for the ledger's history."""

    def subject(self) -> str:
        return f"postal.{self.event}"


# --- track.* (tracker) --------------------------------------------------------------------

Audience = Literal["human", "prefetch", "scanner", "unknown"]


class TrackOpen(Event, frozen=True, kw_only=True):
    subject_prefix: ClassVar[str] = "track.open"

    mailgate_id: str | None = None
    external_id: str | None = None
    campaign_id: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    audience: Audience = "unknown"
    legacy: bool = False
    audience_reason: str = ""
    """Which rule set ``audience`` (``docs/tracking.md``), e.g. ``apple_mpp``, ``early_click``."""


class TrackClick(Event, frozen=True, kw_only=True):
    subject_prefix: ClassVar[str] = "track.click"

    url: str
    mailgate_id: str | None = None
    external_id: str | None = None
    campaign_id: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    audience: Audience = "unknown"
    legacy: bool = False
    audience_reason: str = ""
    """Which rule set ``audience`` (``docs/tracking.md``), e.g. ``apple_mpp``, ``early_click``."""


class TrackUnsubscribe(Event, frozen=True, kw_only=True):
    subject_prefix: ClassVar[str] = "track.unsubscribe"

    mailgate_id: str
    one_click: bool = False
    ip: str | None = None
    user_agent: str | None = None


class TrackBatch(Event, frozen=True, kw_only=True):
    """Many opens and clicks in one JetStream message: the tracker packs what its buffer
    holds, so a burst costs one publish (and one fsync) per batch, not per event.

    ``event_id`` (the ``Nats-Msg-Id``) is the batch's own; the batch never changes once
    formed, so a re-publish after a lost ack is dropped by JetStream. Every contained event
    keeps its own ``event_id`` and its own subject's meaning: the ledger records one fact per
    contained event and de-duplicates them one by one."""

    subject_prefix: ClassVar[str] = "track.batch"

    opens: list[TrackOpen] = msgspec.field(default_factory=list)
    clicks: list[TrackClick] = msgspec.field(default_factory=list)

    def events(self) -> list[TrackOpen | TrackClick]:
        """The contained events, opens first."""
        return [*self.opens, *self.clicks]


# --- status.<name> (ledger -> ams-reporter) -----------------------------------------------

StatusName = Literal[
    "sent",
    "delivered",
    "opened",
    "clicked",
    "unsubscribed",
    "complained",
    "skipped",
    "soft_bounced",
    "hard_bounced",
    "failed",
]
STATUS_NAMES: tuple[str, ...] = StatusName.__args__  # type: ignore[attr-defined]


class StatusEvent(Event, frozen=True, kw_only=True):
    """A customer-facing event, published once per fact by the ledger.

    ``event_id`` is derived from the fact's own event id, so a re-publish after a crash is
    dropped by JetStream de-duplication and a receiver can de-duplicate on ``webhook-id``.
    """

    subject_prefix: ClassVar[str] = "status"

    name: StatusName
    message: MessageRef
    timestamp: int
    """Unix seconds of the fact (what the outbound webhook's ``event.timestamp`` carries)."""
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    source_event_id: str = ""
    endpoint_ids: list[str] = msgspec.field(default_factory=list)
    """Set on a replay from the ledger's dead letters: deliver to these endpoints only
    (empty: every endpoint of the account that wants the event)."""

    def subject(self) -> str:
        return f"status.{self.name}"


class WebhookDeadLettered(Event, frozen=True, kw_only=True):
    """ams-reporter gave up delivering a status event to one endpoint (retry deadline passed).

    Published on ``mail.webhook_dead_lettered`` (MAIL stream: a fact in the message's history)
    with ``event_id`` ``dl-{status.event_id}-{endpoint_id}`` (a failed replay adds
    ``-r{replay occurred_at in ms}``), so a repeat is a no-op. The
    ledger keeps it as a dead letter listable and replayable through the admin API.
    """

    subject_prefix: ClassVar[str] = "mail.webhook_dead_lettered"

    status: StatusEvent
    """The event as it was to be delivered."""
    endpoint_id: str
    url: str = ""
    attempts: int = 0
    reason: str = ""
    """The last failure: ``http 503``, ``timeout``, ``connection refused``..."""
    http_status: int | None = None


class WebhookDelivered(Event, frozen=True, kw_only=True):
    """ams-reporter delivered a status event to one endpoint (a 2xx answer).

    Published on ``mail.webhook_delivered`` (MAIL stream: a fact in the message's history)
    with ``event_id`` ``wd-{status_event_id}-{endpoint_id}``, so a redelivery is de-duplicated
    by JetStream and the ledger. A batched delivery gives one fact per event of the batch.
    """

    subject_prefix: ClassVar[str] = "mail.webhook_delivered"

    status_event_id: str
    status_name: str
    message: MessageRef
    """The status event's message."""
    endpoint_id: str
    url: str = ""
    http_status: int = 0
    attempts: int = 1
    """HTTP attempts this delivery took, the successful one included."""
    duration_ms: float = 0.0
    """Duration of the successful HTTP attempt (the whole POST of a batch)."""


# --- stats.* (stats-poller) ---------------------------------------------------------------


class PostmasterDaily(Event, frozen=True, kw_only=True):
    """One day of Mail.ru Postmaster statistics for a domain (and msgtype, when given)."""

    subject_prefix: ClassVar[str] = "stats.postmaster.daily"

    domain: str
    date: str
    """YYYY-MM-DD."""
    msgtype: str | None = None
    messages_sent: int = 0
    delivered: int = 0
    read: int = 0
    deleted_read: int = 0
    deleted_unread: int = 0
    spam: int = 0
    probably_spam: int = 0
    complaints: int = 0
    reputation: float | None = None
    trend: float | None = None


class AmsRelayState(msgspec.Struct, frozen=True, kw_only=True):
    """One SMTP relay of a running mailing (AMS getRelaysSendingStates)."""

    relay: str
    state: str = ""
    enabled: bool = True
    sent: int = 0
    errors: int = 0


class AmsMailingProgress(Event, frozen=True, kw_only=True):
    """AMS's view of a mailing (getMailings.progressInfo)."""

    subject_prefix: ClassVar[str] = "stats.ams.mailing"

    mailing_id: str
    name: str = ""
    state: str = ""
    approx_speed_per_min: float = 0.0
    percent_done: float = 0.0
    total: int = 0
    sent: int = 0
    not_sent: int = 0
    bad: int = 0
    refused: int = 0
    excluded: int = 0
    opened: int = 0
    clicks: int = 0
    relays: list[AmsRelayState] = msgspec.field(default_factory=list)
    """Per-relay counters, polled for running mailings only (empty otherwise)."""


class CampaignAutoStopped(Event, frozen=True, kw_only=True):
    """ams-reporter stopped a campaign's AMS mailing (``stopMailing``) because one of its rates
    crossed the configured threshold (docs/autostop.md). ``event_id`` is
    ``autostop-{campaign}-{generation}``; the counts are those since the last resume."""

    subject_prefix: ClassVar[str] = "stats.campaign.autostopped"

    campaign_id: str = ""
    account_id: str = ""
    mailing_id: str = ""
    """The AMS mailing that was stopped (the campaign id)."""
    reason: str = ""
    """``hard_bounce_rate``, ``complaint_rate`` or ``failure_rate``."""
    rate: float = 0.0
    threshold: float = 0.0
    min_volume: int = 0
    sent: int = 0
    hard_bounced: int = 0
    failed: int = 0
    complained: int = 0
    generation: int = 1
    """1 for the first stop; each resume lets a later crossing stop it again (2, 3...)."""


class CampaignResumed(Event, frozen=True, kw_only=True):
    """An automatically stopped campaign was resumed (``startMailing``) through
    ``ams.control.resume``. ``event_id`` is ``autoresume-{campaign}-{generation}``."""

    subject_prefix: ClassVar[str] = "stats.campaign.resumed"

    campaign_id: str = ""
    account_id: str = ""
    mailing_id: str = ""
    generation: int = 1
    requested_by: str = ""
    started: bool = True
    """False when the stop had failed: the mailing was left as it was and only the auto-stop
    was cleared."""


# --- registry and codecs -----------------------------------------------------------------

#: Subject pattern -> struct. ``*`` stands for one token chosen at run time.
SUBJECTS: dict[str, type[Event]] = {
    "mail.accepted": MailAccepted,
    "mail.skipped": MailSkipped,
    "mail.submitted": MailSubmitted,
    "mail.failed": MailFailed,
    "mail.webhook_dead_lettered": WebhookDeadLettered,
    "mail.webhook_delivered": WebhookDelivered,
    "postal.*": PostalEvent,
    "track.open": TrackOpen,
    "track.click": TrackClick,
    "track.unsubscribe": TrackUnsubscribe,
    "track.batch": TrackBatch,
    "status.*": StatusEvent,
    "stats.postmaster.daily": PostmasterDaily,
    "stats.ams.mailing": AmsMailingProgress,
    "stats.campaign.autostopped": CampaignAutoStopped,
    "stats.campaign.resumed": CampaignResumed,
}

_encoder = msgspec.json.Encoder()
_decoders: dict[type[Event], msgspec.json.Decoder[Any]] = {
    cls: msgspec.json.Decoder(cls) for cls in SUBJECTS.values()
}


class SchemaError(ValueError):
    """A message on a subject could not be decoded as that subject's event."""


def struct_for_subject(subject: str) -> type[Event]:
    """The event struct for a concrete subject (``postal.MessageSent`` -> PostalEvent)."""
    if subject in SUBJECTS:
        return SUBJECTS[subject]
    head, _, _ = subject.partition(".")
    cls = SUBJECTS.get(f"{head}.*")
    if cls is None:
        raise SchemaError(f"no event schema for subject {subject!r}")
    return cls


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


E = TypeVar("E", bound=Event)


def decode(data: bytes, cls: type[E]) -> E:
    try:
        return _decoders[cls].decode(data)  # type: ignore[no-any-return]
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SchemaError(f"{cls.__name__}: {exc}") from exc


def decode_subject(subject: str, data: bytes) -> Event:
    """Decode a message using the schema registered for its subject."""
    return decode(data, struct_for_subject(subject))
