"""The admin API's OpenAPI 3.1 document (hand-written; served at ``GET /v1/openapi.json``).

``python -m mailgate_ledger.openapi docs/openapi.json`` (``make openapi``) writes the checked-in
copy; a test keeps the two equal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mailgate_core.schemas import STATUS_NAMES

from .status import STATUS_RANK


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_PROBLEM = {"$ref": "#/components/responses/Problem"}
_ERRORS = {"400": _PROBLEM, "401": _PROBLEM, "404": _PROBLEM, "503": _PROBLEM}


def _path(name: str) -> dict[str, Any]:
    """A required string path parameter."""
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_ACCOUNT_ID = _path("account_id")
_PAGING = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
]


# The ams-reporter control routes (resume, stop): same parameters, body and answers.
_CAMPAIGN_CONTROL: dict[str, Any] = {
    "parameters": [_path("campaign_id")],
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": _ref("ResumeRequest")}},
    },
    "responses": {
        "200": _json(_ref("AutoStopMarker")),
        **_ERRORS,
        "409": _PROBLEM,
        "502": _PROBLEM,
    },
}


def _page(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": _ref(item)},
            "next_cursor": {"type": ["string", "null"]},
        },
    }


def openapi_document() -> dict[str, Any]:
    string = {"type": "string"}
    nullable_string = {"type": ["string", "null"]}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mailgate ledger admin API",
            "version": "1",
            "description": (
                "Accounts, SMTP credentials, message history, suppressions and campaign "
                "statistics (bearer ADMIN_TOKEN), and customer webhook registration under "
                "/v1/email/webhook (bearer = the account's api_token). Errors are RFC 9457 "
                "application/problem+json."
            ),
        },
        "security": [{"adminToken": []}],
        "paths": {
            "/v1/accounts": {
                "post": {
                    "summary": "Create an account; the api_token is shown once",
                    "requestBody": _body(_ref("AccountIn")),
                    "responses": {"201": _json(_ref("AccountCreated"), "Created"), **_ERRORS},
                },
                "get": {
                    "summary": "List accounts",
                    "parameters": _PAGING,
                    "responses": {"200": _json(_page("Account")), **_ERRORS},
                },
            },
            "/v1/accounts/{account_id}": {
                "parameters": [_ACCOUNT_ID],
                "get": {
                    "summary": "One account",
                    "responses": {"200": _json(_ref("Account")), **_ERRORS},
                },
                "patch": {
                    "summary": "Change name, domains, Postal key, tracking or disabled",
                    "requestBody": _body(_ref("AccountPatch")),
                    "responses": {"200": _json(_ref("Account")), **_ERRORS},
                },
            },
            "/v1/accounts/{account_id}/api-token": {
                "parameters": [_ACCOUNT_ID],
                "post": {
                    "summary": "Replace the account's api_token (shown once)",
                    "responses": {"200": _json(_ref("AccountCreated")), **_ERRORS},
                },
            },
            "/v1/accounts/{account_id}/credentials": {
                "parameters": [_ACCOUNT_ID],
                "post": {
                    "summary": "Create an SMTP credential; the password is shown once",
                    "requestBody": _body(_ref("CredentialIn")),
                    "responses": {
                        "201": _json(_ref("CredentialCreated"), "Created"),
                        "409": _PROBLEM,
                        **_ERRORS,
                    },
                },
                "get": {
                    "summary": "List the account's credentials",
                    "responses": {"200": _json(_page("Credential")), **_ERRORS},
                },
            },
            "/v1/accounts/{account_id}/credentials/{username}": {
                "parameters": [
                    _ACCOUNT_ID,
                    _path("username"),
                ],
                "patch": {
                    "summary": "Enable or disable a credential, or change its limits (null "
                    "removes a limit; an absent field is left as it is)",
                    "requestBody": _body(
                        {
                            "type": "object",
                            "properties": {
                                "disabled": {"type": "boolean"},
                                "rate_per_second": {"type": ["number", "null"]},
                                "daily_limit": {"type": ["integer", "null"]},
                                "allowed_ips": {"type": "array", "items": string},
                            },
                        }
                    ),
                    "responses": {"200": _json(_ref("Credential")), **_ERRORS},
                },
                "get": {
                    "summary": "One credential",
                    "responses": {"200": _json(_ref("Credential")), **_ERRORS},
                },
                "delete": {
                    "summary": "Disable a credential",
                    "responses": {"200": _json(_ref("Credential")), **_ERRORS},
                },
            },
            "/v1/accounts/{account_id}/credentials/{username}/password": {
                "parameters": [
                    _ACCOUNT_ID,
                    _path("username"),
                ],
                "post": {
                    "summary": "Rotate the password: a new one is generated and shown once",
                    "responses": {"200": _json(_ref("CredentialCreated")), **_ERRORS},
                },
            },
            "/v1/accounts/{account_id}/suppressions": {
                "parameters": [_ACCOUNT_ID],
                "get": {
                    "summary": "List suppressed recipients; format=csv (or Accept: text/csv) "
                    "streams every row as CSV (email,reason,created_at)",
                    "parameters": [
                        *_PAGING,
                        {"name": "format", "in": "query", "schema": {"enum": ["json", "csv"]}},
                        {
                            "name": "prefix",
                            "in": "query",
                            "description": "only addresses starting with this",
                            "schema": string,
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {
                                "application/json": {"schema": _page("Suppression")},
                                "text/csv": {"schema": string},
                            },
                        },
                        **_ERRORS,
                    },
                },
                "post": {
                    "summary": "Suppress a recipient, or stream a CSV import (email[,reason] "
                    "rows, optional header; refused whole on any bad line). Postgres is "
                    'written before the answer; the KV cache follows ("kv": "syncing")',
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": _ref("SuppressionIn")},
                            "text/csv": {"schema": string},
                        },
                    },
                    "responses": {
                        "201": _json(_ref("Suppression"), "Created"),
                        "200": _json(
                            {"oneOf": [_ref("Suppression"), _ref("SuppressionImport")]},
                            "Updated, or CSV imported",
                        ),
                        **_ERRORS,
                    },
                },
                "delete": {
                    "summary": 'Remove a suppression ({"email"} body or ?email=)',
                    "requestBody": _body(
                        {"type": "object", "required": ["email"], "properties": {"email": string}}
                    ),
                    "responses": {"200": _json({"type": "object"}), **_ERRORS},
                },
            },
            "/v1/accounts/{account_id}/webhooks": {
                "parameters": [_ACCOUNT_ID],
                "get": {
                    "summary": "The account's webhook endpoints (secrets hidden)",
                    "responses": {"200": _json(_page("Webhook")), **_ERRORS},
                },
                "post": {
                    "summary": "Register (or re-enable) a webhook endpoint for the account, as "
                    "POST /v1/email/webhook does with the account's token",
                    "requestBody": _body(_ref("WebhookIn")),
                    "responses": {
                        "201": _json(_ref("WebhookCreated"), "Created"),
                        "200": _json(_ref("WebhookCreated"), "Updated"),
                        **_ERRORS,
                    },
                },
            },
            "/v1/accounts/{account_id}/webhooks/{endpoint_id}/test": {
                "parameters": [
                    _ACCOUNT_ID,
                    _path("endpoint_id"),
                ],
                "post": {
                    "summary": "Send a test event (delivered, data.test = true) to this "
                    "endpoint only, through ams-reporter; a failure ends in the dead letters",
                    "responses": {
                        "202": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "event_id": string,
                                    "queued": {"type": "boolean"},
                                },
                            },
                            "Queued",
                        ),
                        **_ERRORS,
                    },
                },
            },
            "/v1/messages": {
                "get": {
                    "summary": "Find messages, newest first (keyset pages: pass next_cursor "
                    "back as cursor); filters combine",
                    "parameters": [
                        {
                            "name": "id",
                            "in": "query",
                            "description": "Any id: mailgate id, external id, Postal id or "
                            "Postal token",
                            "schema": string,
                        },
                        *(
                            {"name": n, "in": "query", "schema": string}
                            for n in ("external_id", "email", "campaign_id", "account_id")
                        ),
                        {"name": "postal_id", "in": "query", "schema": {"type": "integer"}},
                        {"name": "status", "in": "query", "schema": {"enum": list(STATUS_RANK)}},
                        *(
                            {
                                "name": n,
                                "in": "query",
                                "description": f"Accepted {word} this time (ISO 8601 or unix "
                                "seconds)",
                                "schema": string,
                            }
                            for n, word in (("since", "at or after"), ("until", "before"))
                        ),
                        *_PAGING,
                    ],
                    "responses": {"200": _json(_page("Message")), **_ERRORS},
                }
            },
            "/v1/messages/{mailgate_id}": {
                "get": {
                    "summary": "A message with its ids, status and event history",
                    "parameters": [_path("mailgate_id")],
                    "responses": {"200": _json(_ref("MessageDetail")), **_ERRORS},
                }
            },
            "/v1/messages/{mailgate_id}/timeline": {
                "get": {
                    "summary": "What happened to a message, in order: each fact, the customer "
                    "event it produced, and dead-lettered webhook deliveries",
                    "parameters": [_path("mailgate_id")],
                    "responses": {"200": _json(_ref("Timeline")), **_ERRORS},
                }
            },
            "/v1/campaigns/{campaign_id}/stats": {
                "get": {
                    "summary": "Counts per status and per event (opens and clicks split into "
                    "human, machine and unknown audiences), and rates",
                    "parameters": [
                        _path("campaign_id"),
                        {
                            "name": "account_id",
                            "in": "query",
                            "description": "count only this account's messages",
                            "schema": string,
                        },
                    ],
                    "responses": {"200": _json(_ref("CampaignStats")), **_ERRORS},
                }
            },
            "/v1/campaigns/{campaign_id}/autostops": {
                "get": {
                    "summary": "The campaign's automatic stops and resumes, as ams-reporter "
                    "published them (stats.campaign.autostopped/resumed), newest first",
                    "parameters": [
                        _path("campaign_id"),
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "items": {"type": "array", "items": _ref("AutoStopEvent")}
                                },
                            }
                        ),
                        **_ERRORS,
                    },
                }
            },
            "/v1/campaigns/{campaign_id}/resume": {
                "post": {
                    "summary": "Resume an automatically stopped campaign (ams-reporter calls "
                    "AMS startMailing and re-arms the auto-stop); answers with its marker. "
                    "Errors of ams-reporter are passed on (404 not stopped automatically, "
                    "409 stop in progress, 502 AMS refused); 503 when ams-reporter is "
                    "unavailable",
                    **_CAMPAIGN_CONTROL,
                }
            },
            "/v1/campaigns/{campaign_id}/stop": {
                "post": {
                    "summary": "Stop the campaign's AMS mailing: ams-reporter calls AMS "
                    "stopMailing with its AMS client (ams.control.stop) and marks the campaign "
                    "stopped (reason manual; resume starts it again). Errors of ams-reporter "
                    "are passed on (409 an automatic stop is in progress, 502 AMS refused); "
                    "503 when ams-reporter is unavailable",
                    **_CAMPAIGN_CONTROL,
                }
            },
            "/v1/campaigns": {
                "get": {
                    "summary": "Campaigns with messages since `since` (default: the last 7 "
                    "days), most recently active first",
                    "parameters": [
                        {"name": "since", "in": "query", "schema": string},
                        {"name": "account_id", "in": "query", "schema": string},
                        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "items": {"type": "array", "items": _ref("CampaignSummary")}
                                },
                            }
                        ),
                        **_ERRORS,
                    },
                }
            },
            "/v1/overview": {
                "get": {
                    "summary": "Messages accepted since `since` (default: today, UTC) by "
                    "status, customer events recorded since then with their rates (opens and "
                    "clicks by audience), and the pipeline's consumers (backlog, lag)",
                    "parameters": [
                        {"name": "since", "in": "query", "schema": string},
                        {"name": "account_id", "in": "query", "schema": string},
                    ],
                    "responses": {"200": _json({"type": "object"}), **_ERRORS},
                }
            },
            "/v1/operators": {
                "get": {
                    "summary": "Operator console sign-ins",
                    "responses": {"200": _json(_page("Operator")), **_ERRORS},
                },
                "post": {
                    "summary": "Create an operator (admin, or viewer bound to account_id); "
                    "without a password one is generated and returned once",
                    "requestBody": _body(_ref("OperatorIn")),
                    "responses": {
                        "201": _json(_ref("Operator"), "Created"),
                        **_ERRORS,
                        "409": _PROBLEM,
                    },
                },
            },
            "/v1/operators/{operator_id}": {
                "patch": {
                    "summary": "Disable/enable an operator or set its password (either ends "
                    "its console sessions)",
                    "parameters": [_path("operator_id")],
                    "requestBody": _body(
                        {
                            "type": "object",
                            "properties": {
                                "disabled": {"type": "boolean"},
                                "password": {"type": "string", "minLength": 10},
                            },
                        }
                    ),
                    "responses": {"200": _json(_ref("Operator")), **_ERRORS},
                }
            },
            "/v1/dead-letters": {
                "get": {
                    "summary": "Webhook deliveries ams-reporter gave up on, newest first",
                    "parameters": [
                        *(
                            {"name": n, "in": "query", "schema": string}
                            for n in ("account_id", "endpoint_id", "mailgate_id")
                        ),
                        {
                            "name": "state",
                            "in": "query",
                            "schema": {"enum": ["all", "pending", "replayed"], "default": "all"},
                        },
                        *_PAGING,
                    ],
                    "responses": {"200": _json(_page("DeadLetter")), **_ERRORS},
                }
            },
            "/v1/dead-letters/replay": {
                "post": {
                    "summary": "Replay the dead letters of an account or an endpoint (those "
                    "not replayed yet, oldest first, up to limit)",
                    "requestBody": _body(_ref("ReplayFilter")),
                    "responses": {
                        "202": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "replayed": {"type": "integer"},
                                    "items": {"type": "array", "items": _ref("DeadLetter")},
                                },
                            },
                            "Republished",
                        ),
                        **_ERRORS,
                    },
                }
            },
            "/v1/dead-letters/{dead_letter_id}": {
                "parameters": [_path("dead_letter_id")],
                "get": {
                    "summary": "One dead letter with the status event it carries",
                    "responses": {"200": _json(_ref("DeadLetter")), **_ERRORS},
                },
            },
            "/v1/dead-letters/{dead_letter_id}/replay": {
                "parameters": [_path("dead_letter_id")],
                "post": {
                    "summary": "Republish the status event to STATUS for this endpoint only "
                    "(same webhook-id, a fresh retry window)",
                    "responses": {"202": _json(_ref("DeadLetter"), "Republished"), **_ERRORS},
                },
            },
            "/v1/postmaster/daily": {
                "get": {
                    "summary": "Mail.ru Postmaster statistics per domain, msgtype and day, as "
                    "last polled (a revised day replaces the row), in date order",
                    "parameters": [
                        {"name": "domain", "in": "query", "schema": string},
                        {
                            "name": "msgtype",
                            "in": "query",
                            "description": "Omitted: every msgtype and the whole-domain rows",
                            "schema": string,
                        },
                        *(
                            {
                                "name": n,
                                "in": "query",
                                "description": "Inclusive, YYYY-MM-DD",
                                "schema": {"type": "string", "format": "date"},
                            }
                            for n in ("date_from", "date_to")
                        ),
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "items": {"type": "array", "items": _ref("PostmasterDay")}
                                },
                            }
                        ),
                        **_ERRORS,
                    },
                }
            },
            "/v1/health": {
                "get": {
                    "summary": "Readiness, backlogs (outbox, dead letters, consumers, KV) and "
                    "partitions; 503 when a readiness check fails",
                    "responses": {
                        "200": _json(_ref("Health")),
                        "503": _json(_ref("Health"), "Degraded"),
                        "401": _PROBLEM,
                    },
                }
            },
            "/v1/email/webhook": {
                "post": {
                    "summary": "Register (or update) the account's webhook URL",
                    "security": [{"accountToken": []}],
                    "requestBody": _body(_ref("WebhookIn")),
                    "responses": {
                        "201": _json(_ref("WebhookCreated"), "Created"),
                        "200": _json(_ref("WebhookCreated"), "Updated"),
                        **_ERRORS,
                    },
                },
                "get": {
                    "summary": "The account's webhook URL (and every endpoint)",
                    "security": [{"accountToken": []}],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "url": nullable_string,
                                    "webhooks": {"type": "array", "items": _ref("Webhook")},
                                },
                            }
                        ),
                        **_ERRORS,
                    },
                },
                "delete": {
                    "summary": "Disable the webhook with this URL",
                    "security": [{"accountToken": []}],
                    "requestBody": _body(
                        {"type": "object", "required": ["url"], "properties": {"url": string}}
                    ),
                    "responses": {"200": _json({"type": "object"}), **_ERRORS},
                },
            },
            "/v1/openapi.json": {
                "get": {"summary": "This document", "security": [], "responses": {"200": _json({})}}
            },
        },
        "components": {
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "ADMIN_TOKEN"},
                "accountToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The account's api_token",
                },
            },
            "responses": {
                "Problem": {
                    "description": "RFC 9457 problem details",
                    "content": {"application/problem+json": {"schema": _ref("Problem")}},
                }
            },
            "schemas": {
                "Problem": {
                    "type": "object",
                    "properties": {
                        "type": string,
                        "title": string,
                        "status": {"type": "integer"},
                        "detail": string,
                    },
                },
                "AccountIn": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": string,
                        "allowed_sender_domains": {"type": "array", "items": string},
                        "postal_api_key": nullable_string,
                        "tracking": {"type": "boolean", "default": True},
                    },
                },
                "AccountPatch": {
                    "type": "object",
                    "properties": {
                        "name": string,
                        "allowed_sender_domains": {"type": "array", "items": string},
                        "postal_api_key": nullable_string,
                        "tracking": {"type": "boolean"},
                        "disabled": {"type": "boolean"},
                    },
                },
                "Account": {
                    "type": "object",
                    "properties": {
                        "id": string,
                        "name": string,
                        "allowed_sender_domains": {"type": "array", "items": string},
                        "tracking": {"type": "boolean"},
                        "has_postal_api_key": {"type": "boolean"},
                        "api_token_prefix": string,
                        "disabled": {"type": "boolean"},
                        "created_at": {"type": "string", "format": "date-time"},
                    },
                },
                "AccountCreated": {
                    "allOf": [
                        _ref("Account"),
                        {"type": "object", "properties": {"api_token": string}},
                    ]
                },
                "CredentialIn": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": string,
                        "username": string,
                        "rate_per_second": {"type": ["number", "null"]},
                        "daily_limit": {"type": ["integer", "null"]},
                        "allowed_ips": {"type": "array", "items": string},
                    },
                },
                "Credential": {
                    "type": "object",
                    "properties": {
                        "username": string,
                        "account_id": string,
                        "name": string,
                        "rate_per_second": {"type": ["number", "null"]},
                        "daily_limit": {"type": ["integer", "null"]},
                        "allowed_ips": {"type": "array", "items": string},
                        "disabled": {"type": "boolean"},
                        "created_at": {"type": "string", "format": "date-time"},
                    },
                },
                "CredentialCreated": {
                    "allOf": [
                        _ref("Credential"),
                        {"type": "object", "properties": {"password": string}},
                    ]
                },
                "SuppressionIn": {
                    "type": "object",
                    "required": ["email"],
                    "properties": {
                        "email": string,
                        "reason": {
                            "enum": ["unsubscribed", "complained", "hard_bounced", "manual"],
                            "default": "manual",
                        },
                    },
                },
                "SuppressionImport": {
                    "type": "object",
                    "properties": {
                        "imported": {"type": "integer"},
                        "added": {"type": "integer"},
                        "kv": {"enum": ["syncing", "unchanged"]},
                    },
                },
                "Suppression": {
                    "type": "object",
                    "properties": {
                        "email": string,
                        "reason": string,
                        "created_at": {"type": "string", "format": "date-time"},
                    },
                },
                "Message": {
                    "type": "object",
                    "properties": {
                        "mailgate_id": string,
                        "external_id": nullable_string,
                        "campaign_id": nullable_string,
                        "postal_id": {"type": ["integer", "null"]},
                        "postal_token": nullable_string,
                        "account_id": string,
                        "recipient": string,
                        "sender": nullable_string,
                        "subject": nullable_string,
                        "size": {"type": ["integer", "null"]},
                        "status": {"enum": list(STATUS_RANK)},
                        "accepted_at": {"type": ["string", "null"], "format": "date-time"},
                        "updated_at": {"type": "string", "format": "date-time"},
                    },
                },
                "MessageDetail": {
                    "allOf": [
                        _ref("Message"),
                        {
                            "type": "object",
                            "properties": {
                                "events": {"type": "array", "items": _ref("HistoryEvent")}
                            },
                        },
                    ]
                },
                "HistoryEvent": {
                    "type": "object",
                    "properties": {
                        "event_id": string,
                        "subject": string,
                        "name": string,
                        "status_event": {"enum": [*STATUS_NAMES, None]},
                        "occurred_at": {"type": "string", "format": "date-time"},
                        "recorded_at": {"type": "string", "format": "date-time"},
                        "data": {"type": "object"},
                    },
                },
                "Timeline": {
                    "type": "object",
                    "properties": {
                        "mailgate_id": string,
                        "external_id": nullable_string,
                        "campaign_id": nullable_string,
                        "recipient": string,
                        "status": {"enum": list(STATUS_RANK)},
                        "timeline": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "at": {"type": "string", "format": "date-time"},
                                    "name": string,
                                    "source": string,
                                    "event_id": string,
                                    "recorded_at": {"type": "string", "format": "date-time"},
                                    "status_event": {
                                        "type": "object",
                                        "properties": {
                                            "name": {"enum": list(STATUS_NAMES)},
                                            "id": string,
                                            "emitted": {"type": "boolean"},
                                            "data": {"type": "object"},
                                        },
                                    },
                                },
                            },
                        },
                        "webhook_deliveries": {
                            "type": "array",
                            "items": _ref("WebhookDelivery"),
                            "description": "Successful deliveries (mail.webhook_delivered).",
                        },
                        "dead_letters": {"type": "array", "items": _ref("DeadLetter")},
                    },
                },
                "Counts": {
                    "type": "object",
                    "properties": {"total": {"type": "integer"}, "unique": {"type": "integer"}},
                },
                "CampaignStats": {
                    "type": "object",
                    "properties": {
                        "campaign_id": string,
                        "messages": {"type": "integer"},
                        "statuses": {
                            "type": "object",
                            "additionalProperties": {"type": "integer"},
                        },
                        "events": {
                            "type": "object",
                            "description": "Per customer event; opened and clicked also have "
                            "by_audience (human, machine, unknown) and unique_non_machine",
                            "additionalProperties": {
                                "allOf": [
                                    _ref("Counts"),
                                    {
                                        "type": "object",
                                        "properties": {
                                            "by_audience": {
                                                "type": "object",
                                                "additionalProperties": _ref("Counts"),
                                            },
                                            "unique_non_machine": {"type": "integer"},
                                        },
                                    },
                                ]
                            },
                        },
                        "rates": {
                            "type": "object",
                            "additionalProperties": {"type": ["number", "null"]},
                        },
                    },
                },
                "PostmasterDay": {
                    "type": "object",
                    "properties": {
                        "domain": string,
                        "msgtype": nullable_string,
                        "date": {"type": "string", "format": "date"},
                        **{
                            n: {"type": "integer"}
                            for n in (
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
                        "reputation": {"type": ["number", "null"]},
                        "trend": {"type": ["number", "null"]},
                        "event_id": string,
                        "polled_at": {"type": "string", "format": "date-time"},
                        "updated_at": {"type": "string", "format": "date-time"},
                    },
                },
                "WebhookDelivery": {
                    "type": "object",
                    "properties": {
                        "event_id": string,
                        "delivered_at": {"type": "string", "format": "date-time"},
                        "status_event": {"enum": list(STATUS_NAMES)},
                        "status_event_id": string,
                        "endpoint_id": string,
                        "url": string,
                        "attempts": {"type": "integer"},
                        "http_status": {"type": "integer"},
                        "duration_ms": {"type": "number"},
                    },
                },
                "DeadLetter": {
                    "type": "object",
                    "properties": {
                        "id": string,
                        "status_event": {"enum": list(STATUS_NAMES)},
                        "status_event_id": string,
                        "mailgate_id": nullable_string,
                        "account_id": string,
                        "endpoint_id": string,
                        "url": string,
                        "attempts": {"type": "integer"},
                        "reason": string,
                        "http_status": {"type": ["integer", "null"]},
                        "created_at": {"type": "string", "format": "date-time"},
                        "replay_count": {"type": "integer"},
                        "replayed_at": {"type": ["string", "null"], "format": "date-time"},
                        "event": {"type": "object", "description": "GET by id only"},
                    },
                },
                "AutoStopEvent": {
                    "type": "object",
                    "properties": {
                        "event_id": string,
                        "kind": {"enum": ["autostopped", "resumed"]},
                        "generation": {"type": ["integer", "null"]},
                        "occurred_at": string,
                        "recorded_at": string,
                        "data": {
                            "type": "object",
                            "description": "The CampaignAutoStopped or CampaignResumed event "
                            "(reason, rate, threshold, counts; requested_by, started)",
                        },
                    },
                },
                "ResumeRequest": {
                    "type": "object",
                    "properties": {"requested_by": {"type": "string", "default": ""}},
                },
                "AutoStopMarker": {
                    "type": "object",
                    "description": "ams-reporter's auto-stop marker (docs/autostop.md)",
                    "properties": {
                        "campaign_id": string,
                        "account_id": string,
                        "mailing_id": string,
                        "state": {"enum": ["stopping", "stopped", "failed", "resumed"]},
                        "generation": {"type": "integer"},
                        "reason": string,
                        "rate": {"type": "number"},
                        "threshold": {"type": "number"},
                        "min_volume": {"type": "integer"},
                        "counts": {"type": "object"},
                        "attempts": {"type": "integer"},
                        "last_error": string,
                        "stopped_at": {"type": "number"},
                        "published": {"type": "boolean"},
                        "resumed_at": {"type": "number"},
                    },
                },
                "ReplayFilter": {
                    "type": "object",
                    "properties": {
                        "account_id": string,
                        "endpoint_id": string,
                        "include_replayed": {"type": "boolean", "default": False},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    },
                },
                "Health": {
                    "type": "object",
                    "properties": {
                        "status": {"enum": ["ok", "degraded"]},
                        "failing": {"type": "array", "items": string},
                        "outbox_pending": {"type": "integer"},
                        "dead_letters_pending": {"type": "integer"},
                        "messages_outside_partitions": {"type": "integer"},
                        "events_outside_partitions": {"type": "integer"},
                        "kv_bulk_writes_running": {"type": "integer"},
                        "partitions": {"type": "object"},
                        "consumers": {"type": "object"},
                    },
                },
                "CampaignSummary": {
                    "type": "object",
                    "properties": {
                        "campaign_id": string,
                        "messages": {"type": "integer"},
                        "bounced": {"type": "integer"},
                        "complained": {"type": "integer"},
                        "engaged": {"type": "integer"},
                        "last_message_at": nullable_string,
                    },
                },
                "OperatorIn": {
                    "type": "object",
                    "required": ["username"],
                    "properties": {
                        "username": string,
                        "role": {"enum": ["admin", "viewer"], "default": "admin"},
                        "account_id": nullable_string,
                        "password": {"type": ["string", "null"], "minLength": 10},
                    },
                },
                "Operator": {
                    "type": "object",
                    "properties": {
                        "id": string,
                        "username": string,
                        "role": {"enum": ["admin", "viewer"]},
                        "account_id": nullable_string,
                        "disabled": {"type": "boolean"},
                        "created_at": string,
                        "last_login_at": nullable_string,
                        "password": {"type": "string", "description": "generated: shown once"},
                    },
                },
                "WebhookIn": {
                    "type": "object",
                    "required": ["url"],
                    "properties": {
                        "url": {"type": "string", "format": "uri"},
                        "events": {
                            "type": "array",
                            "items": {"enum": [*STATUS_NAMES, "complined"]},
                        },
                        "batch": {"type": "boolean", "default": False},
                        "legacy_complained_spelling": {"type": "boolean", "default": False},
                    },
                },
                "Webhook": {
                    "type": "object",
                    "properties": {
                        "id": string,
                        "url": string,
                        "events": {"type": "array", "items": string},
                        "batch": {"type": "boolean"},
                        "legacy_complained_spelling": {"type": "boolean"},
                        "enabled": {"type": "boolean"},
                        "created_at": {"type": "string", "format": "date-time"},
                    },
                },
                "WebhookCreated": {
                    "allOf": [
                        _ref("Webhook"),
                        {"type": "object", "properties": {"secret": {"type": "string"}}},
                    ]
                },
            },
        },
    }


def render() -> str:
    """The document as the checked-in ``docs/openapi.json`` holds it."""
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mailgate_ledger.openapi OUTPUT.json", file=sys.stderr)
        return 2
    Path(args[0]).write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
