"""Shared pieces of the benchmark suite: result rows, percentiles, rounds (rotation, medians,
paired ratios), CPU and memory accounting, starting and stopping processes (optionally under
py-spy)."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


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


# --- rounds: several short runs a target, in rotated order, read as medians and paired ratios --


@dataclass(frozen=True)
class Sample:
    """One target's figures in one round (CPU in seconds per 1000 requests or messages)."""

    rate_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_s_per_1k: float
    client_cpu_s_per_1k: float
    storage_cpu_s_per_1k: float | None = None
    """CPU of the target's durable storage in another process (nats-server), when measured."""


def rotated(targets: list[T], round_index: int) -> list[T]:
    """The targets in the order round ``round_index`` runs them: rotated by one a round, so
    none always runs first or last."""
    shift = round_index % len(targets) if targets else 0
    return targets[shift:] + targets[:shift]


def median_row(name: str, samples: list[Sample]) -> Row:
    """Each figure the median of the rounds' (note: nats-server's CPU when measured)."""
    median = statistics.median
    storage = [s.storage_cpu_s_per_1k for s in samples if s.storage_cpu_s_per_1k is not None]
    return Row(
        benchmark=name,
        rate_per_s=median(s.rate_per_s for s in samples),
        p50_ms=median(s.p50_ms for s in samples),
        p99_ms=median(s.p99_ms for s in samples),
        cpu_s_per_1k=median(s.cpu_s_per_1k for s in samples),
        note=f"+ nats-server {median(storage):.3f}" if storage else "",
    )


def spread_note(samples: list[Sample]) -> str:
    """``client <median> CPU s/1k`` and, over several rounds, the rates in round order."""
    client = statistics.median(s.client_cpu_s_per_1k for s in samples)
    note = f"client {client:.3f} CPU s/1k"
    if len(samples) > 1:
        note += "; rates " + "/".join(f"{s.rate_per_s:.0f}" for s in samples)
    return note


def paired_ratio(ours: list[Sample], theirs: list[Sample], name: str, detail: str = "") -> str:
    """The median of the rounds' rate ratios ours/theirs, with their range over several rounds:
    ``1.06x Postfix`` or ``1.06x Postfix (rounds 1.00-1.14)`` (``detail`` joins the brackets)."""
    ratios = [o.rate_per_s / t.rate_per_s for o, t in zip(ours, theirs, strict=True)]
    details = [f"rounds {min(ratios):.2f}-{max(ratios):.2f}"] if len(ratios) > 1 else []
    details += [detail] if detail else []
    text = f"{statistics.median(ratios):.2f}x {name}"
    return f"{text} ({'; '.join(details)})" if details else text


async def timed_run(
    count: int, latencies: list[float], runners: list[Coroutine[Any, Any, None]]
) -> Row:
    """Run ``runners`` together: rate, latency percentiles and this process's CPU per 1,000
    of the ``count`` items (``latencies``: what the runners recorded, in seconds)."""
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*runners)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    latencies.sort()
    return Row(
        benchmark="",
        rate_per_s=count / elapsed,
        p50_ms=percentile(latencies, 0.5) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        cpu_s_per_1k=cpu / count * 1000,
    )


def apt_install(package: str) -> str:
    """Install a Debian package (``BENCH_INSTALL=1`` as root): ``""``, or why it failed (the
    skip note)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            return f"skipped: {' '.join(argv)} failed: {done.stderr.strip()[-200:]}"
    return ""


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu_s(pid: int) -> float:
    """User+system CPU seconds consumed so far by a process (Linux /proc)."""
    fields = _stat_fields(pid)
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid``, its reaped children and every live descendant: a supervisor
    (smtp-ingest with SMTP_WORKERS, Postfix's master) with its workers."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    total = (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
    return total + sum(process_tree_cpu_s(child) for child in _children(pid))


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    out = [pid]
    for child in _children(pid):
        out += tree_pids(child)
    return out


def peak_rss_bytes(pid: int) -> int:
    """The high-water mark of a process's resident memory (VmHWM), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class CpuMeter:
    """CPU seconds used by some processes (and this one) between start() and stop()."""

    def __init__(
        self, pids: list[int] | None = None, include_self: bool = False, *, tree: bool = False
    ):
        self.pids = pids or []
        self.include_self = include_self
        self.tree = tree
        """Count each pid's descendants too (see process_tree_cpu_s)."""
        self._start = 0.0

    def _total(self) -> float:
        cpu = process_tree_cpu_s if self.tree else process_cpu_s
        total = sum(cpu(pid) for pid in self.pids)
        if self.include_self:
            total += time.process_time()
        return total

    def start(self) -> None:
        self._start = self._total()

    def stop(self) -> float:
        return self._total() - self._start


_PROFILERS: list[subprocess.Popen[bytes]] = []


def spawn(
    argv: list[str],
    env: dict[str, str] | None = None,
    log: Path | None = None,
    *,
    profile: str = "",
) -> subprocess.Popen[bytes]:
    """Start a process of ours (output appended to ``log``, or discarded).

    With ``BENCH_PROFILE=<dir>`` in the environment and a ``profile`` name, ``py-spy record``
    attaches to it (``--nonblocking``); collapsed stacks land in ``<dir>/<profile>.txt``
    (summarise them with ``python bench/profile_summary.py <file>``)."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and modules
        argv,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    profile_dir = os.environ.get("BENCH_PROFILE", "")
    if profile and profile_dir:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        py_spy = Path(sys.executable).with_name("py-spy")
        target = Path(profile_dir) / f"{profile}.txt"
        _PROFILERS.append(
            subprocess.Popen(  # noqa: S603 - py-spy from our venv
                [
                    *(str(py_spy), "record", "--format", "raw", "-r", "250", "-o", str(target)),
                    *("--nonblocking", "--subprocesses", "--pid", str(proc.pid)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return proc


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
