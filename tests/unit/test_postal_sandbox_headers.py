"""The sandbox reads send/raw headers with the compat32 split and ``policy.default`` applied to
the headers it needs (cached): the same values ``policy.default`` parsing gives."""

from __future__ import annotations

import email.parser
import email.policy

import pytest
from mailgate_fakes.postal import _header_values, _headers_of

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
