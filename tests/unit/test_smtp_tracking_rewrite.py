"""smtp-ingest body rewrite: unsubscribe tags and headers, click links, open pixel, per
transfer encoding and charset, with every other part passed through byte for byte."""

from __future__ import annotations

import base64
import email
import email.policy
import re
from email.message import EmailMessage, Message
from email.policy import SMTP as SMTP_POLICY

import pytest
from mailgate_core.config import ConfigError, Secret
from mailgate_core.tracking import TokenSigner
from mailgate_smtp_ingest.app import Settings
from mailgate_smtp_ingest.rewrite import HeaderRules, normalize_line_endings, prepare
from mailgate_smtp_ingest.tracking_rewrite import (
    MessagePlan,
    PartTemplate,
    Slot,
    TrackingLinks,
    plan_message,
    render_copy,
)

SECRET = "unit-test-secret"
BASE = "https://t.mg.example.net"
SIGNER = TokenSigner([SECRET])
LINKS = TrackingLinks(BASE + "/", SIGNER)
MID = "01HZZZZZZZZZZZZZZZZZZZZZZZ"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"

CLICK = re.compile(re.escape(BASE) + r"/track/c/([A-Za-z0-9_-]+)")
OPEN = re.compile(re.escape(BASE) + r"/track/o/([A-Za-z0-9_-]+)")
UNSUB = re.compile(re.escape(BASE) + r"/u/([A-Za-z0-9_-]+)")


def copy_of(raw: bytes, *, tracking: bool = True, links: TrackingLinks = LINKS) -> bytes:
    raw = normalize_line_endings(raw)
    plan = plan_message(prepare(raw, HeaderRules()), links)
    assert not plan.fell_back
    out, fell_back = render_copy(plan, links, mailgate_id=MID, domain="d.net", tracking=tracking)
    assert not fell_back
    return out


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def text_of(message: Message, subtype: str) -> str:
    for part in message.walk():
        if part.get_content_type() == f"text/{subtype}" and not part.is_attachment():
            assert isinstance(part, EmailMessage)
            return str(part.get_content()).replace("\r\n", "\n")
    raise AssertionError(f"no text/{subtype} part")


def clicked(html: str) -> list[str]:
    """The original URLs behind every click link, in order (verified tokens)."""
    urls = []
    for token in CLICK.findall(html):
        payload = SIGNER.verify(token)
        assert payload is not None and payload.kind == "click" and payload.mailgate_id == MID
        assert payload.url is not None
        urls.append(payload.url)
    return urls


def verified(pattern: re.Pattern[str], text: str, kind: str) -> int:
    tokens = [t for t in pattern.findall(text) if t != "already-ours"]
    for token in tokens:
        payload = SIGNER.verify(token)
        assert payload is not None and (payload.kind, payload.mailgate_id) == (kind, MID)
    return len(tokens)


HTML = (
    "<html><head><title>Скидки</title></head><body>\n"
    "<p>Привет! Новые скидки недели.</p>\n"
    '<a href="https://shop.example.com/sale?utm=1&amp;x=2">Sale</a>\n'
    "<A HREF='http://shop.example.com/Каталог'>Каталог</A>\n"
    "<a class=btn href=https://shop.example.com/bare>Bare</a>\n"
    '<a href="mailto:help@shop.example.com">Mail</a> <a href="#top">Top</a>\n'
    '<a href="tel:+7000">Call</a> <a name="x">anchor</a>\n'
    '<a href="[Unsubscribe]">Отписаться</a>\n'
    f'<a href="{BASE}/u/already-ours">ours</a>\n'
    "</body></html>\n"
)
EXPECTED_CLICKS = [
    "https://shop.example.com/sale?utm=1&x=2",
    "http://shop.example.com/Каталог",
    "https://shop.example.com/bare",
]


