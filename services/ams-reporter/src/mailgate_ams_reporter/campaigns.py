"""Automatic campaign stop: counting, stopping once, resuming (the rules are in autostop.py).

* ``CampaignTally`` counts from the delivery consumer of ``status.>`` (handlers.StatusHandler):
  a status message is acked only once its event is counted. ``CampaignCounter`` adds a batch
  of events to the campaigns' records in the ``campaign-counters`` KV bucket (compare-and-set,
  so replicas never lose an update), then checks the thresholds.
* ``AutoStopper`` turns a crossing into exactly one ``stopMailing``: the first process to
  create (or, after a resume, advance) the campaign's marker in ``campaign-autostop`` owns the
  stop; everyone else sees the marker and does nothing. A failed call releases the marker and
  the periodic sweep retries it (up to ``max_attempts``); a process that died mid-call loses
  its claim after ``lease_s``. Once AMS confirmed, ``stats.campaign.autostopped`` is published
  (the sweep re-publishes it if that failed).
* ``Control`` answers NATS requests: ``ams.control.resume`` ``{"campaign_id": "73"}`` calls
  ``startMailing`` and re-arms the auto-stop; ``ams.control.stop`` calls ``stopMailing`` for
  an operator (the marker records it as a ``manual`` stop, so resume works the same way);
  ``ams.control.autostops`` lists the markers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from mailgate_core.ams import AmsClient, AmsError
from mailgate_core.nats import PublishError, publish_event
from mailgate_core.schemas import (
    CampaignAutoStopped,
    CampaignResumed,
    StatusEvent,
)
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from .autostop import (
    COUNTED_STATUSES,
    AutoStopMarker,
    CampaignCounters,
    Counts,
    ThresholdBook,
    Trip,
    campaign_key,
    evaluate,
    mailing_id,
)
from .metrics import AutostopMetrics

log = structlog.get_logger()

KV_CAMPAIGN_COUNTERS = "campaign-counters"
KV_CAMPAIGN_AUTOSTOP = "campaign-autostop"
CONTROL_RESUME = "ams.control.resume"
CONTROL_STOP = "ams.control.stop"
CONTROL_AUTOSTOPS = "ams.control.autostops"
CONTROL_QUEUE = "ams-reporter"

_counters_decoder = msgspec.json.Decoder(CampaignCounters)
_marker_decoder = msgspec.json.Decoder(AutoStopMarker)
_encoder = msgspec.json.Encoder()


async def ensure_bucket(
    js: JetStreamContext, bucket: str, *, ttl_s: float | None, replicas: int = 1
) -> KeyValue:
    """Open ``bucket``, creating it when missing (idempotent across replicas)."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(
            KeyValueConfig(
                bucket=bucket, history=1, ttl=ttl_s, storage=StorageType.FILE, replicas=replicas
            )
        )
    except nats.js.errors.BadRequestError:  # created meanwhile by another replica
        return await js.key_value(bucket)


class ConflictError(Exception):
    """Too many concurrent updates of one key."""


