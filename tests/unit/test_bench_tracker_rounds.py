"""The tracker bench's rounds: targets rotate between rounds, each row shows the medians over
rounds, and the tracker's ratios are the medians of each round's paired ratios, with their
range; a row whose load client used most of a core says it is client-bound."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_tracker
from bench_tracker import Target, TrackerSample

from common import rotated

TARGETS = [
    Target("bare GIF", 1, "/gif", (1,), 200),
    Target("pixel", 2, "/track/o/x", (2,), 200, tracked=True),
    Target("bare 302", 1, "/redirect", (1,), 302),
    Target("click", 2, "/track/c/x", (2,), 302, tracked=True),
    Target("nginx", 3, "/gif", (3,), 200, tree=True),
]


def _sample(
    rate: float, client: float = 0.02, durable: float | None = None, nats: float | None = None
) -> TrackerSample:
    return TrackerSample(
        rate_per_s=rate,
        p50_ms=rate / 1000,
        p99_ms=rate / 100,
        cpu_s_per_1k=rate / 100_000,
        client_cpu_s_per_1k=client,
        storage_cpu_s_per_1k=nats,
        durable_per_s=durable,
    )


def test_no_target_always_runs_first_or_last() -> None:
    orders = [[t.key for t in rotated(TARGETS, r)] for r in range(3)]
    assert orders[0] == [t.key for t in TARGETS]
    assert len({order[0] for order in orders}) == 3
    assert len({order[-1] for order in orders}) == 3
    assert all(sorted(order) == sorted(orders[0]) for order in orders)
    assert rotated(TARGETS, len(TARGETS)) == TARGETS


def test_rows_show_medians_and_paired_ratios_with_their_range() -> None:
    samples = {
        "bare GIF": [_sample(10_000), _sample(14_000), _sample(12_000)],
        "pixel": [
            _sample(11_000, durable=10_900, nats=0.02),
            _sample(12_600, durable=12_500, nats=0.01),
            _sample(10_800, durable=10_700, nats=0.03),
        ],
        "bare 302": [_sample(9_000), _sample(10_000), _sample(8_000)],
        "click": [_sample(8_100), _sample(9_500), _sample(8_000)],
        "nginx": [_sample(20_000, client=0.05), _sample(28_000, client=0.036), _sample(18_000)],
    }

    rows = bench_tracker.target_rows(samples, "wrk")

    pixel = rows["pixel"]
    assert pixel.benchmark == "tracker open pixel GET /track/o/<token>, 50 conns"
    assert pixel.rate_per_s == 11_000  # median of 11,000/12,600/10,800
    assert pixel.p99_ms == 110
    assert pixel.cpu_s_per_1k == pytest.approx(0.11)
    # Paired, round by round: 1.10, 0.90, 0.90 -> 0.90 (the median rates would say 11,000 /
    # 12,000 = 0.92); nginx 0.55, 0.45, 0.60 -> 0.55.
    assert pixel.note == (
        "0.90x of bare GIF (rounds 0.90-1.10), 0.55x of nginx (rounds 0.45-0.60); "
        "10,900 events/s made durable; + nats-server 0.020 CPU s/1k; "
        "wrk client 0.020 CPU s/1k; rates 11000/12600/10800"
    )
    # 0.90, 0.95, 1.00
    assert rows["click"].note.startswith("0.95x of bare 302 (rounds 0.90-1.00); wrk client 0.020 ")
    assert rows["bare GIF"].note == (
        "same GIF and headers, no token/NATS; wrk client 0.020 CPU s/1k; rates 10000/14000/12000"
    )
    # The client used 0.05 * 20 = 1.0, 0.036 * 28 = 1.01 and 0.02 * 18 = 0.36 of a core.
    assert rows["nginx"].rate_per_s == 20_000
    assert rows["nginx"].note == (
        "1 worker, static file; wrk client 0.036 CPU s/1k; rates 20000/28000/18000; "
        "client-bound: the load client used 1.00 of a core"
    )
    assert list(rows) == ["bare GIF", "pixel", "bare 302", "click", "nginx"]


def test_one_round_and_no_nginx() -> None:
    samples = {
        "bare GIF": [_sample(10_000)],
        "pixel": [_sample(9_700, durable=9_650.4, nats=0.015)],
        "bare 302": [_sample(9_000)],
        "click": [_sample(9_900, durable=9_800)],
    }
    rows = bench_tracker.target_rows(samples)
    assert "nginx" not in rows
    assert rows["pixel"].note == (
        "0.97x of bare GIF; 9,650 events/s made durable; + nats-server 0.015 CPU s/1k; "
        "python client 0.020 CPU s/1k"
    )
    assert (
        rows["click"].note
        == "1.10x of bare 302; 9,800 events/s made durable; python client 0.020 CPU s/1k"
    )
    assert rows["bare 302"].rate_per_s == 9_000


def test_wrk_runs_whole_seconds() -> None:
    assert [bench_tracker.wrk_seconds(s) for s in (0.125, 0.5, 3.33, 3.6)] == [1, 1, 3, 4]
