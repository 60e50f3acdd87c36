"""Per-recipient body rewrite: ``[Unsubscribe]`` tags, signed click links and the open pixel.

The body is read once per message (``plan_body``) into a ``BodyTemplate``: the MIME tree is
walked on the raw bytes, and every text/html or text/plain part (not an attachment) that has
something to rewrite is decoded (quoted-printable, base64) and cut into literal byte runs and
slots (an unsubscribe URL, a click URL, the pixel). Rendering a recipient's copy
(``BodyTemplate.render``) fills the slots, re-encodes only those parts and splices them
between the untouched bytes of the message: attachments, other parts, boundaries, preambles
and part headers stay byte for byte as received. The ``email`` package's generator is not used
because it re-folds headers, re-wraps bodies and re-encodes parts it did not need to touch.

The markup we look for (``<a href``, ``</body>``, ``[Unsubscribe]``) is ASCII, so parts in a
charset where an ASCII byte always means that ASCII character (UTF-8, koi8-r, windows-1251,
the ISO-8859 family, EUC) are rewritten as bytes, without decoding the text. Parts in other
charsets (Shift_JIS, ISO-2022-JP, UTF-16...) are decoded, rewritten via UTF-8 and encoded back.

Anything unexpected raises inside this module; ``plan_body`` and ``render`` callers catch it
and fall back to a headers-only rewrite (rewrite.py), so a malformed message is never refused.
"""

from __future__ import annotations

import binascii
import codecs
import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from operator import itemgetter
from typing import Literal

from mailgate_core.tracking import TokenSigner

from .mime import ContentInfo, MimePart, walk_body
from .rewrite import HeaderField, PreparedMessage, render

#: A click token carries the URL; the tracker refuses tokens longer than 4096 characters.
MAX_TRACKED_URL_BYTES = 2800
#: More click links than this in one message (a campaign has tens) is abuse, not mail: every
#: link costs a signature per recipient (10 MB of links: 300k signatures, ~300 MB, ~30 s per
#: copy). Such a body is passed through untouched (the headers-only rewrite, counted).
MAX_TRACKED_LINKS = 1000
#: RFC 5322 line limit (998 + CRLF); a 7bit/8bit part that would exceed it becomes QP.
_MAX_LINE = 998
#: Longest mailgate_id assumed when checking line lengths (ULIDs have 26 characters).
_PROBE_ID = "0" * 32

_UNSUB_TAG = re.compile(rb"\[unsubscribe\]", re.IGNORECASE)
_A_HREF = re.compile(
    rb"""<a(?=[\s/])[^>]*?(?<![\w-])href\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""",
    re.IGNORECASE,
)
_HTTP_URL = re.compile(r"https?://", re.IGNORECASE)
_BODY_END = re.compile(rb"</body", re.IGNORECASE)
_HTML_END = re.compile(rb"</html", re.IGNORECASE)
_LONG_LINE = re.compile(rb"[^\n]{%d}" % (_MAX_LINE + 1))
_LONE_CR = re.compile(rb"\r(?!\n)")

_STATEFUL = ("2022", "utf_7", "utf-7", "hz", "utf_16", "utf-16", "utf_32", "utf-32")
_ASCII_SAFE_MULTIBYTE = frozenset(
    {"utf-8", "ascii", "euc_jp", "euc_kr", "gb2312", "euc_jis_2004", "euc_jisx0213"}
)


class TrackingLinks:
    """The tracker's URLs for one recipient (``mailgate_id``), signed with ``signer``.

    Routes (services/tracker): open pixel ``/track/o/<token>``, click ``/track/c/<token>``,
    unsubscribe ``/u/<token>`` (GET page, POST one-click per RFC 8058).
    """

    def __init__(self, base_url: str, signer: TokenSigner, *, unsubscribe_mailto: str = ""):
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self.unsubscribe_mailto = unsubscribe_mailto.strip().removeprefix("mailto:")
        self._open = self.base_url + "/track/o/"
        self._click = self.base_url + "/track/c/"
        self._unsub = self.base_url + "/u/"
        self._own = (self._open.lower(), self._click.lower(), self._unsub.lower())
        #: ``click_url`` less the token, as a body holds it (HTML-escaped in HTML parts).
        self.click_prefix = self._click.encode()
        self.click_prefix_html = html.escape(self._click).encode()

    def open_url(self, mailgate_id: str) -> str:
        return self._open + self.signer.make_open_token(mailgate_id)

    def click_url(self, mailgate_id: str, url: str) -> str:
        return self._click + self.signer.make_click_token(mailgate_id, url)

    def unsubscribe_url(self, mailgate_id: str) -> str:
        return self._unsub + self.signer.make_unsub_token(mailgate_id)

    def is_own(self, url: str) -> bool:
        """``url`` already points at our tracker (never wrapped twice)."""
        return url.lower().startswith(self._own)

    def list_unsubscribe(self, mailgate_id: str, unsubscribe_url: str) -> str:
        """The ``List-Unsubscribe`` value: the one-click URL, then the mailto if configured.

        The mailto is ``<local>+<token>@<domain>?subject=unsubscribe%20<token>`` with the
        recipient's unsubscribe token, which webhook-ingest reads from a Postal route to
        ``<local>@<domain>`` (README, "Inbound mail"). The ``+<token>`` tag is left out
        when the local part would pass RFC 5321's 64 octets; the subject still carries it."""
        value = f"<{unsubscribe_url}>"
        if self.unsubscribe_mailto:
            token = unsubscribe_url.rsplit("/", 1)[-1]
            local, _, domain = self.unsubscribe_mailto.rpartition("@")
            tagged = f"{local}+{token}"
            address = f"{tagged}@{domain}" if len(tagged) <= 64 else self.unsubscribe_mailto
            value += f", <mailto:{address}?subject=unsubscribe%20{token}>"
        return value


