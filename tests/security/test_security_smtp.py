"""SMTP abuse: brute force (per address and per username), clear-text AUTH, open relay,
header injection, over-long lines, slowloris and connection floods. smtp-ingest runs in the
test's loop against a real nats-server; clients are stdlib smtplib from several loopback
addresses (127.0.0.x) to play distinct attackers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

import msgspec
import pytest
from mailgate_core.nats import KV_ACCOUNTS, KV_CREDENTIALS
from mailgate_core.passwords import hash_password
from mailgate_core.records import AccountRecord, CredentialRecord
from mailgate_smtp_ingest.app import Settings, SmtpIngestService, build
from prometheus_client import CollectorRegistry

DOMAIN = "mg.example.net"
SENDER = "news@shop.example.com"
USER, PASSWORD = "ams-relay-1", "correct horse battery staple"
OTHER_USER, OTHER_PASSWORD = "ams-relay-2", "another long password"

Factory = Callable[..., Awaitable[SmtpIngestService]]


async def _put(js, bucket: str, key: str, record: msgspec.Struct) -> None:
    await (await js.key_value(bucket)).put(key, msgspec.json.encode(record))


@pytest.fixture
async def start_service(nats_url: str, js) -> AsyncIterator[Factory]:
    await _put(js, KV_ACCOUNTS, "acc1", AccountRecord(id="acc1", name="Shop", tracking=True))
    for user, password in ((USER, PASSWORD), (OTHER_USER, OTHER_PASSWORD)):
        record = CredentialRecord(
            username=user, account_id="acc1", password_hash=hash_password(password)
        )
        await _put(js, KV_CREDENTIALS, user, record)
    started: list[SmtpIngestService] = []

    async def factory(**overrides) -> SmtpIngestService:
        values = dict(
            nats_url=nats_url,
            domain=DOMAIN,
            smtp_host="0.0.0.0",
            smtp_port=0,
            smtps_port=0,
            ops_host="127.0.0.1",
            ops_port=0,
            allowed_sender_domains=("shop.example.com",),
            publish_timeout_s=1.0,
            kv_timeout_s=1.0,
            shutdown_grace_s=2.0,
        )
        values.update(overrides)
        service = await build(Settings(**values), registry=CollectorRegistry())
        await service.start()
        started.append(service)
        return service

    yield factory
    for service in started:
        await service.stop()


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(service: SmtpIngestService, source: str = "127.0.0.1", tls: bool = True):
    smtp = smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10, source_address=(source, 0))
    smtp.ehlo("ams.test")
    if tls:
        smtp.starttls(context=_tls())
        smtp.ehlo("ams.test")
    return smtp


def plain(user: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def reply(answer: tuple[int, bytes]) -> str:
    return f"{answer[0]} {answer[1].decode()}"


def message(sender: str = SENDER, **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "ivan@example.org"
    msg["Subject"] = "hello"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("hello\n")
    return msg.as_bytes(policy=SMTP_POLICY)


async def mail_events(js) -> int:
    return (await js.stream_info("MAIL")).state.messages


# --- brute force -------------------------------------------------------------------------


async def test_a_password_guessed_from_many_addresses_is_throttled_per_username(
    start_service: Factory,
) -> None:
    """Five addresses, two guesses each: no address reaches its own limit (5), but the
    username does (10); then even the right password gets 454 until the window passes,
    while another username is unaffected."""
    service = await start_service(auth_failure_limit=5, auth_failure_limit_per_user=10)

    def attack() -> tuple[list[str], str, str, str]:
        answers = []
        for n in range(2, 7):
            with connect(service, source=f"127.0.0.{n}") as smtp:
                for _ in range(2):
                    answers.append(reply(smtp.docmd("AUTH", plain(USER, "guess"))))
        with connect(service, source="127.0.0.7") as smtp:
            blocked = reply(smtp.docmd("AUTH", plain(USER, PASSWORD)))
        with connect(service, source="127.0.0.8") as smtp:
            other = reply(smtp.docmd("AUTH", plain(OTHER_USER, OTHER_PASSWORD)))
        with connect(service, source="127.0.0.9") as smtp:
            case_trick = reply(smtp.docmd("AUTH", plain(USER.upper(), "guess")))
        return answers, blocked, other, case_trick

    answers, blocked, other, case_trick = await asyncio.to_thread(attack)
    assert answers == ["535 5.7.8 Authentication credentials invalid"] * 10
    assert blocked.startswith("454 4.7.0")
    assert other == "235 2.7.0 Authentication successful"
    assert case_trick.startswith("454 4.7.0")  # the username is matched case-insensitively


async def test_a_password_guessed_from_one_address_gets_421_and_is_disconnected(
    start_service: Factory,
) -> None:
    service = await start_service(auth_failure_limit=3, auth_failure_limit_per_user=100)

    def attack() -> tuple[list[str], bool]:
        with connect(service) as smtp:
            answers = [reply(smtp.docmd("AUTH", plain(OTHER_USER, "x"))) for _ in range(4)]
            try:
                smtp.noop()
            except smtplib.SMTPServerDisconnected:
                return answers, True
            return answers, False

    answers, closed = await asyncio.to_thread(attack)
    assert answers[:3] == ["535 5.7.8 Authentication credentials invalid"] * 3
    assert answers[3] == "421 4.7.0 Too many authentication failures"
    assert closed


async def test_auth_is_neither_offered_nor_accepted_in_clear_text(start_service: Factory) -> None:
    service = await start_service()

    def clear() -> tuple[bool, str]:
        with connect(service, tls=False) as smtp:
            offered = smtp.has_extn("auth")
            answer = reply(smtp.docmd("AUTH", plain(USER, PASSWORD)))
        return offered, answer

    offered, answer = await asyncio.to_thread(clear)
    assert not offered
    assert answer.startswith("538 5.7.11")
    # The password was not even checked: nothing counted as an auth failure or success.
    assert service.registry.get_sample_value("mailgate_smtp_auth_failures_total") == 0


# --- open relay --------------------------------------------------------------------------


async def test_the_server_is_not_an_open_relay(start_service: Factory, js) -> None:
    """Without AUTH nothing is accepted (the spec's 554 text, not aiosmtpd's 530); with AUTH
    a foreign envelope sender or From header gets the spec's 554 Disallowed source address,
    including look-alike domains."""
    service = await start_service()
    before = await mail_events(js)

    def relay() -> dict[str, str]:
        out: dict[str, str] = {}
        with connect(service) as smtp:
            out["mail"] = reply(smtp.docmd("MAIL", f"FROM:<{SENDER}>"))
            out["rcpt"] = reply(smtp.docmd("RCPT", "TO:<victim@example.org>"))
            out["data"] = reply(smtp.docmd("DATA"))
        for name, sender in (
            ("foreign", "ceo@bank.example"),
            ("suffix", "news@shop.example.com.evil.example"),
            ("subdomain-of-other", "news@evilshop.example.com"),
        ):
            with connect(service) as smtp:
                smtp.login(USER, PASSWORD)
                out[name] = reply(smtp.docmd("MAIL", f"FROM:<{sender}>"))
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            try:
                smtp.sendmail(SENDER, ["ivan@example.org"], message(sender="ceo@bank.example"))
                out["from-header"] = "250"
            except smtplib.SMTPDataError as exc:
                out["from-header"] = f"{exc.smtp_code} {exc.smtp_error.decode()}"
        return out

    out = await asyncio.to_thread(relay)
    must_auth = "554 5.7.1 Must authenticate before sending mail"
    assert out["mail"] == out["rcpt"] == out["data"] == must_auth
    assert out["foreign"] == "554 5.7.1 Disallowed source address: ceo@bank.example"
    assert out["suffix"].startswith("554 5.7.1 Disallowed source address:")
    assert out["subdomain-of-other"].startswith("554 5.7.1 Disallowed source address:")
    assert out["from-header"] == "554 5.7.1 Disallowed source address: ceo@bank.example"
    assert await mail_events(js) == before


# --- injection and limits ----------------------------------------------------------------


async def test_over_long_command_lines_are_refused_and_the_session_survives(
    start_service: Factory,
) -> None:
    service = await start_service()

    def long_lines() -> tuple[str, str, str]:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            long_mail = reply(smtp.docmd("MAIL", "FROM:<" + "a" * 5000 + "@shop.example.com>"))
            long_rcpt_local = "b" * 300
            smtp.docmd("RSET")
            smtp.docmd("MAIL", f"FROM:<{SENDER}>")
            long_rcpt = reply(smtp.docmd("RCPT", f"TO:<{long_rcpt_local}@example.org>"))
            alive = reply(smtp.docmd("NOOP"))
        return long_mail, long_rcpt, alive

    long_mail, long_rcpt, alive = await asyncio.to_thread(long_lines)
    assert long_mail.startswith("500 ") and "too long" in long_mail.lower()
    assert long_rcpt.startswith("554 5.1.3 Invalid recipient address:")
    assert alive.startswith("250")


async def test_crlf_smuggled_in_an_encoded_header_cannot_add_headers(
    start_service: Factory, js
) -> None:
    """RFC 2047 lets a header carry an encoded CR LF; the campaign id we copy into our own
    headers must not turn that into a new header (e.g. a Bcc)."""
    service = await start_service()
    evil = "73\r\nBcc: victim@evil.example\r\nX-Injected: yes"
    encoded = "=?utf-8?b?" + base64.b64encode(evil.encode()).decode() + "?="

    raw = (
        f"From: {SENDER}\r\nTo: ivan@example.org\r\nSubject: hi\r\n"
        f"X-AMS-Campaign-ID: {encoded}\r\nX-AMS-Message-ID: {encoded}\r\n\r\nhello\r\n"
    ).encode()
    assert b"Bcc" not in raw

    def send() -> None:
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.sendmail(SENDER, ["ivan@example.org"], raw)

    await asyncio.to_thread(send)
    from mailgate_core.schemas import MailAccepted, decode

    info = await js.stream_info("MAIL")
    event = decode((await js.get_msg("MAIL", info.state.last_seq)).data, MailAccepted)
    assert event.raw is not None
    head = event.raw.split(b"\r\n\r\n", 1)[0]
    names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n") if line[:1] != b" "]
    assert b"bcc" not in names and b"x-injected" not in names
    for value in (event.message.campaign_id, event.message.external_id):
        assert value is None or ("\n" not in value and "\r" not in value)


# --- slowloris ---------------------------------------------------------------------------


async def test_an_idle_or_trickling_client_is_cut_off_by_the_timeout(
    start_service: Factory,
) -> None:
    service = await start_service(smtp_timeout_s=1.0)

    def slow() -> tuple[float, float]:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", service.smtp_port), timeout=10) as sock:
            sock.recv(1024)  # greeting; then say nothing
            while sock.recv(1024):
                pass
        idle = time.monotonic() - started
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", service.smtp_port), timeout=10) as sock:
            sock.recv(1024)
            try:
                for ch in b"EHLO slow.example.com":  # one byte every 0.3 s, never a newline
                    sock.sendall(bytes([ch]))
                    time.sleep(0.3)
            except OSError:
                pass
        trickle = time.monotonic() - started
        return idle, trickle

    idle, trickle = await asyncio.to_thread(slow)
    assert idle < 5
    assert trickle < 5  # 21 bytes at 0.3 s would take 6.3 s: closed before the line ended


async def test_a_client_trickling_its_message_data_is_cut_off(start_service: Factory, js) -> None:
    """Inside DATA the timer is reset only once per megabyte received: a client sending a few
    bytes a second cannot keep a transaction open, and its message is not accepted."""
    service = await start_service(smtp_timeout_s=1.0)
    before = await mail_events(js)

    def trickle() -> tuple[float, bool]:
        smtp = connect(service)
        smtp.login(USER, PASSWORD)
        smtp.mail(SENDER)
        smtp.rcpt("ivan@example.org")
        smtp.putcmd("DATA")
        assert smtp.getreply()[0] == 354
        started = time.monotonic()
        cut = False
        try:
            for _ in range(40):
                smtp.send(b"X-Slow: header\r\n")
                time.sleep(0.25)
        except (OSError, smtplib.SMTPServerDisconnected):
            cut = True
        with contextlib.suppress(OSError, smtplib.SMTPException):
            smtp.close()
        return time.monotonic() - started, cut

    elapsed, cut = await asyncio.to_thread(trickle)
    assert cut and elapsed < 8  # 40 lines at 0.25 s would take 10 s
    assert await mail_events(js) == before


async def test_one_address_cannot_hold_every_connection(start_service: Factory) -> None:
    service = await start_service(smtp_max_connections_per_ip=3)

    def flood() -> tuple[list[str], str, str]:
        held = [socket.create_connection(("127.0.0.1", service.smtp_port), timeout=5)]
        held += [socket.create_connection(("127.0.0.1", service.smtp_port), timeout=5)]
        held += [socket.create_connection(("127.0.0.1", service.smtp_port), timeout=5)]
        greetings = [s.recv(1024).decode().strip() for s in held]
        with socket.create_connection(("127.0.0.1", service.smtp_port), timeout=5) as extra:
            refused = extra.recv(1024).decode().strip()
        with socket.create_connection(
            ("127.0.0.1", service.smtp_port), timeout=5, source_address=("127.0.0.2", 0)
        ) as other:
            other_ip = other.recv(1024).decode().strip()
        held.pop().close()
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", service.smtp_port), timeout=5) as again:
            after_close = again.recv(1024).decode().strip()
        for s in held:
            s.close()
        return greetings, refused, other_ip + " | " + after_close

    greetings, refused, rest = await asyncio.to_thread(flood)
    assert all(g.startswith("220 ") for g in greetings)
    assert refused == "421 4.7.0 Too many connections from your address, please retry later"
    other_ip, after_close = rest.split(" | ")
    assert other_ip.startswith("220 ") and after_close.startswith("220 ")
    assert service.intake.max_connections_per_ip == 3
