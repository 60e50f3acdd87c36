"""The sender's JetStream round trips without nats-py's general request path.

Per message the sender makes four JetStream requests: a KV get of the submission record, a
KV put of it, a KV create of the pending record and the ``mail.submitted`` publish. nats-py
spends most of each on generality: ``request`` validates subjects, encodes headers through
a pattern check, makes a token with ``secrets`` (a getrandom call), a done callback and an
``asyncio.wait_for``; ``js.publish`` decodes the answer with ``json`` into a dataclass
built by reflection; ``kv.get`` encodes a JSON request and base64-decodes the answer
twice. Here a request is one protocol command handed to the connection's pending buffer
(``PUB``/``HPUB``, as ledger's ``wire.py`` does for acks), its answer comes back through
one wildcard subscription (``<inbox>.<n>``) to a future that a timer fails after the
timeout, and answers are decoded with msgspec.

The semantics are nats-py's: the same subjects, headers and errors (``KeyNotFoundError``,
``KeyWrongLastSequenceError``, ``APIError``, ``NoStreamResponseError``, ``TimeoutError``),
and reads go to the stream leader (``STREAM.MSG.GET``, not a direct get that a lagging
replica could answer: the record is the guard against a second send). Anything unusual
falls back to nats-py itself: a value that is not a plain protocol token (the command is
then built by nats-py, which validates it), a connection that is not connected (nats-py
decides whether to buffer or refuse), a create that found the key (nats-py re-checks a
deleted key and recreates it), and missing private members of the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from mailgate_core.nats import JsApiError, JsPubAck, PublishError
from mailgate_core.schemas import Event, encode
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

#: What may not appear in a protocol token (subject, reply, header name).
_UNSAFE = re.compile(r"[ \t\r\n]")
_STATUS = "Status"
_NO_RESPONDERS = "503"
_KV_OPERATION = b"KV-Operation"
#: JetStream's "wrong last sequence" error codes (a create that found the key).
_WRONG_LAST = (10071, 10164)
_NOT_FOUND = 404
_NO_MESSAGE = 10037  # JSNoMessageFoundErr


def is_plain_token(value: str) -> bool:
    """Safe inside a protocol line: non-empty, no whitespace or line break."""
    return bool(value) and _UNSAFE.search(value) is None


class _StoredMsg(msgspec.Struct):
    subject: str = ""
    seq: int = 0
    hdrs: bytes | None = None
    data: bytes = b""


class _MsgGet(msgspec.Struct):
    message: _StoredMsg | None = None
    error: JsApiError | None = None


_decode_pub_ack = msgspec.json.Decoder(JsPubAck).decode
_decode_msg_get = msgspec.json.Decoder(_MsgGet).decode


class _LastBySubject(msgspec.Struct):
    last_by_subj: str


_encode_get = msgspec.json.Encoder().encode


def _api_error(error: JsApiError) -> nats.js.errors.APIError:
    """nats-py's exception for a JetStream API error (``from_error`` raises it)."""
    try:
        nats.js.errors.APIError.from_error(
            {"code": error.code, "err_code": error.err_code, "description": error.description}
        )
    except nats.js.errors.APIError as exc:
        return exc
    return nats.js.errors.APIError(  # pragma: no cover - from_error always raises
        code=error.code, err_code=error.err_code, description=error.description
    )


class Entry(msgspec.Struct, frozen=True):
    """What a KV get returns (the part of nats-py's ``KeyValue.Entry`` the sender reads)."""

    key: str
    value: bytes
    revision: int


