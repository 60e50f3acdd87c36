"""Machine-traffic classification and derived event ids (pure)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailgate_core.ids import is_ulid, new_ulid, ulid_time_ms
from mailgate_tracker.audience import (
    ClickHistory,
    Rules,
    Verdict,
    accepted_age_s,
    classify_click,
    classify_open,
    parse_networks,
)
from mailgate_tracker.ids import unsubscribe_event_id

NOW = 1_750_000_000.0
OLD_MID = new_ulid(int((NOW - 3600) * 1000))  # accepted an hour before NOW
FRESH_MID = new_ulid(int((NOW - 5) * 1000))  # accepted five seconds before NOW
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"
GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
YAHOO = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
YANDEX = "Mozilla/5.0 (compatible; YandexImageResizer/2.0; +http://yandex.com/bots)"
RULES = Rules(scanner_networks=parse_networks(["198.51.100.0/24"]))


@pytest.mark.parametrize(
    ("method", "agent", "ip", "expected"),
    [
        ("GET", CHROME, "203.0.113.9", Verdict("human")),
        ("GET", IPHONE, "2001:db8::1", Verdict("human")),
        ("GET", GMAIL, "66.249.84.1", Verdict("prefetch", "gmail_proxy")),
        ("GET", YAHOO, "203.0.113.9", Verdict("prefetch", "yahoo_proxy")),
        ("GET", YANDEX, "203.0.113.9", Verdict("prefetch", "yandex_proxy")),  # not "bot"
        ("GET", "Mozilla/5.0", "104.28.1.1", Verdict("prefetch", "apple_mpp")),
        ("GET", IPHONE, "17.58.1.2", Verdict("prefetch", "apple_mpp")),  # Apple's network
        ("HEAD", CHROME, "203.0.113.9", Verdict("scanner", "head_request")),
        ("GET", CHROME, "198.51.100.7", Verdict("scanner", "scanner_network")),
        ("GET", "Barracuda Sentinel (EE)", "203.0.113.9", Verdict("scanner", "scanner_user_agent")),
        (
            "GET",
            "Mozilla/5.0 (compatible; Googlebot/2.1)",
            None,
            Verdict("scanner", "bot_user_agent"),
        ),
        ("GET", "curl/8.5.0", "203.0.113.9", Verdict("scanner", "bot_user_agent")),
        ("GET", None, "203.0.113.9", Verdict("unknown", "no_user_agent")),
        ("GET", "  ", "not-an-ip", Verdict("unknown", "no_user_agent")),
    ],
)
def test_open_classification(method: str, agent: str | None, ip: str | None, expected) -> None:
    assert classify_open(RULES, method, agent, ip) == expected


def click(agent: str | None = CHROME, *, mid: str | None = OLD_MID, ip: str = "203.0.113.9",
          method: str = "GET", others: int = 0, rules: Rules = RULES) -> Verdict:  # fmt: skip
    return classify_click(
        rules, method, agent, ip, mailgate_id=mid, now_s=NOW, other_links_clicked=others
    )


def test_a_person_clicking_a_link_an_hour_later_is_human() -> None:
    assert click() == Verdict("human")


def test_known_scanners_are_scanners_whatever_the_timing() -> None:
    assert click("Mozilla/5.0 (compatible; BingPreview/1.0b)") == Verdict(
        "scanner", "scanner_user_agent"
    )
    assert click("Proofpoint URL Defense") == Verdict("scanner", "scanner_user_agent")
    assert click("MIMECAST-URL-PROTECT") == Verdict("scanner", "scanner_user_agent")
    assert click(method="HEAD") == Verdict("scanner", "head_request")
    assert click(ip="198.51.100.1") == Verdict("scanner", "scanner_network")


def test_configured_scanner_agents_are_matched_case_insensitively() -> None:
    rules = Rules(scanner_agents=(*RULES.scanner_agents, "acmeguard"))
    assert click("AcmeGuard/3.1", rules=rules) == Verdict("scanner", "scanner_user_agent")


def test_proxies_following_links_are_checking_them_not_prefetching() -> None:
    assert click(YAHOO) == Verdict("scanner", "yahoo_proxy")
    assert click("Mozilla/5.0") == Verdict("scanner", "bare_user_agent")
    assert click(ip="17.1.2.3") == Verdict("scanner", "proxy_network")


def test_a_click_seconds_after_acceptance_is_a_scanner() -> None:
    assert click(mid=FRESH_MID) == Verdict("scanner", "early_click")
    assert click(mid=FRESH_MID, rules=Rules(early_click_s=0)) == Verdict("human")
    assert click(mid=FRESH_MID, rules=Rules(early_click_s=4)) == Verdict("human")
    assert click(mid="AMS-7") == Verdict("human")  # not a ULID: no acceptance time known
    assert click(mid=None) == Verdict("human")


_ULID_LIKE = st.text(
    alphabet="0123456789ABCDEFGHJKMNPQRSTVWXYZabcdefghjkmnpqrstvwxyzILOUilou!\u017f\u0131\xe9 ",
    min_size=24,
    max_size=28,
)


@given(st.one_of(_ULID_LIKE, st.builds(new_ulid)))
def test_the_acceptance_time_is_read_from_any_ulid_and_only_from_ulids(mid: str) -> None:
    expected = NOW - ulid_time_ms(mid) / 1000.0 if is_ulid(mid) else None
    assert accepted_age_s(mid, NOW) == expected


def test_other_links_clicked_in_the_burst_window_make_a_scanner() -> None:
    assert click(others=1) == Verdict("scanner", "click_burst")
    assert click(None) == Verdict("unknown", "no_user_agent")


def test_click_history_counts_other_links_within_the_window_only() -> None:
    history = ClickHistory(window_s=2.0)
    assert history.record("m1", "https://a/", NOW) == 0
    assert history.record("m1", "https://a/", NOW + 0.5) == 0  # a double click is one link
    assert history.record("m1", "https://b/", NOW + 1.0) == 1
    assert history.record("m1", "https://c/", NOW + 1.5) == 2
    assert history.record("m2", "https://z/", NOW + 1.5) == 0  # another message
    assert history.record("m1", "https://d/", NOW + 60) == 0  # a person reading on


def test_click_history_is_bounded() -> None:
    history = ClickHistory(window_s=2.0, max_messages=3, per_message=4)
    for i in range(10):
        history.record(f"m{i}", "https://a/", NOW)
    assert len(history) == 3
    for i in range(10):
        history.record("busy", f"https://x/{i}", NOW)
    assert history.record("busy", "https://y/", NOW) == 4  # only the last 4 are kept


def test_bad_networks_are_refused_with_their_text() -> None:
    with pytest.raises(ValueError, match=re.escape("'10.0.0.0/33'")):
        parse_networks(["10.0.0.0/33"])
    assert parse_networks(["2001:db8::/32", " 10.1.2.3/8 "])[1].with_prefixlen == "10.0.0.0/8"


def test_unsubscribe_event_ids_are_stable_within_a_window_and_ulid_shaped() -> None:
    first = unsubscribe_event_id(OLD_MID, 1_200.0)
    assert is_ulid(first)
    assert ulid_time_ms(first) == 1_200_000
    assert unsubscribe_event_id(OLD_MID, 1_799.0) == first  # same 10-minute window
    assert unsubscribe_event_id(OLD_MID, 1_800.0) != first  # the next window
    assert unsubscribe_event_id(FRESH_MID, 1_200.0) != first  # another message
