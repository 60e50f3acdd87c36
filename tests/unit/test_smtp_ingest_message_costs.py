"""smtp-ingest's per-message work, made cheaper without changing a byte of what it produces.

Pinned here, each against the plain computation it replaces:
- a quoted-printable part encoded once with holes for the tokens (``_QpLayout``) gives, for
  every recipient, the bytes the encoder gives for that recipient's part, and any fill of
  another shape goes to the encoder;
- a body part's header block read once per distinct block (``mime._part_head``) walks to the
  same parts, fields, offsets and content info as reading it each time;
- ``prepare`` reads the ids, subject, From and tracking switch and strips the fields exactly
  as its field-by-field version did;
- the attachment check skips parts naming no file and still finds every forbidden name;
- the Bloom filter's early exit answers as checking every position does.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailgate_core.ids import new_ulid
from mailgate_core.tracking import TokenSigner
from mailgate_smtp_ingest import mime, tracking_rewrite
from mailgate_smtp_ingest.attachments import (
    FORBIDDEN_EXTENSIONS,
    attachment_extension,
    find_forbidden_attachment,
    part_filenames,
    strict_parts,
)
from mailgate_smtp_ingest.rewrite import (
    HeaderField,
    HeaderRules,
    addresses_in,
    decode_words,
    normalize_line_endings,
    prepare,
    scan_header_block,
)
from mailgate_smtp_ingest.suppression_index import _HASHES, BloomFilter
from mailgate_smtp_ingest.tracking_rewrite import (
    TrackingLinks,
    _QpLayout,
    _Recipient,
    plan_message,
)

LINKS = TrackingLinks("https://t.mg.example.net", TokenSigner(["unit-test-secret"]))
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _campaign(html: str, text: str, cte: str = "quoted-printable", boundary: str = "b") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <news@shop.example.com>"
    msg["To"] = "ivan@example.org"
    msg["Subject"] = "Скидки"
    msg.set_content(text, cte=cte)
    msg.add_alternative(html, subtype="html", cte=cte)
    msg.set_boundary(f"=_{boundary}_=")
    return normalize_line_endings(msg.as_bytes(policy=SMTP_POLICY))


def _parts(raw: bytes, links: TrackingLinks = LINKS) -> tuple[tracking_rewrite.PartTemplate, ...]:
    from mailgate_smtp_ingest.rewrite import prepare as _prepare

    plan = plan_message(_prepare(raw, HeaderRules()), links)
    assert plan.body is not None
    return plan.body.parts


def _recipient(mailgate_id: str, *, tracking: bool = True) -> _Recipient:
    return _Recipient.of(LINKS, mailgate_id, tracking=tracking)


def _rendered(part: tracking_rewrite.PartTemplate, r: _Recipient) -> bytes:
    return b"".join(bytes(piece) for piece in part.pieces(r))


# --- the quoted-printable layout ------------------------------------------------------------

_WORD = st.sampled_from(
    ["Скидки", "sale", " ", "  ", "\t", "=", ".", "a" * 70, "ü", "&amp;", "<b>", "end. "]
)
_LINE = st.lists(_WORD, max_size=12).map("".join)
_LINK = st.builds(
    lambda path, label: f'<a href="https://shop.example.com/{path}">{label}</a>',
    st.text("abcxyz/?=&-_.", max_size=90),
    _LINE,
)


@st.composite
def _html(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 8))):
        items = draw(st.lists(st.one_of(_LINE, _LINK, st.just("[Unsubscribe]")), max_size=5))
        lines.append("".join(items))
    tail = draw(st.sampled_from(["</body></html>", "", " </body>"]))
    return "<html><body>" + "\n".join(lines) + tail + "\n"


@QUICK
@given(html=_html(), text=_LINE, tracking=st.booleans(), ulid=st.booleans())
def test_a_layout_fills_in_what_the_encoder_writes_for_each_recipient(
    html: str, text: str, tracking: bool, ulid: bool
) -> None:
    tracking_rewrite._shared_part_template.cache_clear()
    raw = _campaign(html, text + " [Unsubscribe]\n")
    for part in _parts(raw):
        plain = replace(part, shared=False)
        for _ in range(4):  # (the layout is made at a part's second render)
            # a ULID fits the layout; another id makes tokens of another length
            mailgate_id = new_ulid() if ulid else f"legacy-{new_ulid()}"
            r = _recipient(mailgate_id, tracking=tracking)
            assert _rendered(part, r) == _rendered(plain, r)


def test_campaign_parts_get_a_layout_and_use_it() -> None:
    tracking_rewrite._shared_part_template.cache_clear()
    html = "<html><body>" + "".join(
        f'<p>Товар {i}: <a href="https://shop.example.com/item/{i}?a=1&amp;b=2">купить</a></p>\n'
        for i in range(6)
    )
    raw = _campaign(html + '<a href="[Unsubscribe]">x</a></body></html>\n', "Hi [Unsubscribe]\n")
    parts = _parts(raw)
    assert [part.shared for part in parts] == [True, True]
    for part in parts:
        assert _QpLayout.of(part, LINKS) is not None
        _rendered(part, _recipient(new_ulid()))  # the first render: no layout yet
        assert part.__dict__["_qp_layout"] == 1
    calls: list[bytes] = []
    encode = tracking_rewrite._encode_qp

    def counting(data: bytes, newline: bytes) -> bytes:
        calls.append(data)
        return encode(data, newline)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracking_rewrite, "_encode_qp", counting)
        for _ in range(20):
            r = _recipient(new_ulid())
            for part in parts:
                copy = _rendered(part, r)
                calls.clear()
                assert copy == _rendered(replace(part, shared=False), r)
                assert len(calls) == 1  # (the reference above encoded; the layout did not)


def test_a_part_rendered_once_gets_no_layout() -> None:
    tracking_rewrite._shared_part_template.cache_clear()
    made: list[object] = []
    of = _QpLayout.of

    def counting(part: tracking_rewrite.PartTemplate, links: TrackingLinks) -> object:
        made.append(part)
        return of(part, links)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_QpLayout, "of", counting)
        for name in ("Ivan", "Maria", "Olga"):  # a personalised part: each seen once
            html = f'<html><body>Hi {name} <a href="https://a.example/x">x</a></body></html>\n'
            _rendered(_parts(_campaign(html, "t\n"))[-1], _recipient(new_ulid()))
        assert made == []


def test_a_fill_of_another_shape_is_refused_by_the_layout() -> None:
    tracking_rewrite._shared_part_template.cache_clear()
    raw = _campaign('<html><body><a href="https://a.example/x">x</a></body></html>\n', "t\n")
    html = _parts(raw)[-1]  # (the text part has nothing to rewrite)
    assert html.html
    layout = _QpLayout.of(html, LINKS)
    assert layout is not None
    good = [html._fill(slot, _recipient(new_ulid())) for slot in html.slots]
    assert layout.fill(good) is not None
    click = good[0]
    start = layout.shapes[0][3]
    for bad in (
        click[:-1],  # shorter
        click[:start] + b"=" + click[start + 1 :],  # a character the encoder escapes
        click[:start] + b" " + click[start + 1 :],
        click[:start] + b"." + click[start + 1 :],
        b"X" + click[1:],  # outside the token
        click[:-1] + b"\n",
    ):
        assert layout.fill([bad, *good[1:]]) is None
    pixel = good[-1]
    assert pixel.startswith(b"<img") and layout.shapes[-1][2]  # (a tail after the token)
    for bad in (pixel[:-1] + b"X", pixel[:-2] + b"\r\n"):
        assert layout.fill([*good[:-1], bad]) is None
    other = TrackingLinks("https://t.other.example", TokenSigner(["unit-test-secret"]))
    assert (
        layout.fill(
            [html._fill(s, replace(_recipient(new_ulid()), links=other)) for s in html.slots]
        )
        is None
    )


def test_a_layout_is_not_built_for_other_encodings() -> None:
    tracking_rewrite._shared_part_template.cache_clear()
    for cte in ("base64", "8bit"):
        raw = _campaign(
            '<html><body><a href="https://a.example/x">x</a></body></html>\n', "t\n", cte
        )
        assert all(_QpLayout.of(part, LINKS) is None for part in _parts(raw))


# --- part header blocks read once -----------------------------------------------------------

_HEADER_LINE = st.sampled_from(
    [
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b'Content-Type: text/html; charset="koi8-r"\r\n',
        b'Content-Type: multipart/mixed; boundary="in"\r\n',
        b"Content-Type: message/rfc822\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b'Content-Disposition: attachment; filename="a.exe"\r\n',
        b"Content-Disposition: inline\r\n",
        b" folded continuation\r\n",
        b"X-Other: 1\r\n",
        b"X-Other: 1\r\n\r\nX-Inner: 1\r\n",  # (a digest's part: a message by default)
        b"not a header line\r\n",
        b"X-Lone: a\rb\r\n",
        b"X-LF-only: 1\n",
        b"\n",
    ]
)
_BODY = st.sampled_from(
    [
        b"body\r\n",
        b"\r\nbody\r\n",
        b"",
        b"--in\r\nX: 1\r\n\r\nx\r\n--in--\r\n",
        b"X-Inner: 1\r\n\r\ninner\r\n",
    ]
)


@st.composite
def _multipart(draw: st.DrawFn) -> bytes:
    subtype = draw(st.sampled_from(["mixed", "digest", "alternative"]))
    out = [f'Content-Type: multipart/{subtype}; boundary="b"\r\n\r\n'.encode()]
    for _ in range(draw(st.integers(1, 4))):
        head = b"".join(draw(st.lists(_HEADER_LINE, max_size=4)))
        out.append(b"--b\r\n" + head + draw(st.sampled_from([b"\r\n", b""])) + draw(_BODY))
    out.append(b"--b--\r\n")
    return b"".join(out)


def _walk_summary(raw: bytes) -> object:
    parts = strict_parts(raw)
    if parts is None:
        return None
    return [
        (
            p.fields,
            p.start,
            p.body_start,
            p.end,
            p.depth,
            p.in_attached_message,
            p.has_body,
            (p.info.content_type, p.info.boundary, p.info.charset, p.info.cte),
            p.info.is_attachment,
        )
        for p in parts
    ]


@QUICK
@given(raw=_multipart())
def test_a_remembered_part_header_walks_as_reading_it_each_time(raw: bytes) -> None:
    mime._part_head.cache_clear()
    remembered = [_walk_summary(raw), _walk_summary(raw)]  # a miss, then a hit
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mime, "_MEMO_HEAD_MAX", 0)
        assert remembered == [_walk_summary(raw)] * 2


def test_a_digests_parts_are_messages_by_default_also_when_remembered() -> None:
    mime._part_head.cache_clear()
    part = b"X-Note: 1\r\n\r\nContent-Type: text/plain\r\n\r\nforwarded\r\n"
    mixed = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n' + part + b"--b--\r\n"
    digest = mixed.replace(b"multipart/mixed", b"multipart/digest")
    for _ in range(2):  # (the same part header block in both: one memo entry per default)
        mixed_parts, digest_parts = strict_parts(mixed), strict_parts(digest)
        assert mixed_parts is not None and digest_parts is not None
        assert [p.info.content_type for p in mixed_parts][1:] == ["text/plain"]
        assert [p.info.content_type for p in digest_parts][1:] == ["message/rfc822", "text/plain"]
        assert digest_parts[-1].in_attached_message


def test_a_campaigns_part_headers_are_read_once() -> None:
    mime._part_head.cache_clear()
    for serial in range(5):
        raw = _campaign("<html><body>x</body></html>\n", "t\n", boundary=f"b{serial}")
        assert strict_parts(raw) is not None
    info = mime._part_head.cache_info()
    assert (info.misses, info.hits) == (2, 8)  # the text and the HTML part's header blocks


# --- prepare --------------------------------------------------------------------------------


def _prepare_field_by_field(raw: bytes, rules: HeaderRules) -> tuple[object, ...]:
    """``prepare``'s values as its previous version read them, field by field."""
    fields, _, _ = scan_header_block(raw, 0, len(raw))

    def first(names: tuple[str, ...]) -> str | None:
        for name in names:
            for f in fields:
                if f.key == name.lower():
                    value = decode_words(f.value()).strip()
                    if value:
                        return value
        return None

    def clean(value: str | None) -> str | None:
        if value is None:
            return None
        return "".join(ch for ch in value if ch.isprintable()).strip()[:255] or None

    external = clean(first(rules.external_id_headers))
    campaign = clean(first(rules.campaign_id_headers))
    subject = decode_words(next((f.value() for f in fields if f.key == "subject"), ""))
    senders = addresses_in([f.value() for f in fields if f.key == "from"])
    switch = first((rules.tracking_header,)) if rules.tracking_header else None
    opt_out = switch is not None and switch.lower() in {"off", "no", "false", "0", "disabled"}
    kept = tuple(
        f
        for f in fields
        if not rules.is_stripped(f.key)
        and not (campaign is not None and f.key in ("x-postal-tag", "x-postmaster-msgtype"))
    )
    return external, campaign, subject, senders, opt_out, kept


