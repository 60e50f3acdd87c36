"""A throwaway Postfix instance for the SMTP comparison: loopback only, queue only.

The instance lives in a temporary directory (its own main.cf, master.cf and queue) and runs
``postfix -c <dir> start-fg``: smtpd on one loopback port accepts mail from 127.0.0.0/8 and
``check_client_access static:HOLD`` puts every message on the hold queue, so each message
is written (and fsynced) into Postfix's queue before the 250, as Postfix always does, and
nothing is ever delivered (no DNS, no local delivery, no qmgr work on it).

``ensure_postfix(install)`` finds postfix/smtp-source, or with ``install`` (BENCH_INSTALL=1,
as root) installs the Debian package ``postfix`` non-interactively.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from common import apt_install, process_tree_cpu_s

MAIN_CF = """\
compatibility_level = 3.6
config_directory = {dir}
queue_directory = {dir}/queue
data_directory = {dir}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.localhost
mydomain = bench.localhost
myorigin = $myhostname
mydestination =
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_banner = $myhostname ESMTP
smtpd_client_restrictions = check_client_access static:HOLD
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
message_size_limit = 10485760
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = may
smtpd_tls_session_cache_database =
default_process_limit = 100
alias_maps =
alias_database =
local_recipient_map =
biff = no
"""

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def ensure_postfix(install: bool) -> str:
    """``""`` when postfix (and smtp-source) can run, else why not (the skip note)."""
    if shutil.which("postfix") or Path("/usr/sbin/postfix").exists():
        return ""
    if not install:
        return "skipped: postfix not installed (BENCH_INSTALL=1 as root installs it)"
    if os.geteuid() != 0:
        return "skipped: postfix not installed and BENCH_INSTALL=1 needs root"
    return apt_install("postfix")


class Postfix:
    """``start()`` a loopback-only, hold-everything Postfix on ``port``; ``stop()``."""

    def __init__(self, directory: Path, port: int, cert: Path, key: Path):
        self.dir = directory
        self.port = port
        self.cert = cert
        self.key = key
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Postfix:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # noqa: S103 - Postfix's users must traverse it
        for sub in ("data", "queue"):
            (d / sub).mkdir(exist_ok=True)
        shutil.chown(d / "data", "postfix")
        # smtpd (user postfix) reads the key itself when it is not chrooted.
        key = d / "tls-key.pem"
        shutil.copyfile(self.key, key)
        os.chmod(key, 0o640)
        shutil.chown(key, "root", "postfix")
        (d / "main.cf").write_text(MAIN_CF.format(dir=d, cert=self.cert, key=key))
        (d / "master.cf").write_text(MASTER_CF.format(port=self.port))
        postfix = shutil.which("postfix") or "/usr/sbin/postfix"
        subprocess.run(  # noqa: S603 - creates the queue directories
            [postfix, "-c", str(d), "set-permissions", "create-missing"],
            capture_output=True,
            check=False,
        )
        subprocess.run([postfix, "-c", str(d), "check"], capture_output=True, check=False)  # noqa: S603
        self.proc = subprocess.Popen(  # noqa: S603
            [postfix, "-c", str(d), "start-fg"],
            stdout=open(d / "start-fg.log", "ab"),  # noqa: SIM115 - lives with the process
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def master_pid(self) -> int:
        """The master process (``start-fg`` execs it, so the Popen pid)."""
        assert self.proc is not None
        return self.proc.pid

    def cpu_s(self) -> float:
        """CPU seconds of the master and every Postfix process it started (or reaped)."""
        return process_tree_cpu_s(self.master_pid)

    def held(self) -> int:
        """Messages in the hold queue."""
        hold = self.dir / "queue" / "hold"
        return sum(1 for _ in hold.rglob("*") if _.is_file()) if hold.exists() else 0

    def clear(self) -> None:
        """Empty the hold queue between rows (``postsuper -d ALL hold``)."""
        postsuper = shutil.which("postsuper") or "/usr/sbin/postsuper"
        subprocess.run(  # noqa: S603
            [postsuper, "-c", str(self.dir), "-d", "ALL", "hold"], capture_output=True, check=False
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # ``start-fg`` leaves the master as a child of postfix-script, which SIGTERM alone
        # would orphan (a master left running after the bench): ``postfix stop`` reaches
        # the master through its pid file, and it stops its children.
        postfix = shutil.which("postfix") or "/usr/sbin/postfix"
        subprocess.run(  # noqa: S603
            [postfix, "-c", str(self.dir), "stop"], capture_output=True, check=False, timeout=30
        )
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "maillog"
        if not path.exists():
            return "(no maillog)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
