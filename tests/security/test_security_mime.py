"""Hostile MIME against smtp-ingest's pure pipeline (what handle_DATA runs per message):
line-ending normalisation, the attachment check, header preparation, the body plan and one
recipient's copy. Never an exception, memory bounded by the input size (tracemalloc), and
never a silent drop: every accepted input yields a copy with our Message-ID and the
original body bytes that were not rewritten (attachments byte-identical)."""

from __future__ import annotations

import base64
import email
import email.policy
import io
import tracemalloc
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailgate_core.tracking import TokenSigner
from mailgate_smtp_ingest.attachments import find_forbidden_attachment
from mailgate_smtp_ingest.replies import Rejected
from mailgate_smtp_ingest.rewrite import HeaderRules, normalize_line_endings, prepare
from mailgate_smtp_ingest.tracking_rewrite import (
    MAX_TRACKED_LINKS,
    TrackingLinks,
    plan_message,
    render_copy,
)

LINKS = TrackingLinks("https://t.example.net", TokenSigner(["hostile-secret"]))
RULES = HeaderRules()
MID = "01J0000000000000000000HOST1"
DOMAIN = "mg.example.net"
MB = 1024 * 1024


def process(raw: bytes) -> tuple[str, bytes]:
    """("refused", extension), ("rejected", SMTP reply) or ("copy", the recipient's
    message) - as handle_DATA does."""
    raw = normalize_line_endings(raw)
    try:
        extension = find_forbidden_attachment(raw)
    except Rejected as exc:
        return "rejected", str(exc.reply).encode()
    if extension is not None:
        return "refused", extension.encode()
    plan = plan_message(prepare(raw, RULES), LINKS)
    copy, _fell_back = render_copy(plan, LINKS, mailgate_id=MID, domain=DOMAIN, tracking=True)
    return "copy", copy


def checked(raw: bytes) -> bytes:
    kind, copy = process(raw)
    assert kind == "copy", copy
    assert f"Message-ID: <{MID}@{DOMAIN}>".encode() in copy
    email.message_from_bytes(copy, policy=email.policy.default)  # parseable, never raises
    return copy


def peak_bytes(raw: bytes) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        process(raw)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- the hostile corpus ------------------------------------------------------------------


def zip_bomb_named_txt() -> tuple[bytes, bytes]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("inner.bin", b"\0" * (64 * MB))  # 64 MB that deflate to ~64 KB
    payload = base64.encodebytes(buf.getvalue()).replace(b"\n", b"\r\n")
    raw = (
        b"From: news@shop.example.com\r\nTo: a@example.org\r\nSubject: report\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n"
        b"--BB\r\nContent-Type: text/html\r\n\r\n<a href='https://x.example/'>x</a>\r\n"
        b"--BB\r\nContent-Type: text/plain; name=report.txt\r\n"
        b"Content-Disposition: attachment; filename=report.txt\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + payload + b"--BB--\r\n"
    )
    return raw, payload


def nested_rfc822(depth: int) -> bytes:
    inner = (
        b"From: a@shop.example.com\r\nSubject: core\r\n\r\n<a href='https://x.example'>x</a>\r\n"
    )
    for level in range(depth):
        inner = (
            b"From: news@shop.example.com\r\nSubject: level %d\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: message/rfc822\r\n\r\n" % level
        ) + inner
    return b"To: a@example.org\r\n" + inner


def nested_multipart(depth: int) -> bytes:
    body = b"Content-Type: text/html\r\n\r\n<a href='https://x.example'>deep</a>\r\n"
    for level in range(depth):
        b = b"b%d" % level
        body = (
            b"Content-Type: multipart/mixed; boundary="
            + b
            + b"\r\n\r\n--"
            + b
            + b"\r\n"
            + body
            + b"\r\n--"
            + b
            + b"--\r\n"
        )
    return b"From: news@shop.example.com\r\nTo: a@example.org\r\nMIME-Version: 1.0\r\n" + body


