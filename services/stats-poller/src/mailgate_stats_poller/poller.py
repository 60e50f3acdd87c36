"""Polls AMS on a timer: ``getMailings`` for every mailing, ``getRelaysSendingStates`` for the
running ones; sets Prometheus gauges and publishes ``stats.ams.mailing`` when a mailing
changed (or ``republish_s`` passed), so idle mailings do not flood the STATS stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog
from mailgate_core.ams import AmsClient, AmsError, Mailing, RelaySendingState
from mailgate_core.nats import PublishError, publish_event
from mailgate_core.schemas import AmsMailingProgress
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .progress import same_progress, to_event

log = structlog.get_logger()

#: Gauge suffix -> AmsMailingProgress field, all labelled by ``mailing`` (the AMS mailing id).
COUNT_GAUGES: dict[str, str] = {
    "total": "total",
    "sent": "sent",
    "not_sent": "not_sent",
    "bad": "bad",
    "refused": "refused",
    "excluded": "excluded",
    "opened": "opened",
    "clicks": "clicks",
}


class AmsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.counts = {
            suffix: Gauge(
                f"mailgate_ams_mailing_{suffix}",
                f"AMS progressInfo.{suffix} of a mailing.",
                ["mailing"],
                registry=registry,
            )
            for suffix in COUNT_GAUGES
        }
        self.progress = Gauge(
            "mailgate_ams_mailing_progress_ratio",
            "AMS progressInfo.percentDone / 100.",
            ["mailing"],
            registry=registry,
        )
        self.speed = Gauge(
            "mailgate_ams_mailing_speed_per_second",
            "AMS approxSpeed of a mailing, messages per second.",
            ["mailing"],
            registry=registry,
        )
        self.state = Gauge(
            "mailgate_ams_mailing_state",
            "1 for the mailing's current AMS state (idle, running, paused).",
            ["mailing", "state"],
            registry=registry,
        )
        self.relay_sent = Gauge(
            "mailgate_ams_relay_sent",
            "Messages sent through an SMTP relay by a running mailing (getRelaysSendingStates).",
            ["mailing", "relay"],
            registry=registry,
        )
        self.relay_errors = Gauge(
            "mailgate_ams_relay_errors",
            "Sending errors of an SMTP relay in a running mailing.",
            ["mailing", "relay"],
            registry=registry,
        )
        self.relay_enabled = Gauge(
            "mailgate_ams_relay_enabled",
            "1 when the relay is enabled for the running mailing.",
            ["mailing", "relay"],
            registry=registry,
        )
        self.polls = Counter(
            "mailgate_ams_polls", "AMS polls by result.", ["result"], registry=registry
        )
        self.requests = Counter(
            "mailgate_ams_requests",
            "AMS JSON-RPC attempts by method and outcome (ok, busy, auth, timeout, ...).",
            ["method", "outcome"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "mailgate_ams_request_duration_seconds",
            "AMS JSON-RPC call duration.",
            ["method"],
            registry=registry,
        )
        self.events = Counter(
            "mailgate_ams_progress_events_published",
            "stats.ams.mailing events published.",
            registry=registry,
        )
        self.last_success = Gauge(
            "mailgate_ams_last_success_timestamp_seconds",
            "Unix time of the last successful AMS poll.",
            registry=registry,
        )
        self._states: dict[str, str] = {}
        self._relays: dict[str, set[str]] = {}

    def observe_call(self, method: str, outcome: str, seconds: float) -> None:
        self.requests.labels(method, outcome).inc()
        self.request_duration.labels(method).observe(seconds)

    def update(self, events: list[AmsMailingProgress]) -> None:
        """Set every gauge from this poll and drop the series of mailings AMS no longer lists."""
        seen = set()
        for e in events:
            mid = e.mailing_id
            seen.add(mid)
            for suffix, field in COUNT_GAUGES.items():
                self.counts[suffix].labels(mid).set(getattr(e, field))
            self.progress.labels(mid).set(e.percent_done / 100.0)
            self.speed.labels(mid).set(e.approx_speed_per_min / 60.0)
            previous = self._states.get(mid)
            if previous is not None and previous != e.state:
                with contextlib.suppress(KeyError):
                    self.state.remove(mid, previous)
            self.state.labels(mid, e.state).set(1)
            self._states[mid] = e.state
            relays = {r.relay for r in e.relays}
            for r in e.relays:
                self.relay_sent.labels(mid, r.relay).set(r.sent)
                self.relay_errors.labels(mid, r.relay).set(r.errors)
                self.relay_enabled.labels(mid, r.relay).set(1 if r.enabled else 0)
            self._drop_relays(mid, self._relays.get(mid, set()) - relays)
            self._relays[mid] = relays
        for mid in set(self._states) - seen:
            for gauge in (*self.counts.values(), self.progress, self.speed):
                with contextlib.suppress(KeyError):
                    gauge.remove(mid)
            with contextlib.suppress(KeyError):
                self.state.remove(mid, self._states.pop(mid))
            self._drop_relays(mid, self._relays.pop(mid, set()))

    def _drop_relays(self, mid: str, relays: set[str]) -> None:
        for relay in relays:
            for gauge in (self.relay_sent, self.relay_errors, self.relay_enabled):
                with contextlib.suppress(KeyError):
                    gauge.remove(mid, relay)


class AmsPoller:
    def __init__(
        self,
        client: AmsClient,
        js: JetStreamContext,
        metrics: AmsMetrics,
        *,
        interval_s: float,
        poll_relays: bool = True,
        republish_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._js = js
        self._metrics = metrics
        self._interval_s = interval_s
        self._poll_relays = poll_relays
        self._republish_s = republish_s
        self._clock = clock
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._published: dict[str, tuple[AmsMailingProgress, float]] = {}
        #: The mailings of the last successful poll (read by the Postmaster scheduler).
        self.mailings: list[Mailing] = []
        self.polled = asyncio.Event()

    async def _relays(self, mailing: Mailing) -> list[RelaySendingState]:
        if not self._poll_relays or mailing.state != "running":
            return []
        try:
            return await self._client.get_relays_sending_states(mailing.id)
        except AmsError as exc:  # e.g. it finished between the two calls
            log.warning("ams relay states not read", mailing=str(mailing.id), error=str(exc))
            return []

    async def poll_once(self) -> list[AmsMailingProgress]:
        """One poll; raises AmsError when AMS could not be read."""
        mailings = await self._client.get_mailings()
        events = [to_event(m, await self._relays(m)) for m in mailings]
        self._metrics.update(events)
        now = self._clock()
        published = 0
        for event in events:
            last = self._published.get(event.mailing_id)
            if (
                last is not None
                and same_progress(last[0], event)
                and now - last[1] < self._republish_s
            ):
                continue
            try:
                await publish_event(self._js, event)
            except PublishError as exc:
                log.warning("ams progress not published", mailing=event.mailing_id, error=str(exc))
                continue
            self._published[event.mailing_id] = (event, now)
            published += 1
        self._metrics.events.inc(published)
        for gone in set(self._published) - {e.mailing_id for e in events}:
            del self._published[gone]
        self.mailings = mailings
        self.polled.set()
        self._metrics.last_success.set(now)
        log.info("ams polled", mailings=len(events), published=published)
        return events

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.poll_once()
                self._metrics.polls.labels("ok").inc()
            except AmsError as exc:
                self._metrics.polls.labels("error").inc()
                log.warning("ams poll failed", error=str(exc))
            except Exception:
                self._metrics.polls.labels("error").inc()
                log.exception("ams poll crashed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval_s)

    async def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="ams-poller")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            # Let a poll in flight finish briefly, then cancel it: the next start polls again.
            done, _ = await asyncio.wait({self._task}, timeout=5.0)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
