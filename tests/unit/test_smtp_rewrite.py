"""smtp-ingest header rewrite: ids read and stripped, Message-ID replaced, body untouched."""

from __future__ import annotations

import email
import email.policy

from hypothesis import given, settings
from hypothesis import strategies as st
from mailgate_smtp_ingest.rewrite import (
    HeaderRules,
    decode_words,
    normalize_line_endings,
    prepare,
    render,
    split_header_block,
)

RULES = HeaderRules()

AMS_MESSAGE = (
    b"From: Shop <news@shop.example.com>\r\n"
    b"To: ivan@example.org\r\n"
    b"Subject: =?utf-8?b?0J/RgNC40LLQtdGC?=\r\n"
    b"Message-ID: <ams-original@ams.local>\r\n"
    b"X-AMS-Message-ID: ams-42\r\n"
    b"X-AMS-Campaign-ID: 73\r\n"
    b"X-AMS-Internal: secret-routing\r\n"
    b"X-Mailer: AMS Enterprise 5.0\r\n"
    b"X-Mailer-RecptId: 99\r\n"
    b"X-Custom: kept\r\n"
    b"  and folded\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello \xd0\x98\xd0\xb2\xd0\xb0\xd0\xbd\r\n"
    b"X-AMS-Message-ID: not a header, body text\r\n"
)


def test_ids_are_read_from_the_configured_headers_and_the_subject_decoded() -> None:
    prepared = prepare(AMS_MESSAGE, RULES)
    assert prepared.external_id == "ams-42"
    assert prepared.campaign_id == "73"
    assert prepared.subject == "Привет"
    assert prepared.from_addresses == ("news@shop.example.com",)


def test_ams_headers_are_stripped_and_ours_set() -> None:
    out = render(prepare(AMS_MESSAGE, RULES), mailgate_id="01HXAMPLE", domain="mg.example.net")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"X-AMS-" not in head
    assert b"X-Mailer" not in head
    assert b"ams-original" not in head
    assert head.count(b"Message-ID:") == 1
    assert b"Message-ID: <01HXAMPLE@mg.example.net>\r\n" in head + b"\r\n"
    assert b"X-Postal-Tag: 73" in head
    assert b"X-Postmaster-Msgtype: 73" in head
    assert b"X-Custom: kept\r\n  and folded" in head
    assert body == AMS_MESSAGE.partition(b"\r\n\r\n")[2]


def test_the_message_id_keeps_its_position() -> None:
    out = render(prepare(AMS_MESSAGE, RULES), mailgate_id="01A", domain="d.net")
    names = [f.name for f in split_header_block(out)[0]]
    assert names.index("Message-ID") == 3  # From, To, Subject, Message-ID


def test_a_message_without_message_id_or_campaign_gets_only_a_message_id() -> None:
    raw = b"From: a@b.ru\r\nX-Postal-Tag: customer-tag\r\n\r\nbody"
    out = render(prepare(raw, RULES), mailgate_id="01B", domain="d.net")
    assert (
        out == b"From: a@b.ru\r\nX-Postal-Tag: customer-tag\r\nMessage-ID: <01B@d.net>\r\n\r\nbody"
    )


def test_a_known_campaign_replaces_client_postal_tags() -> None:
    raw = b"X-Postal-Tag: other\r\nX-AMS-Mailing-ID: 5\r\n\r\nb"
    prepared = prepare(raw, RULES)
    out = render(prepared, mailgate_id="01C", domain="d.net")
    assert prepared.campaign_id == "5"
    assert out.count(b"X-Postal-Tag:") == 1 and b"X-Postal-Tag: 5\r\n" in out


def test_configured_names_and_prefixes_apply_case_insensitively() -> None:
    rules = HeaderRules(
        external_id_headers=("X-Ext",),
        campaign_id_headers=("X-Camp",),
        strip_prefixes=("x-internal-",),
        strip_headers=(),
    )
    raw = b"x-ext: e1\r\nX-CAMP: c1\r\nX-Internal-Route: r\r\nX-Mailer: kept\r\n\r\n"
    prepared = prepare(raw, rules)
    out = render(prepared, mailgate_id="01D", domain="d.net")
    assert (prepared.external_id, prepared.campaign_id) == ("e1", "c1")
    assert b"x-ext" not in out.lower() and b"x-internal" not in out.lower()
    assert b"X-Mailer: kept" in out


