"""A campaign's recipients get one message each, with its own boundaries and Message-ID but
the same text and HTML parts: smtp-ingest reads such a part (decode, find the links) once
and remembers its template (tracking_rewrite._shared_part_template). Pinned here: a copy
rendered from a remembered template is byte for byte the copy rendered without the memo,
a part whose bytes, encoding or tracker differ gets its own template, and a remembered
template holds no view into the message buffer it was read from."""

from __future__ import annotations

from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

import pytest
from mailgate_core.tracking import TokenSigner
from mailgate_smtp_ingest import tracking_rewrite
from mailgate_smtp_ingest.rewrite import HeaderRules, normalize_line_endings, prepare
from mailgate_smtp_ingest.tracking_rewrite import TrackingLinks, plan_message, render_copy

SIGNER = TokenSigner(["unit-test-secret"])
LINKS = TrackingLinks("https://t.mg.example.net", SIGNER)
OTHER_LINKS = TrackingLinks("https://t.other.example", SIGNER)
MID = "01HZZZZZZZZZZZZZZZZZZZZZZZ"
MEMO = tracking_rewrite._shared_part_template


def campaign(
    serial: int, *, html_text: str = "Скидки недели", cte: str = "quoted-printable"
) -> bytes:
    """One recipient's message: its own boundary and Message-ID, the campaign's parts."""
    msg = EmailMessage()
    msg["From"] = "Shop <news@shop.example.com>"
    msg["To"] = f"r{serial}@example.org"
    msg["Subject"] = "Скидки"
    msg["Message-ID"] = f"<c-{serial}@shop.example.com>"
    msg.set_content("Привет!\n" + "Отписаться: " + "[Unsubscribe]\n", cte=cte)
    msg.add_alternative(
        f"<html><body><p>{html_text}</p>"
        '<a href="https://shop.example.com/sale?a=1&amp;b=2">Sale</a> '
        '<a href="https://t.other.example/track/c/x">other tracker</a> '
        '<a href="[Unsubscribe]">Отписаться</a></body></html>\n',
        subtype="html",
        cte=cte,
    )
    msg.set_boundary(f"=_boundary_{serial:06d}_=")
    return normalize_line_endings(msg.as_bytes(policy=SMTP_POLICY))


def copy_of(raw: bytes, links: TrackingLinks = LINKS) -> bytes:
    plan = plan_message(prepare(raw, HeaderRules()), links)
    assert not plan.fell_back
    out, fell_back = render_copy(plan, links, mailgate_id=MID, domain="d.net", tracking=True)
    assert not fell_back
    return out


@pytest.fixture(autouse=True)
def empty_memo() -> Iterator[None]:
    MEMO.cache_clear()
    yield
    MEMO.cache_clear()


def without_memo(
    raw: bytes, monkeypatch: pytest.MonkeyPatch, links: TrackingLinks = LINKS
) -> bytes:
    with monkeypatch.context() as patch:
        patch.setattr(tracking_rewrite, "SHARED_TEMPLATE_MAX_BYTES", -1)
        return copy_of(raw, links)


@pytest.mark.parametrize("cte", ["quoted-printable", "base64", "8bit"])
def test_the_next_message_of_a_campaign_reuses_the_parts_and_renders_the_same_bytes(
    cte: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = campaign(1, cte=cte), campaign(2, cte=cte)
    assert copy_of(first) == without_memo(first, monkeypatch)
    misses = MEMO.cache_info().misses
    assert misses == 2  # the text and the HTML part
    copy = copy_of(second)
    assert MEMO.cache_info().misses == misses  # both parts came from the memo
    assert MEMO.cache_info().hits >= 2
    assert copy == without_memo(second, monkeypatch)
    assert b"=_boundary_000002_=" in copy and b"=_boundary_000001_=" not in copy


def test_a_personalised_part_gets_its_own_template(monkeypatch: pytest.MonkeyPatch) -> None:
    copy_of(campaign(1, html_text="Hello Ivan"))
    raw = campaign(2, html_text="Hello Maria")
    copy = copy_of(raw)
    assert copy == without_memo(raw, monkeypatch)
    assert MEMO.cache_info().misses == 3  # the HTML part again; the text part is shared
    assert b"Maria" in copy and b"Ivan" not in copy


def test_another_tracker_gets_its_own_template(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = campaign(1)
    ours = copy_of(raw, LINKS)
    other = copy_of(raw, OTHER_LINKS)
    assert other == without_memo(raw, monkeypatch, OTHER_LINKS)
    # each tracker leaves its own links alone and wraps the other one's
    assert b"https://t.other.example/track/c/x" not in ours
    assert b"https://t.other.example/track/c/x" in other


def test_a_remembered_template_holds_no_view_into_the_message() -> None:
    raw = bytearray(campaign(1, cte="8bit"))  # 8bit: the template's literals are views
    copy_of(bytes(raw))
    plan = plan_message(prepare(bytes(raw), HeaderRules()), LINKS)
    assert plan.body is not None
    for part in plan.body.parts:
        for piece in (part.original, *part.literals):
            if isinstance(piece, memoryview):
                assert len(piece.obj) < len(raw), "a view into the whole message"  # type: ignore[arg-type]


def test_large_parts_and_single_part_messages_are_not_remembered() -> None:
    big = campaign(1, html_text="x" * (tracking_rewrite.SHARED_TEMPLATE_MAX_BYTES + 1))
    copy_of(big)
    assert MEMO.cache_info().currsize == 1  # only the small text part
    MEMO.cache_clear()
    single = normalize_line_endings(
        b"From: news@shop.example.com\nMessage-ID: <s-1@shop.example.com>\n\nHi [Unsubscribe]\n"
    )
    assert b"/u/" in copy_of(single)
    assert MEMO.cache_info().currsize == 0  # its header block is the message's: unique
