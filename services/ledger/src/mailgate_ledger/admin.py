"""The admin HTTP API (``/v1/...``, bearer ``ADMIN_TOKEN``) and the customer webhook
registration API (``/v1/email/webhook``, bearer = an account's api token).

Handlers translate HTTP to store calls; every change is committed to Postgres first, then
written to its KV bucket. Errors are RFC 9457 ``application/problem+json``. Every query is
parameterized; CSV import and export stream (bounded memory whatever the size).
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import datetime as dt
import hashlib
import hmac
import io
import ipaddress
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypeVar

import asyncpg
import msgspec
import nats.errors
import nats.js.errors
import structlog
from aiohttp import web
from mailgate_core.ids import is_ulid, new_ulid, ulid_time_ms
from mailgate_core.ops import Health
from mailgate_core.passwords import generate_password, hash_password
from mailgate_core.records import normalize_email
from mailgate_core.schemas import MessageRef, StatusEvent, decode, encode
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from . import store
from .ingest import CONSUMERS
from .kvsync import KvSync, account_record, credential_record, suppression_record
from .metrics import LedgerMetrics
from .openapi import openapi_document
from .outbox import Outbox
from .partitions import PartitionKeeper, existing_months, ulid_prefix
from .status import STATUS_RANK
from .webhooks import (
    InvalidWebhookRequest,
    Resolver,
    canonical_events,
    check_public_host,
    new_secret,
    parse_url,
    system_resolver,
)

if TYPE_CHECKING:
    from .db import Conn, Row

log = structlog.get_logger()

_json = msgspec.json.Encoder()
T = TypeVar("T")

PROBLEM_JSON = "application/problem+json"
SUPPRESSION_REASONS = ("unsubscribed", "complained", "hard_bounced", "manual")
_USERNAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$|^localhost$"
)


# --- problems ------------------------------------------------------------------------------


class Problem(Exception):
    """An error answer (RFC 9457)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        *,
        slug: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = f"urn:mailgate:problem:{slug}" if slug else "about:blank"
        self.headers = dict(headers or {})


def problem_response(problem: Problem) -> web.Response:
    body = {
        "type": problem.type,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail or problem.title,
    }
    return web.Response(
        body=_json.encode(body),
        status=problem.status,
        content_type=PROBLEM_JSON,
        headers=problem.headers,
    )


def bad_request(detail: str, slug: str = "invalid-request") -> Problem:
    return Problem(400, "Invalid request", detail, slug=slug)


def not_found(what: str) -> Problem:
    return Problem(404, "Not found", f"{what} not found", slug="not-found")


def unauthorized(detail: str) -> Problem:
    return Problem(
        401, "Unauthorized", detail, slug="unauthorized", headers={"WWW-Authenticate": "Bearer"}
    )


# --- request bodies ----------------------------------------------------------------------


class AccountIn(msgspec.Struct, kw_only=True):
    name: str
    allowed_sender_domains: list[str] = []
    postal_api_key: str | None = None
    tracking: bool = True


class AccountPatch(msgspec.Struct, kw_only=True):
    name: str | None = None
    allowed_sender_domains: list[str] | None = None
    postal_api_key: str | None = None
    tracking: bool | None = None
    disabled: bool | None = None


class CredentialIn(msgspec.Struct, kw_only=True):
    name: str
    username: str | None = None
    rate_per_second: float | None = None
    daily_limit: int | None = None
    allowed_ips: list[str] = []


class CredentialPatch(msgspec.Struct, kw_only=True):
    disabled: bool | None = None
    rate_per_second: float | msgspec.UnsetType | None = msgspec.UNSET
    """``null`` removes the limit; absent leaves it as it is (the same for the others)."""
    daily_limit: int | msgspec.UnsetType | None = msgspec.UNSET
    allowed_ips: list[str] | msgspec.UnsetType = msgspec.UNSET


class SuppressionIn(msgspec.Struct, kw_only=True):
    email: str
    reason: str = "manual"


class EmailIn(msgspec.Struct, kw_only=True):
    email: str


class WebhookIn(msgspec.Struct, kw_only=True):
    url: str
    events: list[str] | None = None
    batch: bool = False
    legacy_complained_spelling: bool = False


class UrlIn(msgspec.Struct, kw_only=True):
    url: str


async def read_json(request: web.Request, cls: type[T]) -> T:
    body = await request.read()
    if not body.strip():
        raise bad_request("a JSON body is required", "invalid-json")
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as exc:
        raise bad_request(str(exc)) from None
    except (msgspec.DecodeError, RecursionError):  # RecursionError: a JSON bomb
        raise bad_request("the body is not valid JSON", "invalid-json") from None


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(value), status=status, content_type="application/json")


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _limit(request: web.Request, default: int = 50, maximum: int = 500) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request("limit must be an integer") from None
    if not 1 <= value <= maximum:
        raise bad_request(f"limit must be between 1 and {maximum}")
    return value


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def token_hash(token: str) -> str:
    """API tokens are 256-bit random values, so a plain SHA-256 is a safe way to store them."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_api_token() -> str:
    return "mgt_" + secrets.token_urlsafe(32)


# --- validation (pure) -------------------------------------------------------------------


def clean_name(name: str, what: str = "name") -> str:
    value = name.strip()
    if not value or len(value) > 200:
        raise bad_request(f"{what} must be 1 to 200 characters")
    return value


def clean_domains(domains: list[str]) -> list[str]:
    out: list[str] = []
    for raw in domains:
        domain = raw.strip().lower().rstrip(".")
        if not _DOMAIN.match(domain):
            raise bad_request(f"{raw!r} is not a domain name")
        if domain not in out:
            out.append(domain)
    return out


def clean_email(raw: str) -> str:
    email = normalize_email(raw)
    local, at, domain = email.rpartition("@")
    if not at or not local or not domain or len(email) > 320 or any(c.isspace() for c in email):
        raise bad_request(f"{raw!r} is not an email address")
    return email


def clean_reason(raw: str) -> str:
    reason = raw.strip().lower()
    if reason == "complined":
        reason = "complained"
    if reason not in SUPPRESSION_REASONS:
        raise bad_request(f"reason must be one of: {', '.join(SUPPRESSION_REASONS)}")
    return reason


def clean_ips(values: list[str]) -> list[str]:
    out: list[str] = []
    for raw in values:
        try:
            out.append(str(ipaddress.ip_network(raw.strip(), strict=False)))
        except ValueError:
            raise bad_request(f"{raw!r} is not an IP address or network") from None
    return out


def username_for(name: str) -> str:
    """A KV-safe username from a credential name plus a random suffix."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "smtp"
    suffix = "".join(secrets.choice("abcdefghijkmnpqrstuvwxyz23456789") for _ in range(6))
    return f"{slug}-{suffix}"


# --- views -------------------------------------------------------------------------------


def account_view(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "allowed_sender_domains": list(row["allowed_sender_domains"] or []),
        "tracking": row["tracking"],
        "has_postal_api_key": bool(row["postal_api_key"]),
        "api_token_prefix": row["api_token_prefix"],
        "disabled": row["disabled"],
        "created_at": _iso(row["created_at"]),
    }


def credential_view(row: Row) -> dict[str, Any]:
    return {
        "username": row["username"],
        "account_id": row["account_id"],
        "name": row["name"],
        "rate_per_second": row["rate_per_second"],
        "daily_limit": row["daily_limit"],
        "allowed_ips": list(row["allowed_ips"] or []),
        "disabled": row["disabled"],
        "created_at": _iso(row["created_at"]),
    }


def message_view(row: Row) -> dict[str, Any]:
    return {
        "mailgate_id": row["mailgate_id"],
        "external_id": row["external_id"],
        "campaign_id": row["campaign_id"],
        "postal_id": row["postal_id"],
        "postal_token": row["postal_token"],
        "account_id": row["account_id"],
        "recipient": row["recipient"],
        "sender": row["sender"],
        "subject": row["subject"],
        "size": row["size"],
        "status": row["status"],
        "accepted_at": _iso(row["accepted_at"]),
        "updated_at": _iso(row["updated_at"]),
    }


def event_view(row: Row) -> dict[str, Any]:
    return {
        "event_id": row["event_id"],
        "subject": row["subject"],
        "name": row["name"],
        "status_event": row["status_name"],
        "occurred_at": _iso(row["occurred_at"]),
        "recorded_at": _iso(row["recorded_at"]),
        "data": row["data"],
    }


