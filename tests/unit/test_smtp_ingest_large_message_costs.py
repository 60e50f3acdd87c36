"""smtp-ingest's work on a large campaign message (50 KB, tens of links, an attachment), made
cheaper without changing a byte of what it publishes.

Pinned here, each against the plain computation it replaces:
- the bare-LF check (``normalize_line_endings``) answers as comparing the counts of LF and
  CRLF did, and normalises the same bytes;
- tokens are signed with CPython's SHA-256 (RFC 2104 by hand) and base64url-encoded with
  ``binascii``: byte for byte the HMAC-SHA256 tokens of ``hmac``/``base64``, for any key;
- a click slot's fill is the escaped tracker prefix and the token's bytes, as escaping and
  encoding the whole click URL gives; a part's click tokens are signed in one call
  (``TokenSigner.sign_clicks``, each distinct URL once) with the tokens of one-by-one;
- a shared part is looked up by a key hashed on its length and ends (``_Body``) and
  compared in full: personalised parts that share the hash still get their own templates;
- ``_QpLayout.fill`` checks and splices the fills on their concatenation (``_Splicer``)
  with the answers of its per-slot version (refusals included), and a part with a layout
  is rendered without its literals;
- whole copies of varied campaign messages (QP, base64, 8bit; UTF-8 and single-byte
  charsets; tracking on and off; ULID and other ids; ``%`` in the HTML) equal the copies
  the encoder path makes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import os
import random
import re
from dataclasses import replace
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailgate_core import tracking
from mailgate_core.ids import new_ulid
from mailgate_core.tracking import TokenSigner
from mailgate_smtp_ingest import rewrite, tracking_rewrite
from mailgate_smtp_ingest.handlers import _inspect
from mailgate_smtp_ingest.rewrite import HeaderRules, normalize_line_endings
from mailgate_smtp_ingest.tracking_rewrite import (
    _QP_PLAIN_SPAN,
    MessagePlan,
    TrackingLinks,
    _QpLayout,
    _Recipient,
    _Splicer,
    render_copy,
)

SECRET = "unit-test-secret"
LINKS = TrackingLinks("https://t.mg.example.net", TokenSigner([SECRET]))
QUICK = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _ids(rng: random.Random) -> list[str]:
    """A ULID, another ULID-shaped id, and ids of version-1 tokens (not ULIDs)."""
    return [
        new_ulid(),
        "7" + "".join(rng.choice(_CROCKFORD) for _ in range(25)),  # > 128 bits: version 1
        "01j" + "".join(rng.choice(_CROCKFORD) for _ in range(23)),  # lower case: version 1
        f"legacy-{rng.randrange(10**9)}",
        "é" * rng.randint(1, 20),
    ]


# --- the bare-LF check ------------------------------------------------------------------------


def _normalize_by_counts(raw: bytes) -> bytes:
    """The check it replaces."""
    if raw.count(b"\n") == raw.count(b"\r\n"):
        return raw
    return re.sub(rb"(?<!\r)\n", b"\r\n", raw)


@QUICK
@given(raw=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b".", b"\n\r"])).map(b"".join))
def test_the_bare_lf_check_answers_as_the_counts(raw: bytes) -> None:
    normalized = normalize_line_endings(raw)
    assert normalized == _normalize_by_counts(raw)
    if normalized == raw:
        assert normalized is raw  # (CRLF input is returned as is, not copied)


def test_the_bare_lf_check_is_one_scan_to_the_first_bare_lf(monkeypatch: Any) -> None:
    calls: list[bytes] = []
    pattern = rewrite._FIRST_BARE_LF

    class Spy:
        def search(self, raw: bytes) -> Any:
            calls.append(raw)
            return pattern.search(raw)

    monkeypatch.setattr(rewrite, "_FIRST_BARE_LF", Spy())
    for raw, bare in ((b"a\r\nb\r\n", False), (b"\na", True), (b"a\r\r\nb\n", True)):
        assert (normalize_line_endings(raw) != raw) is bare
    assert len(calls) == 3


# --- tokens -------------------------------------------------------------------------------------


def _reference_token(key: bytes, kind: bytes, mailgate_id: str, url: str = "") -> str:
    """The token as the module docstring defines it, with ``hmac`` and ``base64``."""
    packed = tracking._ulid_bytes(mailgate_id)
    if packed is not None:
        head = bytes([tracking.VERSION]) + kind + packed
    else:
        mid = mailgate_id.encode()
        head = bytes([tracking.VERSION_TEXT_ID]) + kind + bytes([len(mid)]) + mid
    data = head + url.encode()
    mac = hmac.new(key, b"mailgate-track\x00" + data, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(data + mac).rstrip(b"=").decode("ascii")


@pytest.mark.parametrize("key_length", [1, 16, 32, 63, 64, 65, 100, 300])
def test_tokens_are_the_hmac_tokens_for_any_key(key_length: int) -> None:
    rng = random.Random(key_length)
    key = rng.randbytes(key_length)
    signer = TokenSigner([key, b"an-older-secret"])
    for mailgate_id in _ids(rng):
        assert signer.make_open_token(mailgate_id) == _reference_token(key, b"o", mailgate_id)
        assert signer.make_unsub_token(mailgate_id) == _reference_token(key, b"u", mailgate_id)
        for length in range(0, 70, 7):
            url = "https://shop.example.com/" + "".join(
                rng.choice("aZ09/?=&%.-_ёü€") for _ in range(length)
            )
            token = signer.make_click_token(mailgate_id, url)
            assert token == _reference_token(key, b"c", mailgate_id, url)
            assert signer.click_token_bytes(mailgate_id, url) == token.encode()
            found = signer.verify(token)
            assert found is not None and (found.mailgate_id, found.url) == (mailgate_id, url)
            assert TokenSigner([b"an-older-secret", key]).verify(token) == found


def test_signing_does_not_copy_the_openssl_hmac_state() -> None:
    """Signing uses the padded SHA-256 states (a struct copy), not ``_states`` (verify's)."""
    signer = TokenSigner([SECRET])
    expected = signer.make_click_token(new_ulid(), "https://a.example/")

    class NoCopy:
        def copy(self) -> Any:
            raise AssertionError("signing copied the OpenSSL HMAC state")

    states = signer._states
    signer._states = [NoCopy()]  # type: ignore[list-item]
    mailgate_id = new_ulid()
    token = signer.make_click_token(mailgate_id, "https://a.example/")
    assert len(token) == len(expected)
    assert signer.click_token_bytes(mailgate_id, "https://a.example/") == token.encode()
    signer._states = states
    found = signer.verify(token)
    assert found is not None and found.mailgate_id == mailgate_id


def test_a_click_token_needs_a_url() -> None:
    with pytest.raises(tracking.TokenError):
        LINKS.signer.click_token_bytes(new_ulid(), "")
    with pytest.raises(tracking.TokenError):
        LINKS.signer.sign_clicks(new_ulid(), [b"https://a.example/", b""])


def test_signing_a_copys_clicks_at_once_gives_each_clicks_token() -> None:
    rng = random.Random(5)
    signer = TokenSigner([SECRET])
    urls = ["https://a.example/x", "https://b.example/ü?a=1&b=2", "https://a.example/x", "h:/"]
    for mailgate_id in _ids(rng):
        signed = signer.sign_clicks(mailgate_id, [url.encode() for url in urls])
        assert signed == [signer.make_click_token(mailgate_id, url).encode() for url in urls]
        assert signer.sign_clicks(mailgate_id, []) == []


@pytest.mark.parametrize(
    "base_url", ["https://t.mg.example.net", "https://t.example/a&b'c\"<d>/", "http://t/ü"]
)
def test_a_click_fill_is_the_escaped_click_url(base_url: str) -> None:
    links = TrackingLinks(base_url, TokenSigner([SECRET]))
    rng = random.Random(base_url)
    for mailgate_id in _ids(rng):
        r = _Recipient(
            links=links, mailgate_id=mailgate_id, tracking=True, unsubscribe_url="", open_url=""
        )
        for url in ("https://a.example/?a=1&b=2", "https://a.example/'\"<>ü", "http://x/"):
            click = links.click_url(mailgate_id, url)
            assert r.click_fill(url, True) == html.escape(click).encode()
            assert r.click_fill(url, False) == click.encode()
            assert r.click_fill(url, True) == r.click_fill(url, True)  # (memoised)


# --- the layout's splice ---------------------------------------------------------------------


def _campaign(
    html_body: str,
    text: str,
    *,
    cte: str = "quoted-printable",
    charset: str = "utf-8",
    attachment: bytes = b"",
    boundary: str = "b",
) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <news@shop.example.com>"
    msg["To"] = "ivan@example.org"
    msg["Subject"] = "Скидки"
    msg["X-AMS-Campaign-ID"] = "73"
    msg.set_content(text, cte=cte, charset=charset)
    msg.add_alternative(html_body, subtype="html", cte=cte, charset=charset)
    if attachment:
        msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="a.pdf")
    for index, part in enumerate(msg.walk()):
        if part.is_multipart():
            part.set_boundary(f"=_{boundary}{index}_=")
    return normalize_line_endings(msg.as_bytes(policy=SMTP_POLICY))


