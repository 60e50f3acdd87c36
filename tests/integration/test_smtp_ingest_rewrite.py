"""smtp-ingest's per-recipient body rewrite, seen from the outside: a campaign sent over SMTP
comes out in ``mail.accepted`` with signed click links, open pixel and unsubscribe URLs and
headers, its attachment byte for byte as sent (also through the object store)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
from email.message import EmailMessage, Message
from email.policy import SMTP as SMTP_POLICY

import pytest
from mailgate_core.nats import KV_ACCOUNTS, OBJECT_STORE_MAIL
from mailgate_core.records import AccountRecord
from mailgate_core.schemas import MailAccepted
from mailgate_core.tracking import TokenSigner
from test_smtp_ingest_service import (
    ACCOUNT,
    PASSWORD,
    SENDER,
    TRACKING_BASE_URL,
    TRACKING_SECRET,
    USER,
    Factory,
    _put,
    connect,
    creds,
    reply,
    start_service,
    stream_events,
)

__all__ = ["creds", "start_service"]

SIGNER = TokenSigner([TRACKING_SECRET])
TOKEN = r"/([A-Za-z0-9_-]+)"
CLICK = re.compile(re.escape(TRACKING_BASE_URL) + "/track/c" + TOKEN)
OPEN = re.compile(re.escape(TRACKING_BASE_URL) + "/track/o" + TOKEN)
UNSUB = re.compile(re.escape(TRACKING_BASE_URL) + "/u" + TOKEN)
LINKS = [
    "https://shop.example.com/sale?utm_source=ams&utm_campaign=73",
    "https://shop.example.com/каталог/платья",
    "http://shop.example.com/contacts",
]
PDF = b"%PDF-1.4\n" + os.urandom(20_000) + b"\n%%EOF\n"


def campaign(*, attachment: bytes = PDF, **headers: str) -> bytes:
    """What AMS sends: text + HTML alternative (quoted-printable) and a PDF attachment."""
    msg = EmailMessage()
    msg["From"] = f"Shop <{SENDER}>"
    msg["To"] = "ivan@example.org"
    msg["Subject"] = "Скидки недели"
    msg["X-AMS-Message-ID"] = "ams-42"
    msg["X-AMS-Campaign-ID"] = "73"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Скидки недели!\n" + "Отписаться: [Unsubscribe]\n", cte="quoted-printable")
    anchors = "".join(
        f'<p><a href="{url.replace("&", "&amp;")}">ссылка {i}</a></p>\n'
        for i, url in enumerate(LINKS)
    )
    msg.add_alternative(
        "<html><body>\n<h1>Скидки недели</h1>\n"
        + anchors
        + '<p><a href="mailto:help@shop.example.com">Вопросы</a></p>\n'
        + '<p><a href="[Unsubscribe]">Отписаться</a></p>\n</body></html>\n',
        subtype="html",
        cte="quoted-printable",
    )
    msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="price.pdf")
    return msg.as_bytes(policy=SMTP_POLICY)


def send(service, raw: bytes, recipients: list[str]) -> str:
    with connect(service) as smtp:
        smtp.login(USER, PASSWORD)
        smtp.mail(SENDER)
        for rcpt in recipients:
            assert smtp.rcpt(rcpt)[0] == 250
        return reply(smtp.data(raw))


def attachment_block(raw: bytes) -> bytes:
    """The attachment's headers and encoded body exactly as they appear in ``raw``."""
    start = raw.index(b"Content-Type: application/pdf")
    end = raw.index(b"\r\n--", start)
    return raw[start:end]


def html_and_text(raw: bytes) -> tuple[str, str]:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    parts: dict[str, str] = {}
    for part in message.walk():
        if part.get_content_maintype() == "text" and not part.is_attachment():
            assert isinstance(part, EmailMessage)
            parts[part.get_content_subtype()] = part.get_content().replace("\r\n", "\n")
    return parts["html"], parts["plain"]


def tokens(pattern: re.Pattern[str], text: str, kind: str, mailgate_id: str) -> list[str | None]:
    """The verified payload URL (None for open/unsubscribe) of every token of ``kind``."""
    found = []
    for token in pattern.findall(text):
        payload = SIGNER.verify(token)
        assert payload is not None, token
        assert (payload.kind, payload.mailgate_id) == (kind, mailgate_id)
        found.append(payload.url)
    return found