class CounterStore:
    """Per-campaign running totals in ``campaign-counters`` (compare-and-set updates)."""

    def __init__(self, kv: KeyValue, *, max_tries: int = 20) -> None:
        self._kv = kv
        self._max_tries = max_tries

    async def get(self, campaign_id: str) -> tuple[CampaignCounters | None, int | None]:
        try:
            entry = await self._kv.get(campaign_key(campaign_id))
        except nats.js.errors.KeyNotFoundError:
            return None, None
        return _counters_decoder.decode(entry.value or b"{}"), entry.revision

    async def _change(self, campaign_id: str, account_id: str, change: Any) -> CampaignCounters:
        key = campaign_key(campaign_id)
        for _ in range(self._max_tries):
            record, revision = await self.get(campaign_id)
            if record is None:
                record = CampaignCounters(campaign_id=campaign_id, account_id=account_id)
            change(record)
            record.updated_at = time.time()
            if not record.account_id:
                record.account_id = account_id
            try:
                if revision is None:
                    await self._kv.create(key, _encoder.encode(record))
                else:
                    await self._kv.update(key, _encoder.encode(record), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                await asyncio.sleep(random.uniform(0, 0.01))
                continue
            return record
        raise ConflictError(f"campaign {campaign_id}: too many concurrent updates")

    async def add(self, campaign_id: str, account_id: str, delta: Counts) -> CampaignCounters:
        def change(record: CampaignCounters) -> None:
            record.totals = record.totals.plus(delta)

        return await self._change(campaign_id, account_id, change)

    async def rebase(self, campaign_id: str, account_id: str = "") -> CampaignCounters:
        """Make the current totals the baseline (on resume)."""

        def change(record: CampaignCounters) -> None:
            record.baseline = record.totals

        return await self._change(campaign_id, account_id, change)


def marker_view(marker: AutoStopMarker) -> dict[str, Any]:
    """What ``ams.control.*`` replies carry (and the admin API can show)."""
    view: dict[str, Any] = msgspec.to_builtins(marker)
    view.pop("owner", None)
    view.pop("claimed_at", None)
    return view


def problem(status: int, title: str, detail: str) -> dict[str, Any]:
    return {"error": {"type": "about:blank", "title": title, "status": status, "detail": detail}}


class AutoStopper:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        markers: KeyValue,
        counters: CounterStore,
        ams: AmsClient | None,
        metrics: AutostopMetrics,
        owner: str,
        lease_s: float = 180.0,
        max_attempts: int = 10,
    ) -> None:
        self._js = js
        self._kv = markers
        self._counters = counters
        self._ams = ams
        self._metrics = metrics
        self.owner = owner
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self._tasks: set[asyncio.Task[None]] = set()

    async def _get(self, key: str) -> tuple[AutoStopMarker | None, int | None]:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None, None
        return _marker_decoder.decode(entry.value or b"{}"), entry.revision

    async def _put(self, key: str, marker: AutoStopMarker, revision: int | None) -> int | None:
        """Compare-and-set; None when someone else changed the marker first."""
        try:
            if revision is None:
                return await self._kv.create(key, _encoder.encode(marker))
            return await self._kv.update(key, _encoder.encode(marker), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    # --- stopping ------------------------------------------------------------------------

    async def on_trip(self, counters: CampaignCounters, trip: Trip) -> bool:
        """Claim the stop of this campaign; True when this call claimed it (and stops it)."""
        key = campaign_key(counters.campaign_id)
        current, revision = await self._get(key)
        if current is not None and current.state != "resumed":
            return False  # stopping, stopped or failed already: once is enough
        marker = AutoStopMarker(
            campaign_id=counters.campaign_id,
            account_id=counters.account_id,
            mailing_id=str(mailing_id(counters.campaign_id)),
            state="stopping",
            generation=current.generation + 1 if current is not None else 1,
            reason=trip.reason,
            rate=trip.rate,
            threshold=trip.threshold,
            min_volume=trip.min_volume,
            counts=counters.current(),
            owner=self.owner,
            claimed_at=time.time(),
        )
        new_revision = await self._put(key, marker, revision)
        if new_revision is None:
            return False
        log.warning(
            "campaign threshold crossed",
            campaign_id=marker.campaign_id,
            account_id=marker.account_id,
            reason=trip.reason,
            rate=round(trip.rate, 5),
            threshold=trip.threshold,
            volume=trip.volume,
            generation=marker.generation,
        )
        self._spawn(self._stop(key, marker, new_revision))
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop(self, key: str, marker: AutoStopMarker, revision: int) -> None:
        clog = log.bind(campaign_id=marker.campaign_id, mailing_id=marker.mailing_id)
        marker.attempts += 1
        try:
            if self._ams is None:
                raise AmsError("AMS API not configured (AMS_API_URL, AMS_API_KEY)")
            await self._ams.stop_mailing(mailing_id(marker.campaign_id))
        except AmsError as exc:
            self._metrics.stop_failures.inc()
            marker.last_error = str(exc)[:200]
            marker.owner = ""  # released: the next sweep (any replica) tries again
            if marker.attempts >= self.max_attempts:
                marker.state = "failed"
                clog.error("campaign stop failed", attempts=marker.attempts, error=str(exc))
            else:
                clog.warning(
                    "campaign stop attempt failed", attempts=marker.attempts, error=str(exc)
                )
            await self._put(key, marker, revision)
            return
        marker.state = "stopped"
        marker.stopped_at = time.time()
        marker.last_error = ""
        new_revision = await self._put(key, marker, revision)
        if new_revision is None:
            clog.warning("campaign stop marker changed meanwhile")
            return
        self._metrics.stops.labels(marker.reason).inc()
        clog.warning(
            "campaign stopped automatically",
            reason=marker.reason,
            rate=round(marker.rate, 5),
            threshold=marker.threshold,
            generation=marker.generation,
        )
        await self._publish(key, marker, new_revision)

    async def _publish(self, key: str, marker: AutoStopMarker, revision: int) -> None:
        c = marker.counts
        event = CampaignAutoStopped(
            event_id=f"autostop-{key}-{marker.generation}",
            occurred_at=marker.stopped_at or time.time(),
            campaign_id=marker.campaign_id,
            account_id=marker.account_id,
            mailing_id=marker.mailing_id,
            reason=marker.reason,
            rate=marker.rate,
            threshold=marker.threshold,
            min_volume=marker.min_volume,
            sent=c.sent,
            hard_bounced=c.hard_bounced,
            failed=c.failed,
            complained=c.complained,
            generation=marker.generation,
        )
        try:
            await publish_event(self._js, event)
        except PublishError as exc:
            log.warning(
                "autostop event not published", campaign_id=marker.campaign_id, error=str(exc)
            )
            return  # the sweep publishes it later
        marker.published = True
        await self._put(key, marker, revision)

    async def sweep(self) -> None:
        """Retry released or abandoned stops, publish unpublished events, refresh the gauge."""
        stopped_now = 0
        for key in await self._keys():
            marker, revision = await self._get(key)
            if marker is None or revision is None:
                continue
            if marker.state == "stopped":
                stopped_now += 1
                if not marker.published:
                    await self._publish(key, marker, revision)
            elif marker.state == "stopping":
                abandoned = time.time() - marker.claimed_at > self.lease_s
                if marker.owner and not abandoned:
                    continue
                marker.owner = self.owner
                marker.claimed_at = time.time()
                new_revision = await self._put(key, marker, revision)
                if new_revision is not None:
                    await self._stop(key, marker, new_revision)
        self._metrics.stopped_now.set(stopped_now)

    async def _keys(self) -> list[str]:
        try:
            return list(await self._kv.keys())
        except nats.js.errors.NoKeysError:
            return []

    async def markers(self, campaign_id: str | None = None) -> list[AutoStopMarker]:
        keys = [campaign_key(campaign_id)] if campaign_id else await self._keys()
        found = []
        for key in keys:
            marker, _ = await self._get(key)
            if marker is not None:
                found.append(marker)
        return found

    # --- stopping by hand (operator console, admin API) -----------------------------------

    async def stop_manually(self, campaign_id: str, *, requested_by: str = "") -> dict[str, Any]:
        """``stopMailing`` now, with this process's AMS client; the marker then says
        ``stopped`` (reason ``manual``), so the auto-stop stays quiet and resume starts it."""
        key = campaign_key(campaign_id)
        marker, revision = await self._get(key)
        if marker is not None and marker.state == "stopping":
            return problem(409, "Conflict", f"campaign {campaign_id} is being stopped already")
        if self._ams is None:
            return problem(503, "Service unavailable", "AMS API not configured")
        try:
            await self._ams.stop_mailing(mailing_id(campaign_id))
        except AmsError as exc:
            log.warning("campaign manual stop failed", campaign_id=campaign_id, error=str(exc))
            return problem(502, "Bad gateway", f"AMS stopMailing failed: {exc}")
        for _ in range(5):
            if marker is not None and marker.state == "stopped":
                break  # stopped already (automatically or by hand): AMS was told again
            new = AutoStopMarker(
                campaign_id=campaign_id,
                account_id=marker.account_id if marker is not None else "",
                mailing_id=str(mailing_id(campaign_id)),
                state="stopped",
                generation=marker.generation + 1 if marker is not None else 1,
                reason="manual",
                attempts=1,
                stopped_at=time.time(),
                published=True,  # not an automatic stop: no stats.campaign.autostopped
                counts=marker.counts if marker is not None else Counts(),
            )
            if await self._put(key, new, revision) is not None:
                marker = new
                break
            marker, revision = await self._get(key)
        log.warning("campaign stopped by hand", campaign_id=campaign_id, requested_by=requested_by)
        assert marker is not None
        return marker_view(marker) | {"requested_by": requested_by}

    # --- resuming ------------------------------------------------------------------------

    async def resume(self, campaign_id: str, *, requested_by: str = "") -> dict[str, Any]:
        key = campaign_key(campaign_id)
        marker, revision = await self._get(key)
        if marker is None or revision is None:
            return problem(
                404, "Not found", f"campaign {campaign_id} was not stopped automatically"
            )
        if marker.state == "resumed":
            return marker_view(marker)  # idempotent: a repeated resume is not an error
        if marker.state == "stopping":
            return problem(409, "Conflict", f"campaign {campaign_id} is being stopped; try again")
        started = marker.state == "stopped"
        if started:
            if self._ams is None:
                return problem(503, "Service unavailable", "AMS API not configured")
            try:
                await self._ams.start_mailing(mailing_id(campaign_id))
            except AmsError as exc:
                log.warning("campaign resume failed", campaign_id=campaign_id, error=str(exc))
                return problem(502, "Bad gateway", f"AMS startMailing failed: {exc}")
        # Baseline first: a crossing evaluated in between still sees the marker as stopped.
        await self._counters.rebase(campaign_id, marker.account_id)
        marker.state = "resumed"
        marker.resumed_at = time.time()
        marker.owner = ""
        if await self._put(key, marker, revision) is None:
            return problem(409, "Conflict", f"campaign {campaign_id} changed meanwhile; try again")
        self._metrics.resumes.inc()
        log.warning(
            "campaign resumed",
            campaign_id=campaign_id,
            started=started,
            requested_by=requested_by,
            generation=marker.generation,
        )
        with contextlib.suppress(PublishError):
            await publish_event(
                self._js,
                CampaignResumed(
                    event_id=f"autoresume-{key}-{marker.generation}",
                    campaign_id=campaign_id,
                    account_id=marker.account_id,
                    mailing_id=marker.mailing_id,
                    generation=marker.generation,
                    requested_by=requested_by,
                    started=started,
                ),
            )
        return marker_view(marker)

    async def close(self, timeout_s: float = 10.0) -> None:
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()


@dataclass
class _Group:
    account_id: str
    delta: Counts = field(default_factory=Counts)
    indexes: list[int] = field(default_factory=list)
    newest: float = 0.0
    statuses: Tally[str] = field(default_factory=Tally)


def is_counted(event: StatusEvent) -> bool:
    """Whether ``event`` adds to its campaign's counters (a replay from the dead letters is
    not a new fact)."""
    return bool(
        event.message.campaign_id and event.name in COUNTED_STATUSES and not event.endpoint_ids
    )


class CampaignCounter:
    """Adds status events to the per-campaign counters and checks the thresholds."""

    def __init__(
        self,
        *,
        store: CounterStore,
        stopper: AutoStopper,
        thresholds: ThresholdBook,
        metrics: AutostopMetrics,
        recent_s: float = 86400.0,
    ) -> None:
        self._store = store
        self._stopper = stopper
        self._thresholds = thresholds
        self._metrics = metrics
        self._recent_s = recent_s

    @property
    def metrics(self) -> AutostopMetrics:
        return self._metrics

    async def count(self, events: Sequence[StatusEvent]) -> list[bool]:
        """One compare-and-set per campaign for the lot; per event, whether its count is
        stored (False: try again later). Events that are not counted are True at once."""
        stored = [True] * len(events)
        groups: dict[str, _Group] = {}
        for index, event in enumerate(events):
            if not is_counted(event):
                continue
            campaign_id = event.message.campaign_id
            assert campaign_id is not None
            group = groups.setdefault(campaign_id, _Group(event.message.account_id))
            group.delta = group.delta.plus(Counts.of(event.name))
            group.indexes.append(index)
            group.newest = max(group.newest, event.occurred_at)
            group.statuses[event.name] += 1
        for campaign_id, group in groups.items():
            try:
                counters = await self._store.add(campaign_id, group.account_id, group.delta)
            except (ConflictError, nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                log.warning(
                    "campaign counters not updated", campaign_id=campaign_id, error=str(exc)
                )
                for index in group.indexes:
                    stored[index] = False
                continue
            for status, count in group.statuses.items():
                self._metrics.counted.labels(status).inc(count)
            if time.time() - group.newest > self._recent_s:
                continue  # replaying old history (a new consumer): count, never stop
            trip = evaluate(counters.current(), self._thresholds.for_account(counters.account_id))
            if trip is None:
                continue
            try:
                await self._stopper.on_trip(counters, trip)
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                # The counts are in; the next event of this campaign checks again.
                log.warning("campaign stop not claimed", campaign_id=campaign_id, error=str(exc))
        return stored


class CampaignTally:
    """Counting from the delivery consumer of ``status.>`` (no consumer of its own).

    Each status message's handler ``submit``s its event and, before its message is acked,
    awaits the future: True once the count is stored in ``campaign-counters``. Events are
    gathered for up to ``linger_s`` (or ``max_events``) and written by one ``count`` call (one
    compare-and-set per campaign), one write at a time, so a burst costs a few KV round trips
    instead of one per event, and every status message is fetched and acked once, not twice.
    """

    def __init__(
        self, counter: CampaignCounter, *, linger_s: float = 0.05, max_events: int = 1024
    ) -> None:
        self._counter = counter
        self._linger_s = linger_s
        self._max_events = max_events
        self._waiting: list[tuple[StatusEvent, asyncio.Future[bool]]] = []
        self._full = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._write = asyncio.Lock()

    def give_up(self, event: StatusEvent) -> None:
        """Counting ``event`` failed on every delivery: it is left out (logged, counted)."""
        self._counter.metrics.dropped.labels(event.name).inc()
        log.error(
            "campaign count given up",
            campaign_id=event.message.campaign_id,
            mailgate_id=event.message.mailgate_id,
            event_id=event.event_id,
            status=event.name,
        )

    def submit(self, event: StatusEvent) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((event, future))
        if self._flusher is None:
            self._full.clear()
            self._flusher = asyncio.create_task(self._flush_soon(), name="autostop-count")
        elif len(self._waiting) >= self._max_events:
            self._full.set()
        return future

    async def _flush_soon(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._linger_s):
                await self._full.wait()
        batch, self._waiting = self._waiting, []
        self._flusher = None  # what comes in meanwhile goes to the next write
        stored: list[bool] = [False] * len(batch)
        try:
            async with self._write:
                stored = await self._counter.count([event for event, _ in batch])
        except Exception:
            log.exception("campaign counting crashed", events=len(batch))
        finally:
            for (_, future), ok in zip(batch, stored, strict=True):
                if not future.done():
                    future.set_result(ok)


class Control:
    """NATS request/reply for the admin API: resume and list automatic stops."""

    def __init__(self, nc: NATS, stopper: AutoStopper) -> None:
        self._nc = nc
        self._stopper = stopper
        self._subs: list[Any] = []

    async def start(self) -> None:
        self._subs.append(
            await self._nc.subscribe(CONTROL_RESUME, queue=CONTROL_QUEUE, cb=self._on_resume)
        )
        self._subs.append(
            await self._nc.subscribe(CONTROL_STOP, queue=CONTROL_QUEUE, cb=self._on_stop)
        )
        self._subs.append(
            await self._nc.subscribe(CONTROL_AUTOSTOPS, queue=CONTROL_QUEUE, cb=self._on_list)
        )
        await self._nc.flush(timeout=5)  # subscribed on the server before start() returns

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    @staticmethod
    def _body(msg: Msg) -> dict[str, Any] | None:
        try:
            body = json.loads(msg.data or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return body if isinstance(body, dict) else None

    async def _reply(self, msg: Msg, answer: dict[str, Any]) -> None:
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps(answer).encode())

    async def _on_resume(self, msg: Msg) -> None:
        await self._on_control(msg, "resume")

    async def _on_stop(self, msg: Msg) -> None:
        await self._on_control(msg, "stop")

    async def _on_control(self, msg: Msg, action: str) -> None:
        body = self._body(msg)
        campaign_id = str(body.get("campaign_id") or "").strip() if body is not None else ""
        if not campaign_id:
            await self._reply(
                msg, problem(400, "Bad request", 'expected {"campaign_id": "<AMS mailing id>"}')
            )
            return
        assert body is not None
        requested_by = str(body.get("requested_by") or "")
        try:
            if action == "stop":
                answer = await self._stopper.stop_manually(campaign_id, requested_by=requested_by)
            else:
                answer = await self._stopper.resume(campaign_id, requested_by=requested_by)
        except Exception as exc:
            log.exception("campaign control crashed", campaign_id=campaign_id, action=action)
            answer = problem(500, "Internal error", type(exc).__name__)
        await self._reply(msg, answer)

    async def _on_list(self, msg: Msg) -> None:
        body = self._body(msg) or {}
        campaign_id = str(body.get("campaign_id") or "").strip() or None
        try:
            markers = await self._stopper.markers(campaign_id)
        except Exception as exc:
            log.exception("autostop listing crashed")
            await self._reply(msg, problem(500, "Internal error", type(exc).__name__))
            return
        await self._reply(msg, {"items": [marker_view(m) for m in markers]})
