"""The pull worker for webhook deliveries: ``PullWorker`` in its per-message mode.

Deliveries must not wait for each other (one slow endpoint may hold an attempt for the whole
HTTP timeout), so each message is settled as soon as its own handling ends and a new fetch
goes out as soon as slots free up (``mailgate_core.nats.PullWorker`` with ``handler``).
Acks are not waited for: the delivery is already done (2xx, retry task or dead letter
durable), and a lost ack only means a redelivery, which receivers de-duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate_core.nats import PullWorker


@dataclass
class FlowWorker(PullWorker):
    """``PullWorker(..., handler=..., concurrency=...)`` with unconfirmed acks (pass
    ``per_message(handler)`` as ``handle_batch``; it is not used in this mode)."""

    sync_acks: bool = False
