"""Container healthcheck: GET /healthz of this container's service; exit 0 when it answers 200.

Runs with the image's python (no curl in the image). The URL is HEALTH_URL when set, else
127.0.0.1 on the port the service serves /healthz on: its own HTTP port for the HTTP
services, OPS_PORT for the others (defaults as in each service's Settings).
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping

#: SERVICE -> (env var holding the port of /healthz, its default)
HEALTH_PORTS: dict[str, tuple[str, int]] = {
    "smtp-ingest": ("OPS_PORT", 9101),
    "postal-sender": ("OPS_PORT", 9102),
    "webhook-ingest": ("WEBHOOK_PORT", 8081),
    "tracker": ("TRACKER_PORT", 8082),
    "ledger": ("ADMIN_PORT", 8080),
    "ams-reporter": ("OPS_PORT", 9106),
    "stats-poller": ("OPS_PORT", 9107),
}


def health_url(env: Mapping[str, str]) -> str | None:
    """The URL to probe, or ``None`` when this image runs no long-lived server (cli)."""
    if env.get("HEALTH_URL"):
        return env["HEALTH_URL"]
    service = env.get("SERVICE", "")
    if service == "fakes":
        return f"http://127.0.0.1:{env.get('SANDBOX_PORT', '5080')}/.well-known/jwks.json"
    if service not in HEALTH_PORTS:
        return None
    var, default = HEALTH_PORTS[service]
    return f"http://127.0.0.1:{env.get(var) or default}/healthz"


def main() -> int:
    url = health_url(os.environ)
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback URL
            return 0 if resp.status == 200 else 1
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