def _html(rng: random.Random, links: int) -> str:
    words = ["Скидки", "sale", " ", "=", ".", "100%", "%s", "%b", "%%", "&amp;", "a" * 70, "\t"]
    rows = []
    for i in range(links):
        label = "".join(rng.choice(words) for _ in range(rng.randint(0, 6)))
        rows.append(
            f'<tr><td><a href="https://shop.example.com/item/{i}?utm=%{i}&amp;x={"y" * i}">'
            f"{label}</a></td></tr>\n"
        )
    filler = "<p>" + "".join(rng.choice(words) for _ in range(40)) + "</p>\n"
    return (
        "<html><body><table>\n"
        + "".join(rows)
        + '<tr><td><a href="[Unsubscribe]">x</a></td></tr></table>\n'
        + filler * rng.randint(0, 30)
        + "</body></html>\n"
    )


def _reference_fill(layout: _QpLayout, fills: list[Any]) -> bytes | None:
    """``_QpLayout.fill`` as it was: slot by slot, hole by hole."""
    values: list[bytes] = []
    for value, (length, head, tail, start, end) in zip(fills, layout.shapes, strict=True):
        if (
            not isinstance(value, bytes)
            or len(value) != length
            or not value.startswith(head)
            or not value.endswith(tail)
            or _QP_PLAIN_SPAN.fullmatch(value, start, end) is None
        ):
            return None
        values.append(value)
    out = [layout.gaps[0]]
    for (slot, start, end), gap in zip(layout.holes, layout.gaps[1:], strict=True):
        out.append(values[slot][start:end])
        out.append(gap)
    return b"".join(out)