def one_line_body(size: int) -> bytes:
    return (
        b"From: news@shop.example.com\r\nTo: a@example.org\r\nSubject: long\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n<html><body>"
        + b"<a href='https://x.example/'>x</a>" * (size // 34)
        + b"</body></html>\r\n"
    )


def bad_charsets() -> list[bytes]:
    head = b"From: news@shop.example.com\r\nTo: a@example.org\r\nSubject: =?x-unknown?q?abc?=\r\n"
    return [
        head
        + b"Content-Type: text/html; charset=x-no-such-charset\r\n\r\n<a href='https://a.b/'>\xff\xfe</a>\r\n",
        head
        + b"Content-Type: text/html; charset=utf-8\r\n\r\n<a href='https://a.b/'>\xc3\x28\xa0\xa1</a>\r\n",
        head
        + b"Content-Type: text/plain; charset=koi8-r\r\n"
        + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=C0=C1=ZZ=\r\n[Unsubscribe]\r\n",
        head
        + b"Content-Type: text/html; charset=utf-16\r\n"
        + b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n",
        head + b"Content-Type: text/html; charset=\"\"\r\n\r\n<a href='https://a.b/'>x</a>\r\n",
        head + b"Content-Type: multipart/alternative\r\n\r\nno boundary at all\r\n",
        head + b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\n\r\n--\r\n',
    ]


def many_headers(count: int) -> bytes:
    lines = b"".join(b"X-Filler-%d: value %d\r\n" % (i, i) for i in range(count))
    return b"From: news@shop.example.com\r\nTo: a@example.org\r\n" + lines + b"\r\nbody\r\n"


def test_a_zip_bomb_named_txt_passes_byte_identical_and_is_never_unpacked() -> None:
    raw, payload = zip_bomb_named_txt()
    copy = checked(raw)
    assert payload in copy  # the attachment, byte for byte
    assert peak_bytes(raw) < 20 * len(raw) + 4 * MB  # 64 MB inflated would blow this


def test_message_rfc822_nested_100_deep_is_accepted_in_bounded_memory() -> None:
    raw = nested_rfc822(100)
    copy = checked(raw)
    assert b"Subject: level 50" in copy
    assert peak_bytes(raw) < 20 * len(raw) + 8 * MB


def test_multipart_nested_100_deep_is_accepted() -> None:
    copy = checked(nested_multipart(100))
    assert b"b99--" in copy


@pytest.mark.parametrize("build", [nested_rfc822, nested_multipart])
def test_nesting_too_deep_to_check_is_refused_with_a_554_not_a_crash(build) -> None:
    """1000 levels: the attachment check cannot walk it (the email package would hit the
    recursion limit), so the message is refused, permanently and explicitly."""
    kind, answer = process(build(1000))
    assert (kind, answer) == ("rejected", b"554 5.6.0 Message structure too deeply nested")


def test_a_10_mb_one_line_html_body_full_of_links_passes_in_bounded_memory_and_time() -> None:
    """300k links would cost a signature each per recipient (~30 s, ~300 MB per copy): past
    MAX_TRACKED_LINKS the body goes out as received (headers rewritten)."""
    raw = one_line_body(10 * MB)
    copy = checked(raw)
    assert raw.split(b"\r\n\r\n", 1)[1] in copy  # the body, untouched
    assert peak_bytes(raw) < 6 * len(raw)


def test_a_10_mb_one_line_text_body_passes_in_bounded_memory() -> None:
    raw = b"From: news@shop.example.com\r\nTo: a@example.org\r\n\r\n" + b"x" * (10 * MB)
    copy = checked(raw)
    assert copy.endswith(b"x" * 1000)
    assert peak_bytes(raw) < 8 * len(raw)


def test_links_up_to_the_cap_are_tracked_and_one_more_falls_back_to_headers_only() -> None:
    def with_links(n: int) -> bytes:
        return (
            b"From: news@shop.example.com\r\nTo: a@example.org\r\n"
            b"Content-Type: text/html\r\n\r\n"
            + b"".join(b"<a href='https://x.example/%d'>x</a>\r\n" % i for i in range(n))
        )

    at_cap = checked(with_links(MAX_TRACKED_LINKS))
    assert at_cap.count(b"https://t.example.net/track/c/") == MAX_TRACKED_LINKS
    over = checked(with_links(MAX_TRACKED_LINKS + 1))
    assert b"/track/c/" not in over and b"https://x.example/1000'" in over


@pytest.mark.parametrize("index", range(len(bad_charsets())))
def test_invalid_charsets_and_broken_encodings_pass_through(index: int) -> None:
    raw = bad_charsets()[index]
    checked(raw)


def test_twenty_thousand_header_fields_are_handled_in_linear_memory() -> None:
    raw = many_headers(20_000)
    copy = checked(raw)
    assert b"X-Filler-19999: value 19999" in copy
    assert peak_bytes(raw) < 40 * len(raw) + 4 * MB


def test_a_2_mb_header_line_is_handled_in_bounded_memory() -> None:
    raw = (
        b"From: news@shop.example.com\r\nTo: a@example.org\r\nX-Long: "
        + b"y" * (2 * MB)
        + b"\r\nSubject: =?utf-8?b?"
        + base64.b64encode(b"z" * (MB // 4))
        + b"?=\r\n\r\nbody\r\n"
    )
    copy = checked(raw)
    assert b"y" * 1000 in copy
    assert peak_bytes(raw) < 12 * len(raw)


def test_a_forbidden_attachment_inside_a_deep_nesting_is_still_found() -> None:
    raw = nested_multipart(10).replace(
        b"Content-Type: text/html\r\n\r\n",
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''evil%2Eexe\r\n\r\n",
    )
    assert process(raw) == ("refused", b".exe")


# --- generated hostile messages ----------------------------------------------------------

_token = st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=40)
_header_name = st.sampled_from(
    [
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "Subject",
        "From",
        "X-AMS-Campaign-ID",
        "X-AMS-Message-ID",
        "MIME-Version",
        "X-Mailgate-Tracking",
    ]
)
_content_type = st.sampled_from(
    [
        "text/html",
        "text/plain",
        "multipart/mixed; boundary=B",
        "multipart/alternative",
        "message/rfc822",
        "text/html; charset=koi8-r",
        "text/html; charset=bogus",
        "application/octet-stream; name=a.txt",
        'multipart/related; boundary="B"',
    ]
)
_cte = st.sampled_from(["7bit", "8bit", "base64", "quoted-printable", "x-uuencode", "binary"])
_chunk = st.sampled_from(
    [
        b"--B\r\n",
        b"--B--\r\n",
        b"\r\n",
        b'<a href="https://x.example/?q=1">l</a>',
        b"=\r\n",
        b"=ZZ",
        b"[Unsubscribe]",
        b"</body>",
        b"\xff\xfe\x00",
        b".\r\n",
        b"Content-Type: text/html\r\n",
        b"\r\n\r\n",
        b"=?utf-8?b?AAAA?=",
        b"\t folded\r\n",
        b"\x00" * 3,
    ]
)


@st.composite
def hostile_messages(draw: st.DrawFn) -> bytes:
    headers = [b"From: news@shop.example.com", b"To: a@example.org"]
    headers.append(b"Content-Type: " + draw(_content_type).encode())
    headers.append(b"Content-Transfer-Encoding: " + draw(_cte).encode())
    for name, value in draw(st.lists(st.tuples(_header_name, _token), max_size=6)):
        headers.append(name.encode() + b": " + value.encode("latin-1"))
    body = b"".join(draw(st.lists(_chunk, max_size=40)))
    body += draw(st.binary(max_size=200))
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_messages())
def test_generated_hostile_messages_never_raise_and_are_never_dropped(raw: bytes) -> None:
    kind, copy = process(raw)
    if kind == "copy":
        assert f"Message-ID: <{MID}@{DOMAIN}>".encode() in copy
    else:
        assert kind in ("refused", "rejected") and copy


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    kind, copy = process(raw)
    assert kind in ("copy", "refused", "rejected") and copy