# --- slots and part templates ------------------------------------------------------------

SlotKind = Literal["unsubscribe", "click", "pixel"]
Encoding = Literal["identity", "quoted-printable", "base64"]


@dataclass(frozen=True)
class Slot:
    kind: SlotKind
    url: str = ""
    """The original link target (clicks only), HTML entities decoded."""
    original: bytes = b""
    """What the slot replaced, put back when tracking is off."""


@dataclass(slots=True)
class _Recipient:
    """Per-recipient values shared by every part of one rendered copy (made for every
    copy: not frozen, whose ``__init__`` costs a call per field; never changed but for the
    memo dicts)."""

    links: TrackingLinks
    mailgate_id: str
    tracking: bool
    unsubscribe_url: str
    open_url: str
    clicks: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        links: TrackingLinks,
        mailgate_id: str,
        *,
        tracking: bool = True,
        unsubscribe_url: str | None = None,
    ) -> _Recipient:
        """The values of ``mailgate_id``'s copy (its own unsubscribe URL unless one is
        given; no open URL when tracking is off)."""
        return cls(
            links=links,
            mailgate_id=mailgate_id,
            tracking=tracking,
            unsubscribe_url=unsubscribe_url or links.unsubscribe_url(mailgate_id),
            open_url=links.open_url(mailgate_id) if tracking else "",
        )

    def click(self, url: str) -> str:
        known = self.clicks.get(url)
        if known is None:
            known = self.clicks[url] = self.links.click_url(self.mailgate_id, url)
        return known

    def click_fill(self, url: str, html_part: bool) -> bytes:
        """A click slot's fill: ``click(url)``, HTML-escaped in an HTML part, as bytes. The
        token is base64url (no character ``html.escape`` changes, one byte each in UTF-8),
        so the fill is the escaped prefix and the token's bytes, made without the text
        round trip: a campaign copy has tens of links."""
        token = self.tokens.get(url)
        if token is None:
            token = self.tokens[url] = self.links.signer.click_token_bytes(self.mailgate_id, url)
        links = self.links
        return (links.click_prefix_html if html_part else links.click_prefix) + token


