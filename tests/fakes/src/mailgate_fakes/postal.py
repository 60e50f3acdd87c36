"""A Postal sandbox: Postal's legacy HTTP API and its signed webhooks, faithful to specs/postal.md.

What it does like Postal v3.3.6 (spec section in brackets):

* HTTP 200 with a ``status`` envelope for every API answer; ``AccessDenied``,
  ``InvalidServerAPIKey`` (``data.token`` echoes the key), ``ServerSuspended`` (§1, §3).
* JSON bodies or a form/query ``params`` field holding JSON; anything else reads as ``{}`` (§2).
* ``send/message`` with 50/50/50 caps and Postal's ordered checks, first error only; ``send/raw``
  with Postal's parameter-error texts, ``rcpt_to`` de-duplication, From-header authentication,
  Message-ID taken from ``data`` and the tag from its last ``X-Postal-Tag`` header (§2, §5).
* One message per recipient: increasing integer id, 16-character alphanumeric token;
  ``messages/message`` (with expansions) and ``messages/deliveries``; ``MessageNotFound`` (§4).
* Webhooks with the ``{"event","timestamp","payload","uuid"}`` body, signed with
  ``X-Postal-Signature`` (RSA PKCS#1 v1.5 SHA-1), ``X-Postal-Signature-256`` (SHA-256) and
  ``X-Postal-Signature-KID``; 5 s timeout, no redirects, 2xx only is success, 6 attempts on
  Postal's schedule multiplied by ``retry_factor``, the same uuid and timestamp on every
  attempt (§6-§8).

* Inbound mail routed to an HTTP endpoint (``inbound_url``) as Postal's HTTPSender posts it:
  ``RawMessage`` format ``{id, rcpt_to, mail_from, message (Ruby Base64.encode64 of the
  RFC 822 bytes), base64: true, size}`` or ``Hash`` format, JSON (``BodyAsJSON``) or form
  (``FormData``) encoding, signed like webhooks; 2xx is Sent, 5xx or no answer is retried
  (SoftFail, 5 min x 1.3^n times ``retry_factor``, 18 attempts), any other status HardFails
  (app/senders/http_sender.rb, lib/postal/http.rb).

The outcome of a message depends on the recipient's local part (before any ``+``):
``bounce`` -> MessageSent then MessageBounced; ``fail`` -> MessageDeliveryFailed (HardFail);
``delay`` -> MessageDelayed (SoftFail) then MessageSent; ``hold`` or a suppressed address ->
MessageHeld; ``click`` -> MessageSent then MessageLinkClicked; ``open`` or ``load`` ->
MessageSent then MessageLoaded; anything else -> MessageSent.

Test hooks: ``sandbox.messages`` (submitted messages with their MIME), ``sandbox.peers``
(client address of every API request: connection reuse), ``sandbox.webhook_attempts``,
``sandbox.inbound_attempts``, faults (``Faults``, including an outage for N seconds; also
``POST /__sandbox/faults``), ``GET /__sandbox/messages``, ``POST /__sandbox/webhooks`` to emit
any event, ``POST /__sandbox/inbound`` to route an inbound message to the HTTP endpoint,
``GET /__sandbox/public-key``.

Run: ``python -m mailgate_fakes.postal --port 5080 --api-key KEY --webhook-url URL
--inbound-url URL --signing-key signing.key``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import email.parser
import email.policy
import email.utils
import functools
import hashlib
import json
import logging
import re
import secrets
import string
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

log = logging.getLogger("mailgate_fakes.postal")

POSTAL_VERSION = "3.3.6"
USER_AGENT = f"Postal/{POSTAL_VERSION}"
#: Delays after failed attempts 1-5 (§8); the 6th failure drops the request.
RETRY_SCHEDULE_S: tuple[float, ...] = (120.0, 180.0, 360.0, 600.0, 900.0)
MAX_ATTEMPTS = 6
WEBHOOK_TIMEOUT_S = 5.0
#: HTTP endpoints of routes: Postal's soft-fail retry (5 min x 1.3^attempts), 18 attempts.
INBOUND_RETRY_BASE_S = 300.0
INBOUND_MAX_ATTEMPTS = 18
OUTAGE_MODES = ("http_500", "http_503", "timeout")
MAX_RECIPIENTS_PER_FIELD = 50

SEND_MESSAGE_ERRORS = {
    "NoRecipients": "There are no recipients defined to receive this message",
    "NoContent": "There is no content defined for this e-mail",
    "TooManyToAddresses": "The maximum number of To addresses has been reached (maximum 50)",
    "TooManyCCAddresses": "The maximum number of CC addresses has been reached (maximum 50)",
    "TooManyBCCAddresses": "The maximum number of BCC addresses has been reached (maximum 50)",
    "FromAddressMissing": "The From address is missing and is required",
    "UnauthenticatedFromAddress": (
        "The From address is not authorised to send mail from this server"
    ),
    "AttachmentMissingName": "An attachment is missing a name",
    "AttachmentMissingData": "An attachment is missing data",
}

#: API endpoint -> method name; every one answers GET, POST, PUT and PATCH (§2).
ENDPOINTS = {
    "send/message": "_send_message",
    "send/raw": "_send_raw",
    "messages/message": "_message",
    "messages/deliveries": "_deliveries",
}

_TOKEN_ALPHABET = string.ascii_letters + string.digits
#: Postal renders JSON with Ruby's ``to_json``: compact, UTF-8 as is.
_json_encode = msgspec.json.Encoder().encode
_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")


# --- keys and signatures ------------------------------------------------------------------


#: The size of the ``signing.key`` Postal's installer makes (``postal bootstrap`` in
#: postalserver/install runs ``openssl genrsa -out signing.key 1024``). The sandbox signs with
#: the same size unless given a key: its signing cost then is the real Postal's (two RSA
#: signatures per webhook: 0.33 ms at 1024 bits, 2.1 ms at 2048 on the bench machine).
POSTAL_SIGNING_KEY_BITS = 1024


def generate_private_key(bits: int = POSTAL_SIGNING_KEY_BITS) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def load_or_create_private_key(path: Path) -> rsa.RSAPrivateKey:
    """Postal's ``signing.key``: read the PEM at ``path``, or create one there."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} is not an RSA private key")
        return key
    key = generate_private_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return key


