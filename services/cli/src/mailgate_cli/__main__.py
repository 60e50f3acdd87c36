"""``mailgate``: the operators' command line for the ledger admin API.

    mailgate accounts create NAME [--sender-domain D]... [--postal-api-key K] [--no-tracking]
    mailgate accounts list|get|enable|disable|rotate-token [ACCOUNT_ID]
    mailgate credentials create ACCOUNT_ID NAME [--username U] [--rate-per-second N]
                                [--daily-limit N] [--allow-ip IP]...
    mailgate credentials list ACCOUNT_ID
    mailgate credentials rotate|disable|enable ACCOUNT_ID USERNAME
    mailgate suppressions list ACCOUNT_ID [--limit N] [--cursor C]
    mailgate suppressions add ACCOUNT_ID EMAIL [--reason R]
    mailgate suppressions remove ACCOUNT_ID EMAIL
    mailgate suppressions import ACCOUNT_ID FILE.csv|-      (email[,reason] rows, streamed)
    mailgate suppressions export ACCOUNT_ID [-o FILE.csv]   (streamed; stdout by default)
    mailgate messages find [--id ANY] [--external-id X] [--email E] [--campaign-id C]
                           [--postal-id N] [--account-id A] [--status S] [--since T]
                           [--until T] [--limit N] [--cursor C]
    mailgate messages get|timeline MAILGATE_ID
    mailgate campaigns stats|autostops CAMPAIGN_ID
    mailgate campaigns stop|resume CAMPAIGN_ID [--requested-by NAME]   (AMS, via ams-reporter)
    mailgate operators create USERNAME [--role admin|viewer] [--account-id A] [--password-stdin]
    mailgate operators list | disable|enable OPERATOR_ID | set-password OPERATOR_ID
    mailgate webhook set URL [--event E]... | get | delete URL   --account-token TOKEN
    mailgate dead-letters list [--account-id A] [--endpoint-id E] [--state S] [--limit N]
    mailgate dead-letters get|replay DEAD_LETTER_ID...
    mailgate dead-letters replay-all (--account-id A | --endpoint-id E) [--limit N]
    mailgate health

Reads MAILGATE_ADMIN_URL (default http://127.0.0.1:8080) and ADMIN_TOKEN (or --url, --token).
Answers are printed as JSON; errors go to stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any
from urllib.parse import quote

from .client import AdminClient, AdminError

IMPORT_TIMEOUT_S = 3600.0


def _accounts(sub: Any) -> None:
    accounts = sub.add_parser("accounts", help="customer accounts").add_subparsers(
        dest="action", required=True
    )
    create = accounts.add_parser("create", help="create an account (prints its api_token once)")
    create.add_argument("name")
    create.add_argument("--sender-domain", action="append", default=[])
    create.add_argument("--postal-api-key")
    create.add_argument("--no-tracking", action="store_true")
    listing = accounts.add_parser("list")
    listing.add_argument("--limit", type=int)
    listing.add_argument("--cursor")
    for action in ("get", "enable", "disable", "rotate-token"):
        accounts.add_parser(action).add_argument("account_id")


def _credentials(sub: Any) -> None:
    creds = sub.add_parser("credentials", help="SMTP credentials").add_subparsers(
        dest="action", required=True
    )
    create = creds.add_parser("create", help="create one (prints its password once)")
    create.add_argument("account_id")
    create.add_argument("name")
    create.add_argument("--username")
    create.add_argument("--rate-per-second", type=float)
    create.add_argument("--daily-limit", type=int)
    create.add_argument("--allow-ip", action="append", default=None)
    creds.add_parser("list").add_argument("account_id")
    for action in ("rotate", "disable", "enable"):
        one = creds.add_parser(action, help="rotate prints the new password once")
        one.add_argument("account_id")
        one.add_argument("username")


def _suppressions(sub: Any) -> None:
    supp = sub.add_parser("suppressions", help="suppressed recipients").add_subparsers(
        dest="action", required=True
    )
    listing = supp.add_parser("list")
    listing.add_argument("account_id")
    listing.add_argument("--limit", type=int)
    listing.add_argument("--cursor")
    add = supp.add_parser("add")
    add.add_argument("account_id")
    add.add_argument("email")
    add.add_argument("--reason", default="manual")
    remove = supp.add_parser("remove")
    remove.add_argument("account_id")
    remove.add_argument("email")
    imp = supp.add_parser("import", help="import a CSV of email[,reason] rows ('-' = stdin)")
    imp.add_argument("account_id")
    imp.add_argument("file")
    exp = supp.add_parser("export", help="write every suppression as CSV")
    exp.add_argument("account_id")
    exp.add_argument("-o", "--output", default="-")


def _messages(sub: Any) -> None:
    messages = sub.add_parser("messages", help="message history").add_subparsers(
        dest="action", required=True
    )
    for action in ("get", "timeline"):
        messages.add_parser(action).add_argument("mailgate_id")
    find = messages.add_parser("find", help="newest first; --cursor continues a page")
    find.add_argument("--id", dest="any_id", help="any id: mailgate, external, Postal id/token")
    for option in ("external-id", "email", "campaign-id", "postal-id", "account-id", "status"):
        find.add_argument(f"--{option}")
    find.add_argument("--since", help="ISO 8601 time or unix seconds")
    find.add_argument("--until", help="ISO 8601 time or unix seconds")
    find.add_argument("--limit", type=int)
    find.add_argument("--cursor")


def _others(sub: Any) -> None:
    camp = sub.add_parser("campaigns", help="campaign statistics").add_subparsers(
        dest="action", required=True
    )
    for action in ("stats", "autostops"):
        camp.add_parser(action).add_argument("campaign_id")
    for action in ("stop", "resume"):
        control = camp.add_parser(action, help=f"{action} the AMS mailing (through ams-reporter)")
        control.add_argument("campaign_id")
        control.add_argument("--requested-by", default=os.environ.get("USER", ""))

    ops = sub.add_parser("operators", help="operator console sign-ins").add_subparsers(
        dest="action", required=True
    )
    create = ops.add_parser(
        "create", help="create one (prints a generated password once unless --password-stdin)"
    )
    create.add_argument("username")
    create.add_argument("--role", choices=("admin", "viewer"), default="admin")
    create.add_argument("--account-id", help="the account a viewer may see (viewers only)")
    create.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    ops.add_parser("list")
    for action in ("disable", "enable"):
        ops.add_parser(action).add_argument("operator_id")
    setpw = ops.add_parser("set-password", help="read a new password from stdin")
    setpw.add_argument("operator_id")

    hook = sub.add_parser("webhook", help="an account's webhook (account token)").add_subparsers(
        dest="action", required=True
    )
    for action in ("set", "get", "delete"):
        hp = hook.add_parser(action)
        if action != "get":
            hp.add_argument("webhook_url", metavar="URL")  # not "url": that is --url
        hp.add_argument("--account-token", required=True)
        if action == "set":
            hp.add_argument("--event", action="append", default=None)
            hp.add_argument("--batch", action="store_true")
            hp.add_argument("--legacy-complained-spelling", action="store_true")

    dead = sub.add_parser("dead-letters", help="undeliverable webhooks").add_subparsers(
        dest="action", required=True
    )
    listing = dead.add_parser("list")
    for option in ("account-id", "endpoint-id", "mailgate-id"):
        listing.add_argument(f"--{option}")
    listing.add_argument("--state", choices=("all", "pending", "replayed"), default="pending")
    listing.add_argument("--limit", type=int)
    listing.add_argument("--cursor")
    for action in ("get", "replay"):
        dead.add_parser(action).add_argument("ids", nargs="+", metavar="DEAD_LETTER_ID")
    replay_all = dead.add_parser("replay-all", help="replay an account's or endpoint's")
    replay_all.add_argument("--account-id")
    replay_all.add_argument("--endpoint-id")
    replay_all.add_argument("--limit", type=int, default=100)
    replay_all.add_argument("--include-replayed", action="store_true")

    sub.add_parser("health", help="readiness, backlogs and partitions")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailgate",
        description="mailgate operators' command line (ledger admin API)",
        epilog="Environment: MAILGATE_ADMIN_URL, ADMIN_TOKEN.",
    )
    p.add_argument("--url", default=os.environ.get("MAILGATE_ADMIN_URL", "http://127.0.0.1:8080"))
    p.add_argument("--token", default=None, help="admin token (default: $ADMIN_TOKEN)")
    sub = p.add_subparsers(dest="group", required=True)
    _accounts(sub)
    _credentials(sub)
    _suppressions(sub)
    _messages(sub)
    _others(sub)
    return p


def _seg(value: str) -> str:
    """One path segment, escaped."""
    return quote(value, safe="")


@contextlib.contextmanager
def _opened(name: str, mode: str, std: IO[bytes]) -> Iterator[IO[bytes]]:
    if name == "-":
        yield std
        return
    with open(name, mode) as handle:
        yield handle


def _run_accounts(args: argparse.Namespace, client: AdminClient) -> Any:
    a = args.action
    if a == "create":
        body: dict[str, Any] = {
            "name": args.name,
            "allowed_sender_domains": args.sender_domain,
            "tracking": not args.no_tracking,
        }
        if args.postal_api_key:
            body["postal_api_key"] = args.postal_api_key
        return client.request("POST", "/v1/accounts", body)
    if a == "list":
        return client.request(
            "GET", "/v1/accounts", query={"limit": args.limit, "cursor": args.cursor}
        )
    path = f"/v1/accounts/{_seg(args.account_id)}"
    if a == "get":
        return client.request("GET", path)
    if a == "rotate-token":
        return client.request("POST", f"{path}/api-token")
    return client.request("PATCH", path, {"disabled": a == "disable"})


def _run_credentials(args: argparse.Namespace, client: AdminClient) -> Any:
    base = f"/v1/accounts/{_seg(args.account_id)}/credentials"
    a = args.action
    if a == "create":
        body: dict[str, Any] = {"name": args.name}
        for key in ("username", "rate_per_second", "daily_limit"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        if args.allow_ip:
            body["allowed_ips"] = args.allow_ip
        return client.request("POST", base, body)
    if a == "list":
        return client.request("GET", base)
    path = f"{base}/{_seg(args.username)}"
    if a == "rotate":
        return client.request("POST", f"{path}/password")
    return client.request("PATCH", path, {"disabled": a == "disable"})


def _run_suppressions(
    args: argparse.Namespace, client: AdminClient, stdin: IO[bytes], stdout: IO[bytes]
) -> Any:
    path = f"/v1/accounts/{_seg(args.account_id)}/suppressions"
    a = args.action
    if a == "list":
        return client.request("GET", path, query={"limit": args.limit, "cursor": args.cursor})
    if a == "add":
        return client.request("POST", path, {"email": args.email, "reason": args.reason})
    if a == "remove":
        return client.request("DELETE", path, {"email": args.email})
    if a == "import":
        with _opened(args.file, "rb", stdin) as source:
            return client.upload(path, source, "text/csv", IMPORT_TIMEOUT_S)
    with _opened(args.output, "wb", stdout) as sink:
        written = client.download(path, {"format": "csv"}, sink, "text/csv")
    return None if args.output == "-" else {"file": args.output, "bytes": written}


def _run_messages(args: argparse.Namespace, client: AdminClient) -> Any:
    if args.action in ("get", "timeline"):
        path = f"/v1/messages/{_seg(args.mailgate_id)}"
        return client.request("GET", path + ("/timeline" if args.action == "timeline" else ""))
    query = {
        "id": args.any_id,
        "external_id": args.external_id,
        "email": args.email,
        "campaign_id": args.campaign_id,
        "postal_id": args.postal_id,
        "account_id": args.account_id,
        "status": args.status,
        "since": args.since,
        "until": args.until,
        "limit": args.limit,
        "cursor": args.cursor,
    }
    return client.request("GET", "/v1/messages", query=query)


def _run_webhook(args: argparse.Namespace, client: AdminClient) -> Any:
    token = args.account_token
    if args.action == "set":
        body: dict[str, Any] = {"url": args.webhook_url}
        if args.event:
            body["events"] = args.event
        if args.batch:
            body["batch"] = True
        if args.legacy_complained_spelling:
            body["legacy_complained_spelling"] = True
        return client.request("POST", "/v1/email/webhook", body, token=token)
    if args.action == "get":
        return client.request("GET", "/v1/email/webhook", token=token)
    return client.request("DELETE", "/v1/email/webhook", {"url": args.webhook_url}, token=token)


def _run_dead_letters(args: argparse.Namespace, client: AdminClient) -> Any:
    a = args.action
    if a == "list":
        query = {
            "account_id": args.account_id,
            "endpoint_id": args.endpoint_id,
            "mailgate_id": args.mailgate_id,
            "state": args.state,
            "limit": args.limit,
            "cursor": args.cursor,
        }
        return client.request("GET", "/v1/dead-letters", query=query)
    if a == "replay-all":
        body = {
            "account_id": args.account_id,
            "endpoint_id": args.endpoint_id,
            "limit": args.limit,
            "include_replayed": args.include_replayed,
        }
        return client.request("POST", "/v1/dead-letters/replay", body)
    method, suffix = ("GET", "") if a == "get" else ("POST", "/replay")
    results = [client.request(method, f"/v1/dead-letters/{_seg(i)}{suffix}") for i in args.ids]
    return results[0] if len(results) == 1 else results


def run(
    args: argparse.Namespace,
    client: AdminClient,
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
) -> Any:
    """Perform the command; return what to print (``None``: nothing, output already written)."""
    handlers: dict[str, Callable[[], Any]] = {
        "accounts": lambda: _run_accounts(args, client),
        "credentials": lambda: _run_credentials(args, client),
        "suppressions": lambda: _run_suppressions(
            args, client, stdin or sys.stdin.buffer, stdout or sys.stdout.buffer
        ),
        "messages": lambda: _run_messages(args, client),
        "campaigns": lambda: _run_campaigns(args, client),
        "operators": lambda: _run_operators(args, client, stdin or sys.stdin.buffer),
        "webhook": lambda: _run_webhook(args, client),
        "dead-letters": lambda: _run_dead_letters(args, client),
        "health": lambda: _health(client),
    }
    return handlers[args.group]()


def _run_campaigns(args: argparse.Namespace, client: AdminClient) -> Any:
    path = f"/v1/campaigns/{_seg(args.campaign_id)}"
    if args.action in ("stats", "autostops"):
        return client.request("GET", f"{path}/{args.action}")
    return client.request("POST", f"{path}/{args.action}", {"requested_by": args.requested_by})


def _read_password(stdin: IO[bytes]) -> str:
    return stdin.readline().decode("utf-8").rstrip("\r\n")


def _run_operators(args: argparse.Namespace, client: AdminClient, stdin: IO[bytes]) -> Any:
    a = args.action
    if a == "create":
        body: dict[str, Any] = {"username": args.username, "role": args.role}
        if args.account_id:
            body["account_id"] = args.account_id
        if args.password_stdin:
            body["password"] = _read_password(stdin)
        return client.request("POST", "/v1/operators", body)
    if a == "list":
        return client.request("GET", "/v1/operators")
    path = f"/v1/operators/{_seg(args.operator_id)}"
    if a == "set-password":
        return client.request("PATCH", path, {"password": _read_password(stdin)})
    return client.request("PATCH", path, {"disabled": a == "disable"})


def _health(client: AdminClient) -> Any:
    try:
        return client.request("GET", "/v1/health")
    except AdminError as exc:  # 503 still carries the report
        if exc.status == 503 and "failing" in exc.problem:
            return exc.problem
        raise


def main(
    argv: list[str] | None = None,
    *,
    stdin: IO[bytes] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = build_parser().parse_args(argv)
    token = args.token or os.environ.get("ADMIN_TOKEN", "")
    client = AdminClient(args.url, token)
    binary_out = getattr(out, "buffer", None)
    try:
        result = run(args, client, stdin=stdin, stdout=binary_out)
    except AdminError as exc:
        print(f"mailgate: {exc}", file=err)
        return 1
    except OSError as exc:
        print(f"mailgate: cannot reach {args.url}: {exc}", file=err)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, ensure_ascii=False), file=out)
    if args.group == "health" and isinstance(result, dict) and result.get("status") != "ok":
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
