"""The MIME tree of a raw message, read on its bytes: offsets, never copies of bodies.

The ``email`` parser reads every line of every part in Python (a few milliseconds for a
50 KB message); here only header blocks are parsed, and multipart bodies are split at their
delimiter lines with one regex scan. Boundary semantics follow the ``email`` package: a
delimiter is ``--boundary`` at the start of a line (CRLF, LF or a lone CR), optionally
``--`` (the close delimiter) and trailing blanks; the line break before it belongs to it
(RFC 2046 5.1.1); a missing close delimiter ends the multipart at the end of its body.

``strict`` walks (the attachment check) raise ``MalformedMime`` where this reader and the
``email`` package could disagree, so the caller can ask the ``email`` package instead;
lenient walks (the body rewrite) skip such parts, leaving them as received.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from functools import lru_cache

from .rewrite import HeaderField, scan_header_block

#: Nesting deeper than this is not walked (strict walks raise).
MAX_DEPTH = 16
CONTENT_FIELDS = ("content-type", "content-transfer-encoding", "content-disposition")


class MalformedMime(ValueError):
    """The message is not plain enough for this reader (strict walks only)."""


@dataclass(frozen=True)
class ContentInfo:
    """What a part's Content-* fields say, parsed as the ``email`` package parses them."""

    headers: Message
    """A header-only ``Message`` with the part's Content-* fields (for parameters); shared
    between parts with the same fields: read it, never change it. (Its boundary parameter
    may be a stand-in: ``boundary`` is the part's own.)"""
    content_type: str
    boundary: str | None
    charset: str | None
    cte: str
    is_attachment: bool


#: A multipart Content-Type field whose only parameter is a quoted boundary of plain
#: characters (RFC 2046 bchars but the blank): what mailers write, with a new boundary in
#: every message. Such a value holds no quote, backslash, ``;`` or blank, so putting another
#: boundary of the same characters in its place cannot change how the ``email`` package
#: reads the rest of the field.
_BOUNDARY_ONLY = re.compile(
    rb"content-type:[ \t]*multipart/[a-z0-9.+-]+[ \t]*;(?:\r?\n[ \t]+|[ \t]*)"
    rb'boundary="([a-z0-9\'()+_,./:=?-]{1,70})"[ \t]*\r?\n',
    re.IGNORECASE,
)
_STAND_IN = "mailgate-memo-key"


def memo_key(fields: tuple[HeaderField, ...]) -> tuple[tuple[HeaderField, ...], str | None]:
    """``(fields, boundary)``: ``fields`` with a fixed stand-in for the boundary of a
    boundary-only multipart Content-Type (and that boundary), so that memoised parsing of
    part headers still hits when each message has its own boundary; else ``(fields, None)``."""
    found = next((i for i, f in enumerate(fields) if f.key == "content-type"), -1)
    if found < 0:
        return fields, None
    field = fields[found]
    match = _BOUNDARY_ONLY.fullmatch(field.raw)  # (fails at once for a non-multipart)
    if match is None or any(f.key == "content-type" for f in fields[found + 1 :]):
        return fields, None  # (two Content-Type fields: left as they are)
    generic = HeaderField(
        field.name, field.raw[: match.start(1)] + _STAND_IN.encode() + field.raw[match.end(1) :]
    )
    return (*fields[:found], generic, *fields[found + 1 :]), match.group(1).decode("ascii")


def content_info(fields: Sequence[HeaderField], default_type: str = "text/plain") -> ContentInfo:
    """The part's content info. Campaigns repeat the same part headers message after
    message, so results are memoised by those header lines (the ``email`` package's
    parameter parsing is the costliest step of reading a small message); a multipart's
    boundary, new in every message, is left out of the key (``memo_key``)."""
    content = tuple(f for f in fields if f.key in CONTENT_FIELDS)
    key, boundary = memo_key(content)
    if boundary is None:
        return _content_info(content, default_type)
    info = _content_info(key, default_type)
    if info.boundary != _STAND_IN:  # (cannot happen for what _BOUNDARY_ONLY matches)
        return _content_info(content, default_type)
    return ContentInfo(
        info.headers, info.content_type, boundary, info.charset, info.cte, info.is_attachment
    )


@lru_cache(maxsize=4096)
def _content_info(fields: tuple[HeaderField, ...], default_type: str) -> ContentInfo:
    headers = Message()
    for f in fields:
        headers[f.name] = f.value()
    if headers.get("content-type") is None:
        headers.set_default_type(default_type)
    content_type = headers.get_content_type()
    disposition = headers.get_content_disposition()
    named = headers.get_param("name") not in (None, "")
    return ContentInfo(
        headers=headers,
        content_type=content_type,
        boundary=headers.get_boundary() if content_type.startswith("multipart/") else None,
        charset=headers.get_content_charset(),
        cte=str(headers.get("content-transfer-encoding", "7bit")).strip().lower(),
        is_attachment=disposition == "attachment" or (disposition is None and named),
    )


