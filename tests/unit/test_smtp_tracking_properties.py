"""Property tests of the per-recipient body rewrite (hypothesis).

Campaign-like messages are generated with the ``email`` package in every structure the
rewriter must handle (text only, HTML only, alternative, mixed with attachments, related
inside alternative inside mixed), charset (UTF-8, koi8-r, windows-1251) and transfer
encoding (7bit, 8bit, quoted-printable, base64). For each: the copy parses to the same MIME
tree, attachments and non-text parts are unchanged, every http(s) link of the HTML is
rewritten exactly once into a click URL whose token gives back the original URL, everything
else in the text is as it was, and arbitrary or damaged input never raises.
"""

from __future__ import annotations

import email
import email.policy
import html
import re
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.policy import SMTP as SMTP_POLICY
from html.parser import HTMLParser

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mailgate_core.tracking import TokenSigner
from mailgate_smtp_ingest.attachments import (
    FORBIDDEN_EXTENSIONS,
    attachment_extension,
    find_forbidden_attachment,
    part_filenames,
)
from mailgate_smtp_ingest.rewrite import HeaderRules, normalize_line_endings, prepare
from mailgate_smtp_ingest.tracking_rewrite import TrackingLinks, plan_message, render_copy

BASE = "https://t.example.net"
SIGNER = TokenSigner(["property-secret"])
LINKS = TrackingLinks(BASE, SIGNER, unsubscribe_mailto="unsub@mg.example.net")
MID = "01J0000000000000000000PROP"
RULES = HeaderRules()
OURS = re.compile(re.escape(BASE) + r"/(track/c|track/o|u)/([A-Za-z0-9_-]+)")
PIXEL = re.compile(r'<img src="' + re.escape(BASE) + r'/track/o/[A-Za-z0-9_-]+"[^>]*/>')
CYRILLIC = "АБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯабвгдеёжзийклмнопрстуфхцчшщъыьэюя"
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def copy_of(raw: bytes, *, tracking: bool = True) -> tuple[bytes, bool]:
    plan = plan_message(prepare(normalize_line_endings(raw), RULES), LINKS)
    out, fell_back = render_copy(plan, LINKS, mailgate_id=MID, domain="d.net", tracking=tracking)
    return out, fell_back or plan.fell_back


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def nl(text: str) -> str:
    return text.replace("\r\n", "\n")


def stored(text: str) -> str:
    """``text`` as EmailMessage.set_content stores it (always ends with a line break)."""
    return text if text.endswith("\n") else text + "\n"


def decoded_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return nl(payload.decode(part.get_content_charset() or "utf-8", "surrogateescape"))


# --- generated campaign parts -----------------------------------------------------------------

_words = st.text(
    alphabet=st.sampled_from(
        "abcdefgh XYZ 0123456789 .,;:!?-()'\"&<>=/#%+_\t\n" + CYRILLIC[::3] + "€"
    ),
    max_size=120,
)
_url_chars = "abcdefghijklmnopqrstuvwxyz0123456789-._~/?=&%+" + CYRILLIC[::5]


@st.composite
def http_urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https", "HTTPS", "Http"]))
    host = draw(st.from_regex(r"[a-z][a-z0-9-]{0,12}\.(ru|com|example)", fullmatch=True))
    path = draw(st.text(alphabet=_url_chars, max_size=60))
    return f"{scheme}://{host}/{path}"


_other_hrefs = st.sampled_from(
    ["mailto:help@shop.example.com", "#top", "tel:+70001112233", "/relative/path", "ftp://x.ru/f"]
)


@dataclass
class Html:
    source: str
    """The HTML as written."""
    skeleton: str
    """The same with each http(s) href value as ``\\x00LINK\\x00``, each tag as ``\\x00U\\x00``."""
    urls: list[str]