_FIELD = st.sampled_from(
    [
        b"From: Shop <news@shop.example.com>\r\n",
        b"from: other@example.org\r\n",
        b"Subject: =?utf-8?b?0KHQutC40LTQutC4?=\r\n",
        b"Subject: second\r\n",
        b"X-AMS-Message-ID: \r\n",
        b"X-AMS-Message-ID: ams-1\x07\r\n",
        b"x-ams-message-id: ams-2\r\n",
        b"X-Mailer-RecptId: r-9\r\n",
        b"X-AMS-Campaign-ID: 73\r\n",
        b"X-AMS-Mailing-ID: \xd0\xbc\xd1\x8b\r\n",
        b"X-Postal-Tag: theirs\r\n",
        b"X-Postmaster-Msgtype: theirs\r\n",
        b"X-Mailgate-Tracking: OFF\r\n",
        b"X-Mailgate-Tracking: \r\n",
        b"X-Mailer: AMS\r\n",
        b"X-AMS-Other: 1\r\n",
        b"To: ivan@example.org\r\n",
        b"stray line\r\n",
        b" folded\r\n",
    ]
)


@QUICK
@given(
    fields=st.lists(_FIELD, max_size=12),
    tracking_header=st.sampled_from(["X-Mailgate-Tracking", ""]),
)
def test_prepare_reads_and_strips_as_field_by_field(
    fields: list[bytes], tracking_header: str
) -> None:
    raw = b"".join(fields) + b"\r\nbody\r\n"
    rules = HeaderRules(tracking_header=tracking_header)
    got = prepare(raw, rules)
    assert (
        got.external_id,
        got.campaign_id,
        got.subject,
        got.from_addresses,
        got.tracking_opt_out,
        got.fields,
    ) == _prepare_field_by_field(raw, rules)


