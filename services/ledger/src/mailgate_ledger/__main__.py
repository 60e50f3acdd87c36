"""``mailgate-ledger`` / ``python -m mailgate_ledger [serve|migrate|bootstrap]``."""

from __future__ import annotations

import asyncio
import sys

from mailgate_core.config import BaseSettings, ConfigError, Secret, load_settings
from mailgate_core.logging import configure_logging
from mailgate_core.runtime import run_service

from .app import Settings, build
from .bootstrap import BootstrapSettings, bootstrap
from .migrations import migrate_url


class MigrateSettings(BaseSettings, frozen=True, kw_only=True):
    service_name: str = "ledger"
    database_url: Secret


def migrate_main() -> None:
    try:
        settings = load_settings(MigrateSettings)
    except ConfigError as exc:
        print(f"ledger: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging("ledger", settings.log_level)
    applied = asyncio.run(migrate_url(str(settings.database_url)))
    print(f"ledger: {len(applied)} migration(s) applied" + (f": {applied}" if applied else ""))


def bootstrap_main() -> None:
    try:
        settings = load_settings(BootstrapSettings)
    except ConfigError as exc:
        print(f"ledger: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging("ledger", settings.log_level)
    for line in asyncio.run(bootstrap(settings)):
        print(f"ledger: {line}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "serve"
    if command == "migrate":
        migrate_main()
    elif command == "bootstrap":
        bootstrap_main()
    elif command == "serve":
        run_service("ledger", Settings, build)
    else:
        print("usage: python -m mailgate_ledger [serve|migrate|bootstrap]", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