@dataclass(frozen=True)
class PartTemplate:
    """One text part cut into ``literals[0] slot[0] literals[1] ... literals[n]``."""

    html: bool
    literals: tuple[bytes | memoryview, ...]
    slots: tuple[Slot, ...]
    encoding: Encoding
    charset: str | None
    """Set when the working bytes are UTF-8 and must be encoded back to this charset."""
    newline: bytes
    original: bytes | memoryview
    """The part's body as received (used when nothing would change)."""
    new_head: bytes | None = None
    """A replacement header block (CTE upgraded to QP); the splice then starts at the head."""
    shared: bool = False
    """Rendered for every message carrying this part (``_shared_part_template``): worth
    a ``_QpLayout`` from its second render on."""

    @cached_property
    def has_unsubscribe(self) -> bool:
        return any(s.kind == "unsubscribe" for s in self.slots)

    @cached_property
    def clicks(self) -> int:
        """How many click slots the part has."""
        return sum(1 for s in self.slots if s.kind == "click")

    @cached_property
    def _click_urls(self) -> tuple[tuple[bytes, ...], tuple[int, ...]]:
        """``(urls, index)``: the part's distinct click URLs (UTF-8), and for each slot the
        index of its URL there (-1: not a click)."""
        urls: dict[str, int] = {}
        index = []
        for slot in self.slots:
            if slot.kind == "click":
                index.append(urls.setdefault(slot.url, len(urls)))
            else:
                index.append(-1)
        return tuple(url.encode() for url in urls), tuple(index)

    def _fills(self, r: _Recipient) -> list[bytes]:
        """``[self._fill(slot, r) for slot in self.slots]``, the click tokens signed in one
        call (``TokenSigner.sign_clicks``; each distinct URL once)."""
        if not r.tracking or not self.clicks:
            return [self._fill(slot, r) for slot in self.slots]
        urls, index = self._click_urls
        links = r.links
        prefix = links.click_prefix_html if self.html else links.click_prefix
        fills = [prefix + token for token in links.signer.sign_clicks(r.mailgate_id, urls)]
        return [
            fills[at] if at >= 0 else self._fill(slot, r)
            for slot, at in zip(self.slots, index, strict=True)
        ]

    def _fill(self, slot: Slot, r: _Recipient) -> bytes:
        if slot.kind == "unsubscribe":
            url = r.unsubscribe_url
        elif not r.tracking:
            return slot.original
        elif slot.kind == "click":
            return r.click_fill(slot.url, self.html)
        else:
            return _pixel(html.escape(r.open_url)).encode()
        return (html.escape(url) if self.html else url).encode()

    def render(self, r: _Recipient) -> bytes | memoryview:
        pieces = self.pieces(r)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _layout(self, links: TrackingLinks) -> _QpLayout | None:
        """The part's ``_QpLayout``, made at its second render (a part seen once, such as a
        personalised one, is not worth one); ``None`` before and when it has none. Kept in
        the instance's ``__dict__`` beside the frozen fields, as ``cached_property`` does."""
        state = self.__dict__.get("_qp_layout")
        if isinstance(state, _QpLayout):
            return state
        if state is None:
            self.__dict__["_qp_layout"] = 1  # rendered once
            return None
        if state == 1:
            made = _QpLayout.of(self, links)
            self.__dict__["_qp_layout"] = made or 0
            return made
        return None  # (0: this part has no layout)

    def pieces(self, r: _Recipient) -> list[bytes | memoryview]:
        """The rendered part as pieces to concatenate: an unencoded part is not joined
        here (its literals are views into the message; the copy is made once, by the
        caller's join)."""
        if self.new_head is None and not r.tracking and not self.has_unsubscribe:
            return [self.original]  # nothing to change: the part stays as received
        encoded_part = self.encoding != "identity" or self.charset is not None
        fills: list[bytes] | None = None
        if encoded_part and self.shared and r.tracking:
            layout = self._layout(r.links)
            if layout is not None:  # the fills alone: the literals are in the layout
                fills = self._fills(r)
                encoded = layout.fill(fills)
                if encoded is not None:
                    return [self.new_head or b"", encoded]
        if fills is None:
            fills = self._fills(r)
        pieces: list[bytes | memoryview] = [self.new_head or b"", self.literals[0]]
        for fill, literal in zip(fills, self.literals[1:], strict=True):
            pieces.append(fill)
            pieces.append(literal)
        if not encoded_part:
            return pieces
        data = b"".join(pieces[1:])
        if self.charset is not None:
            data = data.decode("utf-8", "surrogateescape").encode(self.charset, "surrogateescape")
        del pieces[1:]  # (the parts are in ``data`` now)
        if self.encoding == "identity":
            pieces.append(data)
        elif self.encoding == "base64":
            pieces.append(_encode_base64(data, self.newline))
        else:
            pieces.append(_encode_qp(data, self.newline))
        return pieces


def _pixel(src: str) -> str:
    return (
        f'<img src="{src}" width="1" height="1" alt="" '
        'style="border:0;width:1px;height:1px;display:block" />'
    )


def _encode_base64(data: bytes, newline: bytes) -> bytes:
    encoded = binascii.b2a_base64(data, newline=False)
    lines = [encoded[i : i + 76] for i in range(0, len(encoded), 76)]
    return newline.join(lines) + newline if lines else b""


def _encode_qp(data: bytes, newline: bytes) -> bytes:
    encoded = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    if encoded.count(b"\r") != encoded.count(b"\r\n"):  # (two scans: cheaper than a sub)
        encoded = _LONE_CR.sub(b"=0D", encoded)
    if newline == b"\r\n" and b"\n" in encoded and b"\r\n" not in encoded:
        encoded = encoded.replace(b"\n", b"\r\n")  # b2a_qp keeps the input's line breaks
    return encoded


#: Characters ``binascii.b2a_qp`` always writes as they are, whatever surrounds them, and
#: whose presence changes nothing around them (not a blank, ``=``, ``.``, CR or LF): the
#: base64url alphabet of tracking tokens (``_QpLayout``).
_QP_PLAIN_SPAN = re.compile(rb"[A-Za-z0-9_-]*")
_QP_PLAIN_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"


