"""Polls AMS ``getMailings`` on a timer: publishes progress events, sets Prometheus gauges."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from mailgate_core.nats import PublishError, publish_event
from mailgate_core.schemas import AmsMailingProgress
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge

from .ams_client import AmsClient, AmsError
from .progress import to_event

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
        self.polls = Counter(
            "mailgate_ams_polls", "AMS polls by result.", ["result"], registry=registry
        )
        self.last_success = Gauge(
            "mailgate_ams_last_success_timestamp_seconds",
            "Unix time of the last successful AMS poll.",
            registry=registry,
        )
        self._states: dict[str, str] = {}

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
        for mid in set(self._states) - seen:
            for gauge in (*self.counts.values(), self.progress, self.speed):
                with contextlib.suppress(KeyError):
                    gauge.remove(mid)
            with contextlib.suppress(KeyError):
                self.state.remove(mid, self._states.pop(mid))


class AmsPoller:
    def __init__(
        self,
        client: AmsClient,
        js: JetStreamContext,
        metrics: AmsMetrics,
        *,
        interval_s: float,
    ) -> None:
        self._client = client
        self._js = js
        self._metrics = metrics
        self._interval_s = interval_s
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def poll_once(self) -> list[AmsMailingProgress]:
        """One poll; raises AmsError when AMS could not be read."""
        events = [to_event(m) for m in await self._client.get_mailings()]
        published = 0
        for event in events:
            try:
                await publish_event(self._js, event)
                published += 1
            except PublishError as exc:
                log.warning("ams progress not published", mailing=event.mailing_id, error=str(exc))
        self._metrics.update(events)
        self._metrics.last_success.set(time.time())
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