def _layout_parts(raw: bytes) -> list[tracking_rewrite.PartTemplate]:
    inspected = _inspect(raw, HeaderRules(), LINKS)
    assert inspected.plan is not None and inspected.plan.body is not None
    return [p for p in inspected.plan.body.parts if _QpLayout.of(p, LINKS) is not None]


_MUTATIONS = [b"=", b" ", b".", b"\n", b"\r", b"%", b"A", b"\x00", b"\xd0"]


@QUICK
@given(
    seed=st.integers(0, 10**6),
    slot=st.integers(0, 10**6),
    where=st.integers(0, 10**6),
    what=st.sampled_from([*_MUTATIONS, b"", b"AA"]),
)
def test_the_splice_answers_as_the_per_slot_fill(
    seed: int, slot: int, where: int, what: bytes
) -> None:
    tracking_rewrite._shared_part_template.cache_clear()
    rng = random.Random(seed)
    raw = _campaign(_html(rng, rng.randint(1, 12)), "Hi [Unsubscribe]\n")
    for part in _layout_parts(raw):
        layout = _QpLayout.of(part, LINKS)
        assert layout is not None
        mailgate_id = new_ulid()
        r = _Recipient.of(LINKS, mailgate_id)
        fills = [part._fill(s, r) for s in part.slots]
        good = layout.fill(fills)
        assert good is not None and good == _reference_fill(layout, fills)
        index = slot % len(fills)
        value = fills[index]
        at = where % (len(value) + 1)
        for bad in (
            value[:at] + what + value[at + 1 :],  # replaced (or cut, or grown)
            value[:at] + what + value[at:],  # inserted
            memoryview(value),
        ):
            mutated = [*fills[:index], bad, *fills[index + 1 :]]
            assert layout.fill(mutated) == _reference_fill(layout, mutated)


