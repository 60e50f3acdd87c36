"""deploy/Dockerfile, its entrypoint and healthcheck (no Docker engine here: the build itself
is not run; what it copies, pins and executes is checked)."""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_support import DEPLOY, REPO

DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"
HEALTHCHECK = DEPLOY / "healthcheck.py"


def _workspace_members() -> list[Path]:
    root = tomllib.loads((REPO / "pyproject.toml").read_text())
    members: list[Path] = []
    for pattern in root["tool"]["uv"]["workspace"]["members"]:
        members += sorted(p for p in REPO.glob(pattern) if (p / "pyproject.toml").exists())
    return members


def test_base_image_is_pinned_and_shared_by_both_stages() -> None:
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base.group(1))
    assert re.findall(r"^FROM \$\{PYTHON_IMAGE\} AS (\w+)$", DOCKERFILE, re.MULTILINE) == [
        "build",
        "runtime",
    ]


def test_built_from_the_lock_file_per_service() -> None:
    syncs = re.findall(r"uv sync ([^\n]+)", DOCKERFILE)
    assert len(syncs) == 2
    for args in syncs:
        assert "--frozen" in args and "--no-dev" in args
        assert '--package "mailgate-${SERVICE}"' in args
    makefile_uv = re.search(
        r"^UV_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE
    )
    assert makefile_uv is not None
    assert f"ARG UV_VERSION={makefile_uv.group(1)}" in DOCKERFILE  # the uv `make` uses


def test_every_workspace_member_pyproject_is_copied() -> None:
    copied = set(re.findall(r"^COPY (\S+/pyproject\.toml) ", DOCKERFILE, re.MULTILINE))
    members = {str(p.relative_to(REPO) / "pyproject.toml") for p in _workspace_members()}
    assert copied == members


def test_every_service_arg_names_a_workspace_package() -> None:
    packages = {
        tomllib.loads((p / "pyproject.toml").read_text())["project"]["name"]
        for p in _workspace_members()
    }
    for service in (
        "smtp-ingest",
        "postal-sender",
        "webhook-ingest",
        "tracker",
        "ledger",
        "ams-reporter",
        "stats-poller",
        "cli",
        "fakes",
    ):
        assert f"mailgate-{service}" in packages


def test_runs_as_non_root_with_a_python_healthcheck() -> None:
    runtime = DOCKERFILE.split("AS runtime", 1)[1]
    assert re.search(r"^USER 10001:10001$", runtime, re.MULTILINE)
    assert "useradd --system --uid 10001" in runtime
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD (.+)$", runtime, re.MULTILINE)
    assert health is not None and '"python"' in health.group(1)
    instructions = [line for line in runtime.splitlines() if not line.lstrip().startswith("#")]
    assert not any("curl" in line for line in instructions)


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "**"  # allow-list
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for source in re.findall(r"^COPY (?:--chmod=\S+ )?(\S+) ", DOCKERFILE, re.MULTILINE):
        if source.startswith("--from"):
            continue
        first = source.split("/")[0]
        assert any(source == a or source.startswith(a + "/") or first == a for a in allowed), source


def _run_entrypoint(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"]}
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], env=base | env, capture_output=True, text=True, timeout=30
    )


def test_entrypoint_reads_secrets_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "admin_token"
    secret.write_text("s3cret-value\n")
    proc = _run_entrypoint(["env"], {"ADMIN_TOKEN_FILE": str(secret), "LOG_LEVEL": "info"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "ADMIN_TOKEN=s3cret-value" in lines
    assert not any(line.startswith("ADMIN_TOKEN_FILE=") for line in lines)


def test_entrypoint_keeps_a_value_already_set(tmp_path: Path) -> None:
    proc = _run_entrypoint(
        ["env"], {"POSTAL_WEBHOOK_PUBLIC_KEY": "real", "POSTAL_WEBHOOK_PUBLIC_KEY_FILE": "/nope"}
    )
    assert proc.returncode == 0, proc.stderr
    assert "POSTAL_WEBHOOK_PUBLIC_KEY=real" in proc.stdout.splitlines()


def test_entrypoint_refuses_a_missing_secret_file() -> None:
    proc = _run_entrypoint(["env"], {"ADMIN_TOKEN_FILE": "/nonexistent/admin_token"})
    assert proc.returncode == 2
    assert "ADMIN_TOKEN_FILE" in proc.stderr


def test_entrypoint_runs_the_service_of_the_image(tmp_path: Path) -> None:
    fake = tmp_path / "mailgate-tracker"
    fake.write_text('#!/bin/sh\necho "tracker started with TRACKING_SECRET=$TRACKING_SECRET"\n')
    fake.chmod(0o755)
    secret = tmp_path / "tracking"
    secret.write_text("abc")
    proc = subprocess.run(
        ["sh", str(ENTRYPOINT)],
        env={
            "PATH": f"{tmp_path}:{os.environ['PATH']}",
            "SERVICE": "tracker",
            "TRACKING_SECRET_FILE": str(secret),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "tracker started with TRACKING_SECRET=abc"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def _healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30
    )


def test_healthcheck_probes_the_service_port(health_server: int) -> None:
    ok = _healthcheck({"SERVICE": "ledger", "ADMIN_PORT": str(health_server)})
    assert ok.returncode == 0, ok.stderr
    ops = _healthcheck({"SERVICE": "postal-sender", "OPS_PORT": str(health_server)})
    assert ops.returncode == 0, ops.stderr


def test_healthcheck_fails_when_nothing_answers(health_server: int) -> None:
    url = f"http://127.0.0.1:{health_server}/missing"
    proc = _healthcheck({"SERVICE": "tracker", "HEALTH_URL": url})
    assert proc.returncode == 1
    assert "unhealthy" in proc.stderr
