"""smtp-ingest against a real nats-server, driven by stdlib smtplib over real TLS.

The service runs in the test's event loop; smtplib runs in a thread (asyncio.to_thread).
Credentials, accounts and suppressions are written straight into the KV buckets, as the
ledger would.
"""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

import msgspec
import pytest
from mailgate_core.nats import KV_ACCOUNTS, KV_CREDENTIALS, KV_SUPPRESSIONS, OBJECT_STORE_MAIL
from mailgate_core.passwords import hash_password
from mailgate_core.records import (
    AccountRecord,
    CredentialRecord,
    SuppressionRecord,
    suppression_key,
)
from mailgate_core.schemas import MailAccepted, MailSkipped, decode_subject
from mailgate_fakes.testing import eventually
from mailgate_smtp_ingest.app import Settings, SmtpIngestService, build
from prometheus_client import CollectorRegistry

DOMAIN = "mg.example.net"
SENDER = "news@shop.example.com"
USER, PASSWORD = "ams-relay-1", "correct horse battery staple"
ACCOUNT = "acc1"
TRACKING_BASE_URL = "https://t.mg.example.net"
TRACKING_SECRET = "tracking-secret-for-tests"


@dataclass
class Creds:
    username: str
    password: str
    account_id: str


async def _put(js, bucket: str, key: str, record: msgspec.Struct) -> None:
    kv = await js.key_value(bucket)
    await kv.put(key, msgspec.json.encode(record))


@pytest.fixture
async def creds(js) -> Creds:
    await _put(
        js,
        KV_ACCOUNTS,
        ACCOUNT,
        AccountRecord(id=ACCOUNT, name="Shop", has_postal_api_key=True, tracking=True),
    )
    await _put(
        js,
        KV_CREDENTIALS,
        USER,
        CredentialRecord(username=USER, account_id=ACCOUNT, password_hash=hash_password(PASSWORD)),
    )
    return Creds(USER, PASSWORD, ACCOUNT)


Factory = Callable[..., Awaitable[SmtpIngestService]]


@pytest.fixture
async def start_service(nats_url: str, creds: Creds) -> AsyncIterator[Factory]:
    started: list[SmtpIngestService] = []

    async def factory(**overrides) -> SmtpIngestService:
        values = dict(
            nats_url=nats_url,
            domain=DOMAIN,
            smtp_host="127.0.0.1",
            smtp_port=0,
            smtps_port=0,
            ops_host="127.0.0.1",
            ops_port=0,
            allowed_sender_domains=("shop.example.com",),
            publish_timeout_s=1.0,
            kv_timeout_s=1.0,
            shutdown_grace_s=5.0,
            tracking_base_url=TRACKING_BASE_URL,
            tracking_secret=TRACKING_SECRET,
        )
        values.update(overrides)
        service = await build(Settings(**values), registry=CollectorRegistry())
        await service.start()
        started.append(service)
        return service

    yield factory
    for service in started:
        await service.stop()


def client_context(service: SmtpIngestService) -> ssl.SSLContext:
    """Trust exactly the service's generated certificate (hostname checked: 127.0.0.1)."""
    assert service.certificate_pem is not None
    return ssl.create_default_context(cadata=service.certificate_pem.decode())


def connect(service: SmtpIngestService, *, implicit: bool = False) -> smtplib.SMTP:
    ctx = client_context(service)
    if implicit:
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(
            "127.0.0.1", service.smtps_port, context=ctx, timeout=30
        )
    else:
        smtp = smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=30)
        smtp.ehlo("ams.test")
        smtp.starttls(context=ctx)
    smtp.ehlo("ams.test")
    return smtp


