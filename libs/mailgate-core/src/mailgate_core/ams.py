"""Typed client for the AMS Enterprise JSON-RPC 2.0 API (specs/ams-jsonrpc.md).

Used by stats-poller (progress polling) and ams-reporter (automatic stop/resume). Every
method the seed lists (``METHODS``) has a coroutine here: the ones whose shapes the seed
documents take and return msgspec structs (``get_mailings``, ``get_mailing``,
``start_mailing``/``stop_mailing``, ``get_sending_job_result``, the relay/proxy sending
states, the scheduler); the rest take keyword params and return the decoded ``result``.
``call(method, params, result_type=...)`` is the generic typed entry point under them all.

Wire rules: HTTP POST of ``{"jsonrpc":"2.0","method":..,"params":{"apiKey":..,..},"id":"N"}``
to ``AMS_API_URL``; the answer carries ``result`` or ``error{code,message}`` and its ``id``
may come back as a number although a string was sent (ids are compared as strings).

AMS executes API commands one at a time on its main thread and refuses some while a user has
the resource open in its UI. So: one call in flight per AMS instance (an ``asyncio.Lock``
shared by every client in this event loop that talks to the same scheme://host:port), a
timeout on every wait, and "busy" answers retried with capped exponential backoff (the lock
is released while backing off). Transport failures are retried only for read-only methods:
a timed-out ``stopMailing`` may have run, and its retry would answer "busy" anyway.

Errors::

    AmsError                    base of everything this module raises
    ├── AmsTransportError       HTTP status, connection, not a JSON-RPC answer
    │   └── AmsTimeoutError     no answer (or no turn in the queue) within the timeout
    ├── AmsResultError          ``result`` does not have the documented shape
    └── AmsRpcError             a JSON-RPC ``error`` object (``code``, ``message``)
        ├── AmsAuthError        apiKey missing or wrong (also HTTP 401/403)
        ├── AmsBusyError        another command is running, or the resource is open in the UI
        ├── AmsMethodNotFoundError   -32601
        └── AmsInvalidParamsError    -32602
"""

from __future__ import annotations

import asyncio
import itertools
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar, cast, overload
from urllib.parse import urlsplit

import aiohttp
import msgspec
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

log = structlog.get_logger()

T = TypeVar("T")

# --- errors --------------------------------------------------------------------------------


class AmsError(Exception):
    """Any failed AMS call."""

    def __init__(self, message: str, *, method: str = "") -> None:
        super().__init__(message)
        self.method = method


class AmsTransportError(AmsError):
    """No usable JSON-RPC answer: HTTP status, connection error, body not JSON-RPC."""

    def __init__(self, message: str, *, method: str = "", status: int | None = None) -> None:
        super().__init__(message, method=method)
        self.status = status


class AmsTimeoutError(AmsTransportError):
    """AMS did not answer in time, or our turn in the one-at-a-time queue did not come."""


class AmsResultError(AmsError):
    """The call succeeded but ``result`` does not have the documented shape."""


class AmsRpcError(AmsError):
    """AMS answered with a JSON-RPC ``error`` object."""

    def __init__(self, code: int | None, message: str, *, method: str = "") -> None:
        super().__init__(f"AMS error {code}: {message}", method=method)
        self.code = code
        self.message = message


class AmsAuthError(AmsRpcError):
    """The apiKey is missing or wrong. Not retried: fix AMS_API_KEY."""


class AmsBusyError(AmsRpcError):
    """AMS is executing another command or a user has the resource open. Retried."""


class AmsMethodNotFoundError(AmsRpcError):
    pass


class AmsInvalidParamsError(AmsRpcError):
    pass


#: Lower-case fragments of AMS error messages that mean "try again later" (English texts as
#: the AMS fake sends them, Russian as AMS's own UI words them).
BUSY_MARKERS: Final[tuple[str, ...]] = (
    "busy",
    "another command",
    "being executed",
    "try again later",
    "opened by",
    "is open",
    "in use",
    "locked",
    "занят",
    "выполняется",
    "открыт",
    "заблокирован",
    "повторите",
)
AUTH_MARKERS: Final[tuple[str, ...]] = (
    "apikey",
    "api key",
    "api-key",
    "unauthorized",
    "access denied",
    "ключ",
    "доступ запрещ",
)


