"""Each fault during a steady SMTP load: nothing accepted is lost, nothing is submitted to
Postal twice, no customer event is lost, and SMTP answers 4xx for what it could not store.

The short form (default, inside ``make test``) runs the rows marked ``short``; ``make chaos``
(``MAILGATE_CHAOS=full``) runs every row with longer outages. The table is printed at the end
of the session (see conftest.py) and in each row's assertion message.
"""

from __future__ import annotations

import time

import pytest
from chaos_harness import FULL, Chaos, RowResult, table

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.timeout(600)]


def full_only() -> None:
    if not FULL:
        pytest.skip("full chaos suite only (make chaos)")


def assert_no_loss(row: RowResult) -> None:
    shown = "\n" + table([row])
    assert row.accepted > 0, shown
    assert row.lost == 0, shown
    assert row.duplicated == 0, shown
    assert row.hooks_lost == 0, shown


AMBIGUOUS = "mailgate_postal_ambiguous_retries_total"


def assert_duplicates_explained(chaos: Chaos, row: RowResult, ambiguous_before: float) -> None:
    """No loss; every duplicate is a retry postal-sender counted as ambiguous (a request
    that timed out after it was sent: Postal has no idempotency key)."""
    ambiguous = chaos.metric("postal-sender", AMBIGUOUS) - ambiguous_before
    if row.duplicated:
        row.notes = (
            f"{row.duplicated} duplicate(s); postal-sender counted {ambiguous:.0f} ambiguous"
        )
    assert row.accepted > 0 and row.lost == 0 and row.hooks_lost == 0, table([row])
    assert row.duplicated <= ambiguous, table([row])


def test_kill_9_smtp_ingest_mid_data(chaos: Chaos) -> None:
    partial_rcpt = "c-mid-data@example.org"
    clients = []

    def inject() -> None:
        clients.append(chaos.mid_data_client(partial_rcpt))
        chaos.kill("smtp-ingest")
        chaos.start("smtp-ingest")

    row = chaos.run("kill -9 smtp-ingest mid-DATA", inject, settle_s=45)
    assert_no_loss(row)
    # The message cut off inside DATA never got a 250 and never reaches Postal.
    assert chaos.postal_counts()[partial_rcpt] == 0


def test_kill_9_postal_sender_between_postals_answer_and_the_ack(chaos: Chaos) -> None:
    codes = []

    def inject() -> None:
        # The fault switch dies exactly in the window: after Postal's answer and the stored
        # record, before mail.submitted is published and the message acked. One send at a
        # time, so no other request is between Postal's answer and its record (see below).
        chaos.stack.stop_service("postal-sender")
        chaos.start(
            "postal-sender",
            MAILGATE_TEST_CRASH_AFTER_SUBMIT="3",
            SEND_CONCURRENCY="1",
            SEND_FETCHERS="1",
        )
        codes.append(chaos.wait_exit("postal-sender"))
        chaos.start("postal-sender")

    row = chaos.run("kill -9 postal-sender after Postal answered", inject, settle_s=45)
    assert codes == [137]  # it died in the window: Postal had the message, no ack yet
    assert_no_loss(row)


def test_kill_9_postal_sender_at_a_random_moment_loses_nothing(chaos: Chaos) -> None:
    """A kill -9 while requests are in flight can hit a request Postal has answered whose
    record is not stored yet: Postal has no idempotency key, so the redelivery sends it again
    (sender.py's documented window, counted in mailgate_postal_ambiguous_retries_total).
    Nothing is lost; duplicates are reported in the table, bounded by the requests in flight."""
    full_only()

    def inject() -> None:
        for _ in range(3):
            chaos.kill("postal-sender")
            chaos.start("postal-sender")
            time.sleep(1.0)

    row = chaos.run("kill -9 postal-sender x3 at random moments", inject, settle_s=60)
    row.notes = "duplicates here are the documented Postal no-idempotency window"
    assert row.accepted > 0 and row.lost == 0 and row.hooks_lost == 0, table([row])
    assert row.duplicated <= 3 * 32, table([row])  # at most SEND_CONCURRENCY per kill


def test_kill_9_webhook_ingest(chaos: Chaos) -> None:
    def inject() -> None:
        chaos.kill("webhook-ingest")
        time.sleep(2)
        chaos.start("webhook-ingest")

    assert_no_loss(chaos.run("kill -9 webhook-ingest", inject, settle_s=60))


def test_kill_9_ledger_mid_batch(chaos: Chaos) -> None:
    full_only()

    def inject() -> None:
        chaos.kill("ledger")
        chaos.start("ledger")

    assert_no_loss(chaos.run("kill -9 ledger mid-batch", inject, settle_s=150))


