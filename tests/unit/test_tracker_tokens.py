"""Tracking tokens and redirect rules (pure)."""

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailgate_core.tracking import TokenError, TokenPayload, TokenSigner
from mailgate_tracker.handlers import legacy_host_allowed, redirect_location

MID = "01JABCDEFGHJKMNPQRSTVWXYZ0"
signer = TokenSigner(["first-secret-0123456789"])


def test_tokens_round_trip_for_every_kind() -> None:
    url = "https://example.com/path?a=1&b=ä#frag"
    assert signer.verify(signer.make_open_token(MID)) == TokenPayload("open", MID)
    assert signer.verify(signer.make_unsub_token(MID)) == TokenPayload("unsubscribe", MID)
    assert signer.verify(signer.make_click_token(MID, url)) == TokenPayload("click", MID, url)


def test_tokens_are_compact_and_url_safe() -> None:
    token = signer.make_click_token(MID, "https://example.com/")
    # version, kind, 16-byte ULID, 16-byte MAC = 34 bytes = 46 base64url characters
    assert len(signer.make_open_token(MID)) == 46
    assert len(token) == -(-(34 + len("https://example.com/")) * 4 // 3)  # the URL, no more
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _v1_token(secret: str, kind: bytes, mailgate_id: str, url: str = "") -> str:
    data = b"\x01" + kind + bytes([len(mailgate_id)]) + mailgate_id.encode() + url.encode()
    mac = hmac.new(secret.encode(), b"mailgate-track\x00" + data, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(data + mac).rstrip(b"=").decode()


def test_version_1_tokens_still_verify() -> None:
    secret = "first-secret-0123456789"
    assert signer.verify(_v1_token(secret, b"o", MID)) == TokenPayload("open", MID)
    url = "https://example.com/a"
    assert signer.verify(_v1_token(secret, b"c", MID, url)) == TokenPayload("click", MID, url)
    assert signer.verify(_v1_token("wrong", b"o", MID)) is None


@pytest.mark.parametrize(
    "mailgate_id",
    ["legacy-42", MID.lower(), "ZZZZZZZZZZZZZZZZZZZZZZZZZZ", "письмо-1"],  # not canonical ULIDs
)
def test_ids_that_are_not_canonical_ulids_round_trip_unchanged(mailgate_id: str) -> None:
    token = signer.make_unsub_token(mailgate_id)
    assert signer.verify(token) == TokenPayload("unsubscribe", mailgate_id)


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_every_ulid_round_trips_through_the_binary_form(value: int) -> None:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    mid = "".join(alphabet[(value >> (5 * i)) & 31] for i in reversed(range(26)))
    assert signer.verify(signer.make_open_token(mid)) == TokenPayload("open", mid)


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


def test_legacy_redirects_only_to_allow_listed_http_hosts() -> None:
    hosts = {"shop.example.com"}
    assert legacy_host_allowed("https://shop.example.com/x?y=1", hosts)
    assert legacy_host_allowed("http://SHOP.example.com./", hosts)
    assert not legacy_host_allowed("https://evil.example.net/", hosts)
    assert not legacy_host_allowed("https://shop.example.com.evil.net/", hosts)
    assert not legacy_host_allowed("javascript:alert(1)", hosts)
    assert not legacy_host_allowed("", hosts)


def test_redirect_location_keeps_signed_ascii_urls_and_encodes_the_rest() -> None:
    plain = "https://example.com/a?b=1&c=%20x#frag"
    assert redirect_location(plain) == plain
    assert redirect_location("https://example.com/ä") == "https://example.com/%C3%A4"
    injected = redirect_location("https://example.com/x\r\nSet-Cookie: a=b")
    assert injected is not None and "\r" not in injected and "\n" not in injected
    for bad in ("javascript:alert(1)", "ftp://example.com/", "https://", "//example.com/x", ""):
        assert redirect_location(bad) is None, bad
