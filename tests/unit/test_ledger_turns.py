"""The order a stream's concurrent ledger batches keep: a batch claims its facts after the
batch ahead of it has, and commits only after that batch ended (or yields)."""

from __future__ import annotations

import asyncio

import pytest
from mailgate_ledger import ingest
from mailgate_ledger.ingest import _Turn, _Yielded


async def test_a_batch_claims_after_the_batch_ahead_claimed() -> None:
    ahead = _Turn(None)
    turn = _Turn(ahead)
    waiting = asyncio.create_task(turn.before_claim())
    await asyncio.sleep(0)
    assert not waiting.done()
    ahead.claimed.set()
    await asyncio.wait_for(waiting, timeout=1)


async def test_a_batch_commits_only_after_the_batch_ahead_ended() -> None:
    ahead = _Turn(None)
    turn = _Turn(ahead)
    ahead.claimed.set()
    waiting = asyncio.create_task(turn.before_commit())
    await asyncio.sleep(0)
    assert not waiting.done()  # claimed is not enough: the batch ahead must have ended
    ahead.end()
    await asyncio.wait_for(waiting, timeout=1)


async def test_a_batch_yields_when_the_batch_ahead_does_not_end_in_time(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ingest, "TURN_WAIT_S", 0.05)
    ahead = _Turn(None)
    turn = _Turn(ahead)
    with pytest.raises(_Yielded):
        await turn.before_commit()
    after = asyncio.create_task(turn.after_ahead())  # the rerun waits without a limit
    await asyncio.sleep(0.1)
    assert not after.done()
    ahead.end()
    await asyncio.wait_for(after, timeout=1)


async def test_the_first_batch_and_a_batch_whose_ahead_ended_do_not_wait() -> None:
    first = _Turn(None)
    await asyncio.wait_for(first.before_claim(), timeout=1)
    await asyncio.wait_for(first.before_commit(), timeout=1)
    first.end()
    second = _Turn(first)
    await asyncio.wait_for(second.before_claim(), timeout=1)
    await asyncio.wait_for(second.before_commit(), timeout=1)
    second.end()
    assert second.ahead is None  # an ended batch lets go of the one ahead (no chain)