def campaign(*, charset: str = "utf-8", cte: str | None = None, attach: bool = True) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Shop <news@shop.example.com>"
    msg["To"] = "ivan@example.org"
    msg["Subject"] = "Скидки недели"
    msg.set_content("Привет!\n" + "Отписаться: " + "[Unsubscribe]\n", charset=charset, cte=cte)
    msg.add_alternative(HTML, subtype="html", charset=charset, cte=cte)
    if attach:
        msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="price.pdf")
    return msg.as_bytes(policy=SMTP_POLICY)


@pytest.mark.parametrize(
    ("charset", "cte"),
    [
        ("utf-8", "quoted-printable"),
        ("utf-8", "base64"),
        ("utf-8", "8bit"),
        ("koi8-r", "quoted-printable"),
        ("koi8-r", "8bit"),
        ("windows-1251", "base64"),
        ("windows-1251", "8bit"),
    ],
)
def test_links_pixel_and_unsubscribe_are_rewritten_in_every_encoding_and_charset(
    charset: str, cte: str
) -> None:
    raw = campaign(charset=charset, cte=cte)
    out = copy_of(raw)
    message = parse(out)
    html, text = text_of(message, "html"), text_of(message, "plain")

    assert clicked(html) == EXPECTED_CLICKS
    assert verified(OPEN, html, "open") == 1
    assert html.index("/track/o/") < html.index("</body>")
    assert verified(UNSUB, html, "unsubscribe") == 1 and "[Unsubscribe]" not in html
    assert 'href="mailto:help@shop.example.com"' in html and 'href="#top"' in html
    assert 'href="tel:+7000"' in html and f'href="{BASE}/u/already-ours"' in html
    assert "Привет! Новые скидки недели." in html and "<title>Скидки</title>" in html
    assert verified(UNSUB, text, "unsubscribe") == 1 and text.startswith("Привет!\n")

    for part in message.walk():
        if part.get_content_maintype() == "text":
            assert part.get_content_charset() == charset
            assert part["Content-Transfer-Encoding"] == cte
    assert message["List-Unsubscribe"] == f"<{UNSUB.search(text).group(0)}>"  # type: ignore[union-attr]
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert not message.defects and all(not p.defects for p in message.walk())


def test_the_attachment_and_everything_outside_the_text_parts_stay_byte_identical() -> None:
    raw = normalize_line_endings(campaign(cte="quoted-printable"))
    out = copy_of(raw)
    attachment_start = raw.index(b"Content-Type: application/pdf")
    boundary_line = raw.rindex(b"\r\n--", 0, attachment_start)
    assert out.endswith(raw[boundary_line:])  # the attachment with its headers, the epilogue
    (pdf,) = [p for p in parse(out).walk() if p.get_content_type() == "application/pdf"]
    assert pdf.get_payload(decode=True) == PDF


def test_tracking_off_keeps_links_and_adds_no_pixel_but_still_unsubscribes() -> None:
    raw = normalize_line_endings(campaign(cte="quoted-printable"))
    out = copy_of(raw, tracking=False)
    message = parse(out)
    html = text_of(message, "html")
    assert "/track/c/" not in html and "/track/o/" not in html
    assert 'href="https://shop.example.com/sale?utm=1&amp;x=2"' in html
    assert verified(UNSUB, html, "unsubscribe") == 1
    assert message["List-Unsubscribe"].startswith(f"<{BASE}/u/")


def test_with_tracking_off_a_part_without_the_tag_is_not_even_re_encoded() -> None:
    msg = EmailMessage()
    msg["From"] = "news@shop.example.com"
    msg.set_content('<p><a href="https://x.example/">x</a></p>', subtype="html", cte="base64")
    raw = normalize_line_endings(msg.as_bytes(policy=SMTP_POLICY))
    out = copy_of(raw, tracking=False)
    assert out.endswith(raw.partition(b"\r\n\r\n")[2])
    assert b"List-Unsubscribe: <" in out


