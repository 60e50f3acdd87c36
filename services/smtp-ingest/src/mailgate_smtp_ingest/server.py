"""aiosmtpd's SMTP protocol with mailgate's replies.

aiosmtpd answers several situations itself before a handler hook runs (MAIL without AUTH ->
530, a malformed RCPT -> 553, SIZE and DATA limits -> 552, AUTH via a synchronous
authenticator). specs/smtp-rules.md fixes other texts, so those commands are overridden
here; policy (who may send what) stays in ``handlers.IngestHandler``.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import math
import operator
import re
from base64 import b64decode
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import (
    BOGUS_LIMIT,
    MISSING,
    SMTP,
    Session,
    TLSSetupException,
    _AuthMechAttr,
    login_always_fail,
    sanitized_log,
    syntax,
)

from . import replies
from .metrics import Metrics
from .replies import Reply, TransientError

if TYPE_CHECKING:
    import ssl

    from prometheus_client import Gauge

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
#: What aiosmtpd puts in ``session.ssl`` after STARTTLS (the SSL transport's extra info).
_TLS_EXTRA = ("sslcontext", "peercert", "cipher", "compression", "ssl_object")
#: The most DATA bytes one reader call returns (the reader buffers up to twice this).
_DATA_READ_LIMIT = 256 * 1024
#: aiosmtpd's logger (app.py sets it to WARNING: it logs every command at INFO).
_WIRE_LOG = logging.getLogger("mail.log")
#: Replies sent on every connection, ready to write (the text ``push`` would make of them).
_AUTH_OK = f"{replies.AUTH_OK}\r\n".encode()
_BYE = b"221 2.0.0 Bye\r\n"
_NOOP_OK = b"250 2.0.0 OK\r\n"
#: Command line limits after EHLO (SIZE=, SMTPUTF8, BODY= params); other commands: the default.
_MAIL_LIMITS = {"MAIL": 1024, "RCPT": 1024}
_COMMAND_SIZE_LIMIT = SMTP.command_size_limit
#: Reply texts as written on the wire (enhanced code, UTF-8, CRLF), by the server's hostname
#: (a reply naming it gets no enhanced code), then by the text ``push`` was given.
_WIRE_REPLIES: dict[str, dict[str, bytes]] = {}
#: The most texts remembered per hostname (texts naming an address or a queue id vary; the
#: memo starts over when full).
_WIRE_REPLIES_LIMIT = 512


def _command_size_limit() -> int:
    return _COMMAND_SIZE_LIMIT


@dataclass(frozen=True)
class _MethodTables:
    """What aiosmtpd's ``SMTP.__init__`` looks up by introspection on every connection
    (``inspect.getmembers`` of the protocol and the handler, ``dir`` of both: a third of a
    millisecond per connection), found once per protocol class and handler."""

    smtp: tuple[str, ...]
    """``smtp_*`` attribute names of the protocol."""
    commands: tuple[str, ...]
    """The commands of ``smtp`` (the names without ``smtp_``), in the same order."""
    smtp_getter: operator.attrgetter[Any]
    """``smtp``'s bound methods in one call (a tuple, in ``smtp``'s order)."""
    auth: tuple[tuple[str, str, bool], ...]
    """``(mechanism, attribute name, on the protocol itself)`` in aiosmtpd's order."""
    hooks: dict[str, Any]
    """aiosmtpd's ``_handle_hooks``: the handler's bound ``handle_*`` methods."""
    ehlo_hook_ver: str | None

    @classmethod
    def of(cls, protocol: SMTP) -> _MethodTables:
        """The tables of a protocol that aiosmtpd's own ``__init__`` set up."""
        handler = protocol.event_handler
        auth = tuple(
            (
                getattr(
                    method,
                    "__auth_mechanism_name__",
                    name.replace("auth_", "").replace("__", "-"),
                ),
                name,
                obj is protocol,
            )
            for obj in (protocol, handler)
            for name, method in inspect.getmembers(obj)
            if name.startswith("auth_")
        )
        smtp = tuple(name for name in dir(protocol) if name.startswith("smtp_"))
        return cls(
            smtp=smtp,
            commands=tuple(name.replace("smtp_", "") for name in smtp),
            smtp_getter=operator.attrgetter(*smtp),
            auth=auth,
            hooks=dict(protocol._handle_hooks),
            ehlo_hook_ver=protocol._ehlo_hook_ver,
        )


