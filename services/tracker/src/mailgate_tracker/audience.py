"""Who fetched a tracking URL: a person (``human``), a mail provider's image proxy fetching
ahead of time (``prefetch``) or a security product checking links (``scanner``).

Pure rules over what one request shows (method, user agent, client IP), the time the message
was accepted (from its ULID mailgate id) and the clicks seen recently on the same message.
``docs/tracking.md`` lists the rules in the order they apply; the first match wins and its
name goes out as ``audience_reason``. A request with no user agent and no other signal is
``unknown``: real mail clients always send one, but we do not call it a machine either.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from mailgate_core.ids import is_ulid, ulid_time_ms
from mailgate_core.schemas import Audience

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Security gateways and link checkers that name themselves (lower-case substrings).
SCANNER_AGENTS: tuple[str, ...] = (
    "barracuda",
    "proofpoint",
    "mimecast",
    "bingpreview",
    "microsoftpreview",
    "safelinks",
    "microsoft-urlanalyzer",
    "forcepoint",
    "symantec",
    "messagelabs",
    "trendmicro",
    "trend micro",
    "sophos",
    "fortiguard",
    "ironport",
    "zscaler",
    "paloalto",
    "checkpoint",
    "avanan",
    "trustwave",
    "spamtitan",
    "appriver",
    "virustotal",
    "urlscan",
    "kaspersky",
    "drweb",
)

#: Generic automation: crawlers, HTTP libraries, headless browsers (lower-case substrings).
BOT_AGENTS: tuple[str, ...] = (
    "bot",
    "crawler",
    "spider",
    "slurp",
    "facebookexternalhit",
    "curl/",
    "wget/",
    "python-requests",
    "python-urllib",
    "python-httpx",
    "aiohttp",
    "go-http-client",
    "java/",
    "okhttp",
    "apache-httpclient",
    "libwww-perl",
    "node-fetch",
    "axios/",
    "headlesschrome",
    "phantomjs",
    "scanner",
)

#: Mail providers' image proxies (lower-case substring -> reason). They fetch the pixel on the
#: recipient's behalf: Gmail and Yandex when the message is opened, Yahoo ahead of time.
PROXY_AGENTS: tuple[tuple[str, str], ...] = (
    ("googleimageproxy", "gmail_proxy"),
    ("ggpht.com", "gmail_proxy"),
    ("yahoomailproxy", "yahoo_proxy"),
    ("yandeximageresizer", "yandex_proxy"),
)

#: Apple Mail Privacy Protection fetches through Apple's relay with a bare user agent.
APPLE_MPP_AGENT = "mozilla/5.0"

#: Apple's own address block; MPP fetches also leave through iCloud Private Relay egress
#: ranges (published by Apple), which operators can add with TRACKER_PREFETCH_NETWORKS.
DEFAULT_PREFETCH_NETWORKS: tuple[str, ...] = ("17.0.0.0/8",)


@dataclass(frozen=True)
class Verdict:
    audience: Audience
    reason: str = ""


HUMAN = Verdict("human")
NO_USER_AGENT = Verdict("unknown", "no_user_agent")
HEAD_REQUEST = Verdict("scanner", "head_request")
SCANNER_NETWORK = Verdict("scanner", "scanner_network")
PROXY_NETWORK = Verdict("scanner", "proxy_network")
APPLE_MPP = Verdict("prefetch", "apple_mpp")
EARLY_CLICK = Verdict("scanner", "early_click")
CLICK_BURST = Verdict("scanner", "click_burst")


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Networks from CIDR strings; raises ValueError naming the bad one."""
    out: list[IPNetwork] = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{cidr!r} is not an IP network (CIDR)") from None
    return tuple(out)