def make_message(*, sender: str = SENDER, body: str = "Hello Ivan\n", **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Shop <{sender}>"
    msg["To"] = "ivan@example.org"
    msg["Subject"] = "Скидки недели"
    msg["Message-ID"] = "<original@ams.local>"
    msg["X-AMS-Message-ID"] = "ams-42"
    msg["X-AMS-Campaign-ID"] = "73"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg.as_bytes(policy=SMTP_POLICY)  # CRLF, as real clients send


async def stream_events(js, stream: str = "MAIL") -> list:
    info = await js.stream_info(stream)
    events = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        events.append(decode_subject(msg.subject, msg.data))
    return events


def reply(code_msg: tuple[int, bytes]) -> str:
    code, msg = code_msg
    return f"{code} {msg.decode()}"


# --- happy paths -----------------------------------------------------------------------


async def test_starttls_auth_plain_fans_out_one_accepted_event_per_recipient(
    start_service: Factory, js
) -> None:
    service = await start_service()

    def session() -> tuple[dict[str, str], str]:
        with connect(service) as smtp:
            features = dict(smtp.esmtp_features)
            smtp.login(USER, PASSWORD)  # smtplib prefers PLAIN among what we offer
            assert smtp.mail(SENDER) == (250, b"2.1.0 Ok")
            assert smtp.rcpt("ivan@example.org")[0] == 250
            assert smtp.rcpt("maria@example.org")[0] == 250
            return features, reply(smtp.data(make_message()))

    features, answer = await asyncio.to_thread(session)
    assert features["size"] == "10485760"
    for ext in ("8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes", "auth"):
        assert ext in features
    assert "starttls" not in features  # already on TLS

    events = await stream_events(js)
    assert [type(e) for e in events] == [MailAccepted, MailAccepted]
    by_rcpt = {e.message.recipient: e for e in events}  # published concurrently
    first, second = by_rcpt["ivan@example.org"], by_rcpt["maria@example.org"]
    assert answer == f"250 2.0.0 Ok: queued as {first.message.mailgate_id}"  # the first RCPT's
    assert first.message.mailgate_id != second.message.mailgate_id
    for event in events:
        mid = event.message.mailgate_id
        assert event.message.account_id == ACCOUNT
        assert (event.message.external_id, event.message.campaign_id) == ("ams-42", "73")
        assert event.message_id_header == f"<{mid}@{DOMAIN}>"
        assert (event.mail_from, event.credential) == (SENDER, USER)
        assert event.subject_line == "Скидки недели"
        assert event.postal_api_key_ref == ACCOUNT and event.tracking is True
        assert event.client_ip == "127.0.0.1"
        assert event.raw is not None and event.object_name is None
        assert event.size == len(event.raw)
        assert f"Message-ID: <{mid}@{DOMAIN}>\r\n".encode() in event.raw
        assert b"X-AMS-" not in event.raw and b"original@ams.local" not in event.raw
        assert b"X-Postal-Tag: 73\r\n" in event.raw
        assert b"X-Postmaster-Msgtype: 73\r\n" in event.raw
        assert event.raw.endswith(b"\r\n\r\nHello Ivan\r\n")

    registry = service.registry
    assert registry.get_sample_value("mailgate_smtp_messages_accepted_total") == 2
    assert registry.get_sample_value("mailgate_smtp_data_to_ack_seconds_count") == 1
    assert await service.health.failing() == []


async def test_implicit_tls_with_auth_login(start_service: Factory, js) -> None:
    service = await start_service()

    def session() -> tuple[tuple[int, bytes], str]:
        with connect(service, implicit=True) as smtp:
            assert "starttls" not in smtp.esmtp_features
            assert "LOGIN" in smtp.esmtp_features["auth"].split()
            smtp.user, smtp.password = USER, PASSWORD
            auth = smtp.auth("LOGIN", smtp.auth_login)
            smtp.mail(SENDER)
            smtp.rcpt("ivan@example.org")
            bare_lf = make_message().replace(b"\r\n", b"\n")  # as smtplib sends as_bytes()
            return auth, reply(smtp.data(bare_lf))

    auth, answer = await asyncio.to_thread(session)
    assert auth == (235, b"2.7.0 Authentication successful")
    assert answer.startswith("250 2.0.0 Ok: queued as ")
    (event,) = await stream_events(js)
    assert isinstance(event, MailAccepted) and event.message.recipient == "ivan@example.org"
    assert event.raw is not None and re.search(rb"(?<!\r)\n", event.raw) is None
    assert b"\r\n\r\nHello Ivan\r\n" in event.raw  # smtplib adds a CRLF after the LF


async def test_auth_is_offered_only_after_starttls(start_service: Factory) -> None:
    service = await start_service()

    def session() -> tuple[dict[str, str], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=30) as smtp:
            smtp.ehlo("ams.test")
            features = dict(smtp.esmtp_features)
            attempt = smtp.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0u\0p").decode())
            return features, attempt

    features, attempt = await asyncio.to_thread(session)
    assert "starttls" in features and "auth" not in features
    assert features["size"] == "10485760"
    assert attempt[0] == 538


async def test_auth_without_tls_can_be_allowed_explicitly(start_service: Factory) -> None:
    service = await start_service(smtp_auth_require_tls=False)

    def session() -> int:
        with smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=30) as smtp:
            smtp.ehlo("ams.test")
            assert "auth" in smtp.esmtp_features
            return smtp.login(USER, PASSWORD)[0]

    assert await asyncio.to_thread(session) == 235


