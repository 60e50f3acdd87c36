"""The tracker's per-request checks against plain reference versions of the same rules:
token verification (base64url, HMAC, binary ULID, the strict variant and its acceptance
time), the user-agent verdict memo, the user-agent text and event ids (pure)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st
from mailgate_core.ids import is_ulid, new_ulid, ulid_time_ms
from mailgate_core.tracking import TokenKind, TokenPayload, TokenSigner
from mailgate_tracker.audience import (
    APPLE_MPP,
    HEAD_REQUEST,
    HUMAN,
    NO_USER_AGENT,
    PROXY_NETWORK,
    SCANNER_NETWORK,
    Rules,
    Verdict,
    _agent_verdict,
    classify_click,
    classify_open,
    parse_networks,
)
from mailgate_tracker.handlers import agent_text, clean_text
from mailgate_tracker.ids import EventIds

SECRETS = ["first-secret-0123456789", "second-secret-abcdef"]
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
KINDS: dict[int, TokenKind] = {ord("o"): "open", ord("c"): "click", ord("u"): "unsubscribe"}


def reference_verify(secrets: list[str], token: str) -> TokenPayload | None:
    """The token format of mailgate_core.tracking, decoded the slow, obvious way."""
    if not token or len(token) > 4096:
        return None
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii") + b"=" * (-len(token) % 4))
    except ValueError:  # binascii.Error and UnicodeEncodeError are ValueErrors
        return None
    if len(raw) < 20:
        return None
    data, mac = raw[:-16], raw[-16:]
    macs = [
        hmac.new(s.encode(), b"mailgate-track\x00" + data, hashlib.sha256).digest()[:16]
        for s in secrets
    ]
    if not any(hmac.compare_digest(mac, m) for m in macs):
        return None
    kind = KINDS.get(data[1])
    if kind is None:
        return None
    if data[0] == 2 and len(data) >= 18:
        value = int.from_bytes(data[2:18], "big")
        mailgate_id = "".join(CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))
        rest = data[18:]
    elif data[0] == 1 and data[2] and len(data) >= 3 + data[2]:
        try:
            mailgate_id = data[3 : 3 + data[2]].decode()
        except UnicodeDecodeError:
            return None
        rest = data[3 + data[2] :]
    else:
        return None
    try:
        url = rest.decode()
    except UnicodeDecodeError:
        return None
    if kind == "click":
        return TokenPayload(kind, mailgate_id, url) if url else None
    return TokenPayload(kind, mailgate_id) if not url else None


def sign(secret: str, data: bytes) -> str:
    mac = hmac.new(secret.encode(), b"mailgate-track\x00" + data, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(data + mac).rstrip(b"=").decode()


token_data = st.builds(
    lambda version, kind, body: bytes([version, kind]) + body,
    st.sampled_from([0, 1, 2, 3]),
    st.sampled_from([ord("o"), ord("c"), ord("u"), ord("x")]),
    st.one_of(
        st.binary(max_size=60),
        st.builds(
            lambda ulid, url: ulid + url,
            st.binary(min_size=16, max_size=16),
            st.one_of(st.just(b""), st.text(max_size=30).map(str.encode), st.binary(max_size=8)),
        ),
    ),
)


@given(token_data, st.sampled_from([*SECRETS, "not-ours"]))
def test_verify_agrees_with_the_reference_for_signed_and_foreign_tokens(
    data: bytes, secret: str
) -> None:
    token = sign(secret, data)
    for secrets in (SECRETS[:1], SECRETS):  # one key (its own fast path) and a rotation
        assert TokenSigner(secrets).verify(token) == reference_verify(secrets, token)


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/ é"))
def test_verify_agrees_with_the_reference_on_any_text(token: str) -> None:
    for secrets in (SECRETS[:1], SECRETS):
        assert TokenSigner(secrets).verify(token) == reference_verify(secrets, token)


URLSAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def reference_details(
    secrets: list[str], token: str
) -> tuple[TokenKind, str, str | None, int | None] | None:
    """``verify_details``: the reference payload of a token made of base64url characters
    only, with the acceptance time of a version-2 (binary ULID) token."""
    payload = reference_verify(secrets, token) if set(token) <= URLSAFE else None
    if payload is None:
        return None
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    accepted_ms = int.from_bytes(raw[2:8], "big") if raw[0] == 2 else None
    return (payload.kind, payload.mailgate_id, payload.url, accepted_ms)


@given(token_data, st.sampled_from([*SECRETS, "not-ours"]), st.sampled_from(["", "=", "%41", "+"]))
def test_verify_details_agrees_with_the_reference_and_refuses_anything_but_base64url(
    data: bytes, secret: str, suffix: str
) -> None:
    token = sign(secret, data) + suffix
    for secrets in (SECRETS[:1], SECRETS):
        assert TokenSigner(secrets).verify_details(token) == reference_details(secrets, token)


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/%? é"))
def test_verify_details_agrees_with_the_reference_on_any_text(token: str) -> None:
    assert TokenSigner(SECRETS).verify_details(token) == reference_details(SECRETS, token)


def test_verify_details_refuses_what_verify_skips_and_reads_the_acceptance_time() -> None:
    signer = TokenSigner(SECRETS)
    mid = new_ulid(1_700_000_000_123)
    token = signer.make_click_token(mid, "https://a.example/x?y=1")
    assert signer.verify_details(token) == (
        "click",
        mid,
        "https://a.example/x?y=1",
        ulid_time_ms(mid),
    )
    assert signer.verify_details(signer.make_open_token("AMS-7")) == ("open", "AMS-7", None, None)
    for padded in (token + "=", f"{token[:5]}%{token[5:]}", f"{token} "):
        assert signer.verify(padded) is not None  # verify skips what is not base64
        assert signer.verify_details(padded) is None
    assert signer.verify_details(token + "?utm=1") is None
    urlsafe = next(t for t in (signer.make_open_token(new_ulid()) for _ in range(500)) if "-" in t)
    standard = urlsafe.replace("-", "+")  # the same bytes in the standard alphabet
    assert signer.verify(standard) == signer.verify(urlsafe) is not None
    assert signer.verify_details(standard) is None and signer.verify_details(urlsafe)
    assert signer.verify_details(token, strict=False) is not None
    assert signer.verify_details(token + "=", strict=False) is not None


@given(st.integers(min_value=0, max_value=2**128 - 1), st.sampled_from(["open", "click"]))
def test_binary_ulids_decode_to_their_26_characters(value: int, kind: str) -> None:
    mid = "".join(CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))
    signer = TokenSigner(SECRETS)
    token = signer.make_click_token(mid, "https://a.example/") if kind == "click" else None
    token = token or signer.make_open_token(mid)
    payload = signer.verify(token)
    assert payload is not None and payload.mailgate_id == mid


RULES = Rules(
    scanner_networks=parse_networks(["198.51.100.0/24"]),
    prefetch_networks=parse_networks(["17.0.0.0/8"]),
    early_click_s=0.0,
)
AGENTS = [
    None,
    "",
    "   ",
    "Mozilla/5.0",
    " MOZILLA/5.0 ",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0",
    "curl/8.5.0",
    "  CURL/8.5.0",
    "Barracuda Sentinel",
    "GoogleImageProxy",
    "x\u00a0",
]


def reference_verdict(method: str, agent: str | None, ip: str | None, *, click: bool) -> Verdict:
    """classify_open/classify_click's shared rules without any memo of the header."""
    if method.upper() == "HEAD":
        return HEAD_REQUEST
    scanner, prefetch = RULES.networks_of(ip)
    if scanner:
        return SCANNER_NETWORK
    lowered = (agent or "").strip().lower()
    by_agent = _agent_verdict(RULES, lowered, click=click) if lowered else None
    if by_agent is not None:
        return by_agent
    if prefetch:
        return PROXY_NETWORK if click else APPLE_MPP
    return HUMAN if (agent or "").strip() else NO_USER_AGENT


