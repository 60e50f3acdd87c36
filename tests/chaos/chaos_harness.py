"""Faults against the real stack under a steady SMTP load, and the loss/duplicate table.

Every service runs as its own process (``mailgate_fakes.stack.Stack``) with real NATS (file
storage, sync_interval always), real Postgres, the Postal sandbox and a local customer
webhook receiver. A row: start the load, apply the fault, heal it, stop the load, wait until
everything accepted has settled, then count:

* sent: messages whose MAIL command went out; accepted: answered 250 after DATA;
* delivered: accepted messages the sandbox received; lost: accepted but never at Postal;
* duplicated: extra Postal submissions of any message of the row (one recipient each);
* hooks lost: accepted messages whose ``delivered`` event never reached the customer;
* 4xx: transient answers (the client would retry); ``4xx delivered``: 4xx-answered messages
  that reached Postal anyway (must be 0 where the row demands "4xx means not durable").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import smtplib
import socket
import ssl
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mailgate_fakes.infra import free_port
from mailgate_fakes.stack import Stack

SENDER = "news@example.com"
#: ``make chaos``: every fault, longer outages; otherwise the short form of ``make test``.
FULL = os.environ.get("MAILGATE_CHAOS") == "full"

#: Settings that make retries and breakers fast enough to watch (none changes a contract).
SERVICE_ENV = {
    "postal-sender": {
        "RETRY_BASE_S": "0.2",
        "POSTAL_TIMEOUT_S": "5",
        "POSTAL_CIRCUIT_OPEN_S": "1",
        "ACK_WAIT_S": "10",
        "RECONCILE_ENABLED": "false",
    },
    "ams-reporter": {
        "RETRY_BASE_S": "0.2",
        "RETRY_MAX_DELAY_S": "2",
        "WEBHOOK_TIMEOUT_S": "3",
        "WEBHOOK_BREAKER_OPEN_S": "1",
        "WEBHOOK_BREAKER_MAX_OPEN_S": "3",
        "AUTOSTOP_ENABLED": "false",
    },
    "smtp-ingest": {"PUBLISH_TIMEOUT_S": "2"},
    "ledger": {"OUTBOX_INTERVAL_S": "0.2"},
}
#: Postal's webhook retry schedule (2, 3, 6, 10, 15 min) times 0.01: 1.2 s .. 9 s.
SANDBOX_ARGS = ("--retry-factor", "0.01", "--webhook-delay-ms", "20")


# --- the customer's webhook endpoint ------------------------------------------------------


class Receiver:
    """The customer's HTTP endpoint: records events; can be down (503) or slow."""

    def __init__(self) -> None:
        self.mode = "up"
        self.delay_s = 0.0
        self.events: dict[str, Counter[str]] = defaultdict(Counter)
        self.requests = 0
        self.refused = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                return

            def do_POST(self) -> None:
                with contextlib.suppress(ConnectionError):  # the sender gave up (timeout, kill)
                    self._answer()

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                with receiver._lock:
                    receiver.requests += 1
                    down = receiver.mode == "down"
                    if down:
                        receiver.refused += 1
                if down:
                    self.send_response(503)
                    self.end_headers()
                    return
                payload = json.loads(body)
                with receiver._lock:
                    for item in payload if isinstance(payload, list) else [payload]:
                        receiver.events[item["message"]["email"]][item["event"]["name"]] += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/mailgate"

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self, email: str) -> bool:
        with self._lock:
            return self.events.get(email, Counter())["delivered"] > 0


# --- the SMTP load ------------------------------------------------------------------------


