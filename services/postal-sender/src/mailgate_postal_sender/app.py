"""postal-sender: ``mail.accepted`` -> Postal send/raw -> ``mail.submitted`` / ``mail.failed``.

Also in this process: the ``postal-sender-final`` consumer that marks submissions final from
``postal.*`` events, and the leader-elected reconciler (reconcile.py).
"""

from __future__ import annotations

import asyncio
import os
import socket

import aiohttp
import structlog
from mailgate_core.config import BaseSettings, ConfigError, Secret
from mailgate_core.flow import FlowWorker
from mailgate_core.ids import new_ulid
from mailgate_core.nats import (
    KV_ACCOUNTS,
    KV_SUBMISSIONS,
    OBJECT_STORE_MAIL,
    per_message,
)
from mailgate_core.nats_wire import JetStreamRequests
from mailgate_core.service import ServiceBase
from prometheus_client import CollectorRegistry

from .client import PostalClient, new_session
from .leader import LeaderLock
from .limits import Circuit
from .metrics import Metrics
from .pending import (
    FINAL_DURABLE,
    KV_LOCKS,
    KV_PENDING,
    PENDING_TTL_S,
    FinalMarker,
    ensure_bucket,
)
from .reconcile import Reconciler
from .sender import ApiKeys, Sender, submission_key

log = structlog.get_logger()

DURABLE = "postal-sender"
FILTER_SUBJECT = "mail.accepted"
LOCK_KEY = "reconciler"
#: postal.* events handled at once by the final-marker consumer (a KV put each).
FINAL_CONCURRENCY = 64


class Settings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "postal-sender"
    ops_port: int = 9102
    postal_api_url: str
    postal_api_key: Secret = Secret("")
    postal_timeout_s: float = 10.0
    send_concurrency: int = 32
    """Messages handled at once per replica (shared by SEND_FETCHERS pull loops)."""
    send_fetchers: int = 1
    """Pull loops on the one durable. Each keeps standing pull requests for its free slots
    (no batch waits for its slowest message), so one is enough; more only add requests."""
    postal_max_in_flight: int = 16
    """Requests in flight per Postal server (API key) per replica."""
    postal_rate_per_s: float = 0.0
    """Requests per second per Postal server per replica (token bucket); 0 = no cap."""
    postal_circuit_failures: int = 5
    """Consecutive transport failures (timeout, connection error, HTTP 5xx) that open the
    circuit: /readyz fails and only one probe request goes out at a time."""
    postal_circuit_open_s: float = 5.0
    """First wait before a probe; doubles per failed probe up to 60 s."""
    retry_deadline_s: float = 86400.0
    retry_base_s: float = 1.0
    """First retry delay; it doubles per delivery (with jitter) up to 5 minutes."""
    account_cache_s: float = 5.0
    """How long an account's Postal API key read from KV is reused; 0 = read it per message."""
    ack_wait_s: float = 0.0
    """JetStream ack wait of the mail.accepted consumer; 0 = derived from the timeouts."""
    reconcile_enabled: bool = True
    reconcile_after_s: float = 3600.0
    """Age after which a submission without a final status is looked up in Postal."""
    reconcile_interval_s: float = 300.0
    reconcile_batch: int = 1000
    """Most messages looked up per pass."""
    reconcile_lock_ttl_s: float = 30.0
    mailgate_test_crash_after_submit: int = 0
    """Fault injection for tests only: exit(137) after the N-th stored submission record,
    before mail.submitted is published and the message acked (what kill -9 can hit)."""

    def validate(self) -> None:
        if not self.postal_api_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"config error: POSTAL_API_URL={self.postal_api_url!r} is not an http(s) URL"
            )
        if self.postal_timeout_s <= 0:
            raise ConfigError("config error: POSTAL_TIMEOUT_S must be positive")
        if self.send_concurrency < 1:
            raise ConfigError("config error: SEND_CONCURRENCY must be at least 1")
        if self.postal_max_in_flight < 1:
            raise ConfigError("config error: POSTAL_MAX_IN_FLIGHT must be at least 1")
        if self.postal_rate_per_s < 0:
            raise ConfigError("config error: POSTAL_RATE_PER_S must not be negative")
        if self.postal_circuit_failures < 1:
            raise ConfigError("config error: POSTAL_CIRCUIT_FAILURES must be at least 1")
        if self.reconcile_interval_s <= 0 or self.reconcile_lock_ttl_s <= 0:
            raise ConfigError(
                "config error: RECONCILE_INTERVAL_S and RECONCILE_LOCK_TTL_S must be positive"
            )