def public_key_b64(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> str:
    """Base64 of the SubjectPublicKeyInfo DER: the ``p=`` value of Postal's DKIM record."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def public_key_pem(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> str:
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def key_id(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> str:
    """``X-Postal-Signature-KID``: SHA-256 hex of the DER ``SEQUENCE{n, e}`` (PKCS#1)."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return hashlib.sha256(der).hexdigest()


def signature_headers(
    key: rsa.RSAPrivateKey, body: bytes, *, kid: str | None = None
) -> dict[str, str]:
    """The three signature headers Postal puts on a webhook POST of ``body`` (``kid``: the
    key's ``key_id``, when the caller has it already; both RSA signatures are always made)."""
    sha1 = key.sign(body, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303 - Postal's legacy header
    sha256 = key.sign(body, padding.PKCS1v15(), hashes.SHA256())
    return {
        "X-Postal-Signature": base64.b64encode(sha1).decode(),
        "X-Postal-Signature-256": base64.b64encode(sha256).decode(),
        "X-Postal-Signature-KID": kid or key_id(key),
    }


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwks(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    """``/.well-known/jwks.json`` as Postal serves it (§7)."""
    numbers = key.public_key().public_numbers()
    return {
        "keys": [
            {
                "kty": "RSA",
                "n": _b64url_uint(numbers.n),
                "e": _b64url_uint(numbers.e),
                "kid": key_id(key),
                "use": "sig",
                "alg": "RS256",
            }
        ]
    }


# --- small Ruby-isms ----------------------------------------------------------------------


def _json_response(document: Any) -> web.Response:
    return web.Response(body=_json_encode(document), content_type="application/json")


def _blank(value: Any) -> bool:
    """Rails ``blank?``: nil, false, empty or whitespace-only string, empty collection."""
    if value is None or value is False:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list | dict):
        return not value
    return False


def _truthy(value: Any) -> bool:
    """Ruby truthiness: only nil and false are false (so 0 and "false" are true)."""
    return value is not None and value is not False


def _decode64(data: str) -> bytes:
    """Ruby ``Base64.decode64``: characters outside the alphabet are skipped."""
    if data.isascii():
        # Strict base64 (what every client sends) decodes the same either way; only other
        # input needs the lenient path below.
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            pass
    cleaned = _B64_JUNK.sub(b"", data.encode("latin-1", "ignore")).rstrip(b"=")
    cleaned = cleaned[: len(cleaned) - (len(cleaned) % 4 == 1)]
    cleaned += b"=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned)
    except binascii.Error:
        return b""


def strip_name_from_address(address: str) -> str:
    """``Name <a@b>`` -> ``a@b`` (Postal::Helpers.strip_name_from_address)."""
    text = re.sub(r".*<", "", address)
    return re.sub(r">.*", "", text).strip()


def _address_list(value: Any) -> list[str]:
    """``to``/``cc``/``bcc``: a comma-separated string or an array."""
    if value is None:
        return []
    if isinstance(value, str):
        return re.split(r",\s*", value) if value else []
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [str(v) for pair in value.items() for v in pair]
    return [str(value)]


def _new_token() -> str:
    """16 characters of ``[A-Za-z0-9]``, uniform: random bytes below 248 (4 x 62) mapped
    onto the alphabet, the others skipped (one urandom call instead of one per character)."""
    chars: list[str] = []
    while len(chars) < 16:
        chars += [_TOKEN_ALPHABET[b % 62] for b in secrets.token_bytes(24) if b < 248]
    return "".join(chars[:16])


def _headers_of(raw: bytes) -> list[tuple[str, str]]:
    """The header block of ``raw`` as raw (name, value) pairs: Postal reads headers up to the
    first CRLF CRLF.

    The pairs are what the compat32 policy's split gives (raw name/value pairs, no header
    objects): parsing every header into ``policy.default`` objects cost more than the rest of
    a send/raw call. ``_header_values`` applies ``policy.default`` to the headers asked for,
    which yields exactly what ``policy.default``'s ``get_all`` would (both policies unfold the
    source lines the same way). A well-formed block (CRLF lines, each ``name:`` or a
    continuation) is split here directly; anything else goes through the email package."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    pairs = _split_simple_headers(head)
    if pairs is not None:
        return pairs
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        head + b"\r\n\r\n"
    )
    return list(parsed.raw_items())


#: A header line the feed parser reads as ``name: value`` (its ``headerRE``, name not empty).
_SIMPLE_HEADER_NAME = re.compile(r"[\041-\071\073-\176]+\Z")


def _split_simple_headers(head: bytes) -> list[tuple[str, str]] | None:
    """compat32's (name, value) pairs for a header block of CRLF-terminated ``name: value``
    lines and their continuations; ``None`` for anything else (bare CR/LF, a line that is
    neither, an envelope ``From `` line), which the email package then handles."""
    if not head or b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
        return None
    pairs: list[tuple[str, str]] = []
    name = ""
    value = ""
    for line in head.decode("ascii", "surrogateescape").split("\r\n"):
        if line[:1] in (" ", "\t"):
            if not pairs and not name:
                return None  # a continuation first: the parser records a defect
            value += "\r\n" + line
            continue
        if not line or line.startswith("From "):
            return None
        if name:
            pairs.append((name, value))
        name, colon, rest = line.partition(":")
        if not colon or not _SIMPLE_HEADER_NAME.match(name):
            return None
        value = rest.lstrip(" \t")
    if name:
        pairs.append((name, value))
    return pairs


def _header_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    wanted = name.lower()
    try:
        if wanted == "message-id":
            return [_message_id_text(k, v) for k, v in headers if k.lower() == wanted]
        return [_header_text(key, value) for key, value in headers if key.lower() == wanted]
    except Exception:  # a malformed header reads as absent, like Mail's lenient parser
        return []


#: ``<dot-atom@domain>``: ``policy.default`` reads such a Message-ID back unchanged.
_PLAIN_MESSAGE_ID = re.compile(r"<[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+>")


def _message_id_text(name: str, value: str) -> str:
    """Every message has its own Message-ID, so the cache cannot help; the plain form (all
    of ours) skips the header parser, anything else goes through it."""
    if _PLAIN_MESSAGE_ID.fullmatch(value):
        return value
    return _header_text(name, value)


@functools.lru_cache(maxsize=4096)
def _header_text(name: str, value: str) -> str:
    """``str`` of the ``policy.default`` header object: a pure function of the raw header,
    cached because campaign mail repeats its From and Subject (address parsing dominated)."""
    return str(email.policy.default.header_fetch_parse(name, value))


def _addresses_in(values: list[str]) -> list[str]:
    return list(_addresses_of(tuple(values)))


@functools.lru_cache(maxsize=4096)
def _addresses_of(values: tuple[str, ...]) -> tuple[str, ...]:
    """Cached like ``_header_text``: campaign mail repeats its From and Sender."""
    return tuple(addr for _name, addr in email.utils.getaddresses(list(values)))


# --- state --------------------------------------------------------------------------------


@dataclass
class Faults:
    """Failure injection. Counters are decremented by each API request they affect.

    * ``http_500``: the next N API requests answer HTTP 500 without doing anything.
    * ``timeout_s`` / ``timeout_requests``: the next N API requests (1 when only
      ``timeout_s`` is given) wait ``timeout_s`` seconds. With ``timeout_mode="after_send"``
      (default) the message is created first, so a client that gives up has sent it anyway
      (Postal has no idempotency key); with ``"before_send"`` nothing is created and the
      answer is HTTP 504 after the wait.
    * ``suspended``: every authenticated request gets ``ServerSuspended``.
    * ``webhook_duplicates``: the next N webhooks are delivered twice (same uuid).
    * ``webhook_reorder``: a message's events are emitted in reverse order.
    * ``outage_s`` (write-only; sets ``outage_until``, unix time) with ``outage_mode``: for
      that long every API request fails without doing anything: ``http_503`` / ``http_500``
      answer at once, ``timeout`` hangs until the outage ends and then answers 504.
    * ``latency_s``: every API request answers this much later (after doing its work).
    """

    http_500: int = 0
    timeout_s: float = 0.0
    timeout_requests: int = 0
    timeout_mode: str = "after_send"
    suspended: bool = False
    webhook_duplicates: int = 0
    webhook_reorder: bool = False
    outage_until: float = 0.0
    outage_mode: str = "http_503"
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.timeout_s > 0 and self.timeout_requests == 0:
            self.timeout_requests = 1
        self._validate()

    def _validate(self) -> None:
        if self.timeout_mode not in ("after_send", "before_send"):
            raise ValueError("timeout_mode must be 'after_send' or 'before_send'")
        if self.outage_mode not in OUTAGE_MODES:
            raise ValueError(f"outage_mode must be one of {', '.join(OUTAGE_MODES)}")

    def start_outage(self, seconds: float, mode: str = "http_503") -> None:
        """Postal is down for ``seconds`` from now (5xx at once, or hanging requests)."""
        self.update({"outage_s": seconds, "outage_mode": mode})

    def outage_remaining_s(self) -> float:
        return max(0.0, self.outage_until - time.time())

    def update(self, changes: dict[str, Any]) -> None:
        changes = dict(changes)
        if "outage_s" in changes:
            seconds = float(changes.pop("outage_s"))
            changes["outage_until"] = time.time() + seconds if seconds > 0 else 0.0
        names = {f.name: f for f in dataclasses.fields(self)}
        unknown = set(changes) - set(names)
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(sorted(unknown))}")
        for name, value in changes.items():
            kind = type(getattr(self, name))
            if kind is bool:
                value = bool(value)
            elif kind is int:
                value = int(value)
            elif kind is float:
                value = float(value)
            else:
                value = str(value)
            setattr(self, name, value)
        if "timeout_s" in changes and "timeout_requests" not in changes:
            self.timeout_requests = 1 if self.timeout_s > 0 else 0
        # Not __post_init__: its "timeout_s without a count means one request" default would
        # re-arm a spent timeout on every later, unrelated change (found by tests/chaos).
        self._validate()


@dataclass
class Delivery:
    id: int
    status: str
    details: str
    output: str
    sent_with_ssl: bool | None
    time: float | None
    timestamp: float
    log_id: str = field(default_factory=lambda: secrets.token_hex(4).upper())

    def api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "details": self.details,
            "output": self.output.strip(),
            "sent_with_ssl": self.sent_with_ssl,
            "log_id": self.log_id,
            "time": self.time,
            "timestamp": self.timestamp,
        }


@dataclass
class Message:
    """One message in the sandbox's message database (one per recipient)."""

    id: int
    token: str
    rcpt_to: str
    mail_from: str
    raw: bytes
    message_id: str | None
    tag: str | None
    subject: str | None
    scope: str = "outgoing"
    bounce: bool = False
    bounce_for_id: int = 0
    api_key: str = ""
    timestamp: float = field(default_factory=time.time)
    status: str = "Pending"
    held: bool = False
    deliveries: list[Delivery] = field(default_factory=list)
    loads: list[dict[str, Any]] = field(default_factory=list)
    clicks: list[dict[str, Any]] = field(default_factory=list)

    def webhook_hash(self) -> dict[str, Any]:
        """Postal's ``M`` shape."""
        return {
            "id": self.id,
            "token": self.token,
            "direction": self.scope,
            "message_id": self.message_id,
            "to": self.rcpt_to,
            "from": self.mail_from,
            "subject": None if self.subject is None else self.subject[:200],
            "timestamp": self.timestamp,
            "spam_status": "NotChecked",
            "tag": self.tag,
        }

    def inspect(self) -> dict[str, Any]:
        """What tests look at (``GET /__sandbox/messages`` base64-encodes ``raw``)."""
        return {
            "id": self.id,
            "token": self.token,
            "rcpt_to": self.rcpt_to,
            "mail_from": self.mail_from,
            "raw": self.raw,
            "message_id": self.message_id,
            "tag": self.tag,
            "subject": self.subject,
            "status": self.status,
            "bounce": self.bounce,
            "api_key": self.api_key,
            "timestamp": self.timestamp,
        }


@dataclass(frozen=True)
class Webhook:
    event: str
    payload: dict[str, Any]
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    timestamp: float = field(default_factory=time.time)

    def body(self) -> bytes:
        document = {
            "event": self.event,
            "timestamp": self.timestamp,
            "payload": self.payload,
            "uuid": self.uuid,
        }
        return _json_encode(document)


class ApiError(Exception):
    """An API answer other than success (rendered with HTTP 200)."""

    def __init__(self, status: str, data: dict[str, Any]):
        super().__init__(status)
        self.status = status
        self.data = data


def _error(code: str, **data: Any) -> ApiError:
    return ApiError("error", {**data, "code": code})


def _parameter_error(message: str) -> ApiError:
    return ApiError("parameter-error", {"message": message})


class PostalSandbox:
    """An in-memory Postal server with one organisation, one server and its API credentials."""

    def __init__(
        self,
        api_keys: Iterable[str],
        webhook_url: str | None = None,
        private_key: rsa.RSAPrivateKey | None = None,
        *,
        domains: Iterable[str] | None = None,
        allow_sender: bool = False,
        suppressed: dict[str, str] | None = None,
        webhook_delay_ms: float = 0.0,
        retry_factor: float = 1.0,
        webhook_timeout_s: float = WEBHOOK_TIMEOUT_S,
        faults: Faults | None = None,
        return_path_domain: str = "rp.postal.example.com",
        first_message_id: int = 1,
        inbound_url: str | None = None,
    ):
        self.api_keys = set(api_keys)
        #: ``http://host:port`` once ``start()`` has bound it.
        self.base_url = ""
        self.webhook_url = webhook_url
        #: The HTTP endpoint inbound mail is routed to (a route's HTTPEndpoint).
        self.inbound_url = inbound_url
        self.private_key = private_key or generate_private_key()
        self._kid: tuple[rsa.RSAPrivateKey, str] | None = None
        #: Verified sending domains; ``None`` behaves like a verified ``use_for_any`` domain.
        self.domains = None if domains is None else {d.lower() for d in domains}
        self.allow_sender = allow_sender
        #: address -> suppression reason; a send to one is Held (§9).
        self.suppressed = {k.lower(): v for k, v in (suppressed or {}).items()}
        self.webhook_delay_s = webhook_delay_ms / 1000.0
        self.retry_factor = retry_factor
        self.webhook_timeout_s = webhook_timeout_s
        self.faults = faults or Faults()
        self.return_path_domain = return_path_domain
        self.server_uuid = str(uuid.uuid4())
        self._all: dict[int, Message] = {}
        self._outgoing: list[Message] = []
        self._next_id = first_message_id
        self._next_delivery_id = 1
        #: Every webhook POST attempt: uuid, event, attempt, status (-1 timeout, -2 connection).
        self.webhook_attempts: list[dict[str, Any]] = []
        #: Every webhook emitted (once per event, not per attempt).
        self.webhooks: list[Webhook] = []
        #: Every API request: path and the ``status`` answered (or the HTTP status on faults).
        self.requests: list[dict[str, Any]] = []
        #: The client (host, port) of every API request: few ports = connections reused.
        self.peers: list[tuple[str, int]] = []
        #: Most API requests ever handled at the same time.
        self.peak_concurrency = 0
        self._active = 0
        #: Every inbound HTTP endpoint attempt: id, attempt, status (-1 timeout, -2 connection).
        self.inbound_attempts: list[dict[str, Any]] = []
        #: Inbound messages routed to the endpoint, in order.
        self.inbound: list[Message] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    # --- inspection ---------------------------------------------------------------------

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Submitted outgoing messages in id order."""
        return [m.inspect() for m in self._outgoing]

    def message(self, message_id: int) -> Message | None:
        return self._all.get(message_id)

    def public_key_b64(self) -> str:
        return public_key_b64(self.private_key)

    def public_key_pem(self) -> str:
        return public_key_pem(self.private_key)

    def key_id(self) -> str:
        if self._kid is None or self._kid[0] is not self.private_key:  # computed once per key
            self._kid = (self.private_key, key_id(self.private_key))
        return self._kid[1]

    def sign(self, body: bytes) -> dict[str, str]:
        """Both RSA signatures of ``body``, made for every webhook as Postal does (§7)."""
        return signature_headers(self.private_key, body, kid=self.key_id())

    def reset(self) -> None:
        self._outgoing.clear()
        self.webhook_attempts.clear()
        self.webhooks.clear()
        self.requests.clear()
        self.peers.clear()
        self.inbound_attempts.clear()
        self.inbound.clear()

    # --- serving ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for endpoint in ENDPOINTS:
            for method in ("GET", "POST", "PUT", "PATCH"):
                app.router.add_route(method, f"/api/v1/{endpoint}", self._http(endpoint))
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        app.router.add_get("/__sandbox/messages", self._admin_messages)
        app.router.add_delete("/__sandbox/messages", self._admin_reset)
        app.router.add_get("/__sandbox/faults", self._admin_faults)
        app.router.add_post("/__sandbox/faults", self._admin_faults)
        app.router.add_get("/__sandbox/webhooks", self._admin_webhooks)
        app.router.add_post("/__sandbox/webhooks", self._admin_emit)
        app.router.add_post("/__sandbox/suppressions", self._admin_suppress)
        app.router.add_post("/__sandbox/inbound", self._admin_inbound)
        app.router.add_get("/__sandbox/public-key", self._admin_public_key)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, _app: web.Application) -> AsyncIterator[None]:
        yield
        await self.close()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 = a free port) in this event loop; return the base URL."""
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound}"
        return self.base_url

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[PostalSandbox]:
        """``start()`` on a free loopback port for the ``with`` block (``base_url`` set), then
        ``stop()``."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.close()

    async def close(self) -> None:
        """Cancel pending webhook deliveries and close the webhook client."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def idle(self, timeout: float = 10.0) -> None:
        """Wait until every scheduled webhook delivery (with its retries) has finished."""
        async with asyncio.timeout(timeout):
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- API plumbing -------------------------------------------------------------------

    def call(self, endpoint: str, params: dict[str, Any], api_key: str | None) -> dict[str, Any]:
        """One API call without HTTP: ``endpoint`` like ``send/raw``; returns the envelope."""
        started = time.monotonic()
        try:
            key = self._authenticate(api_key)
            data = getattr(self, ENDPOINTS[endpoint])(params, key)
            status = "success"
        except ApiError as exc:
            status, data = exc.status, exc.data
        self.requests.append({"path": f"/api/v1/{endpoint}", "status": status})
        return {
            "status": status,
            "time": round(time.monotonic() - started, 3),
            "flags": {},
            "data": data,
        }

    def _http(self, endpoint: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            self._active += 1
            self.peak_concurrency = max(self.peak_concurrency, self._active)
            try:
                return await self._handle(endpoint, request)
            finally:
                self._active -= 1

        return handler

    async def _handle(self, endpoint: str, request: web.Request) -> web.StreamResponse:
        faults = self.faults
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.peers.append((str(peer[0]), int(peer[1])))
        remaining = faults.outage_remaining_s()
        if remaining > 0:
            if faults.outage_mode == "timeout":
                await asyncio.sleep(remaining)
                self.requests.append({"path": request.path, "status": 504})
                return web.Response(status=504, text="Gateway Timeout")
            status = 500 if faults.outage_mode == "http_500" else 503
            self.requests.append({"path": request.path, "status": status})
            return web.Response(status=status, text="Postal is down (sandbox outage)")
        if faults.http_500 > 0:
            faults.http_500 -= 1
            self.requests.append({"path": request.path, "status": 500})
            return web.Response(status=500, text="Internal Server Error")
        sleep_s = 0.0
        if faults.timeout_requests > 0:
            faults.timeout_requests -= 1
            sleep_s = faults.timeout_s
            if faults.timeout_mode == "before_send":
                await asyncio.sleep(sleep_s)
                self.requests.append({"path": request.path, "status": 504})
                return web.Response(status=504, text="Gateway Timeout")
        api_key = request.headers.get("X-Server-API-Key")
        try:
            self._authenticate(api_key)
        except ApiError:
            # Authentication runs before Rails reads the body.
            return _json_response(self.call(endpoint, {}, api_key))
        try:
            params = await self._params(request)
        except web.HTTPException as exc:
            self.requests.append({"path": request.path, "status": exc.status})
            raise
        envelope = self.call(endpoint, params, api_key)
        sleep_s = max(sleep_s, faults.latency_s)
        if sleep_s:
            await asyncio.sleep(sleep_s)
        return _json_response(envelope)

    def _authenticate(self, key: str | None) -> str:
        if key is None or _blank(key):
            raise _error("AccessDenied", message="Must be authenticated as a server.")
        if key not in self.api_keys:
            raise _error(
                "InvalidServerAPIKey",
                message="The API token provided in X-Server-API-Key was not valid.",
                token=key,
            )
        if self.faults.suspended:
            raise _error("ServerSuspended")
        return key

    async def _params(self, request: web.Request) -> dict[str, Any]:
        """Moonrope's two ways to send params: a JSON body, or JSON in a ``params`` field."""
        if request.headers.get("Content-Type", "").startswith("application/json"):
            raw = await request.read()
            if not raw.strip():
                return {}
            try:
                parsed = json.loads(raw)
            except ValueError:
                # Rails refuses the body before the controller runs: not the JSON envelope.
                raise web.HTTPBadRequest(text="Bad Request") from None
            return parsed if isinstance(parsed, dict) else {"_json": parsed}
        text: str | None = None
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.post()
            value = form.get("params")
            text = value if isinstance(value, str) else None
        if text is None:
            text = request.query.get("params")
        if _blank(text):
            return {}
        assert text is not None
        try:
            parsed = json.loads(text)
        except ValueError:
            raise web.HTTPBadRequest(text="Bad Request") from None
        return parsed if isinstance(parsed, dict) else {}

    # --- authentication of From -----------------------------------------------------------

    def _authenticated_domain(self, address: str | None) -> str | None:
        if _blank(address):
            return None
        assert address is not None
        address = strip_name_from_address(address)
        local, at, domain = address.partition("@")
        if not at or not local or not domain:
            return None
        if self.domains is None:
            return domain.lower()
        return domain.lower() if domain.lower() in self.domains else None

    def _authenticated_from_headers(self, headers: dict[str, list[str]]) -> str | None:
        names = ["from", "sender"] if self.allow_sender else ["from"]
        for name in names:
            values = headers.get(name) or [""]
            domains = [self._authenticated_domain(v) for v in values]
            if all(d is not None for d in domains):
                return domains[0]
        return None

    # --- send/message ---------------------------------------------------------------------

    def _send_message(self, params: dict[str, Any], key: str) -> dict[str, Any]:
        to = _address_list(params.get("to"))
        cc = _address_list(params.get("cc"))
        bcc = _address_list(params.get("bcc"))
        sender = params.get("sender")
        from_ = params.get("from")
        attachments = [a for a in params.get("attachments") or [] if isinstance(a, dict)]
        html = params.get("html_body")
        plain = params.get("plain_body")

        errors: list[str] = []
        if not to and not cc and not bcc:
            errors.append("NoRecipients")
        if len(to) > MAX_RECIPIENTS_PER_FIELD:
            errors.append("TooManyToAddresses")
        if len(cc) > MAX_RECIPIENTS_PER_FIELD:
            errors.append("TooManyCCAddresses")
        if len(bcc) > MAX_RECIPIENTS_PER_FIELD:
            errors.append("TooManyBCCAddresses")
        if _blank(plain) and _blank(html):
            errors.append("NoContent")
        if _blank(from_):
            errors.append("FromAddressMissing")
        domain = self._authenticated_domain(str(from_) if from_ is not None else None)
        if domain is None and self.allow_sender:
            domain = self._authenticated_domain(str(sender) if sender is not None else None)
        if domain is None:
            errors.append("UnauthenticatedFromAddress")
        for attachment in attachments:
            if _blank(attachment.get("name")):
                problem = "AttachmentMissingName"
            elif _blank(attachment.get("data")):
                problem = "AttachmentMissingData"
            else:
                continue
            if problem not in errors:
                errors.append(problem)
        if errors:
            code = errors[0]
            raise _error(code, message=SEND_MESSAGE_ERRORS[code])

        message_id = f"{uuid.uuid4()}@{self.return_path_domain}"
        raw = self._compose(params, to, cc, attachments, message_id)
        tag = params.get("tag")
        result: dict[str, Any] = {}
        for address in to + cc + bcc:
            rcpt = strip_name_from_address(address)
            if not rcpt:
                continue
            message = self._create(
                rcpt_to=rcpt,
                mail_from=strip_name_from_address(str(from_)),
                raw=raw,
                message_id=message_id,
                tag=str(tag) if tag is not None else None,
                subject=None if params.get("subject") is None else str(params["subject"]),
                bounce=_truthy(params.get("bounce")),
                api_key=key,
            )
            result[rcpt] = {"id": message.id, "token": message.token}
        return {"message_id": message_id, "messages": result}

    def _compose(
        self,
        params: dict[str, Any],
        to: list[str],
        cc: list[str],
        attachments: list[dict[str, Any]],
        message_id: str,
    ) -> bytes:
        mail = EmailMessage(policy=email.policy.SMTP)
        headers = params.get("headers")
        if isinstance(headers, dict):
            for name, value in headers.items():
                if str(name).lower() != "message-id":
                    mail[str(name)] = str(value)
        if to:
            mail["To"] = ", ".join(to)
        if cc:
            mail["Cc"] = ", ".join(cc)
        mail["From"] = str(params.get("from"))
        for name, param in (("Sender", "sender"), ("Subject", "subject"), ("Reply-To", "reply_to")):
            if params.get(param) is not None:
                mail[name] = str(params[param])
        mail["Message-ID"] = f"<{message_id}>"
        plain, html = params.get("plain_body"), params.get("html_body")
        mail.set_content(str(plain) if not _blank(plain) else "")
        if not _blank(html):
            mail.add_alternative(str(html), subtype="html")
        for attachment in attachments:
            content_type = attachment.get("content_type") or "application/octet-stream"
            maintype, _, subtype = str(content_type).partition("/")
            mail.add_attachment(
                _decode64(str(attachment.get("data") or "")),
                maintype=maintype,
                subtype=subtype or "octet-stream",
                filename=str(attachment.get("name")),
            )
        return mail.as_bytes()

    # --- send/raw -------------------------------------------------------------------------

    def _send_raw(self, params: dict[str, Any], key: str) -> dict[str, Any]:
        rcpt_to = params.get("rcpt_to")
        if not isinstance(rcpt_to, list):
            raise _parameter_error("`rcpt_to` parameter is required but is missing")
        if _blank(params.get("mail_from")):
            raise _parameter_error("`mail_from` parameter is required but is missing")
        if _blank(params.get("data")):
            raise _parameter_error("`data` parameter is required but is missing")
        raw = _decode64(str(params["data"]))
        parsed = _headers_of(raw)
        from_headers = {
            "from": _addresses_in(_header_values(parsed, "From")) or [""],
            "sender": _addresses_in(_header_values(parsed, "Sender")) or [""],
        }
        if self._authenticated_from_headers(from_headers) is None:
            raise _error("UnauthenticatedFromAddress")
        ids = _header_values(parsed, "Message-ID")
        message_id = _bracketless(ids[0]) if ids else None
        tags = _header_values(parsed, "X-Postal-Tag")
        tag = tags[-1].strip() if tags else None
        subjects = _header_values(parsed, "Subject")
        subject = subjects[0] if subjects else None
        result: dict[str, Any] = {"message_id": None, "messages": {}}
        seen: list[Any] = []
        for rcpt in rcpt_to:
            if rcpt in seen:
                continue
            seen.append(rcpt)
            message = self._create(
                rcpt_to=str(rcpt),
                mail_from=str(params["mail_from"]),
                raw=raw,
                message_id=message_id,
                tag=tag,
                subject=subject,
                bounce=_truthy(params.get("bounce")),
                api_key=key,
            )
            if result["message_id"] is None:
                result["message_id"] = message.message_id
            result["messages"][str(rcpt)] = {"id": message.id, "token": message.token}
        return result

    # --- messages/* -----------------------------------------------------------------------

    def _find(self, params: dict[str, Any]) -> Message:
        ident = params.get("id")
        message: Message | None = None
        if isinstance(ident, int | str) and not isinstance(ident, bool):
            with contextlib.suppress(ValueError):
                message = self._all.get(int(ident))
        if message is None:
            raise _error(
                "MessageNotFound", message="No message found matching provided ID", id=ident
            )
        return message

    def _message(self, params: dict[str, Any], _key: str) -> dict[str, Any]:
        message = self._find(params)
        expansions = params.get("_expansions")

        def wants(name: str) -> bool:
            return expansions is True or (isinstance(expansions, list) and name in expansions)

        out: dict[str, Any] = {"id": message.id, "token": message.token}
        last = message.deliveries[-1].timestamp if message.deliveries else None
        if wants("status"):
            out["status"] = {
                "status": message.status,
                "last_delivery_attempt": last,
                "held": message.held,
                "hold_expiry": None,
            }
        if wants("details"):
            out["details"] = {
                "rcpt_to": message.rcpt_to,
                "mail_from": message.mail_from,
                "subject": message.subject,
                "message_id": message.message_id,
                "timestamp": message.timestamp,
                "direction": message.scope,
                "size": str(len(message.raw)),
                "bounce": message.bounce,
                "bounce_for_id": message.bounce_for_id,
                "tag": message.tag,
                "received_with_ssl": True,
            }
        if wants("inspection"):
            out["inspection"] = {
                "inspected": False,
                "spam": False,
                "spam_score": 0.0,
                "threat": False,
                "threat_details": None,
            }
        parsed = None
        if any(wants(n) for n in ("plain_body", "html_body", "attachments", "headers")):
            parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(message.raw)
        if parsed is not None and wants("plain_body"):
            part = parsed.get_body(("plain",))
            out["plain_body"] = part.get_content() if part is not None else None
        if parsed is not None and wants("html_body"):
            part = parsed.get_body(("html",))
            out["html_body"] = part.get_content() if part is not None else None
        if parsed is not None and wants("attachments"):
            items = []
            for part in parsed.iter_attachments():
                decoded = part.get_payload(decode=True)
                payload = decoded if isinstance(decoded, bytes) else b""
                items.append(
                    {
                        "filename": part.get_filename() or "",
                        "content_type": part.get_content_type(),
                        "data": base64.encodebytes(payload).decode(),
                        "size": len(payload),
                        "hash": hashlib.sha1(payload).hexdigest(),  # noqa: S324 - Postal's field
                    }
                )
            out["attachments"] = items
        if parsed is not None and wants("headers"):
            grouped: dict[str, list[str]] = {}
            for name, value in parsed.items():
                grouped.setdefault(name.lower(), []).append(str(value))
            out["headers"] = grouped
        if wants("raw_message"):
            out["raw_message"] = base64.encodebytes(message.raw).decode()
        if wants("activity_entries"):
            out["activity_entries"] = {"loads": list(message.loads), "clicks": list(message.clicks)}
        return out

    def _deliveries(self, params: dict[str, Any], _key: str) -> list[dict[str, Any]]:
        return [d.api() for d in self._find(params).deliveries]

    # --- messages and their outcomes ------------------------------------------------------

    def _create(self, **fields: Any) -> Message:
        message = Message(id=self._next_id, token=_new_token(), **fields)
        self._next_id += 1
        self._all[message.id] = message
        self._outgoing.append(message)
        self._schedule(self._run_outcome(message))
        return message

    def _delivery(
        self,
        message: Message,
        status: str,
        details: str,
        output: str = "",
        sent_with_ssl: bool | None = None,
        took_s: float | None = None,
    ) -> Delivery:
        delivery = Delivery(
            id=self._next_delivery_id,
            status=status,
            details=details,
            output=output,
            sent_with_ssl=sent_with_ssl,
            time=took_s,
            timestamp=time.time(),
        )
        self._next_delivery_id += 1
        message.deliveries.append(delivery)
        message.status = status
        message.held = status == "Held"
        return delivery

    def _d_payload(self, message: Message, delivery: Delivery) -> dict[str, Any]:
        """Postal's ``D`` shape."""
        return {
            "message": message.webhook_hash(),
            "status": delivery.status,
            "details": delivery.details,
            "output": delivery.output[:512],
            "sent_with_ssl": delivery.sent_with_ssl,
            "timestamp": delivery.timestamp,
            "time": delivery.time,
        }

    def _outcome_steps(self, message: Message) -> list[str]:
        local = message.rcpt_to.partition("@")[0].split("+", 1)[0].lower()
        if message.rcpt_to.lower() in self.suppressed:
            return ["suppressed"]
        return {
            "bounce": ["sent", "bounced"],
            "fail": ["hardfail"],
            "delay": ["softfail", "sent"],
            "hold": ["held"],
            "click": ["sent", "clicked"],
            "open": ["sent", "loaded"],
            "load": ["sent", "loaded"],
        }.get(local, ["sent"])

    def _step(self, message: Message, step: str) -> Webhook | None:
        """Apply one delivery step to ``message``; return the webhook it triggers."""
        domain = message.rcpt_to.rpartition("@")[2] or "example.com"
        mx = f"mx.{domain}"
        if step == "sent":
            d = self._delivery(
                message,
                "Sent",
                f"Message for {message.rcpt_to} accepted by 192.0.2.25:25 ({mx})",
                f"250 2.0.0 Ok: queued as {secrets.token_hex(5).upper()}",
                True,
                0.12,
            )
            return Webhook("MessageSent", self._d_payload(message, d))
        if step == "softfail":
            d = self._delivery(
                message,
                "SoftFail",
                f"Temporary failure for {message.rcpt_to} at 192.0.2.25:25 ({mx})",
                "451 4.7.1 Greylisted, please try again later",
                True,
                0.2,
            )
            return Webhook("MessageDelayed", self._d_payload(message, d))
        if step == "hardfail":
            d = self._delivery(
                message,
                "HardFail",
                f"Permanent SMTP delivery error when sending to 192.0.2.25:25 ({mx})",
                "550 5.1.1 User unknown",
                True,
                0.31,
            )
            return Webhook("MessageDeliveryFailed", self._d_payload(message, d))
        if step == "held":
            d = self._delivery(
                message,
                "Held",
                "Credential is configured to hold all messages authenticated by it.",
            )
            return Webhook("MessageHeld", self._d_payload(message, d))
        if step == "suppressed":
            reason = self.suppressed.get(message.rcpt_to.lower(), "too many hard fails")
            d = self._delivery(
                message,
                "Held",
                f"Recipient ({message.rcpt_to}) is on the suppression list (reason: {reason})",
            )
            return Webhook("MessageHeld", self._d_payload(message, d))
        if step == "bounced":
            bounce = self._bounce_for(message)
            self._delivery(
                message,
                "Bounced",
                "We've received a bounce message for this e-mail. "
                f"See <msg:{bounce.id}> for details.",
            )
            payload = {"original_message": message.webhook_hash(), "bounce": bounce.webhook_hash()}
            return Webhook("MessageBounced", payload)
        if step == "clicked":
            click: dict[str, Any] = {
                "url": _first_link(message.raw) or "https://example.com/",
                "token": secrets.token_urlsafe(6)[:8],
                "ip_address": "203.0.113.9",
                "user_agent": "Mozilla/5.0 (sandbox)",
                "timestamp": time.time(),
            }
            message.clicks.append(click)
            clicked = {k: v for k, v in click.items() if k != "timestamp"}
            clicked["message"] = message.webhook_hash()
            return Webhook("MessageLinkClicked", clicked)
        if step == "loaded":
            load: dict[str, Any] = {
                "ip_address": "203.0.113.9",
                "user_agent": "Mozilla/5.0 (sandbox)",
                "timestamp": time.time(),
            }
            message.loads.append(load)
            loaded: dict[str, Any] = {k: v for k, v in load.items() if k != "timestamp"}
            loaded["message"] = message.webhook_hash()
            return Webhook("MessageLoaded", loaded)
        raise ValueError(step)

    def _bounce_for(self, message: Message) -> Message:
        domain = message.rcpt_to.rpartition("@")[2] or "example.com"
        raw = (
            f"From: MAILER-DAEMON@{domain}\r\n"
            f"To: {message.token}@psrp.{self.return_path_domain}\r\n"
            f"Subject: Mail delivery failed\r\nMessage-ID: <{uuid.uuid4()}@{domain}>\r\n\r\n"
            f"550 5.1.1 <{message.rcpt_to}>: Recipient address rejected: User unknown\r\n"
        ).encode()
        bounce = Message(
            id=self._next_id,
            token=_new_token(),
            rcpt_to=f"{message.token}@psrp.{self.return_path_domain}",
            mail_from=f"MAILER-DAEMON@{domain}",
            raw=raw,
            message_id=_bracketless(_header_values(_headers_of(raw), "Message-ID")[0]),
            tag=None,
            subject="Mail delivery failed",
            scope="incoming",
            bounce=True,
            bounce_for_id=message.id,
            status="Processed",
        )
        self._next_id += 1
        self._all[bounce.id] = bounce
        return bounce

    async def _run_outcome(self, message: Message) -> None:
        steps = self._outcome_steps(message)
        if self.faults.webhook_reorder and len(steps) > 1:
            # Apply the steps in order but deliver the webhooks last-first.
            hooks = [self._step(message, s) for s in steps]
            for hook in reversed(hooks):
                await asyncio.sleep(self.webhook_delay_s)
                if hook is not None:
                    self.emit_webhook(hook)
            return
        for step in steps:
            await asyncio.sleep(self.webhook_delay_s)
            hook = self._step(message, step)
            if hook is not None:
                self.emit_webhook(hook)

    # --- webhooks ---------------------------------------------------------------------------

    def emit(self, event: str, payload: dict[str, Any]) -> Webhook:
        """Send any event (e.g. DomainDNSError) to the webhook URL, signed, with retries."""
        return self.emit_webhook(Webhook(event, payload))

    def emit_webhook(self, hook: Webhook) -> Webhook:
        self.webhooks.append(hook)
        copies = 1
        if self.faults.webhook_duplicates > 0:
            self.faults.webhook_duplicates -= 1
            copies = 2
        for _ in range(copies):
            self._schedule(self._deliver(hook))
        return hook

    def server_hash(self) -> dict[str, Any]:
        """Postal's ``S`` shape, for server-level events."""
        return {
            "uuid": self.server_uuid,
            "name": "Sandbox",
            "permalink": "sandbox",
            "organization": "mailgate",
        }

    def _schedule(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.webhook_timeout_s),
                headers={"User-Agent": USER_AGENT},
            )
        return self._session

    async def _deliver(self, hook: Webhook) -> None:
        if not self.webhook_url:
            return
        body = hook.body()
        headers = {"Content-Type": "application/json", **self.sign(body)}
        for attempt in range(1, MAX_ATTEMPTS + 1):
            status = await self._post(body, headers)
            self.webhook_attempts.append(
                {"uuid": hook.uuid, "event": hook.event, "attempt": attempt, "status": status}
            )
            if 200 <= status < 300:
                return
            if attempt < MAX_ATTEMPTS:
                await asyncio.sleep(RETRY_SCHEDULE_S[attempt - 1] * self.retry_factor)
        log.warning("webhook dropped after %d attempts: %s %s", MAX_ATTEMPTS, hook.event, hook.uuid)

    async def _post(self, body: bytes, headers: dict[str, str], url: str | None = None) -> int:
        target = url or self.webhook_url
        assert target is not None
        try:
            async with self._client().post(
                target, data=body, headers=headers, allow_redirects=False
            ) as response:
                await response.read()
                return response.status
        except TimeoutError:
            return -1
        except aiohttp.ClientSSLError:
            return -3
        except aiohttp.ClientError:
            return -2

    # --- inbound mail routed to an HTTP endpoint ------------------------------------------

    def route_inbound(
        self,
        raw: bytes,
        rcpt_to: str,
        mail_from: str,
        *,
        format: str = "RawMessage",
        encoding: str = "BodyAsJSON",
    ) -> Message:
        """Inbound mail matched a route whose HTTP endpoint is ``inbound_url``: post it there
        signed, retrying like Postal (5xx and no answer retry, other non-2xx hard fail)."""
        if format not in ("RawMessage", "Hash"):
            raise ValueError("format must be 'RawMessage' or 'Hash'")
        if encoding not in ("BodyAsJSON", "FormData"):
            raise ValueError("encoding must be 'BodyAsJSON' or 'FormData'")
        headers = _headers_of(raw)
        ids = _header_values(headers, "Message-ID")
        subjects = _header_values(headers, "Subject")
        message = Message(
            id=self._next_id,
            token=_new_token(),
            rcpt_to=rcpt_to,
            mail_from=mail_from,
            raw=raw,
            message_id=_bracketless(ids[0]) if ids else None,
            tag=None,
            subject=subjects[0] if subjects else None,
            scope="incoming",
        )
        self._next_id += 1
        self._all[message.id] = message
        self.inbound.append(message)
        self._schedule(self._deliver_inbound(message, format, encoding))
        return message

    def inbound_params(self, message: Message, format: str, *, flat: bool) -> dict[str, Any]:
        """What HTTPSender#parameters builds for ``message``."""
        if format == "RawMessage":
            return {
                "id": message.id,
                "rcpt_to": message.rcpt_to,
                "mail_from": message.mail_from,
                "message": ruby_encode64(message.raw),
                "base64": True,
                "size": len(message.raw),
            }
        parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(message.raw)

        headers = _headers_of(message.raw)

        def last(name: str) -> str | None:
            values = _header_values(headers, name)
            return values[-1] if values else None

        plain = parsed.get_body(("plain",))
        html = parsed.get_body(("html",))
        attachments = list(parsed.iter_attachments())
        params: dict[str, Any] = {
            "id": message.id,
            "rcpt_to": message.rcpt_to,
            "mail_from": message.mail_from,
            "token": message.token,
            "subject": message.subject,
            "message_id": message.message_id,
            "timestamp": message.timestamp,
            "size": str(len(message.raw)),
            "spam_status": "NotChecked",
            "bounce": False,
            "received_with_ssl": True,
            "to": last("To"),
            "cc": last("Cc"),
            "from": last("From"),
            "date": last("Date"),
            "in_reply_to": last("In-Reply-To"),
            "references": last("References"),
            "html_body": html.get_content() if html is not None else None,
            "attachment_quantity": len(attachments),
            "auto_submitted": last("Auto-Submitted"),
            "reply_to": _header_values(headers, "Reply-To"),
            "plain_body": plain.get_content() if plain is not None else None,
        }
        items = []
        for part in attachments:
            decoded = part.get_payload(decode=True)
            data = decoded if isinstance(decoded, bytes) else b""
            items.append(
                {
                    "filename": part.get_filename() or "",
                    "content_type": part.get_content_type(),
                    "size": len(data),
                    "data": ruby_encode64(data),
                }
            )
        if flat:
            for i, item in enumerate(items):
                for name, value in item.items():
                    params[f"attachments[{i}][{name}]"] = value
        else:
            params["attachments"] = items
        return params

    def inbound_request(
        self, message: Message, format: str = "RawMessage", encoding: str = "BodyAsJSON"
    ) -> tuple[bytes, dict[str, str]]:
        """The exact body and headers Postal posts to the endpoint (signed)."""
        params = self.inbound_params(message, format, flat=encoding == "FormData")
        if encoding == "BodyAsJSON":
            body = json.dumps(params, separators=(",", ":")).encode()
            content_type = "application/json"
        else:
            body = urllib.parse.urlencode({k: _form_value(v) for k, v in params.items()}).encode()
            content_type = "application/x-www-form-urlencoded"
        return body, {"Content-Type": content_type, **self.sign(body)}

    async def _deliver_inbound(self, message: Message, format: str, encoding: str) -> None:
        if not self.inbound_url:
            self._delivery(message, "HardFail", "No HTTP endpoint configured for the route.")
            return
        body, headers = self.inbound_request(message, format, encoding)
        for attempt in range(1, INBOUND_MAX_ATTEMPTS + 1):
            status = await self._post(body, headers, self.inbound_url)
            self.inbound_attempts.append({"id": message.id, "attempt": attempt, "status": status})
            details = f"Received a {status} from {self.inbound_url}"
            if 200 <= status < 300:
                self._delivery(message, "Sent", details)
                return
            if status >= 500 or status < 0:
                self._delivery(message, "SoftFail", details)
                await asyncio.sleep(INBOUND_RETRY_BASE_S * 1.3**attempt * self.retry_factor)
                continue
            self._delivery(message, "HardFail", details)
            return
        log.warning("inbound message %d dropped after %d attempts", message.id, attempt)

    # --- admin routes ---------------------------------------------------------------------

    async def _admin_inbound(self, request: web.Request) -> web.Response:
        try:
            document = await request.json()
            if "data" in document:
                raw = base64.b64decode(str(document["data"]))
            else:
                raw = str(document["raw"]).encode()
            message = self.route_inbound(
                raw,
                str(document["rcpt_to"]),
                str(document.get("mail_from") or "someone@example.net"),
                format=str(document.get("format") or "RawMessage"),
                encoding=str(document.get("encoding") or "BodyAsJSON"),
            )
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"id": message.id, "token": message.token})

    async def _jwks(self, _request: web.Request) -> web.Response:
        return web.json_response(jwks(self.private_key))

    async def _admin_messages(self, _request: web.Request) -> web.Response:
        out = []
        for item in self.messages:
            item = dict(item)
            item["data"] = base64.b64encode(item.pop("raw")).decode()
            out.append(item)
        return web.json_response(out)

    async def _admin_reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"status": "ok"})

    async def _admin_faults(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                changes = await request.json()
                if not isinstance(changes, dict):
                    raise ValueError("expected a JSON object")
                self.faults.update(changes)
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(dataclasses.asdict(self.faults))

    async def _admin_webhooks(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "webhooks": [
                    {"uuid": h.uuid, "event": h.event, "timestamp": h.timestamp}
                    for h in self.webhooks
                ],
                "attempts": self.webhook_attempts,
            }
        )

    async def _admin_emit(self, request: web.Request) -> web.Response:
        try:
            document = await request.json()
            event = str(document["event"])
            payload = document.get("payload")
            if payload is None:
                payload = {"server": self.server_hash()}
            if not isinstance(payload, dict):
                raise ValueError("payload must be an object")
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        hook = self.emit(event, payload)
        return web.json_response({"uuid": hook.uuid})

    async def _admin_suppress(self, request: web.Request) -> web.Response:
        try:
            document = await request.json()
            address = str(document["address"]).lower()
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.suppressed[address] = str(document.get("reason") or "too many hard fails")
        return web.json_response({"status": "ok"})

    async def _admin_public_key(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "p": self.public_key_b64(),
                "pem": self.public_key_pem(),
                "kid": self.key_id(),
                "dkim_record": f"v=DKIM1; t=s; h=sha256; p={self.public_key_b64()};",
            }
        )


