"""tracker -> track.batch messages -> ledger: one row per open/click, never two, none lost."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
from mailgate_core.schemas import TrackBatch, TrackClick, TrackOpen, decode, encode
from mailgate_fakes.testing import eventually
from test_ledger_support import start_ledger
from test_tracker_http import CHROME, MID, base_url, make_tracker, signer

__all__ = ["make_tracker", "start_ledger"]


async def _rows(database_url: str) -> dict[str, list[str]]:
    """Event ids recorded in the ledger's history, by subject (track.* only)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT subject, event_id FROM events WHERE subject LIKE 'track.%' ORDER BY event_id"
        )
    finally:
        await conn.close()
    out: dict[str, list[str]] = {}
    for row in rows:
        out.setdefault(row["subject"], []).append(row["event_id"])
    return out


async def _stream(js: Any) -> dict[str, int]:
    """Messages in TRACK by subject."""
    info = await js.stream_info("TRACK", subjects_filter="track.>")
    return dict(info.state.subjects or {})


async def _hit(http: aiohttp.ClientSession, paths: list[str], parallel: int = 20) -> None:
    gate = asyncio.Semaphore(parallel)

    async def one(path: str) -> None:
        async with gate, http.get(path, allow_redirects=False) as resp:
            assert resp.status in (200, 302)
            await resp.read()

    await asyncio.gather(*(one(p) for p in paths))


async def test_a_burst_of_opens_and_clicks_is_one_ledger_row_per_event(
    js, make_tracker, start_ledger, database_url
) -> None:
    await start_ledger()
    tracker = await make_tracker(tracker_batch_max_events=64)
    opens = [f"/track/o/{signer.make_open_token(MID)}"] * 300
    clicks = [
        f"/track/c/{signer.make_click_token(MID, f'https://example.com/{i}')}" for i in range(100)
    ]
    headers = {"User-Agent": CHROME}
    async with aiohttp.ClientSession(base_url=base_url(tracker), headers=headers) as http:
        await _hit(http, opens + clicks)

    async def recorded() -> dict[str, list[str]] | None:
        rows = await _rows(database_url)
        counts = {k: len(v) for k, v in rows.items()}
        assert counts.get("track.open", 0) <= 300 and counts.get("track.click", 0) <= 100
        return rows if counts == {"track.open": 300, "track.click": 100} else None

    rows = await eventually(recorded, timeout=20, what="400 track rows")
    assert len(set(rows["track.open"] + rows["track.click"])) == 400
    stream = await _stream(js)
    assert set(stream) == {"track.batch"}  # no message per event
    assert stream["track.batch"] < 400 / 2
    published = tracker.registry.get_sample_value("mailgate_tracker_batches_published_total")
    assert published == stream["track.batch"]
    for subject, n in (("track.open", 300), ("track.click", 100)):
        labels = {"subject": subject}
        assert (
            tracker.registry.get_sample_value("mailgate_tracker_events_published_total", labels)
            == n
        )


async def test_a_republished_batch_is_not_counted_twice(js, start_ledger, database_url) -> None:
    ledger = await start_ledger()
    events = [TrackOpen(mailgate_id=MID, user_agent=CHROME) for _ in range(3)]
    batch = TrackBatch(
        opens=events, clicks=[TrackClick(url="https://example.com/", mailgate_id=MID)]
    )
    data = encode(batch)
    headers = {"Nats-Msg-Id": batch.event_id}
    first = await js.publish("track.batch", data, headers=headers)
    again = await js.publish("track.batch", data, headers=headers)  # a retry after a lost ack
    assert again.duplicate and again.seq == first.seq
    # Past JetStream's duplicate window the same events may come again: the ledger has them.
    await js.publish("track.batch", data, headers={"Nats-Msg-Id": batch.event_id + "-late"})

    async def settled() -> bool:
        info = await js.consumer_info("TRACK", "ledger-track")
        return info.delivered.stream_seq >= 2 and info.num_ack_pending == 0

    await eventually(settled, what="both batch messages acked")
    rows = await _rows(database_url)
    assert sorted(rows["track.open"]) == sorted(e.event_id for e in events)
    assert rows["track.click"] == [batch.clicks[0].event_id]
    metrics = (await ledger.call("GET", "/metrics", token=None))[1].decode()
    assert "mailgate_ledger_duplicate_events_total 4.0" in metrics


async def test_a_bad_event_in_a_batch_holds_back_only_its_batch_not_the_other_events(
    js, start_ledger, database_url
) -> None:
    await start_ledger()
    good = [TrackOpen(mailgate_id=MID, user_agent=CHROME) for _ in range(2)]
    bad = TrackOpen(event_id="bad\x00id", mailgate_id=MID)  # Postgres text refuses NUL
    batch = TrackBatch(opens=[good[0], bad, good[1]])
    await js.publish("track.batch", encode(batch), headers={"Nats-Msg-Id": batch.event_id})
    later = TrackBatch(opens=[TrackOpen(mailgate_id=MID)])
    await js.publish("track.batch", encode(later), headers={"Nats-Msg-Id": later.event_id})

    async def redelivered() -> Any:
        info = await js.consumer_info("TRACK", "ledger-track")
        return info if info.num_redelivered >= 1 else None

    await eventually(redelivered, timeout=10, what="the batch redelivered")
    rows = await _rows(database_url)
    recorded = sorted(rows["track.open"])
    assert recorded == sorted([good[0].event_id, good[1].event_id, later.opens[0].event_id])
    info = await js.consumer_info("TRACK", "ledger-track")
    assert info.num_ack_pending == 1  # the batch with the bad event is not acked


async def test_nats_restart_while_buffering_loses_no_open(
    nats_server, js, make_tracker, start_ledger, database_url
) -> None:
    await start_ledger()
    tracker = await make_tracker(tracker_batch_max_events=16, tracker_flush_timeout_s=10.0)
    nats_server.stop()
    await eventually(lambda: not tracker.nc.is_connected, what="disconnected")
    paths = [f"/track/o/{signer.make_open_token(MID)}"] * 120
    async with aiohttp.ClientSession(base_url=base_url(tracker)) as http:
        await _hit(http, paths)
    assert tracker.registry.get_sample_value("mailgate_tracker_events_buffered") == 120
    nats_server.start()

    async def recorded() -> list[str] | None:
        opens = (await _rows(database_url)).get("track.open", [])
        assert len(opens) <= 120
        return opens if len(opens) == 120 else None

    opens = await eventually(recorded, timeout=30, what="120 opens recorded")
    assert len(set(opens)) == 120
    info = await js.stream_info("TRACK")
    stored = 0
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        stored += len(decode((await js.get_msg("TRACK", seq)).data, TrackBatch).events())
    assert stored == 120 and info.state.messages >= 120 // 16
    dropped = tracker.registry.get_sample_value(
        "mailgate_tracker_events_dropped_total", {"reason": "buffer_full"}
    )
    assert not dropped