def _tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def message(rcpt: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"News <{SENDER}>"
    msg["To"] = rcpt
    msg["Subject"] = f"chaos {rcpt}"
    msg["X-AMS-Message-ID"] = rcpt
    msg["X-AMS-Campaign-ID"] = "chaos"
    msg.set_content("Hello, this is steady load.\n" * 20)
    msg.add_alternative(
        '<html><body><p>Hello</p><a href="https://example.com/offer">offer</a></body></html>',
        subtype="html",
    )
    return msg.as_bytes()


@dataclass
class Load:
    """``threads`` SMTP clients, each on one STARTTLS connection (reconnecting after errors),
    sending one message per ``interval_s`` to a new recipient ``c-<tag>-<n>@example.org``."""

    stack: Stack
    username: str
    password: str
    tag: str
    threads: int = 2
    interval_s: float = 0.1
    results: dict[str, int] = field(default_factory=dict)
    """recipient -> SMTP code after DATA (250, 4xx, 5xx), or -1 (connection lost: unknown)."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next: int = 0

    def start(self) -> Load:
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=60)

    def _rcpt(self) -> str:
        with self._lock:
            self._next += 1
            return f"c-{self.tag}-{self._next}@example.org"

    def _connect(self) -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", self.stack.ports["smtp"], timeout=15)
        smtp.ehlo("ams.example.com")
        smtp.starttls(context=_tls())
        smtp.ehlo("ams.example.com")
        smtp.login(self.username, self.password)
        return smtp

    def _record(self, rcpt: str, code: int) -> None:
        with self._lock:
            self.results[rcpt] = code

    def _run(self) -> None:
        smtp: smtplib.SMTP | None = None
        while not self._stop.is_set():
            if smtp is None:
                try:
                    smtp = self._connect()
                except (OSError, smtplib.SMTPException):
                    smtp = None
                    time.sleep(0.2)
                    continue
            rcpt = self._rcpt()
            try:
                smtp.sendmail(SENDER, [rcpt], message(rcpt))
                self._record(rcpt, 250)
            except smtplib.SMTPRecipientsRefused as exc:
                self._record(rcpt, exc.recipients[rcpt][0])
            except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as exc:
                self._record(rcpt, exc.smtp_code)
            except (OSError, smtplib.SMTPException):
                self._record(rcpt, -1)
                with contextlib.suppress(Exception):
                    smtp.close()
                smtp = None
                continue
            time.sleep(self.interval_s)
        if smtp is not None:
            with contextlib.suppress(Exception):
                smtp.quit()


# --- the stack under test -----------------------------------------------------------------


@dataclass
class RowResult:
    fault: str
    sent: int
    accepted: int
    delivered: int
    lost: int
    duplicated: int
    hooks_lost: int
    transient: int
    transient_delivered: int
    notes: str = ""

    def cells(self) -> list[str]:
        return [
            self.fault,
            str(self.sent),
            str(self.accepted),
            str(self.delivered),
            str(self.lost),
            str(self.duplicated),
            str(self.hooks_lost),
            str(self.transient),
            str(self.transient_delivered),
        ]


HEADERS = [
    "fault",
    "sent",
    "accepted(250)",
    "delivered",
    "lost",
    "duplicated",
    "hooks lost",
    "4xx",
    "4xx delivered",
]


def table(rows: list[RowResult]) -> str:
    grid = [HEADERS, *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(HEADERS))]
    out = []
    for n, line in enumerate(grid):
        out.append(
            " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    notes = [f"  {r.fault}: {r.notes}" for r in rows if r.notes]
    return "\n".join(out + (["notes:", *notes] if notes else []))


class Chaos:
    """The running stack plus the account, credential and customer endpoint of the load."""

    def __init__(self, stack: Stack, receiver: Receiver):
        self.stack = stack
        self.receiver = receiver
        account = stack.admin(
            "POST",
            "/v1/accounts",
            {"name": "chaos", "allowed_sender_domains": ["example.com"], "tracking": True},
        )
        cred = stack.admin("POST", f"/v1/accounts/{account['id']}/credentials", {"name": "load"})
        stack.admin("POST", "/v1/email/webhook", {"url": receiver.url}, account["api_token"])
        self.username, self.password = cred["username"], cred["password"]
        self.rows: list[RowResult] = []

    # --- faults -------------------------------------------------------------------------

    def kill(self, service: str) -> None:
        self.stack.stop_service(service, kill=True)

    def start(self, service: str, **extra_env: str) -> None:
        env = {**self.stack._envs[service], **extra_env}
        self.stack.start_service(service, env)
        if not extra_env:
            self.stack.wait_ready(service)

    def wait_exit(self, service: str, timeout_s: float = 60.0) -> int:
        proc = self.stack.procs[service]
        code = proc.wait(timeout=timeout_s)
        self.stack.procs.pop(service, None)
        return code

    def postal_faults(self, **changes: Any) -> dict[str, Any]:
        req = urllib.request.Request(  # noqa: S310 - loopback
            f"{self.stack.postal_api_url}/__sandbox/faults",
            data=json.dumps(changes).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback
            return dict(json.loads(resp.read()))

    def nats(self, action: Callable[[Any], Any]) -> Any:
        """Run ``await action(js)`` on a fresh NATS connection."""
        import nats

        async def go() -> Any:
            nc = await nats.connect(self.stack.nats_url, connect_timeout=5)
            try:
                return await action(nc.jetstream(timeout=5))
            finally:
                await nc.close()

        return asyncio.run(go())

    def set_mail_stream_max_bytes(self, headroom: int | None) -> None:
        """Make the MAIL stream full (``headroom`` bytes left), or unlimited again (None)."""

        async def change(js: Any) -> None:
            info = await js.stream_info("MAIL")
            config = info.config
            config.max_bytes = -1 if headroom is None else info.state.bytes + headroom
            await js.update_stream(config)

        self.nats(change)

    def postgres_stop(self) -> None:
        import pgserver

        server = self.stack.postgres._server  # type: ignore[union-attr]
        pgserver.pg_ctl(["-m", "fast", "-w", "stop"], pgdata=server.pgdata, user=server.system_user)

    def postgres_start(self) -> None:
        server = self.stack.postgres._server  # type: ignore[union-attr]
        server.ensure_postgres_running()

    def mid_data_client(self, rcpt: str) -> smtplib.SMTP:
        """A client inside DATA: headers and half a body sent, no end-of-data marker."""
        smtp = smtplib.SMTP("127.0.0.1", self.stack.ports["smtp"], timeout=15)
        smtp.ehlo("ams.example.com")
        smtp.starttls(context=_tls())
        smtp.ehlo("ams.example.com")
        smtp.login(self.username, self.password)
        smtp.mail(SENDER)
        smtp.rcpt(rcpt)
        smtp.putcmd("DATA")
        code, _ = smtp.getreply()
        assert code == 354
        smtp.send(message(rcpt)[:400])
        return smtp

    # --- observation --------------------------------------------------------------------

    def metric(self, service: str, name: str) -> float:
        """A counter of a running service (sum over its label sets); 0 when absent."""
        url = f"{self.stack.ops_url(service)}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def postal_counts(self) -> Counter[str]:
        with urllib.request.urlopen(  # noqa: S310 - loopback
            f"{self.stack.postal_api_url}/__sandbox/messages", timeout=30
        ) as resp:
            items = json.loads(resp.read())
        return Counter(str(item["rcpt_to"]) for item in items)

    def evaluate(self, fault: str, results: dict[str, int], settle_s: float) -> RowResult:
        """Wait (up to ``settle_s``) until every accepted message reached Postal and its
        customer; then count."""
        accepted = [r for r, code in results.items() if code == 250]
        deadline = time.monotonic() + settle_s
        while True:
            counts = self.postal_counts()
            lost = [r for r in accepted if counts[r] == 0]
            hooks_lost = [r for r in accepted if not self.receiver.delivered(r)]
            if (not lost and not hooks_lost) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # late duplicates, if any, show up now
        counts = self.postal_counts()
        transient = [r for r, code in results.items() if 400 <= code < 500]
        row = RowResult(
            fault=fault,
            sent=len(results),
            accepted=len(accepted),
            delivered=sum(1 for r in accepted if counts[r] > 0),
            lost=len(lost),
            duplicated=sum(max(0, counts[r] - 1) for r in results),
            hooks_lost=len(hooks_lost),
            transient=len(transient),
            transient_delivered=sum(1 for r in transient if counts[r] > 0),
        )
        self.rows.append(row)
        return row

    def run(
        self,
        fault: str,
        inject: Callable[[], None],
        *,
        warmup_s: float = 1.5,
        after_s: float = 2.0,
        settle_s: float = 60.0,
        interval_s: float = 0.1,
    ) -> RowResult:
        tag = f"{len(self.rows) + 1:02d}"
        load = Load(self.stack, self.username, self.password, tag, interval_s=interval_s).start()
        try:
            time.sleep(warmup_s)
            inject()
            time.sleep(after_s)
        finally:
            load.stop()
        return self.evaluate(fault, dict(load.results), settle_s)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
