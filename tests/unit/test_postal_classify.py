"""postal-sender's reading of Postal answers (specs/postal.md §1-§3)."""

import json

import pytest
from mailgate_postal_sender.classify import (
    PERMANENT_CODES,
    Rejected,
    Retry,
    Submitted,
    classify_response,
    transport_failure,
)


def envelope(status: str, data: object) -> bytes:
    return json.dumps({"status": status, "time": 0.01, "flags": {}, "data": data}).encode()


def test_success_gives_the_recipients_id_and_token() -> None:
    body = envelope(
        "success",
        {"message_id": "m1@ours.example", "messages": {"a@x.com": {"id": 37, "token": "T" * 16}}},
    )
    assert classify_response(200, body, "a@x.com") == Submitted(37, "T" * 16, "m1@ours.example")


def test_success_matches_the_recipient_case_insensitively() -> None:
    body = envelope(
        "success", {"message_id": None, "messages": {"A@X.com": {"id": 5, "token": "t"}}}
    )
    result = classify_response(200, body, "a@x.com")
    assert isinstance(result, Submitted) and result.postal_id == 5 and result.message_id is None


@pytest.mark.parametrize("code", sorted(PERMANENT_CODES))
def test_postal_error_codes_are_permanent(code: str) -> None:
    result = classify_response(200, envelope("error", {"code": code, "message": "no"}), "a@x.com")
    assert result == Rejected(code, "no")
    assert result.outcome == "permanent"


def test_a_parameter_error_is_permanent_with_postals_text() -> None:
    text = "`rcpt_to` parameter is required but is missing"
    result = classify_response(200, envelope("parameter-error", {"message": text}), "a@x.com")
    assert result == Rejected("ParameterError", text)


def test_a_suspended_server_is_retried_not_failed() -> None:
    result = classify_response(200, envelope("error", {"code": "ServerSuspended"}), "a@x.com")
    assert isinstance(result, Retry)
    assert (result.code, result.outcome, result.ambiguous) == (
        "ServerSuspended",
        "suspended",
        False,
    )


@pytest.mark.parametrize("status", [500, 502, 503, 504, 404, 301])
def test_a_non_200_http_status_is_transient(status: int) -> None:
    result = classify_response(status, b"<html>Bad Gateway</html>", "a@x.com")
    assert isinstance(result, Retry) and result.code == f"HTTP{status}" and not result.ambiguous


def test_a_200_that_is_not_json_is_transient() -> None:
    result = classify_response(200, b"<html>proxy</html>", "a@x.com")
    assert isinstance(result, Retry) and result.code == "BadResponse"


def test_success_without_ids_is_an_ambiguous_retry() -> None:
    result = classify_response(200, envelope("success", {"messages": {}}), "a@x.com")
    assert isinstance(result, Retry) and result.ambiguous


def test_a_timeout_after_the_request_left_is_ambiguous() -> None:
    sent = transport_failure(TimeoutError(), request_sent=True)
    unsent = transport_failure(ConnectionRefusedError("refused"), request_sent=False)
    assert (sent.outcome, sent.ambiguous) == ("timeout", True)
    assert (unsent.outcome, unsent.ambiguous) == ("connection_error", False)
