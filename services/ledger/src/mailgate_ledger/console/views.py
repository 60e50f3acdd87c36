"""The operator console: server-rendered pages under ``/console/`` on the admin port.

Every page reads and changes data through the admin API's own functions (``admin.*_data``,
``admin.account_create``... and ``store``), so the console and ``/v1`` answer the same.
Viewers are bound to one account: each query gets that account id (``View.scope``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
import structlog
from aiohttp import web
from mailgate_core.passwords import verify_password

from .. import admin, store
from ..admin import AdminContext, Problem
from ..status import STATUS_RANK
from . import auth
from .i18n import LANGUAGES, pick_language, translator

log = structlog.get_logger()

PREFIX = "/console"
PAGE_SIZE = 50

#: Verified against when the username is unknown, so both answers take as long.
_DUMMY_HASH = (
    "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)


@dataclass
class ConsoleConfig:
    session_hours: float = 12.0
    trust_proxy: bool = False
    """Believe X-Forwarded-Proto/-For (the console sits behind a TLS-terminating proxy)."""
    grafana_url: str = ""
    max_failures_per_user: int = 5
    max_failures_per_ip: int = 20
    failure_window_s: float = 900.0


@dataclass
class Operator:
    id: str
    username: str
    role: str
    account_id: str | None
    csrf: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass
class Console:
    ctx: AdminContext
    config: ConsoleConfig
    env: jinja2.Environment
    throttle: auth.LoginThrottle = field(default_factory=auth.LoginThrottle)


CONSOLE = web.AppKey("ledger_console", Console)


def _fmt_time(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if isinstance(value, int | float):
        value = dt.datetime.fromtimestamp(value, tz=dt.UTC)
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _fmt_rate(value: Any) -> str:
    if value is None:
        return "—"
    return f"{float(value) * 100:.2f}\u00a0%"


def make_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mailgate_ledger", "console/templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["time"] = _fmt_time
    env.filters["rate"] = _fmt_rate
    env.filters["q"] = lambda value: quote(str(value), safe="")
    return env


# --- request plumbing ------------------------------------------------------------------------


class View:
    """What a page handler needs: the operator, the form, the language, rendering."""

    def __init__(
        self, request: web.Request, console: Console, op: Operator | None, lang: str
    ) -> None:
        self.request = request
        self.console = console
        self.ctx = console.ctx
        self.op = op
        self.lang = lang
        self.t = translator(lang)
        self.form: Mapping[str, Any] = {}

    @property
    def scope(self) -> str | None:
        """The account a viewer is bound to (``None`` for an admin: everything)."""
        return None if self.op is None or self.op.is_admin else self.op.account_id

    def render(self, template: str, status: int = 200, **values: Any) -> web.Response:
        notice = values.pop("notice", None) or self.request.query.get("notice")
        page = self.console.env.get_template(template).render(
            t=self.t,
            lang=self.lang,
            languages=LANGUAGES,
            op=self.op,
            csrf=self.op.csrf if self.op else "",
            path=self.request.path_qs,
            grafana_url=self.console.config.grafana_url,
            notice=self.t(notice) if notice else None,
            prefix=PREFIX,
            **values,
        )
        return web.Response(
            text=page,
            status=status,
            content_type="text/html",
            headers=_SECURITY_HEADERS,
        )

    def error(self, status: int, detail: str) -> web.Response:
        titles = {403: "Forbidden", 404: "Not found"}
        return self.render(
            "error.html", status=status, title=titles.get(status, "Error"), detail=detail
        )


_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


def _redirect(location: str, notice: str | None = None) -> web.Response:
    """303 See Other (after a POST, the browser GETs the page)."""
    if notice:
        location += ("&" if "?" in location else "?") + urlencode({"notice": notice})
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _safe_next(value: str | None) -> str:
    """Only redirect within the console (no open redirect)."""
    if value and value.startswith(PREFIX + "/") and not value.startswith("//"):
        return value
    return PREFIX + "/"


def _language(request: web.Request) -> str:
    return pick_language(
        request.cookies.get(auth.LANG_COOKIE), request.headers.get("Accept-Language", "")
    )


def _https(request: web.Request, console: Console) -> bool:
    return auth.is_https(
        secure_transport=request.secure and request.scheme == "https",
        headers=request.headers,
        trust_proxy=console.config.trust_proxy,
    )


async def _current_operator(request: web.Request, console: Console) -> Operator | None:
    token = request.cookies.get(auth.SESSION_COOKIE)
    if not token:
        return None
    async with console.ctx.pool.acquire() as conn:
        row = await store.session_operator(conn, auth.token_hash(token))
    if row is None:
        return None
    return Operator(row["id"], row["username"], row["role"], row["account_id"], row["csrf_token"])


PageHandler = Callable[[View], Awaitable[web.StreamResponse]]


def page(*, admin_only: bool = False) -> Callable[[PageHandler], Any]:
    """Signed-in pages: GET needs a session; POST also a valid CSRF token (else 403) and,
    like every change, the admin role. Problems of the admin functions become pages."""

    def wrap(handler: PageHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        @functools.wraps(handler)
        async def run(request: web.Request) -> web.StreamResponse:
            console = request.app[CONSOLE]
            op = await _current_operator(request, console)
            view = View(request, console, op, _language(request))
            if op is None:
                if request.method == "GET":
                    return _redirect(f"{PREFIX}/login?{urlencode({'next': request.path_qs})}")
                return view.error(403, "sign in first")
            if request.method == "POST":
                view.form = await request.post()
                if not auth.csrf_ok(op.csrf, _text(view.form.get("csrf"))):
                    log.warning("console csrf rejected", operator=op.username, path=request.path)
                    return view.error(403, "invalid or missing CSRF token; reload the page")
                if not op.is_admin:
                    return view.error(403, "viewers cannot change anything")
            elif admin_only and not op.is_admin:
                return view.error(403, "administrators only")
            try:
                return await handler(view)
            except Problem as problem:
                return view.error(problem.status, problem.detail or problem.title)

        return run

    return wrap


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _form(view: View, name: str) -> str:
    return _text(view.form.get(name)).strip()


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.replace("\n", ",").split(",") if part.strip()]


# --- sign-in ---------------------------------------------------------------------------------


async def login_page(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    view = View(request, console, None, _language(request))
    return _login_form(request, view)


def _login_form(
    request: web.Request, view: View, error: str | None = None, status: int = 200
) -> web.Response:
    token = request.cookies.get(auth.LOGIN_CSRF_COOKIE) or auth.new_token()
    response = view.render(
        "login.html",
        status=status,
        login_csrf=token,
        error=view.t(error) if error else None,
        next=_safe_next(request.query.get("next")),
    )
    response.set_cookie(
        auth.LOGIN_CSRF_COOKIE,
        token,
        **auth.cookie_options(secure=_https(request, view.console), max_age_s=3600),  # type: ignore[arg-type]
    )
    return response


async def login(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    view = View(request, console, None, _language(request))
    form = await request.post()
    if not auth.csrf_ok(request.cookies.get(auth.LOGIN_CSRF_COOKIE), _text(form.get("csrf"))):
        return view.error(403, "invalid or missing CSRF token; reload the page")
    username = _text(form.get("username")).strip()[:64]
    password = _text(form.get("password"))
    ip = auth.client_ip(request.remote, request.headers, trust_proxy=console.config.trust_proxy)
    wait_s = console.throttle.retry_after_s(ip, username)
    if wait_s > 0:
        log.warning("console sign-in throttled", username=username, ip=ip)
        response = _login_form(request, view, "Too many attempts. Try again later.", 429)
        response.headers["Retry-After"] = str(int(wait_s) + 1)
        return response
    async with console.ctx.pool.acquire() as conn:
        row = await store.operator_by_username(conn, username) if username else None
    stored = row["password_hash"] if row is not None else _DUMMY_HASH
    valid = await _verify(password, stored)
    if row is None or not valid or row["disabled"]:
        console.throttle.failed(ip, username)
        log.warning("console sign-in failed", username=username, ip=ip)
        return _login_form(request, view, "Wrong username or password.", 401)
    console.throttle.succeeded(username)
    token = auth.new_token()
    max_age_s = int(console.config.session_hours * 3600)
    async with console.ctx.pool.acquire() as conn:
        await store.delete_expired_sessions(conn)
        await store.insert_session(
            conn,
            token_hash=auth.token_hash(token),
            operator_id=row["id"],
            csrf_token=auth.new_token(),
            expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=max_age_s),
            user_agent=request.headers.get("User-Agent", ""),
            ip=ip,
        )
    log.info("console sign-in", operator=row["username"], role=row["role"], ip=ip)
    response = _redirect(_safe_next(_text(form.get("next"))))
    response.set_cookie(
        auth.SESSION_COOKIE,
        token,
        **auth.cookie_options(secure=_https(request, console), max_age_s=max_age_s),  # type: ignore[arg-type]
    )
    response.del_cookie(auth.LOGIN_CSRF_COOKIE, path=auth.COOKIE_PATH)
    return response


async def _verify(password: str, stored: str) -> bool:
    return await asyncio.to_thread(verify_password, password, stored)


@page()
async def logout(view: View) -> web.StreamResponse:
    token = view.request.cookies.get(auth.SESSION_COOKIE, "")
    async with view.ctx.pool.acquire() as conn:
        await store.delete_session(conn, auth.token_hash(token))
    log.info("console sign-out", operator=view.op.username if view.op else "")
    response = _redirect(f"{PREFIX}/login")
    response.del_cookie(auth.SESSION_COOKIE, path=auth.COOKIE_PATH)
    return response


async def set_language(request: web.Request) -> web.StreamResponse:
    lang = request.query.get("to", "en")
    response = _redirect(_safe_next(request.query.get("next")))
    if lang in LANGUAGES:
        response.set_cookie(
            auth.LANG_COOKIE,
            lang,
            max_age=365 * 86400,
            path=auth.COOKIE_PATH,
            samesite="Lax",
            secure=_https(request, request.app[CONSOLE]),
        )
    return response


# --- overview --------------------------------------------------------------------------------


@page()
async def overview(view: View) -> web.StreamResponse:
    now = dt.datetime.now(dt.UTC)
    since = admin.day_start(now)
    async with view.ctx.pool.acquire() as conn:
        data = await admin.overview_data(conn, since=since, account_id=view.scope)
        failing_endpoints = await store.dead_letter_summary(
            conn, since=now - dt.timedelta(hours=24), account_id=view.scope
        )
    pipeline: list[dict[str, Any]] = []
    readiness: list[str] = []
    if view.scope is None:
        if view.ctx.js is not None:
            pipeline = await admin.pipeline_lag(view.ctx.js)
        if view.ctx.health is not None:
            readiness = await view.ctx.health.failing()
    postal_last = next(
        (p.get("stream_last_at") for p in pipeline if p.get("stream") == "POSTAL"), None
    )
    return view.render(
        "overview.html",
        data=data,
        statuses=list(STATUS_RANK),
        pipeline=pipeline,
        readiness=readiness,
        postal_last=postal_last,
        failing_endpoints=failing_endpoints,
    )


# --- messages --------------------------------------------------------------------------------

SEARCH_FIELDS = ("id", "email", "campaign_id", "status", "since", "until")


@page()
async def messages(view: View) -> web.StreamResponse:
    query = {k: view.request.query.get(k, "").strip() for k in (*SEARCH_FIELDS, "cursor")}
    search = {k: v for k, v in query.items() if v}
    error = None
    rows: list[Any] = []
    try:
        async with view.ctx.pool.acquire() as conn:
            rows = await admin.search_messages(conn, search, limit=PAGE_SIZE, account_id=view.scope)
    except Problem as problem:
        error = problem.detail
    next_query = None
    if len(rows) == PAGE_SIZE:
        next_query = urlencode({**search, "cursor": rows[-1]["mailgate_id"]})
    return view.render(
        "messages.html",
        query=query,
        items=[admin.message_view(r) for r in rows],
        statuses=list(STATUS_RANK),
        error=error,
        next_query=next_query,
    )


def headers_we_set(message: Mapping[str, Any], domain: str) -> list[tuple[str, str]]:
    """The header fields smtp-ingest writes into the recipient's copy (docs: ids)."""
    headers = [("Message-ID", f"<{message['mailgate_id']}@{domain}>")]
    if message.get("campaign_id"):
        headers += [
            ("X-Postal-Tag", message["campaign_id"]),
            ("X-Postmaster-Msgtype", message["campaign_id"]),
        ]
    return headers