def classify_error(code: int | None, message: str) -> type[AmsRpcError]:
    """The exception class for a JSON-RPC error (pure; AMS mostly uses -32603 plus a text)."""
    if code == -32601:
        return AmsMethodNotFoundError
    text = message.lower()
    if any(marker in text for marker in AUTH_MARKERS):
        return AmsAuthError
    if any(marker in text for marker in BUSY_MARKERS):
        return AmsBusyError
    if code == -32602:
        return AmsInvalidParamsError
    return AmsRpcError


# --- methods -------------------------------------------------------------------------------

AmsMethod = Literal[
    # mailings
    "addMailing",
    "editMailing",
    "deleteMailing",
    "getMailings",
    "getTransactionalMailings",
    "getMailing",
    "startMailing",
    "stopMailing",
    "restartRunningMailings",
    # sender accounts
    "addSenderAccount",
    "editSenderAccount",
    "deleteSenderAccount",
    "getSenderAccounts",
    "getSenderAccount",
    # mailing lists
    "addMailingList",
    "editMailingList",
    "deleteMailingList",
    "getMailingLists",
    "getMailingListSize",
    "getMailingListDataSet",
    "clearMailingList",
    # contacts
    "addContacts",
    "editContact",
    "deleteContacts",
    # messages
    "addMessage",
    "editMessage",
    "deleteMessage",
    "getMessages",
    "getMessage",
    # delivery presets
    "addDeliveryPreset",
    "editDeliveryPreset",
    "deleteDeliveryPreset",
    "getDeliveryPresets",
    "getDeliveryPreset",
    "toggleRelaysInPreset",
    # amsweb.php links
    "addAmswebLink",
    "editAmswebLink",
    "deleteAmswebLink",
    "getAmswebLinks",
    # DKIM signatures
    "addDkimSignature",
    "editDkimSignature",
    "deleteDkimSignature",
    "getDkimSignatures",
    "getDkimSignature",
    # Postmaster accounts
    "addPostmasterAccount",
    "editPostmasterAccount",
    "deletePostmasterAccount",
    "getPostmasterAccounts",
    # proxy lists
    "addProxyList",
    "editProxyList",
    "deleteProxyList",
    "updateProxyList",
    "getProxyLists",
    "getProxyList",
    # relay / proxy states of active mailings
    "getRelaysSendingStates",
    "changeRelaySendingOption",
    "getProxiesSendingStates",
    "changeProxySendingOption",
    # transactional mailings
    "postSendingJob",
    "getSendingJobResult",
    # scheduler
    "isSchedulerRunning",
    "runScheduler",
]

#: Every method, by the seed's group. (The seed's heading says 52 commands; its tables list
#: these 62, all of which the client covers.)
METHOD_GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "mailings": (
        "addMailing",
        "editMailing",
        "deleteMailing",
        "getMailings",
        "getTransactionalMailings",
        "getMailing",
        "startMailing",
        "stopMailing",
        "restartRunningMailings",
    ),
    "sender_accounts": (
        "addSenderAccount",
        "editSenderAccount",
        "deleteSenderAccount",
        "getSenderAccounts",
        "getSenderAccount",
    ),
    "mailing_lists": (
        "addMailingList",
        "editMailingList",
        "deleteMailingList",
        "getMailingLists",
        "getMailingListSize",
        "getMailingListDataSet",
        "clearMailingList",
    ),
    "contacts": ("addContacts", "editContact", "deleteContacts"),
    "messages": ("addMessage", "editMessage", "deleteMessage", "getMessages", "getMessage"),
    "delivery_presets": (
        "addDeliveryPreset",
        "editDeliveryPreset",
        "deleteDeliveryPreset",
        "getDeliveryPresets",
        "getDeliveryPreset",
        "toggleRelaysInPreset",
    ),
    "amsweb_links": ("addAmswebLink", "editAmswebLink", "deleteAmswebLink", "getAmswebLinks"),
    "dkim_signatures": (
        "addDkimSignature",
        "editDkimSignature",
        "deleteDkimSignature",
        "getDkimSignatures",
        "getDkimSignature",
    ),
    "postmaster_accounts": (
        "addPostmasterAccount",
        "editPostmasterAccount",
        "deletePostmasterAccount",
        "getPostmasterAccounts",
    ),
    "proxy_lists": (
        "addProxyList",
        "editProxyList",
        "deleteProxyList",
        "updateProxyList",
        "getProxyLists",
        "getProxyList",
    ),
    "relay_states": ("getRelaysSendingStates", "changeRelaySendingOption"),
    "proxy_states": ("getProxiesSendingStates", "changeProxySendingOption"),
    "transactional": ("postSendingJob", "getSendingJobResult"),
    "scheduler": ("isSchedulerRunning", "runScheduler"),
}
METHODS: Final[tuple[str, ...]] = tuple(m for group in METHOD_GROUPS.values() for m in group)