def timeline_entry(row: Row) -> dict[str, Any]:
    """One line of a message's timeline: the fact, and the customer event it produced."""
    entry: dict[str, Any] = {
        "at": _iso(row["occurred_at"]),
        "name": row["name"],
        "source": row["subject"],
        "event_id": row["event_id"],
        "recorded_at": _iso(row["recorded_at"]),
    }
    if row["status_name"]:
        entry["status_event"] = {
            "name": row["status_name"],
            "id": f"st-{row['event_id']}",
            "emitted": not row["status_pending"],
            "data": row["status_data"] or {},
        }
    return entry


def webhook_delivery_view(row: Row) -> dict[str, Any]:
    """A ``webhook_delivered`` fact (``mail.webhook_delivered``) as a delivery row."""
    data = row["data"] or {}
    return {
        "event_id": row["event_id"],
        "delivered_at": _iso(row["occurred_at"]),
        "status_event": data.get("status_name"),
        "status_event_id": data.get("status_event_id"),
        "endpoint_id": data.get("endpoint_id"),
        "url": data.get("url", ""),
        "attempts": data.get("attempts", 1),
        "http_status": data.get("http_status"),
        "duration_ms": data.get("duration_ms"),
    }


def suppression_view(row: Row) -> dict[str, Any]:
    return {"email": row["email"], "reason": row["reason"], "created_at": _iso(row["created_at"])}


def endpoint_view(row: Row, *, secret: bool = False) -> dict[str, Any]:
    view = {
        "id": row["id"],
        "url": row["url"],
        "events": list(row["events"] or []),
        "batch": row["batch"],
        "legacy_complained_spelling": row["legacy_complained_spelling"],
        "enabled": row["enabled"],
        "created_at": _iso(row["created_at"]),
    }
    if secret:
        view["secret"] = row["secret"]
    return view