def test_text_only_mail_gets_the_unsubscribe_url_in_place_of_every_tag() -> None:
    raw = (
        b"From: news@shop.example.com\r\nSubject: plain\r\n\r\n"
        b"Hello!\r\nUnsubscribe: [Unsubscribe]\r\nor here: [unsubscribe].\r\n"
    )
    out = copy_of(raw)
    head, _, body = out.partition(b"\r\n\r\n")
    url = LINKS.unsubscribe_url(MID).encode()
    assert body == b"Hello!\r\nUnsubscribe: " + url + b"\r\nor here: " + url + b".\r\n"
    assert b"List-Unsubscribe: <" + url + b">\r\n" in head + b"\r\n"
    assert b"Content-Transfer-Encoding" not in head  # 7bit stays 7bit


def test_a_text_part_without_the_tag_is_untouched() -> None:
    raw = b"From: a@shop.example.com\r\nContent-Type: text/plain\r\n\r\nsee https://x.example/\r\n"
    out = copy_of(raw)
    assert out.endswith(b"\r\n\r\nsee https://x.example/\r\n")


def test_quoted_printable_text_with_a_tag_split_by_a_soft_line_break() -> None:
    body = b"Hello =D0=98=D0=B2=D0=B0=D0=BD, to stop: [Unsub=\r\nscribe] bye\r\n"
    raw = (
        b"From: a@shop.example.com\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + body
    )
    text = text_of(parse(copy_of(raw)), "plain")
    assert text == f"Hello Иван, to stop: {LINKS.unsubscribe_url(MID)} bye\n"


def test_base64_text_part_in_koi8_r() -> None:
    content = ("Здравствуйте!\r\n" + "Отписка: " + "[Unsubscribe]\r\n").encode("koi8-r")
    encoded = base64.encodebytes(content).replace(b"\n", b"\r\n")
    raw = (
        b"From: a@shop.example.com\r\nContent-Type: text/plain; charset=koi8-r\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded
    )
    out = copy_of(raw)
    unsubscribe = LINKS.unsubscribe_url(MID)
    assert text_of(parse(out), "plain") == "Здравствуйте!\n" + "Отписка: " + unsubscribe + "\n"
    body = out.partition(b"\r\n\r\n")[2]
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))


def test_nested_related_inside_alternative_inside_mixed() -> None:
    msg = EmailMessage()
    msg["From"] = "news@shop.example.com"
    msg["Subject"] = "nested"
    msg.set_content("text [Unsubscribe]")
    msg.add_alternative(
        '<html><body><img src="cid:logo"><a href="https://shop.example.com/">go</a></body></html>',
        subtype="html",
    )
    html_part = msg.get_payload()[1]
    html_part.add_related(b"\x89PNG\r\n\x1a\n" + bytes(300), "image", "png", cid="<logo>")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="a.pdf")
    raw = normalize_line_endings(msg.as_bytes(policy=SMTP_POLICY))
    original = parse(raw)
    out = parse(copy_of(raw))
    assert [p.get_content_type() for p in out.walk()] == [
        p.get_content_type() for p in original.walk()
    ]
    assert [p.get_content_type() for p in out.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "multipart/related",
        "text/html",
        "image/png",
        "application/pdf",
    ]
    html = text_of(out, "html")
    assert clicked(html) == ["https://shop.example.com/"] and '<img src="cid:logo">' in html
    assert verified(OPEN, html, "open") == 1
    for before, after in zip(original.walk(), out.walk(), strict=True):
        if before.get_content_maintype() in ("image", "application"):
            assert after.get_payload() == before.get_payload()
            assert after.items() == before.items()


def test_attached_html_files_and_forwarded_messages_are_not_rewritten() -> None:
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content('<a href="https://inner.example/">x</a> [Unsubscribe]', subtype="html")
    msg = EmailMessage()
    msg["From"] = "news@shop.example.com"
    msg.set_content("see attachments")
    msg.add_attachment(
        b'<html><a href="https://file.example/">f</a></html>',
        maintype="text",
        subtype="html",
        filename="page.html",
    )
    msg.add_attachment(inner)
    raw = normalize_line_endings(msg.as_bytes(policy=SMTP_POLICY))
    out = copy_of(raw)
    assert out.partition(b"\r\n\r\n")[2] == raw.partition(b"\r\n\r\n")[2]


