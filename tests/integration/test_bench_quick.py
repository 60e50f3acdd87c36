"""`make bench` keeps working: every benchmark module runs in quick mode and prints figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# Every module in quick mode takes ~100 s alone on the 2-core machine: more than the suite's
# 120 s default per test once other tests load the machine. The run itself is bounded below.
@pytest.mark.timeout(600)
def test_every_benchmark_module_runs_and_prints_a_row_with_figures() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py"))
    for module in modules:
        assert re.search(rf"^  {module}: [1-9]\d* rows", proc.stdout, re.M), proc.stdout
    table = proc.stdout.split("-----\n", 1)[1]
    rows = [line for line in table.splitlines() if line.strip()]
    assert rows and all(re.search(r"\d", row) for row in rows)
