"""Postal's HTTP API over one shared aiohttp session, behind a gate per Postal server.

The gate bounds requests in flight per server (``POSTAL_MAX_IN_FLIGHT``, a server being one
API key), spreads them to ``POSTAL_RATE_PER_S`` (a token bucket per server, per replica) and
stops sending while the circuit is open (Postal looks dead). Answers become ``classify``
values for send/raw; lookups (messages/*) return the raw answer to the reconciler.
"""

from __future__ import annotations

import asyncio
import base64
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from aiohttp.connector import Connection

from .classify import Classification, Retry, classify_response, transport_failure
from .limits import Circuit, TokenBucket
from .metrics import Metrics

_encoder = msgspec.json.Encoder()


@dataclass
class _Progress:
    """Set once the request is being written to its connection: it may leave this process."""

    headers_sent: bool = False


#: The ``_Progress`` of the request this task is making (aiohttp sends it in the same task).
_SENDING: ContextVar[_Progress | None] = ContextVar("postal_request_progress", default=None)


class _MarkingRequest(aiohttp.ClientRequest):
    """Marks the request's ``_Progress`` when aiohttp starts writing it (a connection is
    open, so Postal may receive it). This replaces an ``on_request_headers_sent`` trace hook,
    which made aiohttp run every trace signal of every request: about 45 µs per request."""

    async def send(self, conn: Connection) -> aiohttp.ClientResponse:
        progress = _SENDING.get()
        if progress is not None:
            progress.headers_sent = True
        return await super().send(conn)


def new_session(timeout_s: float, connections: int) -> aiohttp.ClientSession:
    """The one session of the process: keep-alive connections reused across requests."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=aiohttp.TCPConnector(limit=connections, keepalive_timeout=30.0),
        request_class=_MarkingRequest,
        headers={"User-Agent": "mailgate-postal-sender"},
    )


@dataclass(frozen=True)
class Answered:
    """Postal (or a proxy in front of it) answered with this HTTP status and body."""

    status: int
    body: bytes


@dataclass(frozen=True)
class NoAnswer:
    error: BaseException
    request_sent: bool
    """The request left this process: Postal may have acted on it."""


@dataclass(frozen=True)
class Deferred:
    """Not sent: the circuit is open."""


CallResult = Answered | NoAnswer | Deferred


@dataclass(frozen=True)
class SendResult:
    classification: Classification
    duration_s: float


@dataclass
class _ServerGate:
    slots: asyncio.Semaphore
    bucket: TokenBucket


class PostalClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        api_url: str,
        *,
        metrics: Metrics,
        max_in_flight: int = 16,
        rate_per_s: float = 0.0,
        circuit: Circuit | None = None,
    ):
        self._session = session
        self._base = api_url.rstrip("/") + "/api/v1/"
        self._metrics = metrics
        self._max_in_flight = max(1, max_in_flight)
        self._rate_per_s = rate_per_s
        self._gates: dict[str, _ServerGate] = {}
        self.circuit = circuit or Circuit(failure_threshold=5, open_s=5.0)
        self._circuit_shown = False
        """The circuit state last written to the gauge (it only changes on a transition)."""

    @property
    def postal_alive(self) -> bool:
        """Readiness: false while the circuit is open."""
        return not self.circuit.is_open

    def _gate(self, api_key: str) -> _ServerGate:
        gate = self._gates.get(api_key)
        if gate is None:
            gate = _ServerGate(
                asyncio.Semaphore(self._max_in_flight), TokenBucket(self._rate_per_s)
            )
            self._gates[api_key] = gate
        return gate

    async def call(
        self, endpoint: str, api_key: str, params: dict[str, Any]
    ) -> tuple[CallResult, float]:
        """POST ``params`` to ``/api/v1/<endpoint>``; return what happened and how long it took."""
        gate = self._gate(api_key)
        async with gate.slots:
            delay = gate.bucket.reserve()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self.circuit.allow():
                self._metrics.deferred.inc()
                return Deferred(), 0.0
            return await self._post(endpoint, api_key, _encoder.encode(params))

    async def _post(self, endpoint: str, api_key: str, body: bytes) -> tuple[CallResult, float]:
        headers = {"X-Server-API-Key": api_key, "Content-Type": "application/json"}
        progress = _Progress()
        result: CallResult
        started = time.monotonic()
        self._metrics.in_flight.inc()
        sending = _SENDING.set(progress)
        try:
            async with self._session.post(
                self._base + endpoint, data=body, headers=headers, allow_redirects=False
            ) as response:
                result = Answered(response.status, await response.read())
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            result = NoAnswer(exc, progress.headers_sent)
        except BaseException:
            self.circuit.abandon()  # cancelled: never leave a probe outstanding
            raise
        finally:
            _SENDING.reset(sending)
            self._metrics.in_flight.dec()
        duration = time.monotonic() - started
        self._metrics.request_duration(endpoint).observe(duration)
        # Postal itself always answers 200; anything else means it (or its proxy) is unwell.
        self.circuit.record(isinstance(result, Answered) and result.status == 200)
        if self.circuit.is_open != self._circuit_shown:
            self._circuit_shown = self.circuit.is_open
            self._metrics.circuit_open.set(1 if self._circuit_shown else 0)
        return result, duration

    async def send_raw(
        self, *, api_key: str, mail_from: str, recipient: str, raw: bytes
    ) -> SendResult:
        params = {
            "mail_from": mail_from,
            "rcpt_to": [recipient],
            "data": base64.b64encode(raw).decode("ascii"),
            "bounce": False,
        }
        result, duration = await self.call("send/raw", api_key, params)
        classification: Classification
        if isinstance(result, Answered):
            classification = classify_response(result.status, result.body, recipient)
        elif isinstance(result, NoAnswer):
            classification = transport_failure(result.error, request_sent=result.request_sent)
        else:
            classification = Retry(
                "CircuitOpen", "Postal looks unavailable; not sent", outcome="deferred"
            )
        return SendResult(classification, duration)