def test_windows_1251_link_with_cyrillic_path_decodes_to_the_unicode_url() -> None:
    html = '<body><a href="https://магазин.example/каталог?q=платье">x</a></body>'
    raw = (
        b"From: a@shop.example.com\r\nContent-Type: text/html; charset=windows-1251\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + html.encode("cp1251")
    )
    out = parse(copy_of(raw))
    assert clicked(out.get_content()) == ["https://магазин.example/каталог?q=платье"]


@pytest.mark.parametrize("charset", ["shift_jis", "iso-2022-jp", "utf-16"])
def test_charsets_that_are_not_ascii_compatible_are_decoded_and_encoded_back(
    charset: str,
) -> None:
    html = (
        '<html><body>お知らせ <a href="https://shop.example.jp/">店</a> [Unsubscribe]</body></html>'
    )
    encoded = base64.encodebytes(html.encode(charset)).replace(b"\n", b"\r\n")
    raw = (
        b"From: a@shop.example.com\r\n"
        b"Content-Type: text/html; charset=" + charset.encode() + b"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded
    )
    out = parse(copy_of(raw)).get_content()
    assert clicked(out) == ["https://shop.example.jp/"]
    assert "お知らせ" in out and verified(UNSUB, out, "unsubscribe") == 1
    assert verified(OPEN, out, "open") == 1


def test_a_7bit_line_that_would_grow_past_998_bytes_is_re_encoded_quoted_printable() -> None:
    links = "".join(f'<a href="https://shop.example.com/item/{i}">{i}</a>' for i in range(12))
    html = f"<html><body>{links}</body></html>"
    raw = (
        b"From: a@shop.example.com\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=us-ascii\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\n" + html.encode() + b"\r\n"
    )
    out = copy_of(raw)
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    message = parse(out)
    assert message.get_all("Content-Transfer-Encoding") == ["quoted-printable"]
    assert len(clicked(message.get_content())) == 12

    nested = EmailMessage()
    nested["From"] = "a@shop.example.com"
    nested.set_content("text")
    nested.add_alternative(html, subtype="html", cte="7bit")
    out = copy_of(nested.as_bytes(policy=SMTP_POLICY))
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    (part,) = [p for p in parse(out).walk() if p.get_content_type() == "text/html"]
    assert part.get_all("Content-Transfer-Encoding") == ["quoted-printable"]
    assert len(clicked(part.get_content())) == 12


def test_list_unsubscribe_replaces_the_clients_and_carries_a_mailto_when_configured() -> None:
    links = TrackingLinks(BASE, SIGNER, unsubscribe_mailto="u@mg.example.net")
    raw = (
        b"From: a@shop.example.com\r\nList-Unsubscribe: <https://ams.example/unsub>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nhi\r\n"
    )
    message = parse(copy_of(raw, links=links))
    (value,) = message.get_all("List-Unsubscribe")
    url = links.unsubscribe_url(MID)
    token = url.rsplit("/", 1)[1]
    mailto = f"mailto:u+{token}@mg.example.net?subject=unsubscribe%20{token}"
    assert value == f"<{url}>, <{mailto}>"  # the form webhook-ingest's inbound route reads
    long_local = TrackingLinks(BASE, SIGNER, unsubscribe_mailto="x" * 40 + "@mg.example.net")
    value = long_local.list_unsubscribe(MID, url)
    assert value.endswith(f"<mailto:{'x' * 40}@mg.example.net?subject=unsubscribe%20{token}>")
    assert message.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]


def test_every_recipient_gets_its_own_tokens() -> None:
    raw = normalize_line_endings(campaign(cte="quoted-printable"))
    plan = plan_message(prepare(raw, HeaderRules()), LINKS)
    first, _ = render_copy(
        plan, LINKS, mailgate_id="01AAAAAAAAAAAAAAAAAAAAAAAA", domain="d", tracking=True
    )
    second, _ = render_copy(
        plan, LINKS, mailgate_id="01BBBBBBBBBBBBBBBBBBBBBBBB", domain="d", tracking=True
    )
    tokens = [set(CLICK.findall(text_of(parse(c), "html"))) for c in (first, second)]
    assert tokens[0] and tokens[1] and not tokens[0] & tokens[1]


