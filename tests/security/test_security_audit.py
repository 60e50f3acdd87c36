"""tools/audit.py: the offline OSV evaluator finds known-vulnerable versions; the lock is clean."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mailgate_audit", ROOT / "tools" / "audit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mailgate_audit"] = module
    spec.loader.exec_module(module)
    return module


audit = _load()


def test_a_known_vulnerable_aiohttp_is_found_in_the_vendored_snapshot() -> None:
    findings = audit.audit({"aiohttp": "3.8.0"}, audit.load_advisories())
    ids = {f.advisory for f in findings}
    assert "PYSEC-2023-120" in ids  # CVE-2023-37276, fixed in 3.8.5
    assert all(f.package == "aiohttp" and f.version == "3.8.0" for f in findings)
    assert any("3.8.5" in f.fixed for f in findings)


def test_names_are_normalized_and_fixed_versions_are_clean() -> None:
    advisories = list(audit.load_advisories())
    assert audit.audit(audit.parse_requirements("PyYAML==5.3\n"), advisories)
    assert not audit.audit({"aiohttp": "3.10.11"}, advisories)
    assert not audit.audit({"jinja2": "3.1.6"}, advisories)


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("0.9", False),
        ("1.0", True),
        ("1.4.2", True),
        ("1.5", False),
        ("2.0", True),
        ("2.1", True),
        ("2.1.1", False),
    ],
)
def test_osv_ecosystem_ranges_open_at_introduced_and_close_at_fixed_or_last_affected(
    version: str, expected: bool
) -> None:
    from packaging.version import Version

    events = [
        {"introduced": "1.0"},
        {"fixed": "1.5"},
        {"introduced": "2.0"},
        {"last_affected": "2.1"},
    ]
    assert audit.in_ecosystem_range(Version(version), events) is expected


def test_withdrawn_advisories_and_other_ecosystems_do_not_count() -> None:
    base = {
        "id": "X-1",
        "affected": [
            {
                "package": {"name": "demo", "ecosystem": "PyPI"},
                "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}]}],
            }
        ],
    }
    assert audit.audit({"demo": "1.0"}, [base])
    assert not audit.audit({"demo": "1.0"}, [{**base, "withdrawn": "2024-01-01T00:00:00Z"}])
    npm = {
        **base,
        "affected": [{**base["affected"][0], "package": {"name": "demo", "ecosystem": "npm"}}],
    }
    assert not audit.audit({"demo": "1.0"}, [npm])


def test_the_lock_has_no_known_vulnerable_version_and_says_which_sources_ran() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "audit.py"), "--offline-only"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "audit (offline):" in done.stdout and "snapshot" in done.stdout
    assert "no known vulnerable locked versions" in done.stdout
