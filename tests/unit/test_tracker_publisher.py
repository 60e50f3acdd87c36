"""Packing opens and clicks into track.batch messages, and the ledger's view of them."""

from __future__ import annotations

import time
from collections import deque

from mailgate_core.ids import is_ulid, ulid_time_ms
from mailgate_core.nats import Ack, Nak, Term
from mailgate_core.schemas import TrackBatch, TrackClick, TrackOpen, decode, decode_subject
from mailgate_ledger.ingest import expand, worst
from mailgate_tracker.handlers import clean_text
from mailgate_tracker.ids import EventIds
from mailgate_tracker.publisher import pack

MID = "01J0000000000000000000000A"


def _opens(n: int, **extra: str) -> list[TrackOpen]:
    return [TrackOpen(mailgate_id=MID, user_agent=f"agent {i}", **extra) for i in range(n)]


def test_a_batch_takes_at_most_max_events_and_keeps_the_rest_in_order() -> None:
    events = [*_opens(5), TrackClick(url="https://x.ru/1", mailgate_id=MID), *_opens(4)]
    pending = deque(events)
    first = pack(pending, 6, 1 << 20)
    assert first is not None and (first.opens, first.clicks, first.size) == (5, 1, 6)
    assert list(pending) == events[6:]
    batch = decode_subject("track.batch", first.data)
    assert isinstance(batch, TrackBatch) and batch.event_id == first.event_id
    assert batch.opens == events[:5] and batch.clicks == [events[5]]
    assert [e.event_id for e in batch.events()] == [e.event_id for e in events[:6]]
    second = pack(pending, 6, 1 << 20)
    assert second is not None and second.size == 4 and not pending
    assert second.event_id != first.event_id


def test_a_batch_over_max_bytes_is_split_and_every_event_is_packed_once() -> None:
    long_url = "https://shop.example.com/" + "p" * 3000
    events = [TrackClick(url=f"{long_url}?{i}", mailgate_id=MID) for i in range(40)]
    pending = deque(events)
    batches = []
    while pending:
        packed = pack(pending, 256, 20_000)
        assert packed is not None
        assert len(packed.data) <= 20_000
        batches.append(decode(packed.data, TrackBatch))
    assert len(batches) > 1
    packed_ids = [e.event_id for b in batches for e in b.clicks]
    assert packed_ids == [e.event_id for e in events]  # all, once, in order


def test_one_event_larger_than_the_limit_is_still_packed_alone() -> None:
    pending = deque([TrackClick(url="https://x.ru/" + "a" * 5000), *_opens(2)])
    packed = pack(pending, 256, 1024)
    assert packed is not None and packed.size == 1 and len(pending) == 2


def test_an_unencodable_event_is_dropped_without_holding_back_the_rest() -> None:
    bad = TrackOpen(mailgate_id=MID, user_agent="broken \udcff agent")
    good = _opens(3)
    dropped: list[str] = []
    packed = pack(
        deque([good[0], bad, *good[1:]]), 256, 1 << 20, lambda e: dropped.append(e.event_id)
    )
    assert packed is not None and packed.size == 3
    assert dropped == [bad.event_id]
    assert [e.event_id for e in decode(packed.data, TrackBatch).opens] == [e.event_id for e in good]
    assert pack(deque([bad]), 256, 1 << 20) is None


def test_request_text_with_undecodable_bytes_becomes_valid_utf8() -> None:
    raw = b"Mozilla \xff\xfe Outlook"
    header = raw.decode("utf-8", "surrogateescape")  # what aiohttp hands the handler
    cleaned = clean_text(header)
    assert cleaned == "Mozilla \ufffd\ufffd Outlook"
    assert cleaned.encode("utf-8")
    assert clean_text("plain ascii") == "plain ascii"
    assert clean_text("Яндекс") == "Яндекс"


def test_event_ids_are_unique_time_ordered_ulids() -> None:
    ids = EventIds()
    now = time.time()
    made = [ids(now) for _ in range(5000)] + [ids(now + 0.002) for _ in range(10)]
    assert len(set(made)) == len(made)
    assert made == sorted(made)
    assert all(is_ulid(i) for i in made)
    assert ulid_time_ms(made[0]) == int(now * 1000)
    other = EventIds()  # another replica: other random bits
    assert other(now) not in made


def test_event_ids_draw_new_random_bits_when_the_counter_runs_out() -> None:
    ids = EventIds()
    ids._counter = (1 << 20) - 1
    now = time.time()
    last, after = ids(now), ids(now)
    assert last[-4:] == "ZZZZ" and after[-4:] == "0000"
    assert last[10:22] != after[10:22]


def test_the_ledger_expands_a_batch_into_its_events_and_other_messages_into_one() -> None:
    events = [*_opens(2), TrackClick(url="https://x.ru", mailgate_id=MID)]
    batch = TrackBatch(opens=events[:2], clicks=events[2:])
    assert list(expand(batch)) == events
    assert list(expand(events[0])) == [events[0]]
    assert list(expand(TrackBatch())) == []


def test_a_batch_message_is_acked_only_when_every_event_is() -> None:
    assert worst(Ack(), Ack()) == Ack()
    assert worst(Ack(), Nak(2.0)) == Nak(2.0)
    assert worst(Nak(2.0), Ack()) == Nak(2.0)
    assert worst(Term("poison"), Ack()) == Term("poison")
    assert worst(Term("poison"), Nak(1.0)) == Nak(1.0)  # the others still to be recorded