async def test_data_is_received_exactly_dots_long_lines_and_pipelined_commands(
    start_service: Factory, js
) -> None:
    service = await start_service()
    long_line = b"x" * 300_000 + b".\r\n"  # far longer than any read buffer
    body = (
        b"Ends with a dot.\r\n.starts with a dot\r\n"
        b".\r\n"  # a lone dot inside the message
        b"..two dots\r\n" + long_line + b"=2E and . and .\r\nlast line without the final dot"
    )
    raw = f"From: {SENDER}\r\nSubject: dots\r\n\r\n".encode() + body
    stuffed = raw.replace(b"\r\n.", b"\r\n..")

    def session() -> tuple[str, str, str]:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            smtp.rcpt("ivan@example.org")
            assert smtp.docmd("DATA")[0] == 354
            # the end of data and the next transaction's commands in one write (PIPELINING)
            smtp.send(stuffed + b"\r\n.\r\nMAIL FROM:<" + SENDER.encode() + b">\r\nRSET\r\n")
            return reply(smtp.getreply()), reply(smtp.getreply()), reply(smtp.getreply())

    data_reply, mail_reply, rset_reply = await asyncio.to_thread(session)
    assert data_reply.startswith("250 2.0.0 Ok: queued as ")
    assert (mail_reply, rset_reply) == ("250 2.1.0 Ok", "250 2.0.0 OK")
    (event,) = await stream_events(js)
    assert isinstance(event, MailAccepted) and event.raw is not None
    assert event.raw.endswith(b"\r\n\r\n" + body + b"\r\n")

    def empty() -> str:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            smtp.rcpt("ivan@example.org")
            assert smtp.docmd("DATA")[0] == 354
            smtp.send(b".\r\n")
            return reply(smtp.getreply())

    assert (await asyncio.to_thread(empty)).startswith("250 ")


# --- authentication --------------------------------------------------------------------


async def test_wrong_password_is_535_and_the_ip_is_throttled_after_five_failures(
    start_service: Factory,
) -> None:
    service = await start_service()
    bad = "PLAIN " + base64.b64encode(f"\0{USER}\0wrong".encode()).decode()
    good = "PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()

    def session() -> tuple[list[str], str, bool]:
        answers = []
        with connect(service) as smtp:
            for _ in range(3):
                answers.append(reply(smtp.docmd("AUTH", bad)))
        with connect(service) as smtp:
            for _ in range(2):
                answers.append(reply(smtp.docmd("AUTH", bad)))
        with connect(service) as smtp:
            throttled = reply(smtp.docmd("AUTH", good))  # even the right password now
            try:
                smtp.noop()
                closed = False
            except smtplib.SMTPServerDisconnected:
                closed = True
        return answers, throttled, closed

    answers, throttled, closed = await asyncio.to_thread(session)
    assert answers == ["535 5.7.8 Authentication credentials invalid"] * 5
    assert throttled == "421 4.7.0 Too many authentication failures"
    assert closed
    assert service.registry.get_sample_value("mailgate_smtp_auth_failures_total") == 5