@dataclass(frozen=True)
class Rules:
    """Tunable parts of the classification (from settings)."""

    prefetch_networks: tuple[IPNetwork, ...] = field(
        default_factory=lambda: parse_networks(DEFAULT_PREFETCH_NETWORKS)
    )
    scanner_networks: tuple[IPNetwork, ...] = ()
    scanner_agents: tuple[str, ...] = SCANNER_AGENTS
    """Substrings (lower case) of scanner user agents; settings add to the defaults."""
    prefetch_agents: tuple[tuple[str, str], ...] = PROXY_AGENTS
    early_click_s: float = 30.0
    """A click this soon after the message was accepted is a scanner (0 turns the rule off)."""
    burst_window_s: float = 2.0
    """Clicks on different links of one message this close together are a scanner."""
    _memo: dict[tuple[str, bool], Verdict | None] = field(
        default_factory=dict, compare=False, repr=False
    )
    """User agents repeat (a few clients send most requests): their verdicts are memoised."""
    _ip_memo: dict[str, tuple[bool, bool]] = field(default_factory=dict, compare=False, repr=False)
    _open_agents: dict[str | None, tuple[Verdict | None, bool]] = field(
        default_factory=dict, compare=False, repr=False
    )
    _click_agents: dict[str | None, tuple[Verdict | None, bool]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @cached_property
    def _scanner_re(self) -> re.Pattern[str]:
        return re.compile("|".join(re.escape(m) for m in self.scanner_agents if m) or "(?!)")

    @cached_property
    def _bot_re(self) -> re.Pattern[str]:
        return re.compile("|".join(re.escape(m) for m in BOT_AGENTS))

    def agent_verdict(self, agent: str, *, click: bool) -> Verdict | None:
        """What the user agent alone says (``agent`` lower case), or ``None``."""
        key = (agent, click)
        try:
            return self._memo[key]
        except KeyError:
            pass
        verdict = _agent_verdict(self, agent, click=click)
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = verdict
        return verdict

    def header_verdict(self, user_agent: str | None, *, click: bool) -> tuple[Verdict | None, bool]:
        """(``agent_verdict`` of the header as sent, whether it has any text), remembered per
        header value: the strip and lower-casing are not redone for a known client."""
        memo = self._click_agents if click else self._open_agents
        try:
            return memo[user_agent]
        except KeyError:
            pass
        agent = (user_agent or "").strip().lower()
        found = (self.agent_verdict(agent, click=click) if agent else None), bool(agent)
        if len(memo) >= MEMO_SIZE:
            memo.clear()
        memo[user_agent] = found
        return found

    def networks_of(self, ip: str | None) -> tuple[bool, bool]:
        """(in a scanner network, in a prefetch network) for a client address."""
        if not ip or not (self.scanner_networks or self.prefetch_networks):
            return False, False
        try:
            return self._ip_memo[ip]
        except KeyError:
            pass
        flags = _in(ip, self.scanner_networks), _in(ip, self.prefetch_networks)
        if len(self._ip_memo) >= MEMO_SIZE:
            self._ip_memo.clear()
        self._ip_memo[ip] = flags
        return flags


MEMO_SIZE = 4096


def _in(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in networks)


def _agent_verdict(rules: Rules, agent: str, *, click: bool) -> Verdict | None:
    if rules._scanner_re.search(agent):
        return Verdict("scanner", "scanner_user_agent")
    for marker, reason in rules.prefetch_agents:
        if marker in agent:
            # A proxy that follows a link is checking it, not opening the message.
            return Verdict("scanner", reason) if click else Verdict("prefetch", reason)
    if agent == APPLE_MPP_AGENT:
        return Verdict("scanner", "bare_user_agent") if click else APPLE_MPP
    if rules._bot_re.search(agent):
        return Verdict("scanner", "bot_user_agent")
    return None


def _common(
    rules: Rules, method: str, user_agent: str | None, ip: str | None, *, click: bool
) -> tuple[Verdict | None, bool]:
    """(the verdict of the rules every request shares or ``None``, whether the user agent
    has any text)."""
    if method != "GET" and method.upper() == "HEAD":
        return HEAD_REQUEST, True
    in_scanner_network, in_prefetch_network = rules.networks_of(ip)
    if in_scanner_network:
        return SCANNER_NETWORK, True
    by_agent, has_agent = rules.header_verdict(user_agent, click=click)
    if by_agent is not None:
        return by_agent, True
    if in_prefetch_network:
        return (PROXY_NETWORK if click else APPLE_MPP), True
    return None, has_agent


def classify_open(rules: Rules, method: str, user_agent: str | None, ip: str | None) -> Verdict:
    """The audience of a pixel fetch."""
    verdict, has_agent = _common(rules, method, user_agent, ip, click=False)
    if verdict is not None:
        return verdict
    return HUMAN if has_agent else NO_USER_AGENT


_CROCKFORD_UPPER = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: The bytes of a canonical (upper-case) ULID's Crockford digits as ``int(..., 32)`` reads
#: them; every other byte becomes ``!``, which no canonical ULID contains.
_CANONICAL_TO_BASE32 = bytes(
    b"0123456789abcdefghijklmnopqrstuv"[_CROCKFORD_UPPER.find(i)]
    if i in _CROCKFORD_UPPER
    else ord("!")
    for i in range(256)
)


def accepted_age_s(mailgate_id: str | None, now_s: float) -> float | None:
    """Seconds since the message was accepted (its ULID's time), when the id is a ULID."""
    if not mailgate_id:
        return None
    if len(mailgate_id) == 26 and mailgate_id.isascii():
        # What tokens carry (a canonical ULID): one translate, no regex, no Python loop.
        digits = mailgate_id.encode().translate(_CANONICAL_TO_BASE32)
        if b"!" not in digits:
            return now_s - int(digits[:10], 32) / 1000.0
    if not is_ulid(mailgate_id):
        return None
    return now_s - ulid_time_ms(mailgate_id) / 1000.0


def classify_click(
    rules: Rules,
    method: str,
    user_agent: str | None,
    ip: str | None,
    *,
    mailgate_id: str | None,
    now_s: float,
    other_links_clicked: int = 0,
    accepted_ms: int | None = None,
) -> Verdict:
    """The audience of a click. ``other_links_clicked``: how many *other* links of the same
    message were clicked within ``rules.burst_window_s`` (see ``ClickHistory``).
    ``accepted_ms``: the message's acceptance time when the caller has it already (the
    token's ULID, ``TokenSigner.verify_details``); else it is read from ``mailgate_id``."""
    verdict, has_agent = _common(rules, method, user_agent, ip, click=True)
    if verdict is not None:
        return verdict
    if rules.early_click_s > 0:
        if accepted_ms is not None:
            age: float | None = now_s - accepted_ms / 1000.0
        else:
            age = accepted_age_s(mailgate_id, now_s)
        if age is not None and age < rules.early_click_s:
            return EARLY_CLICK
    if other_links_clicked > 0:
        return CLICK_BURST
    return HUMAN if has_agent else NO_USER_AGENT


class ClickHistory:
    """Recent clicks per message, bounded in messages (LRU) and in clicks per message.

    Scanners open every link of a message within a second or two; people do not. Only this
    replica's clicks are seen, so behind a load balancer some bursts are split (docs).
    """

    def __init__(
        self, *, window_s: float = 2.0, max_messages: int = 50_000, per_message: int = 16
    ) -> None:
        self.window_s = window_s
        self.max_messages = max_messages
        self.per_message = per_message
        #: message -> (link -> time of its last click); both oldest first (plain dicts keep
        #: insertion order: a key popped and put back is the newest)
        self._recent: dict[str, dict[str, float]] = {}

    def __len__(self) -> int:
        return len(self._recent)

    def record(self, key: str, url: str, now_s: float) -> int:
        """Note a click on ``url``; return how many other links were clicked in the window."""
        recent = self._recent
        clicks = recent.pop(key, None)
        if clicks is None:
            clicks = {}
            if len(recent) >= self.max_messages:
                del recent[next(iter(recent))]
        recent[key] = clicks
        since = now_s - self.window_s
        others = 0
        for link, at in clicks.items():
            if at >= since and link != url:
                others += 1
        clicks.pop(url, None)  # re-inserted last: the dict stays ordered by last click
        clicks[url] = now_s
        if len(clicks) > self.per_message:
            del clicks[next(iter(clicks))]
        return others
