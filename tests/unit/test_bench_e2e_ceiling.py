"""The end-to-end bench's CPU-bound ceiling: cores over the flood's CPU per message, and what
the processes that are not mailgate's services would allow alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_e2e


def test_ceiling_is_cores_over_cpu_per_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_e2e.os, "cpu_count", lambda: 2)
    count = 1000
    cpu = {"smtp-ingest": 1.5, "ledger": 1.0, "postal-sandbox": 1.5, "ams-fake": 0.001}
    infra = {"nats-server": 2.0, "postgres": 1.0}
    row = bench_e2e._ceiling_row(cpu, infra, own_cpu=1.0, count=count)
    # 2.5 ms services + 3 infra + 1.5 sandbox + 0.001 fake + 1 client = 8.001 ms per message
    assert row.rate_per_s == pytest.approx(2000 / 8.001)
    assert row.benchmark == "e2e flood: CPU-bound ceiling on 2 cores"
    assert "mailgate's services 2.50" in row.note
    assert "nats-server + Postgres 3.00" in row.note
    assert "postal-sandbox 1.50" in row.note
    assert "ams-fake" not in row.note  # below 0.005 ms per message
    assert "SMTP client + webhook receiver 1.00" in row.note
    assert row.note.endswith(f"the rest allows {2000 / 5.501:,.0f}/s")