def test_a_body_it_cannot_read_falls_back_to_the_headers_only_rewrite() -> None:
    raw = b"From: a@shop.example.com\r\nnot a header line\r\nX: y\r\n\r\n[Unsubscribe]\r\n"
    plan = plan_message(prepare(raw, HeaderRules()), LINKS)
    assert plan.fell_back
    out, fell_back = render_copy(plan, LINKS, mailgate_id=MID, domain="d.net", tracking=True)
    assert not fell_back  # counted once per message (plan.fell_back), not per copy
    assert out.endswith(b"\r\n\r\n[Unsubscribe]\r\n")
    assert b"List-Unsubscribe: <" + LINKS.unsubscribe_url(MID).encode() in out


def test_a_copy_that_fails_to_render_is_passed_through_and_reported() -> None:
    raw = b"From: a@shop.example.com\r\n\r\nbody [Unsubscribe]\r\n"
    plan = plan_message(prepare(raw, HeaderRules()), LINKS)
    assert plan.body is not None
    broken = PartTemplate(
        html=False,
        literals=(b"only one literal",),
        slots=(Slot("unsubscribe"), Slot("unsubscribe")),  # does not fit the literals
        encoding="identity",
        charset=None,
        newline=b"\r\n",
        original=b"",
    )
    bad_body = type(plan.body)(gaps=(b"\r\n", b""), parts=(broken,))
    out, fell_back = render_copy(
        MessagePlan(plan.prepared, bad_body), LINKS, mailgate_id=MID, domain="d", tracking=True
    )
    assert fell_back
    assert out.endswith(b"\r\n\r\nbody [Unsubscribe]\r\n") and b"List-Unsubscribe:" in out


def test_undecodable_base64_and_unknown_encodings_leave_the_part_alone() -> None:
    msg = (
        b"From: a@shop.example.com\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"PGEg\r\nP\r\n"
        b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
        b"[Unsubscribe]\r\n"
        b"--b--\r\n"
    )
    out = copy_of(msg)
    assert out.partition(b"\r\n\r\n")[2] == msg.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"tracking_base_url": "https://t.example.net"},
            "config error: TRACKING_BASE_URL and TRACKING_SECRET must be set together",
        ),
        (
            {"tracking_secret": "s"},
            "config error: TRACKING_BASE_URL and TRACKING_SECRET must be set together",
        ),
        (
            {"tracking_base_url": "t.example.net", "tracking_secret": "s"},
            "config error: TRACKING_BASE_URL='t.example.net' is not an http(s) URL",
        ),
        (
            {
                "tracking_base_url": "https://t.example.net",
                "tracking_secret": "s",
                "list_unsubscribe_mailto": "nobody",
            },
            "config error: LIST_UNSUBSCRIBE_MAILTO='nobody' is not an address",
        ),
    ],
)
def test_tracking_settings_are_validated_at_start_up(
    overrides: dict[str, str], message: str
) -> None:
    settings = Settings(domain="mg.example.net", **overrides)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as raised:
        settings.validate()
    assert str(raised.value) == message


def test_the_first_of_several_tracking_secrets_signs() -> None:
    settings = Settings(
        domain="mg.example.net",
        tracking_base_url="https://t.example.net/",
        tracking_secret=Secret("new, old"),
        list_unsubscribe_mailto="unsubscribe@mg.example.net",
    )
    settings.validate()
    links = settings.tracking_links()
    assert links is not None
    token = links.unsubscribe_url(MID).removeprefix("https://t.example.net/u/")
    assert TokenSigner(["new"]).verify(token) is not None
    assert TokenSigner(["old"]).verify(token) is None
    assert links.unsubscribe_mailto == "unsubscribe@mg.example.net"
    assert Settings(domain="mg.example.net").tracking_links() is None