#: The id ``_QpLayout`` renders a part for (any canonical ULID: every id has tokens of the
#: same length).
_LAYOUT_PROBE_ID = "01HZZZZZZZZZZZZZZZZZZZZZZZ"
_NONZERO_RUN = re.compile(rb"[^\x00]+")


@dataclass(frozen=True)
class _QpLayout:
    """A quoted-printable part encoded once, with holes for what differs per recipient.

    A part's slot fills (click, unsubscribe and pixel URLs) differ between recipients only
    in their tokens, which have the same length for every recipient (the mailgate id is a
    ULID, packed into 16 bytes) and consist of ``_QP_PLAIN`` characters: the encoder then
    makes the same decisions (escapes, soft line breaks) for every recipient, and each
    token character lands at the same place in the output. The part is encoded once with
    stand-in characters; a recipient's copy is that output with its token characters in
    the holes, byte for byte what encoding the copy's part would give (a fill of another
    shape takes the encoder, see ``fill``). ``b2a_qp`` was the largest single cost of
    rendering a copy of a small campaign message."""

    gaps: tuple[bytes, ...]
    """The encoded part around the holes: ``gaps[0] hole[0] gaps[1] ... gaps[n]``."""
    holes: tuple[tuple[int, int, int], ...]
    """``(slot, start, end)``: the hole holds ``fill[start:end]`` of that slot's fill (a
    soft line break may cut a fill's span in two)."""
    shapes: tuple[tuple[int, bytes, bytes, int, int], ...]
    """Per slot ``(length, head, tail, start, end)``: every recipient's fill has that
    length, starts with ``head`` and ends with ``tail``; ``[start:end]`` is its span of
    ``_QP_PLAIN`` characters that differs between recipients."""

    @classmethod
    def of(cls, part: PartTemplate, links: TrackingLinks) -> _QpLayout | None:
        """The layout of ``part`` (quoted-printable, bytes mode), ``None`` when its fills do
        not have the shape described above."""
        if part.encoding != "quoted-printable" or part.charset is not None:
            return None
        probe = _LAYOUT_PROBE_ID
        recipient = _Recipient.of(links, probe)
        signer = links.signer
        shapes = []
        fills = []
        for slot in part.slots:
            fill = part._fill(slot, recipient)
            if slot.kind == "click":
                token = signer.make_click_token(probe, slot.url)
            elif slot.kind == "unsubscribe":
                token = signer.make_unsub_token(probe)
            else:
                token = signer.make_open_token(probe)
            start = fill.find(token.encode())
            if start < 0 or fill.find(token.encode(), start + 1) >= 0:
                return None  # (the token is not where a recipient's differs)
            end = start + len(token)
            if _QP_PLAIN_SPAN.fullmatch(fill, start, end) is None:
                return None
            shapes.append((len(fill), fill[:start], fill[end:], start, end))
            fills.append(fill)
        variants = []
        for stand_in in (b"A", b"B"):
            data = [part.literals[0]]
            for fill, (_, _, _, start, end), literal in zip(
                fills, shapes, part.literals[1:], strict=True
            ):
                data += [fill[:start], stand_in * (end - start), fill[end:], literal]
            variants.append(_encode_qp(b"".join(data), part.newline))
        encoded, other = variants
        if len(encoded) != len(other):
            return None
        # Where the two differ: exactly the span characters, in order, in runs cut only by
        # soft line breaks.
        difference = (int.from_bytes(encoded, "big") ^ int.from_bytes(other, "big")).to_bytes(
            len(encoded), "big"
        )
        runs = [m.span() for m in _NONZERO_RUN.finditer(difference)]
        if sum(b - a for a, b in runs) != sum(end - start for *_, start, end in shapes):
            return None
        holes: list[tuple[int, int, int]] = []  # (slot, fill start, fill end)
        index, at = 0, shapes[0][3] if shapes else 0
        for run_start, run_end in runs:
            while at == shapes[index][4]:  # the slot's span is done: the next slot's
                index += 1
                at = shapes[index][3]
            take = min(run_end - run_start, shapes[index][4] - at)
            if take != run_end - run_start:
                return None  # (a run across two slots: spans never touch in the output)
            holes.append((index, at, at + take))
            at += take
        gaps = []
        previous = 0
        for run_start, run_end in runs:
            gaps.append(encoded[previous:run_start])
            previous = run_end
        gaps.append(encoded[previous:])
        return cls(tuple(gaps), tuple(holes), tuple(shapes))

    def fill(self, fills: Sequence[bytes | memoryview]) -> bytes | None:
        """The encoded part with these slot fills; ``None`` when one of them does not fit
        the layout (the caller then encodes the part itself).

        The fills are checked and spliced on their concatenation, a few C calls for the
        whole part (``_Splicer``) instead of a few per slot and per hole: each fill has its
        slot's length, head and tail, and characters of ``_QP_PLAIN`` in its span."""
        splicer = self._splicer
        if tuple(map(len, fills)) != splicer.lengths or not all(map(_is_bytes, fills)):
            return None
        joined = b"".join(fills)
        if splicer.fixed(joined) != splicer.fixed_bytes:
            return None
        if b"".join(splicer.spans(joined)).translate(None, _QP_PLAIN_BYTES):
            return None  # (a character outside _QP_PLAIN_SPAN's class)
        return splicer.template % splicer.holes(joined)

    @cached_property
    def _splicer(self) -> _Splicer:
        return _Splicer.of(self)