def test_kill_9_ams_reporter_mid_delivery(chaos: Chaos) -> None:
    full_only()

    def inject() -> None:
        chaos.receiver.delay_s = 0.5  # deliveries are in flight when the kill comes
        time.sleep(1.5)
        chaos.kill("ams-reporter")
        chaos.receiver.delay_s = 0.0
        chaos.start("ams-reporter")

    assert_no_loss(chaos.run("kill -9 ams-reporter mid-delivery", inject, settle_s=150))


def test_nats_restart(chaos: Chaos) -> None:
    def inject() -> None:
        assert chaos.stack.nats is not None
        chaos.stack.nats.restart()

    assert_no_loss(chaos.run("NATS restart (file storage)", inject, settle_s=90))


def test_postgres_restart(chaos: Chaos) -> None:
    full_only()

    def inject() -> None:
        chaos.postgres_stop()
        chaos.postgres_start()

    row = chaos.run("Postgres restart", inject, settle_s=150)
    assert_no_loss(row)
    assert row.transient == 0, table([row])  # only the ledger talks to Postgres


def test_postgres_unreachable_for_a_while(chaos: Chaos) -> None:
    full_only()
    outage_s = 60.0

    def inject() -> None:
        chaos.postgres_stop()
        time.sleep(outage_s)
        chaos.postgres_start()

    row = chaos.run(f"Postgres down {outage_s:.0f} s", inject, settle_s=150, interval_s=0.5)
    assert_no_loss(row)
    assert row.transient == 0, table([row])  # SMTP intake never noticed


def test_postal_answers_5xx(chaos: Chaos) -> None:
    seconds = 20.0 if FULL else 4.0

    def inject() -> None:
        chaos.postal_faults(outage_s=seconds, outage_mode="http_503")
        time.sleep(seconds)

    assert_no_loss(chaos.run(f"Postal 503 for {seconds:.0f} s", inject, settle_s=60))


def test_postal_times_out(chaos: Chaos) -> None:
    full_only()
    before = chaos.metric("postal-sender", AMBIGUOUS)

    def inject() -> None:
        chaos.postal_faults(outage_s=15, outage_mode="timeout")
        time.sleep(15)

    row = chaos.run("Postal hangs (timeouts) 15 s", inject, settle_s=90)
    assert_no_loss(row)  # the sandbox's hanging requests create nothing: never ambiguous
    assert chaos.metric("postal-sender", AMBIGUOUS) - before >= 0


def test_postal_times_out_after_creating_the_message(chaos: Chaos) -> None:
    """The one window no client of Postal can close: Postal created the message but the
    answer never arrived (POSTAL_TIMEOUT_S passed). Postal has no idempotency key, so the
    retry sends it again - at most once per such request, counted by postal-sender in
    mailgate_postal_ambiguous_retries_total. Nothing is lost."""
    full_only()
    before = chaos.metric("postal-sender", AMBIGUOUS)

    def inject() -> None:
        chaos.postal_faults(timeout_s=8, timeout_requests=3, timeout_mode="after_send")
        time.sleep(10)

    row = chaos.run("Postal answers after the client gave up", inject, settle_s=90)
    assert_duplicates_explained(chaos, row, before)
    assert row.duplicated == 3, table([row])


def test_postal_answers_slowly(chaos: Chaos) -> None:
    """Slow, not failing: answers arrive within POSTAL_TIMEOUT_S (5 s here, 10 s by
    default), so nothing is ambiguous and nothing is sent twice. (This row once showed a
    duplicate: the sandbox re-armed a spent timeout fault on every later fault change.)"""
    full_only()
    before = chaos.metric("postal-sender", AMBIGUOUS)

    def inject() -> None:
        chaos.postal_faults(latency_s=1.5)
        time.sleep(60)
        chaos.postal_faults(latency_s=0)

    row = chaos.run("Postal answers in 1.5 s for 60 s", inject, settle_s=90, interval_s=0.3)
    assert_duplicates_explained(chaos, row, before)
    assert_no_loss(row)


def test_customer_endpoint_down_then_up(chaos: Chaos) -> None:
    seconds = 60.0 if FULL else 5.0

    def inject() -> None:
        chaos.receiver.mode = "down"
        time.sleep(seconds)
        chaos.receiver.mode = "up"

    row = chaos.run(f"customer endpoint 503 for {seconds:.0f} s", inject, settle_s=90)
    assert chaos.receiver.refused > 0
    assert_no_loss(row)


def test_mail_stream_full_answers_451_not_250(chaos: Chaos) -> None:
    def inject() -> None:
        chaos.set_mail_stream_max_bytes(4000)
        time.sleep(3)
        chaos.set_mail_stream_max_bytes(None)

    row = chaos.run("JetStream MAIL stream full", inject, settle_s=60)
    assert row.transient > 0, table([row])  # 451 while full...
    assert row.transient_delivered == 0, table([row])  # ...and those never went out
    assert_no_loss(row)
