"""Automatic campaign stop: the rules (pure). See docs/autostop.md for the reasoning.

Per campaign (= AMS mailing id) ams-reporter keeps running totals of four status events:
``sent`` (Postal accepted the message), ``hard_bounced``, ``failed`` and ``complained``. Three
rates are checked after every update, each only once its denominator reached a minimum volume:

* hard-bounce rate = hard_bounced / sent
* complaint rate   = complained / sent
* failure rate     = failed / (sent + failed)   (failed messages were never sent)

A rate strictly above its threshold trips the stop. After a resume the totals at that moment
become the baseline: the rates and volumes are then measured on what came after.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

COUNTED_STATUSES = frozenset({"sent", "hard_bounced", "failed", "complained"})

Reason = Literal["complaint_rate", "hard_bounce_rate", "failure_rate"]


class Counts(msgspec.Struct, frozen=True, kw_only=True):
    sent: int = 0
    hard_bounced: int = 0
    failed: int = 0
    complained: int = 0

    def plus(self, other: Counts) -> Counts:
        return Counts(
            sent=self.sent + other.sent,
            hard_bounced=self.hard_bounced + other.hard_bounced,
            failed=self.failed + other.failed,
            complained=self.complained + other.complained,
        )

    def minus(self, other: Counts) -> Counts:
        return Counts(
            sent=max(0, self.sent - other.sent),
            hard_bounced=max(0, self.hard_bounced - other.hard_bounced),
            failed=max(0, self.failed - other.failed),
            complained=max(0, self.complained - other.complained),
        )

    @staticmethod
    def of(status: str) -> Counts:
        """One event of ``status`` (zero for statuses that are not counted)."""
        if status not in COUNTED_STATUSES:
            return Counts()
        return Counts(**{status: 1})


class Thresholds(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Rates are fractions (0.05 = 5 %); volumes are event counts."""

    enabled: bool = True
    hard_bounce_rate: float = 0.05
    hard_bounce_min_sent: int = 500
    complaint_rate: float = 0.003
    complaint_min_sent: int = 1000
    failure_rate: float = 0.10
    failure_min_attempted: int = 500


@dataclass(frozen=True)
class Trip:
    reason: Reason
    rate: float
    threshold: float
    min_volume: int
    volume: int


def evaluate(counts: Counts, t: Thresholds) -> Trip | None:
    """The first rate above its threshold (complaints, then hard bounces, then failures)."""
    if not t.enabled:
        return None
    sent = counts.sent
    if sent >= t.complaint_min_sent and sent > 0:
        rate = counts.complained / sent
        if rate > t.complaint_rate:
            return Trip("complaint_rate", rate, t.complaint_rate, t.complaint_min_sent, sent)
    if sent >= t.hard_bounce_min_sent and sent > 0:
        rate = counts.hard_bounced / sent
        if rate > t.hard_bounce_rate:
            return Trip("hard_bounce_rate", rate, t.hard_bounce_rate, t.hard_bounce_min_sent, sent)
    attempted = sent + counts.failed
    if attempted >= t.failure_min_attempted and attempted > 0:
        rate = counts.failed / attempted
        if rate > t.failure_rate:
            return Trip("failure_rate", rate, t.failure_rate, t.failure_min_attempted, attempted)
    return None


class ThresholdBook:
    """Default thresholds plus per-account overrides."""

    def __init__(self, default: Thresholds, overrides: dict[str, Thresholds] | None = None):
        self.default = default
        self.overrides = overrides or {}

    def for_account(self, account_id: str) -> Thresholds:
        return self.overrides.get(account_id, self.default)


def parse_overrides(text: str, default: Thresholds) -> dict[str, Thresholds]:
    """``AUTOSTOP_ACCOUNTS``: a JSON object ``{account_id: {field: value, ...}}``; each
    account's fields replace the defaults' (``{"acc1": {"enabled": false}}`` turns it off).
    Raises ValueError naming the problem."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object keyed by account id")
    result: dict[str, Thresholds] = {}
    base: dict[str, Any] = msgspec.structs.asdict(default)
    for account_id, fields in raw.items():
        if not isinstance(fields, dict):
            raise ValueError(f"account {account_id!r}: must be an object")
        try:
            merged = msgspec.convert({**base, **fields}, Thresholds)
        except msgspec.ValidationError as exc:
            raise ValueError(f"account {account_id!r}: {exc}") from None
        check_thresholds(merged, where=f"account {account_id!r}")
        result[str(account_id)] = merged
    return result


def check_thresholds(t: Thresholds, *, where: str = "") -> None:
    prefix = f"{where}: " if where else ""
    for name in ("hard_bounce_rate", "complaint_rate", "failure_rate"):
        value = getattr(t, name)
        if not 0 <= value <= 1:
            raise ValueError(f"{prefix}{name} must be a fraction between 0 and 1")
    for name in ("hard_bounce_min_sent", "complaint_min_sent", "failure_min_attempted"):
        if getattr(t, name) < 1:
            raise ValueError(f"{prefix}{name} must be at least 1")


_KEY_SAFE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def campaign_key(campaign_id: str) -> str:
    """A KV key for a campaign id (hashed when it has characters KV keys do not allow)."""
    if _KEY_SAFE.fullmatch(campaign_id):
        return campaign_id
    return "h_" + hashlib.sha256(campaign_id.encode()).hexdigest()[:40]


def mailing_id(campaign_id: str) -> int | str:
    """The AMS mailing id for a campaign id (AMS ids are integers)."""
    text = campaign_id.strip()
    return int(text) if text.isdigit() else text


# --- KV records ------------------------------------------------------------------------------

MarkerState = Literal["stopping", "stopped", "failed", "resumed"]


class CampaignCounters(msgspec.Struct, kw_only=True):
    """Bucket ``campaign-counters``, key ``campaign_key(campaign_id)``."""

    campaign_id: str
    account_id: str = ""
    totals: Counts = msgspec.field(default_factory=Counts)
    baseline: Counts = msgspec.field(default_factory=Counts)
    """Totals when the campaign was last resumed: rates are measured on what came after."""
    updated_at: float = 0.0

    def current(self) -> Counts:
        return self.totals.minus(self.baseline)


class AutoStopMarker(msgspec.Struct, kw_only=True):
    """Bucket ``campaign-autostop``, key ``campaign_key(campaign_id)``: the "once" guard.

    ``stopping`` (claimed: one process calls stopMailing) -> ``stopped`` (AMS confirmed;
    ``published`` once the event is out) or ``failed`` (gave up after max attempts) ->
    ``resumed`` (startMailing done; a new crossing starts generation + 1).
    """

    campaign_id: str
    account_id: str = ""
    mailing_id: str = ""
    state: MarkerState = "stopping"
    generation: int = 1
    reason: str = ""
    rate: float = 0.0
    threshold: float = 0.0
    min_volume: int = 0
    counts: Counts = msgspec.field(default_factory=Counts)
    owner: str = ""
    claimed_at: float = 0.0
    attempts: int = 0
    last_error: str = ""
    stopped_at: float | None = None
    published: bool = False
    resumed_at: float | None = None