@st.composite
def html_bodies(draw: st.DrawFn) -> Html:
    source, skeleton, urls = [], [], []

    def literal(text: str) -> None:
        source.append(text)
        skeleton.append(text)

    wrapped = draw(st.booleans())
    if wrapped:
        literal("<html><head><title>t</title></head><body>\n")
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["text", "link", "other", "unsub", "unsub-link"]))
        if kind == "text":
            literal(html.escape(draw(_words), quote=False))
        elif kind == "link":
            url = draw(http_urls())
            quote = draw(st.sampled_from(['"', "'", ""]))
            written = html.escape(url, quote=True) if quote else url
            if not quote and any(c in url for c in "&'\"<>=`"):
                quote, written = '"', html.escape(url, quote=True)
            attrs = draw(st.sampled_from(["", ' class="btn"', ' target="_blank"']))
            spaced = draw(st.sampled_from(["", " ", "\n"]))
            literal(f"<a{attrs} href={spaced}{quote}")
            source.append(written)
            skeleton.append("\x00LINK\x00")
            urls.append(url)
            literal(f"{quote}>{html.escape(draw(_words), quote=False)}</a>")
        elif kind == "other":
            literal(f'<a href="{draw(_other_hrefs)}">x</a>')
        elif kind == "unsub":
            source.append("[Unsubscribe]")
            skeleton.append("\x00U\x00")
            literal(" ")  # two URLs back to back could not be told apart by this test
        else:
            literal('<a href="')
            source.append("[Unsubscribe]")
            skeleton.append("\x00U\x00")
            literal('">unsubscribe</a>')
        if draw(st.booleans()):
            literal("\n")
    if wrapped:
        literal("\n</body></html>\n")
    return Html("".join(source), "".join(skeleton), urls)


@dataclass
class Campaign:
    raw: bytes
    html: Html | None
    text: str | None


def _cte(draw: st.DrawFn, content: str) -> str:
    choices = ["8bit", "quoted-printable", "base64"]
    if content.isascii():
        choices.append("7bit")
    return draw(st.sampled_from(choices))


def _attachment(draw: st.DrawFn, message: EmailMessage, index: int) -> None:
    kind = draw(st.sampled_from(["binary", "image", "html-file", "text-file"]))
    if kind == "binary":
        message.add_attachment(
            draw(st.binary(max_size=600)),
            maintype="application",
            subtype="octet-stream",
            filename=f"file{index}.bin",
        )
    elif kind == "image":
        message.add_attachment(
            b"\x89PNG\r\n\x1a\n" + draw(st.binary(max_size=300)),
            maintype="image",
            subtype="png",
            filename=f"pic{index}.png",
        )
    elif kind == "html-file":
        message.add_attachment(
            b'<html><a href="https://attached.example/">x</a>[Unsubscribe]</html>',
            maintype="text",
            subtype="html",
            filename=f"page{index}.html",
        )
    else:
        message.add_attachment(
            "Отписка [Unsubscribe] https://x.example/", filename=f"notes{index}.txt"
        )


@st.composite
def campaigns(draw: st.DrawFn) -> Campaign:
    structure = draw(st.sampled_from(["text", "html", "alternative", "mixed", "related"]))
    charset = draw(st.sampled_from(["utf-8", "koi8-r", "windows-1251"]))
    body_html = draw(html_bodies()) if structure != "text" else None
    text = None
    if structure in ("text", "alternative", "mixed", "related"):
        text = draw(_words)
        if draw(st.booleans()):
            text += "\n" + "Отписаться: " + "[Unsubscribe]\n"
    if charset != "utf-8":
        for content in (text, body_html.source if body_html else None):
            try:
                (content or "").encode(charset)
            except UnicodeEncodeError:
                charset = "utf-8"
    message = EmailMessage()
    message["From"] = "Shop <news@shop.example.com>"
    message["To"] = "ivan@example.org"
    message["Subject"] = "Скидки"
    message["X-AMS-Campaign-ID"] = "73"
    if text is not None:
        message.set_content(text, charset=charset, cte=_cte(draw, text))
    if body_html is not None:
        source = body_html.source
        if text is None:
            message.set_content(source, subtype="html", charset=charset, cte=_cte(draw, source))
        else:
            message.add_alternative(source, subtype="html", charset=charset, cte=_cte(draw, source))
    if structure == "related":
        html_part = message.get_payload()[1]
        html_part.add_related(
            b"\x89PNG\r\n\x1a\n" + draw(st.binary(max_size=200)), "image", "png", cid="<logo>"
        )
    if structure in ("mixed", "related"):
        for index in range(draw(st.integers(1, 3))):
            _attachment(draw, message, index)
    for index, part in enumerate(p for p in message.walk() if p.is_multipart()):
        part.set_boundary(f"==mg-{index}-boundary==")  # not email's random ones
    raw = normalize_line_endings(message.as_bytes(policy=SMTP_POLICY))
    return Campaign(raw, body_html, text)