def test_a_layout_splices_with_its_splicer_and_without_the_literals() -> None:
    tracking_rewrite._shared_part_template.cache_clear()
    raw = _campaign(_html(random.Random(3), 20), "Hi [Unsubscribe]\n", boundary="s")
    plan = _inspect(raw, HeaderRules(), LINKS).plan
    assert plan is not None and plan.body is not None
    copies = [render_copy(plan, LINKS, mailgate_id=new_ulid(), domain="d.example", tracking=True)]
    copies.append(  # (the layout is made at the second render)
        render_copy(plan, LINKS, mailgate_id=new_ulid(), domain="d.example", tracking=True)
    )
    html_part = plan.body.parts[-1]
    layout = html_part.__dict__.get("_qp_layout")
    assert isinstance(layout, _QpLayout) and isinstance(layout._splicer, _Splicer)

    class NoLiterals(tuple):  # type: ignore[type-arg]
        def __getitem__(self, index: Any) -> Any:
            raise AssertionError("a part with a layout read its literals")

    expected = _encoder_copy(plan, "01HZZZZZZZZZZZZZZZZZZZZZZ0", tracking=True)
    object.__setattr__(html_part, "literals", NoLiterals(html_part.literals))
    copy, fell_back = render_copy(
        plan, LINKS, mailgate_id="01HZZZZZZZZZZZZZZZZZZZZZZ0", domain="d.example", tracking=True
    )
    assert (copy, fell_back) == (expected, False)


def test_a_parts_fills_are_its_slots_fills_with_one_signing_call(monkeypatch: Any) -> None:
    tracking_rewrite._shared_part_template.cache_clear()
    rng = random.Random(9)
    body = _html(rng, 6).replace("item/3?", "item/1?")  # (two links to one URL)
    body = body.replace(
        "</table>", '<a href="https://shop.example.com/item/1?utm=%1&amp;x=y">again</a></table>'
    )
    raw = _campaign(body, "Hi [Unsubscribe] https://a.example/\n", boundary="f")
    plan = _inspect(raw, HeaderRules(), LINKS).plan
    assert plan is not None and plan.body is not None
    calls: list[int] = []
    sign = TokenSigner.sign_clicks

    def counting(self: TokenSigner, mailgate_id: str, urls: Any) -> list[bytes]:
        calls.append(len(urls))
        return sign(self, mailgate_id, urls)

    monkeypatch.setattr(TokenSigner, "sign_clicks", counting)
    for mailgate_id in _ids(rng):
        for on in (True, False):
            for part in plan.body.parts:
                r = _Recipient.of(LINKS, mailgate_id, tracking=on)
                expected = [part._fill(slot, r) for slot in part.slots]
                calls.clear()
                assert part._fills(r) == expected
                assert calls == ([part.clicks - 1] if on and part.clicks else [])


