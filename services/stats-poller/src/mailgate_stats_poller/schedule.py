"""What to ask Postmaster for, and what its answers become (pure functions, no I/O).

Per cycle and per domain: one ``stat-list-detailed`` for the domain's totals and one per
active msgtype, each covering the days since that (domain, msgtype)'s cursor (the last day
already polled) plus the last ``repoll_days`` days, which Postmaster still revises; capped at
the API's one-year window and split into ``chunk_days`` ranges. With no cursor the first
poll reaches back ``initial_days``. A cursor only moves once that range's events are
published, so after downtime the next cycle backfills exactly the missed days.

Active msgtypes (decision): a msgtype is a campaign id, which is the AMS mailing id (design:
smtp-ingest sets ``X-Postmaster-Msgtype`` from the campaign header). stats-poller already
polls AMS ``getMailings``, so the active campaigns are the mailings that are running or
paused, or were last started within ``active_days`` (Postmaster reports a day's mail for a
few days after it was sent), newest first and capped at ``max_msgtypes``; plus any static
``POSTMASTER_MSGTYPES``. Reading them from AMS directly (rather than from recent
``stats.ams.mailing`` events) needs no consumer and survives a STATS stream purge.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import msgspec
from mailgate_core.ams import Mailing
from mailgate_core.schemas import PostmasterDaily

from .postmaster import DayStats

#: The API refuses ``date_from`` more than a year back; keep a day of margin.
MAX_AGE_DAYS = 364
MOSCOW_OFFSET_H = 3.0

CursorKey = tuple[str, str | None]
"""(domain, msgtype or None for the domain's totals)."""


def local_day(ts: float, tz_offset_h: float = MOSCOW_OFFSET_H) -> date:
    """The calendar day Postmaster files ``ts`` under (it reports in Moscow time)."""
    return datetime.fromtimestamp(ts + tz_offset_h * 3600, UTC).date()


@dataclass(frozen=True)
class StatRequest:
    domain: str
    msgtype: str | None
    date_from: date
    date_to: date

    @property
    def key(self) -> tuple[str, str]:
        """The rate-limit key: stat group, per domain."""
        return ("stat", self.domain.lower())


@dataclass(frozen=True)
class Window:
    repoll_days: int = 3
    initial_days: int = 30
    chunk_days: int = 31


def day_range(today: date, cursor: date | None, window: Window) -> tuple[date, date]:
    """The days to ask for: after the cursor plus the recent days Postmaster still revises."""
    oldest = today - timedelta(days=MAX_AGE_DAYS)
    if cursor is None:
        start = today - timedelta(days=max(1, window.initial_days) - 1)
    else:
        start = min(cursor, today) - timedelta(days=max(1, window.repoll_days) - 1)
    return max(oldest, min(start, today)), today


def chunks(start: date, end: date, chunk_days: int) -> list[tuple[date, date]]:
    """``[start, end]`` as consecutive ranges of at most ``chunk_days`` days, oldest first."""
    out = []
    step = max(1, chunk_days)
    while start <= end:
        last = min(end, start + timedelta(days=step - 1))
        out.append((start, last))
        start = last + timedelta(days=1)
    return out


def plan_cycle(
    domains: Sequence[str],
    msgtypes: Sequence[str],
    cursors: Mapping[CursorKey, date],
    today: date,
    window: Window,
) -> list[StatRequest]:
    """Every stat-list-detailed request of one cycle, domain totals before msgtypes."""
    requests: list[StatRequest] = []
    for msgtype in (None, *msgtypes):
        for domain in domains:
            start, end = day_range(today, cursors.get((domain, msgtype)), window)
            requests.extend(
                StatRequest(domain, msgtype, a, b) for a, b in chunks(start, end, window.chunk_days)
            )
    return requests


def _started(mailing: Mailing) -> datetime | None:
    text = (mailing.last_start_date or "").strip()
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def active_msgtypes(
    mailings: Iterable[Mailing],
    now: float,
    *,
    active_days: float,
    static: Sequence[str] = (),
    max_msgtypes: int = 20,
) -> list[str]:
    """Campaign ids worth a per-msgtype poll: static ones, then active AMS mailings."""
    horizon = datetime.fromtimestamp(now, UTC) - timedelta(days=active_days)
    ranked: list[tuple[bool, datetime, str]] = []
    for m in mailings:
        started = _started(m)
        live = m.state in ("running", "paused")
        recent = started is not None and started >= horizon
        if live or recent:
            ranked.append((live, started or horizon, str(m.id)))
    ranked.sort(reverse=True)
    out = list(dict.fromkeys(s for s in static if s))
    for _, _, mid in ranked:
        if mid not in out:
            out.append(mid)
    return out[: max(0, max_msgtypes)] if max_msgtypes else out


_FIELDS = (
    "messages_sent",
    "delivered",
    "read",
    "deleted_read",
    "deleted_unread",
    "spam",
    "probably_spam",
    "complaints",
    "reputation",
    "trend",
)


def daily_event(
    domain: str, msgtype: str | None, day: DayStats, occurred_at: float
) -> PostmasterDaily:
    """One day as a ``stats.postmaster.daily`` event.

    ``event_id`` is ``pm-`` + a hash of (domain, msgtype, date, values): re-polling an unchanged
    day gives the same id (JetStream and the ledger drop it), a revised day a new one. The
    ledger keeps one row per (domain, msgtype or '', date) and overwrites it with the newest.
    """
    values = {name: getattr(day, name) for name in _FIELDS}
    digest = hashlib.sha256(
        msgspec.json.encode([domain.lower(), msgtype or "", day.date, values])
    ).hexdigest()
    return PostmasterDaily(
        event_id=f"pm-{digest[:40]}",
        occurred_at=occurred_at,
        domain=domain.lower(),
        date=day.date,
        msgtype=msgtype,
        **values,
    )


def gauge_day(days: Sequence[DayStats], today: date) -> DayStats | None:
    """The day the gauges show: yesterday (the latest complete day), else the newest."""
    yesterday = (today - timedelta(days=1)).isoformat()
    dated = sorted((d for d in days if d.date), key=lambda d: d.date)
    complete = [d for d in dated if d.date <= yesterday]
    if complete:
        return complete[-1]
    return dated[-1] if dated else None


def trouble_check(message: str) -> str:
    """``"DMARC check failed."`` -> ``dmarc``; spf, dkim, dmarc or other."""
    text = message.lower()
    for check in ("dmarc", "dkim", "spf"):
        if check in text:
            return check
    return "other"


def cursor_key(domain: str, msgtype: str | None) -> str:
    """KV key of a cursor: ``cursor.<domain>`` or ``cursor.<domain>.=<hex(msgtype)>``.

    KV keys allow only ``[-/_=.a-zA-Z0-9]``, hence the hex; ``=`` never occurs in a domain, so
    keys cannot collide. The value carries domain and msgtype in clear (``Cursor``).
    """
    base = f"cursor.{domain.lower()}"
    return base if msgtype is None else f"{base}.={msgtype.encode().hex()}"


class Cursor(msgspec.Struct, kw_only=True):
    """The last day polled for (domain, msgtype), stored in the ``stats-poller`` KV bucket."""

    domain: str
    msgtype: str | None = None
    last_date: str
    updated_at: float = 0.0
