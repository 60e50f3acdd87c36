"""Generate ``proto-schemas/`` from the event structs: a JSON Schema per subject and an
AsyncAPI 3.0 document. ``--check`` exits 1 when the files on disk differ (CI's staleness check).

    python -m mailgate_core.schemagen proto-schemas [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from . import schemas

_DESCRIPTIONS = {
    "mail.accepted": "smtp-ingest accepted one recipient's copy; SMTP 250 follows this ack.",
    "mail.skipped": "A suppressed recipient, accepted at SMTP level but not sent.",
    "mail.submitted": "Postal accepted the message (send/raw success).",
    "mail.failed": "Postal refused the message for good, or retries ran out.",
    "mail.webhook_dead_lettered": "A status event ams-reporter could not deliver to an endpoint.",
    "mail.webhook_delivered": "A status event ams-reporter delivered to an endpoint (2xx).",
    "postal.*": "A verified Postal webhook; the last token is Postal's event name.",
    "track.open": "An open-pixel load.",
    "track.click": "A tracked link click.",
    "track.unsubscribe": "An unsubscribe (page confirmation or RFC 8058 one-click).",
    "track.batch": "Opens and clicks packed into one message by the tracker's buffer.",
    "status.*": "A customer-facing event; the last token is its name.",
    "stats.postmaster.daily": "One day of Mail.ru Postmaster stats for a domain (and msgtype).",
    "stats.ams.mailing": "AMS's progress of one mailing.",
    "stats.campaign.autostopped": "ams-reporter stopped an AMS mailing: a rate crossed its limit.",
    "stats.campaign.resumed": "An automatically stopped campaign was resumed.",
}

_PRODUCERS = {
    "mail": "smtp-ingest / postal-sender",
    "postal": "webhook-ingest",
    "track": "tracker",
    "status": "ledger",
    "stats": "stats-poller",
    "mail.webhook_dead_lettered": "ams-reporter",
    "mail.webhook_delivered": "ams-reporter",
    "stats.campaign.autostopped": "ams-reporter",
    "stats.campaign.resumed": "ams-reporter",
}


_WILDCARD_NAMES = {"postal.*": "postal.EventName", "status.*": "status.name"}


def _producer(subject: str) -> str:
    return _PRODUCERS.get(subject) or _PRODUCERS[subject.split(".")[0]]


def _file_name(subject: str) -> str:
    return _WILDCARD_NAMES.get(subject, subject) + ".schema.json"


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render() -> dict[str, str]:
    """File name -> content of every generated file."""
    files: dict[str, str] = {}
    structs = list(schemas.SUBJECTS.values())
    (_, components) = msgspec.json.schema_components(structs, ref_template="#/$defs/{name}")
    for subject, cls in schemas.SUBJECTS.items():
        (root,), defs = msgspec.json.schema_components([cls], ref_template="#/$defs/{name}")
        document = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://mailgate.invalid/schemas/{_file_name(subject)}",
            "title": subject,
            "description": _DESCRIPTIONS[subject],
            **defs[cls.__name__],
            "$defs": {k: v for k, v in defs.items() if k != cls.__name__},
        }
        document.pop("$ref", None)
        del root
        files[_file_name(subject)] = _dump(document)
    asyncapi_components = json.loads(
        json.dumps(components).replace("#/$defs/", "#/components/schemas/")
    )
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for subject, cls in schemas.SUBJECTS.items():
        key = subject.replace(".", "_").replace("*", "any")
        address = subject.replace("*", "{name}")
        channel: dict[str, Any] = {
            "address": address,
            "description": _DESCRIPTIONS[subject],
            "messages": {cls.__name__: {"$ref": f"#/components/messages/{cls.__name__}"}},
        }
        if "{name}" in address:
            channel["parameters"] = {"name": {"description": "event name (last subject token)"}}
        channels[key] = channel
        operations[f"publish_{key}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": f"published by {_producer(subject)}",
        }
    messages = {
        cls.__name__: {
            "name": cls.__name__,
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "properties": {"Nats-Msg-Id": {"type": "string", "description": "event_id"}},
            },
            "payload": {"$ref": f"#/components/schemas/{cls.__name__}"},
        }
        for cls in structs
    }
    asyncapi = {
        "asyncapi": "3.0.0",
        "info": {
            "title": "mailgate events",
            "version": str(schemas.SCHEMA_VERSION),
            "description": "Events on NATS JetStream, generated from libs/mailgate-core schemas.",
        },
        "defaultContentType": "application/json",
        "servers": {"nats": {"host": "localhost:4222", "protocol": "nats"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": asyncapi_components},
    }
    files["asyncapi.json"] = _dump(asyncapi)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--check", action="store_true", help="fail when files are stale")
    args = parser.parse_args(argv)
    files = render()
    out: Path = args.directory
    if args.check:
        stale = []
        for name, content in files.items():
            path = out / name
            if not path.exists() or path.read_text() != content:
                stale.append(name)
        extra = (
            sorted(p.name for p in out.glob("*.json") if p.name not in files)
            if out.exists()
            else []
        )
        if stale or extra:
            print(
                f"proto-schemas are stale ({', '.join(stale + extra)}): run `make schemas`",
                file=sys.stderr,
            )
            return 1
        print(f"proto-schemas up to date ({len(files)} files)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for stale_file in out.glob("*.json"):
        if stale_file.name not in files:
            stale_file.unlink()
    for name, content in files.items():
        (out / name).write_text(content)
    print(f"wrote {len(files)} files to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