def test_render_keeps_the_line_ending_it_was_given() -> None:
    raw = b"From: a@b.ru\nSubject: hi\n\nline1\nline2\n"
    out = render(prepare(raw, RULES), mailgate_id="01E", domain="d.net")
    assert b"\r" not in out
    assert out.endswith(b"\n\nline1\nline2\n")


def test_bare_lf_input_is_normalized_to_crlf_and_crlf_input_left_alone() -> None:
    assert normalize_line_endings(b"A: 1\nB: 2\r\n\nbody\n") == b"A: 1\r\nB: 2\r\n\r\nbody\r\n"
    crlf = b"A: 1\r\n\r\nbody\r\nlone\rcr\r\n"
    assert normalize_line_endings(crlf) is crlf


def test_tracking_can_be_switched_off_per_message() -> None:
    raw = b"From: a@b.ru\r\nX-Mailgate-Tracking: off\r\n\r\nx"
    prepared = prepare(raw, RULES)
    assert prepared.tracking_opt_out
    assert b"X-Mailgate-Tracking" not in render(prepared, mailgate_id="01F", domain="d.net")


def test_headers_only_message_gets_a_header_block_end() -> None:
    out = render(prepare(b"Subject: x", RULES), mailgate_id="01G", domain="d.net")
    assert out == b"Subject: x\r\nMessage-ID: <01G@d.net>\r\n\r\n"


def test_decode_words_leaves_broken_encoded_words_alone() -> None:
    assert decode_words("=?unknown-charset?q?x?=") == "=?unknown-charset?q?x?="
    assert decode_words("=?windows-1251?b?z/Do4uXy?=") == "Привет"


_name = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True)
_value = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=60
)
_headers = st.lists(st.tuples(_name, _value), min_size=0, max_size=12)


@settings(max_examples=300, deadline=None)
@given(headers=_headers, body=st.binary(max_size=2000), ams=st.booleans())
def test_rewrite_keeps_the_body_byte_identical_and_the_message_parseable(
    headers: list[tuple[str, str]], body: bytes, ams: bool
) -> None:
    fields = [f"{n}: {v}".encode() for n, v in headers]
    if ams:
        fields += [b"X-AMS-Message-ID: e-1", b"X-AMS-Campaign-ID: c-1"]
    raw = b"\r\n".join(fields) + b"\r\n\r\n" + body if fields else b"\r\n" + body
    out = render(prepare(raw, RULES), mailgate_id="01HPROPERTY", domain="d.net")
    assert out.endswith(b"\r\n\r\n" + body)
    parsed = email.message_from_bytes(out, policy=email.policy.compat32)
    assert parsed["Message-ID"] == "<01HPROPERTY@d.net>"
    assert len(parsed.get_all("Message-ID")) == 1
    assert not any(k.lower().startswith("x-ams-") for k in parsed)
    if ams:
        assert parsed["X-Postal-Tag"] == "c-1"


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=3000))
def test_any_bytes_split_back_into_the_same_bytes(raw: bytes) -> None:
    fields, rest = split_header_block(raw)
    assert b"".join(f.raw for f in fields) + rest == raw
    prepare(raw, RULES)  # never raises


def test_a_broken_base64_encoded_word_is_left_as_written_not_raised() -> None:
    broken = "=?utf-8?b?0KHQ+utC40LTQutC4?="  # found by the property tests: HeaderParseError
    assert decode_words(broken) == broken
    prepared = prepare(f"Subject: {broken}\r\n\r\nx".encode(), RULES)
    assert prepared.subject == broken
    mangled_charset = "=?utf-8\ufffd?b?0KHQutC40LTQutC4?="  # a stray 8-bit byte: CharsetError
    assert decode_words(mangled_charset) == mangled_charset
