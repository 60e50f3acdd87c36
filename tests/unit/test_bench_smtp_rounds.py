"""The SMTP bench's rounds: servers rotate between rounds, each row shows the medians over
rounds, and the ratios are the medians of each round's paired ratios, with their range."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_smtp
from bench_smtp import Case, Payload, Sample, Server


def _server(name: str) -> Server:
    return Server(name, 0, lambda: 0.0)


SERVERS = [_server("smtp-ingest x2"), _server("aiosmtpd bare x2"), _server("postfix (hold queue)")]
CASE = Case("2 KB", Payload(b"Subject: x\r\n\r\nbody\r\n"), False, False, 100)


def _sample(rate: float, cpu: float = 1.0, storage: float | None = None) -> Sample:
    return Sample(
        rate_per_s=rate,
        p50_ms=rate / 100,
        p99_ms=rate / 10,
        cpu_s_per_1k=cpu,
        client_cpu_s_per_1k=cpu / 2,
        storage_cpu_s_per_1k=storage,
    )


def test_every_server_runs_in_every_position_over_as_many_rounds() -> None:
    orders = [[s.name for s in bench_smtp.rotated(SERVERS, r)] for r in range(3)]
    for position in range(3):
        assert {order[position] for order in orders} == {s.name for s in SERVERS}
    assert orders[0] == [s.name for s in SERVERS]
    assert bench_smtp.rotated(SERVERS, 3) == SERVERS


def test_rows_show_medians_and_paired_ratios_with_their_range() -> None:
    ours = [_sample(600, 1.0, 0.3), _sample(720, 1.2, 0.2), _sample(660, 1.1, 0.4)]
    bare = [_sample(1000, 1.1), _sample(900, 1.0), _sample(1100, 1.2)]
    postfix = [_sample(500, 2.0), _sample(600, 2.0), _sample(800, 1.0)]
    samples = {"smtp-ingest x2": ours, "aiosmtpd bare x2": bare, "postfix (hold queue)": postfix}

    rows = bench_smtp.case_rows(CASE, SERVERS, samples, workers=2)

    ingest, plain, pf = rows
    assert ingest.benchmark == "smtp-ingest x2 2 KB, plain, conn per msg"
    assert ingest.rate_per_s == 660  # median of 600/720/660
    assert ingest.p99_ms == 66
    assert ingest.cpu_s_per_1k == pytest.approx(1.1)
    # Paired, round by round: Postfix 600/500, 720/600, 660/800 -> 1.20, 1.20, 0.82: 1.20 (the
    # median rates would say 660/600 = 1.10); bare 0.60, 0.80, 0.60: 0.60 (not 660/1000);
    # CPU 0.5, 0.6, 1.1: 0.6.
    assert ingest.note.startswith(
        "1.20x Postfix (rounds 0.82-1.20), 0.60x bare (rounds 0.60-0.80; 2 procs each), "
        "0.6x Postfix CPU; + nats-server 0.300 CPU s/1k; client 0.550 CPU s/1k"
    ), ingest.note
    assert ingest.note.endswith("; rates 600/720/660")
    assert plain.note == (
        "accepts and discards; same client, same processes; client 0.550 CPU s/1k; "
        "rates 1000/900/1100"
    )
    assert pf.rate_per_s == 600
    assert pf.note.startswith("no AUTH (mynetworks); queue file fsynced before 250; client ")


def test_one_round_keeps_the_single_run_notes() -> None:
    samples = {
        "smtp-ingest x2": [_sample(800, 1.0, 0.25)],
        "aiosmtpd bare x2": [_sample(1000, 1.25)],
        "postfix (hold queue)": [_sample(640, 1.25)],
    }
    ingest, *_ = bench_smtp.case_rows(CASE, SERVERS, samples, workers=2)
    assert ingest.note == (
        "1.25x Postfix, 0.80x bare (2 procs each), 0.8x Postfix CPU; "
        "+ nats-server 0.250 CPU s/1k; client 0.500 CPU s/1k"
    )


def test_smtp_ingest_alone_gets_its_own_figures() -> None:
    (row,) = bench_smtp.case_rows(
        CASE, SERVERS[:1], {"smtp-ingest x2": [_sample(500, 1.0, 0.2), _sample(700)]}, workers=2
    )
    assert row.rate_per_s == 600
    assert row.note == "+ nats-server 0.200 CPU s/1k; client 0.500 CPU s/1k; rates 500/700"