def _rate(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


AUDIENCES = ("human", "machine", "unknown")
ENGAGEMENT = ("opened", "clicked")


def campaign_stats_view(
    campaign_id: str,
    statuses: dict[str, int],
    events: Mapping[tuple[str, str | None], tuple[int, int]],
    non_machine: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Counts per message status and per customer event, opens/clicks split by audience
    (human, machine = image proxies and link scanners, unknown), and the usual rates.

    ``events`` maps (event, audience or None for all) to (events, distinct messages);
    ``non_machine`` maps opened/clicked to the distinct messages with an event not judged
    automated (what the human rates count).
    """
    non_machine = non_machine or {}

    def uniq(name: str) -> int:
        return events.get((name, None), (0, 0))[1]

    sent = uniq("sent")
    delivered = uniq("delivered")
    names = sorted({name for name, _ in events})
    event_counts: dict[str, Any] = {}
    for name in names:
        total, unique = events.get((name, None), (0, 0))
        entry: dict[str, Any] = {"total": total, "unique": unique}
        if name in ENGAGEMENT:
            entry["by_audience"] = {
                a: dict(zip(("total", "unique"), events.get((name, a), (0, 0)), strict=True))
                for a in AUDIENCES
            }
            entry["unique_non_machine"] = non_machine.get(name, 0)
        event_counts[name] = entry
    return {
        "campaign_id": campaign_id,
        "messages": sum(statuses.values()),
        "statuses": {name: statuses.get(name, 0) for name in STATUS_RANK}
        | {k: v for k, v in statuses.items() if k not in STATUS_RANK},
        "events": event_counts,
        "rates": {
            "delivery_rate": _rate(delivered, sent),
            "soft_bounce_rate": _rate(uniq("soft_bounced"), sent),
            "hard_bounce_rate": _rate(uniq("hard_bounced"), sent),
            "failure_rate": _rate(uniq("failed"), sum(statuses.values()) - uniq("skipped")),
            "open_rate": _rate(uniq("opened"), delivered),
            "human_open_rate": _rate(non_machine.get("opened", 0), delivered),
            "click_rate": _rate(uniq("clicked"), delivered),
            "human_click_rate": _rate(non_machine.get("clicked", 0), delivered),
            "unsubscribe_rate": _rate(uniq("unsubscribed"), delivered),
            "complaint_rate": _rate(uniq("complained"), delivered),
        },
    }


def dead_letter_view(row: Row, *, with_event: bool = False) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": row["id"],
        "status_event": row["status_name"],
        "status_event_id": row["status_event_id"],
        "mailgate_id": row["mailgate_id"],
        "account_id": row["account_id"],
        "endpoint_id": row["endpoint_id"],
        "url": row["url"],
        "attempts": row["attempts"],
        "reason": row["reason"],
        "http_status": row["http_status"],
        "created_at": _iso(row["created_at"]),
        "replay_count": row["replay_count"],
        "replayed_at": _iso(row["replayed_at"]),
    }
    if with_event:
        view["event"] = msgspec.to_builtins(decode(bytes(row["payload"]), StatusEvent))
    return view


# --- application -------------------------------------------------------------------------


@dataclass
class AdminContext:
    pool: asyncpg.Pool
    kv: KvSync
    admin_token: str
    allow_private_webhooks: bool = False
    resolve: Resolver = system_resolver
    js: JetStreamContext | None = None
    nc: NATS | None = None
    metrics: LedgerMetrics | None = None
    outbox: Outbox | None = None
    partitions: PartitionKeeper | None = None
    health: Health | None = None
    domain: str = "localhost"


CONTEXT = web.AppKey("ledger_admin", AdminContext)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_PUBLIC_PATHS = ("/v1/openapi.json", "/metrics", "/healthz", "/readyz")


def _ctx(request: web.Request) -> AdminContext:
    return request.app[CONTEXT]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as problem:
        return problem_response(problem)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem_response(Problem(exc.status, exc.reason, exc.text or exc.reason))
    except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError):
        log.warning("admin request failed: database unavailable", path=request.path)
        return problem_response(
            Problem(503, "Service unavailable", "the database is unavailable; retry later")
        )
    except Exception:
        log.exception("admin request failed", path=request.path, method=request.method)
        return problem_response(Problem(500, "Internal server error", "unexpected error"))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path in _PUBLIC_PATHS or path.startswith("/v1/email/webhook") or not path.startswith("/v1/"):
        return await handler(request)
    given = _bearer(request)
    expected = _ctx(request).admin_token
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise unauthorized("a valid admin bearer token is required")
    return await handler(request)


def make_admin_app(context: AdminContext) -> web.Application:
    app = web.Application(
        middlewares=[problem_middleware, auth_middleware], client_max_size=32 * 1024**2
    )
    app[CONTEXT] = context
    r = app.router
    r.add_get("/v1/openapi.json", get_openapi)
    r.add_post("/v1/accounts", create_account)
    r.add_get("/v1/accounts", list_accounts)
    r.add_get("/v1/accounts/{account_id}", get_account)
    r.add_patch("/v1/accounts/{account_id}", patch_account)
    r.add_post("/v1/accounts/{account_id}/api-token", rotate_api_token)
    r.add_post("/v1/accounts/{account_id}/credentials", create_credential)
    r.add_get("/v1/accounts/{account_id}/credentials", list_credentials)
    r.add_get("/v1/accounts/{account_id}/credentials/{username}", get_credential)
    r.add_patch("/v1/accounts/{account_id}/credentials/{username}", patch_credential)
    r.add_post(
        "/v1/accounts/{account_id}/credentials/{username}/password", rotate_credential_password
    )
    r.add_delete("/v1/accounts/{account_id}/credentials/{username}", delete_credential)
    r.add_get("/v1/accounts/{account_id}/suppressions", list_suppressions)
    r.add_post("/v1/accounts/{account_id}/suppressions", add_suppressions)
    r.add_delete("/v1/accounts/{account_id}/suppressions", remove_suppression)
    r.add_get("/v1/accounts/{account_id}/webhooks", list_account_webhooks)
    r.add_get("/v1/messages", find_messages)
    r.add_get("/v1/messages/{mailgate_id}", get_message)
    r.add_get("/v1/messages/{mailgate_id}/timeline", message_timeline)
    r.add_get("/v1/campaigns/{campaign_id}/stats", campaign_stats)
    r.add_get("/v1/campaigns/{campaign_id}/autostops", campaign_autostops)
    r.add_post("/v1/campaigns/{campaign_id}/resume", resume_campaign)
    r.add_post("/v1/campaigns/{campaign_id}/stop", stop_campaign)
    r.add_get("/v1/campaigns", list_campaigns)
    r.add_get("/v1/overview", get_overview)
    r.add_post("/v1/accounts/{account_id}/webhooks", add_account_webhook)
    r.add_post("/v1/accounts/{account_id}/webhooks/{endpoint_id}/test", test_account_webhook)
    r.add_post("/v1/operators", create_operator)
    r.add_get("/v1/operators", list_operators)
    r.add_patch("/v1/operators/{operator_id}", patch_operator)
    r.add_get("/v1/dead-letters", list_dead_letters)
    r.add_post("/v1/dead-letters/replay", replay_dead_letters)
    r.add_get("/v1/dead-letters/{dead_letter_id}", get_dead_letter)
    r.add_post("/v1/dead-letters/{dead_letter_id}/replay", replay_dead_letter)
    r.add_get("/v1/postmaster/daily", postmaster_daily)
    r.add_get("/v1/health", get_health)
    r.add_post("/v1/email/webhook", register_webhook)
    r.add_get("/v1/email/webhook", get_webhook)
    r.add_delete("/v1/email/webhook", delete_webhook)
    return app


async def get_openapi(_request: web.Request) -> web.Response:
    return json_response(openapi_document())


# --- accounts ----------------------------------------------------------------------------


async def _account_or_404(conn: Conn, account_id: str) -> Row:
    row = await store.get_account(conn, account_id)
    if row is None:
        raise not_found(f"account {account_id!r}")
    return row


async def create_account(request: web.Request) -> web.Response:
    body = await read_json(request, AccountIn)
    return json_response(await account_create(_ctx(request), body), status=201)


async def account_create(ctx: AdminContext, body: AccountIn) -> dict[str, Any]:
    """Create an account; its view plus the api token (shown once)."""
    name = clean_name(body.name)
    domains = clean_domains(body.allowed_sender_domains)
    postal_key = (body.postal_api_key or "").strip() or None
    token = new_api_token()
    async with ctx.pool.acquire() as conn:
        row = await store.insert_account(
            conn,
            account_id=new_ulid(),
            name=name,
            allowed_sender_domains=domains,
            postal_api_key=postal_key,
            tracking=body.tracking,
            api_token_hash=token_hash(token),
            api_token_prefix=token[:12],
        )
    await ctx.kv.put_account(account_record(row))
    log.info("account created", account_id=row["id"])
    return account_view(row) | {"api_token": token}


async def list_accounts(request: web.Request) -> web.Response:
    limit = _limit(request)
    async with _ctx(request).pool.acquire() as conn:
        rows = await store.list_accounts(conn, limit=limit, cursor=request.query.get("cursor"))
    items = [account_view(r) for r in rows]
    next_cursor = rows[-1]["id"] if len(rows) == limit else None
    return json_response({"items": items, "next_cursor": next_cursor})


async def get_account(request: web.Request) -> web.Response:
    async with _ctx(request).pool.acquire() as conn:
        row = await _account_or_404(conn, request.match_info["account_id"])
    return json_response(account_view(row))


async def patch_account(request: web.Request) -> web.Response:
    body = await read_json(request, AccountPatch)
    return json_response(await account_patch(_ctx(request), request.match_info["account_id"], body))


async def account_patch(ctx: AdminContext, account_id: str, body: AccountPatch) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if body.name is not None:
        changes["name"] = clean_name(body.name)
    if body.allowed_sender_domains is not None:
        changes["allowed_sender_domains"] = clean_domains(body.allowed_sender_domains)
    if body.postal_api_key is not None:
        changes["postal_api_key"] = body.postal_api_key.strip() or None
    if body.tracking is not None:
        changes["tracking"] = body.tracking
    if body.disabled is not None:
        changes["disabled"] = body.disabled
    async with ctx.pool.acquire() as conn:
        row = await store.update_account(conn, account_id, changes)
    if row is None:
        raise not_found(f"account {account_id!r}")
    await ctx.kv.put_account(account_record(row))
    log.info("account updated", account_id=account_id, fields=sorted(changes))
    return account_view(row)


async def rotate_api_token(request: web.Request) -> web.Response:
    token = new_api_token()
    account_id = request.match_info["account_id"]
    async with _ctx(request).pool.acquire() as conn:
        row = await store.set_account_token(conn, account_id, token_hash(token), token[:12])
    if row is None:
        raise not_found(f"account {account_id!r}")
    log.info("account api token rotated", account_id=account_id)
    return json_response(account_view(row) | {"api_token": token})


# --- credentials -------------------------------------------------------------------------


async def create_credential(request: web.Request) -> web.Response:
    body = await read_json(request, CredentialIn)
    view = await credential_create(_ctx(request), request.match_info["account_id"], body)
    return json_response(view, status=201)


async def credential_create(
    ctx: AdminContext, account_id: str, body: CredentialIn
) -> dict[str, Any]:
    """Create an SMTP credential; its view plus the generated password (shown once)."""
    name = clean_name(body.name)
    if body.rate_per_second is not None and body.rate_per_second <= 0:
        raise bad_request("rate_per_second must be positive")
    if body.daily_limit is not None and body.daily_limit <= 0:
        raise bad_request("daily_limit must be positive")
    allowed_ips = clean_ips(body.allowed_ips)
    if body.username is not None and (
        not _USERNAME.match(body.username) or len(body.username) > 64
    ):
        raise bad_request("username may hold letters, digits, '-', '_' and inner dots (max 64)")
    password = generate_password()
    password_hash = await asyncio.to_thread(hash_password, password)
    async with ctx.pool.acquire() as conn:
        await _account_or_404(conn, account_id)
        row = None
        for _ in range(5):
            row = await store.insert_credential(
                conn,
                username=body.username or username_for(name),
                account_id=account_id,
                name=name,
                password_hash=password_hash,
                rate_per_second=body.rate_per_second,
                daily_limit=body.daily_limit,
                allowed_ips=allowed_ips,
            )
            if row is not None or body.username is not None:
                break
    if row is None:
        raise Problem(409, "Conflict", "that username is taken", slug="username-taken")
    await ctx.kv.put_credential(credential_record(row))
    log.info("credential created", account_id=account_id, username=row["username"])
    return credential_view(row) | {"password": password}


async def list_credentials(request: web.Request) -> web.Response:
    account_id = request.match_info["account_id"]
    async with _ctx(request).pool.acquire() as conn:
        await _account_or_404(conn, account_id)
        rows = await store.list_credentials(conn, account_id)
    return json_response({"items": [credential_view(r) for r in rows], "next_cursor": None})


async def _set_credential_disabled(request: web.Request, disabled: bool) -> web.Response:
    m = request.match_info
    view = await credential_set_disabled(_ctx(request), m["account_id"], m["username"], disabled)
    return json_response(view)


async def credential_set_disabled(
    ctx: AdminContext, account_id: str, username: str, disabled: bool
) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn:
        row = await store.set_credential_disabled(conn, account_id, username, disabled)
    if row is None:
        raise not_found(f"credential {username!r}")
    await ctx.kv.put_credential(credential_record(row))
    log.info("credential updated", account_id=account_id, username=username, disabled=disabled)
    return credential_view(row)


async def patch_credential(request: web.Request) -> web.Response:
    body = await read_json(request, CredentialPatch)
    m = request.match_info
    limits = {
        name: getattr(body, name)
        for name in ("rate_per_second", "daily_limit", "allowed_ips")
        if getattr(body, name) is not msgspec.UNSET
    }
    if body.disabled is None and not limits:
        raise bad_request(
            "nothing to change (supported: disabled, rate_per_second, daily_limit, allowed_ips)"
        )
    view: dict[str, Any] = {}
    if limits:
        view = await credential_set_limits(_ctx(request), m["account_id"], m["username"], limits)
    if body.disabled is not None:
        return await _set_credential_disabled(request, body.disabled)
    return json_response(view)


async def credential_set_limits(
    ctx: AdminContext, account_id: str, username: str, limits: dict[str, Any]
) -> dict[str, Any]:
    """Change a credential's rate, daily limit or allowed IPs (``None`` removes a limit)."""
    changes = dict(limits)
    if changes.get("rate_per_second") is not None and changes["rate_per_second"] <= 0:
        raise bad_request("rate_per_second must be positive")
    if changes.get("daily_limit") is not None and changes["daily_limit"] <= 0:
        raise bad_request("daily_limit must be positive")
    if "allowed_ips" in changes:
        changes["allowed_ips"] = clean_ips(changes["allowed_ips"] or [])
    async with ctx.pool.acquire() as conn:
        row = await store.update_credential(conn, account_id, username, changes)
    if row is None:
        raise not_found(f"credential {username!r}")
    await ctx.kv.put_credential(credential_record(row))
    log.info("credential limits updated", account_id=account_id, username=username)
    return credential_view(row)


async def delete_credential(request: web.Request) -> web.Response:
    """Disables the credential (kept for the audit trail)."""
    return await _set_credential_disabled(request, True)


async def get_credential(request: web.Request) -> web.Response:
    account_id = request.match_info["account_id"]
    username = request.match_info["username"]
    async with _ctx(request).pool.acquire() as conn:
        row = await store.get_credential(conn, account_id, username)
    if row is None:
        raise not_found(f"credential {username!r}")
    return json_response(credential_view(row))


async def rotate_credential_password(request: web.Request) -> web.Response:
    """A new generated password (shown once); the old one stops working at once."""
    m = request.match_info
    return json_response(await credential_rotate(_ctx(request), m["account_id"], m["username"]))


async def credential_rotate(ctx: AdminContext, account_id: str, username: str) -> dict[str, Any]:
    password = generate_password()
    password_hash = await asyncio.to_thread(hash_password, password)
    async with ctx.pool.acquire() as conn:
        row = await store.set_credential_password(conn, account_id, username, password_hash)
    if row is None:
        raise not_found(f"credential {username!r}")
    await ctx.kv.put_credential(credential_record(row))
    log.info("credential password rotated", account_id=account_id, username=username)
    return credential_view(row) | {"password": password}


# --- suppressions ------------------------------------------------------------------------

#: Rows per statement (and per KV page) when importing or exporting suppressions.
CSV_CHUNK = 5000
#: Validation errors quoted in a refused import.
CSV_ERRORS_SHOWN = 10


def _wants_csv(request: web.Request) -> bool:
    return request.query.get("format") == "csv" or "text/csv" in request.headers.get("Accept", "")


async def list_suppressions(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    account_id = request.match_info["account_id"]
    if _wants_csv(request):
        return await _export_suppressions(request, ctx, account_id)
    limit = _limit(request, default=100, maximum=1000)
    async with ctx.pool.acquire() as conn:
        await _account_or_404(conn, account_id)
        rows = await store.list_suppressions(
            conn,
            account_id,
            limit=limit,
            cursor=request.query.get("cursor"),
            prefix=request.query.get("prefix", "").strip().lower() or None,
        )
    next_cursor = rows[-1]["email"] if len(rows) == limit else None
    return json_response({"items": [suppression_view(r) for r in rows], "next_cursor": next_cursor})


def _csv_rows(rows: Iterable[Row]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    for row in rows:
        writer.writerow([row["email"], row["reason"], _iso(row["created_at"])])
    return buffer.getvalue().encode()


async def _export_suppressions(
    request: web.Request, ctx: AdminContext, account_id: str
) -> web.StreamResponse:
    """Streams the CSV: one page of rows read, written and sent at a time (chunked)."""
    async with ctx.pool.acquire() as conn:
        await _account_or_404(conn, account_id)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="suppressions-{account_id}.csv"',
        }
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b"email,reason,created_at\r\n")
    cursor: str | None = None
    exported = 0
    while True:
        async with ctx.pool.acquire() as conn:
            rows = await store.list_suppressions(conn, account_id, limit=CSV_CHUNK, cursor=cursor)
        if not rows:
            break
        await response.write(_csv_rows(rows))
        exported += len(rows)
        cursor = rows[-1]["email"]
    await response.write_eof()
    log.info("suppressions exported", account_id=account_id, count=exported)
    return response


def parse_suppression_line(cells: list[str]) -> tuple[str, str] | None:
    """``email[,reason]`` -> a cleaned pair; ``None`` for blank lines. Raises Problem."""
    if not cells or not cells[0].strip():
        return None
    email = clean_email(cells[0])
    reason = clean_reason(cells[1]) if len(cells) > 1 and cells[1].strip() else "manual"
    return (email, reason)


class CsvSpool:
    """Validates CSV lines as they arrive and spools the clean pairs to a temporary file.

    Nothing is imported until the whole upload has been read and found valid: a file with
    an error is refused as a whole, yet memory stays bounded (the spool moves to disk
    beyond 256 KiB).
    """

    def __init__(self) -> None:
        self.file: IO[str] = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed by close()
            max_size=256 * 1024, mode="w+", encoding="utf-8", newline=""
        )
        self._writer = csv.writer(self.file, lineterminator="\n")
        self.lines = 0
        self.rows = 0
        self.errors: list[str] = []
        self.error_count = 0

    def feed(self, line: str) -> None:
        self.lines += 1
        text = line.lstrip("\ufeff") if self.lines == 1 else line
        cells = next(csv.reader([text]), [])
        if self.lines == 1 and cells and cells[0].strip().lower() == "email":
            return
        try:
            pair = parse_suppression_line(cells)
        except Problem as problem:
            self.error_count += 1
            if len(self.errors) < CSV_ERRORS_SHOWN:
                self.errors.append(f"line {self.lines}: {problem.detail}")
            return
        if pair is not None:
            self._writer.writerow(pair)
            self.rows += 1

    def problem(self) -> Problem:
        shown = "; ".join(self.errors)
        hidden = self.error_count - len(self.errors)
        more = f" (and {hidden} more)" if hidden > 0 else ""
        return bad_request(f"CSV rejected, nothing imported: {shown}{more}", "invalid-csv")

    def chunks(self, size: int) -> Iterator[list[tuple[str, str]]]:
        """Clean ``(email, reason)`` pairs in chunks, duplicates merged within a chunk (the
        last reason wins, as it does across chunks)."""
        self.file.seek(0)
        chunk: dict[str, str] = {}
        for email, reason in csv.reader(self.file):
            chunk[email] = reason
            if len(chunk) >= size:
                yield list(chunk.items())
                chunk = {}
        if chunk:
            yield list(chunk.items())

    def close(self) -> None:
        self.file.close()


def parse_suppression_csv(text: str) -> list[tuple[str, str]]:
    """All clean pairs of a CSV text (one email once, its last reason); raises Problem."""
    spool = CsvSpool()
    try:
        for line in text.splitlines():
            spool.feed(line)
        if spool.error_count:
            raise spool.problem()
        return [pair for chunk in spool.chunks(max(1, spool.rows)) for pair in chunk]
    finally:
        spool.close()


async def _request_lines(request: web.Request) -> AsyncIterator[str]:
    """The request body as text lines, read 64 KiB at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    tail = ""
    async for chunk in request.content.iter_chunked(64 * 1024):
        text = tail + decoder.decode(chunk)
        lines = text.splitlines(keepends=True)
        # the last piece may be a partial line, or a "\r" whose "\n" is in the next chunk
        tail = lines.pop() if lines and not lines[-1].endswith("\n") else ""
        for line in lines:
            yield line.rstrip("\r\n")
    last = (tail + decoder.decode(b"", final=True)).rstrip("\r\n")
    if last:
        yield last


async def _import_suppressions(request: web.Request, ctx: AdminContext, account_id: str) -> Any:
    return await suppressions_import(ctx, account_id, _request_lines(request))


async def suppressions_import(
    ctx: AdminContext, account_id: str, lines: AsyncIterator[str]
) -> dict[str, Any]:
    """Streams CSV lines into Postgres; KV follows in the background."""
    spool = CsvSpool()
    try:
        async for line in lines:
            spool.feed(line)
        if spool.error_count:
            raise spool.problem()
        imported = added = 0
        async with ctx.pool.acquire() as conn:  # every row this import writes is newer
            started: dt.datetime = await conn.fetchval("SELECT now()")
        for chunk in spool.chunks(CSV_CHUNK):
            try:
                async with ctx.pool.acquire() as conn:
                    written, new = await store.import_suppressions(conn, account_id, chunk)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("suppression import interrupted", imported=imported, error=str(exc))
                raise Problem(
                    503,
                    "Service unavailable",
                    f"the import stopped after {imported} rows: {exc}; sending the same file "
                    "again is safe",
                ) from None
            imported += written
            added += new
    finally:
        spool.close()
    if imported:
        ctx.kv.sync_suppressions_since(account_id, started)
    log.info("suppressions imported", account_id=account_id, count=imported, new=added)
    return {"imported": imported, "added": added, "kv": "syncing" if imported else "unchanged"}


async def add_suppressions(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    account_id = request.match_info["account_id"]
    async with ctx.pool.acquire() as conn:
        await _account_or_404(conn, account_id)
    if request.content_type in ("text/csv", "application/csv"):
        return json_response(await _import_suppressions(request, ctx, account_id))
    body = await read_json(request, SuppressionIn)
    view, added = await suppression_add(ctx, account_id, body)
    return json_response(view, status=201 if added else 200)


async def suppression_add(
    ctx: AdminContext, account_id: str, body: SuppressionIn
) -> tuple[dict[str, Any], bool]:
    """Add (or re-reason) one suppression; (its view, whether it is new)."""
    entries = [(clean_email(body.email), clean_reason(body.reason))]
    async with ctx.pool.acquire() as conn:
        rows = await store.upsert_suppressions(conn, account_id, entries)
    await ctx.kv.put_suppressions([suppression_record(r) for r in rows])
    added = sum(1 for r in rows if r["inserted"])
    log.info("suppression added", account_id=account_id, new=added)
    return suppression_view(rows[0]), bool(added)


async def remove_suppression(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    account_id = request.match_info["account_id"]
    if "email" in request.query:
        email = clean_email(request.query["email"])
    else:
        email = clean_email((await read_json(request, EmailIn)).email)
    return json_response(await suppression_remove(ctx, account_id, email))


async def suppression_remove(ctx: AdminContext, account_id: str, email: str) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn:
        await _account_or_404(conn, account_id)
        deleted = await store.delete_suppression(conn, account_id, email)
    if not deleted:
        raise not_found(f"suppression of {email!r}")
    await ctx.kv.delete_suppression(account_id, email)
    log.info("suppression removed", account_id=account_id)
    return {"email": email, "deleted": True}


async def list_account_webhooks(request: web.Request) -> web.Response:
    account_id = request.match_info["account_id"]
    async with _ctx(request).pool.acquire() as conn:
        await _account_or_404(conn, account_id)
        rows = await store.list_endpoints(conn, account_id)
    return json_response({"items": [endpoint_view(r) for r in rows], "next_cursor": None})


# --- messages and campaigns --------------------------------------------------------------

#: Facts may be recorded slightly before their message's ULID time (clocks differ between
#: hosts); a day of margin before pruning older partitions from a message's history.
_CLOCK_MARGIN = dt.timedelta(days=1)


def _recorded_since(mailgate_id: str) -> dt.datetime | None:
    if not is_ulid(mailgate_id):
        return None
    return dt.datetime.fromtimestamp(ulid_time_ms(mailgate_id) / 1000, tz=dt.UTC) - _CLOCK_MARGIN


def parse_time(raw: str, name: str) -> dt.datetime:
    """ISO 8601 (a naive time is UTC) or unix seconds; raises a 400 Problem."""
    value = raw.strip()
    try:
        return dt.datetime.fromtimestamp(float(value), tz=dt.UTC)
    except (ValueError, OverflowError, OSError):
        pass
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request(f"{name} must be an ISO 8601 time or unix seconds") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


async def _message_detail(
    conn: Conn, mailgate_id: str, *, account_id: str | None = None
) -> tuple[Any, list[Any]]:
    row = await store.get_message(conn, mailgate_id)
    if row is None or (account_id is not None and row["account_id"] != account_id):
        raise not_found(f"message {mailgate_id!r}")
    events = await store.message_events(
        conn, mailgate_id, recorded_since=_recorded_since(mailgate_id)
    )
    return row, events


async def get_message(request: web.Request) -> web.Response:
    mailgate_id = request.match_info["mailgate_id"]
    async with _ctx(request).pool.acquire() as conn:
        row, events = await _message_detail(conn, mailgate_id)
    return json_response(message_view(row) | {"events": [event_view(e) for e in events]})


async def message_timeline(request: web.Request) -> web.Response:
    """What happened to a message, in order, with the customer event each fact produced, the
    webhook deliveries that succeeded and those that were dead-lettered."""
    mailgate_id = request.match_info["mailgate_id"]
    async with _ctx(request).pool.acquire() as conn:
        answer, _row, _events = await message_timeline_data(conn, mailgate_id)
    return json_response(answer)


async def message_timeline_data(
    conn: Conn, mailgate_id: str, *, account_id: str | None = None
) -> tuple[dict[str, Any], Any, list[Any]]:
    """The timeline answer, the message row and its facts; ``account_id`` hides other
    accounts' messages (404)."""
    row, events = await _message_detail(conn, mailgate_id, account_id=account_id)
    dead = await store.list_dead_letters(
        conn,
        account_id=None,
        endpoint_id=None,
        mailgate_id=mailgate_id,
        replayed=None,
        limit=100,
        cursor=None,
    )
    answer: dict[str, Any] = {
        "mailgate_id": row["mailgate_id"],
        "external_id": row["external_id"],
        "campaign_id": row["campaign_id"],
        "recipient": row["recipient"],
        "status": row["status"],
        "timeline": [timeline_entry(e) for e in events],
        "webhook_deliveries": [
            webhook_delivery_view(e) for e in events if e["name"] == "webhook_delivered"
        ],
        "dead_letters": [dead_letter_view(d) for d in dead],
    }
    return answer, row, events


async def find_messages(request: web.Request) -> web.Response:
    limit = _limit(request)
    async with _ctx(request).pool.acquire() as conn:
        rows = await search_messages(conn, request.query, limit=limit)
    next_cursor = rows[-1]["mailgate_id"] if len(rows) == limit else None
    return json_response({"items": [message_view(r) for r in rows], "next_cursor": next_cursor})


async def search_messages(
    conn: Conn,
    q: Mapping[str, str],
    *,
    limit: int,
    account_id: str | None = None,
) -> list[Any]:
    """``GET /v1/messages`` query parameters -> rows, newest first (raises a 400 Problem).
    ``account_id`` (a viewer's account) overrides any ``account_id`` asked for."""
    status = q.get("status") or None
    if status is not None and status not in STATUS_RANK:
        raise bad_request(f"unknown status {status!r}")
    any_id = q.get("id", "").strip() or None
    since = parse_time(q["since"], "since") if q.get("since") else None
    until = parse_time(q["until"], "until") if q.get("until") else None
    if since is not None and until is not None and since >= until:
        raise bad_request("since must be before until")
    postal_id_raw = q.get("postal_id", "").strip()
    if postal_id_raw and not postal_id_raw.isdigit():
        raise bad_request("postal_id must be an integer")
    cursor = q.get("cursor") or None
    if cursor is not None and not is_ulid(cursor):
        raise bad_request("cursor must be the next_cursor of a previous page")
    return await store.find_messages(
        conn,
        any_id=any_id.upper() if any_id and is_ulid(any_id) else any_id,
        any_postal_id=int(any_id) if any_id and any_id.isdigit() and len(any_id) < 19 else None,
        external_id=q.get("external_id") or None,
        email=q.get("email") or None,
        campaign_id=q.get("campaign_id") or None,
        postal_id=int(postal_id_raw) if postal_id_raw else None,
        account_id=account_id or q.get("account_id") or None,
        status=status,
        min_id=ulid_prefix(since) if since else None,
        max_id=ulid_prefix(until) if until else None,
        limit=limit,
        cursor=cursor.upper() if cursor else None,
    )


async def campaign_stats(request: web.Request) -> web.Response:
    campaign_id = request.match_info["campaign_id"]
    account_id = request.query.get("account_id") or None
    async with _ctx(request).pool.acquire() as conn:
        return json_response(await campaign_stats_data(conn, campaign_id, account_id=account_id))


async def campaign_stats_data(
    conn: Conn, campaign_id: str, *, account_id: str | None = None
) -> dict[str, Any]:
    """Campaign statistics, of one account's messages only when ``account_id`` is given."""
    statuses = await store.campaign_statuses(conn, campaign_id, account_id=account_id)
    events = await store.campaign_events(conn, campaign_id, account_id=account_id)
    non_machine = await store.campaign_unique_non_machine(
        conn, campaign_id, ENGAGEMENT, account_id=account_id
    )
    return campaign_stats_view(campaign_id, statuses, events, non_machine)


# --- automatic campaign stops (ams-reporter, docs/autostop.md) --------------------------

CONTROL_RESUME = "ams.control.resume"
CONTROL_STOP = "ams.control.stop"
CONTROL_TIMEOUT_S = 30.0  # ams-reporter retries busy AMS calls; docs/autostop.md allows ~60 s
#: "no responders" right after ams-reporter (re)subscribed is retried this often, quickly.
CONTROL_ATTEMPTS = 5
CONTROL_RETRY_DELAY_S = 0.2
AUTOSTOP_KINDS = {"stats.campaign.autostopped": "autostopped", "stats.campaign.resumed": "resumed"}


class ResumeIn(msgspec.Struct, kw_only=True):
    requested_by: str = ""


def autostop_view(row: Row) -> dict[str, Any]:
    data = dict(row["data"] or {})
    return {
        "event_id": row["event_id"],
        "kind": AUTOSTOP_KINDS.get(row["subject"], row["subject"]),
        "generation": data.get("generation"),
        "occurred_at": _iso(row["occurred_at"]),
        "recorded_at": _iso(row["recorded_at"]),
        "data": data,
    }


async def campaign_autostops(request: web.Request) -> web.Response:
    """The campaign's automatic stops and resumes (as recorded from ``stats.campaign.*``)."""
    campaign_id = request.match_info["campaign_id"]
    limit = _limit(request, default=100, maximum=1000)
    async with _ctx(request).pool.acquire() as conn:
        rows = await store.campaign_autostops(conn, campaign_id, limit=limit)
    return json_response({"items": [autostop_view(r) for r in rows]})


def control_reply(data: bytes) -> dict[str, Any]:
    """ams-reporter's reply, or the Problem its ``{"error": {...}}`` stands for."""
    try:
        reply = msgspec.json.decode(data)
    except msgspec.DecodeError:
        reply = None
    if not isinstance(reply, dict):
        raise Problem(502, "Bad gateway", "ams-reporter sent a reply that is not a JSON object")
    error = reply.get("error")
    if isinstance(error, dict):
        status = error.get("status")
        if not isinstance(status, int) or not 400 <= status <= 599:
            status = 502
        problem = Problem(
            status, str(error.get("title") or "Error"), str(error.get("detail") or "")
        )
        if isinstance(error.get("type"), str) and error["type"]:
            problem.type = error["type"]
        raise problem
    return reply


async def control_request(nc: NATS | None, subject: str, payload: bytes) -> bytes:
    """A request to ams-reporter; "no responders" is retried a few times, quickly."""
    unavailable = Problem(503, "Service unavailable", "ams-reporter unavailable")
    if nc is None or not nc.is_connected:
        raise unavailable
    for attempt in range(1, CONTROL_ATTEMPTS + 1):
        try:
            msg = await nc.request(subject, payload, timeout=CONTROL_TIMEOUT_S)
        except nats.errors.NoRespondersError:
            if attempt < CONTROL_ATTEMPTS:
                await asyncio.sleep(CONTROL_RETRY_DELAY_S)
            continue
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("ams-reporter request failed", subject=subject, error=repr(exc))
            raise unavailable from None
        return msg.data
    log.warning("ams-reporter request failed", subject=subject, error="no responders")
    raise unavailable


async def campaign_control(
    ctx: AdminContext, subject: str, campaign_id: str, requested_by: str
) -> dict[str, Any]:
    """Ask ams-reporter (``ams.control.resume|stop``) to start or stop the campaign's AMS
    mailing with its AMS client; its answer, or the Problem it reported."""
    payload = _json.encode({"campaign_id": campaign_id, "requested_by": requested_by})
    reply = control_reply(await control_request(ctx.nc, subject, payload))
    log.info(
        "campaign control requested",
        action=subject.rsplit(".", 1)[-1],
        campaign_id=campaign_id,
        requested_by=requested_by,
    )
    return reply


async def resume_campaign(request: web.Request) -> web.Response:
    """Resume an automatically stopped campaign through ams-reporter (``startMailing``)."""
    campaign_id = request.match_info["campaign_id"]
    body = await read_json(request, ResumeIn) if (await request.read()).strip() else ResumeIn()
    return json_response(
        await campaign_control(_ctx(request), CONTROL_RESUME, campaign_id, body.requested_by)
    )


async def stop_campaign(request: web.Request) -> web.Response:
    """Stop a campaign's AMS mailing through ams-reporter (``stopMailing``)."""
    campaign_id = request.match_info["campaign_id"]
    body = await read_json(request, ResumeIn) if (await request.read()).strip() else ResumeIn()
    return json_response(
        await campaign_control(_ctx(request), CONTROL_STOP, campaign_id, body.requested_by)
    )


# --- postmaster ----------------------------------------------------------------------------


def parse_date(raw: str, name: str) -> dt.date:
    """A YYYY-MM-DD day; raises a 400 Problem."""
    try:
        return dt.date.fromisoformat(raw.strip())
    except ValueError:
        raise bad_request(f"{name} must be a date (YYYY-MM-DD)") from None


def postmaster_day_view(row: Row) -> dict[str, Any]:
    return {
        "domain": row["domain"],
        "msgtype": row["msgtype"] or None,
        "date": row["date"].isoformat(),
        **{
            k: int(row[k])
            for k in (
                "messages_sent",
                "delivered",
                "read",
                "deleted_read",
                "deleted_unread",
                "spam",
                "probably_spam",
                "complaints",
            )
        },
        "reputation": row["reputation"],
        "trend": row["trend"],
        "event_id": row["event_id"],
        "polled_at": _iso(row["occurred_at"]),
        "updated_at": _iso(row["updated_at"]),
    }


async def postmaster_daily(request: web.Request) -> web.Response:
    """Mail.ru Postmaster statistics per day, as last polled by stats-poller."""
    q = request.query
    limit = _limit(request, default=100, maximum=1000)
    date_from = parse_date(q["date_from"], "date_from") if q.get("date_from") else None
    date_to = parse_date(q["date_to"], "date_to") if q.get("date_to") else None
    if date_from is not None and date_to is not None and date_from > date_to:
        raise bad_request("date_from must not be after date_to")
    domain = q.get("domain", "").strip().lower() or None
    async with _ctx(request).pool.acquire() as conn:
        rows = await store.postmaster_daily(
            conn,
            domain=domain,
            msgtype=q.get("msgtype") or None,
            date_from=date_from,
            date_to=date_to,
            limit=limit,
        )
    return json_response({"items": [postmaster_day_view(r) for r in rows]})


# --- dead letters ------------------------------------------------------------------------


class ReplayFilter(msgspec.Struct, kw_only=True):
    account_id: str | None = None
    endpoint_id: str | None = None
    include_replayed: bool = False
    limit: int = 100


def _replayed_query(request: web.Request) -> bool | None:
    state = request.query.get("state", "all")
    if state not in ("all", "pending", "replayed"):
        raise bad_request("state must be one of: all, pending, replayed")
    return None if state == "all" else state == "replayed"


async def list_dead_letters(request: web.Request) -> web.Response:
    q = request.query
    limit = _limit(request)
    async with _ctx(request).pool.acquire() as conn:
        rows = await store.list_dead_letters(
            conn,
            account_id=q.get("account_id") or None,
            endpoint_id=q.get("endpoint_id") or None,
            mailgate_id=q.get("mailgate_id") or None,
            replayed=_replayed_query(request),
            limit=limit,
            cursor=q.get("cursor") or None,
        )
    next_cursor = rows[-1]["id"] if len(rows) == limit else None
    return json_response({"items": [dead_letter_view(r) for r in rows], "next_cursor": next_cursor})


async def get_dead_letter(request: web.Request) -> web.Response:
    dead_letter_id = request.match_info["dead_letter_id"]
    async with _ctx(request).pool.acquire() as conn:
        row = await store.get_dead_letter(conn, dead_letter_id)
    if row is None:
        raise not_found(f"dead letter {dead_letter_id!r}")
    return json_response(dead_letter_view(row, with_event=True))


def replay_event(row: Row, now: float) -> StatusEvent:
    """The dead-lettered status event, addressed to its endpoint only, with a fresh retry
    window (``occurred_at``). Its ``event_id`` (the ``webhook-id``) is unchanged, so a
    receiver that did get it before de-duplicates it."""
    original = decode(bytes(row["payload"]), StatusEvent)
    return msgspec.structs.replace(original, occurred_at=now, endpoint_ids=[row["endpoint_id"]])


async def _replay(ctx: AdminContext, row: Row) -> Row:
    if ctx.js is None:
        raise Problem(503, "Service unavailable", "NATS is not connected")
    event = replay_event(row, time.time())
    # A new Nats-Msg-Id per replay: JetStream must not drop a second, deliberate replay.
    msg_id = f"replay-{row['id']}-{row['replay_count'] + 1}"
    try:
        await ctx.js.publish(
            event.subject(), encode(event), timeout=5.0, headers={"Nats-Msg-Id": msg_id}
        )
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
        raise Problem(
            503, "Service unavailable", f"the status event was not republished: {exc}"
        ) from None
    async with ctx.pool.acquire() as conn:
        updated = await store.mark_replayed(conn, row["id"])
    if ctx.metrics is not None:
        ctx.metrics.dead_letter_replays.inc()
    log.info(
        "dead letter replayed",
        dead_letter_id=row["id"],
        endpoint_id=row["endpoint_id"],
        mailgate_id=row["mailgate_id"],
    )
    return updated or row


async def replay_dead_letter(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    dead_letter_id = request.match_info["dead_letter_id"]
    async with ctx.pool.acquire() as conn:
        row = await store.get_dead_letter(conn, dead_letter_id)
    if row is None:
        raise not_found(f"dead letter {dead_letter_id!r}")
    updated = await _replay(ctx, row)
    return json_response(dead_letter_view(updated), status=202)


async def replay_dead_letters(request: web.Request) -> web.Response:
    """Replay the dead letters of an account or endpoint (not yet replayed ones by default)."""
    ctx = _ctx(request)
    body = await read_json(request, ReplayFilter)
    if body.account_id is None and body.endpoint_id is None:
        raise bad_request("give account_id or endpoint_id (replaying everything is refused)")
    if not 1 <= body.limit <= 1000:
        raise bad_request("limit must be between 1 and 1000")
    async with ctx.pool.acquire() as conn:
        rows = await store.list_dead_letters(
            conn,
            account_id=body.account_id,
            endpoint_id=body.endpoint_id,
            mailgate_id=None,
            replayed=None if body.include_replayed else False,
            limit=body.limit,
            cursor=None,
        )
    replayed = [dead_letter_view(await _replay(ctx, row)) for row in reversed(rows)]
    return json_response({"replayed": len(replayed), "items": replayed}, status=202)


# --- health --------------------------------------------------------------------------------


async def _consumer_lag(js: JetStreamContext) -> dict[str, dict[str, int]]:
    lag: dict[str, dict[str, int]] = {}
    for stream, durable, _subject in CONSUMERS:
        try:
            info = await js.consumer_info(stream, durable, timeout=2.0)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            lag[durable] = {"error": 1}
            log.info("consumer info failed", durable=durable, error=str(exc))
            continue
        lag[durable] = {"pending": info.num_pending or 0, "ack_pending": info.num_ack_pending or 0}
    return lag


async def get_health(request: web.Request) -> web.Response:
    """Readiness checks plus what an operator looks at first: backlogs and partitions."""
    ctx = _ctx(request)
    failing = await ctx.health.failing() if ctx.health is not None else []
    async with ctx.pool.acquire() as conn:
        counts = await store.health_counts(conn)
        months = await existing_months(conn)
    body: dict[str, Any] = {
        "status": "degraded" if failing else "ok",
        "failing": failing,
        **counts,
        "kv_bulk_writes_running": ctx.kv.bulk_writes_running,
        "partitions": {
            table: {
                "count": len(found),
                "oldest": found[0].strftime("%Y-%m") if found else None,
                "newest": found[-1].strftime("%Y-%m") if found else None,
            }
            for table, found in months.items()
        },
    }
    if ctx.js is not None:
        body["consumers"] = await _consumer_lag(ctx.js)
    return json_response(body, status=200 if body["status"] == "ok" else 503)


# --- customer webhook registration (account token) ---------------------------------------


async def _webhook_account(request: web.Request, conn: Conn) -> Row:
    token = _bearer(request)
    if token is None:
        raise unauthorized("an account api token is required (Authorization: Bearer ...)")
    row = await store.account_by_token_hash(conn, token_hash(token))
    if row is None or not hmac.compare_digest(row["api_token_hash"], token_hash(token)):
        raise unauthorized("the api token is not valid")
    return row


async def register_webhook(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    async with ctx.pool.acquire() as conn:
        account = await _webhook_account(request, conn)
    body = await read_json(request, WebhookIn)
    row = await endpoint_register(ctx, account["id"], body)
    return json_response(endpoint_view(row, secret=True), status=201 if row["inserted"] else 200)


async def endpoint_register(ctx: AdminContext, account_id: str, body: WebhookIn) -> Any:
    """Add (or re-enable and update) an account's webhook endpoint; the row, with
    ``inserted``."""
    try:
        host = parse_url(body.url)
        events = canonical_events(body.events or [])
        if not ctx.allow_private_webhooks:
            await check_public_host(host, ctx.resolve)
    except InvalidWebhookRequest as exc:
        raise bad_request(str(exc), "invalid-webhook") from None
    async with ctx.pool.acquire() as conn:
        row = await store.upsert_endpoint(
            conn,
            endpoint_id=new_ulid(),
            account_id=account_id,
            url=body.url.strip(),
            secret=new_secret(),
            events=events,
            batch=body.batch,
            legacy_complained_spelling=body.legacy_complained_spelling,
        )
    await ctx.kv.put_endpoints_of(account_id)
    log.info("webhook registered", account_id=account_id, endpoint_id=row["id"])
    return row


async def get_webhook(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    async with ctx.pool.acquire() as conn:
        account = await _webhook_account(request, conn)
        rows = await store.list_endpoints(conn, account["id"])
    enabled = [r for r in rows if r["enabled"]]
    return json_response(
        {
            "url": enabled[0]["url"] if enabled else None,
            "webhooks": [endpoint_view(r) for r in rows],
        }
    )


async def delete_webhook(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    async with ctx.pool.acquire() as conn:
        account = await _webhook_account(request, conn)
    url = request.query["url"] if "url" in request.query else (await read_json(request, UrlIn)).url
    async with ctx.pool.acquire() as conn:
        row = await store.disable_endpoint(conn, account["id"], url.strip())
    if row is None:
        raise not_found(f"webhook {url!r}")
    await ctx.kv.put_endpoints_of(account["id"])
    log.info("webhook disabled", account_id=account["id"], endpoint_id=row["id"])
    return json_response({"url": row["url"], "enabled": False})


# --- campaigns, overview ---------------------------------------------------------------------

#: Campaign lists look this far back by default (a keyset range of the messages table).
CAMPAIGN_WINDOW = dt.timedelta(days=7)


def campaign_row_view(row: Row) -> dict[str, Any]:
    return {
        "campaign_id": row["campaign_id"],
        "messages": int(row["messages"]),
        "bounced": int(row["bounced"]),
        "complained": int(row["complained"]),
        "engaged": int(row["engaged"]),
        "last_message_at": _iso(
            dt.datetime.fromtimestamp(ulid_time_ms(row["last_mailgate_id"]) / 1000, tz=dt.UTC)
        )
        if is_ulid(row["last_mailgate_id"])
        else None,
    }


async def campaigns_data(
    conn: Conn,
    *,
    since: dt.datetime,
    account_id: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    rows = await store.list_campaigns(
        conn, min_id=ulid_prefix(since), account_id=account_id, limit=limit
    )
    return [campaign_row_view(r) for r in rows]


async def list_campaigns(request: web.Request) -> web.Response:
    """Campaigns with messages since ``since`` (default: 7 days), most recently active first."""
    q = request.query
    since = parse_time(q["since"], "since") if q.get("since") else _now() - CAMPAIGN_WINDOW
    limit = _limit(request, default=50, maximum=500)
    async with _ctx(request).pool.acquire() as conn:
        items = await campaigns_data(
            conn, since=since, account_id=q.get("account_id") or None, limit=limit
        )
    return json_response({"items": items})


def ams_mailing_view(row: Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    data = dict(row["data"] or {})
    keep = ("mailing_id", "name", "state", "approx_speed_per_min", "percent_done", "total")
    counts = ("sent", "not_sent", "bad", "refused", "excluded", "opened", "clicks")
    return {k: data.get(k) for k in keep} | {
        "counts": {k: data.get(k, 0) for k in counts},
        "polled_at": _iso(row["occurred_at"]),
    }


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def day_start(now: dt.datetime) -> dt.datetime:
    return now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def overview_data(
    conn: Conn, *, since: dt.datetime, account_id: str | None = None
) -> dict[str, Any]:
    """Messages accepted since ``since`` by status, customer events recorded since then
    (with opens and clicks split by audience) and their rates."""
    min_id = ulid_prefix(since)
    statuses = await store.message_statuses(conn, min_id=min_id, account_id=account_id)
    events = await store.recent_events(
        conn, recorded_since=since, account_id=account_id, min_id=min_id
    )
    non_machine = {
        name: events.get((name, "human"), (0, 0))[1] + events.get((name, "unknown"), (0, 0))[1]
        for name in ENGAGEMENT
    }
    view = campaign_stats_view("", statuses, events, non_machine)
    view.pop("campaign_id")
    return {"since": _iso(since), **view}


async def get_overview(request: web.Request) -> web.Response:
    """Today's (or since ``since``) messages by status, events and rates; backlogs."""
    ctx = _ctx(request)
    q = request.query
    since = parse_time(q["since"], "since") if q.get("since") else day_start(_now())
    async with ctx.pool.acquire() as conn:
        body = await overview_data(conn, since=since, account_id=q.get("account_id") or None)
    if ctx.js is not None:
        body["pipeline"] = await pipeline_lag(ctx.js)
    return json_response(body)


#: The streams whose consumers make up the pipeline, in the order mail flows through them.
PIPELINE_STREAMS = ("MAIL", "POSTAL", "TRACK", "STATUS", "STATS")


def nats_time(value: Any) -> dt.datetime | None:
    """A JetStream message time (RFC 3339 with nanoseconds, or a datetime) as a datetime."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if not isinstance(value, str) or not value:
        return None
    head, dot, frac = value.rstrip("Z").partition(".")
    digits = "".join(c for c in frac if c.isdigit())[:6]
    try:
        parsed = dt.datetime.fromisoformat(head + (f".{digits}" if dot and digits else ""))
    except ValueError:
        return None
    return parsed.replace(tzinfo=dt.UTC)


async def _message_time(js: JetStreamContext, stream: str, seq: int) -> dt.datetime | None:
    if seq <= 0:
        return None
    try:
        msg = await js.get_msg(stream, seq)
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
        return None  # purged or expired meanwhile: no age to show
    return nats_time(msg.time)


async def pipeline_lag(js: JetStreamContext) -> list[dict[str, Any]]:
    """Every durable consumer of the pipeline's streams: messages waiting and in flight and
    the age of the oldest one not yet acknowledged (one stream message read per consumer
    with a backlog), and when the stream last received a message."""
    out: list[dict[str, Any]] = []
    now = _now()
    for stream in PIPELINE_STREAMS:
        try:
            info = await js.stream_info(stream)
            consumers = await js.consumers_info(stream)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            out.append({"stream": stream, "consumer": None, "error": str(exc) or repr(exc)})
            continue
        last_at = await _message_time(js, stream, info.state.last_seq or 0)
        for consumer in sorted(consumers, key=lambda c: c.name or ""):
            pending = consumer.num_pending or 0
            in_flight = consumer.num_ack_pending or 0
            lag_s = 0.0
            if pending or in_flight:
                floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
                oldest = await _message_time(js, stream, (floor or 0) + 1)
                lag_s = max(0.0, (now - oldest).total_seconds()) if oldest else 0.0
            out.append(
                {
                    "stream": stream,
                    "consumer": consumer.name,
                    "pending": pending,
                    "ack_pending": in_flight,
                    "redelivered": consumer.num_redelivered or 0,
                    "lag_s": round(lag_s, 3),
                    "stream_last_at": _iso(last_at),
                }
            )
    return out


# --- account webhooks (admin) ----------------------------------------------------------------


async def add_account_webhook(request: web.Request) -> web.Response:
    """Register a webhook endpoint for an account (as the account itself could)."""
    ctx = _ctx(request)
    account_id = request.match_info["account_id"]
    async with ctx.pool.acquire() as conn:
        await _account_or_404(conn, account_id)
    body = await read_json(request, WebhookIn)
    row = await endpoint_register(ctx, account_id, body)
    return json_response(endpoint_view(row, secret=True), status=201 if row["inserted"] else 200)


def test_status_event(account_id: str, endpoint_id: str, now: float) -> StatusEvent:
    """A ``delivered`` event marked ``data.test`` for one endpoint only: ams-reporter signs
    and delivers it like any other (a failure ends in the dead letters)."""
    return StatusEvent(
        event_id=f"test-{new_ulid()}",
        occurred_at=now,
        name="delivered",
        timestamp=int(now),
        message=MessageRef(
            mailgate_id="00000000000000000000000000",
            account_id=account_id,
            recipient="test@example.com",
            external_id="test",
            campaign_id=None,
        ),
        data={"test": True},
        endpoint_ids=[endpoint_id],
    )


async def endpoint_test_send(ctx: AdminContext, account_id: str, endpoint_id: str) -> str:
    """Publish a test event to one endpoint of the account; its event id."""
    async with ctx.pool.acquire() as conn:
        rows = await store.list_endpoints(conn, account_id)
    if not any(r["id"] == endpoint_id for r in rows):
        raise not_found(f"webhook endpoint {endpoint_id!r}")
    if ctx.js is None:
        raise Problem(503, "Service unavailable", "NATS is not connected")
    event = test_status_event(account_id, endpoint_id, time.time())
    try:
        await ctx.js.publish(
            event.subject(), encode(event), timeout=5.0, headers={"Nats-Msg-Id": event.event_id}
        )
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
        raise Problem(
            503, "Service unavailable", f"the test event was not published: {exc}"
        ) from None
    log.info("webhook test sent", account_id=account_id, endpoint_id=endpoint_id)
    return event.event_id


async def test_account_webhook(request: web.Request) -> web.Response:
    m = request.match_info
    event_id = await endpoint_test_send(_ctx(request), m["account_id"], m["endpoint_id"])
    return json_response({"event_id": event_id, "queued": True}, status=202)


# --- operators (console accounts) -------------------------------------------------------------

OPERATOR_ROLES = ("admin", "viewer")
_OPERATOR_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{2,64}$")
MIN_OPERATOR_PASSWORD = 10


class OperatorIn(msgspec.Struct, kw_only=True):
    username: str
    role: str = "admin"
    account_id: str | None = None
    password: str | None = None


class OperatorPatch(msgspec.Struct, kw_only=True):
    disabled: bool | None = None
    password: str | None = None


def operator_view(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "username": row["username"],
        "role": row["role"],
        "account_id": row["account_id"],
        "disabled": row["disabled"],
        "created_at": _iso(row["created_at"]),
        "last_login_at": _iso(row["last_login_at"]),
    }


def clean_operator_password(password: str) -> str:
    if len(password) < MIN_OPERATOR_PASSWORD or len(password) > 200:
        raise bad_request(f"password must be {MIN_OPERATOR_PASSWORD} to 200 characters")
    return password


async def operator_create(ctx: AdminContext, body: OperatorIn) -> dict[str, Any]:
    """Create a console operator; the view, plus the password when it was generated."""
    username = body.username.strip()
    if not _OPERATOR_NAME.match(username):
        raise bad_request("username must be 2 to 64 letters, digits or . _ @ + -")
    if body.role not in OPERATOR_ROLES:
        raise bad_request("role must be admin or viewer")
    account_id = (body.account_id or "").strip() or None
    if (body.role == "viewer") != (account_id is not None):
        raise bad_request("a viewer needs account_id (its account); an admin has none")
    generated = body.password is None
    password = generate_password() if generated else clean_operator_password(body.password or "")
    password_hash = await asyncio.to_thread(hash_password, password)
    async with ctx.pool.acquire() as conn:
        if account_id is not None:
            await _account_or_404(conn, account_id)
        row = await store.insert_operator(
            conn,
            operator_id=new_ulid(),
            username=username,
            password_hash=password_hash,
            role=body.role,
            account_id=account_id,
        )
    if row is None:
        raise Problem(409, "Conflict", "that username is taken", slug="username-taken")
    log.info("operator created", operator_id=row["id"], role=body.role)
    view = operator_view(row)
    return view | {"password": password} if generated else view


async def create_operator(request: web.Request) -> web.Response:
    body = await read_json(request, OperatorIn)
    return json_response(await operator_create(_ctx(request), body), status=201)


async def list_operators(request: web.Request) -> web.Response:
    async with _ctx(request).pool.acquire() as conn:
        rows = await store.list_operators(conn)
    return json_response({"items": [operator_view(r) for r in rows], "next_cursor": None})


async def operator_patch(
    ctx: AdminContext, operator_id: str, body: OperatorPatch
) -> dict[str, Any]:
    """Disable/enable an operator or set its password (either ends its sessions)."""
    password_hash = None
    if body.password is not None:
        clean = clean_operator_password(body.password)
        password_hash = await asyncio.to_thread(hash_password, clean)
    async with ctx.pool.acquire() as conn:
        row = await store.update_operator(
            conn, operator_id, disabled=body.disabled, password_hash=password_hash
        )
    if row is None:
        raise not_found(f"operator {operator_id!r}")
    log.info("operator updated", operator_id=operator_id, disabled=row["disabled"])
    return operator_view(row)


async def patch_operator(request: web.Request) -> web.Response:
    body = await read_json(request, OperatorPatch)
    return json_response(
        await operator_patch(_ctx(request), request.match_info["operator_id"], body)
    )
