"""What the benchmarks do about tools they compare with or load through: install them only
when asked (BENCH_INSTALL=1 as root), say why a row is skipped, and pick the tracker's load
client as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_tracker

import common


def _runs(monkeypatch: pytest.MonkeyPatch, codes: list[int]) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        assert kwargs["env"]["DEBIAN_FRONTEND"] == "noninteractive"
        return subprocess.CompletedProcess(argv, codes[len(calls) - 1], "", "E: no such package")

    monkeypatch.setattr(common.subprocess, "run", run)
    return calls


def test_apt_install_updates_then_installs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _runs(monkeypatch, [0, 0])
    assert common.apt_install("wrk") == ""
    assert calls == [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "wrk"]]


def test_apt_install_failure_is_the_skip_note(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _runs(monkeypatch, [0, 100])
    note = common.apt_install("nginx-light")
    assert note == ("skipped: apt-get install -y -q nginx-light failed: E: no such package")
    assert len(calls) == 2


def test_tracker_client_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_tracker.shutil, "which", lambda name: None)
    monkeypatch.delenv("BENCH_TRACKER_CLIENT", raising=False)
    assert bench_tracker.choose_client(install=False)[0] == "python"
    monkeypatch.setenv("BENCH_TRACKER_CLIENT", "wrk")
    with pytest.raises(RuntimeError, match="wrk is not installed"):
        bench_tracker.choose_client(install=False)
    monkeypatch.setattr(bench_tracker.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert bench_tracker.choose_client(install=False)[0] == "wrk"
    monkeypatch.setenv("BENCH_TRACKER_CLIENT", "python")
    assert bench_tracker.choose_client(install=False)[0] == "python"


def test_nginx_not_installed_without_permission(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_tracker.shutil, "which", lambda name: None)
    monkeypatch.setattr(bench_tracker, "Path", lambda _: Path("/nonexistent/nginx"))
    calls = _runs(monkeypatch, [])
    assert bench_tracker.ensure_nginx(install=False) == (
        "skipped: nginx not installed (BENCH_INSTALL=1 as root installs it)"
    )
    assert calls == []
