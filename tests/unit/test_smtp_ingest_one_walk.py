"""handle_DATA's pure pipeline (handlers._inspect + render_copy) walks the MIME tree once and
keeps the body where it was received: the attachment check's strict walk is reused by the
body plan, and the plan's untouched bytes are views into the message, not copies.

Pinned here: the shared walk gives the very copy an independent walk gives (attached
messages, stripped Content-* headers, odd input), and a 10 MB message costs about one
extra copy of itself (the recipient's copy) in Python memory."""

from __future__ import annotations

import base64
import os
import tracemalloc

import pytest
from mailgate_core.tracking import TokenSigner
from mailgate_smtp_ingest.handlers import _inspect
from mailgate_smtp_ingest.mime import split_multipart
from mailgate_smtp_ingest.rewrite import HeaderRules, prepare
from mailgate_smtp_ingest.tracking_rewrite import TrackingLinks, plan_message, render_copy

LINKS = TrackingLinks("https://t.example.net", TokenSigner(["one-walk-secret"]))
MID = "01J0000000000000000000WALK1"
HEAD = b"From: news@shop.example.com\r\nTo: a@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
MB = 1024 * 1024

HTML = b"Content-Type: text/html\r\n\r\n<a href='https://x.example/a'>a</a>[Unsubscribe]\r\n"
FORWARDED = (
    b"Content-Type: message/rfc822\r\n\r\n"
    b"From: old@example.org\r\nContent-Type: text/html\r\n\r\n"
    b"<a href='https://inner.example/'>inside the attached message</a>\r\n"
)
MESSAGES = {
    "alternative with an attached message": HEAD
    + b"Content-Type: multipart/mixed; boundary=B\r\n\r\npreamble\r\n--B\r\n"
    + HTML
    + b"--B\r\n"
    + FORWARDED
    + b"--B--\r\nepilogue\r\n",
    "single html part": HEAD + HTML,
    "no body": HEAD,
    "a stray header line": HEAD + b"not a header\r\n" + HTML,
    "bare LF": (HEAD + HTML).replace(b"\r\n", b"\n"),
    "campaign header stripped": HEAD + b"X-AMS-Campaign-ID: 7\r\n" + HTML,
}


def copies(raw: bytes, rules: HeaderRules) -> tuple[bytes, bytes]:
    """(the copy by _inspect's shared walk, the copy by an independent plan)."""
    inspected = _inspect(raw, rules, LINKS)
    assert inspected.plan is not None
    shared, _ = render_copy(inspected.plan, LINKS, mailgate_id=MID, domain="d", tracking=True)
    own_plan = plan_message(prepare(inspected.prepared.source, rules), LINKS)
    own, _ = render_copy(own_plan, LINKS, mailgate_id=MID, domain="d", tracking=True)
    return shared, own


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_the_shared_walk_renders_what_an_independent_walk_renders(name: str) -> None:
    shared, own = copies(MESSAGES[name], HeaderRules())
    assert shared == own
    assert b"Message-ID: <" + MID.encode() + b"@d>" in shared


def test_links_inside_an_attached_message_stay_as_received() -> None:
    shared, _ = copies(MESSAGES["alternative with an attached message"], HeaderRules())
    assert b"<a href='https://inner.example/'>" in shared  # not a part the plan rewrites
    assert b"https://x.example/a" not in shared  # the top-level html link is tracked


def test_a_rule_stripping_content_headers_plans_on_what_is_left() -> None:
    rules = HeaderRules(strip_prefixes=("X-AMS-", "Content-Type"))
    shared, own = copies(MESSAGES["alternative with an attached message"], rules)
    assert shared == own
    assert b"Content-Type: multipart" not in shared.split(b"\r\n\r\n", 1)[0]


def peak_over_input(raw: bytes) -> float:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        inspected = _inspect(raw, HeaderRules(), LINKS)
        assert inspected.plan is not None
        copy, fell_back = render_copy(
            inspected.plan, LINKS, mailgate_id=MID, domain="d", tracking=True
        )
        assert not fell_back and len(copy) > len(raw)
        return (tracemalloc.get_traced_memory()[1] - base) / len(raw)
    finally:
        tracemalloc.stop()


def test_a_10_mb_message_costs_one_copy_of_itself_whatever_holds_the_bulk() -> None:
    preamble = (
        HEAD
        + b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
        + (b"x" * 998 + b"\r\n") * 10_000
        + b"--B\r\n"
        + HTML
        + b"--B--\r\n"
    )
    attachment = (
        HEAD
        + b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        + HTML
        + b"--B\r\nContent-Type: application/pdf; name=a.pdf\r\n"
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(os.urandom(7 * MB)).replace(b"\n", b"\r\n")
        + b"--B--\r\n"
    )
    html_part = (
        HEAD
        + b"Content-Type: text/html; charset=utf-8\r\n\r\n<html><body>"
        + (b"<p>" + b"z" * 900 + b"</p>\r\n") * 11_000
        + b"<a href='https://x.example/'>x</a></body></html>\r\n"
    )
    for raw in (preamble, attachment, html_part):
        assert len(raw) > 9 * MB
        # the recipient's copy, plus a little; it was 4-5x before the body stayed in place
        assert peak_over_input(raw) < 1.3


def test_large_buffers_are_mapped_so_freeing_them_returns_the_memory() -> None:
    import platform

    from mailgate_smtp_ingest.memory import release_large_buffers_promptly

    applied = release_large_buffers_promptly()
    if platform.libc_ver()[0] == "glibc":
        assert applied  # the service's build() relies on it (bench_smtp's 10 MB row)


@pytest.mark.parametrize(
    ("body", "parts"),
    [
        # preamble, two parts, close delimiter, epilogue
        (b"pre\r\n--b\r\none\r\n--b\r\ntwo\r\n--b--\r\nepilogue", [b"one", b"two"]),
        # transport padding after a delimiter; bare LF line ends
        (b"--b \t\nx\n--b--\t\n", [b"x"]),
        # "--b" inside a line, or followed by more text, is not a delimiter
        (b"--b\r\nsee --b\r\n--bx\r\nstill one\r\n--b--", [b"see --b\r\n--bx\r\nstill one"]),
        # no close delimiter: the last part runs to the end (as the email package does)
        (b"--b\r\nonly\r\n", [b"only\r\n"]),
        # a delimiter at the very end of the body
        (b"--b\r\na\r\n--b", [b"a", b""]),
        (b"no delimiter at all", []),
    ],
)
def test_multipart_bodies_split_at_delimiter_lines_only(body: bytes, parts: list[bytes]) -> None:
    buf = b"HEAD\r\n" + body
    spans = split_multipart(buf, 6, len(buf), "b")
    assert [buf[a:b] for a, b in spans] == parts
