"""smtp-ingest pure rules: attachments, addresses, sender allowlists, throttles, limits."""

from __future__ import annotations

from email.message import EmailMessage

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st
from mailgate_smtp_ingest import replies
from mailgate_smtp_ingest.attachments import (
    FORBIDDEN_EXTENSIONS,
    attachment_extension,
    find_forbidden_attachment,
)
from mailgate_smtp_ingest.policy import (
    FailureThrottle,
    SendLimiter,
    declared_size,
    is_ip_allowed,
    is_sender_allowed,
    is_valid_address,
    sender_allowlist,
)
from mailgate_smtp_ingest.server import MailgateSMTP


def _with_attachment(filename: str, *, nested: bool = False) -> bytes:
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["Subject"] = "x"
    msg.set_content("hello")
    if nested:
        inner = EmailMessage()
        inner.set_content("inner")
        inner.add_attachment(
            b"MZ\x90\x00", maintype="application", subtype="octet-stream", filename=filename
        )
        msg.add_attachment(inner)
    else:
        msg.add_attachment(
            b"MZ\x90\x00", maintype="application", subtype="octet-stream", filename=filename
        )
    return msg.as_bytes()


def test_the_forbidden_list_is_the_specs() -> None:
    assert len(FORBIDDEN_EXTENSIONS) == 31
    assert {".exe", ".js", ".vb", ".wsh", ".lnk"} <= FORBIDDEN_EXTENSIONS
    assert ".zip" not in FORBIDDEN_EXTENSIONS


@pytest.mark.parametrize(
    ("filename", "ext"),
    [
        ("invoice.EXE", ".exe"),
        ("report.pdf.js", ".js"),
        ("trailing.bat. ", ".bat"),
        ("C:\\path\\run.cmd", ".cmd"),
        ("noext", ""),
        ("archive.tar.gz", ".gz"),
    ],
)
def test_extension_as_windows_sees_it(filename: str, ext: str) -> None:
    assert attachment_extension(filename) == ext


def test_a_plain_forbidden_attachment_is_found() -> None:
    assert find_forbidden_attachment(_with_attachment("setup.Exe")) == ".exe"


def test_a_harmless_attachment_passes() -> None:
    assert find_forbidden_attachment(_with_attachment("report.pdf")) is None


def test_broken_encoded_word_file_names_are_read_as_written_not_raised() -> None:
    for name in ("=?utf-8?b?0KHQ+utC40LTQutC4?=", "=?utf-8\xff?b?0KHQ?=.exe"):
        raw = (
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b'Content-Type: application/octet-stream; name="' + name.encode("latin-1") + b'"\r\n'
            b"\r\nMZ\r\n--b--\r\n"
        )
        expected = ".exe" if name.endswith(".exe") else None
        assert find_forbidden_attachment(raw) == expected


def test_a_forbidden_attachment_inside_an_attached_message_is_found() -> None:
    assert find_forbidden_attachment(_with_attachment("evil.scr", nested=True)) == ".scr"


def test_an_rfc2231_non_ascii_filename_is_decoded() -> None:
    raw = _with_attachment("счёт.vbs")
    assert b"filename*=" in raw  # the email package encodes it per RFC 2231
    assert find_forbidden_attachment(raw) == ".vbs"


def test_an_rfc2231_continued_filename_is_joined() -> None:
    raw = (
        b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b'--b1\r\nContent-Type: multipart/alternative; boundary="b2"\r\n\r\n'
        b"--b2\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename*0*=utf-8''%D1%84%D0%B0;"
        b' filename*1="il.pif"\r\n\r\nAAAA\r\n--b2--\r\n--b1--\r\n'
    )
    assert find_forbidden_attachment(raw) == ".pif"


def test_an_rfc2047_encoded_name_is_decoded() -> None:
    raw = (
        b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b'--b\r\nContent-Type: application/octet-stream; name="=?UTF-8?B?0YTQsNC50LsuSkFS?="\r\n'
        b"\r\nAAAA\r\n--b--\r\n"
    )
    assert find_forbidden_attachment(raw) == ".jar"


def test_forbidden_attachment_reply_text_is_the_specs() -> None:
    assert (
        str(replies.forbidden_attachment(".exe")) == "554 5.7.1 Not allowed attachement type .exe"
    )


@pytest.mark.parametrize(
    "address",
    ["ivan@example.org", "a.b+tag@mail.example.com", '"john doe"@example.com', "иван@пример.рф"],
)
def test_valid_recipients(address: str) -> None:
    assert is_valid_address(address)


