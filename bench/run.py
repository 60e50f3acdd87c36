"""mailgate benchmarks: `make bench`. Bounded in time, loopback only, prints one table.

Every ``bench/bench_*.py`` module defines ``async def run(opts: Options) -> list[Row]``;
this driver runs them in name order (or those named in ``BENCH=a,b`` / ``--only a,b``), each
within a time budget, and prints one table. ``--quick`` makes each module do a small amount
of work (used by the suite to keep `make bench` from rotting).

A full run writes ``bench/results/<date>-<commit>.json`` and ``.md`` (``--no-save`` does
not; ``--save`` saves a quick run too); ``--update-readme`` replaces the README's benchmark
section (between ``<!-- bench:start -->`` and ``<!-- bench:end -->``) with this run's table
and the machine it ran on. ``BENCH_INSTALL=1`` (as root) lets modules install the Debian
packages they compare against (postfix, nginx). ``BENCH_PROFILE=<dir>`` records py-spy
profiles of the services the modules start.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import Options, Row  # noqa: E402

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
#: Seconds one module may take (quick / full); past it the module is cancelled and noted.
BUDGET_S = (90.0, 900.0)


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


def render_markdown(rows: list[Row]) -> str:
    lines = [
        "| benchmark | per s | p50 ms | p99 ms | CPU s / 1k | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        note = r.note.replace("|", "/")
        lines.append(
            f"| {r.benchmark} | {_fmt(r.rate_per_s, 0)} | {_fmt(r.p50_ms, 2)} "
            f"| {_fmt(r.p99_ms, 2)} | {_fmt(r.cpu_s_per_1k, 3)} | {note} |"
        )
    return "\n".join(lines)


def _git(*args: str) -> str:
    try:
        done = subprocess.run(  # noqa: S603 - read-only git queries
            ["git", *args],  # noqa: S607 - git from PATH, as a developer runs it
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def commit_id() -> str:
    head = _git("rev-parse", "--short", "HEAD") or "nogit"
    return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict[str, object]:
    """What the figures depend on: CPU, cores, memory, kernel, Python, load when started."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "load_avg_1m_at_start": round(load[0], 2),
    }


def bench_settings() -> dict[str, str]:
    """The BENCH_* variables a run was given (they change what a row measures)."""
    skip = {"BENCH_PROFILE", "BENCH_TMP"}
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("BENCH_") and k not in skip}


def machine_line(info: dict[str, object]) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB RAM, Linux "
        f"{info['kernel']}, Python {info['python']}; load average {info['load_avg_1m_at_start']}"
        " at the start"
    )


def save(rows: list[Row], info: dict[str, object], quick: bool, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    stem = f"{now:%Y-%m-%d}-{commit_id()}"
    doc = {
        "date": now.isoformat(timespec="seconds"),
        "commit": commit_id(),
        "quick": quick,
        "machine": info,
        "settings": bench_settings(),
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    settings = " ".join(f"{k}={v}" for k, v in bench_settings().items()) or "defaults"
    md = (
        f"# mailgate benchmarks {now:%Y-%m-%d} ({doc['commit']})\n\n"
        f"Settings: {settings}. Machine: {machine_line(info)}.\n\n{render_markdown(rows)}\n"
    )
    (out_dir / f"{stem}.md").write_text(md)
    return out_dir / f"{stem}.json"


def update_readme(readme: Path, rows: list[Row], info: dict[str, object], stamp: str) -> bool:
    """Replace the section between the markers; ``False`` when the markers are missing."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = (
        f"\n_Latest `make bench` ({stamp}) on {machine_line(info)}._\n\n{render_markdown(rows)}\n"
    )
    readme.write_text(head + README_START + body + README_END + tail)
    return True


async def _run_module(name: str, opts: Options) -> list[Row]:
    module = importlib.import_module(name)
    budget = BUDGET_S[0] if opts.quick else BUDGET_S[1]
    try:
        async with asyncio.timeout(budget) as limit:
            return list(await module.run(opts))
    except TimeoutError:
        if not limit.expired():
            raise  # the module's own wait gave up: reported as a failure with its reason
        return [Row(benchmark=name, note=f"timed out after {budget:.0f}s")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=os.environ.get("BENCH", ""))
    parser.add_argument("--save", action="store_true", help="save a quick run's results too")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if args.only:
        wanted = {f"bench_{n.removeprefix('bench_')}" for n in args.only.split(",") if n}
        names = [n for n in names if n in wanted]
    info = machine()
    print(f"machine: {machine_line(info)}")
    opts = Options(quick=args.quick)
    rows: list[Row] = []
    failed = False
    from mailgate_core.runtime import loop_factory  # the services' loop (uvloop)

    for name in names:
        t0 = time.monotonic()
        try:
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                got = runner.run(_run_module(name, opts))
        except Exception as exc:
            traceback.print_exc()
            failed = True
            got = [Row(benchmark=name, note=f"failed: {type(exc).__name__}: {exc}"[:300])]
        print(f"  {name}: {len(got)} rows in {time.monotonic() - t0:.1f}s", flush=True)
        rows.extend(got)
    print()
    print(render(rows))
    if (not args.quick or args.save) and not args.no_save:
        path = save(rows, info, args.quick, args.results_dir)
        print(f"\nresults: {path} (+ .md)")
    if args.update_readme:
        stamp = f"{dt.datetime.now(dt.UTC):%Y-%m-%d}, commit {commit_id()}"
        if bench_settings():
            stamp += ", " + " ".join(f"{k}={v}" for k, v in bench_settings().items())
        if update_readme(ROOT / "README.md", rows, info, stamp):
            print("README.md benchmark section updated")
        else:
            print(f"README.md has no {README_START} ... {README_END} section", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
