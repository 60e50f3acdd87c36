"""Many NATS publishes written as one: JetStream acks of a batch and the outbox's STATUS
messages.

nats-py's ``publish`` validates the subject and reply with a pattern, encodes each header
through a regex check, builds the command and asks its flusher to run, per message. For
the ledger's own, well-formed messages (ack replies JetStream gave us, ``status.<name>``
subjects and event-id message ids) that is most of the cost of a publish. Here the
protocol commands are built directly and handed to the connection's pending buffer at once,
then flushed once. This uses two private members of nats-py's client (``_send_command``,
``_flush_pending``; nats-py is pinned in uv.lock); when they are missing, or the connection
is not connected (reconnecting: nats-py's own publish then decides whether to buffer or
refuse), ``send`` returns False and callers publish the ordinary way.
"""

from __future__ import annotations

from collections.abc import Sequence

from nats.aio.client import Client as NatsClient

_HEADER_START = b"NATS/1.0\r\nNats-Msg-Id: "
_FORBIDDEN = (" ", "\r", "\n", "\t")


def is_plain_token(value: str) -> bool:
    """Safe inside a protocol line: non-empty, no whitespace or line break."""
    return bool(value) and not any(c in value for c in _FORBIDDEN)


def ack_command(reply: str) -> bytes:
    """``PUB <reply> 0``: an empty message to a JetStream ack subject acknowledges it."""
    return b"PUB " + reply.encode() + b" 0\r\n\r\n"


def hpub_command(subject: str, reply: str, msg_id: str, payload: bytes) -> bytes:
    """A publish with one header, ``Nats-Msg-Id``."""
    header = _HEADER_START + msg_id.encode() + b"\r\n\r\n"
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        len(header),
        len(header) + len(payload),
        header,
        payload,
    )


def batch_hpub_command(
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
        _HEADER_START,
        msg_id.encode(),
        batch_id.encode(),
        sequence,
        b"Nats-Batch-Commit: 1\r\n" if commit else b"",
    )
    target = subject.encode() + (b" " + reply.encode() if reply else b"")
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (
        target,
        len(header),
        len(header) + len(payload),
        header,
        payload,
    )


async def send(nc: NatsClient, commands: Sequence[bytes]) -> bool:
    """Write ``commands`` to the connection in one go; False when the caller must publish
    the ordinary way instead (nothing was written)."""
    send_command = getattr(nc, "_send_command", None)
    flush_pending = getattr(nc, "_flush_pending", None)
    if send_command is None or flush_pending is None or not nc.is_connected:
        return False
    if nc.is_draining_pubs:
        return False
    await send_command(b"".join(commands))
    await flush_pending()
    return True
