"""An AMS Enterprise JSON-RPC 2.0 fake, faithful to specs/ams-jsonrpc.md and the seed's shapes.

What it does like AMS:

* ``POST /api/v1`` with ``{"jsonrpc":"2.0","method","params":{"apiKey",..},"id":"N"}``;
  answers ``{"jsonrpc":"2.0","result"|"error":{"code","message"},"id":N}`` with the id as a
  **number** when the request's string id is numeric, as AMS does.
* ``apiKey`` inside ``params`` on every call (``-32603 Invalid apiKey`` otherwise).
* One command at a time on its "main thread": a call arriving while another executes gets
  ``-32603 AMS is busy: another API command is being executed, try again later`` (counted in
  ``overlaps`` so a test can prove a client never sends two at once).
* Commands on a mailing a user has open in the UI (``open_in_ui``) fail with
  ``-32603 Mailing N is opened by a user in the AMS interface, try again later``.
* Every method the seed lists: getMailings/getMailing/getTransactionalMailings with the seed's
  shape (``progressInfo``...), startMailing (state ``running``) and stopMailing (``paused``),
  restartRunningMailings, getRelaysSendingStates/getProxiesSendingStates for running mailings
  and their change*SendingOption, postSendingJob/getSendingJobResult (outcome by the
  recipient's local part: ``bad*`` bad email, ``refused*`` refused content or IP, ``fail*``
  other, ``excluded*`` excluded, else sent), the scheduler, and in-memory CRUD for the other
  groups (deleteMailingList answers "not implemented", as the seed says).

Test hooks: ``calls`` (every request with its outcome), ``received(method, **params)``
(executed calls only), knobs ``busy_next`` (the next N calls answer busy), ``busy_methods``,
``open_in_ui``, ``call_delay_s``/``method_delay_s`` (how long a command occupies AMS),
``advance(seconds)`` (running mailings send at their speed), ``add_mailing(...)``.
Over HTTP: ``GET /__ams/calls``, ``POST /__ams/faults``, ``POST /__ams/mailings``.

Run: ``python -m mailgate_fakes.ams --port 8090 --api-key KEY [--demo]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

log = logging.getLogger("mailgate_fakes.ams")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

BUSY_MESSAGE = "AMS is busy: another API command is being executed, try again later"
AUTH_MESSAGE = "Invalid apiKey"

#: Generic in-memory collections: method -> (collection, operation).
_CRUD: dict[str, tuple[str, str]] = {}
for _coll, _singular, _plural in (
    ("sender_accounts", "SenderAccount", "SenderAccounts"),
    ("mailing_lists", "MailingList", "MailingLists"),
    ("messages", "Message", "Messages"),
    ("delivery_presets", "DeliveryPreset", "DeliveryPresets"),
    ("amsweb_links", "AmswebLink", "AmswebLinks"),
    ("dkim_signatures", "DkimSignature", "DkimSignatures"),
    ("postmaster_accounts", "PostmasterAccount", "PostmasterAccounts"),
    ("proxy_lists", "ProxyList", "ProxyLists"),
):
    _CRUD[f"add{_singular}"] = (_coll, "add")
    _CRUD[f"edit{_singular}"] = (_coll, "edit")
    _CRUD[f"delete{_singular}"] = (_coll, "delete")
    _CRUD[f"get{_plural}"] = (_coll, "list")
    _CRUD[f"get{_singular}"] = (_coll, "get")
# getPostmasterAccount / getAmswebLink are not in the seed's list.
del _CRUD["getPostmasterAccount"], _CRUD["getAmswebLink"]


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    """Without ``apiKey``."""
    outcome: str
    """``executing`` (still running), ``ok``, ``busy``, ``auth``, ``error``."""
    at: float = field(default_factory=time.monotonic)


def _now_iso() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds")


def _int_id(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RpcError(INVALID_PARAMS, f"Invalid params: id {value!r}") from None


def _speed_per_min(text: str) -> float:
    try:
        return float(text.split("/", 1)[0])
    except ValueError:
        return 0.0


def _progress(total: int = 0, **counts: int) -> dict[str, Any]:
    info = {
        "percentDone": 0,
        "total": total,
        "sent": 0,
        "notSent": total,
        "bad": 0,
        "refused": 0,
        "excluded": 0,
        "opened": 0,
        "clicks": 0,
    }
    info.update(counts)
    return info


class AmsFake:
    """An in-memory AMS Enterprise instance behind its JSON-RPC endpoint."""

    def __init__(
        self,
        api_key: str = "ams-test-key",
        *,
        call_delay_s: float = 0.0,
        speed_per_min: int = 600,
        relays_per_mailing: int = 2,
    ) -> None:
        self.api_key = api_key
        self.call_delay_s = call_delay_s
        self.method_delay_s: dict[str, float] = {}
        self.speed_per_min = speed_per_min
        self.relays_per_mailing = relays_per_mailing
        self.mailings: dict[int, dict[str, Any]] = {}
        self.relays: dict[int, list[dict[str, Any]]] = {}
        self.proxies: dict[int, list[dict[str, Any]]] = {}
        self.jobs: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self.collections: dict[str, dict[int, dict[str, Any]]] = {}
        self.contacts: dict[int, list[dict[str, Any]]] = {}
        self.scheduler_running = False
        #: Every request, executed or refused, in arrival order.
        self.calls: list[Call] = []
        #: Knobs.
        self.busy_next = 0
        self.busy_methods: set[str] = set()
        self.open_in_ui: set[int] = set()
        #: Requests that arrived while another command was executing.
        self.overlaps = 0
        self._executing: str | None = None
        self._next_id = 100
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None

    # --- test helpers --------------------------------------------------------------------

    def add_mailing(
        self,
        mailing_id: int | None = None,
        *,
        name: str = "",
        state: str = "idle",
        type: str = "mailing",
        total: int = 1000,
        **progress: int,
    ) -> dict[str, Any]:
        """Create a mailing in the seed's ``getMailings`` shape and return it."""
        mid = mailing_id if mailing_id is not None else self._new_id()
        mailing = {
            "id": mid,
            "name": name or f"Mailing {mid}",
            "type": type,
            "state": state,
            "createDate": datetime.now(UTC).date().isoformat(),
            "lastStartDate": _now_iso() if state == "running" else None,
            "approxSpeed": f"{self.speed_per_min if state == 'running' else 0}/min",
            "progressInfo": _progress(total, **progress),
        }
        self._recount(mailing)
        self.mailings[mid] = mailing
        self.relays[mid] = [
            {"id": i, "name": f"relay{i}.example.net", "state": "active", "enabled": True}
            | {"sent": 0, "errors": 0}
            for i in range(1, self.relays_per_mailing + 1)
        ]
        self.proxies[mid] = []
        return mailing

    def received(self, method: str, **params: Any) -> list[Call]:
        """Executed calls of ``method`` whose params include ``params`` (ids as text)."""

        def matches(call: Call) -> bool:
            return all(str(call.params.get(k)) == str(v) for k, v in params.items())

        return [c for c in self.calls if c.outcome == "ok" and c.method == method and matches(c)]

    def advance(self, seconds: float) -> None:
        """Let running mailings send for ``seconds`` at their speed (spread over relays)."""
        for mid, m in self.mailings.items():
            if m["state"] != "running":
                continue
            p = m["progressInfo"]
            step = int(_speed_per_min(m["approxSpeed"]) * seconds / 60.0)
            step = min(step, p["notSent"])
            p["sent"] += step
            relays = [r for r in self.relays.get(mid, []) if r["enabled"]]
            for i, relay in enumerate(relays):
                relay["sent"] += step // len(relays) + (1 if i < step % len(relays) else 0)
            self._recount(m)
            if p["notSent"] == 0:
                m["state"] = "idle"
                m["approxSpeed"] = "0/min"

    def reset_calls(self) -> None:
        self.calls.clear()
        self.overlaps = 0

    @staticmethod
    def _recount(mailing: dict[str, Any]) -> None:
        p = mailing["progressInfo"]
        done = p["sent"] + p["bad"] + p["refused"] + p["excluded"]
        p["notSent"] = max(0, p["total"] - done)
        p["percentDone"] = round(100.0 * done / p["total"], 2) if p["total"] else 0

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # --- JSON-RPC ------------------------------------------------------------------------

    async def handle_body(self, raw: bytes) -> dict[str, Any]:
        """One JSON-RPC request body -> the response object (what the HTTP handler sends)."""
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(None, PARSE_ERROR, "Parse error")
        if not isinstance(body, dict) or body.get("jsonrpc") != "2.0" or "method" not in body:
            return self._error(body.get("id") if isinstance(body, dict) else None, -32600, "")
        rid = body.get("id")
        method = str(body["method"])
        params = body.get("params") or {}
        if not isinstance(params, dict):
            return self._error(rid, INVALID_PARAMS, "Invalid params")
        public = {k: v for k, v in params.items() if k != "apiKey"}
        if params.get("apiKey") != self.api_key:
            self.calls.append(Call(method, public, "auth"))
            return self._error(rid, INTERNAL_ERROR, AUTH_MESSAGE)
        if self._executing is not None:
            self.overlaps += 1
            self.calls.append(Call(method, public, "busy"))
            return self._error(rid, INTERNAL_ERROR, BUSY_MESSAGE)
        if self.busy_next > 0 or method in self.busy_methods:
            self.busy_next = max(0, self.busy_next - 1)
            self.calls.append(Call(method, public, "busy"))
            return self._error(rid, INTERNAL_ERROR, BUSY_MESSAGE)
        call = Call(method, public, "executing")
        self.calls.append(call)
        self._executing = method
        try:
            delay = self.method_delay_s.get(method, self.call_delay_s)
            if delay:
                await asyncio.sleep(delay)
            result = self.execute(method, public)
        except RpcError as exc:
            call.outcome = "busy" if "opened by a user" in exc.message else "error"
            return self._error(rid, exc.code, exc.message)
        finally:
            self._executing = None
        call.outcome = "ok"
        return {"jsonrpc": "2.0", "result": result, "id": self._answer_id(rid)}

    @staticmethod
    def _answer_id(rid: Any) -> Any:
        if isinstance(rid, str) and rid.isdigit():
            return int(rid)  # AMS answers with a number although a string was sent
        return rid

    def _error(self, rid: Any, code: int, message: str) -> dict[str, Any]:
        return {
            "jsonrpc": "2.0",
            "error": {"code": code, "message": message or "Invalid Request"},
            "id": self._answer_id(rid),
        }

    def execute(self, method: str, params: dict[str, Any]) -> Any:
        """Run one command (no HTTP, no apiKey, no one-at-a-time check)."""
        handler: Callable[[dict[str, Any]], Any] | None = getattr(self, f"_m_{method}", None)
        if handler is not None:
            return handler(params)
        if method in _CRUD:
            collection, operation = _CRUD[method]
            return self._crud(collection, operation, params)
        raise RpcError(METHOD_NOT_FOUND, "Method not found")

    # --- mailings ------------------------------------------------------------------------

    def _mailing(self, params: dict[str, Any], *, ui_guard: bool = False) -> dict[str, Any]:
        mid = _int_id(params.get("id"))
        mailing = self.mailings.get(mid)
        if mailing is None:
            raise RpcError(INTERNAL_ERROR, f"Mailing {mid} not found")
        if ui_guard and mid in self.open_in_ui:
            raise RpcError(
                INTERNAL_ERROR,
                f"Mailing {mid} is opened by a user in the AMS interface, try again later",
            )
        return mailing

    def _m_getMailings(self, params: dict[str, Any]) -> Any:
        return list(self.mailings.values())

    def _m_getTransactionalMailings(self, params: dict[str, Any]) -> Any:
        return [m for m in self.mailings.values() if m["type"] == "transactional"]

    def _m_getMailing(self, params: dict[str, Any]) -> Any:
        return self._mailing(params)

    def _m_startMailing(self, params: dict[str, Any]) -> Any:
        mailing = self._mailing(params, ui_guard=True)
        if mailing["state"] != "running":
            mailing["state"] = "running"
            mailing["lastStartDate"] = _now_iso()
            mailing["approxSpeed"] = f"{self.speed_per_min}/min"
        return True

    def _m_stopMailing(self, params: dict[str, Any]) -> Any:
        mailing = self._mailing(params, ui_guard=True)
        if mailing["state"] == "running":
            mailing["state"] = "paused"
            mailing["approxSpeed"] = "0/min"
        return True

    def _m_restartRunningMailings(self, params: dict[str, Any]) -> Any:
        running = [m for m in self.mailings.values() if m["state"] == "running"]
        for m in running:
            m["lastStartDate"] = _now_iso()
        return len(running)

    def _m_addMailing(self, params: dict[str, Any]) -> Any:
        m = self.add_mailing(
            name=str(params.get("name", "")),
            type=str(params.get("type", "mailing")),
            total=int(params.get("total", 0)),
        )
        return {"id": m["id"]}

    def _m_editMailing(self, params: dict[str, Any]) -> Any:
        mailing = self._mailing(params, ui_guard=True)
        for key in ("name", "type"):
            if key in params:
                mailing[key] = params[key]
        return True

    def _m_deleteMailing(self, params: dict[str, Any]) -> Any:
        mailing = self._mailing(params, ui_guard=True)
        if mailing["state"] == "running":
            raise RpcError(INTERNAL_ERROR, f"Mailing {mailing['id']} is running")
        del self.mailings[mailing["id"]]
        return True

    # --- relays and proxies of active mailings -------------------------------------------

    def _active(self, params: dict[str, Any]) -> dict[str, Any]:
        mailing = self._mailing(params)
        if mailing["state"] != "running":
            raise RpcError(INTERNAL_ERROR, f"Mailing {mailing['id']} is not active")
        return mailing

    def _m_getRelaysSendingStates(self, params: dict[str, Any]) -> Any:
        return self.relays.get(self._active(params)["id"], [])

    def _m_getProxiesSendingStates(self, params: dict[str, Any]) -> Any:
        return self.proxies.get(self._active(params)["id"], [])

    def _change_option(self, items: list[dict[str, Any]], params: dict[str, Any]) -> Any:
        target = params.get("relayID", params.get("proxyID", params.get("itemID")))
        for item in items:
            if str(item["id"]) == str(target) or item["name"] == target:
                if "enabled" in params:
                    item["enabled"] = bool(params["enabled"])
                    item["state"] = "active" if item["enabled"] else "disabled"
                return True
        raise RpcError(INTERNAL_ERROR, f"Relay or proxy {target!r} not found")

    def _m_changeRelaySendingOption(self, params: dict[str, Any]) -> Any:
        return self._change_option(self.relays.get(self._active(params)["id"], []), params)

    def _m_changeProxySendingOption(self, params: dict[str, Any]) -> Any:
        return self._change_option(self.proxies.get(self._active(params)["id"], []), params)

    # --- transactional -------------------------------------------------------------------

    def _m_postSendingJob(self, params: dict[str, Any]) -> Any:
        mid = _int_id(params.get("mailingID"))
        mailing = self.mailings.get(mid)
        if mailing is None or mailing["type"] != "transactional":
            raise RpcError(INTERNAL_ERROR, f"Transactional mailing {mid} not found")
        recipients = params.get("recipients") or params.get("emails") or []
        job_id = self._new_id()
        results = []
        for i, r in enumerate(recipients, 1):
            email = str(r.get("email", r.get("Email", ""))) if isinstance(r, dict) else str(r)
            results.append({"ID": str(i), "Email": email, **_job_outcome(email)})
        self.jobs[(mid, job_id)] = results
        return {"jobID": job_id}

    def _m_getSendingJobResult(self, params: dict[str, Any]) -> Any:
        key = (_int_id(params.get("mailingID")), _int_id(params.get("jobID")))
        if key not in self.jobs:
            raise RpcError(INTERNAL_ERROR, f"Job {key[1]} not found")
        return self.jobs[key]

    # --- scheduler -----------------------------------------------------------------------

    def _m_isSchedulerRunning(self, params: dict[str, Any]) -> Any:
        return self.scheduler_running

    def _m_runScheduler(self, params: dict[str, Any]) -> Any:
        self.scheduler_running = True
        return True

    # --- lists, contacts, presets, proxies: in-memory ------------------------------------

    def _m_deleteMailingList(self, params: dict[str, Any]) -> Any:
        raise RpcError(INTERNAL_ERROR, "deleteMailingList is not implemented")

    def _m_getMailingListSize(self, params: dict[str, Any]) -> Any:
        lid = self._item("mailing_lists", params)["id"]
        return {"size": len(self.contacts.get(lid, []))}

    def _m_getMailingListDataSet(self, params: dict[str, Any]) -> Any:
        return self.contacts.get(self._item("mailing_lists", params)["id"], [])

    def _m_clearMailingList(self, params: dict[str, Any]) -> Any:
        self.contacts[self._item("mailing_lists", params)["id"]] = []
        return True

    def _list_of(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        lid = self._item("mailing_lists", {"id": params.get("listID", params.get("id"))})["id"]
        return self.contacts.setdefault(lid, [])

    def _m_addContacts(self, params: dict[str, Any]) -> Any:
        contacts = self._list_of(params)
        added = [c if isinstance(c, dict) else {"email": c} for c in params.get("contacts", [])]
        contacts.extend(added)
        return {"added": len(added)}

    def _m_editContact(self, params: dict[str, Any]) -> Any:
        for contact in self._list_of(params):
            if contact.get("email") == params.get("email"):
                contact.update(params.get("fields") or {})
                return True
        raise RpcError(INTERNAL_ERROR, f"Contact {params.get('email')!r} not found")

    def _m_deleteContacts(self, params: dict[str, Any]) -> Any:
        contacts = self._list_of(params)
        gone = {str(e).lower() for e in params.get("emails", [])}
        kept = [c for c in contacts if str(c.get("email", "")).lower() not in gone]
        removed = len(contacts) - len(kept)
        contacts[:] = kept
        return {"deleted": removed}

    def _m_toggleRelaysInPreset(self, params: dict[str, Any]) -> Any:
        preset = self._item("delivery_presets", params)
        preset["relaysEnabled"] = bool(params.get("enabled", True))
        return True

    def _m_updateProxyList(self, params: dict[str, Any]) -> Any:
        proxy_list = self._item("proxy_lists", params)
        proxy_list["proxies"] = list(params.get("proxies", []))
        return True

    def _item(self, collection: str, params: dict[str, Any]) -> dict[str, Any]:
        iid = _int_id(params.get("id"))
        item = self.collections.setdefault(collection, {}).get(iid)
        if item is None:
            raise RpcError(INTERNAL_ERROR, f"{collection} item {iid} not found")
        return item

    def _crud(self, collection: str, operation: str, params: dict[str, Any]) -> Any:
        items = self.collections.setdefault(collection, {})
        if operation == "add":
            iid = self._new_id()
            items[iid] = {**params, "id": iid}
            return {"id": iid}
        if operation == "list":
            return list(items.values())
        item = self._item(collection, params)
        if operation == "get":
            return item
        if operation == "edit":
            item.update({k: v for k, v in params.items() if k != "id"})
            return True
        del items[item["id"]]
        return True

    # --- HTTP ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1", self._http_rpc)
        app.router.add_post("/api/v1/", self._http_rpc)
        app.router.add_get("/__ams/calls", self._http_calls)
        app.router.add_post("/__ams/faults", self._http_faults)
        app.router.add_post("/__ams/mailings", self._http_add_mailing)
        return app

    async def _http_rpc(self, request: web.Request) -> web.Response:
        answer = await self.handle_body(await request.read())
        return web.json_response(answer)

    async def _http_calls(self, request: web.Request) -> web.Response:
        return web.json_response(
            [{"method": c.method, "params": c.params, "outcome": c.outcome} for c in self.calls]
        )

    async def _http_faults(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.busy_next = int(body.get("busy_next", self.busy_next))
        self.busy_methods = set(body.get("busy_methods", self.busy_methods))
        self.open_in_ui = {int(i) for i in body.get("open_in_ui", self.open_in_ui)}
        self.call_delay_s = float(body.get("call_delay_s", self.call_delay_s))
        return web.json_response({"ok": True})

    async def _http_add_mailing(self, request: web.Request) -> web.Response:
        body = await request.json()
        mailing = self.add_mailing(
            body.get("id"),
            name=str(body.get("name", "")),
            state=str(body.get("state", "idle")),
            type=str(body.get("type", "mailing")),
            total=int(body.get("total", 1000)),
        )
        return web.json_response(mailing)

    async def _tick(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.advance(every_s)

    async def _lifetime(self, _app: web.Application) -> AsyncIterator[None]:
        yield
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, tick_s: float | None = None
    ) -> str:
        """Serve in this event loop; return the API URL (``http://host:port/api/v1``).

        ``tick_s`` makes running mailings progress on their own every ``tick_s`` seconds.
        """
        app = self.app()
        app.cleanup_ctx.append(self._lifetime)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        if tick_s:
            self._ticker = asyncio.create_task(self._tick(tick_s))
        bound = self._runner.addresses[0][1]
        return f"http://{host}:{bound}/api/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _job_outcome(email: str) -> dict[str, Any]:
    local = email.split("@", 1)[0].lower()
    if local.startswith("bad"):
        return {
            "sendResult": "failed",
            "lastReply": "550 5.1.1 user not found",
            "failCategory": "bad email",
        }
    if local.startswith("refused"):
        return {
            "sendResult": "failed",
            "lastReply": "554 5.7.1 message refused: spam content",
            "failCategory": "refused content or IP",
        }
    if local.startswith("fail"):
        return {
            "sendResult": "failed",
            "lastReply": "421 4.4.2 connection timed out",
            "failCategory": "other",
        }
    if local.startswith("excluded"):
        return {"sendResult": "excluded", "lastReply": "", "failCategory": None}
    return {
        "sendResult": "sent",
        "lastReply": "250 DATA received; Message accepted",
        "failCategory": None,
    }


def demo(fake: AmsFake) -> None:
    """A few mailings for ``make run`` and manual poking."""
    fake.add_mailing(73, name="Example Mailing", state="running", total=20000)
    fake.add_mailing(74, name="Newsletter", state="idle", total=5000)
    fake.add_mailing(75, name="Password resets", type="transactional", total=0)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mailgate-ams-fake", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--api-key", default="ams-test-key")
    parser.add_argument("--call-delay-ms", type=float, default=20.0)
    parser.add_argument("--tick-s", type=float, default=1.0, help="progress running mailings")
    parser.add_argument("--demo", action="store_true", help="start with a few mailings")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s ams-fake %(message)s")
    fake = AmsFake(args.api_key, call_delay_s=args.call_delay_ms / 1000.0)
    if args.demo:
        demo(fake)

    async def serve() -> None:
        url = await fake.start(args.host, args.port, tick_s=args.tick_s)
        log.info("listening on %s", url)
        try:
            await asyncio.Event().wait()
        finally:
            await fake.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
