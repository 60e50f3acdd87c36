"""postal-sender: ``mail.accepted`` -> Postal send/raw -> ``mail.submitted`` / ``mail.failed``."""

from __future__ import annotations

import aiohttp
import structlog
from mailgate_core.config import BaseSettings, ConfigError, Secret
from mailgate_core.nats import (
    KV_ACCOUNTS,
    KV_SUBMISSIONS,
    OBJECT_STORE_MAIL,
    PullWorker,
    per_message,
)
from mailgate_core.service import ServiceBase
from prometheus_client import CollectorRegistry

from .client import PostalClient, new_session
from .sender import Metrics, Sender

log = structlog.get_logger()

DURABLE = "postal-sender"
FILTER_SUBJECT = "mail.accepted"


class Settings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "postal-sender"
    ops_port: int = 9102
    postal_api_url: str
    postal_api_key: Secret = Secret("")
    postal_timeout_s: float = 10.0
    send_concurrency: int = 32
    retry_deadline_s: float = 86400.0
    retry_base_s: float = 1.0
    """First retry delay; it doubles per delivery (with jitter) up to 5 minutes."""

    def validate(self) -> None:
        if not self.postal_api_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"config error: POSTAL_API_URL={self.postal_api_url!r} is not an http(s) URL"
            )
        if self.postal_timeout_s <= 0:
            raise ConfigError("config error: POSTAL_TIMEOUT_S must be positive")
        if self.send_concurrency < 1:
            raise ConfigError("config error: SEND_CONCURRENCY must be at least 1")


def ack_wait_s(settings: Settings) -> float:
    """Long enough for a full batch: KV/object reads, one Postal call, KV put and publish."""
    return max(60.0, 2 * settings.postal_timeout_s + 30.0)


class PostalSenderService(ServiceBase):
    http: aiohttp.ClientSession | None = None

    async def stop(self) -> None:
        await super().stop()  # workers settle their in-flight sends first
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
    service.http = new_session(settings.postal_timeout_s, settings.send_concurrency)
    sender = Sender(
        js=js,
        client=PostalClient(service.http, settings.postal_api_url),
        submissions=await js.key_value(KV_SUBMISSIONS),
        accounts=await js.key_value(KV_ACCOUNTS),
        blobs=await js.object_store(OBJECT_STORE_MAIL),
        default_api_key=Secret(settings.postal_api_key).reveal(),
        retry_deadline_s=settings.retry_deadline_s,
        retry_base_s=settings.retry_base_s,
        metrics=Metrics(service.registry),
    )
    service.workers.append(
        PullWorker(
            js,
            stream="MAIL",
            durable=DURABLE,
            filter_subject=FILTER_SUBJECT,
            handle_batch=per_message(sender.handle, settings.send_concurrency),
            batch=settings.send_concurrency,
            ack_wait_s=ack_wait_s(settings),
        )
    )
    service.add_ops_server()
    return service
