"""aiosmtpd's SMTP protocol with mailgate's replies.

aiosmtpd answers several situations itself before a handler hook runs (MAIL without AUTH ->
530, a malformed RCPT -> 553, SIZE and DATA limits -> 552, AUTH via a synchronous
authenticator). specs/smtp-rules.md fixes other texts, so those commands are overridden
here; policy (who may send what) stays in ``handlers.IngestHandler``.
"""

from __future__ import annotations

import asyncio
import collections
import re
from base64 import b64decode
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, syntax

from . import replies
from .metrics import Metrics
from .replies import Reply, TransientError

if TYPE_CHECKING:
    import ssl

    from .handlers import IngestHandler

_ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_REPLY = re.compile(r"(\d{3}) (.*)", re.DOTALL)
_DEFAULT_ENHANCED = {
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    552: "5.3.4",
    553: "5.1.3",
    555: "5.5.4",
}
_NO_ENHANCED = {220, 235, 334, 354}
_TIMEOUT_RESET_BYTES = 1 << 20


class Intake:
    """What the service knows about its SMTP sessions: drain state and in-flight DATA."""

    def __init__(self) -> None:
        self.sessions: set[MailgateSMTP] = set()
        self.draining = False
        self._in_data = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_data(self) -> int:
        return self._in_data

    def enter_data(self) -> None:
        self._in_data += 1
        self._idle.clear()

    def leave_data(self) -> None:
        self._in_data -= 1
        if self._in_data <= 0:
            self._in_data = 0
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no session is inside DATA; ``False`` when ``timeout_s`` ran out."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def shown_address(arg: str) -> str:
    """The address as the client wrote it, for a reply text (one line, bounded)."""
    text = arg.strip()
    if text.startswith("<"):
        text = text[1:]
        text = text.split(">", 1)[0]
    text = "".join(ch for ch in text if ch.isprintable())
    return text[:256]