async def test_unknown_user_and_disallowed_ip_are_refused(start_service: Factory, js) -> None:
    await _put(
        js,
        KV_CREDENTIALS,
        "office-only",
        CredentialRecord(
            username="office-only",
            account_id=ACCOUNT,
            password_hash=hash_password("pw"),
            allowed_ips=["10.0.0.0/8"],
        ),
    )
    service = await start_service()

    def session() -> list[int]:
        codes = []
        with connect(service) as smtp:
            for user, password in (("nobody", "x"), ("office-only", "pw")):
                try:
                    codes.append(smtp.login(user, password)[0])
                except smtplib.SMTPAuthenticationError as exc:
                    codes.append(exc.smtp_code)
        return codes

    assert await asyncio.to_thread(session) == [535, 535]


async def test_a_password_change_in_kv_applies_live(start_service: Factory, js) -> None:
    service = await start_service()

    def login(password: str) -> int:
        with connect(service) as smtp:
            try:
                return smtp.login(USER, password)[0]
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code

    assert await asyncio.to_thread(login, PASSWORD) == 235
    new_hash = hash_password("new password")
    await _put(
        js,
        KV_CREDENTIALS,
        USER,
        CredentialRecord(username=USER, account_id=ACCOUNT, password_hash=new_hash),
    )
    assert service.directory is not None
    credentials = service.directory.credentials
    await eventually(lambda: credentials.get(USER).password_hash == new_hash, what="watcher")
    assert await asyncio.to_thread(login, PASSWORD) == 535
    assert await asyncio.to_thread(login, "new password") == 235


# --- validation replies ----------------------------------------------------------------


async def test_mail_rcpt_data_without_auth_get_the_exact_554(start_service: Factory) -> None:
    service = await start_service()

    def session() -> list[str]:
        with connect(service) as smtp:
            return [
                reply(smtp.mail(SENDER)),
                reply(smtp.rcpt("ivan@example.org")),
                reply(smtp.docmd("DATA")),
            ]

    answers = await asyncio.to_thread(session)
    assert answers == ["554 5.7.1 Must authenticate before sending mail"] * 3


async def test_disallowed_envelope_sender_and_from_header(start_service: Factory, js) -> None:
    service = await start_service()

    def session() -> tuple[str, str]:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            envelope = reply(smtp.mail("spoof@evil.example"))
            smtp.mail(SENDER)
            smtp.rcpt("ivan@example.org")
            header = reply(smtp.data(make_message(sender="ceo@evil.example")))
            return envelope, header

    envelope, header = await asyncio.to_thread(session)
    assert envelope == "554 5.7.1 Disallowed source address: spoof@evil.example"
    assert header == "554 5.7.1 Disallowed source address: ceo@evil.example"
    assert (await js.stream_info("MAIL")).state.messages == 0


async def test_the_account_sender_list_overrides_the_global_one(start_service: Factory, js) -> None:
    await _put(
        js,
        KV_ACCOUNTS,
        ACCOUNT,
        AccountRecord(id=ACCOUNT, name="Shop", allowed_sender_domains=["brand.example"]),
    )
    service = await start_service()

    def session() -> tuple[int, int]:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            own = smtp.mail("hello@brand.example")[0]
            smtp.rset()
            global_only = smtp.mail(SENDER)[0]
            return own, global_only

    assert await asyncio.to_thread(session) == (250, 554)


async def test_invalid_recipients_are_named_in_the_reply(start_service: Factory) -> None:
    service = await start_service()

    def session() -> list[str]:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            return [
                reply(smtp.rcpt("not-an-address")),
                reply(smtp.rcpt("a@@b.example")),
                reply(smtp.rcpt("ivan@example.org")),
            ]

    answers = await asyncio.to_thread(session)
    assert answers == [
        "554 5.1.3 Invalid recipient address: not-an-address",
        "554 5.1.3 Invalid recipient address: a@@b.example",
        "250 2.1.5 Ok",
    ]


async def test_too_many_recipients_is_452(start_service: Factory) -> None:
    service = await start_service(max_recipients=2)

    def session() -> list[int]:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            return [smtp.rcpt(f"r{i}@example.org")[0] for i in range(3)]

    assert await asyncio.to_thread(session) == [250, 250, 452]


