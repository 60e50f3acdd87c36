"""Forbidden attachment types (specs/smtp-rules.md), found anywhere in the MIME tree.

A file name can hide in Content-Disposition ``filename`` or Content-Type ``name``, be split
and percent-encoded by RFC 2231 (``filename*0*=utf-8''ev; filename*1=il.exe``), or be an
RFC 2047 encoded word (``"=?UTF-8?B?...?="``, not standard in parameters but common). Parts
nested in multiparts and in attached messages (message/rfc822) are all checked.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Sequence
from email.errors import MessageError
from email.header import decode_header, make_header
from email.message import Message
from email.utils import collapse_rfc2231_value
from functools import lru_cache

from . import replies
from .mime import MalformedMime, MimePart, body_start_after, memo_key, walk_body, walk_message
from .rewrite import HeaderField

_FORBIDDEN = """
.adp .bat .chm .cmd .com .cpl .exe .hta .ins .isp .jar .js .jse .lib .lnk .mde .msc .msp
.mst .pif .scr .sct .shb .sys .vb .vbe .vbs .vxd .wsc .wsf .wsh
"""
FORBIDDEN_EXTENSIONS: frozenset[str] = frozenset(_FORBIDDEN.split())


def attachment_extension(filename: str) -> str:
    """Lower-cased ``.ext`` of a file name as Windows sees it (trailing dots/spaces ignored)."""
    name = filename.strip().strip("\"'").rstrip(". \t")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    _stem, dot, ext = name.rpartition(".")
    if not dot or not ext:
        return ""
    return "." + ext.lower()


def is_forbidden_attachment(filename: str) -> bool:
    return attachment_extension(filename) in FORBIDDEN_EXTENSIONS


def _decode_encoded_words(text: str) -> str:
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, UnicodeError, MessageError):
        return text


def _param(part: Message, name: str, header: str) -> str | None:
    value = part.get_param(name, None, header=header)
    if value is None or value == "":
        return None
    if isinstance(value, tuple):
        text = collapse_rfc2231_value(value)
    else:
        text = email.utils.unquote(str(value))
    return _decode_encoded_words(str(text))


def part_filenames(part: Message) -> list[str]:
    """Every name a part declares for itself (disposition filename, content-type name)."""
    names = []
    for param, header in (("filename", "content-disposition"), ("name", "content-type")):
        try:
            value = _param(part, param, header)
        except (ValueError, LookupError, UnicodeError, TypeError, MessageError):
            value = None
        if value:
            names.append(value)
    return names


#: The fields a part names itself in (Content-Disposition filename, Content-Type name).
_NAME_FIELDS = frozenset(("content-type", "content-disposition"))


@lru_cache(maxsize=4096)
def _forbidden_in(fields: tuple[HeaderField, ...]) -> str | None:
    """The forbidden extension a part's name fields declare. Memoised: campaigns repeat
    the same part headers message after message, and parameter parsing is the costly step."""
    headers = Message()
    for f in fields:
        headers[f.name] = f.value()
    for filename in part_filenames(headers):
        extension = attachment_extension(filename)
        if extension in FORBIDDEN_EXTENSIONS:
            return extension
    return None


def strict_parts(
    raw: bytes, header: tuple[list[HeaderField], int, bool] | None = None
) -> list[MimePart] | None:
    """Every part of ``raw`` as the attachment check reads them (a strict walk that enters
    attached messages), or ``None`` where the ``email`` package must be asked instead.
    ``header``: ``scan_header_block(raw, 0, len(raw))`` when the caller has it."""
    try:
        if header is None:
            return list(walk_message(raw, strict=True, into_attached_messages=True))
        fields, blank, valid = header
        if not valid:
            return None  # walk_message raises MalformedMime for it
        body_start, _ = body_start_after(raw, blank, len(raw))
        return list(walk_body(raw, fields, body_start, strict=True, into_attached_messages=True))
    except Exception:  # MalformedMime, or anything odd in a header
        return None


def find_forbidden_attachment(raw: bytes, parts: Sequence[MimePart] | None = None) -> str | None:
    """The first forbidden extension (e.g. ``.exe``) of any part of ``raw``, else ``None``;
    raises ``Rejected`` (554) for a MIME tree nested too deeply to be checked.

    The MIME tree is read on the bytes (mime.py: header blocks only, several times faster
    than the ``email`` parser on a 50 KB campaign); anything that reader is not sure to
    see as the ``email`` package does is handed to the ``email`` package. ``parts``: the
    result of ``strict_parts(raw)`` when the caller has it (not walked again)."""
    try:
        walked = parts if parts is not None else strict_parts(raw)
        if walked is None:
            raise MalformedMime("left to the email package")
    except Exception:  # MalformedMime, or anything odd in a header: ask the email package
        try:
            message = email.message_from_bytes(raw, policy=email.policy.compat32)
            walked_by_email = list(message.walk())
        except RecursionError:  # hundreds of nested parts: what is inside cannot be checked
            raise replies.Rejected(replies.TOO_DEEPLY_NESTED) from None
    else:
        for walked_part in walked:
            declared = tuple([f for f in walked_part.fields if f.key in _NAME_FIELDS])
            for f in declared:
                if b"name" in f.raw.lower():
                    break
            else:
                continue  # no filename or name parameter (RFC 2231 forms included)
            extension = _forbidden_in(memo_key(declared)[0])  # (a boundary names no file)
            if extension is not None:
                return extension
        return None
    for part in walked_by_email:
        for filename in part_filenames(part):
            extension = attachment_extension(filename)
            if extension in FORBIDDEN_EXTENSIONS:
                return extension
    return None