def _is_bytes(value: object) -> bool:
    return type(value) is bytes


def _slicer(slices: Sequence[slice]) -> Callable[[bytes], tuple[bytes, ...]]:
    """``lambda data: tuple(data[s] for s in slices)``, in one C call."""
    if len(slices) == 1:
        only = slices[0]
        return lambda data: (data[only],)
    if not slices:
        return lambda data: ()
    return itemgetter(*slices)


@dataclass(frozen=True)
class _Splicer:
    """``_QpLayout.fill`` on the fills' concatenation: where each slot's fixed bytes (head,
    tail), span and holes lie in it, and the encoded part as a ``%b`` template."""

    lengths: tuple[int, ...]
    fixed: Callable[[bytes], tuple[bytes, ...]]
    """The head and the tail of every fill, in order."""
    fixed_bytes: tuple[bytes, ...]
    spans: Callable[[bytes], tuple[bytes, ...]]
    holes: Callable[[bytes], tuple[bytes, ...]]
    template: bytes
    """``gaps`` joined by ``%b`` (a ``%`` in a gap doubled)."""

    @classmethod
    def of(cls, layout: _QpLayout) -> _Splicer:
        offsets = []
        at = 0
        for length, *_ in layout.shapes:
            offsets.append(at)
            at += length
        fixed: list[slice] = []
        fixed_bytes: list[bytes] = []
        spans: list[slice] = []
        for base, (length, head, tail, start, end) in zip(offsets, layout.shapes, strict=True):
            fixed += [
                slice(base, base + len(head)),
                slice(base + length - len(tail), base + length),
            ]
            fixed_bytes += [head, tail]
            spans.append(slice(base + start, base + end))
        holes = [
            slice(offsets[slot] + start, offsets[slot] + end) for slot, start, end in layout.holes
        ]
        return cls(
            lengths=tuple(length for length, *_ in layout.shapes),
            fixed=_slicer(fixed),
            fixed_bytes=tuple(fixed_bytes),
            spans=_slicer(spans),
            holes=_slicer(holes),
            template=b"%b".join(gap.replace(b"%", b"%%") for gap in layout.gaps),
        )


# --- the message-level template -------------------------------------------------------------


@dataclass(frozen=True)
class BodyTemplate:
    """The message body (``rest`` from rewrite.prepare) with the parts to rewrite marked."""

    gaps: tuple[bytes | memoryview, ...]
    """Untouched bytes around the parts: ``gaps[0] part[0] gaps[1] ... gaps[n]`` (views
    into the received message, not copies)."""
    parts: tuple[PartTemplate, ...]
    top_cte: bytes | None = None
    """A new Content-Transfer-Encoding for the top-level header (single-part, upgraded)."""

    def render(
        self,
        links: TrackingLinks,
        mailgate_id: str,
        *,
        tracking: bool,
        unsubscribe_url: str | None = None,
    ) -> bytes:
        """The body of one recipient's copy (from the blank line after the headers on)."""
        return b"".join(
            self.pieces(links, mailgate_id, tracking=tracking, unsubscribe_url=unsubscribe_url)
        )

    def pieces(
        self,
        links: TrackingLinks,
        mailgate_id: str,
        *,
        tracking: bool,
        unsubscribe_url: str | None = None,
    ) -> list[bytes | memoryview]:
        """``render`` as pieces to concatenate (the caller joins them with the headers:
        one copy of a large body instead of two)."""
        recipient = _Recipient.of(
            links, mailgate_id, tracking=tracking, unsubscribe_url=unsubscribe_url
        )
        pieces = [self.gaps[0]]
        for part, gap in zip(self.parts, self.gaps[1:], strict=True):
            pieces += part.pieces(recipient)
            pieces.append(gap)
        return pieces


