"""Dependency audit of uv.lock: no locked version may have a known vulnerability.

Two sources, used in this order:

1. **Online** (``pip-audit`` against PyPI's vulnerability data), but only when a canary
   proves the service answers for real: ``aiohttp 3.8.0`` (known vulnerable) must come back
   with vulnerabilities. A registry mirror that serves package JSON without vulnerability
   data (this CI machine's case) would make pip-audit pass vacuously, so it does not count.
2. **Offline**, always: the lock's exact versions are evaluated against a vendored snapshot
   of the PyPA advisory database (OSV YAML under ``tools/audit_advisories/``; only the
   advisories of packages in our lock; ``SNAPSHOT.json`` records the source commit and its
   date). ``--refresh PATH`` re-vendors from a checkout of github.com/pypa/advisory-database.

The exit status is 1 when any source finds a vulnerable locked version, 0 otherwise. The
output says which sources ran and how old the snapshot is, so a stale snapshot is visible.

Usage: ``python tools/audit.py [--offline-only] [--refresh ADVISORY_DB_GIT_DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
ADVISORIES = ROOT / "tools" / "audit_advisories"
CANARY = ("aiohttp", "3.8.0")
_REQ = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")


def normalize(name: str) -> str:
    """PEP 503 name normalization (``PyYAML`` -> ``pyyaml``, ``typing_extensions`` ->
    ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --- the lock -----------------------------------------------------------------------------


def uv_binary() -> str:
    found = shutil.which("uv")
    if found:
        return found
    local = ROOT / ".tools" / "bin" / "uv"
    if local.exists():
        return str(local)
    raise SystemExit("audit: uv not found (make env installs .tools/bin/uv)")


def export_lock() -> str:
    """``uv export`` of every locked third-party package (requirements format, pinned)."""
    out = subprocess.run(  # noqa: S603 - our own uv, fixed arguments
        [
            uv_binary(),
            "export",
            "--frozen",
            "--all-packages",
            "--no-emit-workspace",
            "--no-hashes",
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout


def parse_requirements(text: str) -> dict[str, str]:
    """``name==version`` lines (markers ignored: we audit everything the lock can install)."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        match = _REQ.match(line.strip())
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


# --- OSV evaluation -----------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    package: str
    version: str
    advisory: str
    aliases: tuple[str, ...]
    fixed: tuple[str, ...]
    summary: str

    def line(self) -> str:
        also = f" ({', '.join(self.aliases[:3])})" if self.aliases else ""
        fix = f"; fixed in {', '.join(self.fixed)}" if self.fixed else "; no fixed version"
        return f"{self.package}=={self.version}: {self.advisory}{also}{fix} - {self.summary}"


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def in_ecosystem_range(version: Version, events: list[dict[str, Any]]) -> bool:
    """OSV ``ECOSYSTEM`` range semantics: events sorted by version; ``introduced`` opens,
    ``fixed`` (exclusive) and ``last_affected`` (inclusive) close. ``introduced: 0`` is -inf."""
    points: list[tuple[Version | None, str, int]] = []
    for event in events:
        for kind, raw in event.items():
            if kind not in ("introduced", "fixed", "last_affected", "limit"):
                continue
            value = None if (kind == "introduced" and str(raw) == "0") else _version(str(raw))
            if value is None and not (kind == "introduced" and str(raw) == "0"):
                continue  # an unparseable bound cannot be evaluated
            order = {"introduced": 0, "last_affected": 1, "fixed": 2, "limit": 2}[kind]
            points.append((value, kind, order))
    points.sort(key=lambda p: (p[0] is not None, p[0] or Version("0"), p[2]))
    affected = False
    for bound, kind, _ in points:
        if kind == "introduced":
            if bound is None or version >= bound:
                affected = True
        elif kind == "fixed" or kind == "limit":
            if bound is not None and version >= bound:
                affected = False
        elif kind == "last_affected" and bound is not None and version > bound:
            affected = False
    return affected


def is_affected(advisory: dict[str, Any], package: str, version: str) -> list[str] | None:
    """The fixed versions when ``package==version`` is affected by ``advisory``, else None."""
    if advisory.get("withdrawn"):
        return None
    parsed = _version(version)
    for affected in advisory.get("affected") or []:
        pkg = affected.get("package") or {}
        if pkg.get("ecosystem") != "PyPI" or normalize(str(pkg.get("name", ""))) != package:
            continue
        fixed = [
            str(e["fixed"])
            for r in affected.get("ranges") or []
            for e in r.get("events") or []
            if "fixed" in e and r.get("type") == "ECOSYSTEM"
        ]
        listed = {str(v) for v in affected.get("versions") or []}
        if version in listed:
            return fixed
        if parsed is None:
            continue
        if listed and parsed in {_version(v) for v in listed}:
            return fixed
        for rng in affected.get("ranges") or []:
            if rng.get("type") == "ECOSYSTEM" and in_ecosystem_range(
                parsed, rng.get("events") or []
            ):
                return fixed
    return None


def load_advisories(directory: Path = ADVISORIES) -> Iterator[dict[str, Any]]:
    for path in sorted(directory.glob("*/*.yaml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict):
            yield data


def audit(pins: dict[str, str], advisories: Iterable[dict[str, Any]]) -> list[Finding]:
    findings: list[Finding] = []
    for advisory in advisories:
        for affected in advisory.get("affected") or []:
            name = normalize(str((affected.get("package") or {}).get("name", "")))
            if name not in pins:
                continue
            fixed = is_affected(advisory, name, pins[name])
            if fixed is not None:
                summary = str(advisory.get("summary") or advisory.get("details") or "")
                findings.append(
                    Finding(
                        package=name,
                        version=pins[name],
                        advisory=str(advisory.get("id")),
                        aliases=tuple(advisory.get("aliases") or ()),
                        fixed=tuple(fixed),
                        summary=" ".join(summary.split())[:120],
                    )
                )
                break
    return sorted(set(findings), key=lambda f: (f.package, f.advisory))


# --- the online service -------------------------------------------------------------------


def online_service_works(timeout_s: float = 4.0) -> bool:
    """True when PyPI answers with vulnerability data for the known-vulnerable canary."""
    name, version = CANARY
    url = f"https://pypi.org/pypi/{name}/{version}/json"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False
    return bool(data.get("vulnerabilities"))


def run_pip_audit(requirements: str) -> int:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(requirements)
        path = fh.name
    try:
        pip_audit = Path(sys.executable).parent / "pip-audit"
        cmd = [str(pip_audit), "-r", path, "--no-deps", "--disable-pip", "--progress-spinner=off"]
        return subprocess.run(cmd, check=False, timeout=300).returncode  # noqa: S603
    finally:
        os.unlink(path)


# --- vendoring ----------------------------------------------------------------------------


def refresh(advisory_git_dir: Path, packages: Iterable[str]) -> int:
    """Copy ``vulns/<pkg>/*.yaml`` for our packages from a git checkout (no work tree needed)."""

    def git(*args: str) -> str:
        return subprocess.run(  # noqa: S603
            ["git", "--git-dir", str(advisory_git_dir), *args],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    commit, date = git("log", "-1", "--format=%H %cI", "HEAD").split()
    available = {
        p.rsplit("/", 1)[-1] for p in git("ls-tree", "--name-only", "HEAD", "vulns/").split()
    }
    if ADVISORIES.exists():
        shutil.rmtree(ADVISORIES)
    ADVISORIES.mkdir(parents=True)
    count = 0
    vendored = []
    for package in sorted(set(packages)):
        if package not in available:
            continue
        vendored.append(package)
        for path in git("ls-tree", "--name-only", "HEAD", f"vulns/{package}/").split():
            target = ADVISORIES / package / path.rsplit("/", 1)[-1]
            target.parent.mkdir(exist_ok=True)
            target.write_text(git("show", f"HEAD:{path}"))
            count += 1
    snapshot = {
        "source": "https://github.com/pypa/advisory-database",
        "commit": commit,
        "commit_date": date,
        "packages_with_advisories": vendored,
        "advisories": count,
    }
    (ADVISORIES / "SNAPSHOT.json").write_text(json.dumps(snapshot, indent=2) + "\n")
    print(f"vendored {count} advisories for {len(vendored)} packages from {commit[:12]} ({date})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--offline-only", action="store_true", help="skip the online service")
    parser.add_argument("--refresh", type=Path, help="re-vendor from an advisory-database git dir")
    args = parser.parse_args(argv)
    requirements = export_lock()
    pins = parse_requirements(requirements)
    if args.refresh:
        return refresh(args.refresh, pins)
    snapshot = json.loads((ADVISORIES / "SNAPSHOT.json").read_text())
    findings = audit(pins, load_advisories())
    print(
        f"audit (offline): {len(pins)} locked packages against {snapshot['advisories']} "
        f"PyPA advisories, snapshot {snapshot['commit'][:12]} of {snapshot['commit_date']}"
    )
    for finding in findings:
        print("  VULNERABLE " + finding.line())
    status = 1 if findings else 0
    if args.offline_only or os.environ.get("AUDIT_OFFLINE") == "1":
        print("audit (online): skipped by request")
    elif online_service_works():
        print("audit (online): pip-audit against PyPI vulnerability data")
        status = max(status, 1 if run_pip_audit(requirements) else 0)
    else:
        print(
            "audit (online): skipped - PyPI vulnerability data is not reachable from here "
            f"(canary {CANARY[0]}=={CANARY[1]} came back without advisories)"
        )
    print("audit: " + ("FAILED" if status else "no known vulnerable locked versions"))
    return status


if __name__ == "__main__":
    sys.exit(main())
