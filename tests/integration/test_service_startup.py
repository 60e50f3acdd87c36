"""Every service validates its settings at start-up and exits with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SERVICES = [
    "smtp-ingest",
    "postal-sender",
    "webhook-ingest",
    "tracker",
    "ledger",
    "ams-reporter",
    "stats-poller",
]


@pytest.mark.parametrize("service", SERVICES)
def test_a_bad_setting_exits_2_naming_the_variable_without_a_traceback(service: str) -> None:
    env = dict(os.environ)
    env.update(
        {"SHUTDOWN_GRACE_S": "soon", "DOMAIN": "mailgate.test", "NATS_URL": "nats://127.0.0.1:1"}
    )
    module = "mailgate_" + service.replace("-", "_")
    proc = subprocess.run(
        [sys.executable, "-m", module],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0] == f"{service}: config error: SHUTDOWN_GRACE_S='soon' is not a number"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