def is_read_only(method: str) -> bool:
    """``get*``/``is*`` methods change nothing, so a transport failure may be retried."""
    return method.startswith(("get", "is"))


# --- documented shapes ---------------------------------------------------------------------

MailingState = Literal["idle", "running", "paused"]


class ProgressInfo(msgspec.Struct, rename="camel", kw_only=True):
    percent_done: float = 0.0
    total: int = 0
    sent: int = 0
    not_sent: int = 0
    bad: int = 0
    refused: int = 0
    excluded: int = 0
    opened: int = 0
    clicks: int = 0


class Mailing(msgspec.Struct, rename="camel", kw_only=True):
    """One entry of ``getMailings`` (and the body of ``getMailing``)."""

    id: int | str
    name: str = ""
    type: str = ""
    state: str = ""
    """``idle``, ``running`` or ``paused`` (kept a str: an unknown state must not fail a poll)."""
    create_date: str | None = None
    last_start_date: str | None = None
    approx_speed: str = ""
    """Like ``"0/min"``."""
    progress_info: ProgressInfo = msgspec.field(default_factory=ProgressInfo)


class MailingIdParams(msgspec.Struct, kw_only=True):
    """``params.id`` of getMailing/startMailing/stopMailing and the relay/proxy states."""

    id: int | str


class SendingJobParams(msgspec.Struct, kw_only=True):
    job_id: int | str = msgspec.field(name="jobID")
    mailing_id: int | str = msgspec.field(name="mailingID")


SendResult = Literal["pending", "sent", "failed", "excluded"]
FailCategory = Literal["bad email", "refused content or IP", "other"]


class SendingJobRecipient(msgspec.Struct, kw_only=True):
    """One recipient of ``getSendingJobResult`` (AMS's own key spelling on the wire)."""

    id: str | int = msgspec.field(name="ID")
    email: str = msgspec.field(name="Email")
    send_result: str = msgspec.field(default="pending", name="sendResult")
    """pending | sent | failed | excluded."""
    last_reply: str = msgspec.field(default="", name="lastReply")
    """The last SMTP reply text."""
    fail_category: str | None = msgspec.field(default=None, name="failCategory")
    """bad email | refused content or IP | other."""


class RelaySendingState(msgspec.Struct, rename="camel", kw_only=True):
    """A relay (or proxy) of an active mailing. The seed names the facts (sent, errors,
    working state) but not the keys; these are the keys the AMS fake uses, unknown keys are
    ignored and missing ones default, so a differently spelled AMS answer still parses."""

    id: int | str | None = None
    name: str = ""
    state: str = ""
    """``active``, ``paused``, ``disabled`` ..."""
    enabled: bool = True
    sent: int = 0
    errors: int = 0


# --- the client ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for busy answers (and transport failures of read-only methods)."""

    attempts: int = 6
    initial_s: float = 0.5
    max_s: float = 8.0
    total_s: float = 60.0