def headers_of(raw: bytes) -> Message:
    return email.message_from_bytes(raw.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")


async def test_a_campaign_with_an_attachment_is_rewritten_per_recipient(
    start_service: Factory, js
) -> None:
    service = await start_service()
    raw = campaign()
    recipients = ["ivan@example.org", "maria@example.org"]

    answer = await asyncio.to_thread(send, service, raw, recipients)
    assert answer.startswith("250 2.0.0 Ok: queued as ")
    events = await stream_events(js)
    assert sorted(e.message.recipient for e in events) == recipients
    clicks_seen: set[str] = set()
    for event in events:
        assert isinstance(event, MailAccepted) and event.raw is not None and event.tracking
        mid = event.message.mailgate_id
        headers = headers_of(event.raw)
        (unsubscribe_url,) = [m.group(0) for m in UNSUB.finditer(headers["List-Unsubscribe"])]
        assert headers["List-Unsubscribe"] == f"<{unsubscribe_url}>"
        assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert tokens(UNSUB, headers["List-Unsubscribe"], "unsubscribe", mid) == [None]

        html, text = html_and_text(event.raw)
        assert tokens(CLICK, html, "click", mid) == LINKS
        assert tokens(OPEN, html, "open", mid) == [None]
        assert html.index("/track/o/") < html.index("</body>")
        assert f'<a href="{unsubscribe_url}">' in html and "[Unsubscribe]" not in html
        assert 'href="mailto:help@shop.example.com"' in html and "Скидки недели" in html
        assert text == "Скидки недели!\n" + f"Отписаться: {unsubscribe_url}\n"
        clicks_seen |= set(CLICK.findall(html))

        assert attachment_block(event.raw) == attachment_block(raw)
        message = email.message_from_bytes(event.raw, policy=email.policy.default)
        (pdf,) = [p for p in message.walk() if p.get_content_type() == "application/pdf"]
        assert pdf.get_payload(decode=True) == PDF
    assert len(clicks_seen) == 2 * len(LINKS)  # every recipient has tokens of its own
    assert service.registry.get_sample_value("mailgate_smtp_rewrite_fallbacks_total") == 0


@pytest.mark.parametrize("switch", ["account", "message"])
async def test_tracking_off_keeps_links_and_pixel_out_but_unsubscribe_in(
    start_service: Factory, js, switch: str
) -> None:
    if switch == "account":
        account = AccountRecord(id=ACCOUNT, name="Shop", tracking=False)
        await _put(js, KV_ACCOUNTS, ACCOUNT, account)
        raw = campaign()
    else:
        raw = campaign(X_Mailgate_Tracking="off")
    service = await start_service()

    answer = await asyncio.to_thread(send, service, raw, ["ivan@example.org"])
    assert answer.startswith("250 ")
    (event,) = await stream_events(js)
    assert isinstance(event, MailAccepted) and event.raw is not None
    assert event.tracking is False
    html, text = html_and_text(event.raw)
    assert "/track/c/" not in html and "/track/o/" not in html
    assert all(f'href="{url.replace("&", "&amp;")}"' in html for url in LINKS)
    mid = event.message.mailgate_id
    assert tokens(UNSUB, html, "unsubscribe", mid) == [None]
    assert tokens(UNSUB, text, "unsubscribe", mid) == [None]
    assert headers_of(event.raw)["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert b"X-Mailgate-Tracking" not in event.raw


async def test_a_body_it_cannot_read_is_accepted_as_is_and_counted(
    start_service: Factory, js
) -> None:
    service = await start_service()
    raw = (
        f"From: {SENDER}\r\nSubject: odd\r\nthis line is not a header\r\n"
        "Content-Type: text/html\r\n\r\n"
        '<a href="https://shop.example.com/">x</a> [Unsubscribe]\r\n'
    ).encode()

    answer = await asyncio.to_thread(send, service, raw, ["ivan@example.org"])
    assert answer.startswith("250 ")
    (event,) = await stream_events(js)
    assert isinstance(event, MailAccepted) and event.raw is not None
    assert event.raw.endswith(
        b'\r\n\r\n<a href="https://shop.example.com/">x</a> [Unsubscribe]\r\n'
    )
    assert b"\r\nList-Unsubscribe: <" + TRACKING_BASE_URL.encode() in event.raw
    assert service.registry.get_sample_value("mailgate_smtp_rewrite_fallbacks_total") == 1


async def test_a_campaign_over_one_megabyte_is_rewritten_into_the_object_store(
    start_service: Factory, js
) -> None:
    service = await start_service()
    big = os.urandom(1_600_000)  # ~2.2 MB base64: above NATS' 1 MB max_payload
    raw = campaign(attachment=big)
    assert len(raw) > 2_000_000

    answer = await asyncio.to_thread(send, service, raw, ["ivan@example.org", "maria@example.org"])
    assert answer.startswith("250 ")
    events = await stream_events(js)
    blobs = await js.object_store(OBJECT_STORE_MAIL)
    assert len(events) == 2
    for event in events:
        assert isinstance(event, MailAccepted)
        mid = event.message.mailgate_id
        assert event.raw is None and event.object_name == mid
        stored = (await blobs.get(mid)).data
        assert isinstance(stored, bytes) and len(stored) == event.size > 2_000_000
        html, _ = html_and_text(stored)
        assert tokens(CLICK, html, "click", mid) == LINKS
        assert attachment_block(stored) == attachment_block(raw)


async def test_without_tracking_settings_only_the_headers_are_rewritten(
    start_service: Factory, js
) -> None:
    service = await start_service(tracking_base_url="", tracking_secret="")
    raw = campaign()

    answer = await asyncio.to_thread(send, service, raw, ["ivan@example.org"])
    assert answer.startswith("250 ")
    (event,) = await stream_events(js)
    assert isinstance(event, MailAccepted) and event.raw is not None
    assert b"List-Unsubscribe" not in event.raw and b"/track/" not in event.raw
    assert event.raw.endswith(raw.partition(b"\r\n\r\n")[2])
