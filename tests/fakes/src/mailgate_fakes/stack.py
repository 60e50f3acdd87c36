"""The whole mailgate stack on one machine, without Docker: ``make run`` and the e2e tests.

Starts (unless given by ``NATS_URL`` / ``DATABASE_URL`` / ``POSTAL_API_URL``) a nats-server
with JetStream (sync_interval always) and PostgreSQL from PyPI wheels, the Postal sandbox,
then every service as its own process, waits until each answers ``/readyz``, creates a
development account and SMTP credential, and prints how to use it. Ctrl-C (or SIGTERM)
stops the services with SIGTERM (graceful drain), then NATS and Postgres.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .infra import NatsServer, Postgres, free_port, python_env, wait_for_port

SERVICES = (
    "ledger",
    "smtp-ingest",
    "postal-sender",
    "webhook-ingest",
    "tracker",
    "ams-reporter",
    "stats-poller",
)

DEFAULT_PORTS = {
    "nats": 4222,
    "smtp": 2587,
    "smtps": 2465,
    "ledger": 8080,
    "webhook-ingest": 8081,
    "tracker": 8082,
    "postal-sandbox": 5080,
    "ams-fake": 8090,
    "postmaster-fake": 8091,
    "smtp-ingest-ops": 9101,
    "postal-sender-ops": 9102,
    "ams-reporter-ops": 9106,
    "stats-poller-ops": 9107,
}


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _persisted_secret(path: Path, make: Any) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = str(make())
    path.write_text(value)
    path.chmod(0o600)
    return value


def _alnum(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(n))


def self_signed_cert(directory: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for the SMTP listeners (kept across runs)."""
    cert_path, key_path = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(hostname), x509.DNSName("127.0.0.1")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def rsa_signing_key(path: Path) -> str:
    """The Postal sandbox's signing key (PEM at ``path``, made as Postal's installer makes it
    when absent); returns the base64 SPKI public key."""
    from .postal import load_or_create_private_key, public_key_b64

    return public_key_b64(load_or_create_private_key(path))