# --- reading the MIME tree -------------------------------------------------------------------


@dataclass(frozen=True)
class _Splice:
    start: int
    end: int
    part: PartTemplate
    top_level: bool = False
    """The message itself is this single part (its header is the message header)."""


@lru_cache(maxsize=64)
def _charset_mode(charset: str | None) -> tuple[str, str]:
    """``(mode, codec)``: mode ``bytes`` (ASCII bytes mean ASCII; rewrite the raw bytes),
    ``text`` (decode and encode back) or ``skip`` (leave the part alone)."""
    if charset is None:
        return "bytes", "utf-8"
    try:
        codec = codecs.lookup(charset).name
    except (LookupError, ValueError):
        return "bytes", "utf-8"  # unknown-8bit and friends: ASCII-compatible in practice
    if codec in _ASCII_SAFE_MULTIBYTE:
        return "bytes", codec
    if any(s in codec for s in _STATEFUL):
        return "text", codec
    try:
        every = bytes(range(256)).decode(codec, "surrogateescape")
        one_by_one = "".join(bytes([b]).decode(codec, "surrogateescape") for b in range(256))
    except Exception:
        return "skip", codec
    ascii_ok = every[:128] == bytes(range(128)).decode("ascii")
    return ("bytes" if ascii_ok and every == one_by_one else "text"), codec


def _decode_transfer(
    body: bytes | memoryview, cte: str
) -> tuple[bytes | memoryview, Encoding] | None:
    if cte in ("7bit", "8bit", "binary", ""):
        return body, "identity"  # a view into the message: not copied
    if cte == "quoted-printable":
        return binascii.a2b_qp(body), "quoted-printable"
    if cte == "base64":
        try:
            return binascii.a2b_base64(body), "base64"
        except binascii.Error:
            return None
    return None  # x-uuencode and the like: left alone


def _last_start(pattern: re.Pattern[bytes], data: bytes | memoryview) -> int:
    """Where the last match of ``pattern`` starts, -1 without one."""
    at = -1
    for match in pattern.finditer(data):
        at = match.start()
    return at


def _slots_for(
    data: bytes | memoryview, html_part: bool, url_codec: str, links: TrackingLinks
) -> list[tuple[int, int, Slot]]:
    """Sorted, non-overlapping ``(start, end, Slot)`` for one decoded part."""
    found: list[tuple[int, int, Slot]] = []
    if html_part:
        for match in _A_HREF.finditer(data):
            group = match.lastindex  # (the one of the three alternatives that matched)
            assert group is not None
            start, end = match.span(group)
            value = bytes(data[start:end])
            if _UNSUB_TAG.search(value):
                continue  # the tag inside is replaced by the unsubscribe URL below
            url = html.unescape(value.decode(url_codec, "replace")).strip()
            if not _HTTP_URL.match(url) or links.is_own(url):
                continue
            if len(url.encode("utf-8", "surrogatepass")) > MAX_TRACKED_URL_BYTES:
                continue
            found.append((start, end, Slot("click", url=url, original=value)))
            if len(found) > MAX_TRACKED_LINKS:
                raise ValueError("too many links to track")  # see MAX_TRACKED_LINKS
    for match in _UNSUB_TAG.finditer(data):
        found.append((match.start(), match.end(), Slot("unsubscribe")))
    if html_part:
        at = _last_start(_BODY_END, data)  # (no lower-cased copy of a 10 MB part)
        if at < 0:
            at = _last_start(_HTML_END, data)
        if at < 0:
            at = len(data)
        found.append((at, at, Slot("pixel")))
    found.sort(key=lambda item: (item[0], item[1]))
    kept: list[tuple[int, int, Slot]] = []
    position = 0
    for start, end, slot in found:
        if start < position:
            continue  # overlaps a slot already taken (a pixel inside an href...)
        kept.append((start, end, slot))
        position = end
    return kept


