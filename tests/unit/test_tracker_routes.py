"""The tracker's prefix-matched token routes accept exactly what aiohttp's pattern does."""

from __future__ import annotations

import pytest
from aiohttp.web_urldispatcher import DynamicResource
from mailgate_tracker.handlers import TokenResource

PATHS = [
    "/track/o/AgFvAbc-_x",
    "/track/o/abc%2Fdef",
    "/track/o/abc%25def",
    "/track/o/",
    "/track/o",
    "/track/o/abc/def",
    "/track/o/a{b}",
    "/track/oo/abc",
    "/track/c/abc",
    "/x/track/o/abc",
    "/track/o/%D1%8F",
]


@pytest.mark.parametrize("path", PATHS)
def test_token_resource_matches_like_the_dynamic_resource(path: str) -> None:
    assert TokenResource("/track/o")._match(path) == DynamicResource("/track/o/{token}")._match(
        path
    )


def test_token_resource_names_the_token() -> None:
    assert TokenResource("/track/c")._match("/track/c/xyz") == {"token": "xyz"}
    assert TokenResource("/track/c").canonical == "/track/c/{token}"
