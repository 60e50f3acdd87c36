"""Postal's send/raw over one shared aiohttp session; answers become ``classify`` values."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgspec

from .classify import Classification, classify_response, transport_failure

_encoder = msgspec.json.Encoder()


@dataclass
class _Progress:
    """Set by aiohttp's trace hooks: did the request leave this process?"""

    headers_sent: bool = False


async def _on_headers_sent(
    _session: aiohttp.ClientSession, ctx: SimpleNamespace, _params: Any
) -> None:
    progress = ctx.trace_request_ctx
    if isinstance(progress, _Progress):
        progress.headers_sent = True


def new_session(timeout_s: float, concurrency: int) -> aiohttp.ClientSession:
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_on_headers_sent)
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=aiohttp.TCPConnector(limit=concurrency),
        trace_configs=[trace],
        headers={"User-Agent": "mailgate-postal-sender"},
    )


@dataclass(frozen=True)
class SendResult:
    classification: Classification
    duration_s: float


class PostalClient:
    def __init__(self, session: aiohttp.ClientSession, api_url: str):
        self._session = session
        self._url = api_url.rstrip("/") + "/api/v1/send/raw"

    async def send_raw(
        self, *, api_key: str, mail_from: str, recipient: str, raw: bytes
    ) -> SendResult:
        body = _encoder.encode(
            {
                "mail_from": mail_from,
                "rcpt_to": [recipient],
                "data": base64.b64encode(raw).decode("ascii"),
                "bounce": False,
            }
        )
        headers = {"X-Server-API-Key": api_key, "Content-Type": "application/json"}
        progress = _Progress()
        started = time.monotonic()
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=headers,
                allow_redirects=False,
                trace_request_ctx=progress,
            ) as response:
                payload = await response.read()
                result = classify_response(response.status, payload, recipient)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            result = transport_failure(exc, request_sent=progress.headers_sent)
        return SendResult(result, time.monotonic() - started)
