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
_CONTENT_KEYS = frozenset(CONTENT_FIELDS)


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
    keys = [f.key for f in fields]
    if keys.count("content-type") != 1:
        return fields, None  # (none, or two Content-Type fields: left as they are)
    found = keys.index("content-type")
    field = fields[found]
    match = _BOUNDARY_ONLY.fullmatch(field.raw)  # (fails at once for a non-multipart)
    if match is None:
        return fields, None
    generic = HeaderField(
        field.name, field.raw[: match.start(1)] + _STAND_IN.encode() + field.raw[match.end(1) :]
    )
    return (*fields[:found], generic, *fields[found + 1 :]), match.group(1).decode("ascii")


def content_info(fields: Sequence[HeaderField], default_type: str = "text/plain") -> ContentInfo:
    """The part's content info. Campaigns repeat the same part headers message after
    message, so results are memoised by those header lines (the ``email`` package's
    parameter parsing is the costliest step of reading a small message); a multipart's
    boundary, new in every message, is left out of the key (``memo_key``)."""
    content = tuple([f for f in fields if f.key in _CONTENT_KEYS])
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


@dataclass(slots=True)
class MimePart:
    """One part: its header fields and where it lies in the message buffer. Never changed
    after the walk (not ``frozen``: a frozen dataclass's ``__init__`` makes a call per
    field, and a message's walk makes one per part)."""

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
    top: _Span = (0, body_start, len(buf), True)
    return _walk(buf, tuple(fields), top, strict, into_attached_messages, 0, "text/plain", False)


_Span = tuple[int, int, int, bool]
"""A part's ``(start, body_start, end, has_body)`` (see ``MimePart``)."""


#: Body-part header blocks up to this long are read once for every message carrying them
#: (a campaign's are a few hundred bytes; the memo holds at most ~1 MB of blocks).
_MEMO_HEAD_MAX = 1024


@lru_cache(maxsize=1024)
def _part_head(
    block: bytes, default_type: str
) -> tuple[tuple[HeaderField, ...], int, bool, ContentInfo | None]:
    """``scan_header_block`` of a part's header block (``block`` ends with the CRLF CRLF
    that ends it) and the part's content info (``None`` when reading it raised: the walk
    asks again and raises where it always did). A campaign's body parts have the same
    header lines message after message (a nested multipart's boundary aside)."""
    fields, blank, valid = scan_header_block(block, 0, len(block), stop_at_invalid=True)
    found = tuple(fields)
    info = None
    if valid:
        try:
            info = content_info(found, default_type)
        except Exception:
            info = None
    return found, blank, valid, info


def _child(
    buf: bytes, start: int, end: int, strict: bool, what: str, default_type: str
) -> tuple[tuple[HeaderField, ...], _Span, ContentInfo | None] | None:
    """The part at ``buf[start:end]``: its header fields, span and (when known) content info.

    The header scan stops at the first blank line, so its result depends only on the bytes
    up to the first CRLF CRLF (a blank line ends there at the latest): those bytes are the
    memo key of ``_part_head``."""
    head_end = buf.find(b"\r\n\r\n", start, end)
    info: ContentInfo | None = None
    if 0 <= head_end < start + _MEMO_HEAD_MAX:
        fields, blank, valid, info = _part_head(buf[start : head_end + 4], default_type)
        blank += start
    else:
        scanned, blank, valid = scan_header_block(buf, start, end, stop_at_invalid=True)
        fields = tuple(scanned)
    if not valid:
        if strict:
            raise MalformedMime(f"{what}: a header line is not a header field")
        return None  # left as received
    body_start, has_body = body_start_after(buf, blank, end)
    return fields, (start, body_start, end, has_body), info


def _walk(
    buf: bytes,
    fields: tuple[HeaderField, ...],
    span: _Span,
    strict: bool,
    into_messages: bool,
    depth: int,
    default_type: str,
    in_message: bool,
    info: ContentInfo | None = None,
) -> Iterator[MimePart]:
    if info is None:
        info = content_info(fields, default_type)
    start, body_start, end, has_body = span
    yield MimePart(fields, info, start, body_start, end, depth, in_message, has_body)
    if depth >= MAX_DEPTH:
        if strict:
            raise MalformedMime("MIME nesting too deep")
        return
    if info.content_type.startswith("multipart/"):
        if info.boundary is None:
            return  # the email package reads it as a single part too
        child_default = (
            "message/rfc822" if info.content_type == "multipart/digest" else "text/plain"
        )
        for child_start, child_end in split_multipart(buf, body_start, end, info.boundary):
            child = _child(buf, child_start, child_end, strict, "a body part", child_default)
            if child is not None:
                child_fields, child_span, child_info = child
                yield from _walk(
                    buf,
                    child_fields,
                    child_span,
                    strict,
                    into_messages,
                    depth + 1,
                    child_default,
                    in_message,
                    child_info,
                )
    elif into_messages and info.content_type.startswith("message/"):
        # As the email parser: any message/* body is a message (delivery-status excepted).
        if info.content_type == "message/delivery-status":
            if strict:
                raise MalformedMime("message/delivery-status is left to the email package")
            return
        inner = _child(buf, body_start, end, strict, "an attached message", "text/plain")
        if inner is not None:
            inner_fields, inner_span, inner_info = inner
            yield from _walk(
                buf,
                inner_fields,
                inner_span,
                strict,
                into_messages,
                depth + 1,
                "text/plain",
                True,
                inner_info,
            )
