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
- ``GroupCommit`` (``connection_group_commit(js, stream)``, one per connection and stream,
  on top of its ``connection_requests``): ``publish_events(..., group=True)``; under load,
  concurrent callers' events go out together as JetStream atomic batches
  (``atomic_batch``), each caller still answered only once its events are stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from . import nats as core  # PublishError; a cycle: nats.py routes its publishes here
from .ids import new_ulid
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


def atomic_batch(items: Sequence[tuple[str, str, bytes]], reply: str, batch_id: str) -> bytes:
    """The commands of one atomic batch of ``(subject, msg_id, payload)`` items (every value
    a plain token), its commit (the last item) answered to ``reply``."""
    last = len(items) - 1
    return b"".join(
        [
            atomic_batch_command(
                subject,
                reply if i == last else "",
                msg_id,
                payload,
                batch_id=batch_id,
                sequence=i + 1,
                commit=i == last,
            )
            for i, (subject, msg_id, payload) in enumerate(items)
        ]
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
    batch: str = ""
    """An atomic batch's id (its ack: ``seq`` is then the last message's sequence)."""
    count: int = 0
    """How many messages the atomic batch stored (at ``seq - count + 1`` .. ``seq``)."""


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
    ack = read_pub_ack(msg)
    if ack.error is not None:
        raise api_error(ack.error)
    return ack.seq


def read_pub_ack(msg: Msg) -> JsPubAck:
    """JetStream's answer to a publish (an error in it left to the caller); what nats-py's
    ``js.publish`` raises for no stream (``NoStreamResponseError``) or an unreadable one."""
    headers = msg.headers
    if headers and headers.get(_STATUS) == _NO_RESPONDERS:
        raise nats.js.errors.NoStreamResponseError
    try:
        return decode_pub_ack(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise nats.js.errors.APIError(description=f"unreadable publish ack: {exc}") from exc


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


# --- group commit: concurrent publishes to one stream as one atomic batch ------------------

#: nats-server's own limits on atomic batches (2.12 to 2.15: ``server/stream.go``'s defaults,
#: which a server's ``jetstream { limits {...} }`` may change): 1,000 messages per batch, 50
#: batches open at once per stream and 1,000 per server, 10 s from a batch's first message
#: to its commit. A group commit stays well within them: ``GROUP_BATCH_MAX`` messages, each
#: batch written whole in one write (open for one server read), ``GROUP_BATCHES_IN_FLIGHT``
#: batches per connection and stream.
SERVER_ATOMIC_BATCH_MAX = 1000
GROUP_BATCH_MAX = 256
"""Messages per group-commit batch (as the ledger outbox's atomic batches)."""
GROUP_BATCH_MAX_BYTES = 4 * 1024 * 1024
"""Payload bytes per group-commit batch (one write; a larger set waits for the next)."""
GROUP_BATCHES_IN_FLIGHT = 4
"""Atomic batches awaiting their PubAck at once per connection and stream."""
GROUP_WINDOW = 32
"""Publishes awaiting their PubAck before callers queue for an atomic batch."""
GROUP_ATOMIC_MIN = 32
"""Fewer queued messages than this go as pipelined publishes, not as an atomic batch.

Measured on nats-server 2.15.1 (R1, file storage, ``sync_interval: always``; server CPU per
message, 2 KB events): a single publish costs it about 0.1-0.15 ms (0.25-0.3 ms when they
come one at a time), an atomic batch about 1.5 ms plus 0.045 ms per message, because the
server stages each R1 file-store batch in a file store of its own, made and deleted per
batch (``newBatchStore``). Batches pay off from about 24-32 messages (64: 0.065 ms per
message, 40% less; 4: 0.4-0.8 ms, several times more)."""

ERR_ATOMIC_DISABLED = 10174
"""JSAtomicPublishDisabledErr: the stream has no ``allow_atomic``."""
ERR_BATCH_DUPLICATE = 10201
"""JSAtomicPublishContainsDuplicateMessageErr: a message id of the batch is stored already."""
ERR_BATCH_TOO_MANY_INFLIGHT = 10210
"""JSAtomicPublishTooManyInflight: the stream's or the server's open batches are at their limit."""
_ONE_BY_ONE = frozenset({ERR_ATOMIC_DISABLED, ERR_BATCH_DUPLICATE, ERR_BATCH_TOO_MANY_INFLIGHT})
"""Refusals of a batch that say nothing about its messages: they are published one by one."""

Item = tuple[str, str, bytes]
"""One message of a batch: (subject, msg_id, payload)."""


class _Pending:
    """One caller's events waiting for (or in) a batch."""

    __slots__ = ("deadline", "events", "future", "items", "size")

    def __init__(
        self,
        events: Sequence[Event],
        items: list[Item],
        size: int,
        future: asyncio.Future[list[int]],
        deadline: float,
    ) -> None:
        self.events = events
        self.items = items
        self.size = size
        self.future = future
        self.deadline = deadline


def _publish_error(exc: BaseException) -> core.PublishError:
    """A PublishError of its own for each caller (one exception raised in several tasks
    would collect all of their tracebacks), with the text a single publish gives."""
    if isinstance(exc, core.PublishError):
        error = core.PublishError(str(exc))
        error.__cause__ = exc.__cause__
        return error
    error = core.PublishError(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class GroupCommit:
    """Group commit of durable event publishes to one stream over one connection.

    Callers (``publish``) hand over their events. While fewer than ``window`` publishes await
    their PubAck, they go out at once, exactly as ``JetStreamRequests.publish_events`` sends
    them (nothing added while the load is light). Beyond that, callers queue, and the queued
    events of many callers go out together as ONE JetStream atomic batch (ADR-50): one
    message each, as before, but stored by the server in one go with one sync and answered
    with one PubAck, as soon as ``atomic_min`` messages are queued (up to ``max_batches``
    batches in flight), or when room opens in the window (as pipelined publishes when fewer
    than ``atomic_min``: a small atomic batch costs the server more than its messages alone,
    see ``GROUP_ATOMIC_MIN``). Up to ``max_messages`` (and ``max_bytes``) go in one batch.

    Each caller returns only once JetStream acknowledged the commit holding its events, with
    their stream sequences (an atomic batch is stored in consecutive sequences ending at the
    ack's ``seq``): an ack still means durable. A batch JetStream refuses, does not answer in
    time or cannot be sent fails every caller in it with the ``PublishError`` a single
    publish would get. A refusal that says nothing about the messages (a duplicate message
    id in the batch, too many batches open, atomic publishing disabled on the stream)
    republishes them one by one, each caller's set with ``JetStreamRequests.publish_events``
    (de-duplicated per ``Nats-Msg-Id``); a stream without ``allow_atomic`` is published that
    way from then on. Callers whose events cannot go in a batch (not plain tokens, too
    large), and every caller while the server does not take atomic batches
    (``atomic_batches_supported``) or the connection is closed or draining, publish alone.

    Each caller's ``timeout_s`` bounds its wait for its commit to be sent (one that waited
    past it in the queue fails with the timeout, unsent); a commit's PubAck is awaited up to
    the latest of its callers' deadlines."""

    def __init__(
        self,
        requests: JetStreamRequests,
        nc: NatsClient,
        stream: str,
        *,
        window: int = GROUP_WINDOW,
        atomic_min: int = GROUP_ATOMIC_MIN,
        max_batches: int = GROUP_BATCHES_IN_FLIGHT,
        max_messages: int = GROUP_BATCH_MAX,
        max_bytes: int = GROUP_BATCH_MAX_BYTES,
    ) -> None:
        self._requests = requests
        self._nc = nc
        self.stream = stream
        self.window = max(1, window)
        self.max_messages = max(1, min(max_messages, SERVER_ATOMIC_BATCH_MAX))
        self.atomic_min = max(2, min(atomic_min, self.max_messages))
        self.max_batches = max(1, max_batches)
        self.max_bytes = max_bytes
        self.atomic = True
        """False once the stream refused atomic publishing (no ``allow_atomic``)."""
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued = 0  # messages queued
        self._in_flight = 0  # messages sent, PubAck awaited
        self._batches_out = 0  # atomic batches sent, PubAck awaited
        self._batch_prefix = new_ulid() + "."
        self._batch_numbers = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_batch: Callable[[int], None] | None = None
        """Called with the number of messages of each commit (a lone caller's too)."""
        self.commits = 0
        """Commits sent: callers' publishes alone, pipelined sets and atomic batches."""
        self.batches = 0
        """Atomic batches JetStream acknowledged."""
        self.one_by_one = 0
        """Atomic batches republished message by message after a refusal."""

    @property
    def in_flight(self) -> int:
        """Messages sent whose PubAck is awaited."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Callers waiting for a commit."""
        return len(self._queue)

    def usable(self) -> bool:
        """Whether a publish may join a batch now (else ``publish`` takes the plain path)."""
        nc = self._nc
        return (
            self.atomic
            and not self._requests.closed
            and not nc.is_closed
            and not nc.is_draining
            and atomic_batches_supported(nc)
        )

    def _items(self, events: Sequence[Event]) -> tuple[list[Item], int] | None:
        """The events as batch items and their size, or None when they cannot be batched."""
        items: list[Item] = []
        size = 0
        limit = self._nc.max_payload - 256  # room for the batch headers
        for event in events:
            subject, msg_id = event.subject(), event.event_id
            if not (is_plain_token(subject) and is_plain_token(msg_id)):
                return None
            payload = encode(event)
            if len(payload) + len(msg_id) > limit:
                return None
            items.append((subject, msg_id, payload))
            size += len(payload)
        if len(items) > self.max_messages or size > self.max_bytes:
            return None
        return items, size

    async def publish(self, events: Sequence[Event], *, timeout_s: float) -> list[int]:
        """Publish ``events`` (all on this stream) now or in the next commit; their stream
        seqs once JetStream acknowledged them. PublishError as
        ``JetStreamRequests.publish_events``."""
        if not events:
            return []
        if not self.usable():
            return await self._requests.publish_events(events, timeout_s=timeout_s)
        if not self._queue and self._in_flight < self.window:
            # Room in the window: this caller's publishes go now, as without group commit.
            count = len(events)
            self._in_flight += count
            self.commits += 1
            if self.on_batch is not None:
                self.on_batch(count)
            try:
                return await self._requests.publish_events(events, timeout_s=timeout_s)
            finally:
                self._in_flight -= count
                self._start_queued()
        batchable = self._items(events)
        if batchable is None:
            return await self._requests.publish_events(events, timeout_s=timeout_s)
        loop = asyncio.get_running_loop()
        pending = _Pending(
            events, batchable[0], batchable[1], loop.create_future(), loop.time() + timeout_s
        )
        self._queue.append(pending)
        self._queued += len(pending.items)
        self._start_queued()
        return await pending.future

    def _take(self) -> tuple[list[_Pending], int]:
        """Queued callers for one commit (whole callers, within the batch limits)."""
        queue = self._queue
        batch = [queue.popleft()]
        count, size = len(batch[0].items), batch[0].size
        while queue:
            nxt = queue[0]
            if count + len(nxt.items) > self.max_messages or size + nxt.size > self.max_bytes:
                break
            batch.append(queue.popleft())
            count += len(nxt.items)
            size += nxt.size
        self._queued -= count
        return batch, count

    def _start_queued(self) -> None:
        """Send what is queued: an atomic batch once ``atomic_min`` messages wait (and a
        batch slot is free), anything while the window has room."""
        while self._queue:
            full = self._queued >= self.atomic_min and self._batches_out < self.max_batches
            if not full and self._in_flight >= self.window:
                return
            batch, count = self._take()
            atomic = count >= self.atomic_min and self._batches_out < self.max_batches
            self._in_flight += count
            if atomic:
                self._batches_out += 1
            task = asyncio.create_task(
                self._run(batch, count, atomic=atomic), name=f"group-commit:{self.stream}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Pending], count: int, *, atomic: bool) -> None:
        try:
            await self._commit(batch, atomic=atomic)
        finally:
            self._in_flight -= count
            if atomic:
                self._batches_out -= 1
            self._start_queued()

    async def _commit(self, batch: list[_Pending], *, atomic: bool) -> None:
        """Send ``batch`` and settle each caller's future; never leaves one unsettled."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        live: list[_Pending] = []
        for pending in batch:
            if pending.future.done():
                continue  # its caller is gone (cancelled): nothing of it is sent
            if pending.deadline <= now:
                pending.future.set_exception(_publish_error(nats.errors.TimeoutError()))
                continue
            live.append(pending)
        if not live:
            return
        items = [item for pending in live for item in pending.items]
        timeout_s = max(pending.deadline for pending in live) - now
        self.commits += 1
        if self.on_batch is not None:
            self.on_batch(len(items))
        try:
            if len(live) == 1:  # one caller's events: sent as without group commit
                alone = await self._requests.publish_events(live[0].events, timeout_s=timeout_s)
                self._settle(live, alone)
                return
            if not atomic or len(items) < self.atomic_min or not self.atomic:
                await self._one_by_one(live)  # pipelined: one write, a PubAck each
                return
            seqs = await self._atomic(items, timeout_s)
            if seqs is None:
                self.one_by_one += 1
                await self._one_by_one(live)
            else:
                self.batches += 1
                self._settle(live, seqs)
        except (core.PublishError, *_PUBLISH_ERRORS) as exc:
            self._fail(live, exc)
        except BaseException as exc:  # a bug: fail the callers, then surface it
            self._fail(live, exc)
            raise

    async def _atomic(self, items: list[Item], timeout_s: float) -> list[int] | None:
        """One atomic batch: the stream seqs of its messages once acknowledged, None when
        JetStream refused it for a reason that says nothing about its messages (or it could
        not be written directly: not connected); raises what a single publish would."""
        requests = self._requests
        if requests._sub is None:
            await requests.start()
        reply, future = requests.expect(timeout_s)
        batch_id = self._batch_prefix + str(next(self._batch_numbers))
        try:
            if not await write(self._nc, atomic_batch(items, reply, batch_id)):
                requests.forget(reply)
                return None
            msg = await future
        except BaseException:
            requests.forget(reply)
            raise
        ack = read_pub_ack(msg)
        if ack.error is not None:
            if ack.error.err_code in _ONE_BY_ONE:
                if ack.error.err_code == ERR_ATOMIC_DISABLED:
                    self.atomic = False
                return None
            raise api_error(ack.error)
        if ack.count != len(items) or ack.seq < len(items):
            raise nats.js.errors.APIError(
                description=f"unexpected batch ack: {ack.count} of {len(items)} at {ack.seq}"
            )
        first = ack.seq - len(items) + 1
        return list(range(first, ack.seq + 1))

    async def _one_by_one(self, live: list[_Pending]) -> None:
        """Each caller's events published apart (``JetStreamRequests.publish_events``)."""
        now = asyncio.get_running_loop().time()

        async def one(pending: _Pending) -> None:
            try:
                seqs = await self._requests.publish_events(
                    pending.events, timeout_s=max(pending.deadline - now, 0.001)
                )
            except BaseException as exc:
                if not pending.future.done():
                    pending.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            if not pending.future.done():
                pending.future.set_result(seqs)

        await asyncio.gather(*(one(pending) for pending in live))

    @staticmethod
    def _settle(live: list[_Pending], seqs: list[int]) -> None:
        start = 0
        for pending in live:
            end = start + len(pending.items)
            if not pending.future.done():
                pending.future.set_result(seqs[start:end])
            start = end

    @staticmethod
    def _fail(live: list[_Pending], exc: BaseException) -> None:
        for pending in live:
            if not pending.future.done():
                pending.future.set_exception(_publish_error(exc))


_GROUP_COMMITS = "_mailgate_group_commits"
"""The attribute of a nats-py client holding its ``GroupCommit`` per stream."""


def connection_group_commit(js: Any, stream: str) -> GroupCommit | None:
    """The ``GroupCommit`` of ``stream`` shared by the event publishes on ``js``'s
    connection, made on first use; ``None`` when ``connection_requests`` is (the caller then
    publishes as without group commit)."""
    requests = connection_requests(js)
    if requests is None:
        return None
    nc = js._nc
    commits: dict[str, GroupCommit] | None = getattr(nc, _GROUP_COMMITS, None)
    if commits is None:
        commits = {}
        setattr(nc, _GROUP_COMMITS, commits)
    group = commits.get(stream)
    if group is None or group._requests is not requests:
        group = commits[stream] = GroupCommit(requests, nc, stream)
        observer = getattr(nc, _BATCH_OBSERVER, None)
        if observer is not None:
            group.on_batch = observer
    return group


_BATCH_OBSERVER = "_mailgate_batch_observer"


def observe_group_commits(nc: NatsClient, observer: Callable[[int], None]) -> None:
    """Call ``observer`` with the size of every group commit on ``nc`` (a metric)."""
    setattr(nc, _BATCH_OBSERVER, observer)
    for group in (getattr(nc, _GROUP_COMMITS, None) or {}).values():
        group.on_batch = observer
