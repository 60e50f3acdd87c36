"""``SMTP_WORKERS=N`` (N > 1): one supervisor and N worker processes sharing the SMTP ports.

Python runs one event loop on one core; TLS handshakes, MIME rewriting and JSON encoding
are CPU work, so one smtp-ingest process saturates one core long before the network or NATS
does. Each worker is a complete smtp-ingest (``python -m mailgate_smtp_ingest`` with
``SMTP_WORKER_INDEX=i``) whose two listeners bind with ``SO_REUSEPORT``: the kernel spreads
new connections over the workers, and a worker's death closes only its own connections.
Worker ``i`` (1-based) serves /metrics, /healthz and /readyz on ``OPS_PORT + i - 1``.

The supervisor forwards SIGTERM/SIGINT to every worker (each drains as a single process
does: new MAIL gets 421, open transactions finish, then it exits), waits for all of them
(SIGKILL after ``SHUTDOWN_GRACE_S`` + 5 s) and exits 0. A worker that exits on its own is
restarted after a pause; one that exits with status 2 (configuration error) stops the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

import structlog

log = structlog.get_logger()

#: Pause before restarting a worker that exited on its own.
RESTART_DELAY_S = 1.0
_CONFIG_ERROR = 2


def worker_env(base: dict[str, str], index: int, ops_port: int) -> dict[str, str]:
    """The environment of worker ``index`` (1-based)."""
    env = dict(base)
    env["SMTP_WORKER_INDEX"] = str(index)
    if ops_port:
        env["OPS_PORT"] = str(ops_port + index - 1)
    return env


class Supervisor:
    def __init__(self, workers: int, *, ops_port: int, grace_s: float):
        self.count = workers
        self.ops_port = ops_port
        self.grace_s = grace_s
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False
        self._exit_code = 0

    def _spawn(self, index: int) -> None:
        env = worker_env(dict(os.environ), index, self.ops_port)
        self.procs[index] = subprocess.Popen(
            [sys.executable, "-m", "mailgate_smtp_ingest"], env=env
        )
        log.info("smtp worker started", worker=index, pid=self.procs[index].pid)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("stopping smtp workers", signal=signal.Signals(signum).name)
        self._stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for index in range(1, self.count + 1):
            self._spawn(index)
        restart_at: dict[int, float] = {}
        while not self._stopping:
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or index in restart_at:
                    continue
                if code == _CONFIG_ERROR:
                    log.error("smtp worker configuration error", worker=index)
                    self._exit_code = _CONFIG_ERROR
                    self._on_signal(signal.SIGTERM, None)
                    break
                log.error("smtp worker exited", worker=index, code=code)
                restart_at[index] = time.monotonic() + RESTART_DELAY_S
            for index, when in list(restart_at.items()):
                if time.monotonic() >= when and not self._stopping:
                    del restart_at[index]
                    self._spawn(index)
            time.sleep(0.1)
        return self._wait_all()

    def _wait_all(self) -> int:
        for proc in self.procs.values():  # also any worker started while the signal came
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 5.0
        for index, proc in self.procs.items():
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("smtp worker did not stop in time", worker=index)
                proc.kill()
                code = proc.wait()
            if code not in (0, -signal.SIGTERM) and not self._exit_code:
                self._exit_code = 1
        log.info("smtp workers stopped", exit_code=self._exit_code)
        return self._exit_code


def supervise(workers: int, *, ops_port: int, grace_s: float) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; the exit status."""
    return Supervisor(workers, ops_port=ops_port, grace_s=grace_s).run()
