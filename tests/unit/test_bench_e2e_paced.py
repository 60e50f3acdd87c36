"""The end-to-end bench's paced phases: their rates, each phase's row, and the highest paced
intake that met the latency goal (p99 from the 250 to Postal's receipt under 1 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_e2e

from common import Row


def test_rates_default_to_three_shares_of_the_flood_lowest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BENCH_E2E_PACED_RATE", raising=False)
    monkeypatch.delenv("BENCH_E2E_PACED_PCT", raising=False)
    assert bench_e2e.paced_rates(200.0, quick=False) == pytest.approx([100.0, 130.0, 160.0])
    assert bench_e2e.paced_rates(200.0, quick=True) == pytest.approx([160.0])
    monkeypatch.setenv("BENCH_E2E_PACED_PCT", "90, 40")
    assert bench_e2e.paced_rates(200.0, quick=False) == pytest.approx([80.0, 180.0])
    monkeypatch.setenv("BENCH_E2E_PACED_RATE", "120,0,60")  # a fixed rate wins; 0 is no phase
    assert bench_e2e.paced_rates(200.0, quick=False) == [60.0, 120.0]


def test_phase_row_reads_only_its_own_messages() -> None:
    accepted = {"a": 10.0, "b": 11.0, "flood": 1.0}
    received = {"a": 10.05, "b": 11.2, "flood": 9.0}
    hooks = {("a", "sent"): 10.1, ("flood", "sent"): 9.5}
    phase = bench_e2e.PacedPhase(
        rate=100.0,
        intake=98.0,
        total=2,
        ids={"a", "b"},
        cpu={"ledger": 0.004, "nats-server": 0.006, "ams-fake": 0.0},
        drain_note="started once every JetStream consumer had drained the flood (0.0s)",
        nats_msgs={"ledger": 21, "postal-sender": 31, "bench": 500, "webhook-ingest": 0},
    )
    row = phase.row(200.0, received, accepted, hooks)
    assert row.benchmark.startswith("e2e paced 100/s (50% of the flood): ")
    assert row.rate_per_s == 98.0
    assert row.p50_ms == pytest.approx(50.0)  # nearest rank of [50, 200] ms
    assert row.p99_ms == pytest.approx(200.0)
    assert "'sent' webhook p50 100 ms, p99 100 ms (1/2)" in row.note
    assert "nats-server 3.00, ledger 2.00" in row.note
    assert "ams-fake" not in row.note
    assert row.note.endswith("; NATS messages per msg: postal-sender 15.50, ledger 10.50")


def _paced(rate: float, p99: float) -> Row:
    return Row(benchmark=f"e2e paced {rate}", rate_per_s=rate, p50_ms=p99 / 4, p99_ms=p99)


def test_sustained_row_is_the_fastest_phase_within_the_goal() -> None:
    row = bench_e2e.sustained_row([_paced(70, 85), _paced(95, 640), _paced(115, 1250)])
    assert row.benchmark == "e2e sustained with p99 SMTP 250 -> Postal < 1 s"
    assert (row.rate_per_s, row.p99_ms) == (95, 640)
    assert row.note == (
        "the highest paced intake that met it, of 70/s p99 85 ms, 95/s p99 640 ms, "
        "115/s p99 1,250 ms"
    )


def test_sustained_row_says_when_no_phase_met_the_goal() -> None:
    row = bench_e2e.sustained_row([_paced(70, 1001), _paced(95, 2000)])
    assert row.rate_per_s is None and row.p99_ms is None
    assert row.note.startswith("no paced intake met it: 70/s p99 1,001 ms")
