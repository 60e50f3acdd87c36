"""Part headers are parsed once per distinct header block (mime.content_info, the attachment
check's name lookup), and each message has its own multipart boundary: the boundary is kept
out of the memo key. Pinned here: that reads every Content-Type field exactly as parsing the
field itself does, and a message with a new boundary still finds its parts and attachments."""

from __future__ import annotations

import email
import email.policy
import string

from hypothesis import given
from hypothesis import strategies as st
from mailgate_smtp_ingest.attachments import find_forbidden_attachment
from mailgate_smtp_ingest.mime import ContentInfo, _content_info, content_info, memo_key
from mailgate_smtp_ingest.rewrite import scan_header_block

BCHARS = string.ascii_letters + string.digits + "'()+_,./:=?-"


def fields_of(block: bytes) -> tuple:
    fields, _, valid = scan_header_block(block + b"\r\n", 0, len(block) + 2)
    assert valid
    return tuple(fields)


def parsed_directly(block: bytes, default_type: str = "text/plain") -> ContentInfo:
    """content_info without any memo: the email package reads these very fields."""
    return _content_info.__wrapped__(fields_of(block), default_type)


def same(a: ContentInfo, b: ContentInfo) -> bool:
    keys = ("content_type", "boundary", "charset", "cte", "is_attachment")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


FIELDS = [
    b'Content-Type: multipart/alternative;\r\n boundary="===============4333854166053287869=="\r\n',
    b'Content-Type: multipart/mixed; boundary="b1_5f0c2a"\r\n',
    b'content-type: MULTIPART/Related;BOUNDARY="x(y)+z,./:=?"\r\n',
    b'Content-Type: multipart/mixed;\r\n\tboundary="abc"  \r\n',
    b"Content-Type: multipart/mixed; boundary=abc\r\n",  # unquoted: not rewritten
    b'Content-Type: multipart/mixed; boundary="a b"\r\n',  # a blank: not rewritten
    b'Content-Type: multipart/mixed; boundary="abc"; name="x.exe"\r\n',  # more params
    b'Content-Type: multipart/mixed; foo="boundary="abc""\r\n',
    b'Content-Type: multipart/mixed; boundary*0="ab"; boundary*1="c"\r\n',
    b'Content-Type: text/html; boundary="abc"\r\n',  # not a multipart
    b'Content-Type: multipart/mixed; boundary="abc"\r\nContent-Type: text/plain\r\n',
    b'Content-Type: multipart/mixed; boundary="abc"\r\n'
    b"Content-Transfer-Encoding: 7bit\r\nContent-Disposition: inline\r\n",
]


def test_each_field_reads_as_the_email_package_reads_it() -> None:
    for block in FIELDS:
        for default_type in ("text/plain", "message/rfc822"):
            got = content_info(fields_of(block), default_type)
            assert same(got, parsed_directly(block, default_type)), block


def test_only_a_boundary_only_multipart_field_is_keyed_without_its_boundary() -> None:
    rewritten = [block for block in FIELDS if memo_key(fields_of(block))[1] is not None]
    assert rewritten == FIELDS[:4] + FIELDS[-1:]
    key, boundary = memo_key(fields_of(FIELDS[1]))
    assert boundary == "b1_5f0c2a"
    assert key == memo_key(fields_of(FIELDS[1].replace(b"b1_5f0c2a", b"other")))[0]


@given(
    boundary=st.text(BCHARS, min_size=1, max_size=70),
    subtype=st.sampled_from(["mixed", "alternative", "related", "digest"]),
    fold=st.sampled_from([" ", "\r\n ", "\r\n\t", ""]),
)
def test_any_plain_boundary_reads_as_the_email_package_reads_it(
    boundary: str, subtype: str, fold: str
) -> None:
    block = f'Content-Type: multipart/{subtype};{fold}boundary="{boundary}"\r\n'.encode()
    got = content_info(fields_of(block))
    assert same(got, parsed_directly(block))
    assert got.boundary == email.message_from_bytes(block + b"\r\n").get_boundary()


def test_a_new_boundary_per_message_still_finds_the_forbidden_attachment() -> None:
    def message(boundary: str, filename: str) -> bytes:
        return (
            f"From: a@shop.example.com\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: multipart/mixed;\r\n boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f'Content-Disposition: attachment; filename="{filename}"\r\n\r\nMZ\r\n'
            f"--{boundary}--\r\n"
        ).encode()

    assert find_forbidden_attachment(message("=_b1", "price.pdf")) is None
    assert find_forbidden_attachment(message("=_b2", "run.exe")) == ".exe"
    assert find_forbidden_attachment(message("=_b3", "price.pdf")) is None
    raw = message("=_b4", "x.scr")
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert [p.get_filename() for p in parsed.walk()][-1] == "x.scr"
    assert find_forbidden_attachment(raw) == ".scr"
