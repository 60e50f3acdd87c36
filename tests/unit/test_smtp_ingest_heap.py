"""An smtp-ingest process settles its heap once it has started (memory.settle_heap): what is
alive then is frozen out of the cyclic collector's generations and the first generation's
threshold is raised. Cycles made later are still collected. Run in a child interpreter: the
collector's state is per process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from mailgate_smtp_ingest import __main__ as entry
from mailgate_smtp_ingest.memory import GC_THRESHOLD

CHILD = """
import gc, weakref
from mailgate_smtp_ingest.memory import settle_heap, GC_THRESHOLD

class Node:
    pass

before = gc.get_freeze_count()
settle_heap()
assert gc.get_threshold()[0] == GC_THRESHOLD, gc.get_threshold()
assert gc.get_freeze_count() > before + 1000, gc.get_freeze_count()

a, b = Node(), Node()
a.other, b.other = b, a
alive = weakref.ref(a)
del a, b
assert alive() is not None  # a cycle: reference counting cannot free it
junk = [[] for _ in range(3 * GC_THRESHOLD)]  # net allocations start a collection
assert alive() is None, "the cycle was not collected"
print("ok")
"""


def test_settle_heap_freezes_what_is_alive_and_still_collects_new_cycles() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert GC_THRESHOLD > 700  # CPython's default: the point is to collect less often


def test_the_process_entry_point_settles_the_heap_after_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settled: list[str] = []
    service = SimpleNamespace(on_start=[])

    async def fake_build(settings: Any, **_: Any) -> Any:
        return service

    monkeypatch.setattr(entry, "build", fake_build)
    monkeypatch.setattr(entry, "settle_heap", lambda: settled.append("settled"))

    async def start() -> None:
        built = await entry.build_process(SimpleNamespace())  # type: ignore[arg-type]
        assert built is service and not settled  # not while building: after start
        for hook in built.on_start:
            await hook()

    asyncio.run(start())
    assert settled == ["settled"]
