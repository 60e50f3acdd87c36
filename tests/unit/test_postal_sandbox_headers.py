"""The sandbox reads send/raw headers with the compat32 split and ``policy.default`` applied to
the headers it needs (cached): the same values ``policy.default`` parsing gives."""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailgate_fakes.postal import _decode64, _header_values, _headers_of, _split_simple_headers

NAMES = ("From", "Sender", "Message-ID", "X-Postal-Tag", "Subject", "Reply-To", "To")

SAMPLES = [
    b"From: A <a@shop.example.com>\r\nTo: b@x\r\nSubject: =?utf-8?q?Caf=C3=A9?= hi\r\n"
    b" there\r\nMessage-ID: <abc@d>\r\nX-Postal-Tag: t1\r\nX-Postal-Tag:  t2 \r\n\r\nbody",
    b'From: "Weird, Name" <w@x.com>, c@d\r\nSender: s@x\r\nmessage-id:   <x@y>  \r\n'
    b"Subject: \xc3\xa9t\xc3\xa9 raw utf8\r\n\r\n",
    b"From: broken <<<\r\nSubject:\r\nReply-To: =?iso-8859-1?b?ZOlq4A==?= <r@x>\r\n\r\n",
    b"Subject: no from\r\n\r\nFrom: in the body <b@x>\r\n",
    b"From: a@x\r\nX-Postal-Tag: one\r\n\tfolded\r\n\r\n",
]


def default_policy_values(raw: bytes, name: str) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
        head + b"\r\n\r\n"
    )
    try:
        return [str(v) for v in parsed.get_all(name) or []]
    except Exception:
        return []


@pytest.mark.parametrize("raw", SAMPLES)
def test_header_values_match_policy_default_parsing(raw: bytes) -> None:
    headers = _headers_of(raw)
    for _ in range(2):  # the second read comes from the cache
        for name in NAMES:
            assert _header_values(headers, name) == default_policy_values(raw, name), name


def test_headers_end_at_the_first_blank_line() -> None:
    headers = _headers_of(SAMPLES[3])
    assert _header_values(headers, "From") == []
    assert _header_values(headers, "subject") == ["no from"]


def compat32_pairs(raw: bytes) -> list[tuple[str, str]]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        head + b"\r\n\r\n"
    )
    return list(parsed.raw_items())


_LINE_PARTS = st.sampled_from(
    [
        "From: a@x",
        "Subject: hi",
        "Subject:",
        "X-Tag:  two  ",
        " folded",
        "\tfolded",
        "  ",
        "From a@x",
        "no colon",
        ":empty name",
        "Bad Name: v",
        "\xe9: v",
        "Sub\xe9: v",
        "X: caf\xe9",
        "X: a\rb",
        "X: a\nb",
        "",
        'To: b@y, "c, d" <c@d>',
        "X-\x7f: del",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINE_PARTS, max_size=8), st.sampled_from(["", "\r\n", "\r\n\r\nbody"]))
def test_the_direct_split_gives_the_compat32_pairs(lines: list[str], tail: str) -> None:
    raw = "\r\n".join(lines).encode("utf-8", "surrogateescape") + tail.encode()
    assert _headers_of(raw) == compat32_pairs(raw)


@pytest.mark.parametrize("raw", SAMPLES)
def test_well_formed_samples_take_the_direct_split(raw: bytes) -> None:
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert _split_simple_headers(head) == compat32_pairs(raw)


def ruby_decode64(data: str) -> bytes:
    """The lenient path alone (what ``_decode64`` did before its strict fast path)."""
    cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", data.encode("latin-1", "ignore")).rstrip(b"=")
    cleaned = cleaned[: len(cleaned) - (len(cleaned) % 4 == 1)]
    cleaned += b"=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned)
    except binascii.Error:
        return b""


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
        st.text(alphabet="AQZaz09+/=\n \xe9-_", max_size=24),
    )
)
def test_decode64_fast_path_decodes_like_ruby(data: str) -> None:
    assert _decode64(data) == ruby_decode64(data)


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="aZ09!#$%&'*+/=?^_`{|}~.-\"()<>@ ,;:[]\\\t", max_size=12),
    st.text(alphabet="aZ09.-[]@ ()", max_size=10),
)
def test_a_plain_message_id_reads_as_the_header_parser_reads_it(local: str, domain: str) -> None:
    for value in (f"<{local}@{domain}>", f"{local}@{domain}", f" <{local}@{domain}> "):
        raw = f"Message-ID: {value}\r\nSubject: x\r\n\r\n".encode()
        assert _header_values(_headers_of(raw), "Message-ID") == default_policy_values(
            raw, "Message-ID"
        )


def test_a_hash_format_inbound_post_carries_the_message_headers() -> None:
    """Postal's Hash format (HTTPSender#parameters) sends the headers' last values and the
    Reply-To list; the sandbox reads them from the raw header block."""
    from mailgate_fakes.postal import Message, PostalSandbox

    raw = (
        b"From: Someone <someone@x.com>\r\nTo: u@ours.example\r\nCc: c@x.com\r\n"
        b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nReply-To: r1@x.com\r\nReply-To: r2@x.com\r\n"
        b"In-Reply-To: <a@b>\r\nReferences: <a@b>\r\nAuto-Submitted: auto-replied\r\n"
        b"Subject: hello?\r\n\r\nAnyone?\r\n"
    )
    message = Message(
        id=7,
        token="t",
        rcpt_to="u@ours.example",
        mail_from="someone@x.com",
        raw=raw,
        message_id=None,
        tag=None,
        subject="hello?",
        scope="incoming",
    )
    params = PostalSandbox(["k"]).inbound_params(message, "Hash", flat=False)
    assert params["from"] == "Someone <someone@x.com>"
    assert params["to"] == "u@ours.example"
    assert params["cc"] == "c@x.com"
    assert params["date"] == "Tue, 24 Nov 2026 10:00:00 +0000"
    assert params["in_reply_to"] == "<a@b>"
    assert params["references"] == "<a@b>"
    assert params["auto_submitted"] == "auto-replied"
    assert params["reply_to"] == ["r1@x.com", "r2@x.com"]
    assert params["plain_body"].rstrip() == "Anyone?"