@page()
async def message(view: View) -> web.StreamResponse:
    mailgate_id = view.request.match_info["mailgate_id"]
    async with view.ctx.pool.acquire() as conn:
        answer, row, events = await admin.message_timeline_data(
            conn, mailgate_id, account_id=view.scope
        )
    details = {e["event_id"]: e["data"] for e in events}
    return view.render(
        "message.html",
        message=admin.message_view(row),
        timeline=answer["timeline"],
        details=details,
        deliveries=answer["webhook_deliveries"],
        dead_letters=answer["dead_letters"],
        headers=headers_we_set(row, view.ctx.domain),
    )


# --- campaigns -------------------------------------------------------------------------------


@page()
async def campaigns(view: View) -> web.StreamResponse:
    wanted = view.request.query.get("id", "").strip()
    if wanted:
        return _redirect(f"{PREFIX}/campaigns/{quote(wanted, safe='')}")
    since = dt.datetime.now(dt.UTC) - admin.CAMPAIGN_WINDOW
    async with view.ctx.pool.acquire() as conn:
        items = await admin.campaigns_data(conn, since=since, account_id=view.scope)
    return view.render("campaigns.html", items=items)


@page()
async def campaign(view: View) -> web.StreamResponse:
    campaign_id = view.request.match_info["campaign_id"]
    async with view.ctx.pool.acquire() as conn:
        stats = await admin.campaign_stats_data(conn, campaign_id, account_id=view.scope)
        if view.scope is not None and stats["messages"] == 0:
            raise admin.not_found(f"campaign {campaign_id!r}")
        autostops = await store.campaign_autostops(conn, campaign_id, limit=20)
        mailing = admin.ams_mailing_view(await store.ams_mailing_state(conn, campaign_id))
    return view.render(
        "campaign.html",
        stats=stats,
        autostops=[admin.autostop_view(r) for r in autostops],
        mailing=mailing,
        statuses=list(STATUS_RANK),
    )