def _part_template(
    fields: Sequence[HeaderField],
    info: ContentInfo,
    body: bytes | memoryview,
    newline: bytes,
    links: TrackingLinks,
    *,
    blank: bytes,
) -> PartTemplate | None:
    """The template of one leaf part, or ``None`` when it stays as received."""
    html_part = info.content_type == "text/html"
    if info.content_type not in ("text/html", "text/plain") or info.is_attachment:
        return None
    decoded = _decode_transfer(body, info.cte)
    if decoded is None:
        return None
    data, encoding = decoded
    mode, codec = _charset_mode(info.charset)
    if mode == "skip":
        return None
    charset: str | None = None
    if mode == "text":
        try:
            data = bytes(data).decode(codec).encode("utf-8", "surrogateescape")
        except (UnicodeError, LookupError):
            return None
        charset, codec = codec, "utf-8"
    if not html_part and not _UNSUB_TAG.search(data):
        return None  # a text part without the tag is not touched at all
    slots = _slots_for(data, html_part, codec, links)
    view = memoryview(data)  # literals are views: a 10 MB part is not copied again
    literals: list[bytes | memoryview] = []
    position = 0
    for start, end, _slot in slots:
        literals.append(view[position:start])
        position = end
    literals.append(view[position:])
    template = PartTemplate(
        html=html_part,
        literals=tuple(literals),
        slots=tuple(slot for _, _, slot in slots),
        encoding=encoding,
        charset=charset,
        newline=newline,
        original=body,
    )
    if encoding == "identity":
        template = _fit_line_length(template, fields, newline, links, blank=blank)
    return template


def _fit_line_length(
    template: PartTemplate,
    fields: Sequence[HeaderField],
    newline: bytes,
    links: TrackingLinks,
    *,
    blank: bytes,
) -> PartTemplate:
    """A 7bit/8bit part whose rewritten lines could pass 998 bytes is re-encoded as QP."""
    probe = _Recipient.of(links, _PROBE_ID)
    if _LONG_LINE.search(template.render(probe)) is None:
        return template
    kept = b"".join(f.raw for f in fields if f.key != "content-transfer-encoding")
    new_head = kept + b"Content-Transfer-Encoding: quoted-printable" + newline + blank
    return replace(template, encoding="quoted-printable", new_head=new_head)


#: Body parts up to this size are read once for every message that carries them (see
#: ``_shared_part_template``); 32 of them are remembered, at most a few MB.
SHARED_TEMPLATE_MAX_BYTES = 64 * 1024


class _Body:
    """A body part's bytes as a memo key: equal by the bytes, hashed by their length and
    ends. Hashing the whole of a 28 KB part cost more than the rest of looking it up; the
    bytes are still compared in full on a hit (``memcmp``, which also stops at the first
    difference of a personalised body whose hash is the same)."""

    __slots__ = ("_hash", "data")

    _ENDS = 256

    def __init__(self, data: bytes) -> None:
        self.data = data
        ends = self._ENDS
        self._hash = hash((len(data), data[:ends], data[-ends:]))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Body) and self.data == other.data


@lru_cache(maxsize=32)
def _shared_part_template(
    fields: tuple[HeaderField, ...],
    info: ContentInfo,
    body: _Body,
    newline: bytes,
    links: TrackingLinks,
    blank: bytes,
) -> PartTemplate | None:
    """``_part_template`` remembered by everything it reads: the part's header fields and
    content info, its body bytes as received, the line breaks and the tracker. A campaign
    sends one message per recipient, each with its own boundaries and Message-ID but
    (unless personalised) the same text and HTML parts: the part is then decoded and its
    links found once, not once per message. Templates are immutable and hold their own
    copy of the body (``body`` is one), never a view into a message buffer. A part whose
    bytes differ (a personalised body) costs a copy and a comparison, and misses."""
    template = _part_template(fields, info, body.data, newline, links, blank=blank)
    return None if template is None else replace(template, shared=True)


def _splice_for(buf: bytes, part: MimePart, newline: bytes, links: TrackingLinks) -> _Splice | None:
    info = part.info
    if info.content_type not in ("text/html", "text/plain") or info.is_attachment:
        return None  # (_part_template would say so; checked first: no slice of the body)
    if not part.has_body:
        return None
    body_start = part.body_start
    blank = b"\r\n" if buf[max(0, body_start - 2) : body_start] == b"\r\n" else b"\n"
    body = memoryview(buf)[body_start : part.end]
    if part.depth > 0 and len(body) <= SHARED_TEMPLATE_MAX_BYTES:
        key = _Body(bytes(body))
        template = _shared_part_template(part.fields, part.info, key, newline, links, blank)
    else:
        template = _part_template(part.fields, part.info, body, newline, links, blank=blank)
    if template is None:
        return None
    if part.depth == 0:
        return _Splice(body_start, part.end, template, top_level=True)
    if template.new_head is not None:
        return _Splice(part.start, part.end, template)  # the part's header is replaced too
    return _Splice(body_start, part.end, template)


def _blank_len(text: bytes) -> int:
    """Length of the line break ``text`` starts with."""
    return 2 if text[:2] == b"\r\n" else 1


def plan_body(
    fields: Sequence[HeaderField], rest: bytes, newline: bytes, links: TrackingLinks
) -> BodyTemplate:
    """The message's body template (``rest`` starts at the blank line ending the headers).

    Raises on input it cannot make sense of; the caller falls back to headers only."""
    return plan_body_at(rest, 0, fields, newline, links)