@pytest.mark.parametrize(
    "address",
    [
        "",
        "ivan",
        "ivan@",
        "@example.org",
        "a@b",
        "a@@b.ru",
        "a b@c.ru",
        "a..b@c.ru",
        ".a@b.ru",
        "a@-b.ru",
        "a@1.2.3.4",
        "a@[127.0.0.1]",
        "x" * 65 + "@example.org",
    ],
)
def test_invalid_recipients(address: str) -> None:
    assert not is_valid_address(address)


def test_sender_allowlist_entries() -> None:
    allowed = sender_allowlist([], ["Example.com", "*.shop.ru", "boss@corp.ru"])
    assert is_sender_allowed("News@EXAMPLE.com", allowed)
    assert not is_sender_allowed("news@sub.example.com", allowed)
    assert is_sender_allowed("a@mail.shop.ru", allowed)
    assert not is_sender_allowed("a@shop.ru", allowed)
    assert is_sender_allowed("boss@corp.ru", allowed)
    assert not is_sender_allowed("other@corp.ru", allowed)
    assert not is_sender_allowed("no-at-sign", allowed)


def test_the_account_list_wins_over_the_global_one() -> None:
    assert sender_allowlist(["a.ru"], ["b.ru"]) == ("a.ru",)
    assert sender_allowlist([], ["b.ru"]) == ("b.ru",)
    assert is_sender_allowed("anyone@anywhere.com", sender_allowlist([], []))


def test_ip_allowlist_accepts_addresses_and_networks() -> None:
    assert is_ip_allowed("10.1.2.3", [])
    assert is_ip_allowed("10.1.2.3", ["10.0.0.0/8"])
    assert is_ip_allowed("::ffff:10.1.2.3", ["10.1.2.3"])
    assert not is_ip_allowed("192.168.0.1", ["10.0.0.0/8", "garbage"])
    assert not is_ip_allowed(None, ["10.0.0.0/8"])


def test_declared_size() -> None:
    assert declared_size(["BODY=8BITMIME", "SIZE=1234"]) == 1234
    assert declared_size(["BODY=8BITMIME"]) is None


def test_failure_throttle_blocks_after_the_limit_and_forgets_after_the_window() -> None:
    throttle = FailureThrottle(limit=5, window_s=60)
    for i in range(4):
        throttle.record_failure("1.2.3.4", now=float(i))
    assert not throttle.is_blocked("1.2.3.4", now=4.0)
    throttle.record_failure("1.2.3.4", now=4.0)
    assert throttle.is_blocked("1.2.3.4", now=5.0)
    assert not throttle.is_blocked("5.6.7.8", now=5.0)
    assert not throttle.is_blocked("1.2.3.4", now=60.5)


def test_send_limiter_rate_and_daily_limits() -> None:
    limiter = SendLimiter(rate_per_second=2, daily_limit=None)
    assert [limiter.try_acquire(100.0) for _ in range(3)] == [None, None, "rate"]
    assert limiter.try_acquire(100.6) is None  # 1.2 tokens refilled
    daily = SendLimiter(rate_per_second=None, daily_limit=2)
    assert [daily.try_acquire(10.0) for _ in range(3)] == [None, None, "daily"]
    assert daily.try_acquire(86400.0 + 10) is None  # a new UTC day


_path_chars = st.sampled_from([*"abcXYZ019.-+_=!#'\"@<> ()[]:,;\\", "\u00e9", "\t"])


@settings(max_examples=400, deadline=None)
@given(
    local=st.text(_path_chars, min_size=0, max_size=12),
    domain=st.text(_path_chars, min_size=0, max_size=12),
    params=st.sampled_from(["", " SIZE=100", "  SIZE=1 BODY=8BITMIME ", "SIZE=1"]),
    space=st.sampled_from(["", " "]),
)
def test_the_fast_address_parser_answers_as_aiosmtpd_does(
    local: str, domain: str, params: str, space: str
) -> None:
    server = MailgateSMTP.__new__(MailgateSMTP)
    server.local_part_limit = 0
    arg = f"{space}<{local}@{domain}>{params}"
    try:
        expected = SMTP._getaddr(server, arg)
    except Exception:  # aiosmtpd trips on some input ("<0@[>"): ours calls it unparseable
        expected = (None, None)
    assert server._getaddr(arg) == expected
