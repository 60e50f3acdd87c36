"""mailgate_core.nats_wire's protocol commands: the bytes nats-py would send, and only for
values that need none of nats-py's checks or trimming."""

from __future__ import annotations

import pytest
from mailgate_core import nats_wire
from nats.protocol import command


def nats_py_header(name: str, value: str) -> bytes:
    """The header block nats-py's ``publish`` builds for one (already trimmed) header."""
    return b"NATS/1.0\r\n" + name.encode() + b": " + value.encode() + b"\r\n\r\n"


@pytest.mark.parametrize("payload", [b"", b"{}", b"x" * 5000, b"a\r\nb"])
def test_a_publish_is_the_command_nats_py_builds(payload: bytes) -> None:
    subject, reply = "$KV.submissions.01HX", "_INBOX.abc.17"
    assert nats_wire.publish_command(subject, reply, payload) == command.pub_cmd(
        subject, reply, payload
    )
    for header in (
        ("Nats-Msg-Id", "sub-01HXYZ"),  # the shortcut for the usual header
        ("Nats-Expected-Last-Subject-Sequence", "0"),
    ):
        assert nats_wire.publish_command(subject, reply, payload, header) == command.hpub_cmd(
            subject, reply, nats_py_header(*header), payload
        )


def test_a_publish_without_reply_and_an_ack() -> None:
    assert nats_wire.publish_command("a.b", "", b"hi") == b"PUB a.b 2\r\nhi\r\n"
    head = nats_py_header("Nats-Msg-Id", "m1")
    assert nats_wire.publish_command("a.b", "", b"hi", ("Nats-Msg-Id", "m1")) == (
        b"HPUB a.b %d %d\r\n%shi\r\n" % (len(head), len(head) + 2, head)
    )
    assert nats_wire.ack_command("$JS.ACK.S.c.1.2.3.4.0") == b"PUB $JS.ACK.S.c.1.2.3.4.0 0\r\n\r\n"


def test_atomic_batch_messages_carry_the_batch_headers_and_only_the_last_a_reply() -> None:
    first = nats_wire.atomic_batch_command(
        "status.sent", "", "st-1", b"{}", batch_id="B", sequence=1, commit=False
    )
    head = b"NATS/1.0\r\nNats-Msg-Id: st-1\r\nNats-Batch-Id: B\r\nNats-Batch-Sequence: 1\r\n\r\n"
    assert first == b"HPUB status.sent %d %d\r\n%s{}\r\n" % (len(head), len(head) + 2, head)
    last = nats_wire.atomic_batch_command(
        "status.sent", "_INBOX.a.3", "st-2", b"{}", batch_id="B", sequence=2, commit=True
    )
    head = (
        b"NATS/1.0\r\nNats-Msg-Id: st-2\r\nNats-Batch-Id: B\r\nNats-Batch-Sequence: 2\r\n"
        b"Nats-Batch-Commit: 1\r\n\r\n"
    )
    assert last == command.hpub_cmd("status.sent", "_INBOX.a.3", head, b"{}")


@pytest.mark.parametrize(
    ("subject", "reply", "header"),
    [
        ("a b", "r", None),
        ("a", "r\r\nPUB x 0", None),
        ("", "r", None),
        ("a", "r", ("Nats-Msg-Id", "with space")),  # nats-py would keep it, but trim edges
        ("a", "r", ("Nats-Msg-Id", "x\r\nPUB evil 0")),
        ("a", "r", ("Bad Name", "v")),
        ("a", "r", ("Nats-Msg-Id", "")),
    ],
)
def test_values_unfit_for_a_protocol_line_are_left_to_nats_py(
    subject: str, reply: str, header: tuple[str, str] | None
) -> None:
    assert not nats_wire.fits(subject, reply, header)


def test_plain_values_fit() -> None:
    assert nats_wire.fits("$JS.API.STREAM.MSG.GET.KV_x", "_INBOX.a.1", None)
    assert nats_wire.fits("mail.submitted", "_INBOX.a.2", ("Nats-Msg-Id", "sub-01HX"))
