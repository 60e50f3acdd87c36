"""smtp-ingest: authenticated SMTP intake (STARTTLS and implicit TLS) -> ``mail.accepted``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
from functools import partial

import structlog
from mailgate_core.config import BaseSettings, ConfigError, Secret
from mailgate_core.nats import KV_SUPPRESSIONS, count_publish_batches
from mailgate_core.service import ServiceBase
from mailgate_core.tracking import TokenSigner
from prometheus_client import CollectorRegistry

from . import replies
from .auth import Authenticator
from .directory import Directory
from .handlers import IngestHandler, IntakeConfig
from .memory import release_large_buffers_promptly
from .metrics import Metrics
from .policy import FailureThrottle
from .rewrite import HeaderRules
from .server import Intake, MailgateSMTP
from .suppression_index import SuppressionIndex
from .tls import context_from_pem, self_signed_pair, server_context
from .tracking_rewrite import TrackingLinks

log = structlog.get_logger()

#: A MailAccepted carrying ``raw`` (base64 in JSON, 4/3 larger) must fit NATS max_payload.
_MAX_INLINE_BYTES = 750_000


class Settings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "smtp-ingest"
    ops_port: int = 9101
    domain: str
    """Our domain: Message-IDs are ``<mailgate_id@DOMAIN>``; the SMTP host name by default."""
    smtp_host: str = "0.0.0.0"
    smtp_port: int = 2587
    """Submission with STARTTLS (587 in containers)."""
    smtps_port: int = 2465
    """Implicit TLS (465 in containers)."""
    smtp_hostname: str = ""
    """Name in the greeting and EHLO reply; DOMAIN when empty."""
    smtp_tls_cert: str = ""
    smtp_tls_key: str = ""
    smtp_auth_require_tls: bool = True
    smtp_workers: int = 1
    """Worker processes sharing the SMTP ports (SO_REUSEPORT); see workers.py. Worker i
    serves its ops routes on OPS_PORT + i - 1."""
    smtp_worker_index: int = 0
    """Set by the supervisor for each worker (1-based); 0 in a single process."""
    smtp_timeout_s: float = 300.0
    allowed_sender_domains: tuple[str, ...] = ()
    """Global sender allowlist, used for accounts without their own list; empty allows all."""
    max_message_size: int = 10_485_760
    max_recipients: int = 100
    ams_external_id_headers: tuple[str, ...] = ("X-AMS-Message-ID", "X-Mailer-RecptId")
    ams_campaign_id_headers: tuple[str, ...] = ("X-AMS-Campaign-ID", "X-AMS-Mailing-ID")
    strip_header_prefixes: tuple[str, ...] = ("X-AMS-",)
    strip_headers: tuple[str, ...] = ("X-Mailer",)
    tracking_header: str = "X-Mailgate-Tracking"
    object_store_threshold: int = 700_000
    """Messages larger than this go to the object store ``mail-blobs``, not into the event."""
    auth_failure_limit: int = 5
    auth_failure_window_s: float = 60.0
    auth_failure_limit_per_user: int = 10
    """Failed AUTHs per username (from any address) per window before AUTH for it answers 454."""
    smtp_max_connections_per_ip: int = 100
    """Open SMTP connections per client address; more are answered 421 and closed (0: no cap)."""
    publish_timeout_s: float = 5.0
    object_store_timeout_s: float = 30.0
    kv_timeout_s: float = 2.0
    kv_resync_s: float = 60.0
    suppression_index: bool = True
    """Keep a Bloom filter of the suppression keys (suppression_index.py) so that a
    recipient who is certainly not suppressed costs no KV get; ``false``: a get each."""
    suppression_index_resync_s: float = 300.0
    """How often that filter is rebuilt from a full snapshot of the bucket."""
    tracking_base_url: str = ""
    """Public base URL of the tracker; its open/click/unsubscribe URLs go into every copy."""
    tracking_secret: Secret = Secret("")
    """Comma-separated; the first signs (the tracker verifies with every one)."""
    list_unsubscribe_mailto: str = ""
    """An address added to ``List-Unsubscribe`` as ``<mailto:...>`` besides the URL."""

    def tracking_secrets(self) -> list[str]:
        raw = Secret(self.tracking_secret).reveal()
        return [s.strip() for s in raw.split(",") if s.strip()]

    def tracking_links(self) -> TrackingLinks | None:
        """The recipient URL maker, or ``None`` when tracking is not configured."""
        if not self.tracking_base_url:
            return None
        return TrackingLinks(
            self.tracking_base_url,
            TokenSigner(self.tracking_secrets()),
            unsubscribe_mailto=self.list_unsubscribe_mailto,
        )

    def validate(self) -> None:
        if bool(self.smtp_tls_cert) != bool(self.smtp_tls_key):
            raise ConfigError("config error: SMTP_TLS_CERT and SMTP_TLS_KEY must be set together")
        for var, path in (
            ("SMTP_TLS_CERT", self.smtp_tls_cert),
            ("SMTP_TLS_KEY", self.smtp_tls_key),
        ):
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"config error: {var}={path!r} is not a readable file")
        if self.max_message_size <= 0:
            raise ConfigError("config error: MAX_MESSAGE_SIZE must be positive")
        if self.max_recipients <= 0:
            raise ConfigError("config error: MAX_RECIPIENTS must be positive")
        if self.smtp_workers < 1:
            raise ConfigError("config error: SMTP_WORKERS must be at least 1")
        if self.smtp_workers > 1 and not (self.smtp_port and self.smtps_port):
            raise ConfigError("config error: SMTP_WORKERS > 1 needs fixed SMTP_PORT and SMTPS_PORT")
        if bool(self.tracking_base_url) != bool(self.tracking_secrets()):
            raise ConfigError(
                "config error: TRACKING_BASE_URL and TRACKING_SECRET must be set together"
            )
        base = self.tracking_base_url
        if base and (not re.match(r"https?://[^/\s]+", base) or not base.isascii()):
            raise ConfigError(f"config error: TRACKING_BASE_URL={base!r} is not an http(s) URL")
        if self.list_unsubscribe_mailto and "@" not in self.list_unsubscribe_mailto:
            raise ConfigError(
                "config error: LIST_UNSUBSCRIBE_MAILTO="
                f"{self.list_unsubscribe_mailto!r} is not an address"
            )
        if not 0 <= self.object_store_threshold <= _MAX_INLINE_BYTES:
            raise ConfigError(
                f"config error: OBJECT_STORE_THRESHOLD must be between 0 and {_MAX_INLINE_BYTES}"
            )

    @property
    def header_rules(self) -> HeaderRules:
        return HeaderRules(
            external_id_headers=self.ams_external_id_headers,
            campaign_id_headers=self.ams_campaign_id_headers,
            strip_prefixes=self.strip_header_prefixes,
            strip_headers=self.strip_headers,
            tracking_header=self.tracking_header,
        )


def load_tls(settings: Settings) -> tuple[ssl.SSLContext, bytes | None]:
    """The configured certificate, else an ephemeral self-signed one (returned as PEM)."""
    if settings.smtp_tls_cert:
        try:
            return server_context(settings.smtp_tls_cert, settings.smtp_tls_key), None
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"config error: SMTP_TLS_CERT/SMTP_TLS_KEY unusable: {exc}") from None
    hostname = settings.smtp_hostname or settings.domain
    cert_pem, key_pem = self_signed_pair(hostname)
    log.warning("smtp tls: using an ephemeral self-signed certificate", hostname=hostname)
    return context_from_pem(cert_pem, key_pem), cert_pem


class SmtpIngestService(ServiceBase):
    """Two listeners (STARTTLS, implicit TLS) sharing one handler; see ``start``/``stop``."""

    settings: Settings

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        tls_context: ssl.SSLContext,
        certificate_pem: bytes | None = None,
    ):
        super().__init__(settings, registry=registry)
        self.tls_context = tls_context
        self.certificate_pem = certificate_pem
        """PEM of the generated certificate (None when loaded from files): tests trust it."""
        self.metrics = Metrics.create(self.registry)
        self.intake = Intake(max_connections_per_ip=settings.smtp_max_connections_per_ip)
        self.intake.count_sessions_in(self.metrics.sessions)
        self.smtp_port = 0
        self.smtps_port = 0
        self._servers: list[asyncio.Server] = []
        self.directory: Directory | None = None
        self.handler: IngestHandler | None = None
        self._stopped = False
        self.on_stop.append(self._stop_intake)

    async def connect(self) -> None:
        await super().connect()
        s = self.settings
        nc = self.nc
        if nc is not None:
            count_publish_batches(nc, self.registry)  # the group commit of mail events
        index = None
        if s.suppression_index:
            index = SuppressionIndex(
                self.js,
                KV_SUPPRESSIONS,
                resync_s=s.suppression_index_resync_s,
                timeout_s=s.kv_timeout_s,
                reconnects=lambda: nc.stats["reconnects"] if nc is not None else 0,
            )
        self.directory = Directory(
            self.js,
            resync_s=s.kv_resync_s,
            timeout_s=s.kv_timeout_s,
            suppression_index=index,
        )
        throttle = FailureThrottle(limit=s.auth_failure_limit, window_s=s.auth_failure_window_s)
        user_throttle = FailureThrottle(
            limit=s.auth_failure_limit_per_user, window_s=s.auth_failure_window_s
        )
        authenticator = Authenticator(
            self.directory, throttle, self.metrics, user_throttle=user_throttle
        )
        config = IntakeConfig(
            domain=s.domain,
            allowed_sender_domains=s.allowed_sender_domains,
            max_message_size=s.max_message_size,
            max_recipients=s.max_recipients,
            object_store_threshold=s.object_store_threshold,
            publish_timeout_s=s.publish_timeout_s,
            object_store_timeout_s=s.object_store_timeout_s,
            rules=s.header_rules,
            links=s.tracking_links(),
        )
        if config.links is None:
            log.warning(
                "tracking not configured: no unsubscribe URLs, click links or open pixel",
                missing="TRACKING_BASE_URL",
            )
        self.handler = IngestHandler(
            config,
            js=self.js,
            directory=self.directory,
            authenticator=authenticator,
            metrics=self.metrics,
        )
        directory = self.directory
        self.health.add_check("credentials", lambda: directory.synced)
        self.health.add_check("smtp", lambda: self.listening)

    @property
    def listening(self) -> bool:
        """Both SMTP listeners accept connections (a readiness check)."""
        return len(self._servers) == 2 and all(srv.is_serving() for srv in self._servers)

    def _protocol(self, *, implicit_tls: bool) -> MailgateSMTP:
        s = self.settings
        assert self.handler is not None
        return MailgateSMTP(
            self.handler,
            intake=self.intake,
            metrics=self.metrics,
            hostname=s.smtp_hostname or s.domain,
            max_message_size=s.max_message_size,
            tls_context=self.tls_context,
            implicit_tls=implicit_tls,
            auth_require_tls=s.smtp_auth_require_tls,
            timeout_s=s.smtp_timeout_s,
        )

    async def start(self) -> None:
        """Load credentials/accounts, open both listeners, then the ops server."""
        assert self.directory is not None, "build() connects first"
        await self.directory.start()
        loop = asyncio.get_running_loop()
        s = self.settings
        shared = s.smtp_workers > 1  # every worker binds the same ports (SO_REUSEPORT)
        plain = await loop.create_server(
            partial(self._protocol, implicit_tls=False),
            s.smtp_host,
            s.smtp_port,
            reuse_port=shared,
        )
        self._servers.append(plain)
        implicit = await loop.create_server(
            partial(self._protocol, implicit_tls=True),
            s.smtp_host,
            s.smtps_port,
            ssl=self.tls_context,
            reuse_port=shared,
        )
        self._servers.append(implicit)
        self.smtp_port = plain.sockets[0].getsockname()[1]
        self.smtps_port = implicit.sockets[0].getsockname()[1]
        await super().start()
        log.info(
            "smtp listening", host=s.smtp_host, smtp_port=self.smtp_port, smtps_port=self.smtps_port
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await super().stop()

    async def _stop_intake(self) -> None:
        """Stop accepting connections, let open transactions finish, close the rest."""
        self.intake.draining = True
        for srv in self._servers:
            srv.close()
        grace = max(1.0, self.settings.shutdown_grace_s * 0.75)
        if not await self.intake.wait_idle(grace):
            log.warning(
                "smtp transactions still open at shutdown",
                in_data=self.intake.in_data,
                open_transactions=self.intake.open_transactions,
            )
        goodbye = (str(replies.SHUTTING_DOWN) + "\r\n").encode()
        for session in list(self.intake.sessions):
            if isinstance(session.transport, asyncio.WriteTransport):
                with contextlib.suppress(Exception):
                    session.transport.write(goodbye)
            session.close_now()
        if self.directory is not None:
            await self.directory.stop()


async def build(
    settings: Settings, *, registry: CollectorRegistry | None = None
) -> SmtpIngestService:
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command
    release_large_buffers_promptly()  # a 10 MB message costs its size, not a heap's growth
    tls_context, certificate_pem = load_tls(settings)
    service = SmtpIngestService(
        settings, registry=registry, tls_context=tls_context, certificate_pem=certificate_pem
    )
    await service.connect()
    service.add_ops_server()
    return service