def plan_body_at(
    buf: bytes,
    body_offset: int,
    fields: Sequence[HeaderField],
    newline: bytes,
    links: TrackingLinks,
    *,
    parts: Sequence[MimePart] | None = None,
) -> BodyTemplate:
    """``plan_body`` for ``buf[body_offset:]`` (the message as received), without copying
    the body out of it. ``parts``: the message's MIME walk, when already done on ``buf``
    with the same top-level fields (the attachment check's strict walk, see
    ``lenient_parts``): the body is then not walked again."""
    if body_offset >= len(buf):
        return BodyTemplate(gaps=(b"",), parts=())
    if "" in [f.name for f in fields]:
        raise ValueError("a header line is not a header field")
    if parts is None:
        blank = 2 if buf[body_offset : body_offset + 2] == b"\r\n" else 1
        parts = list(
            walk_body(buf, fields, body_offset + blank, strict=False, into_attached_messages=False)
        )
    splices: list[_Splice] = []
    tracked = 0
    for found in parts:
        splice = _splice_for(buf, found, newline, links)
        if splice is None:
            continue
        tracked += splice.part.clicks
        if tracked > MAX_TRACKED_LINKS:
            raise ValueError("too many links to track")
        splices.append(splice)
    top_cte = None
    view = memoryview(buf)
    gaps: list[bytes | memoryview] = []
    templates: list[PartTemplate] = []
    position = body_offset
    for splice in splices:
        part = splice.part
        if splice.top_level and part.new_head is not None:
            # the message is this part: its Content-Transfer-Encoding is in the header block
            top_cte = b"quoted-printable"
            part = replace(part, new_head=None)
        gaps.append(view[position : splice.start])
        templates.append(part)
        position = splice.end
    gaps.append(view[position:])
    return BodyTemplate(gaps=tuple(gaps), parts=tuple(templates), top_cte=top_cte)


def lenient_parts(strict: Sequence[MimePart]) -> list[MimePart]:
    """The parts a lenient walk that does not enter attached messages (the body rewrite's)
    yields, from a strict walk that entered them and raised nowhere (the attachment
    check's): the same parts, in the same order, less those inside attached messages."""
    return [part for part in strict if not part.in_attached_message]


# --- a whole recipient copy -----------------------------------------------------------------

LIST_UNSUBSCRIBE_POST = "List-Unsubscribe=One-Click"


@dataclass(frozen=True)
class MessagePlan:
    """A message read once (headers and body), ready to render per recipient."""

    prepared: PreparedMessage
    body: BodyTemplate | None
    """``None`` when the body could not be read: copies get the headers-only rewrite."""

    @property
    def fell_back(self) -> bool:
        return self.body is None


def plan_message(
    prepared: PreparedMessage,
    links: TrackingLinks,
    *,
    parts: Sequence[MimePart] | None = None,
) -> MessagePlan:
    """Read the body once; never raises (a body it cannot read is passed through).
    ``parts``: see ``plan_body_at`` (from the message's strict walk, all its parts)."""
    try:
        body = plan_body_at(
            prepared.source,
            prepared.body_offset,
            prepared.fields,
            prepared.newline,
            links,
            parts=lenient_parts(parts) if parts is not None else None,
        )
    except Exception:
        body = None
    return MessagePlan(prepared, body)


def render_copy(
    plan: MessagePlan, links: TrackingLinks, *, mailgate_id: str, domain: str, tracking: bool
) -> tuple[bytes, bool]:
    """``(copy, fell_back)``: one recipient's message with its unsubscribe headers, and
    (``tracking``) click links and open pixel; ``fell_back`` when only the headers could be
    rewritten here (the body is then passed through as received). Never raises."""
    unsubscribe_url = links.unsubscribe_url(mailgate_id)
    headers = (
        ("List-Unsubscribe", links.list_unsubscribe(mailgate_id, unsubscribe_url)),
        ("List-Unsubscribe-Post", LIST_UNSUBSCRIBE_POST),
    )
    body: list[bytes | memoryview] | None = None
    transfer_encoding = None
    fell_back = False
    if plan.body is not None:
        try:
            body = plan.body.pieces(
                links, mailgate_id, tracking=tracking, unsubscribe_url=unsubscribe_url
            )
            transfer_encoding = plan.body.top_cte
        except Exception:
            body = transfer_encoding = None
            fell_back = True
    copy = render(
        plan.prepared,
        mailgate_id=mailgate_id,
        domain=domain,
        extra_headers=headers,
        body=body,
        transfer_encoding=transfer_encoding,
    )
    return copy, fell_back