async def test_forbidden_attachments_are_refused_even_nested_and_rfc2231_named(
    start_service: Factory, js
) -> None:
    service = await start_service()
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("see attachment")
    inner.add_attachment(b"MZ", maintype="application", subtype="octet-stream", filename="счёт.EXE")
    outer = EmailMessage()
    outer["From"] = SENDER
    outer["Subject"] = "fwd"
    outer.set_content("fwd")
    outer.add_attachment(inner)
    raw = outer.as_bytes(policy=SMTP_POLICY)
    assert b"filename*=" in raw

    def session() -> str:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            smtp.rcpt("ivan@example.org")
            return reply(smtp.data(raw))

    assert await asyncio.to_thread(session) == "554 5.7.1 Not allowed attachement type .exe"
    assert (await js.stream_info("MAIL")).state.messages == 0


async def test_size_limit_at_mail_from_and_at_data(start_service: Factory, js) -> None:
    service = await start_service(max_message_size=50_000)
    big = make_message(body=("y" * 76 + "\n") * 800)  # ~62 kB

    def session() -> tuple[str, str, str]:
        with connect(service) as smtp:
            assert smtp.esmtp_features["size"] == "50000"
            smtp.login(USER, PASSWORD)
            declared = reply(smtp.mail(SENDER, ["SIZE=60000"]))
            smtp.mail(SENDER)
            smtp.rcpt("ivan@example.org")
            actual = reply(smtp.data(big))
            smtp.mail(SENDER)  # the session goes on after the refusal
            smtp.rcpt("ivan@example.org")
            small = reply(smtp.data(make_message()))
            return declared, actual, small

    declared, actual, small = await asyncio.to_thread(session)
    assert declared == "554 5.3.4 Message exceeds fixed size limit"
    assert actual == "554 5.3.4 Message exceeds fixed size limit"
    assert small.startswith("250 2.0.0 Ok: queued as ")
    assert (await js.stream_info("MAIL")).state.messages == 1
    rejected = service.registry.get_sample_value(
        "mailgate_smtp_messages_rejected_total", {"reason": "size"}
    )
    assert rejected == 2


# --- suppression, object store, NATS outage --------------------------------------------


async def test_a_suppressed_recipient_is_accepted_but_skipped(start_service: Factory, js) -> None:
    await _put(
        js,
        KV_SUPPRESSIONS,
        suppression_key(ACCOUNT, "Gone@Example.org"),
        SuppressionRecord(
            account_id=ACCOUNT, email="gone@example.org", reason="unsubscribed", created_at=1.0
        ),
    )
    service = await start_service()

    def session() -> str:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            smtp.rcpt("gone@example.org")
            smtp.rcpt("ivan@example.org")
            return reply(smtp.data(make_message()))

    answer = await asyncio.to_thread(session)
    assert answer.startswith("250 2.0.0 Ok: queued as ")
    events = await stream_events(js)
    skipped = [e for e in events if isinstance(e, MailSkipped)]
    accepted = [e for e in events if isinstance(e, MailAccepted)]
    assert len(skipped) == 1 and len(accepted) == 1
    assert skipped[0].message.recipient == "gone@example.org"
    assert skipped[0].reason == "unsubscribed"
    assert skipped[0].message.campaign_id == "73"
    assert accepted[0].message.recipient == "ivan@example.org"
    assert service.registry.get_sample_value("mailgate_smtp_messages_skipped_total") == 1


async def test_a_large_message_goes_to_the_object_store(start_service: Factory, js) -> None:
    service = await start_service()
    body = ("0123456789" * 7 + "\n") * 12_000  # ~850 kB, above OBJECT_STORE_THRESHOLD
    raw = make_message(body=body)

    def session() -> str:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            smtp.rcpt("ivan@example.org")
            return reply(smtp.data(raw))

    answer = await asyncio.to_thread(session)
    assert answer.startswith("250 ")
    (event,) = await stream_events(js)
    mid = event.message.mailgate_id
    assert event.raw is None and event.object_name == mid
    blobs = await js.object_store(OBJECT_STORE_MAIL)
    stored = (await blobs.get(mid)).data
    assert len(stored) == event.size > 700_000
    assert f"Message-ID: <{mid}@{DOMAIN}>".encode() in stored
    assert stored.endswith(body.replace("\n", "\r\n").encode())


