"""The reconciler's pass costs what is pending, not every final marker of the last hour.

The leader reads ``postal-pending`` once when it starts leading, then follows its changes:
a later pass reads nothing but those changes (and the stream's last sequence), however many
final markers the bucket keeps to answer late replays.
"""

from __future__ import annotations

import time

import nats
from mailgate_core.ids import new_ulid
from mailgate_fakes.testing import eventually
from mailgate_postal_sender.leader import LeaderLock
from mailgate_postal_sender.metrics import Metrics
from mailgate_postal_sender.pending import (
    KV_PENDING,
    PendingRecord,
    create_pending,
    ensure_bucket,
    mark_final,
)
from mailgate_postal_sender.reconcile import Reconciler
from prometheus_client import CollectorRegistry

MARKERS = 200


def reconciler(js, kv) -> Reconciler:
    return Reconciler(
        js=js,
        client=None,  # type: ignore[arg-type]  # nothing is due: Postal is never called
        pending=kv,
        api_keys=None,  # type: ignore[arg-type]
        lock=LeaderLock(kv, "unused", "me", ttl_s=30.0),
        metrics=Metrics(CollectorRegistry()),
        reconcile_after_s=3600.0,
        index_stall_s=2.0,
    )


def pending(mailgate_id: str) -> PendingRecord:
    return PendingRecord(mailgate_id=mailgate_id, postal_id=7, submitted_at=time.time())


async def test_a_pass_reads_the_changes_not_every_final_marker(nats_url) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        kv = await ensure_bucket(js, KV_PENDING, 3600)
        for _ in range(MARKERS):
            mailgate_id = new_ulid()
            await mark_final(kv, mailgate_id, mailgate_id, "MessageSent")
        waiting = new_ulid()
        await create_pending(kv, waiting, pending(waiting))
        rec = reconciler(js, kv)
        try:
            first = await rec.run_pass()  # a new leader reads the bucket once
            assert first.pending == 1

            late = new_ulid()
            await create_pending(kv, late, pending(late))
            await mark_final(kv, waiting, waiting, "MessageSent")
            before = nc.stats["in_msgs"] + nc.stats["out_msgs"]
            second = await rec.run_pass()
            used = nc.stats["in_msgs"] + nc.stats["out_msgs"] - before
            # Two changes and the stream's last sequence, not MARKERS + 2 entries.
            assert used <= 10, used
            still_open = {k for k, r in rec._index.items() if not r.final}
        finally:
            await rec.stop()
        # Both changes were seen (the new record pending, the finalised one no more) ...
        assert second.pending == 1
        assert still_open == {late}

        # A new leader (restart or takeover) starts from a full read: nothing is missed.
        again = reconciler(js, kv)
        try:
            third = await again.run_pass()
            assert third.pending == 1
            assert {k for k, r in again._index.items() if not r.final} == {late}
        finally:
            await again.stop()
    finally:
        await nc.close()


async def test_the_leaders_copy_survives_a_nats_server_restart(nats_server) -> None:
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        kv = await ensure_bucket(js, KV_PENDING, 3600)
        first = new_ulid()
        await create_pending(kv, first, pending(first))
        rec = reconciler(js, kv)
        try:
            assert (await rec.run_pass()).pending == 1
            nats_server.restart()
            later = new_ulid()

            async def stored() -> bool:
                try:
                    return await create_pending(kv, later, pending(later))
                except Exception:
                    return False

            await eventually(stored, timeout=20, what="bucket writable again")

            async def both_seen() -> bool:
                try:
                    return (await rec.run_pass()).pending == 2
                except Exception:
                    return False  # a pass that finds its copy stale fails; the next reads afresh

            assert await eventually(both_seen, timeout=30, what="the new record seen")
        finally:
            await rec.stop()
    finally:
        await nc.close()