async def _campaign_control(view: View, subject: str, notice: str) -> web.StreamResponse:
    campaign_id = view.request.match_info["campaign_id"]
    assert view.op is not None
    await admin.campaign_control(view.ctx, subject, campaign_id, view.op.username)
    return _redirect(f"{PREFIX}/campaigns/{quote(campaign_id, safe='')}", notice)


@page()
async def campaign_stop(view: View) -> web.StreamResponse:
    return await _campaign_control(view, admin.CONTROL_STOP, "Campaign stopped in AMS.")


@page()
async def campaign_resume(view: View) -> web.StreamResponse:
    return await _campaign_control(view, admin.CONTROL_RESUME, "Campaign resumed in AMS.")


# --- accounts, credentials, webhooks ---------------------------------------------------------


def _account_id(view: View) -> str:
    account_id = view.request.match_info["account_id"]
    if view.scope is not None and account_id != view.scope:
        raise admin.not_found(f"account {account_id!r}")
    return account_id


@page()
async def accounts(view: View) -> web.StreamResponse:
    if view.scope is not None:
        return _redirect(f"{PREFIX}/accounts/{quote(view.scope, safe='')}")
    async with view.ctx.pool.acquire() as conn:
        rows = await store.list_accounts(conn, limit=500, cursor=None)
    return view.render("accounts.html", items=[admin.account_view(r) for r in rows])


