"""The Postal sandbox's fault controls, as the chaos suite drives them (pure, no sockets)."""

from __future__ import annotations

from mailgate_fakes.postal import Faults


def test_a_spent_timeout_is_not_re_armed_by_a_later_unrelated_change() -> None:
    faults = Faults()
    faults.update({"timeout_s": 8, "timeout_requests": 3})
    faults.timeout_requests = 0  # the three requests consumed it
    faults.update({"latency_s": 1.5})
    faults.update({"latency_s": 0})
    assert faults.timeout_requests == 0  # was re-armed to 1 by each update: a stray timeout


def test_timeout_without_a_count_still_means_one_request() -> None:
    assert Faults(timeout_s=2).timeout_requests == 1
    faults = Faults()
    faults.update({"timeout_s": 2})
    assert faults.timeout_requests == 1
    faults.update({"timeout_s": 0})
    assert faults.timeout_requests == 0
