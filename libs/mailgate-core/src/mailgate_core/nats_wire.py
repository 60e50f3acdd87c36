"""NATS at the protocol level: publishes and JetStream requests written straight to nats-py's
pending buffer, their answers taken from one reply subscription and read with msgspec.

Why: nats-py spends most of a small publish or request on generality. ``publish`` validates
subject and reply with a pattern, encodes each header through a regex check, builds the
command and wakes its flusher, per message; ``request`` also makes a token with ``secrets``
(a getrandom call), a done callback and an ``asyncio.wait_for``; ``js.publish`` decodes the
answer with ``json`` into a dataclass built by reflection; ``kv.get`` encodes a JSON request
and base64-decodes the answer twice. On the hot paths that is most of the cost.

Used by every durable event publish (``mailgate_core.nats.publish_event``/``publish_events``:
smtp-ingest before its 250, webhook-ingest before its 200, tracker, ...) through one instance
per connection (``connection_requests``), by the ledger (the acks of a pull batch in one
write; the STATUS outbox's pipelined and atomic-batch publishes) and by postal-sender (its
four JetStream requests per message: KV get, KV put, KV create, the ``mail.submitted``
publish).

The parts, from the wire up:

- ``publish_command``, ``ack_command``, ``atomic_batch_command``: protocol commands, built
  only from plain tokens (``is_plain_token``; callers check, ``fits`` for one publish).
- nats-py's private client API is used here only, by two functions (nats-py is pinned in
  uv.lock), each with a fallback to the public API. ``write`` hands commands to
  ``_send_command`` and ``_flush_pending``; it returns False, having written nothing, when
  those members are missing, the connection is not connected (reconnecting: nats-py's own
  publish then decides whether to buffer or refuse) or it is draining its publishes, and
  every caller then publishes through nats-py (``publish_message`` does both for one
  message). ``atomic_batches_supported`` reads ``_current_server`` to cache per server
  version what ``connected_server_version`` (a regex per call) would say.
- ``JetStreamRequests``: one wildcard reply subscription (``<inbox>.*``) whose callback
  resolves the future waiting for each reply subject. ``expect``/``forget`` for callers that
  write their own commands (the ledger's outbox), ``request`` for one message and its
  answer (failed by a timer after the timeout), and on top of it JetStream's publish and a
  KV bucket's get/put/create (``key_value``) with nats-py's semantics: the same subjects,
  headers and errors (``KeyNotFoundError``, ``KeyWrongLastSequenceError``, ``APIError``
  as ``APIError.from_error`` maps it, ``NoStreamResponseError``, ``TimeoutError``).
  ``publish_events`` sends several publishes in one write and awaits their acks together.
  A KV get reads from the stream leader (``STREAM.MSG.GET``, not a direct get that a lagging
  replica could answer "not found": for postal-sender the record is the guard against a
  second send), and a create that found the key is left to nats-py (it recreates over a
  delete marker).
- ``connection_requests(js)``: the ``JetStreamRequests`` shared by the event publishes of one
  nats-py connection, kept on the client object (made on first use, its reply subscription
  dies with the connection); ``close_connection_requests(nc)`` (``ServiceBase.stop``, before
  the drain) waits for the acks still awaited, then unsubscribes; publishes after that, or
  while the connection drains or is closed, go through nats-py's ``js.publish``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from . import nats as core  # PublishError; a cycle: nats.py routes its publishes here
from .schemas import Event, encode

Header = tuple[str, str]
"""The one header a publish may carry here: (name, value)."""

# --- protocol commands --------------------------------------------------------------------


def is_plain_token(value: str) -> bool:
    """Safe inside a protocol line: non-empty, no whitespace or line break (nats-py's
    subject check; a header value that passes needs none of its trimming either)."""
    return (
        bool(value)
        and " " not in value
        and "\r" not in value
        and "\n" not in value
        and "\t" not in value
    )


def fits(subject: str, reply: str, header: Header | None) -> bool:
    """Whether ``publish_command`` may build this publish (else nats-py must)."""
    return (
        is_plain_token(subject)
        and is_plain_token(reply)
        and (header is None or (is_plain_token(header[0]) and is_plain_token(header[1])))
    )


_MSG_ID_START = b"NATS/1.0\r\nNats-Msg-Id: "
_HEADER_END = b"\r\n\r\n"


def _header_block(header: Header) -> bytes:
    name, value = header
    if name == "Nats-Msg-Id":  # the usual one, without formatting
        return _MSG_ID_START + value.encode() + _HEADER_END
    return b"NATS/1.0\r\n%s: %s\r\n\r\n" % (name.encode(), value.encode())


def _target(subject: str, reply: str) -> bytes:
    """``<subject> <reply>``, or the subject alone when there is no reply."""
    return subject.encode() + b" " + reply.encode() if reply else subject.encode()


def publish_command(
    subject: str, reply: str, payload: bytes, header: Header | None = None
) -> bytes:
    """``PUB`` (or ``HPUB`` with one header) of ``payload`` to ``subject``, answered to
    ``reply`` (none when empty). Every value must be a plain token (``fits``)."""
    target = _target(subject, reply)
    if header is None:
        return b"PUB %s %d\r\n%s\r\n" % (target, len(payload), payload)
    head = _header_block(header)
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (
        target,
        len(head),
        len(head) + len(payload),
        head,
        payload,
    )


def ack_command(reply: str) -> bytes:
    """``PUB <reply> 0``: an empty message to a JetStream ack subject acknowledges it."""
    return b"PUB " + reply.encode() + b" 0\r\n\r\n"


def atomic_batch_command(
    subject: str,
    reply: str,
    msg_id: str,
    payload: bytes,
    *,
    batch_id: str,
    sequence: int,
    commit: bool,
) -> bytes:
    """One message of a JetStream atomic batch (ADR-50): ``Nats-Batch-Id`` and
    ``Nats-Batch-Sequence`` (from 1) on every message, ``Nats-Batch-Commit: 1`` on the last,
    which alone carries a reply (the batch's publish ack); ``Nats-Msg-Id`` as usual."""
    header = b"%s%s\r\nNats-Batch-Id: %s\r\nNats-Batch-Sequence: %d\r\n%s\r\n" % (
        _MSG_ID_START,
        msg_id.encode(),
        batch_id.encode(),
        sequence,
        b"Nats-Batch-Commit: 1\r\n" if commit else b"",
    )
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (
        _target(subject, reply),
        len(header),
        len(header) + len(payload),
        header,
        payload,
    )


# --- the private API, in one place ---------------------------------------------------------


async def write(nc: NatsClient, data: bytes) -> bool:
    """Hand ``data`` (whole protocol commands) to the connection's pending buffer and flush;
    False when the caller must use nats-py's public API instead (nothing was written)."""
    send_command = getattr(nc, "_send_command", None)
    flush_pending = getattr(nc, "_flush_pending", None)
    if send_command is None or flush_pending is None or not nc.is_connected:
        return False
    if nc.is_draining_pubs:
        return False
    await send_command(data)
    await flush_pending()
    return True


async def publish_message(
    nc: NatsClient, subject: str, reply: str, payload: bytes, header: Header | None = None
) -> None:
    """One publish, written directly when it ``fits`` (and is within the server's maximum
    payload: the server would close the connection), else by nats-py's ``publish`` (which
    validates what it sends, refuses an oversized payload with ``MaxPayloadError``, and
    buffers or refuses while reconnecting)."""
    if fits(subject, reply, header):
        command = publish_command(subject, reply, payload, header)
        if within_max_payload(nc, command, subject, reply) and await write(nc, command):
            return
    await nc.publish(subject, payload, reply=reply, headers=dict([header]) if header else None)


def within_max_payload(nc: NatsClient, command: bytes, subject: str, reply: str) -> bool:
    """Whether a ``publish_command``'s message (headers and payload) fits the server's
    ``max_payload`` (an approximation from above: the command's length less its subject)."""
    return len(command) - len(subject) - len(reply) <= nc.max_payload


#: Atomic-batch support per server version text (a handful of values at most).
_atomic_versions: dict[str, bool] = {}
_ABSENT: Any = object()


def _at_least_2_12(nc: NatsClient) -> bool:
    try:
        version = nc.connected_server_version
        return (version.major, version.minor) >= (2, 12)
    except ValueError:  # not a semantic version
        return False


def atomic_batches_supported(nc: NatsClient) -> bool:
    """Whether the connected server takes JetStream atomic batches (nats-server 2.12+). An
    older one ignores the batch headers: it would store each message alone and answer only
    the last, so a refused message in the middle would go unnoticed."""
    server = getattr(nc, "_current_server", _ABSENT)
    if server is _ABSENT:
        return _at_least_2_12(nc)
    text = (server.server_version if server is not None else None) or ""
    known = _atomic_versions.get(text)
    if known is None:
        known = _atomic_versions[text] = _at_least_2_12(nc)
    return known


# --- JetStream's answers -------------------------------------------------------------------

_STATUS = "Status"
_NO_RESPONDERS = "503"
_KV_OPERATION = b"KV-Operation"
#: JetStream's "wrong last sequence" error codes (a create that found the key).
_WRONG_LAST = (10071, 10164)
_NOT_FOUND = 404
_NO_MESSAGE = 10037  # JSNoMessageFoundErr


class JsApiError(msgspec.Struct):
    """A JetStream API error as the server sends it (``{"code", "err_code", "description"}``)."""

    code: int = 0
    err_code: int = 0
    description: str = ""


class JsPubAck(msgspec.Struct):
    """JetStream's answer to a publish: ``{"stream", "seq"[, "duplicate"]}`` or an error."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: JsApiError | None = None


decode_pub_ack = msgspec.json.Decoder(JsPubAck).decode
"""JetStream's publish ack (raises ``msgspec.DecodeError`` on anything else)."""


class _StoredMsg(msgspec.Struct):
    subject: str = ""
    seq: int = 0
    hdrs: bytes | None = None
    data: bytes = b""


class _MsgGet(msgspec.Struct):
    message: _StoredMsg | None = None
    error: JsApiError | None = None


class _LastBySubject(msgspec.Struct):
    last_by_subj: str


_decode_msg_get = msgspec.json.Decoder(_MsgGet).decode
_encode_get = msgspec.json.Encoder().encode


def api_error(error: JsApiError) -> nats.js.errors.APIError:
    """nats-py's exception for a JetStream API error, as ``APIError.from_error`` picks it
    (``NotFoundError``, ``KeyWrongLastSequenceError``, ...)."""
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
    """What a KV get returns (the part of nats-py's ``KeyValue.Entry`` callers read)."""

    key: str
    value: bytes
    revision: int


# --- requests over one reply subscription --------------------------------------------------


class JetStreamRequests:
    """Requests and publishes whose answers come back on one reply subscription (see the
    module docstring). ``start()`` before use (``request`` starts it when needed); ``stop()``
    fails what still waits with ``ConnectionClosedError``; ``close()`` waits for it first and
    refuses later requests (``ConnectionClosedError``)."""

    def __init__(self, nc: NatsClient, *, timeout_s: float = 10.0):
        self._nc = nc
        self.timeout_s = timeout_s
        self._prefix = ""
        self._tokens = itertools.count(1)
        self._waiting: dict[str, tuple[asyncio.Future[Msg], asyncio.TimerHandle | None]] = {}
        self._sub: Subscription | None = None
        self._opening = asyncio.Lock()
        self.closed = False

    async def start(self) -> None:
        if self._sub is not None:
            return
        async with self._opening:
            if self.closed:
                raise nats.errors.ConnectionClosedError
            if self._sub is None:
                prefix = self._nc.new_inbox() + "."
                self._sub = await self._nc.subscribe(
                    prefix + "*", cb=self._on_reply, pending_msgs_limit=-1
                )
                self._prefix = prefix

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()
        for future, timer in self._waiting.values():
            if timer is not None:
                timer.cancel()
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())
        self._waiting.clear()

    async def close(self, grace_s: float = 30.0) -> None:
        """Refuse new requests, wait up to ``grace_s`` for the answers still awaited (each is
        bounded by its own timeout anyway), then ``stop``: nothing in flight is cut off and the
        reply subscription is gone before the connection drains."""
        self.closed = True
        waiting = [future for future, _ in self._waiting.values() if not future.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=grace_s)
        await self.stop()

    @property
    def in_flight(self) -> int:
        """Answers still awaited."""
        return len(self._waiting)

    def expect(self, timeout_s: float | None = None) -> tuple[str, asyncio.Future[Msg]]:
        """A fresh reply subject and the future its answer resolves. With ``timeout_s`` a
        timer fails it with ``nats.errors.TimeoutError``; without, the caller bounds the wait.
        Either way the caller ``forget``s the subject once it stops waiting. After ``start``."""
        reply = self._prefix + str(next(self._tokens))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        timer = loop.call_later(timeout_s, self._expire, reply) if timeout_s is not None else None
        self._waiting[reply] = (future, timer)
        return reply, future

    def forget(self, reply: str) -> None:
        """Stop routing ``reply``'s answer (a late one is dropped); the future is left as is."""
        waiting = self._waiting.pop(reply, None)
        if waiting is not None and waiting[1] is not None:
            waiting[1].cancel()

    async def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject, None)
        if waiting is None:
            return  # answered after its timeout, or forgotten
        future, timer = waiting
        if timer is not None:
            timer.cancel()
        if not future.done():
            future.set_result(msg)

    def _expire(self, reply: str) -> None:
        waiting = self._waiting.pop(reply, None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_exception(nats.errors.TimeoutError())

    async def request(
        self,
        subject: str,
        payload: bytes,
        header: Header | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Msg:
        """Send ``payload`` to ``subject`` (with one optional header) and return the answer;
        ``nats.errors.TimeoutError`` after ``timeout_s`` (``None``: the instance's)."""
        if self._sub is None:
            await self.start()
        reply, future = self.expect(self.timeout_s if timeout_s is None else timeout_s)
        try:
            await publish_message(self._nc, subject, reply, payload, header)
            return await future
        except BaseException:  # not sent, cancelled, timed out (then already forgotten)
            self.forget(reply)
            raise

    # --- JetStream --------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        payload: bytes,
        header: Header | None = None,
        *,
        timeout_s: float | None = None,
    ) -> int:
        """A JetStream publish; the stream sequence once stored (or de-duplicated)."""
        return pub_ack_seq(await self.request(subject, payload, header, timeout_s=timeout_s))

    async def publish_event(self, event: Event, *, timeout_s: float = 5.0) -> int:
        """``mailgate_core.nats.publish_event``: ``Nats-Msg-Id = event_id``; PublishError when
        JetStream did not acknowledge it (``request`` and ``publish`` inlined: the hot path of
        every durable publish)."""
        try:
            if self._sub is None:
                await self.start()
            reply, future = self.expect(timeout_s)
            try:
                await publish_message(
                    self._nc,
                    event.subject(),
                    reply,
                    encode(event),
                    ("Nats-Msg-Id", event.event_id),
                )
                msg = await future
            except BaseException:  # not sent, cancelled, timed out (then already forgotten)
                self.forget(reply)
                raise
            return pub_ack_seq(msg)
        except _PUBLISH_ERRORS as exc:
            raise core.PublishError(f"{type(exc).__name__}: {exc}") from exc

    async def publish_events(self, events: Sequence[Event], *, timeout_s: float = 5.0) -> list[int]:
        """``mailgate_core.nats.publish_events``: every event's publish in one write, then
        their acks awaited together (each within ``timeout_s``); the stream seqs in order.
        PublishError (the first failure in order, once every answer is in) unless JetStream
        acknowledged every one."""
        if len(events) == 1:
            return [await self.publish_event(events[0], timeout_s=timeout_s)]
        if not events:
            return []
        try:
            if self._sub is None:
                await self.start()
            sends = [
                (event.subject(), encode(event), ("Nats-Msg-Id", event.event_id))
                for event in events
            ]
            expected = [self.expect(timeout_s) for _ in sends]
            try:
                await self._send_all(sends, [reply for reply, _ in expected])
                answers = await asyncio.gather(
                    *(future for _, future in expected), return_exceptions=True
                )
            except BaseException:
                for reply, _ in expected:
                    self.forget(reply)
                raise
        except _PUBLISH_ERRORS as exc:
            raise core.PublishError(f"{type(exc).__name__}: {exc}") from exc
        seqs: list[int] = []
        for answer in answers:
            try:
                if isinstance(answer, BaseException):
                    raise answer
                seqs.append(pub_ack_seq(answer))
            except BaseException as exc:  # as the gather of single publishes reported it
                raise core.PublishError(f"{type(exc).__name__}: {exc}") from exc
        return seqs

    async def _send_all(self, sends: list[tuple[str, bytes, Header]], replies: list[str]) -> None:
        """The publishes in one write when each fits, else one by one (``publish_message``)."""
        nc = self._nc
        commands: list[bytes] = []
        for (subject, payload, header), reply in zip(sends, replies, strict=True):
            if not fits(subject, reply, header):
                break
            command = publish_command(subject, reply, payload, header)
            if not within_max_payload(nc, command, subject, reply):
                break
            commands.append(command)
        else:
            if await write(nc, b"".join(commands)):
                return
        for (subject, payload, header), reply in zip(sends, replies, strict=True):
            await publish_message(nc, subject, reply, payload, header)

    def key_value(self, bucket: str, fallback: Any) -> LeanKeyValue:
        """A KV bucket's get/put/create through these requests; ``fallback`` is nats-py's
        ``KeyValue`` of the same bucket (used for the rare create of an existing key)."""
        return LeanKeyValue(self, bucket, fallback)


_PUBLISH_ERRORS = (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError)
"""What a failed JetStream publish raises (``mailgate_core.nats.publish_event`` turns each
into ``PublishError``, on nats-py's path too)."""


def pub_ack_seq(msg: Msg) -> int:
    """The stream sequence of JetStream's answer to a publish, or what nats-py's
    ``js.publish`` raises for that answer (``NoStreamResponseError``, ``APIError`` subclasses
    as ``APIError.from_error`` picks them)."""
    headers = msg.headers
    if headers and headers.get(_STATUS) == _NO_RESPONDERS:
        raise nats.js.errors.NoStreamResponseError
    try:
        ack = decode_pub_ack(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise nats.js.errors.APIError(description=f"unreadable publish ack: {exc}") from exc
    if ack.error is not None:
        raise api_error(ack.error)
    return ack.seq


# --- one instance per connection, for every event publish ----------------------------------

_CONNECTION_REQUESTS = "_mailgate_jetstream_requests"
"""The attribute of a nats-py client holding its shared ``JetStreamRequests`` (on the client
object, so it lives and dies with the connection; no registry to leak from)."""


def connection_requests(js: Any) -> JetStreamRequests | None:
    """The ``JetStreamRequests`` shared by the event publishes on ``js``'s connection (nats-py
    keeps the client as ``js._nc``), made on first use. ``None`` when the caller must use
    nats-py's ``js.publish``: ``js`` is not nats-py's ``JetStreamContext``, the connection is
    closed or draining, or ``close_connection_requests`` closed the instance."""
    nc = getattr(js, "_nc", None)
    if nc is None:
        return None
    requests: JetStreamRequests | None = getattr(nc, _CONNECTION_REQUESTS, None)
    if requests is None:
        if nc.is_closed or nc.is_draining:
            return None
        requests = JetStreamRequests(nc)
        setattr(nc, _CONNECTION_REQUESTS, requests)
        return requests
    if requests.closed or nc.is_draining:
        return None
    return requests


async def close_connection_requests(nc: NatsClient, grace_s: float = 30.0) -> None:
    """Close ``nc``'s shared ``JetStreamRequests`` (``JetStreamRequests.close``: the acks in
    flight are awaited, then the reply subscription goes); later event publishes on ``nc``
    use nats-py's ``js.publish``. Call before draining the connection."""
    requests: JetStreamRequests | None = getattr(nc, _CONNECTION_REQUESTS, None)
    if requests is None:
        requests = JetStreamRequests(nc)  # closed from the start: none is made later
        setattr(nc, _CONNECTION_REQUESTS, requests)
    await requests.close(grace_s)


def jetstream_timeout(js: Any) -> float:
    """The default timeout of a nats-py ``JetStreamContext`` (``js.publish(timeout=None)``)."""
    timeout = getattr(js, "_timeout", None)
    return float(timeout) if timeout is not None else 5.0


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
            # trouble to retry: postal-sender must not take it for "never submitted".
            raise api_error(answer.error)
        stored = answer.message
        if stored is None or stored.subject != subject:
            raise nats.js.errors.KeyNotFoundError
        if stored.hdrs and _KV_OPERATION in stored.hdrs:
            # A delete or purge marker (values written here carry no headers).
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
