"""Monthly partition arithmetic: month bounds, ULID time prefixes, what retention may drop."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st
from mailgate_core.ids import new_ulid
from mailgate_ledger.ingest import merge_message_rows
from mailgate_ledger.partitions import (
    add_months,
    droppable,
    month_of,
    month_of_ulid,
    months_ahead,
    partition_name,
    ulid_prefix,
)

UTC = dt.UTC


def test_months_roll_over_years_and_name_their_partitions() -> None:
    assert add_months(dt.date(2025, 11, 1), 3) == dt.date(2026, 2, 1)
    assert add_months(dt.date(2025, 1, 1), -1) == dt.date(2024, 12, 1)
    now = dt.datetime(2025, 12, 31, 23, 59, tzinfo=UTC)
    assert months_ahead(now, 2) == [dt.date(2025, 12, 1), dt.date(2026, 1, 1), dt.date(2026, 2, 1)]
    assert partition_name("messages", dt.date(2026, 2, 1)) == "messages_y2026m02"
    # months are UTC months: 00:30 on the 1st in Moscow is still the previous month
    moscow = dt.timezone(dt.timedelta(hours=3))
    assert month_of(dt.datetime(2025, 7, 1, 0, 30, tzinfo=moscow)) == dt.date(2025, 6, 1)


def test_retention_drops_a_month_only_when_all_of_it_is_older_than_the_cutoff() -> None:
    cutoff = dt.datetime(2025, 9, 1, tzinfo=UTC)
    assert droppable(dt.date(2025, 8, 1), cutoff)
    assert not droppable(dt.date(2025, 9, 1), cutoff)
    assert not droppable(dt.date(2025, 8, 1), cutoff - dt.timedelta(seconds=1))


@given(st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1)))
def test_ulid_prefixes_bound_the_ulids_of_a_moment(moment: dt.datetime) -> None:
    at = moment.replace(tzinfo=UTC)
    ms = int(at.timestamp() * 1000)
    made_then = new_ulid(ms)
    assert ulid_prefix(at) <= made_then < ulid_prefix(at + dt.timedelta(milliseconds=1))
    assert month_of_ulid(made_then) == month_of(at)


def test_non_ulid_ids_have_no_month() -> None:
    assert month_of_ulid("not-a-ulid") is None
    assert month_of_ulid("7d9e1c2a-0b1f-4a57-9a0e-3c5b2f1e8d44") is None


def test_message_rows_of_one_batch_merge_into_one_row_per_message() -> None:
    accepted = ("M", "ams-1", "73", None, None, "acc", "r@x", "f@x", "Hi", 10, "t0")
    submitted = ("M", "ams-1", "73", 42, "tok", "acc", "r@x", None, None, None, None)
    other = ("N", None, None, None, None, "acc", "s@x", None, None, None, None)
    merged = merge_message_rows([submitted, other, accepted])
    assert merged == [("M", "ams-1", "73", 42, "tok", "acc", "r@x", "f@x", "Hi", 10, "t0"), other]