class Intake:
    """What the service knows about its SMTP sessions: drain state and open transactions.

    At shutdown the service waits (up to a grace period) until no session is inside DATA
    and none has an open transaction (MAIL FROM accepted, DATA not finished): a client that
    is between RCPT and DATA may still complete its message; new MAIL commands get 421.
    """

    def __init__(self, *, max_connections_per_ip: int = 0) -> None:
        self.sessions: set[MailgateSMTP] = set()
        self.draining = False
        self.max_connections_per_ip = max_connections_per_ip
        self._per_ip: dict[str, int] = {}  # (a dict: Counter's missing-key path is Python)
        self._in_data = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.method_tables: dict[tuple[type[SMTP], object], _MethodTables] = {}
        #: EHLO replies by (hostname, size limit, STARTTLS offered, AUTH offered).
        self.ehlo_replies: dict[tuple[str, int, bool, bool], bytes] = {}

    def count_sessions_in(self, gauge: Gauge) -> None:
        """Report the open sessions through ``gauge``, read when it is scraped (instead of
        an increment and a decrement, each under the metric's lock, per connection)."""
        sessions = self.sessions
        gauge.set_function(lambda: len(sessions))

    @property
    def in_data(self) -> int:
        return self._in_data

    def admit(self, ip: str | None) -> bool:
        """Count a new connection from ``ip``; ``False`` (not counted) when it has too many."""
        if ip is None:
            return True
        count = self._per_ip.get(ip, 0)
        if 0 < self.max_connections_per_ip <= count:
            return False
        self._per_ip[ip] = count + 1
        return True

    def release(self, ip: str | None) -> None:
        if ip is None:
            return
        count = self._per_ip.get(ip, 0)
        if count > 1:
            self._per_ip[ip] = count - 1
        elif count == 1:
            del self._per_ip[ip]

    def enter_data(self) -> None:
        self._in_data += 1
        self._idle.clear()

    def leave_data(self) -> None:
        self._in_data -= 1
        if self._in_data <= 0:
            self._in_data = 0
            self._idle.set()

    @property
    def open_transactions(self) -> int:
        return sum(1 for session in self.sessions if session.in_transaction)

    async def wait_idle(self, timeout_s: float, *, poll_s: float = 0.05) -> bool:
        """Wait until no session is inside DATA or a transaction; ``False`` when
        ``timeout_s`` ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            try:
                await asyncio.wait_for(self._idle.wait(), max(remaining, 0.0))
            except TimeoutError:
                return False
            if not self.open_transactions:
                return True
            if remaining <= 0:
                return False
            await asyncio.sleep(min(poll_s, remaining))


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: ``<local@domain> params`` with a dot-atom local part and a plain domain: what nearly every
#: client sends, parsed here without aiosmtpd's RFC 5322 parser (1 ms per MAIL and RCPT).
_PLAIN_PATH = re.compile(
    rf"\s*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:\s+(.*)|)",
    re.DOTALL,
)


def shown_address(arg: str) -> str:
    """The address as the client wrote it, for a reply text (one line, bounded)."""
    text = arg.strip()
    if text.startswith("<"):
        text = text[1:]
        text = text.split(">", 1)[0]
    text = "".join(ch for ch in text if ch.isprintable())
    return text[:256]


def _last_two(tail: bytes, chunk: bytes) -> bytes:
    """The last two bytes of ``tail + chunk`` (without copying a large chunk)."""
    return chunk[-2:] if len(chunk) >= 2 else (tail + chunk)[-2:]


def _undo_dot_stuffing(data: bytearray) -> bytearray:
    """RFC 5321 4.5.2: a line starting with a dot lost that first dot in transit."""
    if data.startswith(b"."):
        del data[0]
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n")
    return data


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
        key = (type(self), handler)
        tables = intake.method_tables.get(key)
        if tables is None:  # the first connection: aiosmtpd's own __init__, then remember
            super().__init__(
                handler,
                data_size_limit=None,  # our own limit and text, see smtp_MAIL hook, smtp_DATA
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=hostname,
                ident="mailgate ESMTP",
                tls_context=None if implicit_tls else tls_context,
                auth_require_tls=auth_require_tls,
                timeout=timeout_s,
                loop=asyncio.get_running_loop(),
            )
            intake.method_tables[key] = _MethodTables.of(self)
        else:
            self._init_like_aiosmtpd(
                handler,
                tables,
                hostname=hostname,
                tls_context=None if implicit_tls else tls_context,
                auth_require_tls=auth_require_tls,
                timeout_s=timeout_s,
            )
        # aiosmtpd keeps these limits in a class-level dict shared by every connection and
        # grows it on each EHLO; an instance dict sized for SIZE=/SMTPUTF8/BODY= params.
        self.command_size_limits = collections.defaultdict(_command_size_limit, _MAIL_LIMITS)
        self.intake = intake
        self.metrics = metrics
        self.max_message_size = max_message_size
        self.implicit_tls = implicit_tls
        self._admitted_ip: str | None = None
        self._refused = False
        self._released = False
        self._idle_deadline = 0.0
        self._timer_due = math.inf  # when the armed idle timer fires (inf: none armed)
        self._quit = False  # QUIT answered: our command loop ends after the command
        self._wire_replies = _WIRE_REPLIES.setdefault(hostname, {})
        self._own_loop = False  # the command loop is ours (not aiosmtpd's, see _handle_client)

    def _init_like_aiosmtpd(
        self,
        handler: IngestHandler,
        tables: _MethodTables,
        *,
        hostname: str,
        tls_context: ssl.SSLContext | None,
        auth_require_tls: bool,
        timeout_s: float,
    ) -> None:
        """The state aiosmtpd 1.4's ``SMTP.__init__`` sets up for the arguments passed above,
        with its introspection replaced by ``tables`` (tests/unit/test_smtp_ingest_protocol.py
        compares the two, so an aiosmtpd upgrade that adds state fails there)."""
        loop = asyncio.get_running_loop()
        self.__ident__ = "mailgate ESMTP"
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.event_handler = handler
        self.data_size_limit = None
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = None if tls_context is None else False  # (aiosmtpd's value)
        self._timeout_duration = timeout_s
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = auth_require_tls
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = {
            mechanism: _AuthMechAttr(getattr(self if own else handler, name), own)
            for mechanism, name, own in tables.auth
        }
        self._handle_hooks = dict(tables.hooks)
        self._ehlo_hook_ver = tables.ehlo_hook_ver
        self._smtp_methods = dict(zip(tables.commands, tables.smtp_getter(self), strict=True))
        self._enforce_call_limit = False

    # --- connection bookkeeping ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # (aiosmtpd's STARTTLS calls this again; ours does not)
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if not self.intake.admit(ip):  # slowloris: one address cannot hold every slot
            self._refused = True
            self.metrics.rejected.labels(replies.TOO_MANY_CONNECTIONS.reason).inc()
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(f"{replies.TOO_MANY_CONNECTIONS}\r\n".encode())
            transport.close()
            return
        self._admitted_ip = ip
        # aiosmtpd's connection_made for a new connection, with the peer address asked once
        # (a getpeername system call under uvloop).
        self._set_rset_state()  # type: ignore[no-untyped-call]
        session = self.session = self._create_session()
        session.peer = peer
        self._reset_timeout()
        asyncio.StreamReaderProtocol.connection_made(self, transport)
        self.transport = transport
        _WIRE_LOG.info("Peer: %r", peer)
        task = self._handler_coroutine = self.loop.create_task(self._handle_client())
        self.intake.sessions.add(self)
        task.add_done_callback(self._handler_done)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused or self._released:  # (a failed STARTTLS reports its loss itself)
            return
        self.intake.release(self._admitted_ip)
        self._admitted_ip = None
        if self in self.intake.sessions:
            self.intake.sessions.discard(self)
        super().connection_lost(error)
        task = self._handler_coroutine
        if task is None or task.done():  # (QUIT: the command loop ended first)
            self._release_references()

    def _handler_done(self, _task: asyncio.Task[None]) -> None:
        if self.transport is None and not self._released:  # connection_lost came first
            self._release_references()

    def _release_references(self) -> None:
        """Once the connection is closed and its command loop has ended, drop what ties the
        connection's objects into reference cycles (bound methods of ``self`` in the command
        tables, the loop's task and its CancelledError's traceback, the stream writer, the
        idle timer, the plain transport under TLS), so that reference counting frees them at
        once. Left to the garbage collector, the ~65 objects of every closed connection kept
        its generation-1 collections busy: a few percent of a connection's CPU."""
        self._released = True
        self._smtp_methods = {}
        self._auth_methods = {}
        self._client_connected_cb = None  # (asyncio's StreamReaderProtocol: a bound method)
        self._handler_coroutine = None
        self._timeout_handle = None
        self._timer_due = math.inf
        self._writer = None  # type: ignore[assignment]
        self._reader = None  # type: ignore[assignment]
        self._original_transport = None
        self._tls_protocol = None

    @property
    def in_transaction(self) -> bool:
        """MAIL FROM was accepted and the transaction has not ended (DATA, RSET, close)."""
        envelope = self.envelope
        return self.transport is not None and envelope is not None and bool(envelope.mail_from)

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
        """aiosmtpd's ``push`` (one write, then drain) with enhanced status codes added; the
        wire form of a text is remembered (most replies are a few fixed texts)."""
        if isinstance(status, Reply):
            status = str(status)
        if isinstance(status, str):
            memo = self._wire_replies
            wire = memo.get(status)
            if wire is None:
                wire = f"{self._with_enhanced_code(status)}\r\n".encode()  # SMTPUTF8: UTF-8
                if len(memo) >= _WIRE_REPLIES_LIMIT:
                    memo.clear()
                memo[status] = wire
        else:
            wire = status + b"\r\n"
        if self._write(wire):
            await self._writer.drain()

    async def _send(self, line: bytes) -> None:
        """Write one finished reply (CRLF included), then drain when that has something to
        do (see ``_write``)."""
        if self._write(line):
            await self._writer.drain()

    def _write(self, line: bytes) -> bool:
        """Write ``line``; ``True`` when ``StreamWriter.drain`` has something to do (the
        transport paused writing or is closing, the connection is lost, the reader failed).
        Otherwise drain would return at once, after two coroutine frames per reply."""
        transport = self._writer._transport  # type: ignore[attr-defined]
        transport.write(line)  # (StreamWriter.write's one line, without its frame)
        return bool(  # (the attributes behind asyncio's properties: no call for each)
            self._paused  # type: ignore[attr-defined]  # (asyncio's FlowControlMixin)
            or self._connection_lost  # type: ignore[attr-defined]
            or transport.is_closing()
            or self._reader._exception is not None  # type: ignore[attr-defined]
        )

    def _with_enhanced_code(self, status: str) -> str:
        """RFC 2034: every reply (but greeting, HELO/EHLO, 334/354) carries x.y.z."""
        if _ENHANCED.match(status):  # most replies already do: one anchored match
            return status
        match = _REPLY.fullmatch(status)
        if match is None:
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

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The idle timer. aiosmtpd cancels it and schedules a new one on every command;
        here the deadline moves and the armed timer, when it fires before the deadline,
        re-arms itself: one timer per idle period instead of one per command."""
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        if deadline < self._timer_due:  # none armed, or it must fire sooner
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._timer_due = deadline
            self._timeout_handle = self.loop.call_at(deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        self._timer_due = math.inf
        if self.transport is None:
            return
        deadline = self._idle_deadline
        if self.loop.time() < deadline:  # there was activity since the timer was armed
            self._timer_due = deadline
            self._timeout_handle = self.loop.call_at(deadline, self._timeout_cb)
            return
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def _handle_client(self) -> None:
        """aiosmtpd's command loop, with the same checks and replies in the same order,
        minus what its profile showed per command: the wire log's sanitising when the
        log is off, and the timer handle (see ``_reset_timeout``). Settings this service
        never uses (PROXY protocol, call limits, require_starttls, no SMTPUTF8) run
        aiosmtpd's own loop."""
        if (
            self._proxy_timeout is not None
            or self._enforce_call_limit
            or self.require_starttls
            or not self.enable_SMTPUTF8
        ):
            await super()._handle_client()
            return
        self._own_loop = True
        reader = self._reader
        assert self.session is not None and reader is not None
        session: Session = self.session
        methods = self._smtp_methods
        await self._send(f"220 {self.hostname} {self.__ident__}\r\n".encode())
        bogus_budget = BOGUS_LIMIT
        wire_log = _WIRE_LOG.isEnabledFor(logging.INFO)  # (a level change: next connection)
        loop_time = self.loop.time
        # No command's size limit is below this one (they only grow): a shorter line needs
        # no look-up of its command's limit.
        short_limit = min(
            _COMMAND_SIZE_LIMIT, self.command_size_limit, *self.command_size_limits.values()
        )
        while self.transport is not None and not self._quit:
            try:
                try:
                    line: bytes = await reader.readuntil()
                except asyncio.LimitOverrunError as error:
                    await self._skip_long_line(error.consumed)
                    await self.push("500 Command line too long")
                    continue
                line = line.rstrip(b"\r\n")
                if wire_log:
                    sanitized_log(_WIRE_LOG.info, "%r >> %r", session.peer, line)
                if not line:
                    await self.push("500 Error: bad syntax")
                    continue
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                except UnicodeDecodeError:
                    await self.push("500 Error: bad syntax")
                    continue
                # Arguments are UTF-8 with surrogateescape: non-UTF-8 bytes survive.
                arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") if arg_bytes else None
                assert self.session is not None
                session = self.session  # (STARTTLS makes a new one)
                if len(line) > short_limit and len(line) > (
                    self.command_size_limits.get(command, _COMMAND_SIZE_LIMIT)
                    if session.extended_smtp
                    else self.command_size_limit
                ):
                    await self.push("500 Command line too long")
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push("554 Command refused due to lack of security")
                    continue
                method = methods.get(command)
                if method is None:
                    _WIRE_LOG.warning("%r unrecognised: %s", session.peer, command)
                    bogus_budget -= 1
                    if bogus_budget < 1:
                        _WIRE_LOG.warning("%r too many bogus commands", session.peer)
                        await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                        self.transport.close()
                        continue
                    await self.push(f'500 Error: command "{command}" not recognized')
                    continue
                # A valid command: the idle deadline moves (_reset_timeout, inline unless
                # the armed timer must fire sooner).
                deadline = self._idle_deadline = loop_time() + self._timeout_duration
                if deadline < self._timer_due:
                    self._reset_timeout()
                await method(arg)
            except (asyncio.CancelledError, ConnectionResetError):
                _WIRE_LOG.info("%r Connection lost during _handle_client()", session.peer)
                self._writer.close()
                raise
            except Exception as error:
                await self._answer_exception(error)

    async def _skip_long_line(self, consumed: int) -> None:
        """Read up to the end of an over-long command line (aiosmtpd's handling)."""
        reader = self._reader
        await reader.read(consumed)
        while True:
            try:
                await reader.readuntil()
                return
            except asyncio.LimitOverrunError as error:
                await reader.read(error.consumed)

    async def _answer_exception(self, error: Exception) -> None:
        """What aiosmtpd's loop does with an exception a command raised."""
        status = None
        try:
            status = await self.handle_exception(error)
        except Exception as inner_error:
            try:
                peer = self.session.peer if self.session is not None else None
                _WIRE_LOG.exception("%r Exception in handle_exception()", peer)
                status = f"500 Error: ({inner_error.__class__.__name__}) {inner_error}"
            except Exception:
                status = "500 Error: Cannot describe error"
        finally:
            if isinstance(error, TLSSetupException):
                assert self.transport is not None
                self.transport.close()
                self.connection_lost(error)
            else:
                await self.push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser, with a fast path giving the same answer for plain
        ``<local@domain>`` paths (anything else goes through aiosmtpd, whose crashes on
        odd input count as an unparseable address)."""
        match = _PLAIN_PATH.fullmatch(arg) if arg else None
        if match is None:
            try:
                return super()._getaddr(arg)
            except Exception:  # the email package's parser trips on some input ("<a@[>")
                return None, None
        address = match.group(1)
        limit = self.local_part_limit
        if limit and len(address.rpartition("@")[0]) > limit:
            return None, None
        return address, match.group(2) or ""

    async def check_auth_needed(self, caller_method: str) -> bool:
        assert self.session is not None
        if caller_method in {"MAIL", "RCPT", "DATA"} and not self.session.authenticated:
            await self.reject(replies.MUST_AUTHENTICATE)
            return True
        return False

    def _needs_helo_or_auth(self) -> bool:
        """``check_helo_needed`` or ``check_auth_needed`` would answer (RCPT, DATA): tested
        without their two coroutines per command."""
        session = self.session
        assert session is not None
        return not session.host_name or not session.authenticated

    async def _refuse_before_helo_or_auth(self) -> None:
        """The answer of ``check_helo_needed``, else ``check_auth_needed``."""
        if not await self.check_helo_needed():
            await self.reject(replies.MUST_AUTHENTICATE)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._set_rset_state()  # type: ignore[no-untyped-call]
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        starttls = self.tls_context is not None and not self.is_tls
        auth = self.is_tls or not self._auth_require_tls
        key = (self.hostname, self.max_message_size, starttls, auth)
        reply = self.intake.ehlo_replies.get(key)
        if reply is None:
            reply = self.intake.ehlo_replies[key] = self._ehlo_reply(starttls=starttls, auth=auth)
        await self._send(reply)

    def _ehlo_reply(self, *, starttls: bool, auth: bool) -> bytes:
        lines = [
            self.hostname,
            f"SIZE {self.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if starttls:
            lines.append("STARTTLS")
        if auth:
            lines.append("AUTH PLAIN LOGIN")
        text = "\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}"
        return f"{text}\r\n".encode()

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str | None) -> None:
        """aiosmtpd's QUIT; under our command loop the loop ends by itself after the reply
        instead of being cancelled (a CancelledError thrown through it on every connection)."""
        if arg:
            await self.push("501 Syntax: QUIT")
            return
        status = await self._call_handler_hook("QUIT")
        if status is MISSING:
            await self._send(_BYE)
        else:
            await self.push(status)
        if self._own_loop:
            self._quit = True
        else:
            assert self._handler_coroutine is not None
            self._handler_coroutine.cancel()
        assert self.transport is not None
        self.transport.close()

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str | None) -> None:
        """aiosmtpd's NOOP, with its reply ready-made when the handler has no NOOP hook."""
        if "NOOP" in self._handle_hooks:
            await super().smtp_NOOP(arg)
            return
        if self._write(_NOOP_OK):
            await self._writer.drain()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """aiosmtpd's STARTTLS, on the event loop's own TLS (``loop.start_tls``: uvloop's
        compiled TLS layer in the service) instead of asyncio's pure-Python SSLProtocol,
        whose per-record work was a tenth of a session's CPU. State after the handshake is
        what aiosmtpd's ``connection_made`` sets up for STARTTLS (RFC 3207 4.2: a new
        session, nothing received before the handshake is kept)."""
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 TLS not available")
            return
        await self.push("220 Ready to start TLS")
        plain = self.transport
        assert plain is not None and self._reader is not None
        # Commands pipelined in clear text after STARTTLS are discarded (RFC 3207 4.2);
        # from start_tls on, the socket's bytes go to the TLS layer, not to the reader.
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        self._original_transport = plain  # aiosmtpd's connection_lost closes it
        try:
            secure = await self.loop.start_tls(
                cast("asyncio.WriteTransport", plain), self, self.tls_context, server_side=True
            )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error
        if secure is None:  # the connection went away during the handshake
            raise TLSSetupException()
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.session = self._create_session()
        self.session.peer = secure.get_extra_info("peername")
        self._reset_timeout()
        self._reader._transport = secure  # type: ignore[attr-defined]
        self._writer._transport = secure  # type: ignore[attr-defined]
        self.transport = secure
        self._tls_protocol = secure  # type: ignore[assignment]  # (only tested for None)
        self.session.ssl = {key: secure.get_extra_info(key) for key in _TLS_EXTRA}
        hook = self._handle_hooks.get("STARTTLS")
        self._tls_handshake_okay = True if hook is None else hook(self, self.session, self.envelope)

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
        client_ip = self.client_ip
        if self.event_handler.auth_blocked(client_ip):
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
            principal = await self.event_handler.authenticate(username, password, client_ip)
        except TransientError:
            await self.push(str(replies.AUTH_TEMPORARY))
            return
        if principal is None:
            await self.push(str(replies.AUTH_INVALID))
            return
        self.session.authenticated = True
        self.session.auth_data = principal  # type: ignore[assignment]  # (typed None there)
        await self._send(_AUTH_OK)

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
        if self._needs_helo_or_auth():
            await self._refuse_before_helo_or_auth()
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
        if self._needs_helo_or_auth():
            await self._refuse_before_helo_or_auth()
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self.intake.enter_data()
        # aiosmtpd sizes the reader's buffer limit for command lines (1001 bytes); message
        # data is read in far larger pieces (see _receive_data). StreamReader has no public
        # setter; aiosmtpd itself reaches into the reader the same way for STARTTLS.
        reader = self._reader
        command_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = _DATA_READ_LIMIT  # type: ignore[attr-defined]
        try:
            await self._receive_data()
        finally:
            reader._limit = command_limit  # type: ignore[attr-defined]
            self.intake.leave_data()

    async def _receive_data(self) -> None:
        """Read the message up to the lone dot; past the size limit keep reading but drop
        the data (the reply must wait for the end, RFC 5321 4.2.5), then answer 554.

        The stream is read in large pieces, each up to the next ``.<CR><LF>``: only a
        ``.<CR><LF>`` at the start of a line ends the data, any other is part of it (a
        sentence ending a line). Reading line by line cost a reader call per line, the
        largest share of CPU for a 50 KB message. Dot-stuffing is undone at the end."""
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.max_message_size
        content = bytearray()
        size = 0
        too_big = False
        tail = b"\r\n"  # the last two bytes read: the data starts at a line start
        next_reset = _TIMEOUT_RESET_BYTES
        while True:
            try:
                chunk = await self._reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:
                # No end marker in the reader's buffer: take what cannot be part of one.
                chunk = await self._reader.readexactly(exc.consumed)
            except asyncio.IncompleteReadError:
                self.close_now()
                raise asyncio.CancelledError() from None
            line_start = False
            if chunk.endswith(b".\r\n"):
                before = chunk[:-3]
                line_start = _last_two(tail, before) == b"\r\n"
                if line_start:
                    chunk = before
            if chunk:
                size += len(chunk)
                tail = _last_two(tail, chunk)
                if not too_big:
                    if size > limit:
                        too_big = True
                        content = bytearray()
                    else:
                        content += chunk
            if line_start:
                break
            if size >= next_reset:
                self._reset_timeout()
                next_reset += _TIMEOUT_RESET_BYTES
        if not too_big:
            content = _undo_dot_stuffing(content)
        assert self.envelope is not None
        if too_big:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.reject(replies.TOO_BIG)
            return
        self.envelope.content = self.envelope.original_content = bytes(content)
        del content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)