class _ErrorObject(msgspec.Struct):
    code: int | None = None
    message: str = ""


class _Response(msgspec.Struct):
    jsonrpc: str = "2.0"
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: _ErrorObject | None = None
    id: str | int | float | None = None


_response_decoder: Final = msgspec.json.Decoder(_Response)
_encoder: Final = msgspec.json.Encoder()

# One lock per AMS instance (scheme://host:port) per event loop. This is the module's only
# mutable state, on purpose: two clients in one process talking to one AMS must still queue
# behind each other. Weak keys: a closed loop's locks go with it.
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def instance_key(url: str) -> str:
    """``http://H:80/api/v1`` -> ``http://h:80``: what identifies one AMS instance."""
    parts = urlsplit(url)
    scheme = (parts.scheme or "http").lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


def instance_lock(url: str) -> asyncio.Lock:
    """The lock every client of this event loop holds while it has a call at this AMS."""
    locks = _LOCKS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(instance_key(url), asyncio.Lock())


CallObserver = Callable[[str, str, float], None]
"""``(method, outcome, seconds)`` per HTTP attempt; outcome ``ok``, ``busy``, ``auth``,
``rpc_error``, ``timeout`` or ``transport``. For a service's metrics."""


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    for cls, name in (
        (AmsBusyError, "busy"),
        (AmsAuthError, "auth"),
        (AmsRpcError, "rpc_error"),
        (AmsTimeoutError, "timeout"),
        (AmsTransportError, "transport"),
    ):
        if isinstance(exc, cls):
            return name
    return "error"


def _as_list(value: Any, *keys: str) -> Any:
    """A list result, tolerating ``{"<key>": [...]}`` wrappers."""
    if isinstance(value, dict):
        for key in keys:
            if key in value:
                return value[key]
    return value