@given(
    st.sampled_from(["GET", "get", "HEAD", "head", "Head"]),
    st.one_of(st.sampled_from(AGENTS), st.text(max_size=20)),
    st.sampled_from([None, "203.0.113.9", "198.51.100.7", "17.1.2.3", "bad"]),
)
def test_verdicts_from_remembered_headers_equal_the_unremembered_rules(
    method: str, agent: str | None, ip: str | None
) -> None:
    for _ in range(2):  # the second time from the memo
        assert classify_open(RULES, method, agent, ip) == reference_verdict(
            method, agent, ip, click=False
        )
        assert classify_click(
            RULES, method, agent, ip, mailgate_id=None, now_s=0.0
        ) == reference_verdict(method, agent, ip, click=True)


@given(
    st.sampled_from(["GET", "HEAD"]),
    st.sampled_from(AGENTS),
    st.one_of(st.builds(new_ulid), st.sampled_from(["AMS-7", "01arz3ndektsv4rrffq69g5fav"])),
    st.floats(min_value=0, max_value=4e9),
    st.integers(min_value=0, max_value=3),
)
def test_a_click_verdict_from_the_tokens_acceptance_time_equals_the_one_from_its_id(
    method: str, agent: str | None, mid: str, now: float, others: int
) -> None:
    rules = Rules(early_click_s=30.0)
    accepted_ms = ulid_time_ms(mid) if mid.isupper() and is_ulid(mid) else None
    args = (rules, method, agent, "203.0.113.9")
    from_id = classify_click(*args, mailgate_id=mid, now_s=now, other_links_clicked=others)
    from_token = classify_click(
        *args, mailgate_id=mid, now_s=now, other_links_clicked=others, accepted_ms=accepted_ms
    )
    assert from_token == from_id


@given(st.one_of(st.none(), st.text(max_size=600), st.sampled_from(AGENTS)))
def test_agent_text_equals_the_plain_cut_and_clean(agent: str | None) -> None:
    assert agent_text(agent) == (clean_text(agent[:512]) if agent else None)


@given(st.lists(st.floats(min_value=0, max_value=2**48 / 1000 - 1), min_size=1, max_size=50))
def test_event_ids_carry_the_millisecond_they_were_made_in(times: list[float]) -> None:
    ids = EventIds()
    for now in sorted(times):
        made = ids(now)
        assert is_ulid(made) and ulid_time_ms(made) == int(now * 1000)


def test_the_header_memo_is_bounded() -> None:
    rules = Rules()
    for i in range(10_000):
        classify_open(rules, "GET", f"agent {i}", None)
    assert 0 < len(rules._open_agents) <= 4096


def test_submit_batched_queues_like_submit_and_drops_when_full_or_closing() -> None:
    from mailgate_core.schemas import TrackClick
    from mailgate_tracker.publisher import BufferMetrics, EventBuffer
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    buffer = EventBuffer(js=None, metrics=BufferMetrics.create(registry), capacity=2)  # type: ignore[arg-type]
    click = TrackClick(url="https://a.example/", mailgate_id="m")
    assert buffer.submit_batched(click) and buffer.submit_batched(click)
    assert len(buffer) == 2 and buffer.full
    assert not buffer.submit_batched(click)
    buffer._pending.clear()
    buffer._closing = True
    assert not buffer.submit_batched(click)
    dropped = {
        sample.labels["reason"]: sample.value
        for family in registry.collect()
        if family.name == "mailgate_tracker_events_dropped"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert dropped == {"buffer_full": 1.0, "shutdown": 1.0}
    assert len(buffer) == 0
