"""Tracking tokens, audience and legacy redirect rules (pure)."""

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailgate_core.tracking import TokenError, TokenPayload, TokenSigner
from mailgate_tracker.audience import classify_audience
from mailgate_tracker.handlers import legacy_host_allowed

MID = "01JABCDEFGHJKMNPQRSTVWXYZ0"
signer = TokenSigner(["first-secret-0123456789"])


def test_tokens_round_trip_for_every_kind() -> None:
    url = "https://example.com/path?a=1&b=ä#frag"
    assert signer.verify(signer.make_open_token(MID)) == TokenPayload("open", MID)
    assert signer.verify(signer.make_unsub_token(MID)) == TokenPayload("unsubscribe", MID)
    assert signer.verify(signer.make_click_token(MID, url)) == TokenPayload("click", MID, url)


def test_tokens_are_compact_and_url_safe() -> None:
    token = signer.make_click_token(MID, "https://example.com/")
    assert len(signer.make_open_token(MID)) <= 64
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_any_changed_byte_is_rejected() -> None:
    token = signer.make_click_token(MID, "https://example.com/a")
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    for i in range(len(raw)):
        tampered = bytearray(raw)
        tampered[i] ^= 0x01
        forged = base64.urlsafe_b64encode(bytes(tampered)).rstrip(b"=").decode()
        assert signer.verify(forged) is None, f"byte {i} change accepted"


def test_a_token_signed_with_another_secret_is_rejected() -> None:
    other = TokenSigner(["someone-else"])
    assert signer.verify(other.make_open_token(MID)) is None


def test_rotation_first_secret_signs_and_all_verify() -> None:
    old = TokenSigner(["old-secret"])
    rotated = TokenSigner(["new-secret", "old-secret"])
    assert rotated.verify(old.make_open_token(MID)) == TokenPayload("open", MID)
    assert old.verify(rotated.make_open_token(MID)) is None


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(TokenError):
        signer.make_open_token("")
    with pytest.raises(TokenError):
        signer.make_click_token(MID, "")
    with pytest.raises(ValueError):
        TokenSigner(["", ""])
    assert signer.verify("") is None
    assert signer.verify("x" * 5000) is None
    assert signer.verify("not base64 ☃") is None


@given(st.text(max_size=200))
def test_verify_never_raises(garbage: str) -> None:
    assert signer.verify(garbage) is None


def test_audience_marks_head_and_bots_as_scanner() -> None:
    assert classify_audience("HEAD", "Mozilla/5.0") == "scanner"
    assert classify_audience("GET", "Mozilla/5.0 (compatible; Googlebot/2.1)") == "scanner"
    assert classify_audience("GET", "curl/8.5.0") == "scanner"
    assert classify_audience("GET", "Mozilla/5.0 (Windows NT 10.0) Firefox/128.0") == "unknown"
    assert classify_audience("GET", None) == "unknown"


def test_legacy_redirects_only_to_allow_listed_http_hosts() -> None:
    hosts = {"shop.example.com"}
    assert legacy_host_allowed("https://shop.example.com/x?y=1", hosts)
    assert legacy_host_allowed("http://SHOP.example.com./", hosts)
    assert not legacy_host_allowed("https://evil.example.net/", hosts)
    assert not legacy_host_allowed("https://shop.example.com.evil.net/", hosts)
    assert not legacy_host_allowed("javascript:alert(1)", hosts)
    assert not legacy_host_allowed("", hosts)