class MailgateSMTP(SMTP):
    """One SMTP connection. ``implicit_tls`` marks the SMTPS listener (TLS from byte one)."""

    event_handler: IngestHandler

    def __init__(
        self,
        handler: IngestHandler,
        *,
        intake: Intake,
        metrics: Metrics,
        hostname: str,
        max_message_size: int,
        tls_context: ssl.SSLContext | None,
        implicit_tls: bool = False,
        auth_require_tls: bool = True,
        timeout_s: float = 300.0,
    ):
        super().__init__(
            handler,
            data_size_limit=None,  # our own limit and text, see smtp_MAIL hook and smtp_DATA
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="mailgate ESMTP",
            tls_context=None if implicit_tls else tls_context,
            auth_require_tls=auth_require_tls,
            timeout=timeout_s,
            loop=asyncio.get_running_loop(),
        )
        # aiosmtpd keeps these limits in a class-level dict shared by every connection and
        # grows it on each EHLO; an instance dict sized for SIZE=/SMTPUTF8/BODY= params.
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit, {"MAIL": 1024, "RCPT": 1024}
        )
        self.intake = intake
        self.metrics = metrics
        self.max_message_size = max_message_size
        self.implicit_tls = implicit_tls

    # --- connection bookkeeping ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self not in self.intake.sessions:
            self.intake.sessions.add(self)
            self.metrics.sessions.inc()

    def connection_lost(self, error: Exception | None) -> None:
        if self in self.intake.sessions:
            self.intake.sessions.discard(self)
            self.metrics.sessions.dec()
        super().connection_lost(error)

    @property
    def is_tls(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    @property
    def client_ip(self) -> str | None:
        peer = self.session.peer if self.session is not None else None
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return None

    def close_now(self) -> None:
        """Close the connection and end the command loop after the current reply."""
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    async def push(self, status: Any) -> None:
        if isinstance(status, Reply):
            status = str(status)
        if isinstance(status, str):
            status = self._with_enhanced_code(status)
        await super().push(status)

    def _with_enhanced_code(self, status: str) -> str:
        """RFC 2034: every reply (but greeting, HELO/EHLO, 334/354) carries x.y.z."""
        match = _REPLY.fullmatch(status)
        if match is None or _ENHANCED.match(status):
            return status
        code = int(match.group(1))
        if code in _NO_ENHANCED or code < 200 or match.group(2) == self.hostname:
            return status
        enhanced = _DEFAULT_ENHANCED.get(code, f"{code // 100}.0.0")
        return f"{code} {enhanced} {match.group(2)}"

    async def reject(self, reply: Reply) -> None:
        self.metrics.rejected.labels(reply.reason or "other").inc()
        await self.push(str(reply))

    async def refuse_and_close(self, reply: Reply) -> None:
        if reply.reason:
            self.metrics.rejected.labels(reply.reason).inc()
        await self.push(str(reply))
        self.close_now()

    # --- aiosmtpd overrides ----------------------------------------------------------------

    async def check_auth_needed(self, caller_method: str) -> bool:
        assert self.session is not None
        if caller_method in {"MAIL", "RCPT", "DATA"} and not self.session.authenticated:
            await self.reject(replies.MUST_AUTHENTICATE)
            return True
        return False

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [
            self.hostname,
            f"SIZE {self.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if self.tls_context is not None and not self.is_tls:
            lines.append("STARTTLS")
        if self.is_tls or not self._auth_require_tls:
            lines.append("AUTH PLAIN LOGIN")
        text = "\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}"
        await self.push(text.encode())

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        assert self.session is not None
        if not self.session.extended_smtp:
            await self.push("503 5.5.1 Error: send EHLO first")
            return
        if self._auth_require_tls and not self.is_tls:
            await self.push(str(replies.AUTH_NEEDS_TLS))
            return
        if self.session.authenticated:
            await self.push("503 5.5.1 Already authenticated")
            return
        if not arg:
            await self.push("501 5.5.4 Syntax: AUTH <mechanism>")
            return
        if self.event_handler.auth_blocked(self.client_ip):
            await self.refuse_and_close(replies.AUTH_THROTTLED)
            return
        args = arg.split()
        mechanism = args[0].upper()
        if len(args) > 2:
            await self.push("501 5.5.4 Too many values")
            return
        if mechanism == "PLAIN":
            pair = await self._read_plain(args)
        elif mechanism == "LOGIN":
            pair = await self._read_login(args)
        else:
            await self.push("504 5.5.4 Unrecognized authentication type")
            return
        if pair is None:
            return  # the reply was sent while reading
        username, password = pair
        try:
            principal = await self.event_handler.authenticate(username, password, self.client_ip)
        except TransientError:
            await self.push(str(replies.AUTH_TEMPORARY))
            return
        if principal is None:
            await self.push(str(replies.AUTH_INVALID))
            return
        self.session.authenticated = True
        self.session.auth_data = principal
        await self.push(str(replies.AUTH_OK))

    async def _initial_response(self, text: str) -> bytes | None:
        if text == "=":  # RFC 4954: an empty initial response
            return b""
        try:
            return b64decode(text.encode(), validate=True)
        except ValueError:
            await self.push("501 5.5.2 Can't decode base64")
            return None

    async def _challenge(self, prompt: str) -> bytes | None:
        answer = await self.challenge_auth(prompt)
        return answer if isinstance(answer, bytes) else None  # MISSING: reply already sent

    async def _read_plain(self, args: list[str]) -> tuple[str, str] | None:
        if len(args) == 1:
            blob = await self._challenge("")
        else:
            blob = await self._initial_response(args[1])
        if blob is None:
            return None
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return None
        _authz, login, password = parts
        return login.decode("utf-8", "replace"), password.decode("utf-8", "replace")

    async def _read_login(self, args: list[str]) -> tuple[str, str] | None:
        if len(args) == 1:
            login = await self._challenge("Username:")
        else:
            login = await self._initial_response(args[1])
        if login is None:
            return None
        password = await self._challenge("Password:")
        if password is None:
            return None
        return login.decode("utf-8", "replace"), password.decode("utf-8", "replace")

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.intake.draining:
            await self.refuse_and_close(replies.SHUTTING_DOWN)
            return
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("RCPT"):
            return
        assert self.envelope is not None
        if not self.envelope.mail_from:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        syntaxerr = "501 5.5.4 Syntax: RCPT TO: <address>"
        if arg is None:
            await self.push(syntaxerr)
            return
        stripped = self._strip_command_keyword("TO:", arg)
        if stripped is None:
            await self.push(syntaxerr)
            return
        address, params = self._getaddr(stripped)
        if not address:
            await self.reject(replies.invalid_recipient(shown_address(stripped)))
            return
        options = (params or "").upper().split()
        if self._getparams(options) is None:
            await self.push(syntaxerr)
            return
        if options:
            await self.push("555 5.5.4 RCPT TO parameters not recognized or not implemented")
            return
        status = await self._call_handler_hook("RCPT", address, options)
        await self.push(status)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self.intake.enter_data()
        try:
            await self._receive_data()
        finally:
            self.intake.leave_data()

    async def _receive_data(self) -> None:
        """Read the message up to the lone dot; past the size limit keep reading but drop
        the data (the reply must wait for the end, RFC 5321 4.2.5), then answer 554."""
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.max_message_size
        content = bytearray()
        size = 0
        too_big = False
        at_line_start = True
        next_reset = _TIMEOUT_RESET_BYTES
        while True:
            try:
                chunk = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                # A line longer than the reader's buffer limit: take it in fragments.
                chunk = await self._reader.read(exc.consumed)
            except asyncio.IncompleteReadError:
                self.close_now()
                raise asyncio.CancelledError() from None
            if at_line_start:
                if chunk == b".\r\n":
                    break
                if chunk[:1] == b".":
                    chunk = chunk[1:]  # RFC 5321 4.5.2 dot-stuffing
            at_line_start = chunk.endswith(b"\r\n")
            size += len(chunk)
            if not too_big:
                if size > limit:
                    too_big = True
                    content = bytearray()
                else:
                    content += chunk
            if size >= next_reset:
                self._reset_timeout()
                next_reset += _TIMEOUT_RESET_BYTES
        assert self.envelope is not None
        if too_big:
            self._set_post_data_state()
            await self.reject(replies.TOO_BIG)
            return
        self.envelope.content = self.envelope.original_content = bytes(content)
        del content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)