class JetStreamRequests:
    """Requests and publishes over one reply subscription (see the module docstring)."""

    def __init__(self, nc: NatsClient, *, timeout_s: float = 10.0):
        self._nc = nc
        self.timeout_s = timeout_s
        self._prefix = ""
        self._tokens = itertools.count(1)
        self._waiting: dict[str, tuple[asyncio.Future[Msg], asyncio.TimerHandle]] = {}
        self._sub: Any = None

    async def start(self) -> None:
        if self._sub is None:
            self._prefix = self._nc.new_inbox() + "."
            self._sub = await self._nc.subscribe(
                self._prefix + "*", cb=self._on_reply, pending_msgs_limit=-1
            )

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()
        for future, timer in self._waiting.values():
            timer.cancel()
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())
        self._waiting.clear()

    @property
    def in_flight(self) -> int:
        """Requests waiting for their answer."""
        return len(self._waiting)

    async def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if waiting is None:
            return  # answered after its timeout
        future, timer = waiting
        timer.cancel()
        if not future.done():
            future.set_result(msg)

    def _expire(self, token: str) -> None:
        waiting = self._waiting.pop(token, None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_exception(nats.errors.TimeoutError())

    async def request(
        self,
        subject: str,
        payload: bytes,
        header: tuple[str, str] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Msg:
        """Send ``payload`` to ``subject`` (with one optional header) and return the answer;
        ``nats.errors.TimeoutError`` after ``timeout_s`` (default: the instance's)."""
        if self._sub is None:
            await self.start()
        token = str(next(self._tokens))
        reply = self._prefix + token
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        timer = loop.call_later(timeout_s or self.timeout_s, self._expire, token)
        self._waiting[token] = (future, timer)
        try:
            await self._send(subject, reply, payload, header)
        except BaseException:
            waiting = self._waiting.pop(token, None)
            if waiting is not None:
                waiting[1].cancel()
            raise
        try:
            return await future
        except asyncio.CancelledError:
            waiting = self._waiting.pop(token, None)
            if waiting is not None:
                waiting[1].cancel()
            raise

    async def _send(
        self, subject: str, reply: str, payload: bytes, header: tuple[str, str] | None
    ) -> None:
        nc = self._nc
        send_command = getattr(nc, "_send_command", None)
        flush_pending = getattr(nc, "_flush_pending", None)
        plain = is_plain_token(subject) and (
            header is None
            or (is_plain_token(header[0]) and "\r" not in header[1] and "\n" not in header[1])
        )
        if (
            send_command is None
            or flush_pending is None
            or not plain
            or not nc.is_connected
            or nc.is_draining_pubs
        ):
            await nc.publish(
                subject, payload, reply=reply, headers=dict([header]) if header else None
            )
            return
        if header is None:
            command = b"PUB %s %s %d\r\n%s\r\n" % (
                subject.encode(),
                reply.encode(),
                len(payload),
                payload,
            )
        else:
            head = b"NATS/1.0\r\n%s: %s\r\n\r\n" % (header[0].encode(), header[1].encode())
            command = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                subject.encode(),
                reply.encode(),
                len(head),
                len(head) + len(payload),
                head,
                payload,
            )
        await send_command(command)
        await flush_pending()

    # --- JetStream ------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        payload: bytes,
        header: tuple[str, str] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> int:
        """A JetStream publish; the stream sequence once stored (or de-duplicated)."""
        msg = await self.request(subject, payload, header, timeout_s=timeout_s)
        headers = msg.headers
        if headers and headers.get(_STATUS) == _NO_RESPONDERS:
            raise nats.js.errors.NoStreamResponseError
        try:
            ack = _decode_pub_ack(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise nats.js.errors.APIError(description=f"unreadable publish ack: {exc}") from exc
        if ack.error is not None:
            raise _api_error(ack.error)
        return ack.seq

    async def publish_event(self, event: Event, *, timeout_s: float = 5.0) -> int:
        """``mailgate_core.nats.publish_event``: ``Nats-Msg-Id = event_id``; PublishError when
        JetStream did not acknowledge it."""
        try:
            return await self.publish(
                event.subject(),
                encode(event),
                ("Nats-Msg-Id", event.event_id),
                timeout_s=timeout_s,
            )
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            raise PublishError(f"{type(exc).__name__}: {exc}") from exc

    def key_value(self, bucket: str, fallback: Any) -> LeanKeyValue:
        """A KV bucket's get/put/create through these requests; ``fallback`` is nats-py's
        ``KeyValue`` of the same bucket (used for the rare create of an existing key)."""
        return LeanKeyValue(self, bucket, fallback)


class LeanKeyValue:
    """``get``/``put``/``create`` of one KV bucket with nats-py's ``KeyValue`` semantics."""

    def __init__(self, requests: JetStreamRequests, bucket: str, fallback: Any):
        self._requests = requests
        self._fallback = fallback
        self._prefix = f"$KV.{bucket}."
        self._get_subject = f"$JS.API.STREAM.MSG.GET.KV_{bucket}"

    async def get(self, key: str) -> Entry:
        """The latest value; ``KeyNotFoundError`` when there is none (or it was deleted)."""
        subject = self._prefix + key
        msg = await self._requests.request(
            self._get_subject, _encode_get(_LastBySubject(last_by_subj=subject))
        )
        headers = msg.headers
        if headers and headers.get(_STATUS) == _NO_RESPONDERS:
            raise nats.errors.NoRespondersError
        try:
            answer = _decode_msg_get(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise nats.js.errors.APIError(description=f"unreadable get answer: {exc}") from exc
        if answer.error is not None:
            if answer.error.code == _NOT_FOUND and answer.error.err_code == _NO_MESSAGE:
                raise nats.js.errors.KeyNotFoundError
            # Anything else, a missing stream too (nats-py would say "key not found"), is
            # trouble to retry: the sender must not take it for "never submitted".
            raise _api_error(answer.error)
        stored = answer.message
        if stored is None or stored.subject != subject:
            raise nats.js.errors.KeyNotFoundError
        if stored.hdrs and _KV_OPERATION in stored.hdrs:
            # A delete or purge marker (our values are written without headers).
            raise nats.js.errors.KeyNotFoundError
        return Entry(key=key, value=stored.data, revision=stored.seq)

    async def put(self, key: str, value: bytes) -> int:
        return await self._requests.publish(self._prefix + key, value)

    async def create(self, key: str, value: bytes) -> int:
        """Store ``value`` unless the key exists (``KeyWrongLastSequenceError``)."""
        try:
            return await self._requests.publish(
                self._prefix + key, value, ("Nats-Expected-Last-Subject-Sequence", "0")
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code not in _WRONG_LAST:
                raise
        # The key has a value, or a delete marker nats-py recreates over: let it decide.
        revision: int = await self._fallback.create(key, value)
        return revision
