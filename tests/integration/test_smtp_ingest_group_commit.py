"""smtp-ingest's group commit (``publish_events(..., group=True)``): concurrent SMTP sessions'
events share JetStream atomic batches, every session still gets its 250 only once its events
are durable, and each mailgate id is in MAIL exactly once."""

# ruff: noqa: F811 - the fixtures of test_smtp_ingest_service are imported, then requested

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from mailgate_core import nats_wire
from mailgate_core.schemas import MailAccepted
from test_smtp_ingest_service import (  # noqa: F401 - fixtures used by name
    PASSWORD,
    SENDER,
    USER,
    Creds,
    Factory,
    connect,
    creds,
    make_message,
    reply,
    start_service,
    stream_events,
)

SESSIONS = 24
PER_SESSION = 5


async def test_concurrent_sessions_share_batches_and_each_id_is_stored_once(
    start_service: Factory, js
) -> None:
    service = await start_service(publish_timeout_s=10.0)
    group = nats_wire.connection_group_commit(service.js, "MAIL")
    assert group is not None
    group.window, group.atomic_min = 2, 2  # batches with a few sessions already

    def session(n: int) -> list[str]:
        answers = []
        with connect(service) as smtp:
            smtp.login(USER, PASSWORD)
            for i in range(PER_SESSION):
                smtp.mail(SENDER)
                smtp.rcpt(f"s{n}-{i}@example.org")
                answers.append(reply(smtp.data(make_message())))
        return answers

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(SESSIONS) as pool:
        results = await asyncio.gather(
            *(loop.run_in_executor(pool, session, n) for n in range(SESSIONS))
        )
    answers = [a for session_answers in results for a in session_answers]
    assert all(a.startswith("250 2.0.0 Ok: queued as ") for a in answers), answers[:3]
    queued = [a.rsplit(" ", 1)[1] for a in answers]
    events = await stream_events(js)  # read right after the 250s: already durable
    assert all(isinstance(e, MailAccepted) for e in events)
    ids = [e.message.mailgate_id for e in events]
    assert len(ids) == len(set(ids)) == SESSIONS * PER_SESSION  # each stored once
    assert sorted(ids) == sorted(queued)
    sample = service.registry.get_sample_value
    commits = sample("mailgate_nats_publish_batch_size_count")
    assert sample("mailgate_nats_publish_batch_size_sum") == len(answers)
    assert commits is not None and commits < len(answers)  # some events shared a batch
    assert sample("mailgate_smtp_messages_accepted_total") == len(answers)
    assert group.batches > 0 and group.in_flight == 0 and group.queued == 0