# --- attachments and the Bloom filter --------------------------------------------------------

_NAMING = st.sampled_from(
    [
        'Content-Disposition: attachment; filename="price.EXE"',
        "Content-Disposition: attachment; FILENAME=run.bat",
        "Content-Disposition: attachment;\r\n filename*0*=utf-8''ev; filename*1=il.js",
        'Content-Type: application/octet-stream; NAME="=?UTF-8?B?YS5zY3I=?="',
        'Content-Type: application/pdf; name="ok.pdf"',
        "Content-Disposition: inline",
        "Content-Type: text/plain",
        "Content-Disposition: attachment; na\r\n me=x.exe",
    ]
)


@QUICK
@given(heads=st.lists(_NAMING, min_size=1, max_size=4))
def test_the_attachment_check_finds_what_every_part_names(heads: list[str]) -> None:
    body = b"".join(b"--b\r\n" + h.encode() + b"\r\n\r\nx\r\n" for h in heads)
    raw = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + body + b"--b--\r\n"
    expected = None
    import email

    for part in email.message_from_bytes(raw).walk():
        for name in part_filenames(part):
            if expected is None and attachment_extension(name) in FORBIDDEN_EXTENSIONS:
                expected = attachment_extension(name)
    assert find_forbidden_attachment(raw) == expected