@dataclass(frozen=True)
class MimePart:
    """One part: its header fields and where it lies in the message buffer."""

    fields: tuple[HeaderField, ...]
    info: ContentInfo
    start: int
    """Offset of the part's header block (0 for the message itself)."""
    body_start: int
    end: int
    depth: int
    in_attached_message: bool = False
    """Inside a message/* part (a forwarded message)."""
    has_body: bool = True
    """A blank line ends the header block (without one the part is all header)."""


#: What may follow ``--boundary`` on a delimiter line: ``--`` (the close delimiter), blanks,
#: the line end. Compiled once; the boundary itself is found with ``bytes.find`` (each
#: message has its own boundary, and compiling a pattern per boundary cost ~0.1-0.2 ms).
_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(\r\n|\r|\n|\Z)")


def split_multipart(buf: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each body part between the delimiter lines of ``boundary``."""
    marker = b"--" + boundary.encode("utf-8", "surrogateescape")
    spans: list[tuple[int, int]] = []
    opened: int | None = None
    at = buf.find(marker, start, end)
    while at >= 0:
        tail = _DELIMITER_TAIL.match(buf, at + len(marker), end)
        if tail is None:  # "--boundary" followed by more text: not a delimiter line
            at = buf.find(marker, at + 1, end)
            continue
        if at > 0 and buf[at - 1] not in b"\r\n":
            at = buf.find(marker, tail.end(), end)
            continue  # not at the start of a line
        if opened is not None:
            stop = at
            if buf[stop - 2 : stop] == b"\r\n":
                stop -= 2
            elif buf[stop - 1 : stop] in (b"\r", b"\n"):
                stop -= 1
            spans.append((opened, max(opened, stop)))
        if tail.group(1):  # the close delimiter: the epilogue follows
            return spans
        opened = tail.end()
        at = buf.find(marker, opened, end)
    if opened is not None:
        spans.append((opened, max(opened, end)))  # no close delimiter (as email does)
    return spans


def body_start_after(buf: bytes, blank: int, end: int) -> tuple[int, bool]:
    """``(offset after the blank line at blank, found)``; ``(end, False)`` without one."""
    if blank >= end:
        return end, False
    return blank + (2 if buf[blank : blank + 2] == b"\r\n" else 1), True


def walk_message(buf: bytes, *, strict: bool, into_attached_messages: bool) -> Iterator[MimePart]:
    """Every part of the message in ``buf``, the message itself first, in document order."""
    fields, blank, valid = scan_header_block(buf, 0, len(buf), stop_at_invalid=True)
    if not valid:
        raise MalformedMime("a header line is not a header field")
    body_start, _ = body_start_after(buf, blank, len(buf))
    return walk_body(
        buf, fields, body_start, strict=strict, into_attached_messages=into_attached_messages
    )


def walk_body(
    buf: bytes,
    fields: Sequence[HeaderField],
    body_start: int,
    *,
    strict: bool,
    into_attached_messages: bool,
) -> Iterator[MimePart]:
    """Like ``walk_message`` for a message whose header ``fields`` were read already and
    whose body starts at ``body_start`` in ``buf``."""
    top = _Span(0, body_start, len(buf), has_body=True)
    return _walk(buf, tuple(fields), top, strict, into_attached_messages, 0, "text/plain", False)


@dataclass(frozen=True)
class _Span:
    start: int
    body_start: int
    end: int
    has_body: bool


def _child(
    buf: bytes, start: int, end: int, strict: bool, what: str
) -> tuple[tuple[HeaderField, ...], _Span] | None:
    fields, blank, valid = scan_header_block(buf, start, end, stop_at_invalid=True)
    if not valid:
        if strict:
            raise MalformedMime(f"{what}: a header line is not a header field")
        return None  # left as received
    body_start, has_body = body_start_after(buf, blank, end)
    return tuple(fields), _Span(start, body_start, end, has_body)


def _walk(
    buf: bytes,
    fields: tuple[HeaderField, ...],
    span: _Span,
    strict: bool,
    into_messages: bool,
    depth: int,
    default_type: str,
    in_message: bool,
) -> Iterator[MimePart]:
    info = content_info(fields, default_type)
    yield MimePart(
        fields, info, span.start, span.body_start, span.end, depth, in_message, span.has_body
    )
    if depth >= MAX_DEPTH:
        if strict:
            raise MalformedMime("MIME nesting too deep")
        return
    if info.content_type.startswith("multipart/"):
        if info.boundary is None:
            return  # the email package reads it as a single part too
        child_default = "message/rfc822" if info.content_type == "multipart/digest" else ""
        for child_start, child_end in split_multipart(
            buf, span.body_start, span.end, info.boundary
        ):
            child = _child(buf, child_start, child_end, strict, "a body part")
            if child is not None:
                yield from _walk(
                    buf,
                    *child,
                    strict,
                    into_messages,
                    depth + 1,
                    child_default or "text/plain",
                    in_message,
                )
    elif into_messages and info.content_type.startswith("message/"):
        # As the email parser: any message/* body is a message (delivery-status excepted).
        if info.content_type == "message/delivery-status":
            if strict:
                raise MalformedMime("message/delivery-status is left to the email package")
            return
        inner = _child(buf, span.body_start, span.end, strict, "an attached message")
        if inner is not None:
            yield from _walk(buf, *inner, strict, into_messages, depth + 1, "text/plain", True)
