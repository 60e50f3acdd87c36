"""The operator console's pure rules: throttling, CSRF comparison, HTTPS detection, client
address, language choice, the headers a message page lists, templates that render."""

from __future__ import annotations

import pytest
from mailgate_ledger.console import auth
from mailgate_ledger.console.i18n import RU, pick_language, translator
from mailgate_ledger.console.views import _safe_next, headers_we_set, make_environment


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_username_is_locked_after_its_failures_until_the_window_passes() -> None:
    clock = Clock()
    throttle = auth.LoginThrottle(max_failures_per_user=3, max_failures_per_ip=10, clock=clock)
    for _ in range(3):
        assert throttle.retry_after_s("10.0.0.1", "Alice") == 0
        throttle.failed("10.0.0.1", "Alice")
    assert throttle.retry_after_s("10.0.0.2", "alice") == pytest.approx(900)  # any address
    assert throttle.retry_after_s("10.0.0.1", "bob") == 0  # other users are not locked out
    clock.now += 901
    assert throttle.retry_after_s("10.0.0.1", "alice") == 0


def test_an_address_spraying_usernames_is_locked_too() -> None:
    clock = Clock()
    throttle = auth.LoginThrottle(max_failures_per_user=3, max_failures_per_ip=5, clock=clock)
    for index in range(5):
        throttle.failed("10.0.0.9", f"user{index}")
    assert throttle.retry_after_s("10.0.0.9", "new-user") > 0
    assert throttle.retry_after_s("10.0.0.8", "new-user") == 0


def test_a_success_clears_the_username_but_not_the_address() -> None:
    throttle = auth.LoginThrottle(max_failures_per_user=2, max_failures_per_ip=3, clock=Clock())
    throttle.failed("10.0.0.1", "alice")
    throttle.failed("10.0.0.1", "alice")
    throttle.succeeded("alice")
    assert throttle.retry_after_s("10.0.0.2", "alice") == 0
    throttle.failed("10.0.0.1", "carol")
    assert throttle.retry_after_s("10.0.0.1", "dave") > 0


def test_csrf_tokens_must_be_present_and_equal() -> None:
    assert auth.csrf_ok("abc", "abc")
    assert not auth.csrf_ok("abc", "abd")
    assert not auth.csrf_ok("abc", None)
    assert not auth.csrf_ok(None, "abc")
    assert not auth.csrf_ok("", "")


def test_https_is_tls_or_a_trusted_proxy_header() -> None:
    https = {"X-Forwarded-Proto": "https"}
    assert auth.is_https(secure_transport=True, headers={}, trust_proxy=False)
    assert not auth.is_https(secure_transport=False, headers=https, trust_proxy=False)
    assert auth.is_https(secure_transport=False, headers=https, trust_proxy=True)
    assert not auth.is_https(
        secure_transport=False, headers={"X-Forwarded-Proto": "http"}, trust_proxy=True
    )


def test_the_client_address_comes_from_the_proxy_only_when_trusted() -> None:
    headers = {"X-Forwarded-For": "198.51.100.7, 10.0.0.1"}
    assert auth.client_ip("10.0.0.1", headers, trust_proxy=True) == "198.51.100.7"
    assert auth.client_ip("10.0.0.1", headers, trust_proxy=False) == "10.0.0.1"


def test_cookie_options_are_httponly_lax_and_scoped() -> None:
    options = auth.cookie_options(secure=True, max_age_s=60)
    assert options == {
        "httponly": True,
        "samesite": "Lax",
        "secure": True,
        "path": "/console",
        "max_age": 60,
    }


def test_language_comes_from_the_cookie_then_the_browser() -> None:
    assert pick_language("ru", "en-US") == "ru"
    assert pick_language(None, "ru-RU,ru;q=0.9,en;q=0.8") == "ru"
    assert pick_language(None, "de-DE,en;q=0.5") == "en"
    assert pick_language("xx", "") == "en"
    assert translator("ru")("Sign in") == "Войти"
    assert translator("ru")("hard_bounced") == "жёсткий отказ"
    assert translator("en")("hard_bounced") == "hard bounced"


def test_every_russian_template_string_is_translated() -> None:
    import re
    from importlib.resources import files

    folder = files("mailgate_ledger") / "console" / "templates"
    used: set[str] = set()
    for entry in folder.iterdir():
        used |= set(re.findall(r'(?<![\w.])t\("([^"]+)"\)', entry.read_text("utf-8")))
    missing = sorted(text for text in used if text not in RU)
    assert missing == []


def test_redirects_stay_inside_the_console() -> None:
    assert _safe_next("/console/messages?id=1") == "/console/messages?id=1"
    for hostile in ("https://evil.example/", "//evil.example/console/", "/v1/accounts", None):
        assert _safe_next(hostile) == "/console/"


def test_the_headers_we_set_name_the_message_and_campaign() -> None:
    message = {"mailgate_id": "01JABC", "campaign_id": "73"}
    assert headers_we_set(message, "mg.example.com") == [
        ("Message-ID", "<01JABC@mg.example.com>"),
        ("X-Postal-Tag", "73"),
        ("X-Postmaster-Msgtype", "73"),
    ]
    assert headers_we_set({"mailgate_id": "01JABC", "campaign_id": None}, "d") == [
        ("Message-ID", "<01JABC@d>")
    ]


def test_templates_escape_what_they_show() -> None:
    env = make_environment()
    html = env.get_template("error.html").render(
        t=lambda s: s,
        lang="en",
        languages=("en", "ru"),
        op=None,
        csrf="",
        path="/console/",
        grafana_url="",
        notice=None,
        prefix="/console",
        title="Error",
        detail="<script>alert(1)</script>",
    )
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