@given(added=st.lists(st.text(max_size=20), max_size=50), probes=st.lists(st.text(max_size=20)))
def test_the_bloom_filters_early_exit_answers_as_every_position_does(
    added: list[str], probes: list[str]
) -> None:
    bloom = BloomFilter(0)
    bloom._bits = 257  # (small: set bits are common, so both answers occur)
    bloom._array = bytearray(33)
    for key in added:
        bloom.add(key)
    for key in [*added, *probes]:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        first = int.from_bytes(digest[:8], "little")
        step = int.from_bytes(digest[8:], "little") | 1
        every = all(
            bloom._array[p >> 3] >> (p & 7) & 1
            for p in ((first + i * step) % bloom._bits for i in range(_HASHES))
        )
        assert (key in bloom) == every
        if key in added:
            assert key in bloom


def test_the_header_fields_of_a_message_are_value_objects() -> None:
    # (the part-header memo hands the same HeaderField tuples to every message)
    a, b = HeaderField("Subject", b"Subject: x\r\n"), HeaderField("Subject", b"Subject: x\r\n")
    assert a == b and hash(a) == hash(b)


@given(value=st.binary(max_size=60).map(lambda b: b.replace(b":", b"")), name=st.just(b"X-F"))
def test_a_field_value_drops_every_line_break_as_unfolding_did(value: bytes, name: bytes) -> None:
    raw = name + b":" + value
    unfolded = value.replace(b"\r\n", b"").replace(b"\n", b"").replace(b"\r", b"")
    assert HeaderField("X-F", raw).value() == unfolded.decode("utf-8", "replace").strip()