def ack_wait_s(settings: Settings) -> float:
    """Long enough for a full batch: KV/object reads, waiting for a slot and the rate cap, one
    Postal call, KV puts and publish."""
    if settings.ack_wait_s > 0:
        return settings.ack_wait_s
    rate_wait = (
        settings.send_concurrency / settings.postal_rate_per_s
        if settings.postal_rate_per_s
        else 0.0
    )
    rounds = -(-settings.send_concurrency // settings.postal_max_in_flight)
    return max(60.0, (rounds + 1) * settings.postal_timeout_s + rate_wait + 30.0)


def final_keep_s(settings: Settings) -> float:
    return max(3600.0, settings.reconcile_after_s)


class PostalSenderService(ServiceBase):
    http: aiohttp.ClientSession | None = None
    reconciler: Reconciler | None = None
    requests: JetStreamRequests | None = None

    async def stop(self) -> None:
        # No HTTP intake here: stop both consumers at once (each waits out its fetch), they
        # settle their in-flight sends; then the base class drains NATS.
        self.health.draining = True
        await asyncio.gather(*(worker.stop() for worker in self.workers))
        if self.requests is not None:
            await self.requests.stop()
        await super().stop()
        if self.http is not None:
            await self.http.close()


async def build(
    settings: Settings, *, registry: CollectorRegistry | None = None
) -> PostalSenderService:
    service = PostalSenderService(settings, registry=registry)
    await service.connect()
    js = service.js
    if not settings.postal_api_key:
        log.warning("POSTAL_API_KEY is empty; only accounts with their own key can send")
    if settings.mailgate_test_crash_after_submit:
        log.warning(
            "fault injection armed", crash_after_submit=settings.mailgate_test_crash_after_submit
        )
    metrics = Metrics(service.registry)
    service.http = new_session(
        settings.postal_timeout_s, settings.send_concurrency + settings.postal_max_in_flight
    )
    client = PostalClient(
        service.http,
        settings.postal_api_url,
        metrics=metrics,
        max_in_flight=settings.postal_max_in_flight,
        rate_per_s=settings.postal_rate_per_s,
        circuit=Circuit(settings.postal_circuit_failures, settings.postal_circuit_open_s),
    )
    service.health.add_check("postal", lambda: client.postal_alive)
    pending = await ensure_bucket(js, KV_PENDING, PENDING_TTL_S, settings.jetstream_replicas)
    api_keys = ApiKeys(
        await js.key_value(KV_ACCOUNTS),
        Secret(settings.postal_api_key).reveal(),
        cache_s=settings.account_cache_s,
    )
    # The sender's own KV reads/writes and publishes and the final markers take the lean path
    # (nats_wire); the reconciler keeps nats-py's (a few requests per pass and message).
    assert service.nc is not None
    requests = JetStreamRequests(service.nc, timeout_s=10.0)
    await requests.start()
    service.requests = requests
    lean_pending = requests.key_value(KV_PENDING, pending)
    sender = Sender(
        js=js,
        client=client,
        submissions=requests.key_value(KV_SUBMISSIONS, await js.key_value(KV_SUBMISSIONS)),
        pending=lean_pending,
        blobs=await js.object_store(OBJECT_STORE_MAIL),
        api_keys=api_keys,
        retry_deadline_s=settings.retry_deadline_s,
        retry_base_s=settings.retry_base_s,
        metrics=metrics,
        final_keep_s=final_keep_s(settings),
        crash_after_submit=settings.mailgate_test_crash_after_submit,
        requests=requests,
    )
    # Per-message mode fed by standing pull requests (mailgate_core.flow): each message is
    # settled as soon as it is handled and its slot asked for again without waiting for the
    # rest (no head-of-line blocking), and a message arriving below saturation costs no pull
    # request and no "no messages" answer of its own. Several fetchers on the one durable
    # share SEND_CONCURRENCY.
    fetchers = max(1, min(settings.send_fetchers, settings.send_concurrency))
    per_fetcher = -(-settings.send_concurrency // fetchers)
    for _ in range(fetchers):
        service.workers.append(
            FlowWorker(
                js,
                stream="MAIL",
                durable=DURABLE,
                filter_subject=FILTER_SUBJECT,
                handle_batch=per_message(sender.handle, per_fetcher),  # unused: handler=
                handler=sender.handle,
                concurrency=per_fetcher,
                batch=per_fetcher,
                ack_wait_s=ack_wait_s(settings),
                # Acks go out unconfirmed, a few per write (ACK_LINGER_S), each only after
                # its message's output is durable (the mail.submitted/failed publish ack);
                # a lost ack only redelivers a message whose submission record answers it
                # without calling Postal.
            )
        )
    # A final marker per final postal.* event: the lean put too (one per mail, like the
    # sender's own KV writes). Marking final is idempotent: a lost ack only repeats it.
    marker = FinalMarker(lean_pending, metrics, submission_key)
    service.workers.append(
        FlowWorker(
            js,
            stream="POSTAL",
            durable=FINAL_DURABLE,
            filter_subject="postal.>",
            handle_batch=per_message(marker.handle, FINAL_CONCURRENCY),  # unused: handler=
            handler=marker.handle,
            concurrency=FINAL_CONCURRENCY,
            batch=FINAL_CONCURRENCY,
        )
    )
    if settings.reconcile_enabled:
        locks = await ensure_bucket(
            js, KV_LOCKS, settings.reconcile_lock_ttl_s, settings.jetstream_replicas
        )
        owner = f"{socket.gethostname()}-{os.getpid()}-{new_ulid()}"
        reconciler = Reconciler(
            js=js,
            client=client,
            pending=pending,
            api_keys=api_keys,
            lock=LeaderLock(locks, LOCK_KEY, owner, settings.reconcile_lock_ttl_s),
            metrics=metrics,
            reconcile_after_s=settings.reconcile_after_s,
            interval_s=settings.reconcile_interval_s,
            batch=settings.reconcile_batch,
            concurrency=max(1, settings.postal_max_in_flight // 4),
            final_keep_s=final_keep_s(settings),
        )
        service.reconciler = reconciler
        service.on_start.append(reconciler.start)
        service.on_stop.append(reconciler.stop)
    service.add_ops_server()
    return service
