"""Who fetched a tracking URL. Only the obvious cases for now: HEAD requests and self-declared
bots are ``scanner``; everything else is ``unknown`` (telling humans from mail-provider
prefetchers such as image proxies needs more signals and comes later)."""

from __future__ import annotations

from mailgate_core.schemas import Audience

#: Lower-case substrings of user agents that announce automation.
BOT_MARKERS: tuple[str, ...] = (
    "bot",
    "crawler",
    "spider",
    "slurp",
    "curl/",
    "wget/",
    "python-requests",
    "python-urllib",
    "aiohttp",
    "go-http-client",
    "java/",
    "okhttp",
    "libwww-perl",
    "headlesschrome",
    "phantomjs",
    "scanner",
    "barracuda",
    "proofpoint",
    "mimecast",
)


def classify_audience(method: str, user_agent: str | None) -> Audience:
    if method.upper() == "HEAD":
        return "scanner"
    agent = (user_agent or "").lower()
    if any(marker in agent for marker in BOT_MARKERS):
        return "scanner"
    return "unknown"