def test_a_shared_part_is_found_by_its_whole_bytes_without_hashing_them() -> None:
    """Personalised parts of one length and the same first and last bytes share a hash
    (``_Body``: the ends only), yet each gets its own template."""
    tracking_rewrite._shared_part_template.cache_clear()
    head = "<html><body>" + "<p>intro</p>\n" * 40
    tail = "<p>outro</p>\n" * 40 + "</body></html>\n"
    names = ["Ivan", "Olga", "Petr"]
    raws = [
        _campaign(head + f'<a href="https://a.example/{name}">{name}</a>\n' + tail, "t\n")
        for name in names
    ]
    bodies = []
    for name, raw in zip(names, raws, strict=True):
        copy = render_copy(
            _plan(raw), LINKS, mailgate_id=new_ulid(), domain="d.example", tracking=False
        )[0]
        assert f">{name}</a>".encode() in copy and copy.count(b"</a>") == 1
        html_part = _plan(raw).body.parts[-1]  # type: ignore[union-attr]
        bodies.append(bytes(html_part.original))
    keys = [tracking_rewrite._Body(body) for body in bodies]
    assert len({len(body) for body in bodies}) == 1 and len({hash(k) for k in keys}) == 1
    assert keys[0] != keys[1] and keys[0] == tracking_rewrite._Body(bytes(bodies[0]))
    info = tracking_rewrite._shared_part_template.cache_info()
    assert info.currsize == 4  # three HTML parts and the one text part
    for raw in raws:  # each part again: from the memo
        _plan(raw)
    assert tracking_rewrite._shared_part_template.cache_info().misses == info.misses


def _plan(raw: bytes) -> MessagePlan:
    plan = _inspect(raw, HeaderRules(), LINKS).plan
    assert plan is not None and plan.body is not None
    return plan


# --- whole copies -----------------------------------------------------------------------------


def _encoder_copy(plan: MessagePlan, mailgate_id: str, *, tracking: bool) -> bytes:
    """The copy with every part through the encoder (no layout)."""
    assert plan.body is not None
    plain = replace(
        plan,
        body=replace(
            plan.body,
            parts=tuple(
                replace(p, shared=False, literals=tuple(p.literals)) for p in plan.body.parts
            ),
        ),
    )
    copy, fell_back = render_copy(
        plain, LINKS, mailgate_id=mailgate_id, domain="d.example", tracking=tracking
    )
    assert not fell_back
    return copy


@pytest.mark.parametrize("cte", ["quoted-printable", "base64", "8bit"])
@pytest.mark.parametrize("charset", ["utf-8", "windows-1251", "koi8-r"])
def test_copies_of_large_campaigns_equal_the_encoder_path(cte: str, charset: str) -> None:
    tracking_rewrite._shared_part_template.cache_clear()
    rng = random.Random(f"{cte}{charset}")
    html_body = _html(rng, 40)
    text = "Скидки недели!\nЖми: https://shop.example.com/\n[Unsubscribe]\n"
    attachment = os.urandom(20_000)
    for message in range(4):  # each message with its own boundaries, as a campaign's
        raw = _campaign(
            html_body, text, cte=cte, charset=charset, attachment=attachment, boundary=f"m{message}"
        )
        plan = _inspect(raw, HeaderRules(), LINKS).plan
        assert plan is not None and plan.body is not None and len(plan.body.parts) == 2
        for mailgate_id in _ids(rng):
            for on in (True, False):
                copy, fell_back = render_copy(
                    plan, LINKS, mailgate_id=mailgate_id, domain="d.example", tracking=on
                )
                assert not fell_back
                assert copy == _encoder_copy(plan, mailgate_id, tracking=on)
                assert attachment_b64(attachment) in copy.replace(b"\r\n", b"")


def attachment_b64(data: bytes) -> bytes:
    return base64.b64encode(data)