# --- helpers over the output ------------------------------------------------------------------


class _Hrefs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            for name, value in attrs:
                if name == "href" and value is not None:
                    self.hrefs.append(value)


def hrefs_of(text: str) -> list[str]:
    parser = _Hrefs()
    parser.feed(text)
    parser.close()
    return parser.hrefs


def is_rewritable(part: Message) -> bool:
    disposition = part.get_content_disposition()
    return part.get_content_type() in ("text/html", "text/plain") and disposition is None


def skeleton_of(text: str) -> tuple[str, list[str]]:
    """The copy's HTML with our click URLs as ``\\x00LINK\\x00``, unsubscribe URLs as
    ``\\x00U\\x00`` and the pixel removed; plus the URLs behind the clicks."""
    urls: list[str] = []
    text = PIXEL.sub("", text, count=1)

    def replace(match: re.Match[str]) -> str:
        payload = SIGNER.verify(match.group(2))
        assert payload is not None and payload.mailgate_id == MID, match.group(0)
        if payload.kind == "click":
            assert payload.url is not None
            urls.append(payload.url)
            return "\x00LINK\x00"
        assert payload.kind == "unsubscribe"
        return "\x00U\x00"

    return OURS.sub(replace, text), urls


# --- properties -------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(campaign=campaigns(), tracking=st.booleans())
def test_a_copy_keeps_the_mime_tree_and_every_part_outside_the_text(
    campaign: Campaign, tracking: bool
) -> None:
    out, fell_back = copy_of(campaign.raw, tracking=tracking)
    assert not fell_back
    before, after = parse(campaign.raw), parse(out)
    assert [p.get_content_type() for p in after.walk()] == [
        p.get_content_type() for p in before.walk()
    ]
    assert sum(len(p.defects) for p in after.walk()) == 0
    for old, new in zip(before.walk(), after.walk(), strict=True):
        if old.is_multipart():
            continue
        unchanged = not is_rewritable(old) or (
            old.get_content_type() == "text/plain" and "[Unsubscribe]" not in decoded_text(old)
        )
        if unchanged:
            if old is not before:  # the top-level headers are rewritten (see test_rewrite)
                assert new.items() == old.items()
            assert new.get_payload(decode=True) == old.get_payload(decode=True)
            payload = old._payload  # the body as received (str, surrogate-escaped bytes)
            assert isinstance(payload, str)
            assert payload.encode("ascii", "surrogateescape") in out
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    head = out.partition(b"\r\n\r\n")[0] + b"\r\n"
    assert head.count(b"\r\nList-Unsubscribe: <" + BASE.encode() + b"/u/") == 1
    assert head.count(b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n") == 1


@PROPERTY_SETTINGS
@given(campaign=campaigns())
def test_every_http_link_is_rewritten_exactly_once_and_decodes_back(campaign: Campaign) -> None:
    out, _ = copy_of(campaign.raw, tracking=True)
    message = parse(out)
    parts = [p for p in message.walk() if not p.is_multipart() and is_rewritable(p)]
    html_parts = [p for p in parts if p.get_content_type() == "text/html"]
    text_parts = [p for p in parts if p.get_content_type() == "text/plain"]
    if campaign.html is not None:
        (part,) = html_parts
        text = decoded_text(part)
        assert len(PIXEL.findall(text)) == 1
        skeleton, urls = skeleton_of(text)
        assert urls == campaign.html.urls  # each once, in order, back to the original
        assert skeleton == stored(campaign.html.skeleton)
        hrefs = hrefs_of(text)
        assert not set(hrefs) & set(campaign.html.urls)
        assert sum(h.startswith(f"{BASE}/track/c/") for h in hrefs) == len(campaign.html.urls)
    if campaign.text is not None:
        (part,) = text_parts
        unsubscribe = LINKS.unsubscribe_url(MID)
        assert decoded_text(part).replace(unsubscribe, "[Unsubscribe]") == stored(campaign.text)


@PROPERTY_SETTINGS
@given(campaign=campaigns())
def test_without_tracking_the_html_only_loses_its_unsubscribe_tags(campaign: Campaign) -> None:
    assume(campaign.html is not None)
    assert campaign.html is not None
    out, _ = copy_of(campaign.raw, tracking=False)
    (part,) = [
        p for p in parse(out).walk() if p.get_content_type() == "text/html" and is_rewritable(p)
    ]
    text = decoded_text(part)
    assert "/track/" not in text
    expected = campaign.html.source.replace("[Unsubscribe]", LINKS.unsubscribe_url(MID))
    assert text == stored(expected)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=4000))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    out, _ = copy_of(raw)
    assert b"List-Unsubscribe: <" in out
    parse(out)


