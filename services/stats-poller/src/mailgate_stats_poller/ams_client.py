"""A small AMS Enterprise JSON-RPC 2.0 client (specs/ams-jsonrpc.md).

AMS runs API commands one at a time on its main thread, so the client keeps exactly one
call in flight (an ``asyncio.Lock``); every call has a timeout. The API key travels inside
``params`` as ``apiKey``. The response ``id`` may come back as a number although we send a
string, so ids are compared as strings.

Errors::

    AmsError                 base
    ├── AmsTransportError    HTTP status, timeout, connection, not JSON (retry next poll)
    └── AmsRpcError          a JSON-RPC "error" object (code, message)
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import msgspec


class AmsError(Exception):
    """Any failed AMS call."""


class AmsTransportError(AmsError):
    pass


class AmsRpcError(AmsError):
    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(f"AMS error {code}: {message}")
        self.code = code
        self.message = message


class ProgressInfo(msgspec.Struct, rename="camel", kw_only=True):
    percent_done: float = 0.0
    total: int = 0
    sent: int = 0
    not_sent: int = 0
    bad: int = 0
    refused: int = 0
    excluded: int = 0
    opened: int = 0
    clicks: int = 0


class Mailing(msgspec.Struct, rename="camel", kw_only=True):
    """One entry of ``getMailings``."""

    id: int | str
    name: str = ""
    type: str = ""
    state: str = ""
    create_date: str | None = None
    last_start_date: str | None = None
    approx_speed: str = ""
    progress_info: ProgressInfo = msgspec.field(default_factory=ProgressInfo)


def parse_mailings(result: Any) -> list[Mailing]:
    """``getMailings``'s result (a list; ``{"mailings": [...]}`` tolerated) as structs."""
    if isinstance(result, dict):
        result = result.get("mailings", result.get("items", []))
    try:
        return msgspec.convert(result, list[Mailing], strict=False)
    except msgspec.ValidationError as exc:
        raise AmsRpcError(None, f"unexpected getMailings result: {exc}") from exc


class AmsClient:
    def __init__(
        self, url: str, api_key: str, session: aiohttp.ClientSession, *, timeout_s: float = 30.0
    ) -> None:
        self._url = url
        self._api_key = api_key
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> Any:
        """One JSON-RPC call; returns ``result`` or raises an ``AmsError``."""
        async with self._lock:
            request_id = str(next(self._ids))
            request = {
                "jsonrpc": "2.0",
                "method": method,
                "params": {"apiKey": self._api_key, **params},
                "id": request_id,
            }
            try:
                async with self._session.post(
                    self._url, json=request, timeout=self._timeout
                ) as resp:
                    if resp.status != 200:
                        raise AmsTransportError(f"{method}: HTTP {resp.status}")
                    body = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise AmsTransportError(f"{method}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(body, dict):
            raise AmsTransportError(f"{method}: response is not a JSON-RPC object")
        error = body.get("error")
        if error:
            if isinstance(error, dict):
                raise AmsRpcError(error.get("code"), str(error.get("message", "")))
            raise AmsRpcError(None, str(error))
        if str(body.get("id")) != request_id:
            raise AmsTransportError(f"{method}: response id {body.get('id')!r} != {request_id}")
        return body.get("result")

    async def get_mailings(self) -> list[Mailing]:
        return parse_mailings(await self.call("getMailings"))