_LINK = re.compile(rb"https?://[^\s\"'<>]+")


def _first_link(raw: bytes) -> str | None:
    match = _LINK.search(raw.split(b"\r\n\r\n", 1)[-1])
    return match.group(0).decode("ascii", "replace") if match else None


def _form_value(value: Any) -> str:
    """Ruby's ``to_s`` as ``set_form_data`` applies it."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def ruby_encode64(data: bytes) -> str:
    """Ruby ``Base64.encode64``: 60 characters a line, each line ending in a newline."""
    text = base64.b64encode(data).decode("ascii")
    return "".join(text[i : i + 60] + "\n" for i in range(0, len(text), 60))


def _bracketless(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text.strip() or None


# --- command line -------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mailgate-postal-sandbox", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5080)
    parser.add_argument("--api-key", action="append", default=[], required=True)
    parser.add_argument("--webhook-url", default=None)
    parser.add_argument(
        "--inbound-url",
        default=None,
        help="route HTTP endpoint; default: the webhook URL with /api/v1/inbound as its path",
    )
    parser.add_argument("--signing-key", type=Path, default=Path("signing.key"))
    parser.add_argument(
        "--public-key-out", type=Path, default=None, help="write the public PEM here"
    )
    parser.add_argument("--domain", action="append", default=None, help="verified domain (repeat)")
    parser.add_argument("--allow-sender", action="store_true")
    parser.add_argument("--webhook-delay-ms", type=float, default=100.0)
    parser.add_argument("--retry-factor", type=float, default=1.0)
    parser.add_argument("--webhook-timeout-s", type=float, default=WEBHOOK_TIMEOUT_S)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s postal-sandbox %(message)s")
    key = load_or_create_private_key(args.signing_key)
    if args.public_key_out is not None:
        args.public_key_out.write_text(public_key_pem(key))
    inbound_url = args.inbound_url
    if inbound_url is None and args.webhook_url:
        parts = urllib.parse.urlsplit(args.webhook_url)
        inbound_url = urllib.parse.urlunsplit(parts._replace(path="/api/v1/inbound", query=""))
    sandbox = PostalSandbox(
        args.api_key,
        args.webhook_url,
        key,
        inbound_url=inbound_url,
        domains=args.domain,
        allow_sender=args.allow_sender,
        webhook_delay_ms=args.webhook_delay_ms,
        retry_factor=args.retry_factor,
        webhook_timeout_s=args.webhook_timeout_s,
    )
    log.info(
        "listening on http://%s:%d webhooks -> %s; DKIM p=%s",
        args.host,
        args.port,
        args.webhook_url or "(none)",
        sandbox.public_key_b64(),
    )
    web.run_app(
        sandbox.app(),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        loop=_new_loop(),
    )


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (as the services run): Postal runs on its own machine in
    production, so here its sandbox should cost the shared cores as little as it can."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with mailgate-core
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    main()