@dataclass
class Stack:
    """Every mailgate process plus its infrastructure; ``start()`` / ``stop()``."""

    data_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    domain: str = "mailgate.localhost"
    sender_domains: tuple[str, ...] = ("example.com",)
    env_overrides: dict[str, str] = field(default_factory=dict)
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    sandbox_args: tuple[str, ...] = ()
    """Extra Postal sandbox options (e.g. ``--retry-factor 0.01`` for fast webhook retries)."""
    services: tuple[str, ...] = SERVICES
    """The services to run (all by default; the benchmarks' quick mode runs fewer)."""
    nats: NatsServer | None = None
    postgres: Postgres | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    nats_url: str = ""
    database_url: str = ""
    postal_api_url: str = ""
    postal_api_key: str = ""
    admin_token: str = ""
    quiet: bool = True

    @classmethod
    def with_free_ports(cls, data_dir: Path, **kwargs: Any) -> Stack:
        return cls(data_dir, ports={name: free_port() for name in DEFAULT_PORTS}, **kwargs)

    @classmethod
    def with_default_ports(cls, data_dir: Path, **kwargs: Any) -> Stack:
        ports = {n: p if _port_free(p) else free_port() for n, p in DEFAULT_PORTS.items()}
        return cls(data_dir, ports=ports, **kwargs)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def start_infrastructure(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.nats_url = os.environ.get("NATS_URL", "")
        if not self.nats_url:
            self.nats = NatsServer(self.data_dir / "nats", port=self.ports["nats"]).start()
            self.nats_url = self.nats.url
        self.postgres = Postgres(
            self.data_dir / "pg", external_url=os.environ.get("DATABASE_URL")
        ).start()
        self.database_url = self.postgres.url

    def common_env(self) -> dict[str, str]:
        secrets_dir = self.data_dir / "secrets"
        self.admin_token = os.environ.get("ADMIN_TOKEN") or _persisted_secret(
            secrets_dir / "admin-token", lambda: secrets.token_urlsafe(32)
        )
        tracking_secret = os.environ.get("TRACKING_SECRET") or _persisted_secret(
            secrets_dir / "tracking-secret", lambda: secrets.token_urlsafe(32)
        )
        env = {
            "NATS_URL": self.nats_url,
            "DOMAIN": self.domain,
            "ALLOWED_SENDER_DOMAINS": ",".join(self.sender_domains),
            "TRACKING_BASE_URL": self.url("tracker"),
            "TRACKING_SECRET": tracking_secret,
            "ADMIN_TOKEN": self.admin_token,
            "WEBHOOK_ALLOW_PRIVATE": "true",
            "LOG_LEVEL": os.environ.get("LOG_LEVEL", "info"),
        }
        env.update(self.env_overrides)
        return env

    def start_postal_sandbox(self) -> dict[str, str]:
        external = os.environ.get("POSTAL_API_URL")
        if external:
            self.postal_api_url = external
            self.postal_api_key = os.environ.get("POSTAL_API_KEY", "")
            return {
                "POSTAL_API_URL": external,
                "POSTAL_API_KEY": self.postal_api_key,
                "POSTAL_WEBHOOK_PUBLIC_KEY": os.environ.get("POSTAL_WEBHOOK_PUBLIC_KEY", ""),
            }
        secrets_dir = self.data_dir / "secrets"
        self.postal_api_key = _persisted_secret(secrets_dir / "postal-api-key", lambda: _alnum(24))
        key_path = secrets_dir / "postal-signing-key.pem"
        public_key = rsa_signing_key(key_path)
        port = self.ports["postal-sandbox"]
        self._spawn(
            "postal-sandbox",
            [
                sys.executable,
                "-m",
                "mailgate_fakes.postal",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--api-key",
                self.postal_api_key,
                "--webhook-url",
                f"{self.url('webhook-ingest')}/api/v1/webhook",
                "--signing-key",
                str(key_path),
                *self.sandbox_args,
            ],
            python_env({"LOG_LEVEL": os.environ.get("LOG_LEVEL", "info")}),
        )
        wait_for_port("127.0.0.1", port, timeout_s=20, proc=self.procs["postal-sandbox"])
        self.postal_api_url = self.url("postal-sandbox")
        return {
            "POSTAL_API_URL": self.postal_api_url,
            "POSTAL_API_KEY": self.postal_api_key,
            "POSTAL_WEBHOOK_PUBLIC_KEY": public_key,
        }

    def start_other_fakes(self) -> dict[str, str]:
        """AMS and Mail.ru Postmaster fakes, unless real ones are configured."""
        env: dict[str, str] = {}
        secrets_dir = self.data_dir / "secrets"
        if os.environ.get("AMS_API_URL"):
            env["AMS_API_URL"] = os.environ["AMS_API_URL"]
            env["AMS_API_KEY"] = os.environ.get("AMS_API_KEY", "")
        else:
            key = _persisted_secret(secrets_dir / "ams-api-key", lambda: _alnum(32))
            port = self.ports["ams-fake"]
            self._spawn(
                "ams-fake",
                [
                    sys.executable,
                    "-m",
                    "mailgate_fakes.ams",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--api-key",
                    key,
                    "--demo",
                ],
                python_env(),
            )
            wait_for_port("127.0.0.1", port, timeout_s=20, proc=self.procs["ams-fake"])
            env |= {"AMS_API_URL": f"{self.url('ams-fake')}/api/v1", "AMS_API_KEY": key}
        if os.environ.get("POSTMASTER_REFRESH_TOKEN"):
            for var in ("POSTMASTER_REFRESH_TOKEN", "POSTMASTER_API_URL", "POSTMASTER_TOKEN_URL"):
                if var in os.environ:
                    env[var] = os.environ[var]
        else:
            token = _persisted_secret(secrets_dir / "postmaster-refresh", lambda: _alnum(32))
            port = self.ports["postmaster-fake"]
            argv = [
                sys.executable,
                "-m",
                "mailgate_fakes.postmaster",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--refresh-token",
                token,
            ]
            for domain in self.sender_domains:
                argv += ["--domain", domain]
            self._spawn("postmaster-fake", argv, python_env())
            wait_for_port("127.0.0.1", port, timeout_s=20, proc=self.procs["postmaster-fake"])
            env |= {
                "POSTMASTER_REFRESH_TOKEN": token,
                "POSTMASTER_API_URL": self.url("postmaster-fake"),
                "POSTMASTER_TOKEN_URL": f"{self.url('postmaster-fake')}/token",
            }
        return env

    def env_for(
        self, service: str, common: dict[str, str], postal: dict[str, str]
    ) -> dict[str, str]:
        p = self.ports
        env = dict(common)
        env["SERVICE_NAME"] = service
        if service == "ledger":
            env |= {"DATABASE_URL": self.database_url, "ADMIN_PORT": str(p["ledger"])}
            env["ADMIN_HOST"] = "127.0.0.1"
        elif service == "smtp-ingest":
            cert, key = self_signed_cert(self.data_dir / "tls")
            env |= {
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(p["smtp"]),
                "SMTPS_PORT": str(p["smtps"]),
                "SMTP_TLS_CERT": os.environ.get("SMTP_TLS_CERT", str(cert)),
                "SMTP_TLS_KEY": os.environ.get("SMTP_TLS_KEY", str(key)),
                "OPS_PORT": str(p["smtp-ingest-ops"]),
            }
        elif service == "postal-sender":
            env |= {
                "POSTAL_API_URL": postal["POSTAL_API_URL"],
                "POSTAL_API_KEY": postal["POSTAL_API_KEY"],
                "OPS_PORT": str(p["postal-sender-ops"]),
            }
        elif service == "webhook-ingest":
            env |= {
                "WEBHOOK_HOST": "127.0.0.1",
                "WEBHOOK_PORT": str(p["webhook-ingest"]),
                "POSTAL_WEBHOOK_PUBLIC_KEY": postal["POSTAL_WEBHOOK_PUBLIC_KEY"],
            }
        elif service == "tracker":
            env |= {"TRACKER_HOST": "127.0.0.1", "TRACKER_PORT": str(p["tracker"])}
        elif service == "ams-reporter":
            env["OPS_PORT"] = str(p["ams-reporter-ops"])
        elif service == "stats-poller":
            env["OPS_PORT"] = str(p["stats-poller-ops"])
        env["OPS_HOST"] = "127.0.0.1"  # HTTP services serve ops routes on their own port
        env.update(self.service_env.get(service, {}))
        return env

    def ops_url(self, service: str) -> str:
        name = {
            "ledger": "ledger",
            "webhook-ingest": "webhook-ingest",
            "tracker": "tracker",
        }.get(service, f"{service}-ops")
        return self.url(name)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def start_service(self, service: str, env: dict[str, str]) -> None:
        module = "mailgate_" + service.replace("-", "_")
        self._spawn(service, [sys.executable, "-m", module], python_env(env))

    def start(self) -> Stack:
        self.start_infrastructure()
        common = self.common_env()
        postal = self.start_postal_sandbox()
        if "stats-poller" in self.services:  # the AMS/Postmaster fakes serve stats-poller
            common |= self.start_other_fakes()
        self._envs = {s: self.env_for(s, common, postal) for s in self.services}
        for service in self.services:
            self.start_service(service, self._envs[service])
        for service in self.services:
            self.wait_ready(service)
        return self

    def restart_service(self, service: str, *, kill: bool = False) -> None:
        self.stop_service(service, kill=kill)
        self.start_service(service, self._envs[service])
        self.wait_ready(service)

    def wait_ready(self, service: str, timeout_s: float = 60.0) -> None:
        url = f"{self.ops_url(service)}/readyz"
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            proc = self.procs.get(service)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"{service} exited with {proc.returncode}:\n{self.tail_log(service)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:200]!r}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise TimeoutError(f"{service} not ready at {url}: {last}\n{self.tail_log(service)}")

    def tail_log(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def admin(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        """Call the ledger admin API; returns the decoded JSON (raises on non-2xx)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 - loopback
            f"{self.url('ledger')}{path}",
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {token or self.admin_token}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
            raw = resp.read()
        return json.loads(raw) if raw else None

    def dev_credential(self) -> dict[str, str]:
        """The development account and SMTP credential (created once, kept in .data)."""
        path = self.data_dir / "secrets" / "dev-credential.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
        account = self.admin(
            "POST",
            "/v1/accounts",
            {"name": "dev", "allowed_sender_domains": list(self.sender_domains), "tracking": True},
        )
        cred = self.admin("POST", f"/v1/accounts/{account['id']}/credentials", {"name": "dev"})
        out = {
            "account_id": account["id"],
            "api_token": account["api_token"],
            "username": cred["username"],
            "password": cred["password"],
        }
        path.write_text(json.dumps(out))
        path.chmod(0o600)
        return out

    def dev_operator(self) -> dict[str, str]:
        """The operator console's development admin (created once, kept in .data)."""
        path = self.data_dir / "secrets" / "console-admin.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
        created = self.admin("POST", "/v1/operators", {"username": "admin", "role": "admin"})
        out = {"username": created["username"], "password": created["password"]}
        path.write_text(json.dumps(out))
        path.chmod(0o600)
        return out

    def stop_service(self, name: str, *, kill: bool = False, timeout_s: float = 30.0) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for name in [*reversed(SERVICES), "postal-sandbox", "ams-fake", "postmaster-fake"]:
            codes[name] = self.stop_service(name)
        if self.nats is not None:
            self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()
        return codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole mailgate stack locally.")
    parser.add_argument("--data-dir", type=Path, default=Path(".data"))
    parser.add_argument("--domain", default=os.environ.get("DOMAIN", "mailgate.localhost"))
    parser.add_argument(
        "--sender-domain",
        action="append",
        default=None,
        help="allowed sender domain of the dev account (repeatable; default example.com)",
    )
    args = parser.parse_args(argv)
    senders = tuple(
        args.sender_domain
        or [d for d in os.environ.get("ALLOWED_SENDER_DOMAINS", "example.com").split(",") if d]
    )
    stack = Stack.with_default_ports(args.data_dir, domain=args.domain, sender_domains=senders)
    stopping = False

    def on_signal(_sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        print("starting mailgate (NATS, Postgres, Postal sandbox, 7 services)...", flush=True)
        stack.start()
        cred = stack.dev_credential()
        operator = stack.dev_operator()
        console = f"{stack.url('ledger')}/console/"
        p = stack.ports
        print(
            f"""
mailgate is running. Logs: {stack.log_dir}/

  SMTP (STARTTLS)    127.0.0.1:{p["smtp"]}     user {cred["username"]}
  SMTPS (TLS)        127.0.0.1:{p["smtps"]}     password {cred["password"]}
  allowed senders    {", ".join(stack.sender_domains)}
  admin API          {stack.url("ledger")}/v1   bearer {stack.admin_token}
  account api token  {cred["api_token"]}   (for POST /v1/email/webhook)
  operator console   {console}   {operator["username"]} / {operator["password"]}
  tracker            {stack.url("tracker")}
  Postal webhooks    {stack.url("webhook-ingest")}/api/v1/webhook
  Postal API         {stack.postal_api_url}
  AMS API            {stack._envs["stats-poller"].get("AMS_API_URL", "-")}
  NATS               {stack.nats_url}

Try:  swaks --server 127.0.0.1:{p["smtp"]} -tls --auth PLAIN \\
        --auth-user {cred["username"]} --auth-password {cred["password"]} \\
        --from news@{stack.sender_domains[0]} --to you@example.org

Ctrl-C stops everything.""",
            flush=True,
        )
        while not stopping:
            for name, proc in list(stack.procs.items()):
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; see its log", flush=True)
                    stack.procs.pop(name)
            time.sleep(0.5)
    finally:
        print("stopping...", flush=True)
        with contextlib.suppress(Exception):
            stack.stop()
        print("stopped.", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
