"""mailgate benchmarks: `make bench`. Bounded in time, loopback only, prints one table.

Every ``bench/bench_*.py`` module defines ``async def run(opts: Options) -> list[Row]``;
this driver runs them in name order (or those named in ``BENCH=a,b``) and prints one table.
``--quick`` makes each module do a small amount of work (used by the suite to keep
`make bench` from rotting).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import Options, Row  # noqa: E402


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(rows: list[Row]) -> str:
    header = f"{'benchmark':<62} {'per s':>10} {'p50 ms':>8} {'p99 ms':>8} {'cpu s/1k':>9}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.benchmark:<62} {_fmt(r.rate_per_s, 0):>10} {_fmt(r.p50_ms, 2):>8}"
            f" {_fmt(r.p99_ms, 2):>8} {_fmt(r.cpu_s_per_1k, 3):>9}  {r.note}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=os.environ.get("BENCH", ""))
    args = parser.parse_args()
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if args.only:
        wanted = {f"bench_{n.removeprefix('bench_')}" for n in args.only.split(",") if n}
        names = [n for n in names if n in wanted]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    opts = Options(quick=args.quick)
    rows: list[Row] = []
    for name in names:
        module = importlib.import_module(name)
        t0 = time.monotonic()
        got = asyncio.run(module.run(opts))
        print(f"  {name}: {len(got)} rows in {time.monotonic() - t0:.1f}s", flush=True)
        rows.extend(got)
    print()
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
