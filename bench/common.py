"""Shared pieces of the benchmark suite: result rows, percentiles, CPU accounting."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One line of the `make bench` table. Leave a figure ``None`` when it does not apply."""

    benchmark: str
    rate_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_s_per_1k: float | None = None
    note: str = ""


@dataclass
class Options:
    quick: bool = False
    """Fewer iterations (used by the test that keeps `make bench` working)."""
    tmp: Path = field(
        default_factory=lambda: Path(os.environ.get("BENCH_TMP", tempfile.gettempdir()))
    )


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values (nearest rank)."""
    if not sorted_values:
        return float("nan")
    index = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def process_cpu_s(pid: int) -> float:
    """User+system CPU seconds consumed so far by a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class CpuMeter:
    """CPU seconds used by some processes (and this one) between start() and stop()."""

    def __init__(self, pids: list[int] | None = None, include_self: bool = False):
        self.pids = pids or []
        self.include_self = include_self
        self._start = 0.0

    def _total(self) -> float:
        total = sum(process_cpu_s(pid) for pid in self.pids)
        if self.include_self:
            total += time.process_time()
        return total

    def start(self) -> None:
        self._start = self._total()

    def stop(self) -> float:
        return self._total() - self._start


def spawn(
    argv: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a process of ours (output appended to ``log``, or discarded)."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(  # noqa: S603 - our own interpreter and modules
        argv,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
