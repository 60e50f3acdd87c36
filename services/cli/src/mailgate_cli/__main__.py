"""``mailgate``: the operators' command line for the ledger admin API.

    mailgate accounts create NAME --sender-domain example.com [--postal-api-key K] [--no-tracking]
    mailgate accounts list
    mailgate credentials create ACCOUNT_ID NAME [--rate-per-second N] [--daily-limit N]
                                [--allow-ip IP]
    mailgate messages get MAILGATE_ID
    mailgate messages find [--external-id X] [--email E] [--campaign-id C] [--postal-id N]
    mailgate suppressions list|add|remove ACCOUNT_ID [EMAIL] [--reason R]
    mailgate campaigns stats CAMPAIGN_ID
    mailgate webhook set|get|delete URL --account-token TOKEN

Reads MAILGATE_ADMIN_URL (default http://127.0.0.1:8080) and ADMIN_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .client import AdminClient, AdminError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailgate", description="mailgate admin command line")
    p.add_argument("--url", default=os.environ.get("MAILGATE_ADMIN_URL", "http://127.0.0.1:8080"))
    sub = p.add_subparsers(dest="group", required=True)

    accounts = sub.add_parser("accounts").add_subparsers(dest="action", required=True)
    create = accounts.add_parser("create")
    create.add_argument("name")
    create.add_argument("--sender-domain", action="append", default=[])
    create.add_argument("--postal-api-key")
    create.add_argument("--no-tracking", action="store_true")
    accounts.add_parser("list")

    creds = sub.add_parser("credentials").add_subparsers(dest="action", required=True)
    ccreate = creds.add_parser("create")
    ccreate.add_argument("account_id")
    ccreate.add_argument("name")
    ccreate.add_argument("--rate-per-second", type=float)
    ccreate.add_argument("--daily-limit", type=int)
    ccreate.add_argument("--allow-ip", action="append", default=None)

    messages = sub.add_parser("messages").add_subparsers(dest="action", required=True)
    mget = messages.add_parser("get")
    mget.add_argument("mailgate_id")
    find = messages.add_parser("find")
    find.add_argument("--external-id")
    find.add_argument("--email")
    find.add_argument("--campaign-id")
    find.add_argument("--postal-id")
    find.add_argument("--limit", type=int)

    supp = sub.add_parser("suppressions").add_subparsers(dest="action", required=True)
    slist = supp.add_parser("list")
    slist.add_argument("account_id")
    for action in ("add", "remove"):
        sp = supp.add_parser(action)
        sp.add_argument("account_id")
        sp.add_argument("email")
        if action == "add":
            sp.add_argument("--reason", default="manual")

    camp = sub.add_parser("campaigns").add_subparsers(dest="action", required=True)
    stats = camp.add_parser("stats")
    stats.add_argument("campaign_id")

    hook = sub.add_parser("webhook").add_subparsers(dest="action", required=True)
    for action in ("set", "get", "delete"):
        hp = hook.add_parser(action)
        if action != "get":
            hp.add_argument("url")
        hp.add_argument("--account-token", required=True)
        if action == "set":
            hp.add_argument("--event", action="append", default=None)
    return p


def run(args: argparse.Namespace, client: AdminClient) -> Any:
    g, a = args.group, args.action
    if g == "accounts" and a == "create":
        body: dict[str, Any] = {
            "name": args.name,
            "allowed_sender_domains": args.sender_domain,
            "tracking": not args.no_tracking,
        }
        if args.postal_api_key:
            body["postal_api_key"] = args.postal_api_key
        return client.request("POST", "/v1/accounts", body)
    if g == "accounts":
        return client.request("GET", "/v1/accounts")
    if g == "credentials":
        body = {"name": args.name}
        for key in ("rate_per_second", "daily_limit"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        if args.allow_ip:
            body["allowed_ips"] = args.allow_ip
        return client.request("POST", f"/v1/accounts/{args.account_id}/credentials", body)
    if g == "messages" and a == "get":
        return client.request("GET", f"/v1/messages/{args.mailgate_id}")
    if g == "messages":
        query = {
            "external_id": args.external_id,
            "email": args.email,
            "campaign_id": args.campaign_id,
            "postal_id": args.postal_id,
            "limit": args.limit,
        }
        return client.request("GET", "/v1/messages", query=query)
    if g == "suppressions":
        path = f"/v1/accounts/{args.account_id}/suppressions"
        if a == "list":
            return client.request("GET", path)
        if a == "add":
            return client.request("POST", path, {"email": args.email, "reason": args.reason})
        return client.request("DELETE", path, {"email": args.email})
    if g == "campaigns":
        return client.request("GET", f"/v1/campaigns/{args.campaign_id}/stats")
    token = args.account_token
    if a == "set":
        body = {"url": args.url}
        if args.event:
            body["events"] = args.event
        return client.request("POST", "/v1/email/webhook", body, token=token)
    if a == "get":
        return client.request("GET", "/v1/email/webhook", token=token)
    return client.request("DELETE", "/v1/email/webhook", {"url": args.url}, token=token)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    token = os.environ.get("ADMIN_TOKEN", "")
    client = AdminClient(args.url, token)
    try:
        result = run(args, client)
    except AdminError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mailgate: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