@page()
async def account(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    async with view.ctx.pool.acquire() as conn:
        row = await admin._account_or_404(conn, account_id)
        credentials = await store.list_credentials(conn, account_id)
        endpoints = await store.list_endpoints(conn, account_id)
        dead = await store.list_dead_letters(
            conn,
            account_id=account_id,
            endpoint_id=None,
            mailgate_id=None,
            replayed=None,
            limit=20,
            cursor=None,
        )
    return view.render(
        "account.html",
        account=admin.account_view(row),
        credentials=[admin.credential_view(c) for c in credentials],
        endpoints=[admin.endpoint_view(e) for e in endpoints],
        dead_letters=[admin.dead_letter_view(d) for d in dead],
    )


def _shown_once(view: View, title: str, secret: str, back: str) -> web.Response:
    return view.render("secret.html", title=title, secret=secret, back=back)


@page()
async def account_create(view: View) -> web.StreamResponse:
    body = admin.AccountIn(
        name=_form(view, "name"),
        allowed_sender_domains=_csv(_form(view, "domains")),
        tracking=_form(view, "tracking") == "on",
    )
    created = await admin.account_create(view.ctx, body)
    back = f"{PREFIX}/accounts/{quote(created['id'], safe='')}"
    return _shown_once(view, "api_token", created["api_token"], back)


@page()
async def account_toggle(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    disabled = _form(view, "disabled") == "1"
    await admin.account_patch(view.ctx, account_id, admin.AccountPatch(disabled=disabled))
    return _redirect(f"{PREFIX}/accounts/{quote(account_id, safe='')}", "Saved.")


def _optional_number(raw: str, cast: Callable[[str], Any], name: str) -> Any:
    if not raw:
        return None
    try:
        return cast(raw)
    except ValueError:
        raise admin.bad_request(f"{name} must be a number") from None


@page()
async def credential_create(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    body = admin.CredentialIn(
        name=_form(view, "name"),
        rate_per_second=_optional_number(_form(view, "rate_per_second"), float, "rate"),
        daily_limit=_optional_number(_form(view, "daily_limit"), int, "daily limit"),
        allowed_ips=_csv(_form(view, "allowed_ips")),
    )
    created = await admin.credential_create(view.ctx, account_id, body)
    back = f"{PREFIX}/accounts/{quote(account_id, safe='')}"
    return _shown_once(view, f"SMTP {created['username']}", created["password"], back)


@page()
async def credential_rotate(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    username = view.request.match_info["username"]
    rotated = await admin.credential_rotate(view.ctx, account_id, username)
    back = f"{PREFIX}/accounts/{quote(account_id, safe='')}"
    return _shown_once(view, f"SMTP {username}", rotated["password"], back)


@page()
async def credential_limits(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    username = view.request.match_info["username"]
    limits = {
        "rate_per_second": _optional_number(_form(view, "rate_per_second"), float, "rate"),
        "daily_limit": _optional_number(_form(view, "daily_limit"), int, "daily limit"),
        "allowed_ips": _csv(_form(view, "allowed_ips")),
    }
    await admin.credential_set_limits(view.ctx, account_id, username, limits)
    return _redirect(f"{PREFIX}/accounts/{quote(account_id, safe='')}", "Saved.")


@page()
async def credential_toggle(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    username = view.request.match_info["username"]
    disabled = _form(view, "disabled") == "1"
    await admin.credential_set_disabled(view.ctx, account_id, username, disabled)
    return _redirect(f"{PREFIX}/accounts/{quote(account_id, safe='')}", "Saved.")


@page()
async def webhook_add(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    async with view.ctx.pool.acquire() as conn:
        await admin._account_or_404(conn, account_id)
    row = await admin.endpoint_register(
        view.ctx, account_id, admin.WebhookIn(url=_form(view, "url"))
    )
    back = f"{PREFIX}/accounts/{quote(account_id, safe='')}"
    return _shown_once(view, f"webhook secret {row['url']}", row["secret"], back)


@page()
async def webhook_test(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    endpoint_id = view.request.match_info["endpoint_id"]
    await admin.endpoint_test_send(view.ctx, account_id, endpoint_id)
    return _redirect(
        f"{PREFIX}/accounts/{quote(account_id, safe='')}",
        "Test event queued; a failure shows up under dead letters.",
    )


@page()
async def dead_letter_replay(view: View) -> web.StreamResponse:
    dead_letter_id = view.request.match_info["dead_letter_id"]
    async with view.ctx.pool.acquire() as conn:
        row = await store.get_dead_letter(conn, dead_letter_id)
    if row is None:
        raise admin.not_found(f"dead letter {dead_letter_id!r}")
    await admin._replay(view.ctx, row)
    return _redirect(_safe_next(_form(view, "next")), "Saved.")


@page()
async def dead_letters_replay_all(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    async with view.ctx.pool.acquire() as conn:
        rows = await store.list_dead_letters(
            conn,
            account_id=account_id,
            endpoint_id=None,
            mailgate_id=None,
            replayed=False,
            limit=100,
            cursor=None,
        )
    for row in reversed(rows):
        await admin._replay(view.ctx, row)
    return _redirect(f"{PREFIX}/accounts/{quote(account_id, safe='')}", "Saved.")


# --- suppressions ----------------------------------------------------------------------------


@page()
async def suppressions(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    prefix = view.request.query.get("prefix", "").strip().lower()
    cursor = view.request.query.get("cursor") or None
    async with view.ctx.pool.acquire() as conn:
        row = await admin._account_or_404(conn, account_id)
        rows = await store.list_suppressions(
            conn, account_id, limit=PAGE_SIZE, cursor=cursor, prefix=prefix or None
        )
    next_query = None
    if len(rows) == PAGE_SIZE:
        next_query = urlencode({"prefix": prefix, "cursor": rows[-1]["email"]})
    return view.render(
        "suppressions.html",
        account=admin.account_view(row),
        items=[admin.suppression_view(r) for r in rows],
        email_prefix=prefix,
        next_query=next_query,
        reasons=admin.SUPPRESSION_REASONS,
    )


def _suppressions_url(account_id: str) -> str:
    return f"{PREFIX}/accounts/{quote(account_id, safe='')}/suppressions"


@page()
async def suppression_add(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    async with view.ctx.pool.acquire() as conn:
        await admin._account_or_404(conn, account_id)
    body = admin.SuppressionIn(email=_form(view, "email"), reason=_form(view, "reason") or "manual")
    await admin.suppression_add(view.ctx, account_id, body)
    return _redirect(_suppressions_url(account_id), "Saved.")


@page()
async def suppression_remove(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    email = admin.clean_email(_form(view, "email"))
    await admin.suppression_remove(view.ctx, account_id, email)
    return _redirect(_suppressions_url(account_id), "Saved.")


async def _file_lines(upload: Any) -> AsyncIterator[str]:
    handle = getattr(upload, "file", None)
    if handle is None:
        raise admin.bad_request("choose a CSV file to import", "invalid-csv")
    handle.seek(0)
    for raw in handle:
        yield raw.decode("utf-8", "replace").rstrip("\r\n")


@page()
async def suppressions_import(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    async with view.ctx.pool.acquire() as conn:
        await admin._account_or_404(conn, account_id)
    result = await admin.suppressions_import(
        view.ctx, account_id, _file_lines(view.form.get("file"))
    )
    notice = f"{view.t('Imported')}: {result['imported']} ({result['added']} {view.t('new')})"
    return _redirect(_suppressions_url(account_id), notice)


@page()
async def suppressions_export(view: View) -> web.StreamResponse:
    account_id = _account_id(view)
    return await admin._export_suppressions(view.request, view.ctx, account_id)


# --- postmaster, operators -------------------------------------------------------------------


@page(admin_only=True)
async def postmaster(view: View) -> web.StreamResponse:
    domain = view.request.query.get("domain", "").strip().lower() or None
    today = dt.datetime.now(dt.UTC).date()
    async with view.ctx.pool.acquire() as conn:
        domains = await store.postmaster_domains(conn)
        rows = await store.postmaster_daily(
            conn,
            domain=domain,
            msgtype="",
            date_from=today - dt.timedelta(days=30),
            date_to=None,
            limit=400,
        )
    days = [admin.postmaster_day_view(r) for r in reversed(rows)]
    return view.render("postmaster.html", domains=domains, domain=domain, days=days)


@page(admin_only=True)
async def operators(view: View) -> web.StreamResponse:
    async with view.ctx.pool.acquire() as conn:
        rows = await store.list_operators(conn)
        account_rows = await store.list_accounts(conn, limit=500, cursor=None)
    return view.render(
        "operators.html",
        items=[admin.operator_view(r) for r in rows],
        accounts=[admin.account_view(a) for a in account_rows],
    )


@page()
async def operator_create(view: View) -> web.StreamResponse:
    body = admin.OperatorIn(
        username=_form(view, "username"),
        role=_form(view, "role") or "viewer",
        account_id=_form(view, "account_id") or None,
        password=_form(view, "password") or None,
    )
    created = await admin.operator_create(view.ctx, body)
    if "password" in created:
        return _shown_once(view, created["username"], created["password"], f"{PREFIX}/operators")
    return _redirect(f"{PREFIX}/operators", "Saved.")


@page()
async def operator_toggle(view: View) -> web.StreamResponse:
    operator_id = view.request.match_info["operator_id"]
    disabled = _form(view, "disabled") == "1"
    await admin.operator_patch(view.ctx, operator_id, admin.OperatorPatch(disabled=disabled))
    return _redirect(f"{PREFIX}/operators", "Saved.")


# --- wiring ----------------------------------------------------------------------------------


async def _root(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(PREFIX + "/")


def add_console(app: web.Application, ctx: AdminContext, config: ConsoleConfig) -> None:
    """Mount the console on the admin application (``/console/``)."""
    console = Console(
        ctx=ctx,
        config=config,
        env=make_environment(),
        throttle=auth.LoginThrottle(
            max_failures_per_user=config.max_failures_per_user,
            max_failures_per_ip=config.max_failures_per_ip,
            window_s=config.failure_window_s,
            clock=time.monotonic,
        ),
    )
    app[CONSOLE] = console
    r = app.router
    p = PREFIX
    r.add_get(p, _root)
    r.add_get(f"{p}/", overview)
    r.add_get(f"{p}/login", login_page)
    r.add_post(f"{p}/login", login)
    r.add_post(f"{p}/logout", logout)
    r.add_get(f"{p}/lang", set_language)
    r.add_get(f"{p}/messages", messages)
    r.add_get(f"{p}/messages/{{mailgate_id}}", message)
    r.add_get(f"{p}/campaigns", campaigns)
    r.add_get(f"{p}/campaigns/{{campaign_id}}", campaign)
    r.add_post(f"{p}/campaigns/{{campaign_id}}/stop", campaign_stop)
    r.add_post(f"{p}/campaigns/{{campaign_id}}/resume", campaign_resume)
    r.add_get(f"{p}/accounts", accounts)
    r.add_post(f"{p}/accounts", account_create)
    r.add_get(f"{p}/accounts/{{account_id}}", account)
    r.add_post(f"{p}/accounts/{{account_id}}/toggle", account_toggle)
    r.add_post(f"{p}/accounts/{{account_id}}/credentials", credential_create)
    r.add_post(f"{p}/accounts/{{account_id}}/credentials/{{username}}/rotate", credential_rotate)
    r.add_post(f"{p}/accounts/{{account_id}}/credentials/{{username}}/toggle", credential_toggle)
    r.add_post(f"{p}/accounts/{{account_id}}/credentials/{{username}}/limits", credential_limits)
    r.add_post(f"{p}/accounts/{{account_id}}/webhooks", webhook_add)
    r.add_post(f"{p}/accounts/{{account_id}}/webhooks/{{endpoint_id}}/test", webhook_test)
    r.add_post(f"{p}/accounts/{{account_id}}/dead-letters/replay", dead_letters_replay_all)
    r.add_post(f"{p}/dead-letters/{{dead_letter_id}}/replay", dead_letter_replay)
    r.add_get(f"{p}/accounts/{{account_id}}/suppressions", suppressions)
    r.add_get(f"{p}/accounts/{{account_id}}/suppressions.csv", suppressions_export)
    r.add_post(f"{p}/accounts/{{account_id}}/suppressions", suppression_add)
    r.add_post(f"{p}/accounts/{{account_id}}/suppressions/remove", suppression_remove)
    r.add_post(f"{p}/accounts/{{account_id}}/suppressions/import", suppressions_import)
    r.add_get(f"{p}/postmaster", postmaster)
    r.add_get(f"{p}/operators", operators)
    r.add_post(f"{p}/operators", operator_create)
    r.add_post(f"{p}/operators/{{operator_id}}/toggle", operator_toggle)
    r.add_static(f"{p}/static", _static_dir(), append_version=False)


def _static_dir() -> str:
    import importlib.resources

    return str(importlib.resources.files("mailgate_ledger") / "console" / "static")