class AmsClient:
    """One AMS instance. ``session`` is borrowed (the caller closes it); without one the
    client makes its own and ``close()`` closes it."""

    def __init__(
        self,
        url: str,
        api_key: str,
        session: aiohttp.ClientSession | None = None,
        *,
        timeout_s: float = 30.0,
        lock_timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        observer: CallObserver | None = None,
    ) -> None:
        self.url = url
        self._api_key = api_key
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s
        self._lock_timeout_s = lock_timeout_s if lock_timeout_s is not None else 4 * timeout_s
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._observer = observer
        self._ids = itertools.count(1)

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AmsClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # --- generic call ----------------------------------------------------------------

    @overload
    async def call(
        self, method: str, params: Mapping[str, Any] | msgspec.Struct | None = None
    ) -> Any: ...

    @overload
    async def call(
        self,
        method: str,
        params: Mapping[str, Any] | msgspec.Struct | None = None,
        *,
        result_type: type[T],
    ) -> T: ...

    async def call(
        self,
        method: str,
        params: Mapping[str, Any] | msgspec.Struct | None = None,
        *,
        result_type: Any = Any,
    ) -> Any:
        """Call ``method`` with ``params`` (+ apiKey); return ``result`` as ``result_type``.

        Busy answers are retried with backoff (so are transport failures of read-only
        methods); every other error is raised at once.
        """
        retry_transport = is_read_only(method)

        def should_retry(exc: BaseException) -> bool:
            if isinstance(exc, AmsBusyError):
                return True
            return retry_transport and isinstance(exc, AmsTransportError)

        def before_sleep(state: RetryCallState) -> None:
            outcome = state.outcome
            exc = outcome.exception() if outcome is not None else None
            wait_s = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning(
                "ams call retried",
                method=method,
                attempt=state.attempt_number,
                wait_s=round(wait_s, 3),
                error=str(exc),
            )

        policy = self._retry
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.total_s),
            wait=wait_exponential(multiplier=policy.initial_s, max=policy.max_s)
            + wait_random(0, policy.initial_s),
            retry=retry_if_exception(should_retry),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        raw: msgspec.Raw = await retrying(self._call_once, method, params)
        try:
            return msgspec.json.decode(raw, type=result_type, strict=False)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise AmsResultError(f"{method}: unexpected result: {exc}", method=method) from exc

    async def _call_once(
        self, method: str, params: Mapping[str, Any] | msgspec.Struct | None
    ) -> msgspec.Raw:
        started = time.monotonic()
        error: BaseException | None = None
        try:
            return await self._post(method, params)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if self._observer is not None and not isinstance(error, asyncio.CancelledError):
                self._observer(method, _outcome(error), time.monotonic() - started)

    def _body(self, method: str, request_id: str, params: Any) -> bytes:
        if params is None:
            fields: dict[str, Any] = {}
        elif isinstance(params, msgspec.Struct):
            fields = cast(dict[str, Any], msgspec.to_builtins(params))
        else:
            fields = dict(params)
        request = {
            "jsonrpc": "2.0",
            "method": method,
            "params": {"apiKey": self._api_key, **fields},
            "id": request_id,
        }
        return _encoder.encode(request)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        return self._session

    async def _post(self, method: str, params: Any) -> msgspec.Raw:
        lock = instance_lock(self.url)
        try:
            async with asyncio.timeout(self._lock_timeout_s):
                await lock.acquire()
        except TimeoutError:
            raise AmsTimeoutError(
                f"{method}: no turn at AMS within {self._lock_timeout_s}s", method=method
            ) from None
        try:
            request_id = str(next(self._ids))
            body = self._body(method, request_id, params)
            try:
                async with self._http().post(
                    self.url,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=self._timeout,
                ) as resp:
                    status = resp.status
                    content = await resp.read()
            except TimeoutError:
                raise AmsTimeoutError(
                    f"{method}: no answer within {self._timeout_s}s", method=method
                ) from None
            except aiohttp.ClientError as exc:
                raise AmsTransportError(
                    f"{method}: {type(exc).__name__}: {exc}", method=method
                ) from exc
        finally:
            lock.release()
        return self._parse(method, request_id, status, content)

    def _parse(self, method: str, request_id: str, status: int, content: bytes) -> msgspec.Raw:
        try:
            response = _response_decoder.decode(content)
        except (msgspec.DecodeError, msgspec.ValidationError):
            response = None
        if response is not None and response.error is not None:
            err = response.error
            cls = classify_error(err.code, err.message)
            raise cls(err.code, err.message, method=method)
        if status in (401, 403):
            raise AmsAuthError(None, f"HTTP {status}", method=method)
        if status != 200 or response is None:
            raise AmsTransportError(
                f"{method}: HTTP {status}, not a JSON-RPC answer", method=method, status=status
            )
        if response.id is not None and _id_text(response.id) != request_id:
            raise AmsTransportError(
                f"{method}: response id {response.id!r} != {request_id}", method=method
            )
        return response.result

    # --- mailings (documented shapes) ------------------------------------------------

    async def get_mailings(self) -> list[Mailing]:
        result = await self.call("getMailings")
        return _convert(_as_list(result, "mailings", "items"), list[Mailing], "getMailings")

    async def get_transactional_mailings(self) -> list[Mailing]:
        result = await self.call("getTransactionalMailings")
        return _convert(
            _as_list(result, "mailings", "items"), list[Mailing], "getTransactionalMailings"
        )

    async def get_mailing(self, mailing_id: int | str) -> Mailing:
        result = await self.call("getMailing", MailingIdParams(id=mailing_id))
        if isinstance(result, dict) and "mailing" in result:
            result = result["mailing"]
        return _convert(result, Mailing, "getMailing")

    async def start_mailing(self, mailing_id: int | str) -> Any:
        return await self.call("startMailing", MailingIdParams(id=mailing_id))

    async def stop_mailing(self, mailing_id: int | str) -> Any:
        return await self.call("stopMailing", MailingIdParams(id=mailing_id))

    async def restart_running_mailings(self) -> Any:
        return await self.call("restartRunningMailings")

    async def add_mailing(self, **params: Any) -> Any:
        return await self.call("addMailing", params)

    async def edit_mailing(self, **params: Any) -> Any:
        return await self.call("editMailing", params)

    async def delete_mailing(self, **params: Any) -> Any:
        return await self.call("deleteMailing", params)

    # --- relays and proxies of active mailings ---------------------------------------

    async def get_relays_sending_states(self, mailing_id: int | str) -> list[RelaySendingState]:
        result = await self.call("getRelaysSendingStates", MailingIdParams(id=mailing_id))
        return _convert(
            _as_list(result, "relays", "items"), list[RelaySendingState], "getRelaysSendingStates"
        )

    async def change_relay_sending_option(self, **params: Any) -> Any:
        return await self.call("changeRelaySendingOption", params)

    async def get_proxies_sending_states(self, mailing_id: int | str) -> list[RelaySendingState]:
        result = await self.call("getProxiesSendingStates", MailingIdParams(id=mailing_id))
        return _convert(
            _as_list(result, "proxies", "items"),
            list[RelaySendingState],
            "getProxiesSendingStates",
        )

    async def change_proxy_sending_option(self, **params: Any) -> Any:
        return await self.call("changeProxySendingOption", params)

    # --- transactional ---------------------------------------------------------------

    async def post_sending_job(self, **params: Any) -> Any:
        return await self.call("postSendingJob", params)

    async def get_sending_job_result(
        self, job_id: int | str, mailing_id: int | str
    ) -> list[SendingJobRecipient]:
        result = await self.call(
            "getSendingJobResult", SendingJobParams(job_id=job_id, mailing_id=mailing_id)
        )
        if isinstance(result, dict) and "ID" in result:
            result = [result]
        return _convert(
            _as_list(result, "results", "recipients", "items"),
            list[SendingJobRecipient],
            "getSendingJobResult",
        )

    # --- scheduler -------------------------------------------------------------------

    async def is_scheduler_running(self) -> bool:
        result = await self.call("isSchedulerRunning")
        if isinstance(result, dict):
            result = result.get("running", result.get("isRunning", result.get("result")))
        return _convert(result, bool, "isSchedulerRunning")

    async def run_scheduler(self) -> Any:
        return await self.call("runScheduler")

    # --- sender accounts -------------------------------------------------------------

    async def add_sender_account(self, **params: Any) -> Any:
        return await self.call("addSenderAccount", params)

    async def edit_sender_account(self, **params: Any) -> Any:
        return await self.call("editSenderAccount", params)

    async def delete_sender_account(self, **params: Any) -> Any:
        return await self.call("deleteSenderAccount", params)

    async def get_sender_accounts(self, **params: Any) -> Any:
        return await self.call("getSenderAccounts", params)

    async def get_sender_account(self, **params: Any) -> Any:
        return await self.call("getSenderAccount", params)

    # --- mailing lists and contacts --------------------------------------------------

    async def add_mailing_list(self, **params: Any) -> Any:
        return await self.call("addMailingList", params)

    async def edit_mailing_list(self, **params: Any) -> Any:
        return await self.call("editMailingList", params)

    async def delete_mailing_list(self, **params: Any) -> Any:
        """Listed by the seed as not implemented by AMS."""
        return await self.call("deleteMailingList", params)

    async def get_mailing_lists(self, **params: Any) -> Any:
        return await self.call("getMailingLists", params)

    async def get_mailing_list_size(self, **params: Any) -> Any:
        return await self.call("getMailingListSize", params)

    async def get_mailing_list_data_set(self, **params: Any) -> Any:
        return await self.call("getMailingListDataSet", params)

    async def clear_mailing_list(self, **params: Any) -> Any:
        return await self.call("clearMailingList", params)

    async def add_contacts(self, **params: Any) -> Any:
        return await self.call("addContacts", params)

    async def edit_contact(self, **params: Any) -> Any:
        return await self.call("editContact", params)

    async def delete_contacts(self, **params: Any) -> Any:
        return await self.call("deleteContacts", params)

    # --- messages --------------------------------------------------------------------

    async def add_message(self, **params: Any) -> Any:
        return await self.call("addMessage", params)

    async def edit_message(self, **params: Any) -> Any:
        return await self.call("editMessage", params)

    async def delete_message(self, **params: Any) -> Any:
        return await self.call("deleteMessage", params)

    async def get_messages(self, **params: Any) -> Any:
        return await self.call("getMessages", params)

    async def get_message(self, **params: Any) -> Any:
        return await self.call("getMessage", params)

    # --- delivery presets ------------------------------------------------------------

    async def add_delivery_preset(self, **params: Any) -> Any:
        return await self.call("addDeliveryPreset", params)

    async def edit_delivery_preset(self, **params: Any) -> Any:
        return await self.call("editDeliveryPreset", params)

    async def delete_delivery_preset(self, **params: Any) -> Any:
        return await self.call("deleteDeliveryPreset", params)

    async def get_delivery_presets(self, **params: Any) -> Any:
        return await self.call("getDeliveryPresets", params)

    async def get_delivery_preset(self, **params: Any) -> Any:
        return await self.call("getDeliveryPreset", params)

    async def toggle_relays_in_preset(self, **params: Any) -> Any:
        return await self.call("toggleRelaysInPreset", params)

    # --- amsweb.php links ------------------------------------------------------------

    async def add_amsweb_link(self, **params: Any) -> Any:
        return await self.call("addAmswebLink", params)

    async def edit_amsweb_link(self, **params: Any) -> Any:
        return await self.call("editAmswebLink", params)

    async def delete_amsweb_link(self, **params: Any) -> Any:
        return await self.call("deleteAmswebLink", params)

    async def get_amsweb_links(self, **params: Any) -> Any:
        return await self.call("getAmswebLinks", params)

    # --- DKIM signatures -------------------------------------------------------------

    async def add_dkim_signature(self, **params: Any) -> Any:
        return await self.call("addDkimSignature", params)

    async def edit_dkim_signature(self, **params: Any) -> Any:
        return await self.call("editDkimSignature", params)

    async def delete_dkim_signature(self, **params: Any) -> Any:
        return await self.call("deleteDkimSignature", params)

    async def get_dkim_signatures(self, **params: Any) -> Any:
        return await self.call("getDkimSignatures", params)

    async def get_dkim_signature(self, **params: Any) -> Any:
        return await self.call("getDkimSignature", params)

    # --- Postmaster accounts ---------------------------------------------------------

    async def add_postmaster_account(self, **params: Any) -> Any:
        return await self.call("addPostmasterAccount", params)

    async def edit_postmaster_account(self, **params: Any) -> Any:
        return await self.call("editPostmasterAccount", params)

    async def delete_postmaster_account(self, **params: Any) -> Any:
        return await self.call("deletePostmasterAccount", params)

    async def get_postmaster_accounts(self, **params: Any) -> Any:
        return await self.call("getPostmasterAccounts", params)

    # --- proxy lists -----------------------------------------------------------------

    async def add_proxy_list(self, **params: Any) -> Any:
        return await self.call("addProxyList", params)

    async def edit_proxy_list(self, **params: Any) -> Any:
        return await self.call("editProxyList", params)

    async def delete_proxy_list(self, **params: Any) -> Any:
        return await self.call("deleteProxyList", params)

    async def update_proxy_list(self, **params: Any) -> Any:
        return await self.call("updateProxyList", params)

    async def get_proxy_lists(self, **params: Any) -> Any:
        return await self.call("getProxyLists", params)

    async def get_proxy_list(self, **params: Any) -> Any:
        return await self.call("getProxyList", params)


def _id_text(value: str | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _convert(value: Any, type_: type[T], method: str) -> T:
    try:
        return msgspec.convert(value, type_, strict=False)
    except msgspec.ValidationError as exc:
        raise AmsResultError(f"{method}: unexpected result: {exc}", method=method) from exc


def method_attribute(method: str) -> str:
    """``getMailingListDataSet`` -> ``get_mailing_list_data_set`` (the client's coroutine)."""
    out: list[str] = []
    for char in method:
        if char.isupper():
            out.append("_")
            out.append(char.lower())
        else:
            out.append(char)
    return "".join(out)