_mutations = st.lists(
    st.tuples(
        st.sampled_from(["delete", "insert", "duplicate"]),
        st.floats(0, 1),
        st.floats(0, 1),
        st.binary(max_size=40)
        | st.sampled_from([b"--", b"\r\n--", b"\r\n\r\n", b"=\r\n", b"=X", b"<a href=", b"\xff"]),
    ),
    min_size=1,
    max_size=4,
)


@PROPERTY_SETTINGS
@given(campaign=campaigns(), mutations=_mutations)
def test_damaged_messages_never_raise_and_stay_parseable(
    campaign: Campaign, mutations: list[tuple[str, float, float, bytes]]
) -> None:
    raw = bytearray(campaign.raw)
    for kind, at, length, data in mutations:
        start = int(at * len(raw))
        stop = min(len(raw), start + int(length * 200))
        if kind == "delete":
            del raw[start:stop]
        elif kind == "insert":
            raw[start:start] = data
        else:
            raw[start:start] = raw[start:stop]
    damaged = bytes(raw)
    out, _ = copy_of(damaged)
    before = parse(normalize_line_endings(damaged))
    if all(not p.defects for p in before.walk()):
        after = parse(out)
        assert [p.get_content_type() for p in after.walk()] == [
            p.get_content_type() for p in before.walk()
        ]
        assert all(not p.defects for p in after.walk())


# --- the attachment check reads the same tree as the email package -----------------------------

_names = st.sampled_from(
    ["price.pdf", "setup.EXE", "script.js", "счёт.exe", "archive.zip", "run.bat.", "a.scr"]
)


def forbidden_by_email_package(raw: bytes) -> str | None:
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    for part in message.walk():
        for filename in part_filenames(part):
            if attachment_extension(filename) in FORBIDDEN_EXTENSIONS:
                return attachment_extension(filename)
    return None


@PROPERTY_SETTINGS
@given(
    campaign=campaigns(),
    name=_names,
    nested=st.booleans(),
    mutations=st.none() | _mutations,
)
def test_the_attachment_check_agrees_with_the_email_package(
    campaign: Campaign,
    name: str,
    nested: bool,
    mutations: list[tuple[str, float, float, bytes]] | None,
) -> None:
    message = email.message_from_bytes(campaign.raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    attachment = EmailMessage()
    if nested:
        attachment["Subject"] = "forwarded"
        attachment.set_content("see attached")
        attachment.add_attachment(b"MZ", maintype="application", subtype="x", filename=name)
        message.add_attachment(attachment)
    else:
        message.add_attachment(b"MZ", maintype="application", subtype="x", filename=name)
    for index, part in enumerate(p for p in message.walk() if p.is_multipart()):
        part.set_boundary(f"==mg-{index}-outer==")
    raw = bytearray(normalize_line_endings(message.as_bytes(policy=SMTP_POLICY)))
    for kind, at, length, data in mutations or []:
        start = int(at * len(raw))
        if kind == "insert":
            raw[start:start] = data
        else:
            del raw[start : min(len(raw), start + int(length * 200))]
    assert find_forbidden_attachment(bytes(raw)) == forbidden_by_email_package(bytes(raw))