async def test_nats_down_answers_451_never_250(start_service: Factory, nats_server) -> None:
    service = await start_service()

    def session() -> tuple[str, str]:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            smtp.rcpt("ivan@example.org")
            nats_server.stop()
            return reply(smtp.data(make_message())), reply(smtp.noop())

    started = time.monotonic()
    answer, after = await asyncio.to_thread(session)
    assert answer == "451 4.3.0 Temporary failure, please retry later"
    assert after.startswith("250")  # the session survives; the client may retry
    assert time.monotonic() - started < 15
    assert service.registry.get_sample_value("mailgate_smtp_messages_accepted_total") == 0


async def test_a_refused_publish_answers_451(start_service: Factory, js) -> None:
    service = await start_service()
    info = await js.stream_info("MAIL")
    info.config.max_bytes = 256  # discard=new: JetStream refuses what does not fit
    await js.update_stream(info.config)

    def session() -> str:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            smtp.rcpt("ivan@example.org")
            return reply(smtp.data(make_message()))

    assert await asyncio.to_thread(session) == "451 4.3.0 Temporary failure, please retry later"
    assert (await js.stream_info("MAIL")).state.messages == 0
    transient = service.registry.get_sample_value(
        "mailgate_smtp_messages_rejected_total", {"reason": "transient"}
    )
    assert transient == 1


async def test_stop_closes_the_listeners_but_lets_a_message_in_data_finish(
    start_service: Factory, js
) -> None:
    service = await start_service()
    halfway, resume = threading.Event(), threading.Event()
    raw = make_message()
    head, tail = raw[: len(raw) // 2], raw[len(raw) // 2 :]

    def session() -> tuple[str, str]:
        smtp = connect(service)
        try:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            smtp.rcpt("ivan@example.org")
            assert smtp.docmd("DATA")[0] == 354
            smtp.send(head)
            halfway.set()
            resume.wait(10)
            smtp.send(tail + b".\r\n")
            return reply(smtp.getreply()), reply(smtp.getreply())
        finally:
            smtp.close()

    client = asyncio.ensure_future(asyncio.to_thread(session))
    await eventually(lambda: halfway.is_set() and service.intake.in_data == 1, what="in DATA")
    stopping = asyncio.ensure_future(service.stop())
    await eventually(lambda: not service.listening, what="listeners closed")
    with pytest.raises(OSError):
        await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", service.smtp_port, timeout=5)
    assert not stopping.done()
    resume.set()
    answer, goodbye = await client
    await stopping
    assert answer.startswith("250 2.0.0 Ok: queued as ")
    assert goodbye == "421 4.3.2 Service shutting down, please retry later"
    (event,) = await stream_events(js)
    assert isinstance(event, MailAccepted)


async def test_stop_lets_an_open_transaction_send_its_data_and_refuses_new_ones(
    start_service: Factory, js
) -> None:
    service = await start_service()
    enveloped, resume = threading.Event(), threading.Event()

    def session() -> tuple[str, str]:
        smtp = connect(service)
        try:
            smtp.login(USER, PASSWORD)
            smtp.mail(SENDER)
            smtp.rcpt("ivan@example.org")
            enveloped.set()
            resume.wait(10)
            answer = reply(smtp.data(make_message()))  # DATA after stop() began
            try:
                refused = reply(smtp.mail(SENDER))  # a new transaction is not started
            except smtplib.SMTPServerDisconnected:
                refused = "disconnected before MAIL"
            return answer, refused
        finally:
            smtp.close()

    client = asyncio.ensure_future(asyncio.to_thread(session))
    await eventually(lambda: enveloped.is_set() and service.intake.open_transactions == 1)
    stopping = asyncio.ensure_future(service.stop())
    await eventually(lambda: not service.listening, what="listeners closed")
    assert not stopping.done()  # waiting for the open transaction
    resume.set()
    answer, refused = await client
    await stopping
    assert answer.startswith("250 2.0.0 Ok: queued as ")
    assert refused == "421 4.3.2 Service shutting down, please retry later"
    (event,) = await stream_events(js)
    assert isinstance(event, MailAccepted)


async def test_stop_closes_the_listeners_first(start_service: Factory) -> None:
    service = await start_service()
    port = service.smtp_port
    await service.stop()
    assert "smtp" in await service.health.failing()
    with pytest.raises(OSError):
        await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", port, timeout=5)
